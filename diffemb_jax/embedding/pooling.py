"""Pooling of hidden states into one vector per text, padding-side agnostic (masks, not positions).

mean and weighted_mean follow llm2vec: the tokens pooled are the real tokens, or with
skip_instruction only the embed_mask tokens; weighted_mean weighs the k-th pooled token by k.
last_token takes the last real token.

One entry point, `pool`; the layout is in the data, each token's text number (`segment_ids`, 0 for
pads): one text a row (numbers in {0, 1}) gives [rows, D]; texts numbered 1..k within each row
(`texts_per_row=k`, the Embedder's packed rows) give [rows, k, D]; texts numbered 1..n across all
rows (`texts=n`, the train step's global batch) give [n, D]. The first two weigh a row's tokens
(dense: a product over the row), the third sums by number (segment sums), so its output is as large
as the texts, whatever the rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffemb_jax.errors import ConfigError

POOLING_MODES = ("mean", "weighted_mean", "last_token")


def pool(hidden: jax.Array, segment_ids: jax.Array, embed_mask: jax.Array, mode: str = "mean",
         skip_instruction: bool = False, *, texts_per_row: int | None = None, texts: int | None = None) -> jax.Array:
    """hidden [R, L, D] -> float32 vectors of the texts that `segment_ids` [R, L] number: [R, D] (one
    text a row), [R, texts_per_row, D] (text k of row r at [r, k - 1]) or [texts, D] (text t at
    t - 1; a text's tokens lie one after another in one row, zeros for a number no token holds)."""
    if texts_per_row is not None and texts is not None:
        raise ValueError("texts are numbered within each row (texts_per_row) or across rows (texts), not both")
    if mode not in POOLING_MODES:
        raise ConfigError(f"unknown pooling {mode!r}; choose one of {POOLING_MODES}")
    if texts is not None:
        return _pool_by_number(hidden, segment_ids, embed_mask, texts, mode, skip_instruction)
    if texts_per_row is None:
        return _pool_rows(hidden, segment_ids > 0, embed_mask, mode, skip_instruction)
    numbers = jnp.arange(1, texts_per_row + 1, dtype=segment_ids.dtype)
    each = segment_ids[:, None, :] == numbers[None, :, None]  # [R, texts_per_row, L]
    one = lambda real: _pool_rows(hidden, real, embed_mask, mode, skip_instruction)  # noqa: E731
    return jax.vmap(one, in_axes=1, out_axes=1)(each)


def _pool_rows(hidden: jax.Array, real: jax.Array, embed_mask: jax.Array, mode: str, skip_instruction: bool):
    """hidden [B, L, D], the text's tokens `real` [B, L] -> [B, D] float32."""
    hidden = hidden.astype(jnp.float32)
    real = real.astype(jnp.float32)
    if mode == "last_token":
        length = real.shape[-1]
        last = length - 1 - jnp.argmax(real[:, ::-1], axis=-1)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    mask = real * embed_mask.astype(jnp.float32) if skip_instruction else real
    weights = mask if mode == "mean" else jnp.cumsum(mask, axis=-1) * mask
    weights = weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-9)
    return jnp.einsum("bl,bld->bd", weights, hidden)


def _pool_by_number(hidden: jax.Array, segment_ids: jax.Array, embed_mask: jax.Array, texts: int, mode: str,
                    skip_instruction: bool) -> jax.Array:
    """hidden [R, L, D] of rows holding texts numbered 1..texts across all rows -> [texts, D] float32,
    each text pooled as _pool_rows pools it, by segment sums over the tokens."""
    hidden = hidden.astype(jnp.float32)
    flat = hidden.reshape(-1, hidden.shape[-1])
    real = segment_ids > 0
    text = jnp.where(real, segment_ids - 1, texts).reshape(-1)  # pads to one more number, dropped
    buckets = texts + 1
    if mode == "last_token":
        token = jnp.where(real.reshape(-1), jnp.arange(text.shape[0]), -1)
        last = jax.ops.segment_max(token, text, buckets)[:texts]
        return jnp.where((last >= 0)[:, None], flat[jnp.maximum(last, 0)], 0.0)
    mask = (real & (embed_mask > 0) if skip_instruction else real).astype(jnp.float32)
    if mode == "mean":
        weights = mask.reshape(-1)
    else:  # weighted_mean: the k-th pooled token of its text weighs k
        counted = jnp.cumsum(mask, axis=-1).reshape(-1)  # along the row, across its texts
        before = jax.ops.segment_min(counted - mask.reshape(-1), text, buckets)  # pooled before the text
        weights = (counted - before[text]) * mask.reshape(-1)
    weights = weights / jnp.maximum(jax.ops.segment_sum(weights, text, buckets)[text], 1e-9)
    return jax.ops.segment_sum(weights[:, None] * flat, text, buckets)[:texts]


def l2_normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
