#!/usr/bin/env bash
# The prepared device check (issues 11, 20), for a GPU machine without network: install this checkout, then run
# python -m hf_paged.bench.gpu_check (bandwidth, kernels on CUDA, fp32 parity, the bench, bf16 teacher-forced
# logits, a CPU+CUDA split, decode bytes; each phase with its own budget, the most valuable first) within
# GPU_CHECK_SECONDS (default 480) in all, writing results.json, results.md (after every phase), partial.json (the
# running phase's results so far) and phases.log under $OUT (gpu_results/): at most 6 files, so all come back.
#   bash scripts/gpu_check.sh          # on the GPU machine
#   bash scripts/gpu_check.sh --dry    # tiny, on the CPU (what tests/test_gpu_check.py runs)
# PYTHON names the interpreter (default python3); other arguments go to the Python driver.
set -euo pipefail
START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
TOTAL="${GPU_CHECK_SECONDS:-480}"

# Install a copy of the package's files (so nothing is built inside the checkout) into a folder of its own: no
# network (--no-index, --no-deps), the machine's own setuptools (--no-build-isolation). Where pip cannot build, copy
# the package as it is.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/src" && cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/hf_paged" "$WORK/src/"
SITE="$WORK/site"
if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$WORK/src" \
        >"$OUT/install.log" 2>&1; then
    echo "[gpu_check] pip install failed (see $OUT/install.log); copying the package instead"
    rm -rf "$SITE" && mkdir -p "$SITE"
    cp -r "$ROOT/hf_paged" "$SITE/hf_paged"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Run from $OUT: with the checkout as working directory, its hf_paged/ would be imported instead of the installed copy.
cd "$OUT"
"$PY" -c "import hf_paged, hf_paged.kernels; print('[gpu_check] hf_paged from', hf_paged.__file__)"
BUDGET=$(( TOTAL - ($(date +%s) - START) - 15 ))
"$PY" -m hf_paged.bench.gpu_check --repo "$ROOT" --out "$OUT" --budget "$BUDGET" "$@"
