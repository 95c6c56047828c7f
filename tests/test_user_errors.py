"""Errors before work: each fault a user can make is refused by `diffemb` with exit 2 and a message
naming the file, key or flag, before any weight loads or any text is encoded; a bug inside the
project keeps its traceback, and `--debug` shows it for user errors too.

Oracles: the faults are real ones (safetensors' own reader refuses the truncated file; `import torch`
fails where torch is hidden); loading or encoding that starts is caught by a patched loader that fails
the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import tiny
from diffemb_jax.checkpoints import convert
from diffemb_jax.cli import main as cli
from diffemb_jax.errors import ConfigError, UserError


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny.write_checkpoint("llama", tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def converted(llama, tmp_path_factory):
    return convert(llama, tmp_path_factory.mktemp("converted") / "model", progress=False)


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("the cat plays music\na dog runs\n")
    return path


@pytest.fixture
def no_loading(monkeypatch):
    """Any weight loading fails the test: the error had to come first."""
    from diffemb_jax.embedding import embedder
    from diffemb_jax.training import adapt, trainer

    def loaded(*args, **kwargs):
        pytest.fail("weights were loaded before the error")

    for module in (embedder, trainer, adapt):
        monkeypatch.setattr(module, "load_model", loaded)


def _refused(argv, capsys, *needles) -> str:
    """Runs the CLI, which must exit 2 with `diffemb CMD: error:` and every needle on stderr."""
    assert cli([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffemb {argv[0]}: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def _encode(model, texts, out, *extra):
    return ["encode", "--model", model, "--input", texts, "--output", out, *extra]


# ------------------------------------------------------------------------- enum and dtype fields

@pytest.mark.parametrize("key,value", [
    ("model.pooling", "max"), ("model.attention", "sideways"), ("model.kernel", "flash"),
    ("model.dtype", "float16"), ("train.remat", "some"), ("distributed", "maybe"),
])
def test_a_bad_enum_field_of_the_train_config_is_refused_before_loading(llama, tmp_path, capsys, no_loading,
                                                                         key, value):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"query": "a", "positive": "b", "negative": "c"}) + "\n")
    _refused(["train", "--config", "configs/tiny.py", "--workdir", tmp_path / "run", f"--config.model.path={llama}",
              f"--config.data.files={data}", f"--config.{key}={value}"], capsys, f"config.{key}='{value}'",
             "choose one of")


def test_a_bad_enum_field_of_the_adapt_config_is_refused_before_loading(llama, tmp_path, capsys, no_loading):
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "the cat plays music"}) + "\n")
    _refused(["adapt", "--config", "configs/adapt.py:diffusion", "--workdir", tmp_path / "run",
              f"--config.model.path={llama}", f"--config.data.files={data}", "--config.train.remat=some"], capsys,
             "config.train.remat='some'", "none, full, dots, dots_all")


@pytest.mark.parametrize("option,value", [("pooling", "max"), ("attention", "sideways"), ("kernel", "flash"),
                                          ("dtype", "float16")])
def test_a_bad_option_of_the_embedder_is_refused_before_loading(converted, no_loading, option, value):
    from diffemb_jax.embedding import Embedder

    with pytest.raises(ConfigError, match=value):
        Embedder.from_pretrained(converted, **{option: value})


# ------------------------------------------------------------------------- checkpoints and files

@pytest.mark.parametrize("damage,needle", [
    (lambda d: (d / "tokenizer.json").unlink(), "without its tokenizer.json: convert the model again"),
    (lambda d: shutil.rmtree(d / "params"), "without its params: convert the model again"),
    (lambda d: (d / "diffemb.json").write_text(json.dumps(
        {**json.loads((d / "diffemb.json").read_text()), "format": 1})), "diffemb.json: unknown keys ['format']"),
], ids=["missing tokenizer.json", "missing params", "wrong diffemb.json key"])
def test_a_damaged_converted_folder_is_refused_before_loading(converted, tmp_path, texts, capsys, damage, needle):
    model = tmp_path / "model"
    shutil.copytree(converted, model)
    damage(model)
    _refused(_encode(model, texts, tmp_path / "out.npy"), capsys, str(model), needle)
    assert not (tmp_path / "out.npy").exists()


def test_a_truncated_safetensors_file_is_named(llama, tmp_path, texts, capsys):
    from safetensors import safe_open

    model = tmp_path / "model"
    shutil.copytree(llama, model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # the header's length says more than there is
    with pytest.raises(Exception):  # the oracle: safetensors' own reader refuses it too
        safe_open(str(weights), framework="numpy")
    _refused(_encode(model, texts, tmp_path / "out.npy"), capsys, str(weights))


@pytest.mark.parametrize("index", ["{not json", json.dumps({"weight_map": ["a"]})])
def test_a_malformed_shard_index_is_named(llama, tmp_path, texts, capsys, index):
    model = tmp_path / "model"
    shutil.copytree(llama, model)
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    (model / "model.safetensors.index.json").write_text(index)
    _refused(_encode(model, texts, tmp_path / "out.npy"), capsys, str(model / "model.safetensors.index.json"))


def test_an_unwritable_output_folder_is_refused_before_loading(converted, texts, capsys, no_loading):
    # sysfs takes no new files, root or not, so the check must really try the folder
    _refused(_encode(converted, texts, "/sys/out.npy"), capsys, "cannot write in the folder /sys")


@pytest.mark.parametrize("mesh", ["1,x,1", "1,1", "0,1,1"])
def test_a_malformed_mesh_is_refused_before_anything_runs(converted, texts, tmp_path, capsys, no_loading, mesh):
    with pytest.raises(SystemExit) as exit_:
        cli(_encode(str(converted), str(texts), str(tmp_path / "out.npy"), "--mesh", mesh))
    assert exit_.value.code == 2
    assert f"--mesh '{mesh}': give three sizes DATA,FSDP,TENSOR" in capsys.readouterr().err


@pytest.mark.parametrize("checkpoint", ["bin", "gguf"])
def test_bin_and_gguf_without_torch_say_what_to_install(llama, tmp_path, texts, capsys, monkeypatch, checkpoint):
    from safetensors.torch import load_file
    import torch

    from diffemb_jax import assets

    if checkpoint == "bin":
        model = tmp_path / "model"
        shutil.copytree(llama, model)
        torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
        (model / "model.safetensors").unlink()
    else:
        model = assets.smollm2_gguf()
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails, as where it is not installed
    with pytest.raises(ImportError):
        import torch  # noqa: F401, F811
    _refused(_encode(model, texts, tmp_path / "out.npy"), capsys, "needs PyTorch: pip install 'diffemb-jax[torch]'")


def test_a_llada_config_with_alibi_is_refused(tmp_path, capsys):
    model = tiny.write_checkpoint("llada", tmp_path / "llada")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"alibi": True}))
    _refused(["convert", model, tmp_path / "out"], capsys, str(model / "config.json"), "alibi=True is not supported",
             "ALiBi is not implemented")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- bugs and --debug

@pytest.mark.parametrize("bug", [KeyError("weight_map"), ValueError("an internal shape check")])
def test_an_internal_error_keeps_its_traceback(converted, texts, tmp_path, monkeypatch, bug):
    from diffemb_jax.embedding import files

    def broken(path):
        raise bug

    monkeypatch.setattr(files, "read_texts", broken)
    with pytest.raises(type(bug)) as raised:  # not turned into an exit code and one line
        cli(_encode(str(converted), str(texts), str(tmp_path / "out.npy")))
    assert raised.value is bug and not isinstance(raised.value, UserError)


def test_debug_shows_the_traceback_of_a_user_error(texts, tmp_path, capsys):
    argv = _encode(str(tmp_path / "nowhere"), str(texts), str(tmp_path / "out.npy"))
    _refused(argv, capsys, "does not exist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-m", "diffemb_jax.cli", "--debug", *argv], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback (most recent call last)" in result.stderr
    assert f"CheckpointError: {tmp_path / 'nowhere'} does not exist" in result.stderr
