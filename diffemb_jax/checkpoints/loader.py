"""Stream checkpoint tensors into an already-placed decoder, one tensor (or slice) at a time.

abstract decoder (nnx.eval_shape) -> check every name and shape up front -> for each parameter,
`jax.make_array_from_callback` asks the source for exactly the slice each device owns -> merge.
Nothing is allocated before the checkpoint is known to match, and the host never holds the model
twice.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from diffemb_jax.checkpoints.keymaps import KeyMap, is_transposed, keymap_for
from diffemb_jax.parallel import ShardingFn, logical_axes, single_device
from diffemb_jax.checkpoints.sources import CheckpointError, TensorSource
from diffemb_jax.model import Decoder, ModelConfig

def abstract_decoder(cfg: ModelConfig, *, dtype, param_dtype):
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))


def _dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _match(source: TensorSource, keymap: KeyMap, expected: dict) -> dict:
    """param path -> source name; raises one error listing every missing, unexpected, misshapen key."""
    plan, unexpected = {}, []
    for name in source.names():
        path = keymap.to_param_path(name)
        if path is not None and path in expected:
            plan[path] = name
        elif not keymap.is_ignorable(name):
            unexpected.append(name)
    missing = [keymap.to_hf_name(p) for p in expected if p not in plan]
    misshapen = []
    for path, name in plan.items():
        shape = source.shape(name)
        if is_transposed(path):
            shape = shape[::-1]
        if tuple(shape) != tuple(expected[path].shape):
            want = expected[path].shape[::-1] if is_transposed(path) else expected[path].shape
            misshapen.append(f"{name}: checkpoint {tuple(source.shape(name))}, config expects {tuple(want)}")
    if missing or unexpected or misshapen:
        lines = ["checkpoint does not match the model config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(sorted(items)[:20])
                             + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    return plan


def _set(tree: dict, path: tuple, value) -> None:
    for key in path[:-1]:
        tree = tree[key]
    tree[path[-1]] = value


def load_decoder(source: TensorSource, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 sharding_for: ShardingFn = single_device, progress: bool = True) -> Decoder:
    graphdef, state = nnx.split(abstract_decoder(cfg, dtype=dtype, param_dtype=param_dtype))
    expected = dict(nnx.to_flat_state(state))
    plan = _match(source, keymap_for(cfg, source.names()), expected)  # prefixed or bare names
    values = state.to_pure_dict()
    for path, variable in tqdm(expected.items(), desc="loading weights", unit="tensor", disable=not progress):
        name, transposed = plan[path], is_transposed(path)

        def read(index, name=name, transposed=transposed):
            if transposed:
                return source.read(name, tuple(index[::-1])).T.astype(param_dtype, copy=False)
            return source.read(name, tuple(index)).astype(param_dtype, copy=False)

        sharding = sharding_for(path, logical_axes(variable), variable.shape)
        _set(values, path, jax.make_array_from_callback(variable.shape, sharding, read))
    nnx.replace_by_pure_dict(state, values)
    return nnx.merge(graphdef, state)
