"""The way out: a decoder back to a Hugging Face directory that transformers (or Dream's and LLaDA's own
code) loads.

`config.json` in the family's own field names, `model.safetensors` (or shards with
`model.safetensors.index.json` past `max_shard_bytes`) written tensor by tensor under the names the
key maps give, and `tokenizer.json`. Everything is written into a temporary directory next to
`out_dir` and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from diffemb_jax.checkpoints.atomic import check_output_dir, write_atomically
from diffemb_jax.checkpoints.checkpoint import load_model
from diffemb_jax.checkpoints.keymaps import KeyMap, is_transposed
from diffemb_jax.checkpoints.peft_adapters import load_peft_adapter
from diffemb_jax.model import Decoder, ModelConfig
from diffemb_jax.model.lora import merge_lora

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "Dream": "DreamModel", "llada": "LLaDAModelLM"}
# Token ids a ModelConfig does not keep; carried over from the source config.json when there is one.
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


# ----------------------------------------------------------------------------------------- config.json

def _transformers_config(cfg: ModelConfig, tokens: dict) -> dict:
    """qwen2 / llama / mistral / Dream through transformers' own config classes, so the file says
    exactly what transformers reads back (rope_parameters in transformers 5)."""
    import transformers

    family = "qwen2" if cfg.model_type == "Dream" else cfg.model_type
    has_bias = family == "qwen2"
    if cfg.qkv_bias != has_bias:
        raise ValueError(f"a {cfg.model_type} model with qkv_bias={cfg.qkv_bias} has no Hugging Face form")
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
              rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
              tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
              hidden_act="silu", architectures=[ARCHITECTURES[cfg.model_type]], **tokens)
    if family == "qwen2":
        config = transformers.Qwen2Config(use_sliding_window=False, sliding_window=None, **kw)
    elif family == "llama":
        config = transformers.LlamaConfig(attention_bias=False, mlp_bias=False, **kw)
    else:
        config = transformers.MistralConfig(sliding_window=cfg.sliding_window, **kw)
    out = config.to_dict()
    if cfg.mask_token_id is not None:
        out["mask_token_id"] = cfg.mask_token_id
    if cfg.model_type == "Dream":  # Dream's own code predates rope_parameters: give it rope_theta too
        out |= {"model_type": "Dream", "rope_theta": float(cfg.rope_theta), "rope_scaling": None}
    return out


def _llada_config(cfg: ModelConfig, tokens: dict) -> dict:
    """LLaDA's own field names (its config class is remote code we never run)."""
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise ValueError(f"LLaDA derives head_dim from d_model / n_heads; this model has head_dim {cfg.head_dim}")
    return {"model_type": "llada", "architectures": [ARCHITECTURES["llada"]], "d_model": cfg.hidden_size,
            "n_layers": cfg.num_layers, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads,
            "mlp_hidden_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
            "embedding_size": cfg.vocab_size, "max_sequence_length": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": float(cfg.rope_theta), "rope": True, "alibi": False,
            "mask_token_id": cfg.mask_token_id, "weight_tying": cfg.tie_word_embeddings, "include_bias": False,
            "include_qkv_bias": cfg.qkv_bias, "block_type": "llama", "activation_type": "silu",
            "layer_norm_type": "rms", "rope_full_precision": True, "attention_layer_norm": False,
            "scale_logits": False, **tokens}


def hf_config(cfg: ModelConfig, *, dtype: str = "float32", extra: dict | None = None) -> dict:
    """The config.json of `cfg` in its family's field names; `extra` (e.g. token ids) is added last."""
    extra = dict(extra or {})
    tokens = {key: extra.pop(key, None) for key in SPECIAL_TOKENS}
    if cfg.model_type == "llada":
        out = _llada_config(cfg, tokens)
    else:
        out = _transformers_config(cfg, tokens)
    out |= {"dtype": dtype}
    if cfg.model_type in ("Dream", "llada"):
        out["torch_dtype"] = dtype  # what their (transformers 4 era) code reads
    return out | extra


# ------------------------------------------------------------------------------------------- tensors

def base_params(model: Decoder) -> list[tuple[tuple, nnx.Variable]]:
    """(path, variable) of every parameter; refuses a model still carrying LoRA adapters."""
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    lora = [".".join(map(str, p)) for p, v in flat if isinstance(v, nnx.LoRAParam)]
    if lora:
        raise ValueError(f"the model carries LoRA adapters ({lora[0]}, ...): merge them first "
                         "(diffemb_jax.model.lora.merge_lora) or write them with "
                         "diffemb_jax.checkpoints.peft_adapters.save_peft_adapter")
    return flat


def _host(value: jax.Array, name: str) -> np.ndarray:
    if not getattr(value, "is_fully_addressable", True):
        raise ValueError(f"{name} is spread over several processes: export from a single process")
    return np.asarray(jax.device_get(value))


class _Tensor:
    """One tensor to write: its HF name and layout, read from the device only when written."""

    def __init__(self, name: str, variable, transposed: bool, dtype: np.dtype):
        self.name, self.variable, self.transposed, self.dtype = name, variable, transposed, dtype
        shape = tuple(variable.shape)
        self.shape = shape[::-1] if transposed else shape
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize

    def array(self) -> np.ndarray:
        value = _host(self.variable[...], self.name)
        return np.ascontiguousarray((value.T if self.transposed else value).astype(self.dtype))


def _tensors(model: Decoder, dtype: np.dtype) -> list[_Tensor]:
    keymap = KeyMap(model.cfg.model_type, model.cfg.tie_word_embeddings)
    return [_Tensor(keymap.to_hf_name(path), var, is_transposed(path), dtype) for path, var in base_params(model)]


def _plan_shards(tensors: list[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    shards, size = [[]], 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_safetensors(path: Path, tensors: list[_Tensor], progress=None) -> None:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data), written one
    tensor at a time so the host holds one tensor, never the whole model."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors:
            t.array().tofile(f)
            if progress is not None:
                progress.update(1)


def _write_weights(directory: Path, tensors: list[_Tensor], max_shard_bytes: int, progress: bool) -> None:
    shards = _plan_shards(tensors, max_shard_bytes)
    with tqdm(total=len(tensors), desc="writing weights", unit="tensor", disable=not progress) as bar:
        if len(shards) == 1:
            write_safetensors(directory / "model.safetensors", tensors, bar)
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(directory / name, shard, bar)
            weight_map |= {t.name: name for t in shard}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------------------------------- directories

def export_hf(model: Decoder, tokenizer, out_dir: str | Path, *, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_config: dict | None = None,
              progress: bool = True) -> Path:
    """A plain (or merged) decoder -> a Hugging Face directory at `out_dir`, which must not exist yet.

    qwen2/llama/mistral load with transformers' AutoModelForCausalLM; Dream and LLaDA get their own
    config fields and tensor names (their modelling code is theirs). A tied head writes no head tensor.
    `extra_config` adds fields the ModelConfig does not hold (bos/eos/pad token ids)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(EXPORT_DTYPES)}, got {dtype!r}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    check_output_dir(out_dir)
    config = hf_config(model.cfg, dtype=dtype, extra=extra_config)
    tensors = _tensors(model, EXPORT_DTYPES[dtype])

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_weights(tmp, tensors, max_shard_bytes, progress)

    return write_atomically(Path(out_dir), fill)


def _source_tokens(src: Path) -> dict:
    """bos/eos/pad token ids from an HF source's config.json (a ModelConfig does not keep them)."""
    config = src / "config.json"
    if not (src.is_dir() and config.exists()):
        return {}
    try:
        hf = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {key: hf[key] for key in SPECIAL_TOKENS if hf.get(key) is not None}


def export(src: str | Path, out: str | Path, *, adapter: str | Path | None = None, dtype: str = "float32",
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Path:
    """Converted directory, HF directory or .gguf -> HF directory at `out`; with `adapter` (a PEFT LoRA
    directory) the adapter is applied and merged into the weights first."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {tuple(EXPORT_DTYPES)}, got {dtype!r}")
    check_output_dir(out)  # before any slow loading
    model, tokenizer = load_model(src, dtype=dtype, progress=progress)
    if adapter is not None:
        adapted, lora = load_peft_adapter(model, adapter)
        model = merge_lora(adapted, lora)
    return export_hf(model, tokenizer, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
                     extra_config=_source_tokens(Path(src)), progress=progress)
