#!/usr/bin/env bash
# Install everything and run the whole test suite: every notebook (nbdev-test), then tests/ (pytest). The README's test command; .ci/run calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export MPLBACKEND=Agg PYTHONHASHSEED=0
# nbdev-test runs 2 notebooks at once on 2 cores: one torch thread each avoids oversubscription (10-1000x slower small ops).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
bash scripts/install.sh dev
. .venv/bin/activate
echo "== install took $(( $(date +%s) - start ))s"
# Convert the default SLM (GGUF -> cached safetensors) once, before notebooks race for it.
python -c "from research_controller.slm import load_slm; m,t=load_slm(); print('default SLM ready:', type(m).__name__)"
echo "== nbdev-clean + nbdev-export (+ README from nbs/index.ipynb) must leave no diff"
nbdev-clean
nbdev-export
python .dev/sync_readme.py
if [ -n "$(git status --porcelain -- nbs research_controller README.md)" ]; then
  git status --porcelain -- nbs research_controller README.md
  git --no-pager diff --stat -- nbs research_controller README.md
  echo "nbdev-clean/nbdev-export/.dev/sync_readme.py changed files: run them and commit."
  echo "0 passed, 1 failed"
  exit 1
fi
echo "== nbdev-test, then pytest (tests/)"
RC_TEST_START=$start python scripts/run_tests.py   # prints the total time, then the closing "N passed, N failed" line
