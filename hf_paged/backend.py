"""The switch between the Triton kernels and the PyTorch implementation of the paged operations.

CUDA tensors use the Triton kernels (`hf_paged.kernels`) when Triton is importable; everything else uses
`hf_paged.ops`. The environment variable ``HF_PAGED_BACKEND=triton`` or ``torch`` forces one (with
``TRITON_INTERPRET=1``, ``triton`` runs the kernels on CPU tensors through Triton's interpreter). A `PagedCache`
asks `use_triton` once per step and device (`hf_paged.step.StepPlan.triton`) and passes that answer to the write
(`reshape_and_cache`) and the copy-on-write copies (`copy_blocks`); a layer's attention takes the Triton launchers
here (`paged_attention`, `shared_prefix_paged_attention`) where the step's read path says so
(`hf_paged.step.read_path`, run by `hf_paged.attention` and `hf_paged.latent`).

A layer's keys (values) reach these functions as a plain ``[N, bs, Hkv, D]`` tensor or, for a pool of several
slabs, as a *layer store* (`hf_paged.storage.LayerStore`; docs/KERNELS.md, "Pools of several slabs"): the
kernels then get the store's ``base`` (the lowest-addressed slab's view) and its ``block_offsets`` table (int64
``[N]``, element offsets of each block relative to ``base``); the PyTorch path calls the store's
``write(slots, states)``.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch

from . import ops

__all__ = ["copy_blocks", "kernels", "kernel_operands", "mark_offsets_checked", "paged_attention",
           "reshape_and_cache", "shared_prefix_paged_attention", "use_triton"]


@cache
def kernels():
    """`hf_paged.kernels` if Triton is importable, else None."""
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels if getattr(kernels, "HAS_TRITON", False) else None


def use_triton(device: torch.device) -> bool:
    """Whether the Triton kernels serve tensors on `device` (reads ``HF_PAGED_BACKEND`` on every call; a
    `PagedCache` asks once per forward step)."""
    choice = os.environ.get("HF_PAGED_BACKEND", "").strip().lower()
    if choice not in ("", "auto", "triton", "torch"):
        raise ValueError(f"hf_paged: HF_PAGED_BACKEND must be 'triton', 'torch' or unset, got {choice!r}.")
    if choice == "torch":
        return False
    if choice == "triton":
        if kernels() is None:
            raise RuntimeError("hf_paged: HF_PAGED_BACKEND=triton but Triton (and hf_paged.kernels) cannot be imported.")
        return True
    return device.type == "cuda" and kernels() is not None


def kernel_operands(store: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(tensor, block offsets or None)`` for the kernels from a plain pool tensor or a layer store (duck-typed:
    anything with ``base`` and ``block_offsets``)."""
    if isinstance(store, torch.Tensor):
        return store, None
    try:
        return store.base, store.block_offsets
    except AttributeError:
        raise TypeError(
            f"hf_paged: a KV pool must be a torch.Tensor or a layer store with .base and .block_offsets, got "
            f"{type(store).__name__}"
        ) from None


def reshape_and_cache(
    keys: torch.Tensor, values: torch.Tensor, key_store: Any, value_store: Any, slots: torch.Tensor,
    *, triton: bool | None = None, skip_negative: bool = True, stored: torch.Tensor | None = None,
    slot_views: tuple | None = None,
) -> None:
    """Write ``keys`` / ``values`` (``[T, Hkv, D]``) into their ``slots`` (``[T]``; negative: not stored) of a
    layer's key and value stores (plain ``[N, bs, Hkv, D]`` tensors or layer stores).

    ``triton``: the step's backend choice (`use_triton` when None). On the PyTorch path: ``stored`` (``[T']``
    long), the tokens whose slot is not negative when the caller knows them (a step's plan does,
    `hf_paged.step.StepPlan.stored`): only those are written, and nothing is read back; ``skip_negative`` False
    when the caller knows no slot is negative (see `hf_paged.ops.reshape_and_cache`); ``slot_views``, the stores'
    `hf_paged.ops.slot_view`s where the caller keeps them (`hf_paged.kv_pool.KVPool.slot_views`), written instead.
    """
    if triton is None:
        triton = use_triton(keys.device)
    if triton:
        key_cache, key_offsets = kernel_operands(key_store)
        value_cache, value_offsets = kernel_operands(value_store)
        kernels().reshape_and_cache(keys, values, key_cache, value_cache, slots, block_offsets=key_offsets,
                                    value_offsets=value_offsets)
        return
    if stored is not None:
        keys, values, slots = keys.index_select(0, stored), values.index_select(0, stored), slots.index_select(0, stored)
        skip_negative = False
    if slot_views is not None:
        key_store, value_store = slot_views
    ops.reshape_and_cache(keys, values, key_store, value_store, slots, skip_negative=skip_negative)


def copy_blocks(kv_pool, src, dst, block_offsets: torch.Tensor | None = None, *, triton: bool | None = None) -> None:
    """Copy blocks ``src[i] -> dst[i]`` in every layer of ``kv_pool`` (``[L, K, N, bs, Hkv, D]``); with
    ``block_offsets`` (Triton only), `kv_pool` is the base slab's view of a pool of several slabs
    (see `hf_paged.kernels.copy_blocks`). The PyTorch path copies per slab instead (the pool's own business).
    ``triton``: the step's backend choice (`use_triton` when None)."""
    if triton is None:
        triton = use_triton(kv_pool.device)
    if triton:
        kernels().copy_blocks(kv_pool, src, dst, block_offsets=block_offsets)
    elif block_offsets is not None:
        raise ValueError(
            "hf_paged: block offset tables address slabs for the Triton kernels only; on the PyTorch path copy the "
            "blocks slab by slab (hf_paged.ops.copy_blocks on each slab's tensor)"
        )
    else:
        ops.copy_blocks(kv_pool, src, dst)


def mark_offsets_checked(table: torch.Tensor) -> None:
    """Tell the kernels that the offset table `table` was checked when it was built (its entries are multiples of 16
    elements), so no launch reads it back to check it (`hf_paged.kernels._launch.check_offsets`)."""
    loaded = kernels()
    if loaded is not None:
        from .kernels import _launch

        _launch.mark_checked(table)


def paged_attention(query, key_cache, value_cache, *args, **kwargs) -> torch.Tensor:
    """`hf_paged.kernels.paged_attention`; `key_cache` / `value_cache` may be layer stores (their ``base`` and
    ``block_offsets`` become the kernel's caches and ``key_offsets`` / ``value_offsets``)."""
    return kernels().paged_attention(query, *_caches(key_cache, value_cache, kwargs), *args, **kwargs)


def shared_prefix_paged_attention(query, key_cache, value_cache, *args, **kwargs) -> torch.Tensor:
    """`hf_paged.kernels.shared_prefix_paged_attention`; the caches may be layer stores (see `paged_attention`)."""
    return kernels().shared_prefix_paged_attention(query, *_caches(key_cache, value_cache, kwargs), *args, **kwargs)


def _caches(key_store: Any, value_store: Any, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' key and value tensors from plain tensors or stores; the stores' tables go into `kwargs`
    (explicit ``key_offsets`` / ``value_offsets`` there win)."""
    key_cache, key_offsets = kernel_operands(key_store)
    value_cache, value_offsets = kernel_operands(value_store)
    if key_offsets is not None:
        kwargs.setdefault("key_offsets", key_offsets)
    if value_offsets is not None:
        kwargs.setdefault("value_offsets", value_offsets)
    return key_cache, value_cache
