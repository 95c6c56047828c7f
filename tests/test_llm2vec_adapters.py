"""llm2vec's checkpoints: a base model, an MNTP LoRA adapter merged into it, a supervised LoRA adapter
merged on top; and an adapter folder given as the model, which stands for the base it names with it merged.

Oracle: peft itself on transformers (float32): PeftModel.from_pretrained(adapter 1).merge_and_unload(),
then the same with adapter 2, and transformers' forward; each text alone, mean pooled, L2-normalised.
Vectors within 1e-4, merged weights within 1e-6. The two adapters target different module sets (they
share q_proj) at different ranks and alphas, lora_B random; the first is named for the bare decoder
(as llm2vec's MNTP and supervised adapters, made on its bidirectional AutoModel), the second for the LM.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import transformers as tf
from flax import nnx
from training_fixtures import write_training_data

import tiny
from diffemb_jax.checkpoints import CheckpointError, load_model, model_config
from diffemb_jax.checkpoints.peft_adapters import base_params_of
from diffemb_jax.cli import build_parser, main as cli
from diffemb_jax.embedding import Embedder
from diffemb_jax.training.trainer import Trainer

TEXTS = ["the cat plays music", "a big red car fell on the house", "query", "she reads and writes text fast"]
ATTENTIONS = ("bidirectional", "causal")
# (target modules, r, alpha, named for the bare decoder, seed of lora_B)
MNTP = (["q_proj", "v_proj", "gate_proj"], 4, 8, True, 1)
SUPERVISED = (["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"], 2, 16, False, 2)


def _make_adapter(base_dir, directory, spec, base_name=None):
    """An adapter made by peft on the model read from `base_dir`, lora_B random; `base_name` replaces the
    base_model_name_or_path peft wrote (the path it was loaded from)."""
    targets, rank, alpha, bare, seed = spec
    lm = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    made = peft.get_peft_model(lm.model if bare else lm, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.1,
                                                                        target_modules=targets))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in made.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    made.save_pretrained(directory)
    names = json.loads((directory / "adapter_config.json").read_text())
    assert names["base_model_name_or_path"] == str(base_dir)  # what a real adapter says: where its base came from
    if base_name is not None:
        _set_base(directory, base_name)
    return directory


def _set_base(directory, base_name):
    config = json.loads((directory / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name
    (directory / "adapter_config.json").write_text(json.dumps(config))


def _peft_merged(base_dir, adapters):
    """transformers' LM from `base_dir` with each (directory, spec) merged by peft, in order."""
    lm = tf.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    for directory, (_, _, _, bare, _) in adapters:
        if bare:
            lm.model = peft.PeftModel.from_pretrained(lm.model, directory).merge_and_unload()
        else:
            lm = peft.PeftModel.from_pretrained(lm, directory).merge_and_unload()
    return lm.eval()


def _oracle_vectors(lm, tokenizer_dir, attention):
    return tiny.oracle_mean_vectors(lm, tokenizer_dir, TEXTS, attention)


def _encode(tmp_path, model, adapters, attention="bidirectional", name="out"):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / f"{name}-{attention}.npy"
    argv = ["encode", "--model", str(model), "--input", str(texts), "--output", str(out), "--attention", attention,
            "--pooling", "mean", "--batch-size", "4"]
    for adapter in adapters:
        argv += ["--adapter", str(adapter)]
    assert cli(argv) == 0
    return np.load(out)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A tiny Qwen2 and its two adapters on disk."""
    root = tmp_path_factory.mktemp("qwen2")
    base = tiny.write_checkpoint("qwen2", root / "base")
    return base, _make_adapter(base, root / "mntp", MNTP), _make_adapter(base, root / "supervised", SUPERVISED)


def test_two_adapters_encode_as_peft_merges_them_in_turn(stack, tmp_path):
    base, mntp, supervised = stack
    merged = _peft_merged(base, [(mntp, MNTP), (supervised, SUPERVISED)])
    only_mntp = _peft_merged(base, [(mntp, MNTP)])
    for attention in ATTENTIONS:
        theirs = _oracle_vectors(merged, base, attention)
        ours = _encode(tmp_path, base, [mntp, supervised], attention)
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
        # Both adapters count: the stack is neither the base nor the first adapter alone.
        assert np.abs(theirs - _oracle_vectors(_peft_merged(base, []), base, attention)).max() > 1e-2
        assert np.abs(theirs - _oracle_vectors(only_mntp, base, attention)).max() > 1e-2


def test_the_order_of_merging_does_not_change_the_model(stack, tmp_path):
    """A LoRA delta (B A * alpha / r) does not depend on the weights it is added to, so merged adapters
    commute, even on a module both adapt (q_proj): peft's two orders give the same weights, and so do
    ours, vectors alike. (The order matters to training, where the second adapter learns on the first.)"""
    base, mntp, supervised = stack
    forward = _peft_merged(base, [(mntp, MNTP), (supervised, SUPERVISED)]).state_dict()
    backward = _peft_merged(base, [(supervised, SUPERVISED), (mntp, MNTP)]).state_dict()
    plain = tf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert (forward[q0] - plain[q0]).abs().max() > 1e-2  # both deltas landed on the shared module
    for name, value in forward.items():
        torch.testing.assert_close(backward[name], value, rtol=0, atol=1e-6, msg=name)

    first = Embedder.from_pretrained(base, adapter=[mntp, supervised], batch_size=4).encode(TEXTS)
    second = Embedder.from_pretrained(base, adapter=[supervised, mntp], batch_size=4).encode(TEXTS)
    np.testing.assert_allclose(second, first, atol=1e-5, rtol=0)
    model, _ = load_model(base, adapters=[mntp, supervised], progress=False)
    ours = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))[("layers", 0, "attn", "q_proj", "kernel")]
    np.testing.assert_allclose(np.asarray(ours[...]), forward[q0].numpy().T, atol=1e-6, rtol=0)


def test_export_merges_both_adapters_as_peft(stack, tmp_path, capsys):
    base, mntp, supervised = stack
    out = tmp_path / "merged"
    assert cli(["export", str(base), str(out), "--adapter", str(mntp), "--adapter", str(supervised)]) == 0
    assert f"with {mntp}, then {supervised} merged" in capsys.readouterr().out
    want = _peft_merged(base, [(mntp, MNTP), (supervised, SUPERVISED)]).state_dict()
    got = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6, msg=name)


def test_every_command_that_takes_adapters_takes_several_and_one_alone(stack):
    base, mntp, supervised = stack
    parser = build_parser()
    two = ["--adapter", str(mntp), "--adapter", str(supervised)]
    for argv in (["encode", "--model", str(base), "--input", "t.txt", "--output", "o.npy", *two],
                 ["evaluate", "retrieval", "--model", str(base), "--data", "beir", *two],
                 ["evaluate", "bright", "--model", str(base), *two],
                 ["export", str(base), "out", *two], ["serve", "--model", str(base), *two]):
        assert parser.parse_args(argv).adapter == [str(mntp), str(supervised)], argv
        assert parser.parse_args(argv[:-2]).adapter == [str(mntp)], argv
        assert parser.parse_args(argv[:-4]).adapter is None, argv


def test_training_on_an_adapter_folder_starts_from_the_merge_and_its_adapter_stacks_on_it(stack, tmp_path):
    """llm2vec's supervised step: training on the MNTP folder (config.model.path) starts from the base
    with the MNTP adapter merged. The adapter it writes names that folder as its base, so `--model
    WORKDIR/adapter` is the whole stack, as peft builds it. (No step is run: what training does to the
    adapter is tests/test_export.py's test_trained_adapter_loads_in_peft.)"""
    base, mntp, _ = stack
    spec = importlib.util.spec_from_file_location("tiny_cfg", Path(__file__).parent.parent / "configs" / "tiny.py")
    tiny_cfg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny_cfg)
    config = tiny_cfg.get_config()
    config.model.path, config.data.files = str(mntp), (str(write_training_data(tmp_path / "train.jsonl")),)
    trainer = Trainer(config, tmp_path / "run")
    with_mntp = _peft_merged(base, [(mntp, MNTP)])
    q0 = with_mntp.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy().T
    start = np.asarray(dict(base_params_of(trainer.model))[("layers", 0, "attn", "q_proj", "kernel")][...])
    np.testing.assert_allclose(start, q0, atol=1e-6, rtol=0)
    adapter = trainer.write_adapter()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(mntp)
    stacked = peft.PeftModel.from_pretrained(with_mntp, adapter).merge_and_unload().eval()
    np.testing.assert_allclose(_encode(tmp_path, adapter, []), _oracle_vectors(stacked, base, "bidirectional"),
                               atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------ an adapter folder as model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_snapshot(cache, repo_id):
    """The folder huggingface_hub keeps `repo_id` in (models--ORG--NAME/snapshots/<commit>, refs/main)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return repo / "snapshots" / COMMIT


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    """A local Hugging Face cache (nothing downloaded) holding a tiny LLaMA as tiny-org/tiny-llama."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    tiny.write_checkpoint("llama", _cache_snapshot(cache, "tiny-org/tiny-llama"))
    return cache


@pytest.fixture()
def hub_llama(hub):
    return _cache_snapshot(hub, "tiny-org/tiny-llama")


def _mntp_folder(base_dir, directory, base_name):
    """llm2vec's MNTP layout: the adapter, the base's config.json and its tokenizer beside it, no weights."""
    _make_adapter(base_dir, directory, MNTP, base_name=base_name)
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(base_dir / name, directory / name)
    return directory


def test_an_adapter_folder_is_its_base_with_it_merged(hub, hub_llama, tmp_path, capsys):
    """`--model ORG/MNTP --adapter ORG/SUPERVISED` (Hub ids in the local cache, as llm2vec's are
    published), the base found through the MNTP folder's adapter_config.json; an adapter whose base is
    the MNTP folder stands for the whole stack; `diffemb convert` of the MNTP folder is the merge."""
    mntp = _mntp_folder(hub_llama, _cache_snapshot(hub, "tiny-org/tiny-llama-mntp"), "tiny-org/tiny-llama")
    supervised = _make_adapter(hub_llama, tmp_path / "supervised", SUPERVISED)
    shutil.copytree(supervised, _cache_snapshot(hub, "tiny-org/tiny-llama-mntp-supervised"))
    merged = _peft_merged(hub_llama, [(mntp, MNTP), (supervised, SUPERVISED)])
    for attention in ATTENTIONS:
        ours = _encode(tmp_path, "tiny-org/tiny-llama-mntp", ["tiny-org/tiny-llama-mntp-supervised"], attention)
        np.testing.assert_allclose(ours, _oracle_vectors(merged, hub_llama, attention), atol=1e-4, rtol=0)
    assert model_config("tiny-org/tiny-llama-mntp") == model_config(hub_llama)

    _set_base(supervised, str(mntp))  # as a run trained on the MNTP folder writes its adapter
    np.testing.assert_allclose(_encode(tmp_path, supervised, [], name="chained"),
                               _oracle_vectors(merged, hub_llama, "bidirectional"), atol=1e-4, rtol=0)

    only_mntp = _peft_merged(hub_llama, [(mntp, MNTP)])
    out = tmp_path / "converted"
    assert cli(["convert", str(mntp), str(out)]) == 0
    capsys.readouterr()
    np.testing.assert_allclose(_encode(tmp_path, out, [], name="converted"),
                               _oracle_vectors(only_mntp, hub_llama, "bidirectional"), atol=1e-4, rtol=0)


def test_an_adapter_folder_whose_base_cannot_be_found_says_what_to_do(hub_llama, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("the cat\n")
    mntp = _mntp_folder(hub_llama, tmp_path / "mntp", "tiny-org/tiny-llama")

    def fails(model, *needles, adapters=()):
        argv = ["encode", "--model", str(model), "--input", str(texts), "--output", str(tmp_path / "o.npy")]
        for adapter in adapters:
            argv += ["--adapter", str(adapter)]
        assert cli(argv) == 2
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, err
        assert not (tmp_path / "o.npy").exists()

    _set_base(mntp, "tiny-org/absent")
    fails(mntp, f"{mntp / 'adapter_config.json'}: the base model 'tiny-org/absent'", "hf download tiny-org/absent")
    _set_base(mntp, str(tmp_path / "gone"))
    fails(mntp, f"names the base model '{tmp_path / 'gone'}', which does not exist", "as an adapter (--adapter)")
    _set_base(mntp, None)
    fails(mntp, "names no base model (base_model_name_or_path is None)")
    _set_base(mntp, str(mntp))
    fails(mntp, "an adapter of this very chain")
    both = tmp_path / "both"
    shutil.copytree(hub_llama, both)
    shutil.copy(mntp / "adapter_config.json", both)
    fails(both, "holds both a model (model.safetensors) and a PEFT adapter (adapter_config.json)")
    fails(hub_llama, f"{tmp_path} is no PEFT adapter directory", adapters=[tmp_path])
    fails(hub_llama, "tiny-org/nothing is neither a local path nor a model in the Hugging Face cache",
          "hf download tiny-org/nothing", adapters=["tiny-org/nothing"])
    with pytest.raises(CheckpointError, match="names no base model"):
        model_config(_set_base(mntp, "") or mntp)
