"""Open any model path (HF directory, .gguf file, converted directory) and write converted ones.

A converted directory holds `diffemb.json` (the ModelConfig and where it came from), `params/` (an
orbax checkpoint) and `tokenizer.json`. It is written under a temporary name and renamed into place,
so a reader never sees half of one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import tokenizers
from flax import nnx

from diffemb_jax import atomic
from diffemb_jax.checkpoints.loader import abstract_decoder, load_decoder
from diffemb_jax.parallel import ShardingFn, placed_shapes, single_device
from diffemb_jax.checkpoints.sources import CheckpointError, GGUFSource, gguf_config, open_weights
from diffemb_jax.checkpoints.families import config_from_hf, config_from_hf_file
from diffemb_jax.checkpoints.keymaps import fit_to_checkpoint
from diffemb_jax.checkpoints.sentence_transformers import is_sentence_transformers, read_folder
from diffemb_jax.model import Decoder, ModelConfig

CONVERTED_MARKER = "diffemb.json"
CONVERTED_KEYS = ("format_version", "source", "param_dtype", "config")  # what CONVERTED_MARKER holds
FORMAT_VERSION = 1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


def convert(src: str | Path, out: str | Path, *, dtype: str = "float32", progress: bool = True) -> Path:
    """HF directory or .gguf -> converted directory at `out` (which must not exist yet)."""
    out = atomic.new_directory(out)  # before any slow loading
    cfg, source, tok = open_source(src)
    model = load_decoder(source, cfg, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype], progress=progress)
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
    """The ModelConfig of a converted directory, an HF directory or a .gguf file; no weights are read."""
    path = model_directory(resolve(path))
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


def load_model(path: str | Path, *, dtype: str = "float32", sharding_for: ShardingFn = single_device,
               progress: bool = True):
    """(Decoder, Tokenizer) from a converted directory, an HF directory or a .gguf file (or a Hub id
    in the local Hugging Face cache, or a sentence-transformers folder of one)."""
    path = model_directory(resolve(path))
    jdtype = DTYPES[dtype]
    if is_converted(path):
        return load_converted(path, dtype=jdtype, param_dtype=jdtype, sharding_for=sharding_for)
    cfg, source, tok = open_source(path)
    return load_decoder(source, cfg, dtype=jdtype, param_dtype=jdtype, sharding_for=sharding_for,
                        progress=progress), tok
