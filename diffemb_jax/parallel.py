"""Meshes, the one table of logical-axis rules, placement, multi-host start-up and global batches.

Parameters name their axes (vocab, embed, q_heads, kv_heads, mlp, norm); LOGICAL_RULES maps those
names to the mesh axes data, fsdp and tensor. The mesh uses Auto axis types on purpose: GSPMD
propagates shardings through the step from how parameters and batches are placed. Multi-host is
JAX's own distributed runtime (`jax.distributed.initialize`, which reads the environment of a Cloud
TPU pod or a SLURM job), launched by the cluster's own tools.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from diffemb_jax.errors import ConfigError

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallelism with sharded weights
LOGICAL_RULES = {
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
}


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, device_count: int | None = None) -> tuple[int, ...]:
    """Resolve one -1 ("the rest of the devices") and check the product."""
    n = jax.device_count() if device_count is None else device_count
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n or min(sizes) < 1:
        raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; there are {n}")
    return tuple(sizes)


def parse_mesh(text: str) -> tuple[int, int, int]:
    """--mesh DATA,FSDP,TENSOR -> three sizes (-1: the rest of the devices), read before any work."""
    try:
        sizes = tuple(int(n) for n in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"--mesh {text!r}: give three sizes DATA,FSDP,TENSOR, each positive or -1 (the rest of "
                          "the devices), e.g. -1,1,1 or 4,1,2")
    return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over every device, or over `devices` only."""
    shape = mesh_shape(data, fsdp, tensor, None if devices is None else len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def logical_spec(axes: tuple | None, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for a parameter; an axis whose size the mesh axis does not divide stays whole."""
    if not axes:
        return P()
    spec = []
    for name, size in zip(axes, shape):
        mesh_axis = LOGICAL_RULES.get(name)
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            log.info("%s of size %d is not divisible by mesh axis %s=%d: replicated", name, size, mesh_axis,
                     mesh.shape[mesh_axis])
            mesh_axis = None
        spec.append(mesh_axis)
    return P(*spec)


# (param path, logical axis names, shape) -> where the parameter lives
ShardingFn = Callable[[tuple, tuple | None, tuple], jax.sharding.Sharding]


def single_device(path, axes, shape) -> jax.sharding.Sharding:
    """The default sharding function: everything on the first device."""
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def logical_axes(variable) -> tuple | None:
    """The logical axis names a parameter was declared with (nnx.with_partitioning)."""
    meta = variable.get_metadata()
    return meta.get("out_sharding") or meta.get("sharding") or meta.get("sharding_names")


def placed_shapes(state: nnx.State, sharding_for: ShardingFn) -> dict:
    """The pure dict of `state` with each leaf a ShapeDtypeStruct where sharding_for puts it."""
    values = state.to_pure_dict()
    for path, variable in nnx.to_flat_state(state):
        node = values
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = jax.ShapeDtypeStruct(variable.shape, variable.dtype,
                                              sharding=sharding_for(path, logical_axes(variable), variable.shape))
    return values


def param_sharding(mesh: Mesh):
    """The loader's sharding function: each parameter placed by its logical axes."""

    def sharding_for(path, axes, shape):
        return NamedSharding(mesh, logical_spec(axes, shape, mesh))

    return sharding_for


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: Mesh) -> int:
    """How many pieces a batch's rows are split into: a row count must be a multiple of it."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def global_batch(local_batch, mesh: Mesh):
    """Each host's rows -> global arrays sharded over the batch axes (rows ordered by process)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def max_over_processes(n: int) -> int:
    """The largest of every process's `n` (a collective: every process must call it); `n` on one host."""
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(n))))


DISTRIBUTED_MODES = ("auto", "on", "off")
# Environment variables that name the cluster kind in the log (JAX's own detection decides).
_CLUSTER_HINTS = (("SLURM_JOB_ID", "SLURM"), ("TPU_WORKER_HOSTNAMES", "GKE / Cloud TPU (worker hostnames)"),
                  ("MEGASCALE_COORDINATOR_ADDRESS", "multi-slice TPU"), ("OMPI_COMM_WORLD_SIZE", "Open MPI"))


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Start JAX's distributed runtime; True if it was started.

    "auto" lets JAX's own cluster detection decide (SLURM, Open MPI, GKE, and Cloud TPU VMs, whose
    peers come from the metadata server and no environment variable shows): where it finds no
    cluster it asks for a coordinator address, and this is one process alone. "on" requires a
    cluster (or the explicit arguments); "off" never starts one. What was found is logged.
    """
    if mode not in DISTRIBUTED_MODES:
        raise ConfigError(f"distributed must be one of {DISTRIBUTED_MODES}, got {mode!r}")
    if mode == "off":
        log.info("distributed=off: one process")
        return False
    if jax.distributed.is_initialized():
        return True
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    except ValueError as e:
        if mode == "auto" and coordinator_address is None and "coordinator_address" in str(e):
            log.info("no cluster detected (SLURM, MPI, GKE, Cloud TPU): one process")
            return False
        raise
    except RuntimeError as e:  # JAX already runs in this process (a notebook, a test): too late to start
        if mode == "auto" and "before any JAX calls" in str(e):
            log.info("JAX already runs in this process: one process (a multi-host run starts the command afresh)")
            return False
        raise
    hints = [kind for variable, kind in _CLUSTER_HINTS if variable in os.environ] or ["Cloud TPU VM or explicit"]
    log.warning("distributed runtime started (%s): process %d of %d, %d local / %d global devices",
                ", ".join(hints), jax.process_index(), jax.process_count(), jax.local_device_count(),
                jax.device_count())
    return True
