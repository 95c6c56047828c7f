"""`diffemb plan`: the train step's per-device memory on its mesh, from shapes alone.

The LoRA-adapted model is built abstract (nnx.eval_shape) from the model's config, and every array
the step takes is given the placement training gives it: base weights by their logical axes (as the
loader places them), each adapter by its base kernel as apply_lora places it (A by the kernel's
input axis, B by its output axis). The adapters alone are made (zeros: they are small), so that their
optimizer state is made and placed as in training. XLA then compiles the step for its largest batch
and reports its memory. No weight and no training row is read: for a 7B model this takes the
compilation, not the minutes of reading 15 GB.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from diffemb_jax import parallel
from diffemb_jax.batching import STEP_KEYS, padded_rows
from diffemb_jax.checkpoints import model_config
from diffemb_jax.parallel import placed_shapes
from diffemb_jax.memory import compiled_bytes
from diffemb_jax.model import Decoder
from diffemb_jax.model.lora import apply_lora
from diffemb_jax.training.step import split_model
from diffemb_jax.training.trainer import lora_config, optimizer_and_step, row_bounds


def step_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    """(graphdef, lora, frozen): the train step's model as ShapeDtypeStructs, placed as in training."""
    cfg, dtype = model_config(config.model.path), jnp.dtype(config.model.dtype)

    def build():
        model = Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype)
        return apply_lora(model, lora_config(config), seed=config.train.seed)

    graphdef, lora, frozen = split_model(nnx.eval_shape(build))
    nnx.replace_by_pure_dict(frozen, placed_shapes(frozen, parallel.param_sharding(mesh)))
    kernels = dict(nnx.to_flat_state(frozen))

    def adapter(path, axes, shape):  # A [d_in, r] takes the kernel's input axis, B [r, d_out] its output
        name = path[-1]
        spec = kernels[path[:-1] + (name.rsplit("_lora_", 1)[0],)].get_value().sharding.spec
        return NamedSharding(mesh, P(spec[0], None) if name.endswith("_lora_a") else P(None, spec[1]))

    nnx.replace_by_pure_dict(lora, placed_shapes(lora, adapter))
    return graphdef, lora, frozen


def memory_plan(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Per-device bytes of the compiled train step (XLA's memory analysis) and of its parts, at the
    step's largest batch: every text a row of the longer max length, as many rows as texts."""
    c = config
    mesh = parallel.make_mesh(**c.mesh)
    graphdef, lora, frozen = step_state(c, mesh)
    # The adapters are small: made (zeros) and placed, their optimizer state follows them as in training.
    lora = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), lora)
    lora, opt_state, train_step = optimizer_and_step(c, graphdef, lora, mesh)
    multiple, most = row_bounds(c, mesh)
    length = max(c.data.query_max_length, c.data.doc_max_length)
    rows = jax.ShapeDtypeStruct((padded_rows(most, multiple, most) * jax.process_count(), length), jnp.int32,
                                sharding=parallel.batch_sharding(mesh))
    batch = dict.fromkeys(STEP_KEYS, rows)
    stats = train_step.lower(lora, opt_state, frozen, 0, batch).compile().memory_analysis()

    def per_device(tree) -> int:
        return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))

    return {"frozen_params": per_device(frozen), "lora_params": per_device(lora),
            "optimizer_state": per_device(opt_state), "batch": len(batch) * per_device(rows),
            "arguments": stats.argument_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
            "outputs": stats.output_size_in_bytes, "aliased": stats.alias_size_in_bytes,
            "total": compiled_bytes(stats)}  # the donated adapters and optimizer state are written in place
