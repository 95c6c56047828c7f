"""Attention kernels behind one call: the mask rules (padding, causal, window) in one place.

Padding is always masked in both modes; the XLA kernel takes an explicit boolean mask (any padding
side), cuDNN flash takes per-sequence lengths and so needs right padding, as the Embedder produces.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KERNELS = ("xla", "cudnn")


def attention_mask_4d(padding_mask: jax.Array, causal: bool, sliding_window: int | None) -> jax.Array:
    """[B, L] 0/1 padding mask -> [B, 1, L, L] boolean (query, key) mask."""
    keys = padding_mask.astype(bool)[:, None, None, :]
    length = padding_mask.shape[-1]
    if not causal:
        return keys
    q = jnp.arange(length)[:, None]
    k = jnp.arange(length)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed &= k > q - sliding_window
    return keys & allowed[None, None]


def attend(q, k, v, padding_mask, *, causal: bool, sliding_window: int | None = None, kernel: str = "xla"):
    """q [B,L,H,D], k/v [B,L,KV,D] (grouped heads broadcast) -> [B,L,H,D]."""
    if kernel == "xla":
        mask = attention_mask_4d(padding_mask, causal, sliding_window)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    if kernel == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"the cudnn attention kernel needs an NVIDIA GPU; this backend is "
                             f"{jax.default_backend()!r}: use kernel='xla'")
        lengths = padding_mask.sum(-1).astype(jnp.int32)
        window = None if (sliding_window is None or not causal) else (sliding_window - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
            local_window_size=window, implementation="cudnn")
    raise ValueError(f"unknown attention kernel {kernel!r}; choose one of {KERNELS}")
