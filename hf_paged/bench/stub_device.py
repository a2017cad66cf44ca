"""A launch-stub device: hf_paged's Triton kernels compiled for an H100 (sm_90) on a machine without a GPU, every
launch a counted no-op.

`install` makes `FakeCudaDriver` Triton's active driver and lets the `hf_paged.kernels` launchers take CPU tensors
(their device check normally wants CUDA, or Triton's interpreter). With ``HF_PAGED_BACKEND=triton`` a model on the CPU
then runs hf_paged's Triton path as it would on a GPU, host side included:

* every kernel variant the JIT specialises is compiled for real by Triton's NVIDIA backend for
  ``GPUTarget("cuda", 90, 32)`` (TTIR to cubin, ptxas included), then "loaded" and "launched" by counters
  (`COUNTS`); the JIT's caches, specialisations and hooks (``triton.knobs.runtime``: launch and compile hooks, as
  `hf_paged.bench.steps.StepRecorder` uses them) behave as on a GPU;
* a launch computes nothing: kernel outputs are whatever their ``torch.empty`` held and the KV pool is never
  written. Tokens are garbage, so a timed run must not depend on them: greedy, ``min_new_tokens = max_new_tokens``.

What it measures is the host: the Python and PyTorch work around each launch (block tables, metadata, launcher
checks, the JIT's argument binding), not the kernels. The device it reports is `PROPERTIES` (132 SMs); the kernels'
split-KV heuristic sees a CPU tensor and uses its own default (also 132). The test rehearsal of the device check
(``tests/rehearsal/fake_cuda.py``) uses the same driver, and computes each launch's result with the PyTorch
reference besides.

Install it in a process of its own (the bench's ``host`` scenario runs in a subprocess): it replaces the real CUDA
driver for the rest of the process.
"""

from __future__ import annotations

import collections
import functools
import inspect
import sys

import torch

__all__ = ["COUNTS", "PROPERTIES", "FakeCudaDriver", "accept_cpu", "accept_cpu_tensors", "activate", "install",
           "problem"]

#: ``loads`` (modules loaded), ``launches`` and ``launches <kernel name>``, for the whole process.
COUNTS: collections.Counter = collections.Counter()
#: The device the fake driver reports: an H100 SXM (sm_90, 132 SMs, 227 KB of shared memory per block).
PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
              "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}
#: The kernel modules whose launchers check devices (each imported ``check_device`` into its namespace).
KERNEL_MODULES = ("paged_attention", "reshape_and_cache", "copy_blocks", "shared_prefix_attention")


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        COUNTS["loads"] += 1
        return COUNTS["loads"], COUNTS["loads"], 0, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return dict(PROPERTIES)

    def unload_module(self, module):
        pass


class _Launcher:
    """Stands for a compiled kernel's launcher: counts the launch and calls Triton's launch hooks, as the real one
    does, so `hf_paged.bench.steps.StepRecorder` counts it."""

    def __init__(self, src, metadata):
        self.name = getattr(src, "name", None) or getattr(getattr(src, "fn", None), "__name__", "kernel")

    def __call__(self, grid_x, grid_y, grid_z, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        if min(grid_x, grid_y, grid_z) <= 0:
            raise ValueError(f"{self.name}: empty grid {(grid_x, grid_y, grid_z)}")
        COUNTS["launches"] += 1
        COUNTS[f"launches {self.name}"] += 1
        if enter_hook is not None:
            enter_hook(launch_metadata)
        if exit_hook is not None:
            exit_hook(launch_metadata)


class FakeCudaDriver:
    """Triton's driver interface for a GPU that is not there: sm_90, device 0, stream 0."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)
        self.utils = _Utils()
        self.launcher_cls = _Launcher
        self.backend = "cuda"

    def is_active(self):
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("the fake CUDA driver (hf_paged.bench.stub_device) cannot time kernels")


def problem() -> str | None:
    """Why the kernels cannot be compiled for sm_90 here (no Triton, no NVIDIA backend, no ptxas), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as error:
        return f"needs Triton with its NVIDIA backend ({error})"
    from hf_paged.kernels import TRITON_PROBLEM

    if TRITON_PROBLEM is not None:
        return f"hf_paged.kernels {TRITON_PROBLEM}"
    try:  # Triton < 3.5 ships one ptxas for every architecture: its `get_ptxas` takes no argument.
        get_ptxas(90) if inspect.signature(get_ptxas).parameters else get_ptxas()
    except Exception as error:  # whatever finding the tool raises: its message is the reason
        return f"needs ptxas ({type(error).__name__}: {error})"
    return None


def activate() -> FakeCudaDriver:
    """Make a `FakeCudaDriver` Triton's active driver (once; later calls return the same one)."""
    from triton.runtime.driver import driver

    # `driver.active` would build the default driver first, which fails where there is no GPU: ask the slot.
    active = getattr(driver, "_active", None)
    if not isinstance(active, FakeCudaDriver):
        active = FakeCudaDriver()
        driver.set_active(active)
    return active


def accept_cpu(check_device):
    """`check_device` that also accepts tensors all on the CPU (the fake GPU's tensors live there)."""
    if getattr(check_device, "accepts_cpu", False):
        return check_device

    @functools.wraps(check_device)
    def check(**tensors):
        named = {name: t for name, t in tensors.items() if t is not None}
        devices = {t.device for t in named.values()}
        if devices == {torch.device("cpu")}:
            return torch.device("cpu")
        return check_device(**tensors)

    check.accepts_cpu = True
    return check


def accept_cpu_tensors(kernels) -> None:
    """Let the launchers of `kernels` (the imported ``hf_paged.kernels``) take CPU tensors; no-op without Triton."""
    if not kernels.HAS_TRITON:
        return
    for module in KERNEL_MODULES:
        loaded = sys.modules[f"{kernels.__name__}.{module}"]
        loaded.check_device = accept_cpu(loaded.check_device)


def install() -> None:
    """Compile hf_paged's kernels for sm_90 and stub their launches, in this process (see the module docstring).

    Raises RuntimeError when `problem` says it cannot work here."""
    reason = problem()
    if reason is not None:
        raise RuntimeError(f"hf_paged: the launch-stub device {reason}")
    activate()
    from hf_paged import kernels

    accept_cpu_tensors(kernels)
