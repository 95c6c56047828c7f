"""Pooling of hidden states into one vector per text, padding-side agnostic (masks, not positions).

mean and weighted_mean follow llm2vec: the tokens pooled are the real tokens, or with
skip_instruction only the embed_mask tokens; weighted_mean weighs the k-th pooled token by k.
last_token takes the last real token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLING_MODES = ("mean", "weighted_mean", "last_token")


def pool(hidden: jax.Array, padding_mask: jax.Array, embed_mask: jax.Array, mode: str = "mean",
         skip_instruction: bool = False) -> jax.Array:
    """hidden [B, L, D] -> [B, D] float32."""
    hidden = hidden.astype(jnp.float32)
    padding_mask = padding_mask.astype(jnp.float32)
    if mode == "last_token":
        length = padding_mask.shape[-1]
        last = length - 1 - jnp.argmax(padding_mask[:, ::-1], axis=-1)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    mask = padding_mask * embed_mask.astype(jnp.float32) if skip_instruction else padding_mask
    if mode == "mean":
        weights = mask
    elif mode == "weighted_mean":
        weights = jnp.cumsum(mask, axis=-1) * mask
    else:
        raise ValueError(f"unknown pooling {mode!r}; choose one of {POOLING_MODES}")
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-9)
    return jnp.einsum("bl,bld->bd", weights, hidden)


def pool_packed(hidden: jax.Array, segments: jax.Array, embed_mask: jax.Array, max_texts: int, mode: str = "mean",
                skip_instruction: bool = False) -> jax.Array:
    """hidden [B, L, D] of rows packed with texts (segments: each token's text number 1..max_texts,
    0 for pads) -> [B, max_texts, D] float32: text k of row b at [b, k - 1], zeros where a row holds
    fewer texts. Each text is pooled by `pool` over its own tokens."""
    texts = (segments[:, None, :] == jnp.arange(1, max_texts + 1, dtype=segments.dtype)[None, :, None])
    one = lambda mask: pool(hidden, mask.astype(jnp.int32), embed_mask, mode, skip_instruction)  # noqa: E731
    return jax.vmap(one, in_axes=1, out_axes=1)(texts)


def pool_texts(hidden: jax.Array, segments: jax.Array, embed_mask: jax.Array, num_texts: int, mode: str = "mean",
               skip_instruction: bool = False) -> jax.Array:
    """hidden [R, L, D] of rows holding texts numbered across all rows (segments: each token's text
    number 1..num_texts, 0 for pads; a text's tokens lie one after another in one row) ->
    [num_texts, D] float32, text t at t - 1 (zeros for a number no row holds). Each text is pooled as
    `pool` pools it. Sums over tokens by text number (segment sums), so the output is as large as
    the texts, whatever the rows: the train step's global batch, however its texts are packed."""
    hidden = hidden.astype(jnp.float32)
    flat = hidden.reshape(-1, hidden.shape[-1])
    real = segments > 0
    text = jnp.where(real, segments - 1, num_texts).reshape(-1)  # pads to one more number, dropped
    buckets = num_texts + 1
    if mode == "last_token":
        token = jnp.where(real.reshape(-1), jnp.arange(text.shape[0]), -1)
        last = jax.ops.segment_max(token, text, buckets)[:num_texts]
        return jnp.where((last >= 0)[:, None], flat[jnp.maximum(last, 0)], 0.0)
    mask = (real & (embed_mask > 0) if skip_instruction else real).astype(jnp.float32)
    if mode == "mean":
        weights = mask.reshape(-1)
    elif mode == "weighted_mean":  # the k-th pooled token of its text weighs k
        counted = jnp.cumsum(mask, axis=-1).reshape(-1)  # along the row, across its texts
        before = jax.ops.segment_min(counted - mask.reshape(-1), text, buckets)  # pooled before the text
        weights = (counted - before[text]) * mask.reshape(-1)
    else:
        raise ValueError(f"unknown pooling {mode!r}; choose one of {POOLING_MODES}")
    weights = weights / jnp.maximum(jax.ops.segment_sum(weights, text, buckets)[text], 1e-9)
    return jax.ops.segment_sum(weights[:, None] * flat, text, buckets)[:num_texts]


def l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
