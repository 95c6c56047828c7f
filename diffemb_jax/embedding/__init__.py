"""Prompts, pooling and the Embedder."""

from diffemb_jax.embedding.embedder import Embedder
from diffemb_jax.embedding.pooling import POOLING_MODES, pool
from diffemb_jax.embedding.prompts import SEPARATOR, tokenize, with_instruction

__all__ = ["Embedder", "POOLING_MODES", "SEPARATOR", "pool", "tokenize", "with_instruction"]
