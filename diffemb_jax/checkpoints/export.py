"""The way out: a decoder back to a Hugging Face directory that transformers (or Dream's and LLaDA's own
code) loads.

`config.json` in the family's own field names, `model.safetensors` (or shards with
`model.safetensors.index.json` past `max_shard_bytes`) written tensor by tensor under the names the
key maps give, and `tokenizer.json`. Everything is written into a temporary directory next to
`out_dir` and renamed into place, so a reader never sees half of one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from diffemb_jax import atomic
from diffemb_jax.checkpoints import sentence_transformers as st
from diffemb_jax.checkpoints.checkpoint import base_and_adapters, checkpoint_dtype_bytes, load_model, model_config, resolve
from diffemb_jax.checkpoints.dtypes import stored_dtype
from diffemb_jax.checkpoints.families import CARRIED_FIELDS, FAMILIES, hf_config
from diffemb_jax.checkpoints.keymaps import KeyMap, is_transposed
from diffemb_jax.checkpoints.sources import CheckpointError
from diffemb_jax.errors import ConfigError, UserError
from diffemb_jax.model import Decoder

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_SAFETENSORS_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


# ------------------------------------------------------------------------------------------- tensors

def base_params(model: Decoder) -> list[tuple[tuple, nnx.Variable]]:
    """(path, variable) of every parameter; refuses a model still carrying LoRA adapters."""
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    lora = [".".join(map(str, p)) for p, v in flat if isinstance(v, nnx.LoRAParam)]
    if lora:
        raise UserError(f"the model carries LoRA adapters ({lora[0]}, ...): merge them first "
                         "(diffemb_jax.model.lora.merge_lora) or write them with "
                         "diffemb_jax.checkpoints.peft_adapters.save_peft_adapter")
    return flat


def _host(value: jax.Array, name: str) -> np.ndarray:
    if not getattr(value, "is_fully_addressable", True):
        raise UserError(f"{name} is spread over several processes: export from a single process")
    return np.asarray(jax.device_get(value))


class _Tensor:
    """One tensor to write: its HF name and layout, read from the device only when written."""

    def __init__(self, name: str, variable, transposed: bool, dtype: np.dtype):
        self.name, self.variable, self.transposed, self.dtype = name, variable, transposed, dtype
        shape = tuple(variable.shape)
        self.shape = shape[::-1] if transposed else shape
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * dtype.itemsize

    def array(self) -> np.ndarray:
        value = _host(self.variable[...], self.name)
        return np.ascontiguousarray((value.T if self.transposed else value).astype(self.dtype))


def _tensors(model: Decoder, dtype: np.dtype) -> list[_Tensor]:
    # A model without its untied head is written as the bare decoder writes itself: names without "model."
    keymap = KeyMap(model.cfg.model_type, model.cfg.tie_word_embeddings, prefixed=model.cfg.lm_head)
    return [_Tensor(keymap.to_hf_name(path), var, is_transposed(path), dtype) for path, var in base_params(model)]


def _plan_shards(tensors: list[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    shards, size = [[]], 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_safetensors(path: Path, tensors: list[_Tensor], progress=None) -> None:
    """The safetensors layout (8-byte header length, JSON header, raw little-endian data), written one
    tensor at a time so the host holds one tensor, never the whole model."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors:
            t.array().tofile(f)
            if progress is not None:
                progress.update(1)


def _write_weights(directory: Path, tensors: list[_Tensor], max_shard_bytes: int, progress: bool) -> None:
    shards = _plan_shards(tensors, max_shard_bytes)
    with tqdm(total=len(tensors), desc="writing weights", unit="tensor", disable=not progress) as bar:
        if len(shards) == 1:
            write_safetensors(directory / "model.safetensors", tensors, bar)
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(directory / name, shard, bar)
            weight_map |= {t.name: name for t in shard}
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------------------------------- directories

def export_hf(model: Decoder, tokenizer, out_dir: str | Path, *, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, extra_config: dict | None = None,
              progress: bool = True, finish: Callable[[Path], None] | None = None) -> Path:
    """A plain (or merged) decoder -> a Hugging Face directory at `out_dir`, which must not exist yet.

    qwen2/qwen3/llama/mistral load with transformers' AutoModelForCausalLM; Dream and LLaDA get their own
    config fields and tensor names (their modelling code is theirs). A tied head writes no head tensor.
    A model without its untied head (loaded from a bare decoder's checkpoint) is written as that bare
    decoder: its AutoModel class in `architectures` (Qwen2Model, LlamaModel, ...), names without
    "model.", no head; Dream and LLaDA, whose code has no such class, refuse.
    `extra_config` adds fields the ModelConfig does not hold (bos/eos/pad token ids); `finish(folder)`
    writes more files (a sentence-transformers folder's modules) before the folder is renamed into place."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"dtype must be one of {tuple(EXPORT_DTYPES)}, got {dtype!r}")
    if max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    atomic.new_directory(out_dir)
    config = hf_config(model.cfg, dtype=dtype, extra=extra_config)
    tensors = _tensors(model, EXPORT_DTYPES[dtype])

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(model.cfg.model_type, dtype, lm_head=model.cfg.lm_head))
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_weights(tmp, tensors, max_shard_bytes, progress)
        if finish is not None:
            finish(tmp)

    return atomic.write_new_directory(out_dir, fill)


def model_card(model_type: str, dtype: str, *, lm_head: bool = True) -> str:
    """The export's README.md: what it holds and how to load it, with the remote code it needs."""
    family = FAMILIES[model_type]
    if not lm_head:
        return "\n".join([
            f"# {family.bare_architecture} exported by diffemb-jax", "",
            f"A Hugging Face directory ({model_type}, {dtype}): config.json, safetensors weights, tokenizer.json.", "",
            f"The bare decoder, without an LM head (its source checkpoint had none): load it with "
            f"`transformers.AutoModel.from_pretrained(THIS_FOLDER)` ({family.bare_architecture}). "
            f"`AutoModelForCausalLM` would add a randomly initialised head.", "",
            "To embed as diffemb-jax does, pool the final hidden states (mean by default) under the attention "
            "the model was trained with (bidirectional by default): a plain transformers forward of a decoder "
            "attends causally.", ""])
    lines = [f"# {family.architecture} exported by diffemb-jax", "",
             f"A Hugging Face directory ({model_type}, {dtype}): config.json, safetensors weights, tokenizer.json.", ""]
    if family.remote_code:
        files = ", ".join(f"`{f}`" for f in family.code_files)
        lines += [f"transformers reads {model_type} with the model's own code, which this folder does not "
                  f"carry: place {files} from the Hugging Face repository `{family.code_repo}` in this "
                  "folder (config.json's `auto_map` names their classes), then load it with "
                  "`AutoModel.from_pretrained(THIS_FOLDER, trust_remote_code=True)`.", ""]
    else:
        lines += ["Load it with `transformers.AutoModelForCausalLM.from_pretrained(THIS_FOLDER)` (or `AutoModel` "
                  "for the bare decoder).", ""]
    lines += ["To embed as diffemb-jax does, pool the final hidden states (mean by default) under the attention "
              "the model was trained with (bidirectional by default): a plain transformers forward of a decoder "
              "attends causally.", ""]
    return "\n".join(lines)


def _source_fields(src: Path) -> dict:
    """bos/eos/pad token ids and auto_map from an HF source's config.json (a ModelConfig keeps neither)."""
    config = src / "config.json"
    if not (src.is_dir() and config.exists()):
        return {}
    try:
        hf = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {key: hf[key] for key in CARRIED_FIELDS if hf.get(key) is not None}


def export(src: str | Path, out: str | Path, *, adapter=None, dtype: str = "auto",
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Path:
    """Converted directory, HF directory, .gguf or PEFT adapter folder -> HF directory at `out`; with
    `adapter` (a PEFT LoRA directory, or a list merged in order) the adapters are merged into the
    weights first, kernel by kernel. dtype auto: the checkpoint's own (dtypes.py)."""
    atomic.new_directory(out)  # before any slow loading
    dtype = stored_dtype(dtype, lambda: checkpoint_dtype_bytes(src))
    model, tokenizer = load_model(src, adapters=adapter, dtype=dtype, progress=progress)
    return export_hf(model, tokenizer, out, dtype=dtype, max_shard_bytes=max_shard_bytes,
                     extra_config=_source_fields(base_and_adapters(src)[0]), progress=progress)



def _pad_token(tokenizer, fields: dict) -> str:
    """A token for sentence-transformers to pad with (masked, so any will do): the model's pad or eos
    token, else its first special token, else token 0."""
    for key in ("pad_token_id", "eos_token_id"):
        ids = fields.get(key)
        ids = ids[0] if isinstance(ids, list) and ids else ids
        if isinstance(ids, int) and tokenizer.id_to_token(ids) is not None:
            return tokenizer.id_to_token(ids)
    special = sorted(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)
    return tokenizer.id_to_token(special[0] if special else 0)


def export_sentence_transformers(src: str | Path, out: str | Path, *, attention: str = "bidirectional",
                                 pooling: str | None = None, skip_instruction: bool | None = None,
                                 max_length: int | None = None, prompts: dict[str, str] | None = None,
                                 default_prompt_name: str | None = None, adapter=None,
                                 dtype: str = "auto", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                                 progress: bool = True) -> Path:
    """`src` -> a sentence-transformers folder at `out` whose `SentenceTransformer(out).encode` equals
    this project's encoding with causal attention, `pooling` (mean, last_token, weighted_mean),
    `skip_instruction` (include_prompt false), `max_length` and the prompts. A sentence-transformers
    source gives the defaults of all four; else mean, pooled whole, 512, none.

    sentence-transformers runs a decoder causally and cannot run it bidirectionally, so `attention`
    must be "causal": the caller says the model is meant to be used so. Refused otherwise, rather
    than written with a note, because a folder that loads and silently gives other vectors than the
    model was trained to give is worse than none. Dream and LLaDA (remote code) are refused too."""
    if attention != "causal":
        raise ConfigError(f"attention {attention!r}: sentence-transformers runs a decoder with causal attention only, "
                         "so a model embedded bidirectionally (diffemb's default) gives other vectors there. If the "
                         "model is meant to be used causally, pass --attention causal; else export the plain Hugging "
                         "Face directory (--format hf)")
    atomic.new_directory(out)  # before any slow loading
    dtype = stored_dtype(dtype, lambda: checkpoint_dtype_bytes(src))
    cfg = model_config(src)
    if FAMILIES[cfg.model_type].remote_code:
        raise CheckpointError(f"{src}: {cfg.model_type} runs its own remote code in transformers, which "
                              "sentence-transformers would have to trust and which attends bidirectionally; "
                              "export the plain Hugging Face directory (--format hf) instead")
    source = resolve(src)
    folder = st.read_folder(source) if st.is_sentence_transformers(source) else None
    pooling = pooling or (folder.pooling if folder else "mean")
    if skip_instruction is not None:
        include_prompt = not skip_instruction
    else:
        include_prompt = folder.include_prompt if folder else True
    max_length = max_length or (folder and folder.max_seq_length) or 512
    if prompts is None and folder is not None:
        prompts, default_prompt_name = folder.prompts, default_prompt_name or folder.default_prompt_name
    prompts = prompts or {}
    model, tokenizer = load_model(src, adapters=adapter, dtype=dtype, progress=progress)
    fields = _source_fields(base_and_adapters(src)[0])

    def finish(directory: Path) -> None:
        st.write_modules(directory, hidden_size=cfg.hidden_size, pooling=pooling, include_prompt=include_prompt,
                         max_seq_length=max_length, prompts=prompts, default_prompt_name=default_prompt_name,
                         pad_token=_pad_token(tokenizer, fields))
        (directory / "README.md").write_text(st.model_card(
            cfg.model_type, dtype, pooling=pooling, include_prompt=include_prompt, max_seq_length=max_length,
            prompts=prompts, default_prompt_name=default_prompt_name))

    return export_hf(model, tokenizer, out, dtype=dtype, max_shard_bytes=max_shard_bytes, extra_config=fields,
                     progress=progress, finish=finish)
