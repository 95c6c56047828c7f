"""The training loop: LoRA contrastive training that can be killed at any step and resumed exactly.

A checkpoint (orbax, async, keep-N, atomic) holds the LoRA parameters, the optimizer state, the step
and the data iterator's state; dropout keys derive from (seed, step). Restarting the same command
therefore continues with the very batches and random numbers the uninterrupted run would have used. Metrics go to
WORKDIR/metrics.jsonl and TensorBoard (WORKDIR/tensorboard) with a progress bar. After the last
step the LoRA is written as a PEFT adapter, WORKDIR/adapter, the way out to PyTorch and to
`diffemb encode|evaluate|export --adapter`. The host reads and packs each step's batch while the device
runs the step before it; a step's `seconds` in the metrics is the wall time from one step's metrics to
the next one's, host work included.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from tqdm.auto import tqdm

from diffemb_jax import atomic, parallel
from diffemb_jax.batching import pack_step, packs, pad_rows, padded_rows, row_length, step_shapes, texts_per_row
from diffemb_jax.checkpoints import load_model
from diffemb_jax.checkpoints.peft_adapters import save_peft_adapter
from diffemb_jax.errors import ConfigError, MissingPathError
from diffemb_jax.model import ForwardOptions
from diffemb_jax.model.lora import LoraConfig, apply_lora
from diffemb_jax.training.config import check_choices
from diffemb_jax.training.data import TrainBatches, build_dataset
from diffemb_jax.training.loss import check_matryoshka
from diffemb_jax.training.step import StepConfig, batch_tokens, make_optimizer, placed_train_step, split_model

log = logging.getLogger(__name__)
ADAPTER_DIR = "adapter"  # WORKDIR/adapter: the trained LoRA as a PEFT adapter, written after the last step


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or Inf; the last good state was saved first."""

    @classmethod
    def at(cls, metrics: dict, step: int, checkpoints: Path) -> "TrainingDiverged":
        """The error for step `step` + 1, whose parameters were not kept; `step`'s are saved."""
        return cls(f"the loss is {metrics['loss']} and the gradient norm {metrics['grad_norm']} at step {step + 1}; "
                   f"stopped. The last good state (step {step}) is saved in {checkpoints}: lower train.lr or check "
                   "the data, then rerun to resume.")


def lora_config(config) -> LoraConfig:
    return LoraConfig(rank=config.lora.rank, alpha=config.lora.alpha, dropout=config.lora.dropout,
                      targets=config.lora.targets)


def forward_options(config) -> ForwardOptions:
    return ForwardOptions(attention=config.model.attention, kernel=config.model.kernel, remat=config.train.remat,
                          scan_layers=config.model.scan_layers)


def step_config(config) -> StepConfig:
    return StepConfig(batch_size=config.train.global_batch_size, loss=config.loss.kind, scale=config.loss.scale,
                      num_negatives=config.data.num_negatives, pooling=config.model.pooling,
                      skip_instruction=config.model.skip_instruction, grad_cache_chunk=config.train.grad_cache_chunk,
                      seed=config.train.seed, packed=config.data.pack, forward=forward_options(config),
                      matryoshka_dims=tuple(config.loss.matryoshka_dims),
                      matryoshka_weights=tuple(float(w) for w in config.loss.matryoshka_weights))


def row_bounds(config, mesh) -> tuple[int, int]:
    """(multiple, most) of a host's rows a step: its devices' batch shards, and one text a row."""
    shards = parallel.batch_shards(mesh) // jax.process_count()
    return max(shards, 1), step_config(config).num_texts // jax.process_count()


def optimizer_and_step(config, graphdef, lora, mesh):
    """(lora, opt_state, train_step): the adapters and their optimizer state placed on the mesh, and
    the step compiled to keep them there."""
    tx, schedule = make_optimizer(config.train.lr, config.train.warmup_steps, config.train.steps,
                                  config.train.grad_clip, config.train.weight_decay,
                                  config.train.schedule, config.train.decay_steps)
    return placed_train_step(graphdef, lora, tx, schedule, step_config(config), mesh)


def check_config(config, *, data: bool = True) -> None:
    """Errors a run would meet later, at once; `data=False` (the plan) leaves the data files unchecked."""
    check_choices(config)
    if not config.model.path:
        raise ConfigError("config.model.path is empty: set --config.model.path=MODEL (converted dir, HF dir or .gguf)")
    data_shards, fsdp, _ = parallel.mesh_shape(**config.mesh)
    if config.train.global_batch_size % (data_shards * fsdp):
        raise ConfigError(f"train.global_batch_size={config.train.global_batch_size} is not divisible by the "
                         f"{data_shards * fsdp} batch shards of mesh {dict(config.mesh)}")
    step_config(config)  # its own checks: the loss kind, the matryoshka dimensions and weights
    if config.data.min_row_length < 1:
        raise ValueError(f"data.min_row_length must be >= 1 (packed rows are at least this long), got "
                         f"{config.data.min_row_length}")
    if config.train.profile_from < 0 or config.train.profile_steps < 1:
        raise ConfigError(f"train.profile_from must be >= 0 (0: no profile) and train.profile_steps >= 1, got "
                         f"{config.train.profile_from} and {config.train.profile_steps}")
    if not data:
        return
    if not [f for f in config.data.files if f]:
        raise ConfigError("config.data.files is empty: set --config.data.files=train.jsonl (repeat for more files)")
    for f in config.data.files:
        if not Path(f).is_file():
            raise MissingPathError(f"config.data.files: {f} does not exist")


class ProfileWindow:
    """A jax.profiler trace of steps `first` ... `first + count - 1` (numbered from 1, as in
    metrics.jsonl; 0: none) in `directory`, for XProf (`xprof --logdir WORKDIR/profile`) or TensorBoard's
    profile plugin; on several processes each traces into a folder of its own (process-<i>). Pick
    steps after the first of each shape, which compile."""

    def __init__(self, directory: Path, first: int, count: int):
        self.directory, self.first, self.last = directory, first, first + count - 1
        self.tracing = False

    def before(self, step: int) -> None:
        """`step` is about to be dispatched."""
        if self.first and self.first <= step <= self.last and not self.tracing:
            log.info("profiling steps %d to %d into %s", step, self.last, self.directory)
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.tracing = True

    def after(self, step: int) -> None:
        """`step`'s metrics are back: the device has run it."""
        if self.tracing and step >= self.last:
            self.stop()

    def stop(self) -> None:
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()


def _step_of(line: str, torn: int) -> int:
    """A metrics line's step; `torn` for a line a killed run left half-written (or blank)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return torn


class MetricsLog:
    """metrics.jsonl (rewritten on resume to drop steps after the checkpoint) and TensorBoard, written
    by the lead process only."""

    def __init__(self, workdir: Path, resume_step: int, enabled: bool = True):
        from tensorboardX import SummaryWriter

        self.enabled = enabled
        if not enabled:
            return
        self.path = workdir / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _step_of(line, resume_step + 1) <= resume_step]
            atomic.write_file(self.path, lambda f: f.writelines(line + "\n" for line in kept), text=True)
        self._file = open(self.path, "a")
        self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step":
                self._tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._tb.close()


class Trainer:
    def __init__(self, config: ml_collections.ConfigDict, workdir: str | Path):
        check_config(config)
        self.config, self.workdir = config, Path(workdir)
        self.lead = jax.process_index() == 0  # one writer of shared files; orbax coordinates its own
        if self.lead:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        self.mesh = parallel.make_mesh(**config.mesh)
        model, self.tokenizer = load_model(config.model.path, dtype=config.model.dtype,
                                           sharding_for=parallel.param_sharding(self.mesh))
        if config.loss.matryoshka_dims:  # before any compilation: the embedding is the hidden state, pooled
            check_matryoshka(tuple(config.loss.matryoshka_dims), tuple(config.loss.matryoshka_weights),
                             model.cfg.hidden_size)
        self.model = apply_lora(model, lora_config(config), seed=config.train.seed)  # adapters follow base shardings
        self.graphdef, self.lora, self.frozen = split_model(self.model)
        self.lora, self.opt_state, self.train_step = optimizer_and_step(config, self.graphdef, self.lora, self.mesh)
        self.batches = self._batches()
        self.checkpoints = ocp.CheckpointManager(
            (self.workdir / "checkpoints").absolute(),
            options=ocp.CheckpointManagerOptions(max_to_keep=config.train.keep_checkpoints, create=True,
                                                 enable_async_checkpointing=True))
        self.step = 0
        self._shapes: set[tuple[int, int]] = set()  # (rows, length) of the steps so far: a program each
        possible = step_shapes(max(config.data.query_max_length, config.data.doc_max_length),
                               row_bounds(config, self.mesh)[1], row_bounds(config, self.mesh)[0], config.data.pack,
                               config.data.min_row_length)
        log.info("the steps take at most %d shapes (rows x length a host), a compiled program each: rows %s x "
                 "lengths %s", len(possible), sorted({r for r, _ in possible}), sorted({n for _, n in possible}))

    def _batches(self) -> TrainBatches:
        c = self.config
        cache = Path(c.data.cache_dir or self.workdir / "data")

        def build():
            return build_dataset(c.data.files, c.data.format, cache, skip_bad_rows=c.data.skip_bad_rows,
                                 num_negatives=c.data.num_negatives)

        if jax.process_count() > 1:  # the lead builds; the others then find it built
            from jax.experimental import multihost_utils

            if self.lead:
                build()
            multihost_utils.sync_global_devices("diffemb: training data built")
        data_dir = build()
        return TrainBatches(data_dir, self.tokenizer, global_batch_size=c.train.global_batch_size,
                            query_max_length=c.data.query_max_length, doc_max_length=c.data.doc_max_length,
                            num_negatives=c.data.num_negatives, seed=c.train.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())

    def packed(self, sides: dict) -> dict:
        """This host's share of a step, packed into rows as long and as many as every other host's
        (batching/step.py); one text a row where those rows leave a row for each (batching.packs)."""
        c = self.config
        length = parallel.max_over_processes(row_length(sides, c.data.pack, c.data.min_row_length))

        def lay(pack: bool) -> dict:
            return pack_step(sides, global_batch_size=c.train.global_batch_size, num_negatives=c.data.num_negatives,
                             process_index=jax.process_index(), pack=pack, length=length)

        batch = lay(c.data.pack)
        rows = padded_rows(parallel.max_over_processes(len(batch["input_ids"])), *row_bounds(c, self.mesh))
        if c.data.pack and not self.packs(rows):  # the same rows, and no texts' mask for the kernel
            batch = lay(False)
        if (rows, length) not in self._shapes:
            self._shapes.add((rows, length))
            log.info("a step of %d rows of %d tokens a host: the train step compiles for it (shapes so far: %s)",
                     rows, length, sorted(self._shapes))
        return pad_rows(batch, rows)

    def packs(self, rows: int) -> bool:
        """Whether a step of `rows` rows a host (from `packed`) holds several texts a row."""
        return self.config.data.pack and packs(rows, row_bounds(self.config, self.mesh)[1])

    def layout(self, batch: dict) -> dict:
        """The train step's static layout arguments for this host's packed `batch`: whether its rows hold
        several texts and, on a GPU (where cuDNN takes a row's texts as a list of a program's size), the
        most a row holds, rounded up, the same on every host."""
        packed = self.packs(len(batch["input_ids"]))
        if not packed or jax.default_backend() != "gpu":
            return {"packed": packed}
        return {"packed": True, "texts_per_row": parallel.max_over_processes(texts_per_row(batch["segments"]))}

    # ------------------------------------------------------------------ checkpoints

    def _state_tree(self) -> dict:
        return {"lora": self.lora, "opt": self.opt_state}

    def save(self, step: int, data_state: dict) -> None:
        self.checkpoints.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(self._state_tree()), data=ocp.args.JsonSave(data_state)))

    def restore_latest(self) -> int:
        step = self.checkpoints.latest_step()
        if step is None:
            return 0
        restored = self.checkpoints.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(self._state_tree()), data=ocp.args.JsonRestore()))
        state = restored["state"]
        self.lora, self.opt_state = state["lora"], state["opt"]
        self.batches.set_state(restored["data"])
        log.warning("resumed from %s at step %d", self.workdir / "checkpoints", step)
        return step

    # ------------------------------------------------------------------ loop

    def run(self, *, progress: bool = True) -> list[dict]:
        c = self.config.train
        self.step = self.restore_latest()
        metrics_log = MetricsLog(self.workdir, self.step, enabled=self.lead)
        history = []
        bar = tqdm(total=c.steps, initial=self.step, desc="training", unit="step", disable=not (progress and self.lead))
        # A folder a process: the trace files are named after the host, which processes may share.
        profile_dir = self.workdir / "profile" / (f"process-{jax.process_index()}" if jax.process_count() > 1 else "")
        profile = ProfileWindow(profile_dir, c.profile_from, c.profile_steps)
        try:
            before = self.batches.get_state()  # the data position before the step's batch
            batch = self.packed(next(self.batches)) if self.step < c.steps else None
            start = time.perf_counter()
            while self.step < c.steps:
                profile.before(self.step + 1)
                with jax.set_mesh(self.mesh):  # kernels that need it (splash) find the mesh
                    self.lora, self.opt_state, metrics = self.train_step(
                        self.lora, self.opt_state, self.frozen, self.step, parallel.global_batch(batch, self.mesh),
                        **self.layout(batch))
                after = self.batches.get_state()
                # The device runs the step (dispatch is asynchronous) while the host reads and packs the
                # next batch; an error there is raised once this step is logged (and saved, when due).
                upcoming, failed = None, None
                if self.step + 1 < c.steps:
                    try:
                        upcoming = self.packed(next(self.batches))
                    except Exception as error:  # raised below, after this step's bookkeeping
                        failed = error
                metrics = {k: float(v) for k, v in metrics.items()}
                profile.after(self.step + 1)
                now = time.perf_counter()
                seconds, start = now - start, now
                if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                    self._stop_diverged(metrics, before)
                self.step += 1
                record = {"step": self.step, **metrics, "tokens_per_s": batch_tokens(batch) / seconds,
                          "seconds": seconds}
                history.append(record)
                if self.step % c.log_every == 0 or self.step == c.steps:
                    metrics_log.write(record)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['accuracy']:.2f}")
                bar.update()
                if self.step % c.checkpoint_every == 0 or self.step == c.steps:
                    self.save(self.step, after)
                if failed is not None:
                    raise failed
                before, batch = after, upcoming
        finally:
            profile.stop()
            bar.close()
            metrics_log.close()
            self.checkpoints.wait_until_finished()
        if self.step >= c.steps and (history or not (self.workdir / ADAPTER_DIR).exists()):
            self.write_adapter()
        return history

    def write_adapter(self) -> Path:
        """The trained LoRA as a PEFT adapter directory, WORKDIR/adapter, for the HF export of the base
        model: transformers + peft load it, and so do `diffemb encode|evaluate|export --adapter`.
        Every process takes part (the adapters may be spread over hosts); the lead writes."""
        lora = self.lora
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            lora = multihost_utils.process_allgather(lora, tiled=True)
        out = self.workdir / ADAPTER_DIR
        if self.lead:  # a longer run of the same workdir: the new adapter replaces the old
            save_peft_adapter(nnx.merge(self.graphdef, lora, self.frozen), lora_config(self.config), out,
                              base_model_name_or_path=str(self.config.model.path), replace=True)
            log.info("wrote the trained LoRA as a PEFT adapter to %s", out)
        return out

    def _stop_diverged(self, metrics: dict, data_state: dict) -> None:
        # The step kept the previous parameters; save them with the data position before this batch.
        if self.checkpoints.latest_step() != self.step:
            self.save(self.step, data_state)
        self.checkpoints.wait_until_finished()
        raise TrainingDiverged.at(metrics, self.step, self.workdir / "checkpoints")


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True) -> list[dict]:
    parallel.initialize_distributed(config.distributed)
    return Trainer(config, workdir).run(progress=progress)
