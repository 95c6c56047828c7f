"""Checkpoint tensor names <-> decoder parameter paths, one table per family.

Each row pairs an HF name pattern with an NNX path pattern (`{i}` is the layer index). The table
reads both ways, so export (the way out) inverts the same rows. `kernel` leaves are stored
transposed in HF ([out, in]) and are transposed on the way through.
"""

from __future__ import annotations

import re

_QWEN2_SHAPED = (
    ("model.embed_tokens.weight", "embed.embedding"),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.scale"),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers.{i}.attn.q_proj.kernel"),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers.{i}.attn.q_proj.bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers.{i}.attn.k_proj.kernel"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers.{i}.attn.k_proj.bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers.{i}.attn.v_proj.kernel"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers.{i}.attn.v_proj.bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers.{i}.attn.o_proj.kernel"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_norm.scale"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.kernel"),
    ("model.layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj.kernel"),
    ("model.layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.kernel"),
    ("model.norm.weight", "final_norm.scale"),
    ("lm_head.weight", "lm_head.kernel"),
)

_LLADA = (
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

KEY_MAPS = {"Dream": _QWEN2_SHAPED, "qwen2": _QWEN2_SHAPED, "llama": _QWEN2_SHAPED,
            "mistral": _QWEN2_SHAPED, "llada": _LLADA}

# Buffers some checkpoints carry that are not parameters (recomputed from the config).
IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


class KeyMap:
    """Translate names for one family, both directions."""

    def __init__(self, model_type: str, tied_head: bool):
        rows = KEY_MAPS[model_type]
        self._forward = [(_compile(hf), nnx_path) for hf, nnx_path in rows]
        self._backward = [(_compile(nnx_path), hf) for hf, nnx_path in rows]
        self.tied_head = tied_head

    def to_param_path(self, hf_name: str) -> tuple | None:
        """HF name -> NNX path tuple (layer indices as int), or None if no row matches."""
        for pattern, template in self._forward:
            m = pattern.match(hf_name)
            if m:
                dotted = template.replace("{i}", m.group("i")) if "i" in m.groupdict() else template
                return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))
        return None

    def to_hf_name(self, path: tuple) -> str:
        dotted = ".".join(str(p) for p in path)
        for pattern, template in self._backward:
            m = pattern.match(dotted)
            if m:
                return template.replace("{i}", m.group("i")) if "i" in m.groupdict() else template
        raise KeyError(f"no HF name for parameter {dotted}")

    def is_ignorable(self, hf_name: str) -> bool:
        """Tensors a faithful load may skip: RoPE buffers, and a tied head written out anyway."""
        if IGNORED.search(hf_name):
            return True
        return self.tied_head and self.to_param_path(hf_name) == ("lm_head", "kernel")


def is_transposed(path: tuple) -> bool:
    return path[-1] == "kernel"
