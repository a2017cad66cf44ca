#!/usr/bin/env bash
# Set up what the demo needs, then chat with SmolLM2-135M using beam search on a paged KV cache.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" examples/quickstart.py "$@"
