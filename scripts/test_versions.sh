#!/usr/bin/env bash
# Run the version-sensitive parts of the suite (parity, prefill-once, prefix cache, the cache API, ecosystem, Triton
# generate, tensor parallelism, the family walk, the rows' lifecycle, device maps, layer groups, storage, conformance)
# against other Transformers releases, each in its own virtual environment under .venv-tf/.
#
#   bash scripts/test_versions.sh                 # the oldest and a middle 5.x (5.0.0, 5.17.0: the device machine's)
#   bash scripts/test_versions.sh 5.3.0 5.20.2    # any others
#
# The newest 5.x is not here: scripts/test.sh runs the whole suite on it. Each venv sees the current interpreter's
# packages (torch, triton, pytest), whether that interpreter is a venv or not (scripts/make_venv.py: a plain
# --system-site-packages venv made inside a venv would see the base interpreter's packages instead), gets the
# Transformers release on top, and hf_paged from this checkout (--no-deps, editable). Set PYTHON to choose the
# interpreter whose packages are reused (default python3; CI runs scripts/install.sh into it first).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(5.0.0 5.17.0)
TESTS=(tests/test_generate_parity.py tests/test_prefill_once.py tests/test_prefix_cache.py tests/test_cache.py
       tests/test_ecosystem.py tests/test_triton_generate.py tests/test_tensor_parallel.py tests/test_families.py
       tests/test_lifecycle.py tests/test_device_map.py tests/test_layer_groups.py tests/test_storage.py
       tests/test_conformance.py tests/test_quantized_kv.py
       # the version-sensitive tests of files not run here as a whole
       tests/test_attention.py::test_both_attention_paths_for_rows_sharing_prompts
       tests/test_attention.py::test_single_sequence_reads_its_blocks_in_place
       tests/test_attention.py::test_single_row_crossing_slabs_is_read_in_place
       tests/test_ops.py::test_ranges_attention_equals_paged_attention
       tests/test_support.py::test_unsupported_family_fails_clearly
       tests/test_support.py::test_unsupported_family_from_pretrained
       tests/test_support.py::test_unsupported_family_is_never_switched_to_hf_paged
       tests/test_support.py::test_encoder_decoder_model_fails_clearly
       tests/test_kernels.py::test_invalid_backend_environment_variable)
# Tests of those files that need a newer release than the oldest 5.x (both pass on 5.24.0, 2026-12-07): on 5.0.0
# Qwen3-Next keeps its cache in a class of its own (refused at load, where the test expects it to run), and
# DeepSeek-V3's layers take their latents gathered at every step (32 gathers, no kernel launch).
DESELECT=(--deselect tests/test_triton_generate.py::test_values_of_another_width_and_hybrids_run_through_the_triton_kernels
          --deselect tests/test_triton_generate.py::test_8bit_pools_run_through_the_triton_kernels)
# The device machine's image (scripts/gpu_check.sh runs there): its release also gets its Triton, and the tests that
# rehearse the GPU check and compile the kernels ahead of time with it (its interpreter is too old for the
# Triton-generate tests, which need 3.8).
DEVICE_TRANSFORMERS=5.17.0
DEVICE_TRITON=3.6.0
status=0
for version in "${VERSIONS[@]}"; do
    venv=.venv-tf/$version
    $PY scripts/make_venv.py "$venv"
    # A venv brings its own setuptools (65 on Python 3.11), which shadows the interpreter's and cannot build the
    # editable install below without `wheel`: give it what pyproject.toml's [build-system] asks for.
    "$venv/bin/python" -m pip install --quiet "setuptools>=69" wheel
    "$venv/bin/python" -m pip install --quiet "transformers==$version"
    # Transformers imports the Hub's `kernels` package whenever it is installed, and the newest Transformers brings
    # one (a dependency from 5.25) that older releases cannot use (5.0.0 fails at import): where the visible kernels
    # is outside the range this release declares (in its extras), install that range into the venv.
    kernels=$("$venv/bin/python" - <<'PY'
import importlib.metadata as md
from packaging.requirements import Requirement

declared = [Requirement(r) for r in md.requires("transformers") or [] if Requirement(r).name == "kernels"]
try:
    visible = md.version("kernels")
except md.PackageNotFoundError:
    visible = None
if declared and visible is not None and not declared[0].specifier.contains(visible, prereleases=True):
    print(f"kernels{declared[0].specifier}")
PY
)
    if [ -n "$kernels" ]; then
        echo "== transformers $version declares $kernels: installing it into $venv"
        "$venv/bin/python" -m pip install --quiet "$kernels"
    fi
    tests=("${TESTS[@]}")
    if [ "$version" = "$DEVICE_TRANSFORMERS" ]; then
        "$venv/bin/python" -m pip install --quiet "triton==$DEVICE_TRITON"
        tests=("${tests[@]/tests\/test_triton_generate.py}")
        tests+=(tests/test_gpu_check.py tests/test_kernels.py::test_ahead_of_time_compile_for_sm80_and_sm90)
    fi
    "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e .
    "$venv/bin/python" -c 'import sys, torch, transformers
print(f"== transformers {transformers.__version__} (torch {torch.__version__} from {torch.__file__}) in {sys.prefix}")'
    OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -p no:warnings -n 2 --dist loadfile "${DESELECT[@]}" ${tests[@]} \
        || status=1
done
exit $status
