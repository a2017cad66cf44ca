"""The Triton kernels and the backend switch, proven without a GPU.

* The kernels against their PyTorch references under Triton's CPU interpreter: ``tests/kernel_interpreter_cases.py``
  in a subprocess with ``TRITON_INTERPRET=1`` (Triton picks interpreter or compiler when a kernel is decorated, so
  the variable must be set before ``hf_paged.kernels`` is imported, and must not leak into this process).
* ``python -m hf_paged.kernels`` compiles every kernel for sm_80 and sm_90 without a GPU, with no spills, and the
  attention loop reaches the tensor cores.
* ``hf_paged.kernels`` imports without Triton and its launchers then fail clearly.
* `hf_paged.backend` (``HF_PAGED_BACKEND``) dispatches to the kernels or to `hf_paged.ops`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_triton_interpreter
from tiny_models import random_ids

TESTS = Path(__file__).parent


def run_python(*args: str, interpret: bool, timeout: float) -> subprocess.CompletedProcess:
    """Run ``python *args`` (working directory ``tests/``) with or without ``TRITON_INTERPRET=1``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, *args], cwd=TESTS, env=env, capture_output=True, text=True,
                          timeout=timeout)


@needs_triton_interpreter
def test_kernels_match_references_under_the_interpreter():
    pytest.importorskip("triton")
    run = run_python("-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "kernel_interpreter_cases.py"),
                     interpret=True, timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-2000:]


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


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import hf_paged.kernels as k\n"
        "assert not k.HAS_TRITON\n"
        "for name in ('reshape_and_cache', 'paged_attention', 'copy_blocks', 'shared_prefix_paged_attention'):\n"
        "    try:\n"
        "        getattr(k, name)()\n"
        "    except RuntimeError as exc:\n"
        "        assert 'needs Triton' in str(exc) and f'hf_paged.ops.{name}' in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError(name)\n"
        "print('ok')\n"
    )
    run = run_python("-c", code, interpret=False, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr


def test_cpu_tensors_without_the_interpreter_fail_clearly():
    pytest.importorskip("triton")
    from hf_paged.kernels import HAS_TRITON, copy_blocks
    from hf_paged.kernels._launch import interpreting

    if not HAS_TRITON or interpreting():
        pytest.skip("needs a usable Triton and kernels compiled for the GPU (no TRITON_INTERPRET=1)")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1") as error:
        copy_blocks(torch.zeros(1, 2, 2, 16, 1, 64), torch.tensor([0]), torch.tensor([1]))
    assert "hf_paged.ops" in str(error.value)


def test_backend_refuses_offset_tables_on_the_pytorch_path(monkeypatch):
    """Offset tables address slabs through raw pointers: only the kernels can use them. The PyTorch path copies
    slab by slab, and `hf_paged.backend` says so instead of copying the wrong blocks."""
    from hf_paged import backend, ops

    monkeypatch.setenv("HF_PAGED_BACKEND", "torch")
    pool = torch.arange(2 * 2 * 3 * 4 * 1 * 8, dtype=torch.float32).view(2, 2, 3, 4, 1, 8)
    src, dst = torch.tensor([0]), torch.tensor([2])
    with pytest.raises(ValueError, match="hf_paged: block offset tables address slabs for the Triton kernels only"):
        backend.copy_blocks(pool, src, dst, block_offsets=torch.arange(3) * pool.stride(2))
    expected = pool.clone()
    ops.copy_blocks(expected, src, dst)
    backend.copy_blocks(pool, src, dst)
    assert torch.equal(pool, expected) and not torch.equal(pool[:, :, 2], pool[:, :, 1])
    keys = torch.randn(3, 1, 8)
    slots = torch.tensor([1, -1, 9])
    key_cache, value_cache = pool[0, 0].clone(), pool[0, 1].clone()
    backend.reshape_and_cache(keys, 2 * keys, key_cache, value_cache, slots)
    assert torch.equal(key_cache.view(-1, 1, 8)[[1, 9]], keys[[0, 2]])
    assert torch.equal(value_cache.view(-1, 1, 8)[[1, 9]], 2 * keys[[0, 2]])
    with pytest.raises(TypeError, match="layer store with .base and .block_offsets"):
        backend.kernel_operands(object())


def test_invalid_backend_environment_variable(llama_pair, monkeypatch):
    _, paged = llama_pair
    monkeypatch.setenv("HF_PAGED_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="HF_PAGED_BACKEND"):
        paged.generate(random_ids(1, 6, seed=141), max_new_tokens=6, do_sample=False)
