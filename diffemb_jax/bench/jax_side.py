"""The JAX side of a bench run, in its worker process: the project's own Embedder and train step
on the default device or a --mesh, and what JAX can say of its device memory and compilations.

The call sites of the project's forward settings, LoRA and train step are here (encoder, trainer)
and in plan.py.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from pathlib import Path
from typing import Callable

import jax
import jax.monitoring
import numpy as np

from diffemb_jax import parallel
from diffemb_jax.batching import texts_per_row
from diffemb_jax.checkpoints import load_model
from diffemb_jax.embedding import Embedder
from diffemb_jax.model import ForwardOptions
from diffemb_jax.model.lora import LoraConfig, apply_lora
from diffemb_jax.training.step import StepConfig, make_optimizer, placed_train_step, split_model

FRAMEWORK = "jax"


def encoder(job: dict):
    """(encode(texts) -> embeddings, the device column, info): the Embedder as `diffemb encode` runs it."""
    mesh = parallel.make_mesh(**job["mesh"]) if job.get("mesh") else None  # else the default device alone
    embedder = Embedder.from_pretrained(job["model"], attention="bidirectional", dtype=job["dtype"], mesh=mesh,
                                        max_length=job["max_length"], batch_size=job["batch_size"],
                                        max_batch_tokens=job["max_batch_tokens"], pack_length=job["pack_length"],
                                        scan_layers=job["scan_layers"])
    return lambda texts: embedder.encode(texts, progress=False), _device(), _info(embedder.model, mesh)


def trainer(job: dict):
    """step(i) -> loss: diffemb_jax.training.step's jitted step on a LoRA-adapted Decoder, compiled
    ahead of time so that compilation is timed apart."""
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")  # CPU: no donation
    # --mesh over every device, or the first device alone
    mesh = parallel.make_mesh(**job["mesh"]) if job["mesh"] else parallel.make_mesh(1, devices=jax.devices()[:1])
    model, _ = load_model(job["model"], dtype=job["dtype"], progress=False, sharding_for=parallel.param_sharding(mesh))
    lora_cfg = job["lora"]
    model = apply_lora(model, LoraConfig(rank=lora_cfg["rank"], alpha=lora_cfg["alpha"],
                                         dropout=lora_cfg["dropout"]), seed=job["seed"])
    graphdef, lora, frozen = split_model(model)
    opt = job["optimizer"]
    tx, schedule = make_optimizer(opt["lr"], warmup_steps=0, total_steps=job["warmup_steps"] + job["steps"],
                                  grad_clip=opt["grad_clip"], weight_decay=opt["weight_decay"])
    step_cfg = StepConfig(batch_size=len(job["batch"]["query"]["input_ids"]), loss="in_batch", scale=job["scale"],
                          seed=job["seed"], grad_cache_chunk=job["grad_cache_chunk"],
                          texts_per_row=texts_per_row(np.asarray(job["packed"]["segments"])),
                          forward=ForwardOptions(attention="bidirectional", remat=job["remat"],
                                                 scan_layers=job["scan_layers"]))
    # Placed as the Trainer places them, and kept there by the step: state placed otherwise than the
    # step's outputs would make step 1 compile again.
    lora, opt_state, train_step = placed_train_step(graphdef, lora, tx, schedule, step_cfg, mesh)
    batch = parallel.global_batch({key: np.asarray(value, np.int32) for key, value in job["packed"].items()}, mesh)
    state = {"lora": lora, "opt_state": opt_state}
    start = time.perf_counter()
    with jax.set_mesh(mesh):  # kernels that need it (splash) find the mesh
        train_step = train_step.lower(lora, opt_state, frozen, 0, batch).compile()
    info = {**_info(model, mesh), "compile_seconds": time.perf_counter() - start}

    def step(i: int) -> float:
        state["lora"], state["opt_state"], metrics = train_step(state["lora"], state["opt_state"], frozen, i, batch)
        return float(metrics["loss"])  # blocks until the step is done

    return step, _device(), info


def _device() -> str:
    """The device column: "cpu", or the accelerator's name (as torch's column gives it)."""
    return "cpu" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind


def _info(model, mesh=None) -> dict:
    return {"model_config": dataclasses.asdict(model.cfg), "device_kind": jax.devices()[0].device_kind,
            "devices": 1 if mesh is None else mesh.size}


def device_peak_mb() -> float | None:
    """This process's peak accelerator memory so far, in MB: what the allocator handed out (not the
    pool JAX preallocates), on its fullest device (a mesh has several). None on the CPU, where the
    RSS figures cover it."""
    stats = [(device.memory_stats() or {}) if device.platform != "cpu" else {} for device in jax.local_devices()]
    peaks = [s["peak_bytes_in_use"] for s in stats if "peak_bytes_in_use" in s]
    return max(peaks) / 2**20 if peaks else None


def reset_device_peak() -> bool:
    """JAX has no reset of the peak-memory mark: the timed part's own peak is not known."""
    return False


@functools.cache
def compilations() -> list[float]:
    """The seconds of each XLA compilation in this process from the first call on (jax.monitoring's
    event), so that a timed part can say it compiled nothing."""
    seen: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: seen.append(seconds) if event == "/jax/core/compile/backend_compile_duration" else None)
    return seen


def profiled(work: Callable, out_dir: str) -> dict:
    """One more pass of `work` under JAX's profiler, after the timed part (so no timed figure carries
    the profiler's cost): an XProf trace (open it with `xprof --logdir DIR` or TensorBoard's profile
    plugin; perfetto_trace.json.gz also opens in ui.perfetto.dev)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        work()
    return {"profile_dir": str(out), "files": sorted(str(p) for p in out.glob("plugins/profile/*/*"))}
