"""``python -m hf_paged.kernels`` compiles every kernel for sm_80 and sm_90 without a GPU, with no spills, and the
attention loop reaches the tensor cores."""

from __future__ import annotations

import pytest
from test_kernels import run_python


def test_ahead_of_time_compile_for_sm80_and_sm90():
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia")
    run = run_python("-m", "hf_paged.kernels", interpret=False, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    lines = run.stdout.splitlines()
    table = [line.split() for line in lines if line.startswith(("paged_attention", "reshape_and", "copy_", "reduce_", "shared_prefix"))]
    kernels = {row[0] for row in table}
    assert kernels == {"paged_attention_kernel", "reduce_splits_kernel", "reshape_and_cache_kernel",
                       "copy_blocks_kernel", "shared_prefix_kernel"}, run.stdout
    assert {"sm_80", "sm_90"} <= {cell for row in table for cell in row}
    attention = [line for line in lines if line.startswith(("paged_attention_kernel", "shared_prefix_kernel"))
                 and "fp32" not in line]
    assert attention and all("MMA" in line for line in attention), run.stdout  # tl.dot reached the tensor cores
    assert lines[-1].endswith("0 problems"), run.stdout
