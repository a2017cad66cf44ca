#!/usr/bin/env bash
# Install what the suite needs, then run the whole test suite (the command CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
$PY -m ruff check .
# Two pytest-xdist workers (CI's 2 cores), each taking whole files (a module's fixtures are built once): about 6
# minutes where one process takes 11. Arguments come after, so `-n 0` runs in one process and `-n 4` on four.
exec $PY -m pytest -q -n 2 --dist loadfile "$@"
