"""Weights in and out: HF safetensors / .bin, GGUF, converted directories, PEFT LoRA adapters."""

from conversion.checkpoint import convert, is_converted, load_model, model_config, open_source, save_converted
from conversion.export import export as export_model  # not `export`: that name is the module
from conversion.sources import CheckpointError

__all__ = ["CheckpointError", "convert", "export_model", "is_converted", "load_model", "model_config", "open_source",
           "save_converted"]
