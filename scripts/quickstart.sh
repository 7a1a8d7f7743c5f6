#!/usr/bin/env bash
# One command, fresh machine, no Hub access: set up .venv, then fine-tune MiniLM-L6 on Rotten Tomatoes
# snippets on 2 CPU processes (gloo) through `accelerate launch`. Extra arguments are recipe overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # fail fast rather than wait on a network
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"                          # 2 ranks share 2 cores
.venv/bin/accelerate launch --config_file accelerate_configs/cpu.yaml \
    -m launcher train recipes/quickstart.yaml output.overwrite=true "$@"
