"""Attention kernels behind one call: the mask rules (padding, causal, window) in one place.

Padding is always masked, in both modes. Kernels:
- xla: an explicit boolean mask, any padding side, every backend. Beyond QUERY_CHUNK tokens it attends
  QUERY_CHUNK queries at a time (the backward pass recomputes each chunk's scores), so memory grows
  with length x QUERY_CHUNK rather than length squared: a 32k-token document needs no 32k x 32k scores;
- cudnn: cuDNN flash attention on NVIDIA GPUs, padding given as per-sequence lengths (right padding,
  as the Embedder and the data pipeline produce); packed rows' texts as a mask, which cuDNN takes as
  a bias;
- splash: Pallas splash attention (TPU), padding as segment ids (real tokens 1, or in a packed row
  each token's text number; pads 0), the sequence padded up to the kernel's 128-token blocks; on CPU
  it runs in Pallas interpret mode (for tests).
  Under a mesh context (`jax.set_mesh`) it runs inside shard_map: batch over data and fsdp, heads
  over tensor, since GSPMD cannot partition a Pallas call.
`auto` picks by backend and falls back to xla, with the reason logged, where a kernel cannot serve.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from diffemb_jax.errors import ConfigError

KERNELS = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128
QUERY_CHUNK = 1024
log = logging.getLogger(__name__)


def attention_mask_4d(segment_ids: jax.Array, causal: bool, sliding_window: int | None,
                      query_positions: jax.Array | None = None, packed: bool = False) -> jax.Array:
    """[B, L] segment ids (each token's text number, 0: pads) -> [B, 1, Q, L] boolean (query, key)
    mask, for the queries at `query_positions` (default: all L). Unpacked, every real token is seen;
    packed, a token sees its own text only, and pads see pads (so that no row of scores is empty)."""
    if packed:
        queries = segment_ids if query_positions is None else jnp.take(segment_ids, query_positions, axis=1,
                                                                         mode="clip")
        keys = segment_ids[:, None, None, :] == queries[:, None, :, None]
    else:
        keys = segment_ids.astype(bool)[:, None, None, :]
    if not causal:
        return keys
    length = segment_ids.shape[-1]
    q = (jnp.arange(length) if query_positions is None else query_positions)[:, None]
    k = jnp.arange(length)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    return keys & allowed[None, None]


def _xla(q, k, v, segment_ids, causal: bool, sliding_window: int | None, chunk: int, packed: bool = False):
    """XLA attention; longer than `chunk`, one chunk of queries at a time under jax.checkpoint, so
    neither the forward nor the backward pass holds more than one chunk's [B, H, chunk, L] scores."""
    b, length, heads, d = q.shape
    if length <= chunk:
        mask = attention_mask_4d(segment_ids, causal, sliding_window, packed=packed)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    n = -(-length // chunk)
    q = jnp.pad(q, ((0, 0), (0, n * chunk - length), (0, 0), (0, 0)))  # padded queries are cut off below
    chunks = q.reshape(b, n, chunk, heads, d).swapaxes(0, 1)

    @jax.checkpoint
    def one(chunk_and_start):
        q_chunk, start = chunk_and_start
        mask = attention_mask_4d(segment_ids, causal, sliding_window, start + jnp.arange(chunk), packed)
        return jax.nn.dot_product_attention(q_chunk, k, v, mask=mask, implementation="xla")

    out = jax.lax.map(one, (chunks, jnp.arange(n) * chunk))
    return out.swapaxes(0, 1).reshape(b, n * chunk, heads, d)[:, :length]


@functools.cache
def resolve_kernel(kernel: str, backend: str, dtype: str, head_dim: int, sliding_window: int | None) -> str:
    """The kernel that will run; `auto` falls back to xla (and says why) where another cannot serve."""
    if kernel not in KERNELS:
        raise ConfigError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS}")
    if kernel != "auto":
        return kernel
    if backend == "gpu":
        if dtype not in ("bfloat16", "float16"):
            log.warning("attention: cudnn needs bfloat16/float16 (got %s); using xla", dtype)
        elif head_dim > 128 or head_dim % 8:
            log.warning("attention: cudnn needs head_dim <= 128 and a multiple of 8 (got %d); using xla", head_dim)
        else:
            return "cudnn"
    elif backend == "tpu":
        if sliding_window is not None:
            log.warning("attention: the splash path here has no sliding window; using xla")
        else:
            return "splash"
    return "xla"


def attend(q, k, v, segment_ids, *, causal: bool, sliding_window: int | None = None, kernel: str = "xla",
           packed: bool = False):
    """q [B,L,H,D], k/v [B,L,KV,D] (grouped heads broadcast) -> [B,L,H,D]. segment_ids [B, L]: each
    token's text number, 0 for pads (a row of one text: 1 for its real tokens). `packed`: rows hold
    several texts, and attention stays within a text."""
    kernel = resolve_kernel(kernel, jax.default_backend(), str(q.dtype), q.shape[-1], sliding_window)
    if kernel == "xla":
        return _xla(q, k, v, segment_ids, causal, sliding_window, QUERY_CHUNK, packed)
    if kernel == "cudnn":
        if jax.default_backend() != "gpu":
            raise ConfigError(f"the cudnn attention kernel needs an NVIDIA GPU; this backend is "
                             f"{jax.default_backend()!r}: use kernel='xla'")
        window = None if (sliding_window is None or not causal) else (sliding_window - 1, 0)
        if packed:  # the texts' block-diagonal mask, which cuDNN takes as a bias
            return jax.nn.dot_product_attention(
                q, k, v, mask=attention_mask_4d(segment_ids, False, None, packed=True), is_causal=causal,
                local_window_size=window, implementation="cudnn")
        lengths = segment_ids.sum(-1).astype(jnp.int32)
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            local_window_size=window, implementation="cudnn")
    if sliding_window is not None:
        raise ConfigError("the splash attention kernel here has no sliding window; use kernel='xla'")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _splash(q, k, v, segment_ids, causal)
    from jax.sharding import PartitionSpec as P

    batch = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names) or None
    heads = "tensor" if "tensor" in mesh.axis_names else None
    qkv, rows = P(batch, None, heads, None), P(batch, None)
    local = jax.shard_map(functools.partial(_splash, causal=causal), mesh=mesh,
                          in_specs=(qkv, qkv, qkv, rows), out_specs=qkv, check_vma=False)
    return local(q, k, v, segment_ids)


def _splash(q, k, v, segment_ids, causal: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, length, heads, d = q.shape
    padded = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK
    extra = ((0, 0), (0, padded - length), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, extra) for x in (q / jnp.sqrt(jnp.float32(d)).astype(q.dtype), k, v))
    segments = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - length)))
    shape = (padded, padded)
    head_mask = masks.CausalMask(shape) if causal else masks.FullMask(shape)
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([head_mask] * heads), head_shards=1, q_seq_shards=1,
        interpret=jax.default_backend() != "tpu")

    def one(q, k, v, seg):  # the kernel takes one sequence, heads first
        out = kernel(q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
                     segment_ids=splash.SegmentIds(q=seg, kv=seg))
        return out.swapaxes(0, 1)

    return jax.vmap(one)(q, k, v, segments)[:, :length]
