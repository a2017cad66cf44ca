#!/usr/bin/env bash
# Run the version-sensitive parts of the suite (parity, prefill-once, prefix cache, errors, ecosystem, Triton
# generate, tensor parallelism, the family walk, block lifecycle, device maps, layer groups, slabs) against other Transformers releases, each in its own virtual environment under .venv-tf/.
#
#   bash scripts/test_versions.sh                 # the releases in VERSIONS below
#   bash scripts/test_versions.sh 5.3.0 5.20.2    # any others
#
# Each venv sees the current interpreter's packages (torch, triton, pytest: --system-site-packages), gets the
# Transformers release on top, and hf_paged from this checkout (--no-deps, editable). Set PYTHON to choose the
# interpreter whose packages are reused (default python3; CI runs scripts/install.sh into it first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(5.0.0 5.17.0 5.24.0)
TESTS=(tests/test_generate_parity.py tests/test_prefill_once.py tests/test_prefix_cache.py tests/test_errors.py
       tests/test_ecosystem.py tests/test_triton_generate.py tests/test_tensor_parallel.py tests/test_families.py
       tests/test_lifecycle.py tests/test_finished_rows.py tests/test_device_map.py tests/test_cache_layers.py
       tests/test_layer_groups.py tests/test_slabs.py)
status=0
for version in "${VERSIONS[@]}"; do
    venv=.venv-tf/$version
    if [ ! -x "$venv/bin/python" ]; then
        $PY -m venv --system-site-packages "$venv"
    fi
    # A venv brings its own setuptools (65 on Python 3.11), which shadows the interpreter's and cannot build the
    # editable install below without `wheel`: give it what pyproject.toml's [build-system] asks for.
    "$venv/bin/python" -m pip install --quiet "setuptools>=69" wheel
    "$venv/bin/python" -m pip install --quiet "transformers==$version"
    "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
    echo "== transformers $("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
    OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -p no:warnings "${TESTS[@]}" || status=1
done
exit $status
