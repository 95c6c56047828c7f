"""LoRA on the decoder's projections through qwix (the library MaxText and tunix use).

qwix intercepts the matmuls of the modules whose path matches `targets` and adds
`x @ A @ B * alpha / rank` with A, B held as `nnx.LoRAParam`, so an optimizer built with
`wrt=nnx.LoRAParam` trains the adapters only. LoRA parameters are kept in float32 whatever the base
dtype. Dropout on the adapters' input is always on in an adapted model (qwix): evaluate merged models. `merge_lora` folds them back into plain kernels for export or faster inference.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from diffemb_jax.model import Decoder

# peft's A initialisation (kaiming_uniform with a=sqrt(5): U(+-1/sqrt(fan_in))), so training starts
# where the reference recipe starts; qwix's default (he_uniform) is sqrt(6) times wider.
PEFT_A_INIT = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
DEFAULT_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def apply_lora(model: Decoder, lora: LoraConfig, *, seed: int = 0) -> Decoder:
    """The model with LoRA adapters (A random, B zero: the output is unchanged until trained)."""
    if lora.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {lora.rank}")
    provider = qwix.LoraProvider(module_path=lora.targets, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                                 lora_a_initializer=PEFT_A_INIT,
                                 disable_jit=True)  # qwix would jit each intercepted call: dropout RNG updates must stay in our trace
    sample = jnp.ones((1, 8), jnp.int32)
    remat, model.remat = model.remat, "none"  # adapters are created while tracing: not inside a checkpoint
    adapted = qwix.apply_lora_to_model(model, provider, sample, sample,
                                       rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    adapted.remat = model.remat = remat
    if not nnx.state(adapted, nnx.LoRAParam):
        raise ValueError(f"the LoRA target pattern {lora.targets!r} matches no projection of the model")
    _to_float32(adapted)
    return adapted


def set_dropout_key(model, key: jax.Array) -> None:
    """Where qwix draws LoRA dropout masks from. Set inside the traced step from a key derived from
    (seed, step), so masks are reproducible on resume and identical when GradCache re-encodes.

    The stream's call count is kept in numpy, not traced: flax checks the sharding of a traced count
    on every update, and jax answers by walking the whole trace so far, which made tracing the
    SmolLM2 step quadratic in its depth (102 s of its 224 s compile)."""
    rngs = nnx.Rngs(dropout=key)
    rngs.dropout.count.set_value(np.zeros(key.shape, np.uint32))
    model.set_attributes(qwix_rngs=rngs, raise_if_not_found=False)


def _to_float32(model) -> None:
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float32), state))


def lora_paths(model) -> list[tuple]:
    return [path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))]


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
    merged = nnx.merge(graphdef, state)
    merged.attention, merged.kernel = model.attention, model.kernel
    return merged


def matches(lora: LoraConfig, module_path: str) -> bool:
    return re.fullmatch(lora.targets, module_path) is not None
