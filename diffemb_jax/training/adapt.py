"""`diffemb adapt`: make an autoregressive decoder bidirectional by continued pre-training on masked
tokens (training/masked_lm.py), the step before contrastive training that the paper credits for
DiffEmbed's lead (Dream is Qwen2.5 adapted so).

Everything a long run needs is the trainer's: the same mesh and placement, AdamW with warm-up and
decay, orbax checkpoints (keep-N, async) and exact resume (the data are served by step number and
the masks drawn from (seed, step)), metrics.jsonl and TensorBoard, a progress bar, and a stop on a
non-finite loss or gradient that keeps the last good state. Full-parameter (lora.rank=0) or LoRA.
The model gets a mask token where it has none (a new row of the embedding, tokenizer.json and
ModelConfig.mask_token_id). After the last step the adapted model is written as a converted
directory, WORKDIR/model (LoRA merged in), which `diffemb encode|train|evaluate|export` take as is.
Held-out text (`data.eval_files`) is scored before the first and after the last step: loss and
masked-token accuracy under the same masks both times.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tokenizers
from flax import nnx
from tqdm.auto import tqdm

from diffemb_jax import parallel
from diffemb_jax.checkpoints import load_model
from diffemb_jax.checkpoints.checkpoint import save_converted
from diffemb_jax.errors import ConfigError, MissingPathError, UserError
from diffemb_jax.model import Decoder, ForwardOptions
from diffemb_jax.model.lora import LoraConfig, apply_lora, merge_lora
from diffemb_jax.model.vocab import with_vocab_rows
from diffemb_jax.training.config import check_choices
from diffemb_jax.training.masked_lm import OBJECTIVES, corrupt, masked_lm_loss
from diffemb_jax.training.step import make_optimizer, placed_with_optimizer
from diffemb_jax.training.text_blocks import BlockBatches, build_blocks
from diffemb_jax.training.trainer import MetricsLog, TrainingDiverged

log = logging.getLogger(__name__)
MODEL_DIR = "model"  # WORKDIR/model: the adapted model, a converted directory
EVAL_SEED = 1234  # the held-out masks: the same before and after


def with_mask_token(model: Decoder, tokenizer: tokenizers.Tokenizer, token: str) -> tuple[Decoder, int]:
    """(model, mask id): the model's own mask token (Dream, LLaDA), else `token`, added to the
    tokenizer (in place) and, past the embedding's rows, to the model as a new row."""
    if model.cfg.mask_token_id is not None:
        return model, model.cfg.mask_token_id
    mask_id = tokenizer.token_to_id(token)
    if mask_id is None:
        tokenizer.add_special_tokens([tokenizers.AddedToken(token, special=True, normalized=False)])
        mask_id = tokenizer.token_to_id(token)
        log.info("added the mask token %r to the vocabulary as id %d", token, mask_id)
    return with_vocab_rows(model, max(model.cfg.vocab_size, mask_id + 1), mask_token_id=mask_id), mask_id


def check_adapt_config(config) -> None:
    check_choices(config)
    if not config.model.path:
        raise ConfigError("config.model.path is empty: set --config.model.path=MODEL (converted dir, HF dir or .gguf)")
    if config.objective.kind not in OBJECTIVES:
        raise ConfigError(f"config.objective.kind must be one of {OBJECTIVES}, got {config.objective.kind!r}")
    if not 0 < config.objective.eps < 1 or not 0 < config.objective.ratio < 1:
        raise ConfigError(f"config.objective.eps and .ratio must lie in (0, 1), got {config.objective.eps} and "
                         f"{config.objective.ratio}")
    if config.lora.rank < 0:
        raise ConfigError(f"config.lora.rank must be >= 0 (0: full-parameter), got {config.lora.rank}")
    data_shards, fsdp, _ = parallel.mesh_shape(**config.mesh)
    if config.train.global_batch_size % (data_shards * fsdp):
        raise ConfigError(f"train.global_batch_size={config.train.global_batch_size} is not divisible by the "
                         f"{data_shards * fsdp} batch shards of mesh {dict(config.mesh)}")
    for f in (*config.data.files, *config.data.eval_files):
        if not Path(f).is_file():
            raise MissingPathError(f"config.data: {f} does not exist")


def _lora(config) -> LoraConfig:
    return LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                      targets=config.lora.targets)


def make_adapt_step(graphdef, tx, schedule, config, mask_id: int, vocab: int, out_shardings, texts_per_row: int):
    """jit-compiled (params, opt_state, frozen, step, batch) -> (params, opt_state, metrics); a
    non-finite loss or gradient norm leaves parameters and optimizer state as they were. `texts_per_row`:
    the most pieces a row of the data holds."""
    loss_of = _loss_fn(graphdef, config, mask_id, vocab, texts_per_row)

    def step_fn(params, opt_state, frozen, step, batch):
        key = jax.random.fold_in(jax.random.key(config.train.seed), step)
        (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params, frozen, batch, key)
        updates, new_opt = tx.update(grads, opt_state, params)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(step)}
        return keep(optax.apply_updates(params, updates), params), keep(new_opt, opt_state), metrics

    return jax.jit(step_fn, donate_argnums=(0, 1), out_shardings=out_shardings)


def _loss_fn(graphdef, config, mask_id: int, vocab: int, texts_per_row: int):
    o = config.objective
    options = ForwardOptions(attention=config.model.attention, kernel=config.model.kernel, remat=config.train.remat)

    def loss_of(params, frozen, batch, key):
        noise_key, dropout_key = jax.random.split(key)
        ids, segments = batch["input_ids"], batch["segments"]
        noisy, masked, weight = corrupt(noise_key, ids, segments, objective=o.kind, mask_id=mask_id, vocab=vocab,
                                        eps=o.eps, ratio=o.ratio)
        model = nnx.merge(graphdef, params, frozen)
        logits = model.logits(model(noisy, segments, options, texts_per_row=texts_per_row, dropout_key=dropout_key))
        metrics = masked_lm_loss(logits, ids, masked, weight, segments, objective=o.kind)
        return metrics["loss"], metrics

    return loss_of


class Adaptation:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True):
        check_adapt_config(config)
        self.config, self.workdir, self.progress = config, Path(workdir), progress
        self.lead = jax.process_index() == 0
        if self.lead:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        self.mesh = parallel.make_mesh(**config.mesh)
        sharding_for = parallel.param_sharding(self.mesh)
        model, self.tokenizer = load_model(config.model.path, dtype=config.model.dtype, sharding_for=sharding_for)
        model, self.mask_id = with_mask_token(model, self.tokenizer, config.objective.mask_token)
        graphdef, state = nnx.split(model)  # placed anew: a grown embedding was made off the mesh
        shardings = jax.tree.map(lambda s: s.sharding, parallel.placed_shapes(state, sharding_for))
        nnx.replace_by_pure_dict(state, jax.device_put(state.to_pure_dict(), shardings))
        model = nnx.merge(graphdef, state)
        if config.lora.rank:
            model = apply_lora(model, _lora(config), seed=config.train.seed)
        self.model = model
        self.graphdef, params, self.frozen = nnx.split(model, nnx.LoRAParam if config.lora.rank else nnx.Param, ...)
        tx, schedule = make_optimizer(config.train.lr, config.train.warmup_steps, config.train.steps,
                                      config.train.grad_clip, config.train.weight_decay)
        self.params, self.opt_state, out_shardings = placed_with_optimizer(params, tx, self.mesh)
        cache = Path(config.data.cache_dir or self.workdir / "data")
        self.batches = self._batches(build_blocks(config.data.files, self.tokenizer, config.data.length, cache,
                                                  progress=progress and self.lead))
        self.eval_batches = None
        if config.data.eval_files:
            self.eval_batches = self._batches(build_blocks(config.data.eval_files, self.tokenizer,
                                                           config.data.length, cache, progress=False))
        vocab = self.tokenizer.get_vocab_size()
        pieces = max(b.pieces_per_row() for b in (self.batches, self.eval_batches) if b is not None)
        self.step_fn = make_adapt_step(self.graphdef, tx, schedule, config, self.mask_id, vocab, out_shardings,
                                       pieces)
        self._eval_loss = jax.jit(_loss_fn(self.graphdef, config, self.mask_id, vocab, pieces))
        self.checkpoints = ocp.CheckpointManager(
            (self.workdir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True,
                                                 enable_async_checkpointing=True))
        self.step = 0

    def _batches(self, folder: Path) -> BlockBatches:
        return BlockBatches(folder, global_batch_size=self.config.train.global_batch_size,
                            seed=self.config.train.seed, process_index=jax.process_index(),
                            process_count=jax.process_count())

    def _order(self) -> dict:
        return {"rows": self.batches.rows, "length": self.batches.length, "seed": self.config.train.seed,
                "global_batch_size": self.config.train.global_batch_size}

    # ------------------------------------------------------------------ checkpoints

    def save(self, step: int) -> None:
        self.checkpoints.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": self.params, "opt": self.opt_state}),
            data=ocp.args.JsonSave(self._order())))

    def restore_latest(self) -> int:
        step = self.checkpoints.latest_step()
        if step is None:
            return 0
        restored = self.checkpoints.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"params": self.params, "opt": self.opt_state}),
            data=ocp.args.JsonRestore()))
        if restored["data"] != self._order():
            raise UserError(f"{self.workdir / 'checkpoints'} was made with data {restored['data']}, this run has "
                             f"{self._order()}: resume with the same files, length, seed and batch size")
        self.params, self.opt_state = restored["state"]["params"], restored["state"]["opt"]
        log.warning("resumed from %s at step %d", self.workdir / "checkpoints", step)
        return step

    # ------------------------------------------------------------------ held-out text

    def evaluate(self, batches: int = 4) -> dict[str, float]:
        """Loss, masked cross-entropy and masked-token accuracy on the first `batches` batches of
        data.eval_files, under fixed masks; {} without eval files."""
        if self.eval_batches is None:
            return {}
        totals: dict[str, float] = {}
        n = min(batches, self.eval_batches.rows // self.config.train.global_batch_size)
        for i in range(n):
            batch = parallel.global_batch(self.eval_batches[i], self.mesh)
            with jax.set_mesh(self.mesh):
                _, metrics = self._eval_loss(self.params, self.frozen, batch, jax.random.key(EVAL_SEED + i))
            for k in ("loss", "masked_ce", "accuracy"):
                totals[k] = totals.get(k, 0.0) + float(metrics[k]) / n
        return totals

    # ------------------------------------------------------------------ loop

    def run(self) -> list[dict]:
        c = self.config.train
        self.step = self.restore_latest()
        metrics_log = MetricsLog(self.workdir, self.step, enabled=self.lead)
        history = []
        if self.step == 0 and self.eval_batches is not None:
            metrics_log.write({"step": 0, **{f"eval_{k}": v for k, v in self.evaluate().items()}})
        bar = tqdm(total=c.steps, initial=self.step, desc="adapting", unit="step",
                   disable=not (self.progress and self.lead))
        try:
            start = time.perf_counter()
            while self.step < c.steps:
                batch = self.batches[self.step]
                with jax.set_mesh(self.mesh):
                    self.params, self.opt_state, metrics = self.step_fn(
                        self.params, self.opt_state, self.frozen, self.step, parallel.global_batch(batch, self.mesh))
                metrics = {k: float(v) for k, v in metrics.items()}
                now = time.perf_counter()
                seconds, start = now - start, now
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    self._stop_diverged(metrics)
                self.step += 1
                tokens = int(np.sum(batch["segments"] > 0)) * jax.process_count()
                record = {"step": self.step, **metrics, "tokens_per_s": tokens / seconds, "seconds": seconds}
                history.append(record)
                if self.step % c.log_every == 0 or self.step == c.steps:
                    metrics_log.write(record)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}")
                bar.update()
                if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    self.save(self.step)
            if history and self.eval_batches is not None:
                metrics_log.write({"step": self.step, **{f"eval_{k}": v for k, v in self.evaluate().items()}})
        finally:
            bar.close()
            metrics_log.close()
            self.checkpoints.wait_until_finished()
        if self.step >= c.steps and (history or not (self.workdir / MODEL_DIR).exists()):
            self.write_model()
        return history

    def adapted_model(self) -> Decoder:
        """The plain Decoder with the adapted weights (LoRA merged)."""
        model = nnx.merge(self.graphdef, self.params, self.frozen)
        return merge_lora(model, _lora(self.config)) if self.config.lora.rank else model

    def write_model(self) -> Path:
        """WORKDIR/model, a converted directory (replacing one a shorter run wrote)."""
        model = self.adapted_model()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            graphdef, state = nnx.split(model)
            model = nnx.merge(graphdef, multihost_utils.process_allgather(state, tiled=True))
        out = self.workdir / MODEL_DIR
        if self.lead:
            save_converted(model, self.tokenizer, out, source=f"{self.config.model.path} adapted "
                           f"({self.config.objective.kind}, {self.step} steps)", replace=True)
            log.info("wrote the adapted model to %s", out)
        return out

    def _stop_diverged(self, metrics: dict) -> None:
        if self.checkpoints.latest_step() != self.step:
            self.save(self.step)
        self.checkpoints.wait_until_finished()
        raise TrainingDiverged.at(metrics, self.step, self.workdir / "checkpoints")


def adapt(config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True) -> list[dict]:
    parallel.initialize_distributed(config.distributed)
    return Adaptation(config, workdir, progress=progress).run()
