"""Open any model path (HF directory, .gguf file, converted directory, PEFT adapter folder) and write
converted ones.

A converted directory holds `diffemb.json` (the ModelConfig and where it came from), `params/` (an
orbax checkpoint) and `tokenizer.json`. It is written under a temporary name and renamed into place,
so a reader never sees half of one. A PEFT adapter folder (llm2vec's MNTP checkpoints are such
folders) stands for its base model with the adapter merged in; PEFT adapters given beside a model
are merged after it, one after another in their order, as llm2vec stacks its supervised adapter on
the MNTP-merged model.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tokenizers
from flax import nnx

from diffemb_jax import atomic
from diffemb_jax.checkpoints.dtypes import DTYPES, compute_dtype, stored_dtype
from diffemb_jax.checkpoints.loader import abstract_decoder, load_decoder
from diffemb_jax.parallel import ShardingFn, placed_shapes, single_device
from diffemb_jax.checkpoints.sources import CheckpointError, GGUFSource, gguf_config, gguf_dtype_bytes, open_weights
from diffemb_jax.checkpoints.families import config_from_hf, config_from_hf_file
from diffemb_jax.checkpoints.keymaps import fit_to_checkpoint
from diffemb_jax.checkpoints.peft_adapters import merged_from_peft
from diffemb_jax.checkpoints.sentence_transformers import is_sentence_transformers, read_folder
from diffemb_jax.model import Decoder, ModelConfig

CONVERTED_MARKER = "diffemb.json"
ADAPTER_CONFIG = "adapter_config.json"  # what makes a directory a PEFT adapter
# A directory holding one of these is a model itself, whatever else it holds.
MODEL_FILES = (CONVERTED_MARKER, "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json")
CONVERTED_KEYS = ("format_version", "source", "param_dtype", "config")  # what CONVERTED_MARKER holds
FORMAT_VERSION = 1


def _clean(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    tok.no_padding()
    tok.no_truncation()
    return tok


def hf_tokenizer(directory: Path, gguf_file: str | None = None) -> tokenizers.Tokenizer:
    if gguf_file is None and (directory / "tokenizer.json").exists():
        return _clean(tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")))
    from transformers import AutoTokenizer  # builds tokenizer.json from vocab/merges or GGUF metadata

    try:
        return _clean(AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file).backend_tokenizer)
    except Exception as e:
        where = directory / gguf_file if gguf_file else directory
        raise CheckpointError(f"{where}: no usable tokenizer (tokenizer.json, vocab files or GGUF vocab): {e}") from e


def resolve(path: str | Path) -> Path:
    """A model path as given, or, when nothing is there and it reads as a Hub id (`ORG/NAME`), that
    model's snapshot in the local Hugging Face cache (`HF_HUB_CACHE`); nothing is downloaded."""
    given = Path(path)
    text = str(path)
    if given.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1 or not all(text.split("/")):
        return given
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, local_files_only=True))
    except HFValidationError:  # not a valid id: a path that does not exist, reported as such later
        return given
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{text} is neither a local path nor a model in the Hugging Face cache "
                              f"({HF_HUB_CACHE}); download it first: hf download {text}") from None


def model_directory(path: Path) -> Path:
    """Where a model's weights are: a sentence-transformers folder's Transformer module (its other
    modules checked to be ones this project reproduces), else the path itself."""
    return read_folder(path).transformer if is_sentence_transformers(path) else path


def is_converted(path: Path) -> bool:
    return path.is_dir() and (path / CONVERTED_MARKER).exists()


def _adapter_base_name(folder: Path) -> str | None:
    """The base model a PEFT adapter folder was made on (its adapter_config.json's
    base_model_name_or_path, a path or a Hub id), or None when `folder` is no adapter folder."""
    config = folder / ADAPTER_CONFIG
    if not (folder.is_dir() and config.exists()):
        return None
    weights = [name for name in MODEL_FILES if (folder / name).exists()]
    if weights:
        raise CheckpointError(f"{folder} holds both a model ({weights[0]}) and a PEFT adapter ({ADAPTER_CONFIG}): "
                              "which one is meant is unclear: move the adapter out and give it with --adapter")
    try:
        name = json.loads(config.read_text()).get("base_model_name_or_path")
    except (ValueError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{config} is not a JSON object ({e})") from None
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{config} names no base model (base_model_name_or_path is {name!r}): give the "
                              f"base model as the model and {folder} as an adapter (--adapter)")
    return name


def base_and_adapters(path: str | Path) -> tuple[Path, tuple[Path, ...]]:
    """A model path as (the model that holds weights, the PEFT adapters to merge onto it in order):
    (path, ()) for a model; for an adapter folder, its base (a local path, relative ones from the
    current directory as PEFT takes them, or a Hub id in the local cache; an adapter folder again,
    perhaps) and the folder after that base's own adapters. A sentence-transformers folder holds its
    weights in its Transformer module (model_directory)."""
    path, adapters = resolve(path), []
    while (name := _adapter_base_name(path)) is not None:
        adapters.insert(0, path)
        try:
            base = resolve(name)
        except CheckpointError as e:
            raise CheckpointError(f"{path / ADAPTER_CONFIG}: the base model {name!r}: {e}") from None
        if not base.exists():
            raise CheckpointError(f"{path / ADAPTER_CONFIG} names the base model {name!r}, which does not exist "
                                  f"(from {Path.cwd()}): give the base model as the model and {path} as an "
                                  "adapter (--adapter)")
        if any(base.resolve() == a.resolve() for a in adapters):
            raise CheckpointError(f"{path / ADAPTER_CONFIG} names {name!r} as its base, an adapter of this very "
                                  "chain: give the base model as the model")
        path = base
    return model_directory(path), tuple(adapters)


def _adapter_dirs(adapters) -> list[Path]:
    """None, one adapter directory (or Hub id in the local cache) or several -> a list, each checked
    for its adapter_config.json before any weight is read."""
    if adapters is None:
        return []
    dirs = [resolve(a) for a in ([adapters] if isinstance(adapters, (str, Path)) else adapters)]
    for directory in dirs:
        if not (directory / ADAPTER_CONFIG).is_file():
            raise CheckpointError(f"{directory} is no PEFT adapter directory (it has no {ADAPTER_CONFIG})")
    return dirs


def open_source(path: str | Path):
    """(ModelConfig, TensorSource, Tokenizer) for an HF directory or a .gguf file; the ModelConfig says
    whether the checkpoint holds its untied LM head (a bare decoder's save has none)."""
    path = model_directory(resolve(path))
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_file() and path.suffix == ".gguf":
        source = GGUFSource(path)
        return config_from_hf(source.hf_config.to_dict()), source, hf_tokenizer(path.parent, path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise CheckpointError(f"{path} has no config.json: is it a Hugging Face model directory?")
        cfg = config_from_hf_file(path / "config.json")
        source = open_weights(path)
        return fit_to_checkpoint(cfg, source.names()), source, hf_tokenizer(path)
    raise CheckpointError(f"{path} is neither a model directory nor a .gguf file")


def convert(src: str | Path, out: str | Path, *, dtype: str = "auto", progress: bool = True) -> Path:
    """HF directory, .gguf or PEFT adapter folder (merged into its base) -> converted directory at
    `out` (which must not exist yet); dtype auto: the checkpoint's own (dtypes.py)."""
    out = atomic.new_directory(out)  # before any slow loading
    dtype = stored_dtype(dtype, lambda: checkpoint_dtype_bytes(src))
    model, tok = load_model(src, dtype=dtype, progress=progress)
    return save_converted(model, tok, out, source=str(src))


def save_converted(model: Decoder, tok: tokenizers.Tokenizer, out: Path, *, source: str = "",
                   replace: bool = False) -> Path:
    """`model` and `tok` as a converted directory at `out`; `replace`: over one already there."""
    def fill(tmp: Path) -> None:
        _, state = nnx.split(model)
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / "params", state.to_pure_dict())
        checkpointer.wait_until_finished()
        tok.save(str(tmp / "tokenizer.json"))
        dtype = jax.tree.leaves(state)[0].dtype
        meta = {"format_version": FORMAT_VERSION, "source": source, "param_dtype": str(jnp.dtype(dtype)),
                "config": json.loads(model.cfg.to_json())}
        (tmp / CONVERTED_MARKER).write_text(json.dumps(meta, indent=2))

    return (atomic.replace_directory if replace else atomic.write_directory)(out, fill)


def _converted_config(path: Path) -> ModelConfig:
    """The ModelConfig of a converted directory, with its files checked before any weight is read."""
    marker = path / CONVERTED_MARKER
    try:
        meta = json.loads(marker.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{marker} is not valid JSON ({e}); convert the model again") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path}: converted with format {version}, "
                              f"this version reads {FORMAT_VERSION}; convert the model again")
    unknown = sorted(set(meta) - set(CONVERTED_KEYS))
    config = meta.get("config")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if not unknown and isinstance(config, dict):
        unknown = [f"config.{key}" for key in sorted(set(config) - fields)]
    if unknown or not isinstance(config, dict):
        raise CheckpointError(f"{marker}: unknown keys {unknown or ['config']} (it holds "
                              f"{', '.join(CONVERTED_KEYS)}; config holds ModelConfig's fields)")
    for needed in ("tokenizer.json", "params"):
        if not (path / needed).exists():
            raise CheckpointError(f"{path} is a converted directory without its {needed}: convert the model again")
    try:
        return ModelConfig(**config)
    except TypeError as e:  # a field missing
        raise CheckpointError(f"{marker}: {e}") from None


def load_converted(path: Path, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   sharding_for: ShardingFn = single_device):
    cfg = _converted_config(path)
    graphdef, state = nnx.split(abstract_decoder(cfg, dtype=dtype, param_dtype=param_dtype))
    restored = ocp.StandardCheckpointer().restore((path / "params").absolute(), placed_shapes(state, sharding_for))
    nnx.replace_by_pure_dict(state, restored)
    tok = _clean(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")))
    return nnx.merge(graphdef, state), tok


def model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a converted directory, an HF directory, a .gguf file or a PEFT adapter
    folder (its base's); no weights are read."""
    path = base_and_adapters(path)[0]
    if is_converted(path):
        return _converted_config(path)
    if path.is_dir() and (path / "config.json").exists():
        cfg = config_from_hf_file(path / "config.json")
        try:  # the weights' names (headers only) say whether the head is there
            return fit_to_checkpoint(cfg, open_weights(path).names())
        except CheckpointError:  # no readable weights: the config alone (loading will say what is wrong)
            return cfg
    if path.is_file() and path.suffix == ".gguf":
        return config_from_hf(gguf_config(path).to_dict())  # the header alone: nothing dequantised
    return open_source(path)[0]  # open_source's error


def checkpoint_dtype_bytes(path: str | Path) -> dict[str, int]:
    """{dtype name: bytes} of the weights of a converted directory, an HF directory or a .gguf file,
    from their headers alone (what `--dtype auto` stores: dtypes.stored_dtype)."""
    path = base_and_adapters(path)[0]  # an adapter folder: its base's weights
    if is_converted(path):
        _converted_config(path)  # its files checked
        name = json.loads((path / CONVERTED_MARKER).read_text()).get("param_dtype")
        if name not in DTYPES:
            raise CheckpointError(f"{path / CONVERTED_MARKER}: param_dtype {name!r} is none of "
                                  f"{', '.join(DTYPES)}; convert the model again")
        return {name: 1}
    if path.is_file() and path.suffix == ".gguf":
        return gguf_dtype_bytes(path)
    if path.is_dir() and (path / "config.json").exists():
        return open_weights(path).dtype_bytes()
    open_source(path)  # a path that is none of these: its error says which
    raise CheckpointError(f"{path} is neither a model directory nor a .gguf file")


def load_model(path: str | Path, *, adapters: str | Path | Sequence[str | Path] | None = None, dtype: str = "auto",
               sharding_for: ShardingFn = single_device, progress: bool = True):
    """(Decoder, Tokenizer) from a converted directory, an HF directory, a .gguf file (or a Hub id in
    the local Hugging Face cache) or a PEFT adapter folder (its base, merged with it); `adapters`, a
    PEFT LoRA directory or a list of them, are then merged into the weights one after another.
    dtype auto: the backend's compute dtype (dtypes.py)."""
    jdtype = DTYPES[compute_dtype(dtype)]
    path, stacked = base_and_adapters(path)
    adapters = [*stacked, *_adapter_dirs(adapters)]
    if is_converted(path):
        model, tok = load_converted(path, dtype=jdtype, param_dtype=jdtype, sharding_for=sharding_for)
    else:
        cfg, source, tok = open_source(path)
        model = load_decoder(source, cfg, dtype=jdtype, param_dtype=jdtype, sharding_for=sharding_for,
                             progress=progress)
    for adapter in adapters:  # the previous weights are dropped as each merge is made
        model = merged_from_peft(model, adapter)
    return model, tok
