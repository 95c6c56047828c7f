"""The decoder shared by every family, and its config."""

from diffemb_jax.model.config import ModelConfig, UnsupportedConfigError
from diffemb_jax.model.decoder import ATTENTION_MODES, Decoder

__all__ = ["ATTENTION_MODES", "Decoder", "ModelConfig", "UnsupportedConfigError"]
