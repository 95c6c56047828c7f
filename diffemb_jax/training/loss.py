"""Contrastive losses of the recipe, over the GLOBAL batch.

Called inside `jax.jit` on arrays sharded over the data axis, the similarity matrix is a global
computation: every query is scored against every device's documents without hand-written gathers.

- `in_batch_info_nce`: logits = cos(q, [all positives; all hard negatives]) * scale, cross-entropy
  against each query's own positive (llm2vec's HardNegativeNLLLoss; scale 50 = temperature 0.02).
- `per_query_negatives_loss`: the instruction-following recipe: dot product / sqrt(d) against the
  query's own positive and its k negatives only (no in-batch negatives).
Both return the mean loss and the accuracy (the positive ranked first).
- `matryoshka_loss`: Matryoshka representation learning (Kusupati et al., 2022; sentence-transformers'
  MatryoshkaLoss): the weighted sum of a loss over the embeddings cut to their first d components,
  for each d of a few nested dimensions, so that a prefix of the vector is an embedding of its own.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from diffemb_jax.errors import ConfigError

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


def matryoshka_loss(loss: Callable[..., dict[str, jax.Array]], vectors: Sequence[jax.Array], dims: Sequence[int],
                    weights: Sequence[float] | None = None) -> dict[str, jax.Array]:
    """sum over d in dims of weight_d * loss(*(v[..., :d] for v in vectors))['loss'].

    `loss` sees only the first d components, so a cosine loss re-normalises them and a dot / sqrt(d)
    loss divides by the truncated sqrt(d). -> {'loss': the weighted sum, 'accuracy': that of the
    largest d, and 'loss_dim{d}', 'accuracy_dim{d}' of each d}. Weights default to 1.
    """
    weights = tuple(weights) if weights else (1.0,) * len(dims)
    width = vectors[0].shape[-1]
    check_matryoshka(dims, weights, width)
    metrics, total = {}, jnp.float32(0.0)
    for d, w in zip(dims, weights):
        m = loss(*(v[..., :d] for v in vectors))
        total = total + jnp.float32(w) * m["loss"]
        metrics[f"loss_dim{d}"], metrics[f"accuracy_dim{d}"] = m["loss"], m["accuracy"]
    return {"loss": total, "accuracy": metrics[f"accuracy_dim{max(dims)}"], **metrics}


def check_matryoshka(dims: Sequence[int], weights: Sequence[float] = (), width: int | None = None) -> None:
    """ValueError unless dims are distinct positive ints (at most `width`, the embedding size, when
    given) and weights are none (all 1) or one a dimension."""
    where = "loss.matryoshka_dims"
    if not dims:
        raise ConfigError(f"{where} is empty: give one or more embedding dimensions, e.g. (64, 128, 256)")
    if any(not isinstance(d, numbers.Integral) or isinstance(d, bool) or d < 1 for d in dims):
        raise ConfigError(f"{where}={tuple(dims)}: every dimension must be a positive integer")
    if len(set(dims)) != len(dims):
        raise ConfigError(f"{where}={tuple(dims)}: each dimension may appear once")
    if width is not None and max(dims) > width:
        raise ConfigError(f"{where}={tuple(dims)}: {max(dims)} exceeds the model's embedding size {width}; "
                         f"give dimensions of at most {width}")
    if weights and len(weights) != len(dims):
        raise ConfigError(f"loss.matryoshka_weights={tuple(weights)} has {len(weights)} weights for the "
                         f"{len(dims)} dimensions of {where}={tuple(dims)}: give one a dimension, or none (all 1)")
