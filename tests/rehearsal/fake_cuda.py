"""A rehearsal of the device check on the CPU: the real kernels compiled for sm_90, launches stubbed.

The device check gets one run on a GPU it has never seen, so the suite rehearses that run here, against the device
image's versions where a venv provides them (``.venv-*`` with Triton 3.6 and Transformers 5.17). This module is
test harness, never product code:

* The bench's launch-stub device (`hf_paged.bench.stub_device`, product code: its `FakeCudaDriver` and the
  launchers' acceptance of CPU tensors) becomes Triton's driver when ``hf_paged.kernels`` is imported: every kernel
  the JIT specialises is compiled for real by Triton's NVIDIA backend for ``GPUTarget("cuda", 90, 32)`` (TTIR to
  cubin, ptxas included), "loaded" and "launched" by counters. The JIT's own caches, specialisations and hooks
  (``triton.knobs.runtime``) behave as on a GPU, so the check's compile and launch counts are the ones the device
  would see.
* A stubbed launch computes nothing, so here each `hf_paged.kernels` launcher is also wrapped: the real launcher
  runs (its checks, its choice of variant, its compile and launch), then the PyTorch reference computes the result
  from the same operands. Blocks addressed through offset tables (pools of several slabs) are read and written at the
  addresses the kernels would use (CPU memory, aliased through ctypes), so the tables are checked too.
* Each process that imported the kernels writes the driver's counters (loads, launches per kernel) to
  ``$HF_PAGED_REHEARSAL_COUNTS/<pid>.json`` when it exits.

Nothing of hf_paged is imported before ``hf_paged.kernels`` is (every Python process of the run starts this module,
pip's included, and the phases must import the installed copy of hf_paged, not whichever is on the path first).

What it cannot check is the kernels' arithmetic: that is the interpreter's job here (``TRITON_INTERPRET=1``, where
the fake is not installed) and the device's.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import importlib.abc
import importlib.util
import json
import os
import sys

import torch

_PATCHED = False


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
                         workspace=None, **kwargs):  # workspace: the kernels' scratch, not the reference's
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


def _patch_kernels(kernels) -> None:
    """Wrap `hf_paged.kernels`' launchers (see the module docstring); called right after it is imported."""
    global _PATCHED
    if not kernels.HAS_TRITON:
        return
    from hf_paged import ops
    from hf_paged.bench import stub_device

    stub_device.accept_cpu_tensors(kernels)
    kernels.paged_attention = _with_reference(
        kernels.paged_attention, functools.partial(_attention_reference, ops.paged_attention))
    kernels.shared_prefix_paged_attention = _with_reference(
        kernels.shared_prefix_paged_attention, functools.partial(_attention_reference, ops.shared_prefix_paged_attention))
    kernels.reshape_and_cache = _with_reference(kernels.reshape_and_cache, _reshape_and_cache_reference)
    kernels.copy_blocks = _with_reference(kernels.copy_blocks, _copy_blocks_reference)
    _PATCHED = True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Activates the fake driver before ``hf_paged.kernels`` is executed and runs `_patch_kernels` after, wherever
    it is imported from."""

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
            from hf_paged.bench import stub_device

            stub_device.activate()
            execute(module)
            _patch_kernels(module)

        spec.loader.exec_module = exec_module
        return spec


def _write_counts() -> None:
    folder = os.environ.get("HF_PAGED_REHEARSAL_COUNTS")
    stub_device = sys.modules.get("hf_paged.bench.stub_device")  # imported only by a process that used the kernels
    counts = dict(stub_device.COUNTS) if stub_device is not None else {}
    if _PATCHED:
        counts["patched"] = 1
    if folder and counts:
        with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as file:
            json.dump({"argv": sys.argv, **counts}, file)


def install() -> None:
    """Make the fake driver Triton's active one and wrap `hf_paged.kernels`, both when the kernels are imported."""
    sys.meta_path.insert(0, _AfterImport())
    atexit.register(_write_counts)
