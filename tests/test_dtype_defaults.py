"""`--dtype auto`: float32 on a CPU and bfloat16 on a GPU or TPU for encoding; the checkpoint's own
dtype for convert and export; and a .gguf config read from its header alone.

Oracles: transformers' own bfloat16 / float16 weights (what convert and export must keep, bit for
bit), the gguf package's writer (what the header says), and, for "nothing dequantised", the gguf
package's dequantize made to raise."""

import json

import gguf
import gguf.quants
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.numpy import load_file

import tiny
from diffemb_jax.checkpoints import CheckpointError, convert, export_model, load_model, model_config
from diffemb_jax.checkpoints.checkpoint import checkpoint_dtype_bytes
from diffemb_jax.checkpoints.dtypes import compute_dtype, stored_dtype
from diffemb_jax.cli import main as cli
from diffemb_jax.embedding import Embedder
from diffemb_jax.errors import ConfigError


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Qwen2 saved by transformers in bfloat16, float16 and float32: (torch model, directory)."""
    root = tmp_path_factory.mktemp("dtypes")
    out = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)):
        oracle = tiny.oracle_model("qwen2").to(dtype)
        out[name] = oracle, tiny.write_checkpoint("qwen2", root / name, model=oracle)
    return out


def _on(monkeypatch, backend: str) -> None:
    monkeypatch.setattr(jax, "default_backend", lambda: backend)


def test_compute_dtype_follows_the_backend(monkeypatch):
    assert jax.default_backend() == "cpu" and compute_dtype("auto") == "float32"
    for backend in ("gpu", "tpu"):
        _on(monkeypatch, backend)
        assert compute_dtype("auto") == "bfloat16"
        assert compute_dtype("float32") == "float32"  # a name given is kept
    with pytest.raises(ConfigError, match="dtype='float16' is not offered; choose one of auto, float32, bfloat16"):
        compute_dtype("float16")


def test_encode_auto_is_float32_on_cpu_bfloat16_on_gpu(checkpoints, monkeypatch):
    """encode's Embedder, from a bfloat16 checkpoint: float32 on the CPU (the checkpoint's dtype does
    not decide the compute dtype), bfloat16 once the backend says gpu; the CLI's default is auto."""
    _, hf = checkpoints["bfloat16"]
    kernel = lambda e: e.model.layers[0].mlp.up_proj.kernel[...].dtype  # noqa: E731
    assert kernel(Embedder.from_pretrained(hf)) == jnp.float32
    _on(monkeypatch, "gpu")
    assert kernel(Embedder.from_pretrained(hf)) == jnp.bfloat16
    from diffemb_jax.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["encode", "--model", "m", "--input", "i", "--output", "o.npy"])
    assert args.dtype == "auto"
    assert parser.parse_args(["evaluate", "retrieval", "--model", "m", "--data", "d"]).dtype == "auto"


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_convert_and_export_keep_the_checkpoints_dtype(checkpoints, tmp_path, monkeypatch, capsys, backend):
    """bfloat16 stays bfloat16, float32 float32, float16 becomes float32 (exactly: bfloat16 would
    round it), whatever the backend; convert -> export gives transformers' own weights back, bit for bit."""
    _on(monkeypatch, backend)
    for name, want in (("bfloat16", "bfloat16"), ("float16", "float32"), ("float32", "float32")):
        oracle, hf = checkpoints[name]
        assert stored_dtype("auto", lambda: checkpoint_dtype_bytes(hf)) == want
        converted = tmp_path / f"{name}-converted"
        assert cli(["convert", str(hf), str(converted)]) == 0
        assert f"({want})" in capsys.readouterr().out
        assert json.loads((converted / "diffemb.json").read_text())["param_dtype"] == want
        exported = export_model(converted, tmp_path / f"{name}-export", progress=False)
        weights = load_file(str(exported / "model.safetensors"))
        assert {str(v.dtype) for v in weights.values()} == {want}
        reloaded = tf.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).state_dict()
        for key, value in oracle.state_dict().items():
            torch.testing.assert_close(reloaded[key], value.float(), rtol=0, atol=0, msg=key)
    # a name given wins over the checkpoint's
    out = convert(checkpoints["bfloat16"][1], tmp_path / "as-float32", dtype="float32", progress=False)
    assert json.loads((out / "diffemb.json").read_text())["param_dtype"] == "float32"


def test_export_adapter_in_bfloat16_checkpoint_stays_bfloat16(checkpoints, tmp_path):
    """A bfloat16 checkpoint with a peft adapter merged: written in bfloat16; oracle peft's
    merge_and_unload in float32 on the same bfloat16 weights, rounded to bfloat16 (one step of it)."""
    import peft

    _, hf = checkpoints["bfloat16"]
    base = tiny.oracle_model("qwen2").to(torch.bfloat16).float()  # the checkpoint's weights, in float32
    peft_model = peft.get_peft_model(base, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                           "down_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for key, p in peft_model.named_parameters():
            if "lora_B" in key:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = export_model(hf, tmp_path / "merged", adapter=tmp_path / "adapter", progress=False)
    got = load_file(str(out / "model.safetensors"))
    want = peft_model.merge_and_unload().state_dict()
    assert {str(v.dtype) for v in got.values()} == {"bfloat16"}
    for key, value in want.items():
        np.testing.assert_allclose(got[key].astype(np.float32), value.numpy(), rtol=2 ** -8, atol=1e-6, err_msg=key)


# ------------------------------------------------------------------------------------------------ GGUF

def _tiny_gguf(path, tensor_type=gguf.GGMLQuantizationType.F32):
    """A LLaMA-architecture GGUF header (2 layers, d 32, 4 / 2 heads) with a few of its tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(256)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(97)
    rng = np.random.default_rng(0)
    for name, shape in (("token_embd.weight", (97, 32)), ("blk.0.attn_q.weight", (32, 32)),
                        ("output_norm.weight", (32,))):
        values = rng.standard_normal(shape).astype(np.float32)
        if tensor_type == gguf.GGMLQuantizationType.BF16 and len(shape) > 1:
            writer.add_tensor(name, values.astype(ml_dtypes.bfloat16).view(np.uint16), raw_dtype=tensor_type)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def no_dequantising(monkeypatch):
    """Any dequantising of GGUF tensors, or a GGUF load of them, raises."""
    def refuse(*args, **kwargs):
        raise AssertionError("a GGUF tensor was dequantised for a config read")

    monkeypatch.setattr(gguf, "dequantize", refuse)
    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    monkeypatch.setattr("diffemb_jax.checkpoints.sources.GGUFSource.__init__", refuse)


def test_gguf_config_reads_the_header_alone(tmp_path, no_dequantising, capsys):
    """model_config and `bench long --compile-only --model X.gguf` (which `plan` shares) on a GGUF
    whose tensors the loader would need: the config is the header's, nothing is dequantised."""
    path = _tiny_gguf(tmp_path / "tiny.gguf")
    cfg = model_config(path)
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == ("llama", 2, 32, 64)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size, cfg.max_position_embeddings) == (4, 2, 97, 256)
    assert cfg.tie_word_embeddings  # no output.weight among the tensors
    with pytest.raises(AssertionError, match="dequantised"):  # the guard does guard the load
        load_model(path, progress=False)
    assert cli(["bench", "long", "--compile-only", "--model", str(path), "--lengths", "16,32"]) == 0
    assert "JAX 32" in capsys.readouterr().out


@pytest.mark.parametrize("tensor_type, want", [(gguf.GGMLQuantizationType.F32, "float32"),
                                               (gguf.GGMLQuantizationType.BF16, "bfloat16")])
def test_gguf_dtype_from_its_tensor_table(tmp_path, no_dequantising, tensor_type, want):
    path = _tiny_gguf(tmp_path / "tiny.gguf", tensor_type)
    assert stored_dtype("auto", lambda: checkpoint_dtype_bytes(path)) == want


def test_bundled_quantised_gguf_converts_to_float32(no_dequantising):
    """The bundled SmolLM2 is Q4_1 / Q6_K blocks: stored as float32 (what they dequantise to)."""
    from diffemb_jax import assets

    stored = checkpoint_dtype_bytes(assets.smollm2_gguf())
    assert "Q4_1" in stored and stored_dtype("auto", lambda: stored) == "float32"


def test_checkpoint_dtype_errors(tmp_path):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF and nothing more")
    with pytest.raises(CheckpointError, match="broken.gguf: not a GGUF file"):
        checkpoint_dtype_bytes(tmp_path / "broken.gguf")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ConfigError, match="dtype=.fp8. is not offered"):
        export_model(tmp_path / "missing", tmp_path / "out", dtype="fp8")
