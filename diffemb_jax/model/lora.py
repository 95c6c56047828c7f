"""LoRA on the decoder's projections: adapters put in, and folded back out.

`apply_lora` replaces each block projection whose path ("layers/0/attn/q_proj") matches `targets`
by a LoraLinear (model/lora_linear.py) holding the same kernel: A random (peft's init), B zero, so
the output is unchanged until trained. Each adapted projection gets a fixed draw index, its place in
the order the forward pass runs them, for its dropout mask. `merge_lora` folds the adapters into
plain kernels, W + A @ B * alpha / rank, for export or faster inference.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from diffemb_jax.errors import ConfigError
from diffemb_jax.model.decoder import BLOCK_PROJECTIONS, Decoder
from diffemb_jax.model.lora_linear import LoraLinear

DEFAULT_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = DEFAULT_TARGETS  # full-matched against a projection's path, "layers/0/attn/q_proj"

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _targeted(model: Decoder, targets: str) -> list[tuple[nnx.Module, str]]:
    """(parent module, attribute) of every block projection whose path `targets` matches, in the order
    the forward pass runs them (the LM head is not run by the encoder and is never adapted)."""
    found = []
    for i, block in enumerate(model.layers):
        for path in BLOCK_PROJECTIONS:
            if re.fullmatch(targets, f"layers/{i}/{path}"):
                parent, name = path.split("/")
                found.append((getattr(block, parent), name))
    return found


def apply_lora(model: Decoder, lora: LoraConfig, *, seed: int = 0) -> Decoder:
    """A copy of the model (sharing its weights) with LoRA adapters on the targeted projections."""
    if lora.rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {lora.rank}")
    adapted = nnx.merge(*nnx.split(model))
    targeted = _targeted(adapted, lora.targets)
    if not targeted:
        raise ConfigError(f"the LoRA target pattern {lora.targets!r} matches no projection of the model")
    key = jax.random.key(seed)
    for draw, (parent, name) in enumerate(targeted):
        # A's key: the (2 * draw)-th of the seed's stream, as when qwix made the adapters (the same values)
        setattr(parent, name, LoraLinear(getattr(parent, name), rank=lora.rank, scale=lora.scale,
                                         dropout=lora.dropout, draw=draw, key=jax.random.fold_in(key, 2 * draw)))
    return adapted


def merge_lora(model, lora: LoraConfig) -> Decoder:
    """A plain Decoder whose kernels are W + A @ B * alpha / rank."""
    plain = nnx.eval_shape(lambda: Decoder(model.cfg, rngs=nnx.Rngs(0), dtype=model.dtype))
    graphdef, state = nnx.split(plain)
    flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    values = state.to_pure_dict()
    for path, _ in nnx.to_flat_state(state):
        kernel = flat[path][...]
        a_path = path[:-1] + (path[-1] + "_lora_a",)
        if a_path in flat:
            b = flat[path[:-1] + (path[-1] + "_lora_b",)][...]
            delta = (flat[a_path][...].astype(jnp.float32) @ b.astype(jnp.float32)) * lora.scale
            kernel = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
        node = values
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = kernel
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)
