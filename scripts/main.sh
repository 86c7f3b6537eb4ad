#!/usr/bin/env bash
# Install, then run the main job on the embedded defaults: one online-learning cycle
# (self-play -> train -> evaluate against the champion -> gated promotion), with a final report table.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
bash scripts/install.sh
. .venv/bin/activate
rc cycle "$@"
