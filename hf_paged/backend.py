"""The one switch between the Triton kernels and the PyTorch implementation of each paged operation: write
(`reshape_and_cache`), copy (`copy_blocks`) and attend (`attend`).

CUDA tensors use the Triton kernels (`hf_paged.kernels`) when Triton is importable; everything else uses
`hf_paged.ops`. The environment variable ``HF_PAGED_BACKEND=triton`` or ``torch`` forces one (with
``TRITON_INTERPRET=1``, ``triton`` runs the kernels on CPU tensors through Triton's interpreter). A `PagedCache`
asks `use_triton` once per step and device (`hf_paged.step.StepPlan.triton`) and passes that answer to all three.

A layer's keys (values) reach these dispatchers as a plain ``[N, bs, Hkv, D]`` tensor or, for a pool of several
slabs, as a *layer store* (`hf_paged.storage.LayerStore`, CONTRACT.md section 2): the kernels then get the store's
``base`` (the lowest-addressed slab's view) and its ``block_offsets`` table (int64 ``[N]``, element offsets of
each block relative to ``base``); the PyTorch path calls the store's ``write(slots, states)``.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch

from . import latent, masks, ops, quant
from .masks import key_padding_mask
from .step import read_path

__all__ = ["attend", "copy_blocks", "kernels", "kernel_operands", "mark_offsets_checked", "paged_attention",
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
) -> None:
    """Write ``keys`` / ``values`` (``[T, Hkv, D]``) into their ``slots`` (``[T]``; negative: not stored) of a
    layer's key and value stores (plain ``[N, bs, Hkv, D]`` tensors or layer stores).

    ``triton``: the step's backend choice (`use_triton` when None). On the PyTorch path: ``stored`` (``[T']``
    long), the tokens whose slot is not negative when the caller knows them (a step's plan does,
    `hf_paged.step.StepPlan.stored`): only those are written, and nothing is read back; ``skip_negative`` False
    when the caller knows no slot is negative (see `hf_paged.ops.reshape_and_cache`).
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


def attend(layer, query: torch.Tensor, padding: torch.Tensor | None, full_mask: torch.Tensor | None, *, scale: float,
           sliding_window: int | None, softcap: float | None, chunk_size: int | None,
           sinks: torch.Tensor | None, module: torch.nn.Module | None = None) -> torch.Tensor:
    """One layer's attention over its paged keys, by the read path `hf_paged.step.read_path` picks. Over 8-bit rows
    stored rotated (`hf_paged.quant`, every layer but latents), the query is rotated the same way and the output
    rotated back.

    Args:
        layer: the layer's `hf_paged.step.LayerRead` (its step plan, key and value stores, fresh inputs, cache
            window).
        query: ``[B, H, q, D]``, the step's last ``q`` positions.
        padding: the 2-D key padding mask ``[B, kv]`` (True: a real token), not checked for padding yet, or None
            when nothing is padded.
        full_mask: a 4-D boolean mask (a pattern `hf_paged.masks.describe` does not know), or None.
        scale, sliding_window, softcap, chunk_size, sinks: the layer's (see `hf_paged.attention`).
        module: the attention module (a latent layer's weights, `hf_paged.latent`).

    Returns:
        ``[B, q, H, Dv]``.
    """
    if layer.latent or not quant.is_quantized(layer.keys.dtype):
        return _attend(layer, query, padding, full_mask, scale=scale, sliding_window=sliding_window, softcap=softcap,
                       chunk_size=chunk_size, sinks=sinks, module=module)
    out = _attend(layer, quant.rotated(query), padding, full_mask, scale=scale, sliding_window=sliding_window,
                  softcap=softcap, chunk_size=chunk_size, sinks=sinks, module=module)
    return quant.rotated(out)


def _attend(layer, query, padding, full_mask, *, scale, sliding_window, softcap, chunk_size, sinks, module):
    """`attend` over the stores as they hold the rows."""
    plan = layer.plan
    if query.shape[2] != plan.q_len:  # the step's last queries only (Gemma 4's KV-shared layers in a prefill)
        plan = plan.last_queries(query.shape[2])
    if plan.fresh is not None:  # a sliding-window step that stores only its last tokens
        return _fresh_attention(plan, layer.fresh, query, full_mask if full_mask is not None else padding, scale,
                                sliding_window, softcap, sinks)
    if sliding_window is not None and sliding_window >= plan.max_seq_len:
        sliding_window = None  # the window covers every key: no mask needed
    if chunk_size is not None and chunk_size >= plan.max_seq_len:
        chunk_size = None  # every key is in the first chunk
    keys, values = layer.keys, layer.values
    if full_mask is not None:
        if plan.key_offset:  # the step's tables leave out the first blocks
            full_mask = full_mask[..., plan.key_offset:]
        keys_padding = None
        path = read_path(plan, full_mask=True, left_padding=False, groups_padded_alike=False,
                         sliding_window=sliding_window, chunk_size=chunk_size, sinks=sinks is not None,
                         same_width=layer.same_width, latent=layer.latent)
    else:
        cache_window = layer.cache_window
        if (cache_window is None or sliding_window is not None or chunk_size is not None
                or plan.max_seq_len - plan.q_len <= cache_window - 1):
            cache_window = None  # else keys Transformers' own DynamicCache would already have dropped (Moshi)
        path, keys_padding = plan.memo(
            ("attend", id(padding), cache_window, sliding_window, chunk_size, sinks is None, layer.same_width,
             layer.token_bytes, layer.latent),
            lambda: _route(plan, padding, cache_window, sliding_window, chunk_size, sinks is not None,
                           layer.same_width, layer.token_bytes, layer.latent))
    if path == "latent":  # cached latents: absorbed weights, or the latents expanded (latent.py)
        return latent.attention(module, plan, query, keys, values,
                                full_mask if keys_padding is None else keys_padding.mask,
                                None if keys_padding is None else keys_padding.starts, scale=scale,
                                sliding_window=sliding_window, softcap=softcap, chunk_size=chunk_size, sinks=sinks)
    if full_mask is not None:
        return _gathered_attention(plan, query, keys, values, full_mask, scale, None, softcap, None, sinks)
    if path == "triton":
        features = {"chunk_size": chunk_size} if chunk_size is not None else {}
        if sinks is not None:
            features["sinks"] = sinks
        return paged_attention(query, keys, values, plan.block_tables, plan.seq_lens, keys_padding.starts,
                               scale=scale, max_seq_len=plan.max_seq_len, sliding_window=sliding_window,
                               softcap=softcap, workspace=plan.workspace, **features)
    if path == "triton_shared":  # the shared blocks once per group of rows
        return shared_prefix_paged_attention(
            query, keys, values, plan.shared.prefix_blocks, plan.shared.tail_tables, plan.seq_lens,
            keys_padding.starts, scale=scale, max_seq_len=plan.max_seq_len, sliding_window=sliding_window,
            softcap=softcap, workspace=plan.workspace)
    if path == "range":
        mask = masks.range_mask(plan, keys_padding.mask, sliding_window, query.shape[1] // keys.shape[2],
                                query.dtype, chunk_size)
        return ops.range_attention(query, keys, values, *plan.block_range, mask, scale=scale, softcap=softcap,
                                   sinks=sinks)
    if path == "ranges":  # a pool of several slabs: one range per slab, merged
        range_masks = masks.ranges_masks(plan, keys_padding.mask, sliding_window, query.shape[1] // keys.shape[2],
                                         query.dtype, chunk_size)
        return ops.ranges_attention(query, keys, values, plan.block_ranges, range_masks, scale=scale,
                                    softcap=softcap, sinks=sinks)
    if path == "shared":
        shared = plan.shared
        return ops.shared_prefix_attention(
            query, keys, values, shared.prefix_blocks, shared.tail_tables, plan.max_seq_len - shared.prefix_len,
            *masks.shared_masks(plan, keys_padding.mask), scale=scale, softcap=softcap,
            prefix_start=shared.prefix_start, sinks=sinks,
        )
    return _gathered_attention(plan, query, keys, values, keys_padding.mask, scale, sliding_window, softcap,
                               chunk_size, sinks, spans=plan.spans if path == "spans" else None)


def _route(plan, padding, cache_window, sliding_window, chunk_size, sinks, same_width, token_bytes,
           is_latent) -> tuple[str, masks.Padding]:
    """``(read path, key padding)`` of the layers of one kind in one step (memoised on the plan by `attend`)."""
    keys_padding = masks.step_padding(plan, padding, cache_window)
    path = read_path(plan, full_mask=False, left_padding=keys_padding.left,
                     groups_padded_alike=masks.padded_alike(plan, keys_padding), sliding_window=sliding_window,
                     chunk_size=chunk_size, sinks=sinks, same_width=same_width, token_bytes=token_bytes,
                     latent=is_latent)
    return path, keys_padding


def _fresh_attention(plan, fresh, query, attention_mask, scale, sliding_window, softcap, sinks) -> torch.Tensor:
    """Attention of a step that stores only its last tokens: over the keys kept before it and its own keys, as
    Transformers' sliding-window cache layer returns them (``DynamicSlidingWindowLayer.update``)."""
    kept_keys, kept_values, keys, values = fresh
    if kept_keys is not None:
        keys = torch.cat([kept_keys.to(keys.dtype), keys], dim=2)
        values = torch.cat([kept_values.to(values.dtype), values], dim=2)
    kv_len = keys.shape[2]
    q_len = query.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        end = plan.kv_start + kv_len
        mask = attention_mask[..., -q_len:, plan.kv_start:end].to(torch.bool)
        return ops.attend(query, keys, values, mask, scale=scale, softcap=softcap, sinks=sinks)
    attention_mask = masks.real_padding(attention_mask)
    seq_lens = torch.full((query.shape[0],), kv_len, dtype=torch.long, device=query.device)
    window = sliding_window if sliding_window is not None and sliding_window < kv_len else None
    if attention_mask is None and window is None and q_len == kv_len:
        return ops.attend(query, keys, values, None, scale=scale, softcap=softcap, is_causal=True, sinks=sinks)
    mask = ops.causal_mask(seq_lens, None, q_len, kv_len, window)
    if attention_mask is not None:
        padding = key_padding_mask(attention_mask[:, plan.kv_start:], kv_len)
        mask = mask & padding[:, None, None, :]
    return ops.attend(query, keys, values, mask, scale=scale, softcap=softcap, sinks=sinks)


def _gathered_attention(plan, query, key, value, attention_mask, scale, sliding_window, softcap, chunk_size=None,
                        sinks=None, spans=None) -> torch.Tensor:
    """Gather each row's keys and values out of the pools (or a single row's `spans`, concatenated), then attend as
    over contiguous tensors."""
    keys = ops.gather_kv(key, plan.block_tables, plan.max_seq_len, plan.first_block, spans, plan.row_stride)
    values = ops.gather_kv(value, plan.block_tables, plan.max_seq_len, plan.first_block, spans, plan.row_stride)
    mask = masks.step_mask(plan, attention_mask, sliding_window, chunk_size)
    # Every row holds exactly this step's tokens: a mask-free causal attention is the whole story.
    is_causal = mask is None and 1 < plan.q_len == plan.max_seq_len
    return ops.attend(query, keys, values, mask, scale=scale, softcap=softcap, is_causal=is_causal, sinks=sinks)


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
