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


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message says which file and what to do."""


class TensorSource(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray: ...


def _shard_files(directory: Path, single: str, index_name: str) -> dict[str, Path]:
    """tensor name -> file, from an index json (sharded) or a single file."""
    index = directory / index_name
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: directory / f for name, f in weight_map.items()}
        for f in set(files.values()):
            if not f.exists():
                raise CheckpointError(f"{index} names shard {f.name}, which is missing from {directory}")
        return files
    if (directory / single).exists():
        return {}
    raise CheckpointError(f"no {single} or {index_name} in {directory}")


class SafetensorsSource:
    """Memory-mapped safetensors; slices are read lazily (bf16 included, through ml_dtypes)."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        files = _shard_files(directory, "model.safetensors", "model.safetensors.index.json")
        paths = sorted(set(files.values())) or [directory / "model.safetensors"]
        self._handles = {p: safe_open(str(p), framework="flax") for p in paths}
        self._where = {}
        for p, handle in self._handles.items():
            for name in handle.keys():
                self._where[name] = p
        self._slices = {}

    def names(self) -> list[str]:
        return list(self._where)

    def _slice(self, name):
        if name not in self._slices:
            self._slices[name] = self._handles[self._where[name]].get_slice(name)
        return self._slices[name]

    def shape(self, name):
        return tuple(self._slice(name).get_shape())

    def read(self, name, index):
        return np.asarray(self._slice(name)[index])


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
        import torch

        files = _shard_files(directory, "pytorch_model.bin", "pytorch_model.bin.index.json")
        paths = sorted(set(files.values())) or [directory / "pytorch_model.bin"]
        self._tensors = {}
        for p in paths:
            try:
                state = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises several types for corrupt or unsafe files
                raise CheckpointError(f"{p}: cannot be read as a weights-only PyTorch checkpoint ({e})") from e
            self._tensors.update(state)


class GGUFSource(_TorchTensors):
    """A .gguf file, dequantised by transformers' GGUF loader into HF tensor names.

    GGUF tensors are quantised blocks, so they are dequantised whole (one float32 copy in host
    memory); transformers also undoes llama.cpp's q/k row permutation.
    """

    def __init__(self, path: Path):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        try:
            self.hf_config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception as e:
            raise CheckpointError(f"{path}: not a GGUF file transformers can read ({e})") from e
        with torch.device("meta"):  # the key map only; no memory
            skeleton = AutoModelForCausalLM.from_config(self.hf_config)
        loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
        self._tensors = loaded["tensors"]


def open_weights(directory: Path) -> TensorSource:
    """safetensors if the directory has them, else PyTorch .bin."""
    if any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").exists():
        return SafetensorsSource(directory)
    if any(directory.glob("*.bin")) or (directory / "pytorch_model.bin.index.json").exists():
        return TorchBinSource(directory)
    raise CheckpointError(f"{directory} has no model weights (*.safetensors or pytorch_model*.bin)")
