"""Weights in (and, later, out): HF safetensors / .bin, GGUF, converted directories."""

from conversion.checkpoint import convert, is_converted, load_model, open_source, save_converted
from conversion.sources import CheckpointError

__all__ = ["CheckpointError", "convert", "is_converted", "load_model", "open_source", "save_converted"]
