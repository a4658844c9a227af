#!/usr/bin/env bash
# Install everything (scripts/install.sh) and run the whole test suite, slow tests included.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` or `-k gpt`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV=${PAPERTRAIN_VENV:-.venv}
exec "$VENV/bin/python" -m pytest --durations=15 "$@"
