"""LoRA on the decoder's projections through qwix (the library MaxText and tunix use).

qwix intercepts the matmuls of the modules whose path matches `targets` and adds
`x @ A @ B * alpha / rank` with A, B held as `nnx.LoRAParam`, so an optimizer built with
`wrt=nnx.LoRAParam` trains the adapters only. LoRA parameters are kept in float32 whatever the base
dtype. `merge_lora` folds them back into plain kernels for export or faster inference.
The adapter product x @ A @ B has a backward of our own (`_low_rank`): the same gradients, with the
products ordered so that XLA on CPU does not transpose large operands. The adapters' input dropout
is drawn there too (`_dropped_low_rank`), where the train step has set a stream (set_dropout_key);
an adapted model called without one runs without dropout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from jax.extend.random import threefry2x32_p
from qwix._src.providers import lora as qwix_lora
from qwix._src.utils import flax_util

from diffemb_jax.model import Decoder

# peft's A initialisation (kaiming_uniform with a=sqrt(5): U(+-1/sqrt(fan_in))), so training starts
# where the reference recipe starts; qwix's default (he_uniform) is sqrt(6) times wider.
PEFT_A_INIT = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
DEFAULT_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
_TOKENS = (((0,), (0,)), ((), ()))  # dot_general dimensions: contract the token axis of both operands


@jax.custom_vjp
def _low_rank(x, a, b):
    """x [T, d] @ A [d, r] @ B [r, n], the adapter's product."""
    return _low_rank_fwd(x, a, b)[0]


def _low_rank_fwd(x, a, b):
    h = jax.lax.dot_general(x, a, (((1,), (0,)), ((), ())))
    return jax.lax.dot_general(h, b, (((1,), (0,)), ((), ()))), (x, a, b, h)


def _low_rank_bwd(saved, g):
    """The gradients autodiff gives, with the products over tokens ordered so that only the rank-wide
    operand is transposed: left to autodiff, XLA on CPU writes out a transposed copy of the
    [tokens, n] cotangent (and of x) for dB (dA), which took a quarter of the SmolLM2 train step."""
    x, a, b, h = saved
    dh = jax.lax.dot_general(g, b, (((1,), (1,)), ((), ())))  # [T, r]
    db = jax.lax.dot_general(h, g, _TOKENS)  # [r, n]
    da = jax.lax.dot_general(dh, x, _TOKENS).T  # [r, d] -> [d, r]
    dx = jax.lax.dot_general(dh, a, (((1,), (1,)), ((), ())))
    return dx.astype(x.dtype), da.astype(a.dtype), db.astype(b.dtype)


_low_rank.defvjp(_low_rank_fwd, _low_rank_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dropped_low_rank(x, keep_mask, a, b, keep: float):
    """(x dropped out where keep_mask is False, the rest scaled by 1 / keep) @ A @ B."""
    return _dropped_low_rank_fwd(x, keep_mask, a, b, keep)[0]


def _dropped_low_rank_fwd(x, keep_mask, a, b, keep):
    h = jax.lax.dot_general(jnp.where(keep_mask, x, 0), a, (((1,), (0,)), ((), ()))) * (1 / keep)
    return jax.lax.dot_general(h, b, (((1,), (0,)), ((), ()))), (x, keep_mask, a, b, h)


def _dropped_low_rank_bwd(keep, saved, g):
    """As _low_rank_bwd, through the dropout: it keeps the 1-byte mask, not a dropped copy of x."""
    x, keep_mask, a, b, h = saved
    dh = jax.lax.dot_general(g, b, (((1,), (1,)), ((), ()))) * (1 / keep)  # [T, r]
    db = jax.lax.dot_general(h, g, _TOKENS)
    da = jax.lax.dot_general(dh, jnp.where(keep_mask, x, 0), _TOKENS).T
    dx = jnp.where(keep_mask, jax.lax.dot_general(dh, a, (((1,), (1,)), ((), ()))), 0)
    return dx.astype(x.dtype), None, da.astype(a.dtype), db.astype(b.dtype)


_dropped_low_rank.defvjp(_dropped_low_rank_fwd, _dropped_low_rank_bwd)


def dropout_keep_mask(key: jax.Array, index, shape, keep: float) -> jax.Array:
    """True with probability `keep`, quantised to 1/65536, for the `index`-th draw from `key`.

    JAX's Threefry-2x32 hash (the one behind jax.random) of the counter pair (row, index * 2^16 +
    column block) gives 64 bits a block: four 16-bit draws, four elements. jax.random.bits would XOR
    the two words to one, and each draw would need a fold_in: on the CPU every threefry call is a
    loop compiled apart, and the SmolLM2 train step compiled in 66 s instead of 36. Counters stay
    unique while a row is at most 2^18 wide and a stream draws fewer than 2^16 masks."""
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


def _dropout_draw():
    """(keep probability, key, index) of the LoRA being computed: set_dropout_key's stream, its rate
    and its next draw, or (1, None, None) where none was set (qwix's init and plain inference)."""
    rngs = getattr(flax_util.get_current_module(), "qwix_rngs", None)
    stream = getattr(rngs, "dropout", None)
    if not isinstance(stream, _DropoutStream) or stream.rate == 0:
        return 1.0, None, None
    return 1.0 - stream.rate, stream.key[...], stream.next_index()


def _lora_delta(lhs, lora_a, lora_b, lhs_ca, lhs_ba, contract_shape, batch_shape, remain_shape, rank,
                precision=None):
    """qwix's adapter delta, with the adapter's input dropout, for a dense layer (x [..., d] @ kernel
    [d, n]) through `_low_rank` / `_dropped_low_rank`; any other contraction is left to qwix.
    Computed with the float32 adapters, returned in x's dtype, as peft does: qwix adds it to the base
    output, which a float32 delta would promote, and with it attention and the residual stream."""
    keep, key, index = _dropout_draw()
    if key is not None:
        # The barrier ties the mask to x, so that XLA may draw it when x is ready rather than all at the
        # start (on the CPU it changed neither memory nor speed; kept for the accelerators, unmeasured).
        lhs, index = jax.lax.optimization_barrier((lhs, index))
        keep_mask = dropout_keep_mask(key, index, lhs.shape, keep)
    if tuple(lhs_ca) != (lhs.ndim - 1,) or lhs_ba or len(contract_shape) != 1 or len(remain_shape) != 1 \
            or precision is not None:
        if key is not None:
            lhs = jnp.where(keep_mask, lhs / keep, 0).astype(lhs.dtype)
        return _qwix_lora_delta(lhs, lora_a, lora_b, lhs_ca, lhs_ba, contract_shape, batch_shape, remain_shape,
                                rank, precision=precision).astype(lhs.dtype)
    x = lhs.reshape(-1, lhs.shape[-1])
    if key is None:
        out = _low_rank(x, lora_a, lora_b)
    else:
        out = _dropped_low_rank(x, keep_mask.reshape(x.shape), lora_a, lora_b, keep)
    return out.reshape(*lhs.shape[:-1], out.shape[-1]).astype(lhs.dtype)


# qwix computes the delta in a private function of its LoRA provider; ours is the same product with a
# faster backward, and draws the dropout itself (qwix's is then off). Where a qwix version names or
# calls it otherwise, qwix's own delta and dropout stay in place.
_qwix_lora_delta = getattr(qwix_lora, "_compute_lora_delta", None)
OWN_DELTA = _qwix_lora_delta is not None and list(inspect.signature(_qwix_lora_delta).parameters) == list(
    inspect.signature(_lora_delta).parameters) and hasattr(flax_util, "get_current_module")
if OWN_DELTA:
    qwix_lora._compute_lora_delta = _lora_delta


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@contextlib.contextmanager
def _jit_for_multihost_checks():
    """qwix creates each adapter under jax.disable_jit() and device_puts it onto its base weight's
    sharding. Across processes jax then checks the value is the same everywhere (assert_equal), by
    an allgather whose jit, disabled, returns this process's shard (jax 0.10 and 0.12): every
    multi-host run failed there. The check runs with jit on."""
    if jax.process_count() == 1:
        yield
        return
    from jax.experimental import multihost_utils

    check = multihost_utils.assert_equal

    def with_jit(*args, **kwargs):
        with jax.disable_jit(False):
            return check(*args, **kwargs)

    multihost_utils.assert_equal = with_jit
    try:
        yield
    finally:
        multihost_utils.assert_equal = check


def apply_lora(model: Decoder, lora: LoraConfig, *, seed: int = 0) -> Decoder:
    """The model with LoRA adapters (A random, B zero: the output is unchanged until trained)."""
    if lora.rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {lora.rank}")
    provider = qwix.LoraProvider(module_path=lora.targets, rank=lora.rank, alpha=lora.alpha,
                                 dropout=0.0 if OWN_DELTA else lora.dropout,
                                 lora_a_initializer=PEFT_A_INIT,
                                 disable_jit=True)  # qwix would jit each intercepted call: dropout RNG updates must stay in our trace
    sample = jnp.ones((1, 8), jnp.int32)
    remat, model.remat = model.remat, "none"  # adapters are created while tracing: not inside a checkpoint
    with _jit_for_multihost_checks():
        adapted = qwix.apply_lora_to_model(model, provider, sample, sample,
                                           rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    adapted.remat = model.remat = remat
    adapted.lora_dropout = lora.dropout  # drawn by _lora_delta, from set_dropout_key's stream
    if not nnx.state(adapted, nnx.LoRAParam):
        raise ValueError(f"the LoRA target pattern {lora.targets!r} matches no projection of the model")
    _to_float32(adapted)
    return adapted


class _DropoutStream(nnx.RngStream):
    """flax's RngStream whose count may be a host numpy array, read as a copy at each draw. (flax
    folds in the array itself and then adds 1 in place; under jit, jax keeps a numpy constant by
    reference, so every draw of a step would see the final count and all masks would be the same.)
    `rate`: the adapters' dropout rate. Our delta draws masks by index (dropout_keep_mask); qwix's
    own dropout, where it is in place, calls the stream for a key as from any flax stream."""

    def __init__(self, key: jax.Array, rate: float):
        super().__init__(key, tag="dropout")
        self.rate = rate

    def next_index(self):
        count = self.count[...]
        if isinstance(count, np.ndarray):
            count = count.copy()
        self.count[...] = count + 1
        return count

    def __call__(self) -> jax.Array:
        return jax.random.fold_in(self.key[...], self.next_index())


def set_dropout_key(model, key: jax.Array) -> None:
    """The stream the adapters' dropout masks are drawn from (by _lora_delta, or by qwix where its own
    delta is in place), at the model's lora_dropout rate. Set inside the traced step from a key
    derived from (seed, step), so masks are reproducible on resume and identical when GradCache
    re-encodes.

    The stream's call count is kept in numpy, not traced: flax checks the sharding of a traced count
    on every update, and jax answers by walking the whole trace so far, which made tracing the
    SmolLM2 step quadratic in its depth (102 s of its 224 s compile). Under remat the count enters
    each checkpointed block as a traced value and leaves it as one."""
    rngs = nnx.Rngs(dropout=0)
    rngs.dropout = _DropoutStream(key, getattr(model, "lora_dropout", 0.0))
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
