"""Where checkpoint tensors come from: safetensors (single or sharded), PyTorch .bin, GGUF.

Every source answers names(), shape(name) and read(name, index): `index` is a tuple of slices in the
source's own layout, so a loader asks only for the slice a device owns and no source ever has to
hold a second full copy of the model in host memory (safetensors and .bin are memory-mapped).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from diffemb_jax.errors import UserError


class CheckpointError(UserError):
    """A checkpoint that cannot be read as asked; the message says which file and what to do."""


class TensorSource(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray: ...


def _shard_files(directory: Path, single: str, index_name: str) -> dict[str, Path]:
    """tensor name -> file, from an index json (sharded) or a single file."""
    index = directory / index_name
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a shard index: expected JSON with a \"weight_map\" of tensor "
                                  f"name -> shard file ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: \"weight_map\" must map each tensor name to a shard file name")
        files = {name: directory / f for name, f in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing from {directory}")
        return files
    if (directory / single).exists():
        return {}
    raise CheckpointError(f"no {single} or {index_name} in {directory}")


def _safetensors_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    plain = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
             "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
    return {**{k: np.dtype(v) for k, v in plain.items()}, "BF16": np.dtype(ml_dtypes.bfloat16),
            "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


class SafetensorsSource:
    """Memory-mapped safetensors, read as numpy views of the mapped file (bf16 through ml_dtypes), so
    a slice costs one copy of its own bytes. (The safetensors package reads bf16 only into a
    framework's arrays: through JAX that put each tensor on the device and brought it back.)
    The format: an 8-byte little-endian header size, a JSON header of each tensor's dtype, shape and
    byte offsets in the data that follows."""

    def __init__(self, directory: Path):
        files = _shard_files(directory, "model.safetensors", "model.safetensors.index.json")
        paths = sorted(set(files.values())) or [directory / "model.safetensors"]
        dtypes = _safetensors_dtypes()
        self._tensors = {}
        for path in paths:
            try:
                mapped = np.memmap(path, dtype=np.uint8, mode="r")
            except ValueError:  # numpy cannot map an empty file
                raise CheckpointError(f"{path} is empty") from None
            size = int(mapped[:8].view("<u8")[0]) if len(mapped) >= 8 else -1
            try:
                header = json.loads(bytes(mapped[8 : 8 + size]))
            except (ValueError, UnicodeDecodeError):
                raise CheckpointError(f"{path} is not a safetensors file (its header does not parse)") from None
            if not isinstance(header, dict):
                raise CheckpointError(f"{path} is not a safetensors file (its header is not a JSON object)")
            header.pop("__metadata__", None)
            for name, info in header.items():
                begin, end, shape = _entry(path, name, info, dtypes)
                begin, end = 8 + size + begin, 8 + size + end
                if end > len(mapped):
                    raise CheckpointError(f"{path} is truncated: tensor {name} ends past the end of the file")
                self._tensors[name] = mapped[begin:end].view(dtypes[info["dtype"]]).reshape(shape)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name):
        return self._tensors[name].shape

    def read(self, name, index):
        return np.array(self._tensors[name][index])

    def dtype_bytes(self) -> dict[str, int]:
        """{dtype name: bytes stored}, from the headers."""
        return _bytes_by_dtype((t.dtype.name, t.nbytes) for t in self._tensors.values())


def _entry(path: Path, name: str, info, dtypes: dict) -> tuple[int, int, tuple[int, ...]]:
    """(begin, end, shape) of one header entry, checked: a malformed entry names the file and tensor."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise CheckpointError(f"{path}: the header entry of tensor {name} lacks dtype, shape or data_offsets")
    if info["dtype"] not in dtypes:
        raise CheckpointError(f"{path}: tensor {name} has dtype {info['dtype']}, which this reader "
                              f"does not know ({', '.join(dtypes)})")
    shape, offsets = info["shape"], info["data_offsets"]
    ints = lambda xs: isinstance(xs, list) and all(isinstance(x, int) and x >= 0 for x in xs)  # noqa: E731
    if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise CheckpointError(f"{path}: tensor {name} has a malformed shape {shape!r} or data_offsets {offsets!r}")
    if offsets[1] - offsets[0] != int(np.prod(shape)) * dtypes[info["dtype"]].itemsize:
        raise CheckpointError(f"{path}: tensor {name}'s data_offsets span {offsets[1] - offsets[0]} bytes, but its "
                              f"shape {shape} of {info['dtype']} needs {int(np.prod(shape)) * dtypes[info['dtype']].itemsize}")
    return offsets[0], offsets[1], tuple(shape)


def _torch():
    """torch, which .bin and GGUF checkpoints need (safetensors do not)."""
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading .bin and .gguf checkpoints needs PyTorch: pip install 'diffemb-jax[torch]' "
                              "(or convert the checkpoint to safetensors)") from None
    return torch


def _torch_to_numpy(tensor) -> np.ndarray:
    import ml_dtypes
    import torch

    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


class _TorchTensors:
    """A source over a dict of torch tensors (memory-mapped or dequantised)."""

    _tensors: dict

    def names(self):
        return list(self._tensors)

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def read(self, name, index):
        return _torch_to_numpy(self._tensors[name][index].contiguous())


class TorchBinSource(_TorchTensors):
    """PyTorch .bin checkpoints, read with weights_only=True (never the file's own code) and mmap."""

    def __init__(self, directory: Path):
        torch = _torch()
        files = _shard_files(directory, "pytorch_model.bin", "pytorch_model.bin.index.json")
        paths = sorted(set(files.values())) or [directory / "pytorch_model.bin"]
        self._tensors = {}
        for p in paths:
            try:
                state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises several types for corrupt or unsafe files
                raise CheckpointError(f"{p}: cannot be read as a weights-only PyTorch checkpoint ({e})") from e
            self._tensors.update(state)

    def dtype_bytes(self) -> dict[str, int]:
        """{dtype name: bytes stored} (the tensors are memory-mapped: nothing is read)."""
        return _bytes_by_dtype((str(t.dtype).removeprefix("torch."), t.numel() * t.element_size())
                               for t in self._tensors.values())


class GGUFSource(_TorchTensors):
    """A .gguf file, dequantised by transformers' GGUF loader into HF tensor names.

    GGUF tensors are quantised blocks, so they are dequantised whole (one float32 copy in host
    memory); transformers also undoes llama.cpp's q/k row permutation.
    """

    def __init__(self, path: Path):
        torch = _torch()
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        self.hf_config = gguf_config(path)
        with torch.device("meta"):  # the key map only; no memory
            skeleton = AutoModelForCausalLM.from_config(self.hf_config)
        loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
        self._tensors = loaded["tensors"]


def _bytes_by_dtype(pairs) -> dict[str, int]:
    totals: dict[str, int] = {}
    for dtype, nbytes in pairs:
        totals[dtype] = totals.get(dtype, 0) + int(nbytes)
    return totals


_GGML_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def gguf_dtype_bytes(path: Path) -> dict[str, int]:
    """{dtype name: bytes stored} of a .gguf file, from its tensor table (quantised types by their GGML
    names, Q4_1 ...); the gguf reader memory-maps the file and reads no tensor data."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError("reading .gguf checkpoints needs the gguf package: pip install 'diffemb-jax[torch]'") from None
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises several types for a file that is not GGUF
        raise CheckpointError(f"{path}: not a GGUF file whose tensor table can be read ({e})") from e
    return _bytes_by_dtype((_GGML_FLOATS.get(t.tensor_type.name, t.tensor_type.name), t.n_bytes)
                           for t in reader.tensors)


def gguf_config(path: Path):
    """The transformers config of a .gguf file, from its header alone: transformers reads the metadata
    through the gguf package's memory-mapped reader and dequantises nothing unless asked for the
    tensors (tests/test_dtype_defaults.py holds it to that)."""
    _torch()  # transformers' GGUF reader needs it
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise CheckpointError(f"{path}: not a GGUF file transformers can read ({e})") from e


def open_weights(directory: Path) -> TensorSource:
    """safetensors if the directory has them, else PyTorch .bin."""
    if any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").exists():
        return SafetensorsSource(directory)
    if any(directory.glob("*.bin")) or (directory / "pytorch_model.bin.index.json").exists():
        return TorchBinSource(directory)
    raise CheckpointError(f"{directory} has no model weights (*.safetensors or pytorch_model*.bin)")
