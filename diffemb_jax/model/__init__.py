"""The decoder shared by every family, its config, and the options of a forward pass."""

from diffemb_jax.model.config import (SUPPORTED_MODEL_TYPES, ModelConfig, UnsupportedConfigError,
                                      config_from_hf, config_from_hf_file)
from diffemb_jax.model.decoder import Decoder
from diffemb_jax.model.options import ATTENTION_MODES, REMAT_POLICIES, ForwardOptions

__all__ = ["ATTENTION_MODES", "REMAT_POLICIES", "SUPPORTED_MODEL_TYPES", "Decoder", "ForwardOptions", "ModelConfig",
           "UnsupportedConfigError", "config_from_hf", "config_from_hf_file"]
