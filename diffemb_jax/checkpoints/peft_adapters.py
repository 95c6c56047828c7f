"""LoRA adapters to and from PEFT, so adapters trained here load in PyTorch and PEFT adapters load here.

Ours (model/lora_linear.py): `kernel_lora_a` [in, r] and `kernel_lora_b` [r, out] beside a kernel, adding
`x @ A @ B * alpha / r`. PEFT: `adapter_config.json` and `adapter_model.safetensors` holding
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r], adding the same
`x A^T B^T * lora_alpha / r`. Module names come from the family's key map (the HF name of the kernel
without `.weight`), so Qwen2, LLaMA, Mistral, Dream and LLaDA all use their own names.
"""

from __future__ import annotations

import functools
import json
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffemb_jax import atomic
from diffemb_jax.checkpoints.families import HEADLESS_FAMILIES
from diffemb_jax.checkpoints.keymaps import KeyMap
from diffemb_jax.checkpoints.sources import CheckpointError, _torch_to_numpy
from diffemb_jax.errors import UserError
from diffemb_jax.model import Decoder
from diffemb_jax.model.decoder import BLOCK_PROJECTIONS
from diffemb_jax.model.lora import LoraConfig, apply_lora

PEFT_PREFIX = "base_model.model."
_LEAVES = {"kernel_lora_a": "lora_A", "kernel_lora_b": "lora_B"}
# adapter_config.json options that change what the adapter computes and that we do not reproduce.
_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "bias": "none",
                "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None,
                "trainable_token_indices": None, "target_parameters": None, "use_qalora": False}


def _keymap(model: Decoder) -> KeyMap:
    return KeyMap(model.cfg.model_type, model.cfg.tie_word_embeddings)


def base_params_of(model) -> list:
    """Base (non-LoRA) parameters, whether or not the model carries adapters."""
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return list(nnx.to_flat_state(state))


def _module_name(keymap: KeyMap, kernel_path: tuple, headless: bool) -> str:
    """('layers', 0, 'attn', 'q_proj', 'kernel') -> 'model.layers.0.self_attn.q_proj' (HF module name)."""
    name = keymap.to_hf_name(kernel_path).removesuffix(".weight")
    return name.removeprefix("model.") if headless else name


def _kernel_modules(model: Decoder, headless: bool) -> dict[str, tuple]:
    """HF module name -> our kernel path, for every linear layer of the base model."""
    keymap = _keymap(model)
    return {_module_name(keymap, path, headless): path for path, _ in base_params_of(model) if path[-1] == "kernel"}


def _lora_pairs(model) -> dict[tuple, dict[str, jax.Array]]:
    """kernel path -> {"lora_A": A [in, r], "lora_B": B [r, out]}."""
    pairs: dict[tuple, dict] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if path[-1] not in _LEAVES:
            raise ValueError(f"LoRA parameter {'.'.join(map(str, path))} is not on a linear kernel; "
                             "PEFT export covers linear layers only")
        pairs.setdefault(path[:-1] + ("kernel",), {})[_LEAVES[path[-1]]] = var[...]
    if not pairs:
        raise ValueError("the model has no LoRA parameters (apply_lora first)")
    return pairs


def _target_modules(adapted: set[str], every: set[str]) -> list[str] | str:
    """PEFT's target_modules: short names (q_proj, ...) when they pick exactly the adapted modules
    (PEFT matches a name or a '.name' suffix), else a regex PEFT full-matches against module names."""
    short = {m.rsplit(".", 1)[-1] for m in adapted}
    if {m for m in every if m.rsplit(".", 1)[-1] in short} == adapted:
        return sorted(short)
    return "(?:" + "|".join(re.escape(m) for m in sorted(adapted)) + ")"


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def save_peft_adapter(model, lora: LoraConfig, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                      task_type: str | None = None, headless: bool = False, replace: bool = False) -> Path:
    """The LoRA params of an adapted model -> a PEFT adapter directory at `out_dir` (which must not
    exist, or, `replace`, is replaced whole).

    Tensor names fit the model export_hf writes (AutoModelForCausalLM, DreamModel, LLaDAModelLM):
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`. `headless=True` names them for
    the bare decoder instead (AutoModel, e.g. Qwen2Model: `base_model.model.layers.0...`); PEFT
    silently leaves adapters it cannot name at zero, so the choice must fit the model loaded."""
    cfg = model.cfg
    if headless and cfg.model_type not in HEADLESS_FAMILIES:
        raise UserError(f"headless adapters are for {HEADLESS_FAMILIES}; {cfg.model_type}'s AutoModel is its LM class")
    keymap = _keymap(model)
    pairs = _lora_pairs(model)
    tensors = {}
    for path, ab in pairs.items():
        prefix = PEFT_PREFIX + _module_name(keymap, path, headless)
        for leaf in ("lora_A", "lora_B"):
            value = np.asarray(jax.device_get(ab[leaf]), dtype=np.float32)
            tensors[f"{prefix}.{leaf}.weight"] = np.ascontiguousarray(value.T)
    rank = {t.shape[0] for n, t in tensors.items() if n.endswith("lora_A.weight")}
    if rank != {lora.rank}:
        raise UserError(f"LoRA params have rank {sorted(rank)}, the LoraConfig says {lora.rank}")
    adapted = {_module_name(keymap, p, headless) for p in pairs}
    config = {"peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
              "revision": None, "r": lora.rank, "lora_alpha": _number(lora.alpha),
              "lora_dropout": float(lora.dropout),
              "target_modules": _target_modules(adapted, set(_kernel_modules(model, headless))),
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "use_rslora": False, "use_dora": False, "rank_pattern": {},
              "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None}

    def fill(tmp: Path) -> None:
        from safetensors.numpy import save_file

        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})

    return (atomic.replace_directory if replace else atomic.write_new_directory)(out_dir, fill)


# ------------------------------------------------------------------------------------------ the way in

def _read_adapter(directory: Path) -> tuple[dict, dict[str, np.ndarray]]:
    config_path = directory / "adapter_config.json"
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory (a PEFT adapter directory is expected)")
    if not config_path.exists():
        raise CheckpointError(f"{directory} has no adapter_config.json: is it a PEFT adapter directory?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
    if (directory / "adapter_model.safetensors").exists():
        from safetensors.numpy import load_file

        return config, load_file(str(directory / "adapter_model.safetensors"))
    if (directory / "adapter_model.bin").exists():
        import torch

        try:
            state = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for corrupt or unsafe files
            raise CheckpointError(f"{directory / 'adapter_model.bin'}: not a weights-only PyTorch file ({e})") from e
        return config, {k: _torch_to_numpy(v.float()) for k, v in state.items()}
    raise CheckpointError(f"{directory} has no adapter_model.safetensors or adapter_model.bin")


def _check_config(config: dict, where: Path) -> LoraConfig:
    """The adapter's r / alpha / dropout as a LoraConfig (targets filled in later)."""
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{where}: peft_type {config.get('peft_type')!r} is not supported; only 'LORA' is")
    unsupported = [f"{key}={config[key]!r}" for key, plain in _UNSUPPORTED.items()
                   if config.get(key) and config[key] != plain]
    if unsupported:
        raise CheckpointError(f"{where}: LoRA options not supported here: {', '.join(unsupported)}")
    try:
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: needs integer 'r' and number 'lora_alpha' ({e})") from e
    if config.get("use_rslora"):  # PEFT scales by alpha / sqrt(r); we scale by alpha / r
        alpha *= math.sqrt(rank)
    return LoraConfig(rank=rank, alpha=alpha, dropout=float(config.get("lora_dropout") or 0.0))


def _check_targets(config: dict, modules: dict[str, tuple], where: Path) -> None:
    """Every name in a list-form target_modules must be a linear layer of this model."""
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        return  # a regex (or None): the tensors alone say which modules are adapted
    missing = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
    if missing:
        short = sorted({m.rsplit(".", 1)[-1] for m in modules})
        raise CheckpointError(f"{where}: target modules this model does not have (as linear layers): "
                              f"{', '.join(missing)}; its linear layers are {', '.join(short)}")


def _plan(tensors: dict[str, np.ndarray], modules: dict[str, tuple], headless: dict[str, tuple],
          where: Path) -> dict[tuple, dict[str, np.ndarray]]:
    """kernel path -> {"lora_A": [r, in], "lora_B": [out, r]}; every unknown name is an error."""
    plan, unknown = {}, []
    for name, value in tensors.items():
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.(lora_A|lora_B)\.weight", name)
        path = m and (modules.get(m.group(1)) or headless.get(m.group(1)))
        if not path:
            unknown.append(name)
            continue
        plan.setdefault(path, {})[m.group(2)] = value
    if unknown:
        raise CheckpointError(f"{where}: tensors that are no LoRA A/B of this model's linear layers "
                              f"({len(unknown)}): {', '.join(sorted(unknown)[:10])}")
    half = [name for name, p in modules.items() if len(plan.get(p, ())) == 1]
    if half:
        raise CheckpointError(f"{where}: modules with only one of lora_A / lora_B: {', '.join(half)}")
    if not plan:
        raise CheckpointError(f"{where}: the adapter holds no LoRA tensors")
    return plan


def _check_shapes(plan: dict, model: Decoder, rank: int, where: Path) -> None:
    params = dict(base_params_of(model))
    keymap = _keymap(model)
    wrong = []
    for path, ab in plan.items():
        n_in, n_out = params[path].shape
        for leaf, want in (("lora_A", (rank, n_in)), ("lora_B", (n_out, rank))):
            if tuple(ab[leaf].shape) != want:
                wrong.append(f"{keymap.to_hf_name(path).removesuffix('.weight')}.{leaf}.weight: adapter "
                             f"{tuple(ab[leaf].shape)}, expected {want} (r={rank})")
    if wrong:
        raise CheckpointError(f"{where}: LoRA tensors of the wrong shape ({len(wrong)}): " + "; ".join(wrong[:10]))


def _checked_adapter(model: Decoder, where: Path) -> tuple[LoraConfig, dict[tuple, dict[str, np.ndarray]]]:
    """The adapter's LoraConfig (targets not yet filled in) and plan, every check made."""
    config, tensors = _read_adapter(where)
    lora = _check_config(config, where)
    modules = _kernel_modules(model, headless=False)
    headless = _kernel_modules(model, headless=True) if model.cfg.model_type in HEADLESS_FAMILIES else {}
    _check_targets(config, modules | headless, where)
    plan = _plan(tensors, modules, headless, where)
    _check_shapes(plan, model, lora.rank, where)
    return lora, plan


def load_peft_adapter(model: Decoder, adapter_dir: str | Path, *, seed: int = 0):
    """A PEFT LoRA directory applied onto a plain decoder: (adapted model, LoraConfig).

    The adapter's r, lora_alpha and lora_dropout become the LoraConfig, its tensors (either PEFT
    naming: for the LM class or the bare decoder) the LoRA params. An adapted model draws no dropout
    unless its forward pass is given a dropout key; merged_from_peft merges an adapter for inference
    or export."""
    where = Path(adapter_dir)
    lora, plan = _checked_adapter(model, where)
    targets = "|".join(re.escape("/".join(map(str, path[:-1]))) for path in sorted(plan, key=str))
    lora = LoraConfig(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=f"(?:{targets})")
    adapted = apply_lora(model, lora, seed=seed)
    state = nnx.state(adapted, nnx.LoRAParam)
    made = {path[:-1] + ("kernel",) for path, _ in nnx.to_flat_state(state)}
    left = sorted(".".join(map(str, p[:-1])) for p in set(plan) - made)
    if left:
        raise _unrun_modules(where, left)
    values = state.to_pure_dict()
    for path, var in nnx.to_flat_state(state):
        value = plan[path[:-1] + ("kernel",)][_LEAVES[path[-1]]].T
        node = values
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = jax.device_put(jnp.asarray(value, jnp.float32), var[...].sharding)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(adapted, state)
    return adapted, lora


def _unrun_modules(where: Path, names: list[str]) -> CheckpointError:
    # apply_lora adapts the blocks' projections, which the forward pass runs: not the LM head
    return CheckpointError(f"{where}: LoRA on modules the encoder does not run cannot be applied here: "
                           f"{', '.join(names)}")


@functools.partial(jax.jit, static_argnums=3, donate_argnums=0)
def _merged_kernel(kernel, a, b, scale: float):
    """W + A B * scale in float32, back in W's dtype (merge_lora's arithmetic; peft's merge), written
    over W's own buffer (donated), so that merging allocates no second kernel."""
    delta = (a.astype(jnp.float32) @ b.astype(jnp.float32)) * scale
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def merged_from_peft(model: Decoder, adapter_dir: str | Path) -> Decoder:
    """`model` with a PEFT adapter folded into its kernels (for inference or export_hf): merged in
    place, kernel by kernel, each merged kernel written over the old one's buffer, so that the host
    holds the model and one kernel's update at a time, never a second model. The model given is the
    model returned: its old kernels are gone (an array sharing them, e.g. an apply_lora copy, with them)."""
    where = Path(adapter_dir)
    lora, plan = _checked_adapter(model, where)
    run = {("layers", i, *projection.split("/"), "kernel") for i in range(model.cfg.num_layers)
           for projection in BLOCK_PROJECTIONS}
    left = sorted(".".join(map(str, p[:-1])) for p in set(plan) - run)
    if left:
        raise _unrun_modules(where, left)
    params = dict(base_params_of(model))
    for path, ab in plan.items():
        variable = params[path]
        kernel = variable[...]
        a, b = (jax.device_put(np.ascontiguousarray(ab[leaf].T), _replicated(kernel.sharding))
                for leaf in ("lora_A", "lora_B"))  # [in, r], [r, out]
        variable.set_value(_merged_kernel(kernel, a, b, lora.scale))  # `kernel` is deleted (donated)
    return model


def _replicated(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The adapter's place beside a kernel: on each of the kernel's devices, whole."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding
