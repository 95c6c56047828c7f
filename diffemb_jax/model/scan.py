"""The decoder's blocks as one lax.scan, so that XLA compiles one block, not one per layer.

An unrolled loop of L blocks gives XLA L copies of the block to optimise and compile; a scan gives it
one loop body (MaxText's scan_layers). The blocks stay modules of their own, each with its own
parameters, so state paths ("layers/3/attn/q_proj/kernel"), and with them checkpoints, exports and
PEFT names, are those of the unrolled decoder: the scan runs over a stacked view of the blocks'
states, made inside the compiled program. That view is a copy of the blocks' weights, live while the
pass runs. Each LoRA adapter draws its dropout mask at its own draw index (model/lora.py): the body
holds layer 0's, and each layer adds its offset, a scanned value, so the masks are the unrolled pass's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffemb_jax.model.lora_linear import LoraLinear


def _draws(block: nnx.Module) -> list[int]:
    """The dropout draw indices of a block's LoRA adapters, in a fixed order."""
    return [module.draw for _, module in nnx.iter_modules(block) if isinstance(module, LoraLinear)]


def _layer_signature(state: nnx.State):
    return jax.tree.structure(state), [(v.shape, v.dtype) for v in jax.tree.leaves(state)]


def _stacked(blocks: Sequence[nnx.Module]):
    """(graphdef, states stacked along a new leading axis, each layer's draw offset [L] uint32)."""
    graphdef, first = nnx.split(blocks[0])
    states = [first] + [nnx.state(block) for block in blocks[1:]]
    signature, draws = _layer_signature(first), _draws(blocks[0])
    offsets = []
    for i, (block, state) in enumerate(zip(blocks, states)):
        if _layer_signature(state) != signature:
            raise ValueError(f"scan_layers: layer {i}'s parameters differ from layer 0's (LoRA on other "
                             "projections?); a scan needs every layer alike: run with scan_layers=False")
        own = _draws(block)
        offset = own[0] - draws[0] if draws else 0
        if own != [d + offset for d in draws]:
            raise ValueError(f"scan_layers: layer {i}'s LoRA draw indices {own} are not layer 0's {draws} shifted; "
                             "run with scan_layers=False")
        offsets.append(offset)
    stacked = jax.tree.map(lambda *values: jnp.stack(values), *states)
    return graphdef, stacked, jnp.asarray(np.array(offsets, np.uint32))


def scan_blocks(blocks: Sequence[nnx.Module], x: jax.Array, run: Callable, policy, remat: bool) -> jax.Array:
    """x through every block in order as one lax.scan; run(block, x, draw_offset) is one block's pass.
    With `remat`, each layer's body is rematerialised under `policy` (jax.checkpoint per layer)."""
    if not blocks:
        return x
    graphdef, states, offsets = _stacked(blocks)

    def body(x, layer):
        state, offset = layer
        return run(nnx.merge(graphdef, state), x, offset), None

    if remat:  # inside a scan, common subexpressions across the loop cannot be merged: no need to prevent them
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (states, offsets))
    return x
