"""Malformed checkpoint files are refused before any weight is read, with the file (and tensor or
key) named: safetensors headers, shard indexes, converted directories, a GGUF config read from its
header alone, and PyTorch missing where .bin and GGUF need it."""

from __future__ import annotations

import builtins
import json
import shutil
import struct

import numpy as np
import pytest

import tiny
from diffemb_jax import assets
from diffemb_jax.checkpoints import CheckpointError, convert, load_model, model_config
from diffemb_jax.checkpoints import checkpoint, sources


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny.write_checkpoint("llama", tmp_path_factory.mktemp("llama") / "hf")


def _with_header(directory, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header,data,match", [
    ([1, 2], b"", "header is not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "tensor w lacks dtype, shape or data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, b"\0" * 8, "tensor w has a malformed shape"),
    ({"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, b"\0" * 8, "tensor w has a malformed shape"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "span 8 bytes, but its shape"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "is truncated: tensor w"),
])
def test_a_malformed_safetensors_header_names_the_file_and_tensor(tmp_path, header, data, match):
    _with_header(tmp_path, header, data)
    with pytest.raises(CheckpointError, match=match) as error:
        sources.SafetensorsSource(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(error.value)


def test_a_wellformed_header_still_reads(tmp_path):
    values = np.arange(4, dtype="<f4")
    _with_header(tmp_path, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, values.tobytes())
    source = sources.SafetensorsSource(tmp_path)
    np.testing.assert_array_equal(source.read("w", (slice(None), slice(1, 2))), values.reshape(2, 2)[:, 1:])


@pytest.mark.parametrize("index,match", [
    ("{not json", "is not a shard index"),
    ('{"metadata": {}}', "is not a shard index"),
    ('{"weight_map": ["a"]}', "must map each tensor name to a shard file name"),
    ('{"weight_map": {"w": 3}}', "must map each tensor name to a shard file name"),
])
def test_a_malformed_shard_index_names_the_file(llama, tmp_path, index, match):
    directory = tmp_path / "sharded"
    shutil.copytree(llama, directory)
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=match) as error:
        load_model(directory, progress=False)
    assert "model.safetensors.index.json" in str(error.value)


@pytest.fixture(scope="module")
def converted(llama, tmp_path_factory):
    return convert(llama, tmp_path_factory.mktemp("converted") / "model", progress=False)


@pytest.mark.parametrize("damage,match", [
    (lambda d: (d / "tokenizer.json").unlink(), "without its tokenizer.json"),
    (lambda d: shutil.rmtree(d / "params"), "without its params"),
    (lambda d: (d / "diffemb.json").write_text("{oops"), "diffemb.json is not valid JSON"),
    (lambda d: _edit_marker(d, lambda m: m.update(extra=1)), r"unknown keys \['extra'\]"),
    (lambda d: _edit_marker(d, lambda m: m["config"].update(hidden=8)), r"unknown keys \['config.hidden'\]"),
    (lambda d: _edit_marker(d, lambda m: m["config"].pop("num_layers")), "num_layers"),
])
def test_a_damaged_converted_directory_is_refused_before_loading(converted, tmp_path, damage, match):
    directory = tmp_path / "model"
    shutil.copytree(converted, directory)
    damage(directory)
    with pytest.raises(CheckpointError, match=match):
        model_config(directory)
    with pytest.raises(CheckpointError, match=match):
        load_model(directory)


def _edit_marker(directory, edit) -> None:
    meta = json.loads((directory / "diffemb.json").read_text())
    edit(meta)
    (directory / "diffemb.json").write_text(json.dumps(meta))


def test_the_config_of_a_gguf_is_read_from_its_header_alone(monkeypatch):
    """The bundled SmolLM2 GGUF: its config without a single tensor dequantised."""
    monkeypatch.setattr(checkpoint, "GGUFSource", lambda *a: pytest.fail("the weights were read"))
    cfg = model_config(assets.smollm2_gguf())
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size) == ("llama", 30, 576)


def test_bin_and_gguf_without_torch_say_what_to_install(llama, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(CheckpointError, match=r"needs PyTorch: pip install 'diffemb-jax\[torch\]'"):
        sources.TorchBinSource(tmp_path)
    with pytest.raises(CheckpointError, match="needs PyTorch"):
        sources.GGUFSource(assets.smollm2_gguf())
