"""One record per model type: what a checkpoint of that family looks like on disk, both ways.

A `Family` holds everything that differs between Dream, LLaDA, Qwen2, Qwen3, LLaMA and Mistral outside
the decoder's shape: the tensor names (key-map rows, as the LM class writes them; the bare decoder's
are the same without `bare_prefix`), how its config.json reads into a ModelConfig and writes back,
the architectures its reader builds (the LM class, and the bare decoder class when its AutoModel is
one: the headless layout PEFT adapters may be named for, and what a headless export is written as).
The decoder itself sees only ModelConfig values.
A config field the decoder does not implement is an error, not a silently different model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

from diffemb_jax.errors import UserError
from diffemb_jax.model import ModelConfig, UnsupportedConfigError

# ------------------------------------------------------------------------------------------ tensor names
# (HF tensor name, decoder parameter path); `{i}` is the layer index.

_QWEN2_SHAPED_NAMES = (
    ("model.embed_tokens.weight", "embed.embedding"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.scale"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj.kernel"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.q_proj.bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k_proj.kernel"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.k_proj.bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v_proj.kernel"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.v_proj.bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.kernel"),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers.{i}.attn.q_norm.scale"),  # qk_norm (Qwen3)
    ("model.layers.{i}.self_attn.k_norm.weight", "layers.{i}.attn.k_norm.scale"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.scale"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.kernel"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj.kernel"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.kernel"),
    ("model.norm.weight", "final_norm.scale"),
    ("lm_head.weight", "lm_head.kernel"),
)

_LLADA_NAMES = (
    ("model.transformer.wte.weight", "embed.embedding"),
    ("model.transformer.blocks.{i}.attn_norm.weight", "layers.{i}.input_norm.scale"),
    ("model.transformer.blocks.{i}.q_proj.weight", "layers.{i}.attn.q_proj.kernel"),
    ("model.transformer.blocks.{i}.q_proj.bias", "layers.{i}.attn.q_proj.bias"),
    ("model.transformer.blocks.{i}.k_proj.weight", "layers.{i}.attn.k_proj.kernel"),
    ("model.transformer.blocks.{i}.k_proj.bias", "layers.{i}.attn.k_proj.bias"),
    ("model.transformer.blocks.{i}.v_proj.weight", "layers.{i}.attn.v_proj.kernel"),
    ("model.transformer.blocks.{i}.v_proj.bias", "layers.{i}.attn.v_proj.bias"),
    ("model.transformer.blocks.{i}.attn_out.weight", "layers.{i}.attn.o_proj.kernel"),
    ("model.transformer.blocks.{i}.ff_norm.weight", "layers.{i}.post_attention_norm.scale"),
    ("model.transformer.blocks.{i}.ff_proj.weight", "layers.{i}.mlp.gate_proj.kernel"),
    ("model.transformer.blocks.{i}.up_proj.weight", "layers.{i}.mlp.up_proj.kernel"),
    ("model.transformer.blocks.{i}.ff_out.weight", "layers.{i}.mlp.down_proj.kernel"),
    ("model.transformer.ln_f.weight", "final_norm.scale"),
    ("model.transformer.ff_out.weight", "lm_head.kernel"),
)


@dataclasses.dataclass(frozen=True)
class Family:
    model_type: str  # as config.json spells it
    names: tuple[tuple[str, str], ...]  # (HF tensor name, decoder parameter path) rows, read both ways
    architecture: str  # config.json's "architectures": the class its reader builds
    read: Callable[[dict, "Family"], ModelConfig]  # config.json -> ModelConfig
    write: Callable[[ModelConfig, dict, "Family"], dict]  # ModelConfig, special token ids -> config.json
    qkv_bias: bool = False  # q/k/v projections carry a bias
    qk_norm: bool = False  # per-head RMSNorm of q and k (Qwen3)
    sliding_window: bool = False  # config.json's sliding_window is honoured (causal mode)
    # config.json fields with the one value the decoder computes: (key, value, why); refused otherwise
    # on the way in, written on the way out.
    fixed: tuple[tuple[str, Any, str], ...] = ()
    default_head_dim: int | None = None  # its config class's head_dim when config.json has none
    transformers_config: str | None = None  # the transformers config class that writes its config.json
    # The bare decoder class (its AutoModel), when it has one: PEFT adapters may be named without
    # "model.", and a model without its untied head is exported as this class.
    bare_architecture: str | None = None
    bare_prefix: str = "model."  # what the LM class puts before the bare decoder's tensor names
    # Read by the checkpoint's own (transformers 4 era) code, never run here: config.json's auto_map
    # names its classes, and an export says which files of `code_repo` to place beside the weights.
    auto_map: dict | None = None
    code_repo: str | None = None
    code_files: tuple[str, ...] = ()

    @property
    def remote_code(self) -> bool:
        return self.auto_map is not None

    @property
    def headless(self) -> bool:
        """Its AutoModel is the bare decoder."""
        return self.bare_architecture is not None


# ------------------------------------------------------------------------------------------ config.json in

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


# LLaDA's (OLMo-derived) config fields that change the computation, with the one value this decoder
# computes; any other value is refused rather than silently ignored.
_LLADA_FIXED = {
    "block_type": ("llama", "LLaDA blocks are LLaMA-shaped here"),
    "activation_type": ("silu", "the MLP is SwiGLU"),
    "layer_norm_type": ("rms", "norms are RMSNorm"),
    "include_bias": (False, "only q/k/v may carry a bias"),
    "clip_qkv": (None, "q/k/v clipping is not implemented"),
    "alibi": (False, "ALiBi is not implemented; positions are RoPE"),
    "rope": (True, "positions are RoPE"),
    "attention_layer_norm": (False, "q/k layer norms are not implemented"),
    "input_emb_norm": (False, "a norm of the input embeddings is not implemented"),
    "scale_logits": (False, "the LM head's logits are not scaled"),
    "layer_norm_with_affine": (True, "norms have a learned scale"),
    "bias_for_layer_norm": (None, "norms have no bias"),
    "multi_query_attention": (None, "key/value heads are given by n_kv_heads"),
}


def _read_llada(hf: dict[str, Any], family: Family) -> ModelConfig:
    for key, (expected, why) in _LLADA_FIXED.items():
        if key == "bias_for_layer_norm" and hf.get(key) is False:
            continue  # the same as None
        _require(hf, key, expected, why)
    heads = hf["n_heads"]
    return ModelConfig(
        model_type=family.model_type,
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


def _read_qwen2_shaped(hf: dict[str, Any], family: Family) -> ModelConfig:
    _require(hf, "hidden_act", "silu", "the MLP is SwiGLU")
    _require(hf, "mlp_bias", False, "MLP biases are not implemented")
    for key, expected, why in family.fixed:
        _require(hf, key, expected, why)
    kinds = sorted(set(hf.get("layer_types") or ()) - {"full_attention"})
    if kinds:
        raise UnsupportedConfigError(f"config field layer_types holds {kinds}: per-layer attention kinds are not "
                                     "implemented (every layer attends fully)")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        model_type=family.model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or family.default_head_dim or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        rope_theta=_rope_theta(hf, 10000.0),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=family.qkv_bias,
        qk_norm=family.qk_norm,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=hf.get("sliding_window") if family.sliding_window else None,
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        mask_token_id=hf.get("mask_token_id"),
    )


# ------------------------------------------------------------------------------------------ config.json out

def _write_transformers(cfg: ModelConfig, tokens: dict, family: Family) -> dict:
    """Through transformers' own config class, so the file says exactly what transformers reads back
    (rope_parameters in transformers 5)."""
    import transformers  # heavy, and only the way out needs it

    for field in ("qkv_bias", "qk_norm"):
        if getattr(cfg, field) != getattr(family, field):
            raise UserError(f"a {cfg.model_type} model with {field}={getattr(cfg, field)} has no Hugging Face form")
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
              num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
              num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
              rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
              tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=cfg.max_position_embeddings,
              hidden_act="silu", architectures=[family.architecture], **tokens)
    kw |= {key: value for key, value, _ in family.fixed}
    if family.sliding_window or "use_sliding_window" in kw:  # the config class has the field
        kw["sliding_window"] = cfg.sliding_window
    out = getattr(transformers, family.transformers_config)(**kw).to_dict()
    # transformers 4 (which llm2vec and Dream's own code need) reads rope_theta, not rope_parameters:
    # without it they would take the default theta, a silently different model.
    out |= {"rope_theta": float(cfg.rope_theta), "rope_scaling": None}
    if cfg.mask_token_id is not None:
        out["mask_token_id"] = cfg.mask_token_id
    if family.remote_code:
        out["model_type"] = family.model_type
    return out


def _write_llada(cfg: ModelConfig, tokens: dict, family: Family) -> dict:
    """LLaDA's own field names (its config class is remote code we never run)."""
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size:
        raise UserError(f"LLaDA derives head_dim from d_model / n_heads; this model has head_dim {cfg.head_dim}")
    return {"model_type": family.model_type, "architectures": [family.architecture], "d_model": cfg.hidden_size,
            "n_layers": cfg.num_layers, "n_heads": cfg.num_heads, "n_kv_heads": cfg.num_kv_heads,
            "mlp_hidden_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
            "embedding_size": cfg.vocab_size, "max_sequence_length": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": float(cfg.rope_theta), "rope": True, "alibi": False,
            "mask_token_id": cfg.mask_token_id, "weight_tying": cfg.tie_word_embeddings, "include_bias": False,
            "include_qkv_bias": cfg.qkv_bias, "block_type": "llama", "activation_type": "silu",
            "layer_norm_type": "rms", "rope_full_precision": True, "attention_layer_norm": False,
            "scale_logits": False, **tokens}


# ------------------------------------------------------------------------------------------ the families

_NO_QWEN2_WINDOW = ("use_sliding_window", False, "Qwen's per-layer sliding window is not implemented")
_NO_ATTENTION_BIAS = ("attention_bias", False, "attention biases on the output projection are not implemented")

FAMILIES = {family.model_type: family for family in (
    Family("qwen2", _QWEN2_SHAPED_NAMES, "Qwen2ForCausalLM", _read_qwen2_shaped, _write_transformers,
           qkv_bias=True, fixed=(_NO_QWEN2_WINDOW,), transformers_config="Qwen2Config",
           bare_architecture="Qwen2Model"),
    Family("qwen3", _QWEN2_SHAPED_NAMES, "Qwen3ForCausalLM", _read_qwen2_shaped, _write_transformers,
           qk_norm=True, fixed=(_NO_QWEN2_WINDOW, _NO_ATTENTION_BIAS), default_head_dim=128,
           transformers_config="Qwen3Config", bare_architecture="Qwen3Model"),
    Family("Dream", _QWEN2_SHAPED_NAMES, "DreamModel", _read_qwen2_shaped, _write_transformers,
           qkv_bias=True, fixed=(_NO_QWEN2_WINDOW,), transformers_config="Qwen2Config",
           auto_map={"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
           code_repo="Dream-org/Dream-v0-Base-7B",
           code_files=("configuration_dream.py", "modeling_dream.py", "generation_utils.py")),
    Family("llama", _QWEN2_SHAPED_NAMES, "LlamaForCausalLM", _read_qwen2_shaped, _write_transformers,
           fixed=(_NO_ATTENTION_BIAS, ("mlp_bias", False, "MLP biases are not implemented")),
           transformers_config="LlamaConfig", bare_architecture="LlamaModel"),
    Family("mistral", _QWEN2_SHAPED_NAMES, "MistralForCausalLM", _read_qwen2_shaped, _write_transformers,
           sliding_window=True, fixed=(_NO_ATTENTION_BIAS,), transformers_config="MistralConfig",
           bare_architecture="MistralModel"),
    Family("llada", _LLADA_NAMES, "LLaDAModelLM", _read_llada, _write_llada,
           auto_map={"AutoConfig": "configuration_llada.LLaDAConfig",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM", "AutoModel": "modeling_llada.LLaDAModelLM"},
           code_repo="GSAI-ML/LLaDA-8B-Base", code_files=("configuration_llada.py", "modeling_llada.py")),
)}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))
HEADLESS_FAMILIES = tuple(t for t, family in FAMILIES.items() if family.headless)
# Fields a ModelConfig does not keep; carried over from the source config.json when there is one.
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")
CARRIED_FIELDS = SPECIAL_TOKENS + ("auto_map",)


def family_of(model_type: str) -> Family:
    """The family of a config.json's model_type, however it is capitalised."""
    family = {t.lower(): f for t, f in FAMILIES.items()}.get(str(model_type).lower())
    if family is None:
        raise UnsupportedConfigError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return family


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Build a ModelConfig from the dict of an HF config.json (Dream and LLaDA without their code)."""
    family = family_of(hf.get("model_type"))
    return family.read(hf, family)


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


def hf_config(cfg: ModelConfig, *, dtype: str = "float32", extra: dict | None = None) -> dict:
    """The config.json of `cfg` in its family's field names; `extra` (e.g. token ids) is added last. A
    model without its untied LM head is written as its family's bare decoder class (e.g. Qwen2Model)."""
    family = FAMILIES[cfg.model_type]
    extra = dict(extra or {})
    tokens = {key: extra.pop(key, None) for key in SPECIAL_TOKENS}
    if not cfg.lm_head and not family.headless:
        raise UserError(f"this {cfg.model_type} model has no LM head, and {family.architecture}, the one class "
                         f"its code offers, has one: there is no Hugging Face form to write it as")
    out = family.write(cfg, tokens, family) | {"dtype": dtype}
    if not cfg.lm_head:  # a bare decoder: its AutoModel class (what save_pretrained of one writes)
        out["architectures"] = [family.bare_architecture]
    if family.remote_code:
        out["torch_dtype"] = dtype  # what their (transformers 4 era) code reads
        out["auto_map"] = family.auto_map  # the source's own, if any, comes in `extra`
    return out | extra
