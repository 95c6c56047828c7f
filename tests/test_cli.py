"""`diffemb encode` end to end on a tiny converted model, and each bad input it must refuse
with a message that names the problem, leaving no output file behind."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tiny
from diffemb_jax.checkpoints import convert
from diffemb_jax.cli import main as cli
from diffemb_jax.embedding import Embedder

LINES = ["the cat plays music", "a dog runs", "the big red car was fast", "she reads a text"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return convert(tiny.write_checkpoint("qwen2", root / "hf"), root / "converted", progress=False)


def _encode(model_dir, input_path, output_path, *extra):
    return cli(["encode", "--model", str(model_dir), "--input", str(input_path), "--output", str(output_path),
                *extra])


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_encode_writes_row_i_for_line_i(model_dir, tmp_path, suffix):
    source = tmp_path / f"in{suffix}"
    if suffix == ".txt":
        source.write_text("\n".join(LINES) + "\n")
    else:
        source.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(LINES)))
    out = tmp_path / "out.npy"
    assert _encode(model_dir, source, out, "--attention", "causal", "--batch-size", "3") == 0
    vectors = np.load(out)
    assert vectors.dtype == np.float32 and vectors.shape == (4, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
    want = Embedder.from_pretrained(model_dir, attention="causal").encode(LINES, progress=False)
    np.testing.assert_allclose(vectors, want, atol=1e-5)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_encode_dimensions_is_the_full_encode_cut_and_renormalised(model_dir, tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(LINES) + "\n")
    assert _encode(model_dir, source, tmp_path / "full.npy") == 0
    assert _encode(model_dir, source, tmp_path / "cut.npy", "--dimensions", "12") == 0
    full, cut = np.load(tmp_path / "full.npy"), np.load(tmp_path / "cut.npy")
    want = full[:, :12] / np.linalg.norm(full[:, :12], axis=-1, keepdims=True)
    assert cut.dtype == np.float32 and cut.shape == (4, 12)
    np.testing.assert_allclose(cut, want, atol=1e-6)
    assert "wrote 4 x 12 float32 embeddings" in capsys.readouterr().out
    for bad, needle in (("33", "--dimensions 33: the model's embeddings have 32 components"),
                        ("0", "--dimensions 0: give a positive number")):
        assert _encode(model_dir, source, tmp_path / f"bad{bad}.npy", "--dimensions", bad) == 2
        assert needle in capsys.readouterr().err
        assert not (tmp_path / f"bad{bad}.npy").exists()


def _fails(model_dir, tmp_path, capsys, content: bytes, suffix: str, *needles, output=None):
    source = tmp_path / f"in{suffix}"
    source.write_bytes(content)
    out = output or tmp_path / "out.npy"
    assert _encode(model_dir, source, out) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()


def test_empty_file(model_dir, tmp_path, capsys):
    _fails(model_dir, tmp_path, capsys, b"", ".txt", "empty")


def test_line_not_utf8(model_dir, tmp_path, capsys):
    _fails(model_dir, tmp_path, capsys, b"the cat\nbad \xff\xfe byte\n", ".txt", "in.txt:2", "UTF-8")


def test_empty_line(model_dir, tmp_path, capsys):
    _fails(model_dir, tmp_path, capsys, b"the cat\n\na dog\n", ".txt", "in.txt:2", "empty text")


def test_jsonl_bad_json_and_missing_field(model_dir, tmp_path, capsys):
    _fails(model_dir, tmp_path, capsys, b'{"text": "a"}\n{"text": \n', ".jsonl", "in.jsonl:2", "not valid JSON")
    _fails(model_dir, tmp_path, capsys, b'{"text": "a"}\n{"body": "b"}\n', ".jsonl", "in.jsonl:2", '"text"')


def test_output_in_missing_folder(model_dir, tmp_path, capsys):
    out = tmp_path / "missing" / "out.npy"
    _fails(model_dir, tmp_path, capsys, b"the cat\n", ".txt", "does not exist", output=out)
    assert not out.parent.exists()


def test_too_long_text_is_truncated_with_one_warning(model_dir, tmp_path, caplog):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(LINES))
    out = tmp_path / "out.npy"
    assert _encode(model_dir, source, out, "--max-length", "3") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["3 of 4 texts were longer than max_length=3 tokens and were truncated"]
    assert np.load(out).shape == (4, 32)


def test_unknown_model_path(tmp_path, capsys):
    source = tmp_path / "in.txt"
    source.write_text("the cat\n")
    assert _encode(tmp_path / "nope", source, tmp_path / "out.npy") == 2
    assert "does not exist" in capsys.readouterr().err


def _cli_process(*args, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "diffemb_jax.cli", *map(str, args)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_second_encode_loads_its_programs_from_the_compilation_cache(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("\n".join(LINES * 5) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(DIFFEMB_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", JAX_LOG_COMPILES="1",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # tiny programs compile in well under 1 s
    runs = [_cli_process("encode", "--model", model_dir, "--input", source, "--output", tmp_path / f"{i}.npy",
                         "--batch-size", "4", env=env) for i in range(2)]
    entries = list((tmp_path / "cache" / "xla").glob("*/jit_embed-*"))
    assert entries, "the first call wrote no compiled encoder"
    hits = [run.stderr.count("Persistent compilation cache hit for 'jit_embed'") for run in runs]
    assert hits[0] == 0 and hits[1] >= len(entries), (hits, entries)
    np.testing.assert_array_equal(np.load(tmp_path / "0.npy"), np.load(tmp_path / "1.npy"))


@pytest.mark.parametrize("setting, where", [({}, "cache/xla/HOST"), ({"JAX_COMPILATION_CACHE_DIR": "mine"}, "mine"),
                                            ({"JAX_ENABLE_COMPILATION_CACHE": "false"}, "None")])
def test_jax_settings_of_the_compilation_cache_win(tmp_path, setting, where):
    from diffemb_jax.cache import host_cpu

    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(DIFFEMB_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu", **setting)
    code = ("import jax; from diffemb_jax.cache import use_compilation_cache as u; print(u()); "
            "print(jax._src.xla_bridge.backends_are_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         cwd=tmp_path, check=True).stdout.split()
    assert out[-2] == (where if where in ("None", "mine") else str(tmp_path / where.replace("HOST", host_cpu())))
    assert out[-1] == "False"  # no backend started: a multi-host run initialises the distributed runtime later


@pytest.mark.parametrize("command, key", [("train", "--config.loss.scale=50.0"), ("plan", "--config.train.remat='full'"),
                                          ("adapt", "--config.objective.kind='diffusion'")])
def test_training_commands_print_their_usage_and_config_keys(command, key, capsys):
    with pytest.raises(SystemExit) as stop:
        cli([command, "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith(f"usage: diffemb {command} --config") and key in out
