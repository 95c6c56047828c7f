"""One contrastive train step: embeddings -> loss over the global batch -> LoRA gradients -> AdamW.

The batch is the global batch's texts packed into rows (batching/step.py): one pass of the model
over all of them, then each text pooled by its number into [texts, D], where queries, positives and
negatives lie at fixed places.

The model is split into LoRA parameters (trained) and everything else (frozen), so only adapters
carry gradients and optimizer state. LoRA dropout masks come from a key derived from (seed, step):
no RNG state to carry, and a resumed run draws the very masks the uninterrupted one drew. With
`grad_cache_chunk` set, the step follows GradCache (Gao et al., 2021): embed every chunk without
gradients, take the loss and its gradient with respect to the embeddings over the whole batch, then
re-embed each chunk with that cached gradient as the cotangent. A chunk takes every n-th row (each
batch shard gives it its share) and the chunks run as a lax.scan (compiled once); a chunk's
embeddings are [texts, D] with zeros for the texts it does not hold, so they add up to the batch's.
Activations of one chunk are live at a time, and loss and gradients equal the plain step's.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from diffemb_jax.embedding.pooling import pool
from diffemb_jax.errors import ConfigError
from diffemb_jax.model import ForwardOptions
from diffemb_jax.training.loss import check_matryoshka, in_batch_info_nce, matryoshka_loss, per_query_negatives_loss

LOSSES = ("in_batch", "per_query")
STATIC = ("packed", "texts_per_row")  # the train step's static arguments: a batch's layout


@dataclasses.dataclass(frozen=True)
class StepConfig:
    batch_size: int  # queries in the global batch
    loss: str = "in_batch"  # in_batch: cos * scale over all documents; per_query: dot / sqrt(d), own negatives
    scale: float = 50.0
    num_negatives: int = 1
    pooling: str = "mean"
    skip_instruction: bool = False
    grad_cache_chunk: int = 0  # rows per chunk; 0 = plain step
    seed: int = 0  # for LoRA dropout masks
    packed: bool = True  # rows may hold several texts; False: one a row (cuDNN then takes lengths, not runs)
    # The most texts a packed row holds, or a bound of it (0: the step's texts): cuDNN sizes its list of a
    # row's texts by it (model/attention.py), so the trainer gives it the step's own, rounded up.
    texts_per_row: int = 0
    forward: ForwardOptions = ForwardOptions()  # attention mode, kernel and remat of the model's passes
    matryoshka_dims: tuple[int, ...] = ()  # nested dimensions: the loss summed over prefixes; () = off
    matryoshka_weights: tuple[float, ...] = ()  # one a dimension; () = all 1

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ConfigError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.matryoshka_dims or self.matryoshka_weights:
            check_matryoshka(self.matryoshka_dims, self.matryoshka_weights)

    @property
    def num_texts(self) -> int:
        return self.batch_size * (2 + self.num_negatives)

    @property
    def row_texts(self) -> int:
        """The most texts a row of this layout holds (1: one text a row)."""
        if not self.packed:
            return 1
        return max(min(self.texts_per_row or self.num_texts, self.num_texts), 2)


def split_model(model):
    """(graphdef, lora, frozen): the LoRA parameters and everything else, as nnx.States."""
    return nnx.split(model, nnx.LoRAParam, ...)


def _embed(graphdef, lora, frozen, rows: dict, cfg: StepConfig, key: jax.Array) -> jax.Array:
    """[texts, D]: the texts the rows hold, pooled, at their numbers; zeros for the others."""
    model = nnx.merge(graphdef, lora, frozen)
    segment_ids = rows["segments"] if cfg.packed else (rows["segments"] > 0).astype(jnp.int32)  # one text a row
    hidden = model(rows["input_ids"], segment_ids, cfg.forward, texts_per_row=cfg.row_texts, dropout_key=key)
    return pool(hidden, rows["segments"], rows["embed_mask"], cfg.pooling, cfg.skip_instruction, texts=cfg.num_texts)


def contrastive_loss(vectors, cfg: StepConfig) -> dict[str, jax.Array]:
    """The loss of the embedded texts, [texts, D] in their numbers' order; with matryoshka_dims, the
    weighted sum of that loss over the vectors' first d components, each d (loss.py matryoshka_loss)."""
    g = cfg.batch_size
    q, p, n = vectors[:g], vectors[g : 2 * g], vectors[2 * g :]

    def loss(q, p, n):
        if cfg.loss == "in_batch":
            return in_batch_info_nce(q, p, n, scale=cfg.scale)
        return per_query_negatives_loss(q, p, n.reshape(g, cfg.num_negatives, q.shape[-1]))

    if not cfg.matryoshka_dims:
        return loss(q, p, n)
    return matryoshka_loss(loss, (q, p, n), cfg.matryoshka_dims, cfg.matryoshka_weights)


def loss_and_grads(graphdef, lora, frozen, batch: dict, cfg: StepConfig, key: jax.Array):
    """(metrics, LoRA gradients); metrics hold 'loss' and 'accuracy'."""
    if cfg.grad_cache_chunk:
        return _grad_cache(graphdef, lora, frozen, batch, cfg, key)

    def objective(lora):
        metrics = contrastive_loss(_embed(graphdef, lora, frozen, batch, cfg, jax.random.fold_in(key, 0)), cfg)
        return metrics["loss"], metrics

    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(lora)
    return metrics, grads


def _grad_cache(graphdef, lora, frozen, batch, cfg, key):
    """GradCache in chunks of cfg.grad_cache_chunk rows. Chunk i holds rows i, i + n, i + 2n, ... (n
    chunks of that size; the rows past them, if any, make one more), so that every batch shard gives
    each chunk its share of rows. The n chunks run as a lax.scan: one chunk's program, compiled once
    however many chunks there are."""
    size = cfg.grad_cache_chunk
    rows = batch["input_ids"].shape[0]
    n = rows // size
    strided = jax.tree.map(lambda v: v[: n * size].reshape(size, n, *v.shape[1:]).swapaxes(0, 1), batch)
    tail = jax.tree.map(lambda v: v[n * size :], batch) if rows % size else None
    still = jax.lax.stop_gradient(lora)

    def embed(lora, chunk, i):
        return _embed(graphdef, lora, frozen, chunk, cfg, jax.random.fold_in(key, i))

    def forward(total, chunk_and_index):  # 1. embed every chunk without gradients
        return total + jax.lax.stop_gradient(embed(still, *chunk_and_index)), None

    shape = jax.eval_shape(embed, still, tail if n == 0 else jax.tree.map(lambda v: v[0], strided), 0)
    vectors, _ = jax.lax.scan(forward, jnp.zeros(shape.shape, shape.dtype), (strided, jnp.arange(n)))
    if tail is not None:
        vectors, _ = forward(vectors, (tail, n))

    def objective(vectors):  # 2. loss and its gradient with respect to the embeddings
        metrics = contrastive_loss(vectors, cfg)
        return metrics["loss"], metrics

    (_, metrics), cached = jax.value_and_grad(objective, has_aux=True)(vectors)

    def backward(grads, chunk_and_index):  # 3. re-embed each chunk (the same dropout masks), cached cotangent
        _, vjp = jax.vjp(lambda lora: embed(lora, *chunk_and_index), lora)
        return jax.tree.map(jnp.add, grads, vjp(cached)[0]), None

    grads, _ = jax.lax.scan(backward, jax.tree.map(jnp.zeros_like, lora), (strided, jnp.arange(n)))
    if tail is not None:
        grads, _ = backward(grads, (tail, n))
    return metrics, grads


def make_optimizer(lr: float, warmup_steps: int, total_steps: int, grad_clip: float = 1.0,
                   weight_decay: float = 0.0, schedule: str = "linear",
                   decay_steps: int = 0) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW after global-norm clipping. schedule "linear": linear warm-up to lr, then linear decay to 0
    at `decay_steps` (0: total_steps), HF's "linear"; "constant": lr from the first step, HF's
    "constant", which has no warm-up."""
    if schedule == "constant":
        schedule = optax.constant_schedule(lr)
    elif schedule == "linear":
        warmup = optax.linear_schedule(0.0, lr, max(warmup_steps, 1))
        decay = optax.linear_schedule(lr, 0.0, max((decay_steps or total_steps) - warmup_steps, 1))
        schedule = optax.join_schedules([warmup, decay], [warmup_steps])
    else:
        raise ConfigError(f"train.schedule must be linear or constant, got {schedule!r}")
    tx = optax.chain(optax.clip_by_global_norm(grad_clip), optax.adamw(schedule, weight_decay=weight_decay))
    return tx, schedule


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, cfg: StepConfig, out_shardings=None):
    """jit-compiled (lora, opt_state, frozen, step, batch, packed=None, texts_per_row=None) -> (lora,
    opt_state, metrics).

    `packed` (static; None: cfg.packed) says whether this batch's rows hold several texts: the trainer
    lays a step one text a row where packing saves no rows (batching.packs), whatever cfg.packed says.
    `texts_per_row` (static; None: cfg's) bounds the texts a packed row holds (StepConfig).
    `out_shardings` (a prefix of the outputs) pins updated parameters and moments to where they came
    from; left to GSPMD, they may come back laid out otherwise, and the next step compiles again.

    A non-finite loss or gradient norm leaves parameters and optimizer state as they were, so the
    caller can stop and save the last good state.
    """

    def step_fn(lora, opt_state, frozen, step, batch, packed=None, texts_per_row=None):
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        layout = dataclasses.replace(cfg, packed=cfg.packed if packed is None else packed,
                                     texts_per_row=cfg.texts_per_row if texts_per_row is None else texts_per_row)
        metrics, grads = loss_and_grads(graphdef, lora, frozen, batch, layout, key)
        updates, new_opt = tx.update(grads, opt_state, lora)
        new_lora = optax.apply_updates(lora, updates)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)  # a NaN gradient can come with a finite loss
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(step)}
        return keep(new_lora, lora), keep(new_opt, opt_state), metrics

    if out_shardings is None:
        return jax.jit(step_fn, donate_argnums=(0, 1), static_argnames=STATIC)
    return jax.jit(step_fn, donate_argnums=(0, 1), static_argnames=STATIC, out_shardings=out_shardings)


def placed_train_step(graphdef, lora, tx: optax.GradientTransformation, schedule, cfg: StepConfig, mesh):
    """(lora, opt_state, train_step): the adapters and their optimizer state placed on `mesh` (each
    where apply_lora made it, beside its base kernel; anything else replicated), and the step compiled to
    keep them there."""
    lora, opt_state, out_shardings = placed_with_optimizer(lora, tx, mesh)
    return lora, opt_state, make_train_step(graphdef, tx, schedule, cfg, out_shardings=out_shardings)


def placed_with_optimizer(params, tx: optax.GradientTransformation, mesh):
    """(params, opt_state, out_shardings): trained parameters and their optimizer state on `mesh`, each
    where it was made (anything else replicated), and the shardings a step returning (params,
    opt_state, metrics) keeps them in."""
    opt_state = tx.init(params)  # eager: zeros_like keeps each parameter's sharding
    replicated = NamedSharding(mesh, P())
    placement = jax.tree.map(lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated,
                             (params, opt_state))
    params, opt_state = jax.device_put((params, opt_state), placement)
    return params, opt_state, (*placement, replicated)


def batch_tokens(batch: dict[str, Any]) -> int:
    """The real tokens of a packed batch."""
    return int((batch["segments"] > 0).sum())
