"""Shorter embeddings from a Matryoshka-trained model: the first N components of each vector, L2-
normalised again (sentence-transformers' truncate_dim). Done on the host, after encoding at full size,
so one encode serves every N."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffemb_jax.errors import ConfigError


def check_dimensions(dimensions: Sequence[int], width: int, flag: str = "--dimensions") -> None:
    """ValueError unless every N is in 1..width (the model's embedding size)."""
    bad = [n for n in dimensions if not 1 <= n <= width]
    if bad:
        raise ConfigError(f"{flag} {bad[0]}: the model's embeddings have {width} components; "
                         f"give a number from 1 to {width}")


def truncate(vectors: np.ndarray, dimensions: int) -> np.ndarray:
    """[n, D] -> [n, dimensions] float32: the first `dimensions` components, each row L2-normalised."""
    vectors = np.asarray(vectors, np.float32)
    check_dimensions([dimensions], vectors.shape[-1])
    cut = vectors[..., :dimensions]
    return cut / np.maximum(np.linalg.norm(cut, axis=-1, keepdims=True), 1e-12)


def parse_dimensions(text: str) -> tuple[int, ...]:
    """"64,128,256" -> (64, 128, 256); ValueError naming what is not a positive integer."""
    try:
        dims = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"{text!r}: give positive integers separated by commas, e.g. 64,128,256") from None
    if not dims or min(dims) < 1:
        raise ConfigError(f"{text!r}: give positive integers separated by commas, e.g. 64,128,256")
    return dims
