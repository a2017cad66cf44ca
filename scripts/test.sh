#!/usr/bin/env bash
# Install what the suite needs, then run the whole test suite (the command CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
$PY -m ruff check .
exec $PY -m pytest -q "$@"
