"""Contrastive losses of the recipe, over the GLOBAL batch.

Called inside `jax.jit` on arrays sharded over the data axis, the similarity matrix is a global
computation: every query is scored against every device's documents without hand-written gathers.

- `in_batch_info_nce`: logits = cos(q, [all positives; all hard negatives]) * scale, cross-entropy
  against each query's own positive (llm2vec's HardNegativeNLLLoss; scale 50 = temperature 0.02).
- `per_query_negatives_loss`: the instruction-following recipe: dot product / sqrt(d) against the
  query's own positive and its k negatives only (no in-batch negatives).
Both return the mean loss and the accuracy (the positive ranked first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

SCALE = 50.0  # the recipe's cosine scale: temperature 0.02


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _mean_ce(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
    return {"loss": loss, "accuracy": accuracy}


def in_batch_info_nce(q: jax.Array, pos: jax.Array, neg: jax.Array | None = None, *,
                      scale: float = SCALE) -> dict[str, jax.Array]:
    """q, pos [B, D]; neg [B*, D] or None -> {'loss', 'accuracy'} (float32)."""
    q, pos = q.astype(jnp.float32), pos.astype(jnp.float32)
    docs = pos if neg is None else jnp.concatenate([pos, neg.astype(jnp.float32)], axis=0)
    logits = _normalize(q) @ _normalize(docs).T * scale
    return _mean_ce(logits, jnp.arange(q.shape[0]))


def per_query_negatives_loss(q: jax.Array, pos: jax.Array, negs: jax.Array) -> dict[str, jax.Array]:
    """q, pos [B, D]; negs [B, k, D] -> {'loss', 'accuracy'}; scores are q.d / sqrt(D)."""
    q, pos, negs = (x.astype(jnp.float32) for x in (q, pos, negs))
    docs = jnp.concatenate([pos[:, None, :], negs], axis=1)  # [B, 1+k, D]
    logits = jnp.einsum("bd,bkd->bk", q, docs) / jnp.sqrt(jnp.float32(q.shape[-1]))
    return _mean_ce(logits, jnp.zeros(q.shape[0], jnp.int32))
