"""A rehearsal of the device check on the CPU: the real kernels compiled for sm_90, launches stubbed.

The device check gets one run on a GPU it has never seen, so the suite rehearses that run here, against the device
image's versions where a venv provides them (``.venv-*`` with Triton 3.6 and Transformers 5.17). This module is
test harness, never product code:

* `FakeCudaDriver` is Triton's active driver: every kernel the JIT specialises is compiled for real by Triton's
  NVIDIA backend for ``GPUTarget("cuda", 90, 32)`` (TTIR to cubin, ptxas included), "loaded" and "launched" by
  counters. The JIT's own caches, specialisations and hooks (``triton.knobs.runtime``) behave as on a GPU, so the
  check's compile and launch counts are the ones the device would see.
* A stubbed launch computes nothing, so each `hf_paged.kernels` launcher is wrapped: the real launcher runs (its
  checks, its choice of variant, its compile and launch), then the PyTorch reference computes the result from the
  same operands. Blocks addressed through offset tables (pools of several slabs) are read and written at the
  addresses the kernels would use (CPU memory, aliased through ctypes), so the tables are checked too.
* Each process writes its counters (compiles, launches per kernel) to ``$HF_PAGED_REHEARSAL_COUNTS/<pid>.json``
  when it exits.

What it cannot check is the kernels' arithmetic: that is the interpreter's job here (``TRITON_INTERPRET=1``, where
the fake is not installed) and the device's.
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import functools
import importlib.abc
import importlib.util
import json
import os
import sys

import torch

COUNTS = collections.Counter()
#: The device the fake driver reports: an H100 SXM (sm_90, 132 SMs, 227 KB of shared memory per block).
PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
              "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}


class _Utils:
    def load_binary(self, name, kernel, shared, device):
        COUNTS["loads"] += 1
        return COUNTS["loads"], COUNTS["loads"], 0, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return dict(PROPERTIES)

    def unload_module(self, module):
        pass


class _Launcher:
    """Stands for the compiled kernel's launcher: counts the launch and calls Triton's launch hooks, as the real one
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
        raise RuntimeError("the rehearsal's fake CUDA driver cannot time kernels")


# ----------------------------------------------------------------------------------- references on aliased memory
def _alias(tensor: torch.Tensor, element_offset: int, shape: tuple, strides: tuple) -> torch.Tensor:
    """A view of CPU memory at ``tensor.data_ptr() + element_offset * element_size`` (another slab, perhaps)."""
    size = tensor.element_size()
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides, strict=True))
    raw = (ctypes.c_byte * (span * size)).from_address(tensor.data_ptr() + element_offset * size)
    return torch.frombuffer(raw, dtype=tensor.dtype, count=span).as_strided(shape, strides)


def _blocks(cache: torch.Tensor, offsets: torch.Tensor | None) -> list[torch.Tensor]:
    """Every block ``[bs, Hkv, D]`` of `cache`, each a view of the memory the kernels address."""
    if offsets is None:
        return list(cache.unbind(0))
    return [_alias(cache, int(offset), tuple(cache.shape[1:]), cache.stride()[1:]) for offset in offsets.tolist()]


def _dense(cache: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    return cache if offsets is None else torch.stack(_blocks(cache, offsets))


def _attention_reference(reference, query, key_cache, value_cache, *args, key_offsets=None, value_offsets=None,
                         **kwargs):
    values = value_offsets if value_offsets is not None else key_offsets
    return reference(query, _dense(key_cache, key_offsets), _dense(value_cache, values), *args, **kwargs)


def _reshape_and_cache_reference(key, value, key_cache, value_cache, slot_mapping, block_offsets=None,
                                 value_offsets=None):
    values = value_offsets if value_offsets is not None else block_offsets
    for states, cache, offsets in ((key, key_cache, block_offsets), (value, value_cache, values)):
        blocks, size = _blocks(cache, offsets), cache.shape[1]
        for token, slot in enumerate(slot_mapping.tolist()):
            if 0 <= slot < len(blocks) * size:
                blocks[slot // size][slot % size] = states[token].to(cache.dtype)
    return None


def _copy_blocks_reference(kv_pool, src, dst, block_offsets=None):
    from hf_paged import ops

    if block_offsets is None:
        return ops.copy_blocks(kv_pool, src, dst)
    layers, kinds = kv_pool.shape[:2]
    for layer in range(layers):
        for kind in range(kinds):
            view = kv_pool[layer, kind]
            blocks = _blocks(view, block_offsets)
            copies = [blocks[s].clone() for s in src.tolist()]
            for target, copy in zip(dst.tolist(), copies, strict=True):
                blocks[target].copy_(copy)
    return None


def _with_reference(launcher, reference):
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        launcher(*args, **kwargs)  # checks, variant, compile for sm_90, a counted launch
        return reference(*args, **kwargs)

    return run


def _accept_cpu(check_device):
    @functools.wraps(check_device)
    def check(**tensors):
        named = {name: t for name, t in tensors.items() if t is not None}
        devices = {t.device for t in named.values()}
        if devices == {torch.device("cpu")}:  # the fake GPU's tensors live on the CPU
            return torch.device("cpu")
        return check_device(**tensors)

    return check


def _patch_kernels(kernels) -> None:
    """Wrap `hf_paged.kernels`' launchers (see the module docstring); called right after it is imported."""
    if not kernels.HAS_TRITON:
        return
    from hf_paged import ops

    for module in ("paged_attention", "reshape_and_cache", "copy_blocks", "shared_prefix_attention"):
        loaded = sys.modules[f"{kernels.__name__}.{module}"]
        loaded.check_device = _accept_cpu(loaded.check_device)
    kernels.paged_attention = _with_reference(
        kernels.paged_attention, functools.partial(_attention_reference, ops.paged_attention))
    kernels.shared_prefix_paged_attention = _with_reference(
        kernels.shared_prefix_paged_attention, functools.partial(_attention_reference, ops.shared_prefix_paged_attention))
    kernels.reshape_and_cache = _with_reference(kernels.reshape_and_cache, _reshape_and_cache_reference)
    kernels.copy_blocks = _with_reference(kernels.copy_blocks, _copy_blocks_reference)
    COUNTS["patched"] = 1


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `_patch_kernels` once ``hf_paged.kernels`` has been executed, wherever it is imported from."""

    def find_spec(self, name, path, target=None):
        if name != "hf_paged.kernels":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch_kernels(module)

        spec.loader.exec_module = exec_module
        return spec


def _write_counts() -> None:
    folder = os.environ.get("HF_PAGED_REHEARSAL_COUNTS")
    if folder and COUNTS:
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as file:
            json.dump({"argv": sys.argv, **COUNTS}, file)


def install() -> None:
    """Make `FakeCudaDriver` Triton's active driver and wrap `hf_paged.kernels` when it is imported."""
    from triton.runtime.driver import driver

    driver.set_active(FakeCudaDriver())
    sys.meta_path.insert(0, _AfterImport())
    atexit.register(_write_counts)
