"""The decoder shared by every family, and its config."""

from diffemb_jax.model.config import (SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedConfigError,
                                      config_from_hf, config_from_hf_file)
from diffemb_jax.model.decoder import ATTENTION_MODES, Decoder

__all__ = ["ATTENTION_MODES", "SUPPORTED_MODEL_TYPES", "Decoder", "ModelConfig", "UnsupportedConfigError",
           "config_from_hf", "config_from_hf_file"]
