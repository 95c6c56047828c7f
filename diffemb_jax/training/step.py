"""One contrastive train step: embeddings -> loss over the global batch -> LoRA gradients -> AdamW.

The model is split into LoRA parameters (trained) and everything else (frozen), so only adapters
carry gradients and optimizer state. LoRA dropout masks come from a key derived from (seed, step):
no RNG state to carry, and a resumed run draws the very masks the uninterrupted one drew. With
`grad_cache_chunk` set, the step follows GradCache (Gao et al., 2021): embed every chunk without
gradients, take the loss and its gradient with respect to the embeddings over the whole batch, then
re-embed each chunk with that cached gradient as the cotangent. Activations of one chunk are live at
a time, and loss and gradients equal the plain step's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from diffemb_jax.embedding.pooling import pool
from diffemb_jax.training.lora import set_dropout_key
from diffemb_jax.training.loss import in_batch_info_nce, per_query_negatives_loss

SIDES = ("query", "positive", "negative")
LOSSES = ("in_batch", "per_query")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    loss: str = "in_batch"  # in_batch: cos * scale over all documents; per_query: dot / sqrt(d), own negatives
    scale: float = 50.0
    num_negatives: int = 1
    pooling: str = "mean"
    skip_instruction: bool = False
    grad_cache_chunk: int = 0  # rows per chunk; 0 = plain step
    seed: int = 0  # for LoRA dropout masks

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")


def split_model(model):
    """(graphdef, lora, frozen): the LoRA parameters and everything else, as nnx.States."""
    return nnx.split(model, nnx.LoRAParam, ...)


def _embed(graphdef, lora, frozen, side: dict, cfg: StepConfig, key: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, lora, frozen)
    set_dropout_key(model, key)
    hidden = model(side["input_ids"], side["padding_mask"])
    return pool(hidden, side["padding_mask"], side["embed_mask"], cfg.pooling, cfg.skip_instruction)


def contrastive_loss(q, p, n, cfg: StepConfig) -> dict[str, jax.Array]:
    if cfg.loss == "in_batch":
        return in_batch_info_nce(q, p, n, scale=cfg.scale)
    return per_query_negatives_loss(q, p, n.reshape(q.shape[0], cfg.num_negatives, q.shape[-1]))


def loss_and_grads(graphdef, lora, frozen, batch: dict, cfg: StepConfig, key: jax.Array):
    """(metrics, LoRA gradients); metrics hold 'loss' and 'accuracy'."""
    if cfg.grad_cache_chunk:
        return _grad_cache(graphdef, lora, frozen, batch, cfg, key)

    def objective(lora):
        metrics = contrastive_loss(*_embed_sides(graphdef, lora, frozen, batch, cfg, key), cfg)
        return metrics["loss"], metrics

    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(lora)
    return metrics, grads


def _embed_sides(graphdef, lora, frozen, batch: dict, cfg: StepConfig, key: jax.Array):
    """(queries, positives, negatives) embedded; positives and negatives of one length go through the
    model as one batch: a third less program to compile, and larger matrix products."""
    pos, neg = batch["positive"], batch["negative"]
    q = _embed(graphdef, lora, frozen, batch["query"], cfg, jax.random.fold_in(key, 0))
    if pos["input_ids"].shape[1] != neg["input_ids"].shape[1]:
        return q, *(_embed(graphdef, lora, frozen, batch[side], cfg, jax.random.fold_in(key, i))
                    for i, side in enumerate(SIDES[1:], 1))
    docs = {k: jnp.concatenate([pos[k], neg[k]]) for k in pos}
    vectors = _embed(graphdef, lora, frozen, docs, cfg, jax.random.fold_in(key, 1))
    return q, vectors[: pos["input_ids"].shape[0]], vectors[pos["input_ids"].shape[0] :]


def _chunks(side: dict, size: int) -> list[dict]:
    rows = side["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in side.items()} for i in range(0, rows, size)]


def _grad_cache(graphdef, lora, frozen, batch, cfg, key):
    plan = [(side, chunk) for side in SIDES for chunk in _chunks(batch[side], cfg.grad_cache_chunk)]
    keys = [jax.random.fold_in(key, i) for i in range(len(plan))]
    pieces = {side: [] for side in SIDES}
    for (side, chunk), chunk_key in zip(plan, keys):  # 1. embed every chunk without gradients
        vectors = _embed(graphdef, jax.lax.stop_gradient(lora), frozen, chunk, cfg, chunk_key)
        pieces[side].append(jax.lax.stop_gradient(vectors))
    vectors = [jnp.concatenate(pieces[side]) for side in SIDES]

    def objective(q, p, n):  # 2. loss and its gradient with respect to the embeddings
        metrics = contrastive_loss(q, p, n, cfg)
        return metrics["loss"], metrics

    (_, metrics), cached = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(*vectors)
    cached = dict(zip(SIDES, cached))
    grads, offsets = jax.tree.map(jnp.zeros_like, lora), {side: 0 for side in SIDES}
    for (side, chunk), chunk_key in zip(plan, keys):  # 3. re-embed each chunk, same dropout masks
        rows = chunk["input_ids"].shape[0]
        cotangent = cached[side][offsets[side] : offsets[side] + rows]
        offsets[side] += rows
        _, vjp = jax.vjp(lambda l: _embed(graphdef, l, frozen, chunk, cfg, chunk_key), lora)
        grads = jax.tree.map(jnp.add, grads, vjp(cotangent)[0])
    return metrics, grads


def make_optimizer(lr: float, warmup_steps: int, total_steps: int, grad_clip: float = 1.0,
                   weight_decay: float = 0.0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after global-norm clipping; linear warm-up to lr, then linear decay to 0 (the HF schedule)."""
    warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
    decay = optax.linear_schedule(lr, 0.0, max(total_steps - warmup_steps, 1))
    schedule = optax.join_schedules([warmup, decay], [warmup_steps])
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), optax.adamw(schedule, weight_decay=weight_decay))
    return tx, schedule


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, cfg: StepConfig, out_shardings=None):
    """jit-compiled (lora, opt_state, frozen, step, batch) -> (lora, opt_state, metrics).

    `out_shardings` (a prefix of the outputs) pins updated parameters and moments to where they came
    from; left to GSPMD, they may come back laid out otherwise, and the next step compiles again.

    A non-finite loss leaves parameters and optimizer state as they were, so the caller can stop and
    save the last good state.
    """

    def step_fn(lora, opt_state, frozen, step, batch):
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        metrics, grads = loss_and_grads(graphdef, lora, frozen, batch, cfg, key)
        updates, new_opt = tx.update(grads, opt_state, lora)
        new_lora = optax.apply_updates(lora, updates)
        ok = jnp.isfinite(metrics["loss"])
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": schedule(step)}
        return keep(new_lora, lora), keep(new_opt, opt_state), metrics

    if out_shardings is None:
        return jax.jit(step_fn, donate_argnums=(0, 1))
    return jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=out_shardings)


def batch_tokens(batch: dict[str, Any]) -> int:
    return int(sum(batch[side]["padding_mask"].sum() for side in SIDES))
