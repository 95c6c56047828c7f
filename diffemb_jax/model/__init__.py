"""The decoder shared by every family, its config, and the options of a forward pass."""

from diffemb_jax.model.config import ModelConfig, UnsupportedConfigError
from diffemb_jax.model.decoder import Decoder
from diffemb_jax.model.options import ATTENTION_MODES, REMAT_POLICIES, ForwardOptions

__all__ = ["ATTENTION_MODES", "REMAT_POLICIES", "Decoder", "ForwardOptions", "ModelConfig", "UnsupportedConfigError"]
