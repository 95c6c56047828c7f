"""`--dtype auto`: the one rule that turns a dtype name into float32 or bfloat16, so that convert,
export, encode, evaluate and serve agree on it.

Computing (encode, evaluate, serve): bfloat16 on a GPU or TPU (a 7B is 30 GB in float32, and cuDNN's
attention takes half precision only), float32 on a CPU, where bfloat16 matmuls are slow.
Storing (convert, export): the checkpoint's own dtype, read from its headers (checkpoint.py's
checkpoint_dtype), so nothing is rounded: bfloat16 weights stay bfloat16; float32, float16 (which
bfloat16 would round) and quantised GGUF blocks (dequantised to float32) are written as float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffemb_jax.errors import check_choice

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
DTYPE_CHOICES = ("auto", *DTYPES)
ACCELERATORS = ("gpu", "tpu", "cuda", "rocm")  # jax.default_backend() names that compute in bfloat16
COMPUTE_DTYPE_HELP = "weights and activations; auto (default): bfloat16 on a GPU or TPU, float32 on a CPU"
STORED_DTYPE_HELP = ("weights written; auto (default): the checkpoint's own, bfloat16 if most of its weight bytes "
                     "are bfloat16, else float32 (float16 and quantised GGUF too, which bfloat16 would round)")


def _checked(dtype: str) -> str:
    check_choice("dtype", dtype, DTYPE_CHOICES)
    return dtype


def compute_dtype(dtype: str) -> str:
    """`dtype`, or for auto the backend's: bfloat16 on a GPU or TPU, float32 on a CPU."""
    if _checked(dtype) != "auto":
        return dtype
    return "bfloat16" if jax.default_backend() in ACCELERATORS else "float32"


def stored_dtype(dtype: str, checkpoint_bytes) -> str:
    """`dtype`, or for auto that of the weights: `checkpoint_bytes()` gives {dtype name: bytes stored}
    (called only for auto, since it reads the checkpoint's headers)."""
    if _checked(dtype) != "auto":
        return dtype
    stored = checkpoint_bytes()
    return "bfloat16" if 2 * stored.get("bfloat16", 0) > sum(stored.values()) else "float32"
