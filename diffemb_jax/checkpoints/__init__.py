"""Weights in and out: HF safetensors / .bin, GGUF, converted directories, PEFT LoRA adapters."""

from diffemb_jax.checkpoints.checkpoint import convert, is_converted, load_model, model_config, open_source, save_converted
from diffemb_jax.checkpoints.export import export as export_model  # not `export`: that name is the module
from diffemb_jax.checkpoints.sources import CheckpointError

__all__ = ["CheckpointError", "convert", "export_model", "is_converted", "load_model", "model_config", "open_source",
           "save_converted"]
