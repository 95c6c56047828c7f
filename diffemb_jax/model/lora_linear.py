"""LoraLinear: a frozen linear layer plus a trainable low-rank update, `x @ W + x @ A @ B * scale`.

It holds the base layer's own `kernel` (and `bias`) beside `kernel_lora_a` [in, r] and
`kernel_lora_b` [r, out] as `nnx.LoRAParam`, so an optimizer built with `wrt=nnx.LoRAParam` trains
the adapters only, and their state paths are the kernel's with `_lora_a` / `_lora_b` appended
(checkpoints, PEFT export and merge_lora rely on them). The adapters are float32 whatever the base
dtype, carry the logical axes of the kernel side they share (A its input axis, B its output axis) and
are made where the kernel lies on a mesh. The delta is computed with the float32 adapters and
returned in x's dtype, as peft does: a float32 delta would promote the block's output, and with it
attention and the residual stream.
The product x @ A @ B has a backward of our own (`_low_rank`): the same gradients, with the products
ordered so that XLA on CPU does not transpose large operands. The adapter's input dropout is drawn
there too (`_dropped_low_rank`), from the key the forward pass is given and the layer's fixed draw
index, so masks are the same on resume and when GradCache re-embeds a chunk; without a key no
dropout is drawn (inference).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend.random import threefry2x32_p
from jax.sharding import NamedSharding, PartitionSpec as P

# peft's A initialisation (kaiming_uniform with a=sqrt(5): U(+-1/sqrt(fan_in))), so training starts
# where the reference recipe starts.
PEFT_A_INIT = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
_TOKENS = (((0,), (0,)), ((), ()))  # dot_general dimensions: contract the token axis of both operands
_ROWS = (((1,), (0,)), ((), ()))  # x [T, d] @ w [d, n]
_TRANSPOSED = (((1,), (1,)), ((), ()))  # g [T, n] @ w[d, n]^T


@jax.custom_vjp
def _low_rank(x, a, b):
    """x [T, d] @ A [d, r] @ B [r, n], the adapter's product."""
    return _low_rank_fwd(x, a, b)[0]


def _low_rank_fwd(x, a, b):
    h = jax.lax.dot_general(x, a, _ROWS)
    return jax.lax.dot_general(h, b, _ROWS), (x, a, b, h)


def _low_rank_bwd(saved, g):
    """The gradients autodiff gives, with the products over tokens ordered so that only the rank-wide
    operand is transposed: left to autodiff, XLA on CPU writes out a transposed copy of the
    [tokens, n] cotangent (and of x) for dB (dA), which took a quarter of the SmolLM2 train step."""
    x, a, b, h = saved
    dh = jax.lax.dot_general(g, b, _TRANSPOSED)  # [T, r]
    db = jax.lax.dot_general(h, g, _TOKENS)  # [r, n]
    da = jax.lax.dot_general(dh, x, _TOKENS).T  # [r, d] -> [d, r]
    dx = jax.lax.dot_general(dh, a, _TRANSPOSED)
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dropped_low_rank(x, keep_mask, a, b, keep: float):
    """(x dropped out where keep_mask is False, the rest scaled by 1 / keep) @ A @ B."""
    return _dropped_low_rank_fwd(x, keep_mask, a, b, keep)[0]


def _dropped_low_rank_fwd(x, keep_mask, a, b, keep):
    h = jax.lax.dot_general(jnp.where(keep_mask, x, 0), a, _ROWS) * (1 / keep)
    return jax.lax.dot_general(h, b, _ROWS), (x, keep_mask, a, b, h)


def _dropped_low_rank_bwd(keep, saved, g):
    """As _low_rank_bwd, through the dropout: it keeps the 1-byte mask, not a dropped copy of x."""
    x, keep_mask, a, b, h = saved
    dh = jax.lax.dot_general(g, b, _TRANSPOSED) * (1 / keep)  # [T, r]
    db = jax.lax.dot_general(h, g, _TOKENS)
    da = jax.lax.dot_general(dh, jnp.where(keep_mask, x, 0), _TOKENS).T
    dx = jnp.where(keep_mask, jax.lax.dot_general(dh, a, _TRANSPOSED), 0)
    return dx.astype(x.dtype), None, da.astype(a.dtype), db.astype(b.dtype)


_dropped_low_rank.defvjp(_dropped_low_rank_fwd, _dropped_low_rank_bwd)


def dropout_keep_mask(key: jax.Array, index, shape, keep: float) -> jax.Array:
    """True with probability `keep`, quantised to 1/65536, for the `index`-th draw from `key`.

    JAX's Threefry-2x32 hash (the one behind jax.random) of the counter pair (row, index * 2^16 +
    column block) gives 64 bits a block: four 16-bit draws, four elements. jax.random.bits would XOR
    the two words to one, and each draw would need a fold_in: on the CPU every threefry call is a
    loop compiled apart, and the SmolLM2 train step compiled in 66 s instead of 36. Counters stay
    unique while a row is at most 2^18 wide and a key draws fewer than 2^16 masks."""
    *lead, width = shape
    rows, blocks = math.prod(lead), -(-width // 4)
    if blocks > 1 << 16 or rows >= 1 << 32:
        raise ValueError(f"a dropout mask of shape {tuple(shape)} is past the counters' range: "
                         f"fewer than 2^32 rows, at most 2^18 wide")
    row = jax.lax.broadcasted_iota(jnp.uint32, (rows, blocks), 0)
    column = (jnp.asarray(index, jnp.uint32) << 16) + jax.lax.broadcasted_iota(jnp.uint32, (rows, blocks), 1)
    data = jax.random.key_data(key)
    hi, lo = threefry2x32_p.bind(data[0], data[1], row, column)
    threshold = jnp.uint32(round(keep * 65536))
    keep_mask = jnp.concatenate([(word >> shift & 0xFFFF) < threshold for word in (hi, lo) for shift in (0, 16)],
                                axis=-1)
    return keep_mask[:, :width].reshape(shape)


_ZEROS = nnx.initializers.zeros_init()


def _init(init, shape: tuple[int, ...], dtype, key: jax.Array) -> jax.Array:
    return init(key, shape, dtype).astype(jnp.float32)


@functools.cache
def _placed_init(init, shape: tuple[int, ...], dtype, sharding: NamedSharding):
    """_init compiled to put its output at `sharding`; one program for every adapter of that shape and
    placement (a SmolLM2 has 420 adapters, of 4 shapes)."""
    return jax.jit(functools.partial(_init, init, shape, dtype), out_shardings=sharding)


def _made_like(kernel: nnx.Param, init, key, shape, side: int) -> jax.Array:
    """An adapter of `shape`, init(key, shape) in the kernel's dtype then float32 (the values peft's
    init gives in that dtype), made where the kernel lies: sharded as the kernel along its `side` (0:
    input, A; 1: output, B), whole along the rank. Made by a jitted call with that placement: no host
    copy is sent, so no process must check that it equals the others'."""
    value = kernel[...]
    sharding = getattr(value, "sharding", None)  # None while traced (nnx.eval_shape)
    if not isinstance(sharding, NamedSharding):
        return _init(init, shape, value.dtype, key)
    spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
    spec = P(spec[0], None) if side == 0 else P(None, spec[1])
    return _placed_init(init, tuple(shape), value.dtype, sharding.update(spec=spec))(key)


def _adapter_param(kernel: nnx.Param, value: jax.Array, side: int) -> nnx.LoRAParam:
    """The adapter as an nnx.LoRAParam with the kernel's metadata, its logical axes those of `side`."""
    metadata = dict(kernel.get_metadata())
    axes = metadata.get("out_sharding")
    if axes is not None:
        metadata["out_sharding"] = (axes[0], None) if side == 0 else (None, axes[1])
    return nnx.LoRAParam(value, **metadata)


class LoraLinear(nnx.Module):
    """`base` (an nnx.Linear [in, out], its Params shared) plus adapters of `rank`, scaled by `scale`;
    `dropout` on the adapter's input, the `draw`-th mask of the forward pass's dropout key."""

    def __init__(self, base: nnx.Linear, *, rank: int, scale: float, dropout: float, draw: int, key: jax.Array):
        n_in, n_out = base.kernel.shape
        self.kernel, self.bias = base.kernel, base.bias
        self.dtype, self.precision = base.dtype, base.precision
        self.scale, self.dropout, self.draw = scale, dropout, draw
        a = _made_like(base.kernel, PEFT_A_INIT, key, (n_in, rank), side=0)
        b = _made_like(base.kernel, _ZEROS, key, (rank, n_out), side=1)
        self.kernel_lora_a = _adapter_param(base.kernel, a, side=0)
        self.kernel_lora_b = _adapter_param(base.kernel, b, side=1)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None,
                 draw_offset: jax.Array | None = None) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        x, kernel, bias = nnx.nn.dtypes.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.precision)
        y = y + self._delta(x, dropout_key, draw_offset) * self.scale
        if bias is not None:
            y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
        return y

    def _delta(self, x: jax.Array, dropout_key: jax.Array | None, draw_offset: jax.Array | None) -> jax.Array:
        """x @ A @ B in x's dtype, x dropped out by this layer's mask where a key is given: the mask of
        draw index `draw`, plus `draw_offset` (uint32) where the blocks are scanned (model/scan.py)."""
        a, b = self.kernel_lora_a[...], self.kernel_lora_b[...]
        flat = x.reshape(-1, x.shape[-1])
        if dropout_key is None or self.dropout == 0:
            out = _low_rank(flat, a, b)
        else:
            keep = 1.0 - self.dropout
            # The barrier ties the mask to x, so that XLA may draw it when x is ready rather than all at
            # the start (on the CPU it changed neither memory nor speed; kept for the accelerators).
            draw = np.uint32(self.draw) if draw_offset is None else np.uint32(self.draw) + draw_offset
            flat, index = jax.lax.optimization_barrier((flat, draw))
            out = _dropped_low_rank(flat, dropout_keep_mask(dropout_key, index, flat.shape, keep), a, b, keep)
        return out.reshape(*x.shape[:-1], out.shape[-1]).astype(x.dtype)
