"""ModelConfig: the shape of a decoder, read from a Hugging Face config.json, one type for all families.

Family differences live here as values (q/k/v bias, grouped-query heads, rope theta, tied head),
never as branches in the layers. A config field the decoder does not implement is an error, not a
silently different model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("Dream", "llada", "llama", "mistral", "qwen2")


class UnsupportedConfigError(ValueError):
    """A config.json the decoder cannot reproduce faithfully."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str  # one of SUPPORTED_MODEL_TYPES; conversion uses it to pick a key map
    vocab_size: int  # rows of the embedding table
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # causal mode only, as in transformers' Mistral
    max_position_embeddings: int = 32768
    mask_token_id: int | None = None  # diffusion LMs (Dream, LLaDA)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        data = json.loads(Path(path).read_text())
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise UnsupportedConfigError(f"{path}: unknown ModelConfig keys {unknown}")
        return cls(**data)


def _rope_theta(hf: dict[str, Any], default: float) -> float:
    """transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for source, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        kind = block.get("rope_type", block.get("type", "default"))
        if kind not in ("default", None):
            raise UnsupportedConfigError(
                f"{source} type {kind!r} is not implemented (only plain RoPE is); "
                "converting would give silently wrong numbers")
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


def _require(hf: dict[str, Any], key: str, expected: Any, why: str) -> None:
    value = hf.get(key, expected)
    if value != expected:
        raise UnsupportedConfigError(f"config field {key}={value!r} is not supported ({why}); expected {expected!r}")


def _from_llada(hf: dict[str, Any]) -> ModelConfig:
    _require(hf, "block_type", "llama", "LLaDA blocks are LLaMA-shaped here")
    _require(hf, "activation_type", "silu", "the MLP is SwiGLU")
    _require(hf, "layer_norm_type", "rms", "norms are RMSNorm")
    _require(hf, "include_bias", False, "only q/k/v may carry a bias")
    _require(hf, "clip_qkv", None, "q/k/v clipping is not implemented")
    heads = hf["n_heads"]
    return ModelConfig(
        model_type="llada",
        vocab_size=hf.get("embedding_size") or hf["vocab_size"],
        hidden_size=hf["d_model"],
        num_layers=hf["n_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("n_kv_heads") or heads,
        head_dim=hf["d_model"] // heads,
        intermediate_size=hf["mlp_hidden_size"],
        rope_theta=_rope_theta(hf, 10000.0),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
        qkv_bias=bool(hf.get("include_qkv_bias", False)),
        tie_word_embeddings=bool(hf.get("weight_tying", False)),
        max_position_embeddings=hf.get("max_sequence_length", 4096),
        mask_token_id=hf.get("mask_token_id"),
    )


def _from_qwen2_shaped(hf: dict[str, Any], model_type: str) -> ModelConfig:
    _require(hf, "hidden_act", "silu", "the MLP is SwiGLU")
    _require(hf, "mlp_bias", False, "MLP biases are not implemented")
    if model_type in ("Dream", "qwen2"):
        _require(hf, "use_sliding_window", False, "Qwen2's per-layer sliding window is not implemented")
        qkv_bias, sliding = True, None
    else:
        _require(hf, "attention_bias", False, "attention biases on the output projection are not implemented")
        qkv_bias = False
        sliding = hf.get("sliding_window") if model_type == "mistral" else None
    heads = hf["num_attention_heads"]
    return ModelConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        rope_theta=_rope_theta(hf, 10000.0),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=qkv_bias,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding,
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        mask_token_id=hf.get("mask_token_id"),
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from the dict of an HF config.json (Dream and LLaDA without their code)."""
    model_type = hf.get("model_type")
    canonical = {t.lower(): t for t in SUPPORTED_MODEL_TYPES}.get(str(model_type).lower())
    if canonical is None:
        raise UnsupportedConfigError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if canonical == "llada":
        return _from_llada(hf)
    return _from_qwen2_shaped(hf, canonical)


def config_from_hf_file(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UnsupportedConfigError(f"{path}: not valid JSON ({e})") from e
    try:
        return config_from_hf(hf)
    except KeyError as e:
        raise UnsupportedConfigError(f"{path}: missing field {e.args[0]!r}") from e
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(f"{path}: {e}") from e
