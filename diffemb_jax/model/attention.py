"""Attention kernels behind one call: the mask rules (padding, causal, window) in one place.

Padding is always masked, in both modes. Kernels:
- xla: an explicit boolean mask, any padding side, every backend. Beyond QUERY_CHUNK tokens it attends
  QUERY_CHUNK queries at a time (the backward pass recomputes each chunk's scores), so memory grows
  with length x QUERY_CHUNK rather than length squared: a 32k-token document needs no 32k x 32k scores;
- cudnn: cuDNN flash attention on NVIDIA GPUs, padding given as per-sequence lengths (right padding,
  as the Embedder and the data pipeline produce). Packed rows go as cuDNN's packed layout: each row's
  runs of tokens (its texts one after another, then its pads) as offsets and lengths, at most
  `texts_per_row` + 1 a row, so no [rows, 1, L, L] mask is made (a Hopper GPU and cuDNN 9.6 or later,
  and rows long enough for their texts that this costs less memory than the mask, `runs_cheaper`;
  otherwise the texts' mask as a bias);
- splash: Pallas splash attention (TPU), padding as segment ids (real tokens 1, or in a packed row
  each token's text number; pads 0), the sequence padded up to the kernel's 128-token blocks; on CPU
  it runs in Pallas interpret mode (for tests).
  Under a mesh context (`jax.set_mesh`) it runs inside shard_map: batch over data and fsdp, heads
  over tensor, since GSPMD cannot partition a Pallas call.
`auto` picks by backend and falls back to xla, with the reason logged, where a kernel cannot serve.
"""

from __future__ import annotations

import functools
import inspect
import logging

import jax
import jax.numpy as jnp
import numpy as np

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
           texts_per_row: int = 1):
    """q [B,L,H,D], k/v [B,L,KV,D] (grouped heads broadcast) -> [B,L,H,D]. segment_ids [B, L]: each
    token's text number, 0 for pads (a row of one text: 1 for its real tokens). `texts_per_row`: the
    most texts a row holds; above 1, rows are packed (each text one after another from the row's start,
    pads after them) and attention stays within a text."""
    packed = texts_per_row > 1
    kernel = resolve_kernel(kernel, jax.default_backend(), str(q.dtype), q.shape[-1], sliding_window)
    if kernel == "xla":
        return _xla(q, k, v, segment_ids, causal, sliding_window, QUERY_CHUNK, packed)
    if kernel == "cudnn":
        if jax.default_backend() != "gpu":
            raise ConfigError(f"the cudnn attention kernel needs an NVIDIA GPU; this backend is "
                             f"{jax.default_backend()!r}: use kernel='xla'")
        runs = min(texts_per_row, q.shape[1]) + 1  # a packed row's texts, then its pads
        if packed and runs_cheaper(runs, q.shape[2], q.shape[1]) and _cudnn_packs():
            return _cudnn_packed(q, k, v, segment_ids, causal, sliding_window, runs)
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


def segment_runs(segment_ids: jax.Array, most: int) -> tuple[jax.Array, jax.Array]:
    """[B, L] segment ids -> (lengths [B, most], starts [B, most + 1]) of each row's runs of equal ids
    (its texts, then its pads), -1 past a row's last run: cuDNN's packed layout, in which every token
    belongs to a run, so that pads too have defined outputs and gradients. A row must hold at most
    `most` runs; runs past it would be dropped."""
    b, length = segment_ids.shape
    new_run = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    run = jnp.cumsum(new_run, axis=1, dtype=jnp.int32) - 1  # each token's run in its row
    lengths = jax.vmap(lambda r: jnp.zeros(most, jnp.int32).at[r].add(1, mode="drop"))(run)
    used = jnp.arange(most)[None, :] <= run[:, -1:]
    starts = jnp.cumsum(lengths, axis=1, dtype=jnp.int32) - lengths
    unused = jnp.full((b, 1), -1, jnp.int32)
    return jnp.where(used, lengths, -1), jnp.concatenate([jnp.where(used, starts, -1), unused], axis=1)


_warned = set()


def _cudnn_packs() -> bool:
    """Whether cuDNN takes packed rows as runs: its packed layout needs Hopper or later and cuDNN 9.6+,
    and JAX's private entry to it its q_offsets argument (checked, as a private API may change)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        ok = ("q_offsets" in inspect.signature(cudnn.dot_product_attention).parameters
              and cudnn.check_compute_capability("9.0") and cudnn.check_cudnn_version() >= 90600)
    except (ImportError, AttributeError, RuntimeError):  # RuntimeError: no cuDNN found
        ok = False
    if not ok and "packed" not in _warned:
        _warned.add("packed")
        log.warning("attention: cuDNN's packed layout needs a Hopper GPU, cuDNN 9.6+ and JAX's entry to it; packed "
                    "rows' texts go to cuDNN as a [rows, 1, L, L] mask instead")
    return ok


def runs_cheaper(runs: int, heads: int, length: int) -> bool:
    """Whether cuDNN's packed layout costs less memory than the texts' mask: its softmax statistics,
    float32 [rows * runs, heads, L] (kept for the backward pass), against the mask's bfloat16
    [rows, 1, L, L] bias (and, before jax 0.12, the bias's gradient). Long rows hold few texts: runs."""
    return 2 * runs * heads <= length


def _cudnn_packed(q, k, v, segment_ids, causal: bool, sliding_window: int | None, runs: int):
    """cuDNN flash attention over packed rows given as runs (segment_runs): no mask is made. The
    layout is reached through JAX's cuDNN module, which jax.nn.dot_product_attention does not expose."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    lengths, starts = segment_runs(segment_ids, runs)
    mask_type = cudnn.MaskType.PADDING_CAUSAL if causal else cudnn.MaskType.PADDING
    window = sliding_window if causal else None
    return cudnn.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=starts,
                                       kv_offsets=starts, scale=float(1 / np.sqrt(q.shape[-1])),
                                       mask_type=mask_type, sliding_window_length=window)


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
