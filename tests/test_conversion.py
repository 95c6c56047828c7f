"""Checkpoint formats in (sharded safetensors, .bin, converted directories) and every way a
checkpoint can be wrong: each error names the problem and leaves no output behind."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import padded_batch
from safetensors.torch import load_file, save_file

import tiny
from diffemb_jax.checkpoints import CheckpointError, convert, load_model
from diffemb_jax.cli import main as cli
from diffemb_jax.model import UnsupportedConfigError


def _hidden(directory, **kw):
    model, _ = load_model(directory, progress=False, **kw)
    ids, mask = padded_batch([7, 3], 7, "right")
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))[mask.astype(bool)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    oracle = tiny.oracle_model("llama")
    return oracle, tiny.write_checkpoint("llama", tmp_path_factory.mktemp("llama") / "hf", model=oracle)


def test_sharded_safetensors_load(llama, tmp_path):
    oracle, single = llama
    sharded = tmp_path / "sharded"
    oracle.save_pretrained(sharded, max_shard_size="20KB")
    tiny.write_tokenizer(sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    np.testing.assert_array_equal(_hidden(sharded), _hidden(single))


def test_pytorch_bin_loads(llama, tmp_path):
    oracle, single = llama
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(oracle.state_dict(), binary / "pytorch_model.bin")
    (binary / "config.json").write_text((single / "config.json").read_text())
    tiny.write_tokenizer(binary)
    np.testing.assert_array_equal(_hidden(binary), _hidden(single))


def test_bf16_safetensors_load(tmp_path):
    oracle = tiny.oracle_model("qwen2").to(torch.bfloat16)
    directory = tiny.write_checkpoint("qwen2", tmp_path / "hf", model=oracle)
    model, _ = load_model(directory, progress=False)
    want = oracle.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]), want)


SAFETENSORS_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                      torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def test_safetensors_reads_equal_the_safetensors_package(tmp_path):
    """Oracle: safetensors' own reader (into torch) of a file that safetensors wrote: every dtype,
    whole tensors and the slices the loader asks for; the file's metadata skipped."""
    from safetensors import safe_open

    from diffemb_jax.checkpoints.sources import SafetensorsSource

    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{dtype}".replace("torch.", ""): (torch.randn(5, 7, generator=g) * 4).to(dtype)
               for dtype in SAFETENSORS_DTYPES}
    tensors["scalar"], tensors["three_d"] = torch.tensor(2.5), torch.randn(2, 3, 4, generator=g).bfloat16()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours, theirs = SafetensorsSource(tmp_path), safe_open(str(tmp_path / "model.safetensors"), "pt")
    assert sorted(ours.names()) == sorted(theirs.keys())

    for name in theirs.keys():
        want = theirs.get_tensor(name)
        assert ours.shape(name) == tuple(want.shape)
        whole = tuple(slice(None) for _ in want.shape)
        parts = [(whole, want)] + ([((slice(1, 4), slice(2, 7)), want[1:4, 2:7])] if want.ndim == 2 else [])
        for index, expected in parts:
            got = ours.read(name, index)
            assert got.shape == tuple(expected.shape)
            np.testing.assert_array_equal(got.astype(np.float64), expected.double().numpy())  # the values
            np.testing.assert_array_equal(got.reshape(-1).view(np.uint8),  # and the very bits
                                          expected.contiguous().reshape(-1).view(torch.uint8).numpy())


def test_broken_safetensors_are_explained(tmp_path):
    from diffemb_jax.checkpoints.sources import SafetensorsSource

    save_file({"w": torch.ones(64, 64)}, tmp_path / "model.safetensors")
    whole = (tmp_path / "model.safetensors").read_bytes()
    for content, message in [(whole[:-100], "is truncated: tensor w ends past the end of the file"),
                             (b"", "is empty"), (b"not a safetensors file at all", "is not a safetensors file")]:
        (tmp_path / "model.safetensors").write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            SafetensorsSource(tmp_path)


def test_converted_directory_round_trip(llama, tmp_path):
    _, hf = llama
    out = convert(hf, tmp_path / "converted", progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["diffemb.json", "params", "tokenizer.json"]
    np.testing.assert_array_equal(_hidden(out), _hidden(hf))
    bf16, _ = load_model(out, dtype="bfloat16")
    assert bf16.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16


def _broken_copy(src, dst, edit_state=None, edit_config=None):
    dst.mkdir()
    state = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    if edit_state:
        edit_state(state)
    if edit_config:
        edit_config(config)
    save_file(state, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(json.dumps(config))
    tiny.write_tokenizer(dst)
    return dst


def _convert_fails(src, tmp_path, capsys, *needles):
    out = tmp_path / "out"
    assert cli(["convert", str(src), str(out)]) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []  # no temporary left


def test_unknown_model_type(llama, tmp_path, capsys):
    src = _broken_copy(llama[1], tmp_path / "gpt2", edit_config=lambda c: c.update(model_type="gpt2"))
    with pytest.raises(UnsupportedConfigError, match="supported: Dream, llada, llama, mistral, qwen2"):
        load_model(src)
    _convert_fails(src, tmp_path, capsys, "'gpt2'", "supported")


def test_missing_tensor(llama, tmp_path, capsys):
    src = _broken_copy(llama[1], tmp_path / "missing",
                       edit_state=lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing \(1\): model.layers.1.mlp.up_proj.weight"):
        load_model(src)
    _convert_fails(src, tmp_path, capsys, "model.layers.1.mlp.up_proj.weight")


def test_unexpected_tensor(llama, tmp_path):
    src = _broken_copy(llama[1], tmp_path / "extra",
                       edit_state=lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): model.layers.0.mlp.extra.weight"):
        load_model(src)


def test_wrong_shape(llama, tmp_path, capsys):
    def shrink(state):
        state["model.layers.0.mlp.gate_proj.weight"] = state["model.layers.0.mlp.gate_proj.weight"][:40].clone()

    src = _broken_copy(llama[1], tmp_path / "shape", edit_state=shrink)
    with pytest.raises(CheckpointError, match=r"wrong shape.*gate_proj.weight: checkpoint \(40, 32\), config expects \(64, 32\)"):
        load_model(src)
    _convert_fails(src, tmp_path, capsys, "gate_proj.weight")


@pytest.mark.parametrize("edit, needle", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "'llama3' is not implemented"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "'yarn' is not implemented"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias=True"),
])
def test_unimplemented_config_fields_are_errors(llama, tmp_path, edit, needle):
    src = _broken_copy(llama[1], tmp_path / "cfg", edit_config=lambda c: c.update(edit))
    with pytest.raises(UnsupportedConfigError, match=needle.replace("(", r"\(")):
        load_model(src)


def test_convert_refuses_existing_or_missing_parent(llama, tmp_path, capsys):
    existing = tmp_path / "exists"
    existing.mkdir()
    assert cli(["convert", str(llama[1]), str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(["convert", str(llama[1]), str(tmp_path / "no" / "such" / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_not_a_model_directory(tmp_path, capsys):
    assert cli(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
