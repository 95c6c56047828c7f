"""`diffemb bench encode|train` end to end on a tiny random LLaMA: both frameworks run and agree."""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402
from diffemb_jax import cli  # noqa: E402


def _write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A small BPE (lower-case letters and digits, then merges) that fits the tiny model's vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], show_progress=False,
                                  initial_alphabet=list(string.ascii_lowercase + string.digits + ".,()"))
    tok.train_from_iterator(["Return the sum of the arguments.", "Open the file and read its lines.",
                             "Create a new thread that runs the target function."], trainer)
    assert tok.get_vocab_size() <= vocab_size
    tok.save(str(directory / "tokenizer.json"))


def _bench_tiny(tmp_path, what: str, *flags: str) -> dict:
    """`diffemb bench WHAT` on a tiny random LLaMA with a BPE that fits it; the JSON report."""
    model_dir = tiny.write_checkpoint("llama", tmp_path / "llama")
    _write_tokenizer(model_dir, vocab_size=97)
    out = tmp_path / "bench.json"
    assert cli.main(["bench", what, "--model", str(model_dir), *flags, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_bench_encode_tiny_model(tmp_path):
    report = _bench_tiny(tmp_path, "encode", "--texts", "8", "--batch-size", "4",
                         "--max-batch-tokens", "64", "--max-length", "32")
    assert report["settings"]["bucket_rows"] == [2]  # 64 tokens a batch: both frameworks send 2 rows
    assert {"jax", "flax", "torch", "transformers"} <= set(report["settings"]["versions"])
    assert set(report["results"]) == {"jax", "torch"}
    for result in report["results"].values():
        assert result["texts"] == 8 and result["tokens"] == report["settings"]["tokens"] > 0
        assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 0
    assert report["max_abs_diff_first"] < 1e-3
    jax_r, torch_r = report["results"]["jax"], report["results"]["torch"]
    assert jax_r["warmup_compiles"] > 0 == jax_r["timed_compiles"]  # warming up met every batch shape
    assert jax_r["compile_seconds"] > 0 == torch_r["compile_seconds"]
    # one bucket (32): PyTorch computes each text in a 32-token row; JAX packs what it can
    assert torch_r["computed_tokens"] == 8 * 32 and report["settings"]["tokens"] <= jax_r["computed_tokens"] <= 8 * 32
    assert torch_r["warmup_compiles"] is None is torch_r["timed_compiles"]
    assert report["model_flops_per_token"] > 0
    for result in report["results"].values():  # no peak known on CPU without --peak-tflops
        assert result["mfu"] is None and result["model_tflops_per_s"] > 0
    _assert_device_fields(report)


def test_bench_train_tiny_model(tmp_path):
    report = _bench_tiny(tmp_path, "train", "--queries", "4", "--query-length", "8",
                         "--doc-length", "24", "--lora-rank", "4", "--warmup-steps", "1", "--steps", "1",
                         "--peak-tflops", "2.5", "--profile", str(tmp_path / "profile"))
    settings = report["settings"]
    assert list(report["results"]) == ["JAX remat=none", "PyTorch checkpointing=off"]
    computed = settings["computed_tokens"]  # PyTorch pads each side to its longest; JAX packs rows of 24
    assert 0 < settings["tokens_per_step"] <= computed["torch"] <= 4 * (8 + 24 + 24)
    assert settings["tokens_per_step"] <= computed["jax"] == 24 * settings["packed_rows"] <= 24 * 4 * 3
    for result in report["results"].values():
        assert result["tokens_per_step"] == settings["tokens_per_step"]
        assert result["computed_tokens"] == computed[result["framework"]]
        assert result["tokens_per_s"] > 0 and result["step_seconds"] > 0 and result["peak_rss_mb"] > 0
        assert len(result["losses"]) == 2 and result["remat"] == "none"
        assert result["texts_per_s"] == pytest.approx(4 * 3 / result["step_seconds"])  # 4 x (query, pos, neg)
    # LoRA B starts at zero: the first step is the base model's loss on the same ids in both frameworks
    assert report["first_loss_abs_diff"] < 1e-3
    jax_r, torch_r = report["results"]["JAX remat=none"], report["results"]["PyTorch checkpointing=off"]
    assert abs(jax_r["first_loss"] - torch_r["first_loss"]) < 1e-3
    assert jax_r["compile_seconds"] > 0 == torch_r["compile_seconds"]
    assert jax_r["warmup_compiles"] > 0 == jax_r["timed_compiles"]
    assert report["model_flops_per_token"] > 0
    for result in report["results"].values():
        assert result["mfu"] == pytest.approx(result["model_tflops_per_s"] / 2.5)
    _assert_device_fields(report)
    _assert_profiles(tmp_path / "profile", jax_r, torch_r)


def test_bench_on_a_mesh(tmp_path, monkeypatch):
    """--mesh: the JAX workers run on a mesh of four (simulated CPU) devices, rows split over data x
    fsdp; the step (here GradCache's, in chunks of 4 rows) and the embeddings still agree with
    PyTorch's on one, the packed rows are a multiple of the batch shards, and ratio and MFU are also
    given per device."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")  # the workers' JAX
    report = _bench_tiny(tmp_path, "train", "--queries", "4", "--query-length", "8", "--doc-length", "24",
                         "--lora-rank", "4", "--warmup-steps", "1", "--steps", "1", "--peak-tflops", "2.5",
                         "--mesh", "2,2,1", "--grad-cache-chunk", "4")
    settings = report["settings"]
    assert settings["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and settings["packed_rows"] % 4 == 0
    assert settings["packed_rows"] > 4  # so GradCache runs several chunks
    jax_r, torch_r = report["results"]["JAX remat=none"], report["results"]["PyTorch checkpointing=off"]
    assert (jax_r["grad_cache_chunk"], torch_r["grad_cache_chunk"]) == (4, 0)
    assert (jax_r["devices"], torch_r["devices"]) == (4, 1)
    assert abs(jax_r["first_loss"] - torch_r["first_loss"]) < 1e-3
    pair = report["pairs"]["none"]
    assert pair["tokens_per_s_ratio_per_device"] == pytest.approx(pair["tokens_per_s_ratio"] / 4)
    assert jax_r["mfu"] == pytest.approx(jax_r["model_tflops_per_s"] / (2.5 * 4))
    encoded = _bench_tiny(tmp_path / "encode", "encode", "--texts", "8", "--batch-size", "4", "--max-length", "32",
                          "--mesh", "4,1,1")
    assert encoded["results"]["jax"]["devices"] == 4 and encoded["max_abs_diff_first"] < 1e-3
    for argv, message in ((["--mesh", "2,2"], "three positive sizes"), (["--mesh", "3,1,1"], "not divisible"),
                          (["--grad-cache-chunk", "-1"], "grad-cache-chunk")):
        with pytest.raises(ValueError, match=message):
            from diffemb_jax.bench.compare import main

            main(cli.build_parser().parse_args(["bench", "train", "--queries", "4", *argv]))


def _assert_profiles(root: Path, jax_r: dict, torch_r: dict) -> None:
    """--profile: each run's folder holds its framework's trace of the profiled train step (the JAX
    one the XLA program of the step; the PyTorch one its matrix products), apart from the timed
    figures (the losses are the warm-up and timed steps' only)."""
    import gzip

    assert jax_r["profile"]["profile_dir"] == str(root / "JAX-remat=none")
    assert torch_r["profile"]["profile_dir"] == str(root / "PyTorch-checkpointing=off")
    xplane = [Path(f) for f in jax_r["profile"]["files"] if f.endswith(".xplane.pb")]
    assert len(xplane) == 1 and xplane[0].stat().st_size > 0
    perfetto = next(Path(f) for f in jax_r["profile"]["files"] if f.endswith("perfetto_trace.json.gz"))
    events = json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]
    assert any("step_fn" in event.get("name", "") for event in events)
    trace = json.loads((root / "PyTorch-checkpointing=off" / "trace.json").read_text())
    assert any(event.get("name") in ("aten::mm", "aten::addmm", "aten::linear") for event in trace["traceEvents"])
    assert "aten::" in (root / "PyTorch-checkpointing=off" / "operators.txt").read_text()


def test_bench_train_remat_sweep(tmp_path, capsys):
    """--remat none,full: a JAX run per policy, PyTorch once with checkpointing off and once on; each
    policy compared with its match; all first losses are the base model's, so they agree."""
    report = _bench_tiny(tmp_path, "train", "--queries", "4", "--query-length", "8",
                         "--doc-length", "16", "--lora-rank", "4", "--warmup-steps", "0", "--steps", "1",
                         "--remat", "none,full")
    results = report["results"]
    assert report["settings"]["remat"] == ["none", "full"]
    assert list(results) == ["JAX remat=none", "JAX remat=full", "PyTorch checkpointing=off",
                             "PyTorch checkpointing=on"]
    assert [(r["framework"], r["remat"]) for r in results.values()] == [
        ("jax", "none"), ("jax", "full"), ("torch", "none"), ("torch", "full")]
    first = [r["first_loss"] for r in results.values()]
    assert max(first) - min(first) < 1e-3  # LoRA B starts at zero: the base model's loss in every run
    assert report["first_loss_abs_diff"] == pytest.approx(max(first) - min(first))
    for policy, torch_label in (("none", "PyTorch checkpointing=off"), ("full", "PyTorch checkpointing=on")):
        pair, jax_r = report["pairs"][policy], results[f"JAX remat={policy}"]
        assert pair["pytorch"] == torch_label
        torch_r = results[torch_label]
        assert pair["tokens_per_s_ratio"] == pytest.approx(jax_r["tokens_per_s"] / torch_r["tokens_per_s"])
        assert pair["first_loss_abs_diff"] == pytest.approx(abs(jax_r["first_loss"] - torch_r["first_loss"]))
    jax_runs = {p: results[f"JAX remat={p}"] for p in ("none", "full")}
    best = report["best_remat"]
    on_cpu = all(r["peak_device_mb"] is None for r in jax_runs.values())
    assert best["memory"] == ("timed_peak_rss_mb" if on_cpu else "peak_device_mb")
    assert best["fastest"] == max(jax_runs, key=lambda p: jax_runs[p]["tokens_per_s"])
    assert best["lowest_memory"] == min(jax_runs, key=lambda p: jax_runs[p][best["memory"]])
    printed = capsys.readouterr().out
    assert "| JAX remat=full |" in printed and "| PyTorch checkpointing=on |" in printed
    assert f"fastest JAX policy: remat={best['fastest']}" in printed


def test_remat_policies_and_the_torch_runs_they_need():
    from diffemb_jax.bench import train
    from diffemb_jax.bench.flags import remat_policies
    from diffemb_jax.model.decoder import REMAT_POLICIES

    assert remat_policies("all") == list(REMAT_POLICIES)
    assert remat_policies("full, dots,full") == ["full", "dots"]
    runs = train.runs({"remat": ["dots", "none", "full"]})  # dots and full share PyTorch's checkpointing
    assert runs == {"JAX remat=dots": ("jax", {"remat": "dots"}), "JAX remat=none": ("jax", {"remat": "none"}),
                    "JAX remat=full": ("jax", {"remat": "full"}),
                    "PyTorch checkpointing=on": ("torch", {"remat": "full"}),
                    "PyTorch checkpointing=off": ("torch", {"remat": "none"})}


def test_bench_rejects_an_unknown_remat_policy_before_any_worker(monkeypatch, capsys):
    from diffemb_jax.bench import compare

    spawned = []
    monkeypatch.setattr(compare, "spawn_worker", lambda *args: spawned.append(args))

    assert cli.main(["bench", "train", "--shape", "tiny", "--remat", "none,nothing"]) == 2
    assert "--remat none,nothing: unknown policy 'nothing'; choose from none, full" in capsys.readouterr().err
    assert spawned == []


def _assert_device_fields(report: dict) -> None:
    """Device-memory fields are always there: null on the CPU, MB on an accelerator."""
    assert report["device_mismatch"] is None
    for result in report["results"].values():
        on_cpu = result["device_kind"] == "cpu"
        assert (result["peak_device_mb"] is None) == on_cpu
        if on_cpu:
            assert result["timed_peak_device_mb"] is None


def test_device_peak_memory_is_none_without_an_accelerator():
    import jax
    import torch

    from diffemb_jax.bench import jax_side, torch_reference

    for side, accelerated in ((jax_side, jax.default_backend() != "cpu"), (torch_reference, torch.cuda.is_available())):
        peak = side.device_peak_mb()
        assert (peak is None) == (not accelerated) and (peak is None or peak >= 0)


def test_table_shows_a_dash_for_missing_figures_and_warns_of_mixed_devices():
    from diffemb_jax.bench import report

    results = {"jax": {"device": "NVIDIA H100 80GB HBM3", "device_kind": "NVIDIA H100 80GB HBM3",
                       "peak_device_mb": 1234.4},
               "torch": {"device": "cpu, 16 threads", "device_kind": "cpu", "peak_device_mb": None}}
    table = report.table(results, (("device", "{device}"), ("peak device MB", "{peak_device_mb:.0f}")))
    assert table.splitlines()[1:] == ["|---|---|---:|", "| JAX | NVIDIA H100 80GB HBM3 | 1234 |",
                                      "| PyTorch | cpu, 16 threads | – |"]
    assert "ratio compares different hardware" in report.device_mismatch(results)
    results["torch"].update(device="NVIDIA H100 80GB HBM3", device_kind="NVIDIA H100 80GB HBM3")
    assert report.device_mismatch(results) is None


# Flags of another kind: argparse refuses them (each kind is a subcommand with its own flags).
FOREIGN_FLAGS = [
    (["train", "--batch-size", "4", "--steps", "2"], "unrecognized arguments: --batch-size 4"),
    (["encode", "--queries", "4"], "unrecognized arguments: --queries 4"),
    (["encode", "--lora-dropout", "0"], "unrecognized arguments: --lora-dropout 0"),
]
BAD_FLAGS = [
    (["train", "--lora-dropout", "1"], r"--lora-dropout must be in \[0, 1\)"),
    (["encode", "--max-batch-tokens", "-1"], "--max-batch-tokens must be >= 0"),
    (["encode", "--peak-tflops", "0"], "--peak-tflops must be positive"),
    (["encode", "--tokenizer", "tokenizer.json"], "--tokenizer is for --shape"),
]


def test_bench_rejects_the_other_jobs_flags(tmp_path, capsys):
    from diffemb_jax.bench.compare import main

    for argv, message in FOREIGN_FLAGS:
        with pytest.raises(SystemExit) as exit_info:
            cli.build_parser().parse_args(["bench", *argv])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    for argv, message in BAD_FLAGS:
        args = cli.build_parser().parse_args(["bench", *argv])
        with pytest.raises(ValueError, match=message):
            main(args)


def test_model_flops_formulas_match_torch_flop_counter():
    """Oracle: torch's FlopCounterMode over transformers + peft on a tiny LLaMA (eager attention, no
    padding), a forward of the base model and a forward and backward with LoRA; exact counts."""
    import dataclasses

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    from diffemb_jax.bench.flops import forward_flops, train_flops
    from diffemb_jax.bench.torch_reference import embed
    from diffemb_jax.checkpoints.families import config_from_hf
    from diffemb_jax.model.lora import DEFAULT_TARGETS

    hf = tiny.oracle_model("llama")
    base = hf.model
    base.config._attn_implementation = "eager"
    cfg = dataclasses.asdict(config_from_hf(hf.config.to_dict()))
    rows, n, rank = 3, 11, 4
    ids, padding = torch.randint(1, 97, (rows, n)), torch.ones(rows, n, dtype=torch.bool)

    def counted(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    with torch.no_grad():
        assert counted(lambda: embed(base, ids, padding)) == rows * forward_flops(cfg, n)
    adapted = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=DEFAULT_TARGETS))
    assert counted(lambda: embed(adapted, ids, padding).sum().backward()) \
        == rows * train_flops(cfg, n, rank)


@pytest.mark.parametrize("own_tokenizer", [False, True])
def test_bench_encode_named_shape_at_random_weights(tmp_path, own_tokenizer):
    out = tmp_path / "bench.json"
    flags = []
    if own_tokenizer:  # where the bundled SmolLM2 is not installed (an offline GPU host)
        _write_tokenizer(tmp_path, vocab_size=97)
        flags = ["--tokenizer", str(tmp_path / "tokenizer.json")]

    rc = cli.main(["bench", "encode", "--shape", "tiny", "--texts", "4", "--batch-size", "2", "--max-length", "16",
                   *flags, "--json", str(out)])

    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["shape"] == "tiny"
    assert ("--tokenizer" in report["command"]) == own_tokenizer
    config = report["results"]["jax"]["model_config"]
    assert (config["hidden_size"], config["num_layers"], config["num_kv_heads"]) == (64, 2, 2)
    assert report["max_abs_diff_first"] < 1e-3  # the same random weights on both sides


def test_shape_tokenizer_must_fit_the_shapes_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models

    from diffemb_jax.bench import shapes

    _write_tokenizer(tmp_path, vocab_size=97)
    assert shapes.shape_tokenizer(tmp_path / "tokenizer.json", "tiny").get_vocab_size() <= 97
    assert shapes.shape_tokenizer(tmp_path, "tiny").get_vocab_size() <= 97  # a model directory's tokenizer.json
    wide = Tokenizer(models.WordLevel({f"w{i}": i for i in range(50_000)}, unk_token="w0"))
    wide.save(str(tmp_path / "wide.json"))
    with pytest.raises(ValueError, match="50000 ids, more than the 49152 of shape tiny"):
        shapes.shape_tokenizer(tmp_path / "wide.json", "tiny")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        shapes.shape_tokenizer(tmp_path / "absent.json", "tiny")


def test_random_weights_are_written_once_and_never_half(tmp_path, monkeypatch):
    import transformers

    from diffemb_jax.bench import shapes

    monkeypatch.setenv("DIFFEMB_CACHE", str(tmp_path / "cache"))
    save = transformers.PreTrainedModel.save_pretrained

    def save_then_fail(self, directory, **kwargs):
        save(self, directory, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        shapes.random_weights("tiny", "float32")
    assert not list((tmp_path / "cache" / "bench").iterdir())  # nothing half-written left behind
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save)

    cached = shapes.random_weights("tiny", "float32")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config",
                        lambda *args, **kwargs: pytest.fail("the cached weights were written again"))
    assert shapes.random_weights("tiny", "float32") == cached
    assert list((tmp_path / "cache" / "bench").iterdir()) == [cached]
    _write_tokenizer(tmp_path, vocab_size=97)
    own = shapes.random_checkpoint("tiny", tmp_path / "own", "float32",
                                   shapes.shape_tokenizer(tmp_path / "tokenizer.json", "tiny"))
    bundled = shapes.random_checkpoint("tiny", tmp_path / "bundled", "float32", shapes.shape_tokenizer(None, "tiny"))
    for checkpoint in (own, bundled):
        assert (checkpoint / "config.json").resolve() == cached / "config.json"
    assert (own / "tokenizer.json").read_text() != (bundled / "tokenizer.json").read_text()


@pytest.mark.parametrize("what, flags", [
    ("encode", ["--texts", "4", "--batch-size", "2", "--max-length", "16"]),
    ("train", ["--queries", "2", "--query-length", "8", "--doc-length", "16", "--lora-rank", "2",
               "--steps", "1", "--remat", "none,full"]),
    ("long", ["--lengths", "16,32"]),
])
def test_bench_without_torch_runs_jax_alone(tmp_path, what, flags):
    report = _bench_tiny(tmp_path, what, *flags, "--no-vs-torch")

    assert {r["framework"] for r in report["results"].values()} == {"jax"}
    assert report["settings"]["vs_torch"] is False and report["command"].endswith("--no-vs-torch")
    assert "tokens_per_s_ratio" not in report and not report.get("pairs")
    if what == "train":  # the JAX policies still agree on the base model's loss
        assert len(report["results"]) == 2 and report["first_loss_abs_diff"] < 1e-3
        assert report["best_remat"]["fastest"] in ("none", "full")
    if what == "long":
        assert report["longest"] == {"jax": 32} and report["tokens_per_s_ratio_by_length"] == {}


def test_first_losses_agree_within_the_dtypes_rounding():
    from diffemb_jax.bench.train import agreement

    assert agreement(0.06, "bfloat16") == "(agree)"  # JAX 1.683 vs PyTorch 1.743 on SmolLM2 in bf16
    assert "WARNING" in agreement(0.06, "float32") and "WARNING" in agreement(0.2, "bfloat16")


def test_bench_shape_excludes_model():
    from diffemb_jax.bench.compare import main

    args = cli.build_parser().parse_args(["bench", "encode", "--shape", "tiny", "--model", "somewhere"])
    with pytest.raises(ValueError, match="--model and --shape exclude each other"):
        main(args)


@pytest.mark.parametrize("remat, entries", [("none", 1), ("full", 2)])
def test_torch_reference_recomputes_the_layers_under_remat_full(tmp_path, monkeypatch, remat, entries):
    """--remat full is the recipe's gradient checkpointing on the PyTorch side: each layer's MLP is
    entered again in the backward (counted on entry: recomputation stops before the MLP returns)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    from diffemb_jax.bench.torch_reference import trainer
    from diffemb_jax.batching import SIDES
    from diffemb_jax.model.lora import DEFAULT_TARGETS

    model_dir = tiny.write_checkpoint("llama", tmp_path / "llama")
    rows = {"input_ids": [[5, 6, 7, 8]] * 2, "padding_mask": [[1, 1, 1, 0]] * 2}
    job = {"torch_source": str(model_dir), "dtype": "float32", "seed": 42, "remat": remat, "scale": 50.0,
           "lora": {"rank": 4, "alpha": 8.0, "dropout": 0.05, "targets": DEFAULT_TARGETS}, "warmup_steps": 0,
           "steps": 1, "optimizer": {"lr": 1e-4, "weight_decay": 0.0, "grad_clip": 1.0},
           "batch": {side: rows for side in SIDES}}
    step, _, _ = trainer(job)
    calls, forward = [], LlamaMLP.forward

    def counted(self, *args, **kwargs):
        calls.append(self)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(LlamaMLP, "forward", counted)
    step(0)
    layers = len({id(mlp) for mlp in calls})
    assert layers > 0 and len(calls) == entries * layers * len(SIDES)


def test_parent_preallocation_off_gives_workers_the_callers_setting_and_no_compilation_cache(monkeypatch):
    import os

    from diffemb_jax.bench import compare

    for caller in (None, "true"):
        if caller is None:
            monkeypatch.delenv(compare.PREALLOCATE, raising=False)
        else:
            monkeypatch.setenv(compare.PREALLOCATE, caller)
        with compare.parent_preallocation_off() as worker_env:
            assert os.environ[compare.PREALLOCATE] == "false"
            assert worker_env.get(compare.PREALLOCATE) == caller
            assert worker_env["JAX_ENABLE_COMPILATION_CACHE"] == "false"  # compile times are compilations
        assert os.environ.get(compare.PREALLOCATE) == caller


def test_bench_long_tiny_model(tmp_path):
    """Both frameworks at each length, past the XLA kernel's 1024-token query chunks, agreeing."""
    report = _bench_tiny(tmp_path, "long", "--lengths", "256,2048")
    assert list(report["results"]) == ["JAX 256", "JAX 2048", "PyTorch 256", "PyTorch 2048"] and not report["skipped"]
    for result in report["results"].values():
        assert result["status"] == "ok" and result["length"] - 8 <= result["tokens"] <= result["length"]
        assert result["seconds"] > 0 and result["model_tflops_per_s"] > 0 and "embedding" not in result
        assert (result["compile_seconds"] > 0) == (result["framework"] == "jax")
    assert report["longest"] == {"jax": 2048, "torch": 2048}
    assert set(report["tokens_per_s_ratio_by_length"]) == {"256", "2048"}
    assert max(report["max_abs_diff_by_length"].values()) < 1e-4


def _long_result(framework, length, seconds, status="ok", rss=1000.0, device_kind="cpu"):
    return {"framework": framework, "length": length, "status": status, "seconds": seconds, "warmup_seconds": 0.0,
            "peak_rss_mb": rss, "device_kind": device_kind}


def test_bench_long_stops_at_memory_and_predicted_time(monkeypatch):
    from diffemb_jax.bench import long

    settings = {"time_limit": 100.0}
    oom = {"a": _long_result("jax", 1024, None, status="out of memory")}
    assert long.skip("jax", {"length": 2048}, oom, settings) == "a shorter length ran out of memory"
    assert long.skip("torch", {"length": 2048}, oom, settings) is None  # the other framework goes on
    # 10 s then 30 s: the increase, scaled as length squared, makes 30 + 20 x 4 = 110 s at 4096
    runs = {"a": _long_result("jax", 1024, 10.0), "b": _long_result("jax", 2048, 30.0)}
    assert long.skip("jax", {"length": 4096}, runs, settings).startswith("would take about 110 s")
    assert long.skip("jax", {"length": 4096}, runs, {"time_limit": 200.0}) is None
    monkeypatch.setattr(long, "available_host_mb", lambda: 5000.0)  # 2000 + 1000 x 4 > 0.9 x 5000
    runs = {"a": _long_result("jax", 1024, 1.0, rss=1000.0), "b": _long_result("jax", 2048, 2.0, rss=2000.0)}
    assert "would need about 6000 MB" in long.skip("jax", {"length": 4096}, runs, settings)
    runs = {k: {**r, "device_kind": "NVIDIA H100"} for k, r in runs.items()}  # there out of memory is caught
    assert long.skip("jax", {"length": 4096}, runs, settings) is None


def test_out_of_memory_is_told_from_other_errors():
    from diffemb_jax.bench import workers

    assert workers.out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GiB"))
    assert workers.out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert workers.out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                            "can't allocate memory: you tried to allocate 9 bytes"))
    assert not workers.out_of_memory(ValueError("shapes (3,) and (4,) do not match"))


@pytest.mark.parametrize("lengths", ["1024,512", "0,8", "8,8", "1k"])
def test_bench_long_rejects_bad_lengths(lengths, capsys):
    assert cli.main(["bench", "long", "--lengths", lengths]) == 2
    assert "--lengths" in capsys.readouterr().err


def test_bench_long_compile_only_plans_from_the_shape_alone(tmp_path, monkeypatch):
    """No weights are written or read: the parameters XLA counts are the transformers model's own,
    and the temporaries grow with the document."""
    import transformers

    from diffemb_jax.bench import shapes

    monkeypatch.setattr(shapes, "random_weights", lambda *a: pytest.fail("--compile-only wrote weights"))
    out = tmp_path / "plan.json"
    assert cli.main(["bench", "long", "--compile-only", "--shape", "tiny", "--lengths", "256,4096",
                     "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    small, large = (report["results"][f"JAX {n}"] for n in (256, 4096))
    model_type, fields = shapes.SHAPES["tiny"]
    config = transformers.AutoConfig.for_model(model_type, **fields)
    weights = transformers.AutoModel.from_config(config).num_parameters()
    for result in (small, large):  # float32 weights, and the [1, length] int32 inputs the program reads
        assert 0 < result["arguments_gib"] * 2**30 - weights * 4 <= 3 * 4 * result["length"]
        assert result["fits"] == "yes" and result["compile_seconds"] > 0
    assert large["temporaries_gib"] > small["temporaries_gib"] > 0
    assert report["longest_fitting"] == 4096


def test_bench_long_compile_only_scan_layers_holds_a_copy_of_the_blocks_weights(tmp_path):
    """--scan-layers: the same arguments, and temporaries larger by about the stacked copy of the
    blocks' weights (transformers' count of the parameters under layers., float32)."""
    import transformers

    from diffemb_jax.bench import shapes

    reports = []
    for flags in ([], ["--scan-layers"]):
        out = tmp_path / f"plan{len(flags)}.json"
        assert cli.main(["bench", "long", "--compile-only", "--shape", "tiny", "--lengths", "256",
                         "--json", str(out), *flags]) == 0
        reports.append(json.loads(out.read_text()))
    unrolled, scanned = (r["results"]["JAX 256"] for r in reports)
    assert reports[1]["settings"]["scan_layers"] is True and "--scan-layers" in reports[1]["command"]
    model_type, fields = shapes.SHAPES["tiny"]
    model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(model_type, **fields))
    blocks = sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers.")) * 4 / 2**30
    assert scanned["arguments_gib"] == unrolled["arguments_gib"]
    assert 0.9 * blocks <= scanned["temporaries_gib"] - unrolled["temporaries_gib"] <= 1.5 * blocks + unrolled[
        "temporaries_gib"]


def test_bench_long_compile_only_reads_a_models_config_not_its_weights(tmp_path, monkeypatch, capsys):
    import diffemb_jax.checkpoints.checkpoint as checkpoint_module

    from diffemb_jax.bench.compare import main

    for name in ("load_decoder", "load_converted"):
        monkeypatch.setattr(checkpoint_module, name, lambda *a, **k: pytest.fail("read weights"))
    model_dir = tiny.write_checkpoint("llama", tmp_path / "llama")
    args = ["bench", "long", "--compile-only", "--lengths", "64,128"]
    report = main(cli.build_parser().parse_args([*args, "--model", str(model_dir)]))
    assert report["settings"]["model"] == str(model_dir) and report["settings"]["shape"] is None
    assert list(report["results"]) == ["JAX 64", "JAX 128"]
    assert cli.main([*args, "--tokenizer", "t.json"]) == 2 and "--tokenizer" in capsys.readouterr().err
    assert cli.main([*args, "--profile", str(tmp_path)]) == 2 and "--profile" in capsys.readouterr().err


def test_the_command_echo_keeps_zeros_and_bare_flags():
    from diffemb_jax.bench.flags import command_line

    args = cli.build_parser().parse_args(["bench", "encode", "--pack-length", "0"])
    assert "--pack-length 0" in command_line(args) and "--compile-only" not in command_line(args)
    args = cli.build_parser().parse_args(["bench", "long", "--compile-only"])
    assert command_line(args).split().count("--compile-only") == 1 and "True" not in command_line(args)
