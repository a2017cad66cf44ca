"""Scatter this step's keys and values into their slots of the paged pools.

Kernel, launcher and reference: the reference is `hf_paged.ops.reshape_and_cache`, and `reshape_and_cache` below has
the same signature and result. Into an 8-bit pool (`hf_paged.quant`) each (token, head) row is encoded on the way:
its codes and float16 magnitude are bit for bit those of `hf_paged.quant.encode` (`hf_paged.kernels._quant`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_paged import ops
from hf_paged.ops import reshape_and_cache as reshape_and_cache_reference

from ._launch import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    Launch,
    check_caches,
    check_device,
    check_dtype,
    check_shape,
    next_power_of_2,
    resolve_offsets,
    settled,
    tensor_key,
)
from ._quant import quantize, raw, store_magnitude

__all__ = ["reshape_and_cache", "reshape_and_cache_kernel", "reshape_and_cache_meta", "reshape_and_cache_reference"]


@triton.jit
def reshape_and_cache_kernel(
    key_ptr, value_ptr,  # [T, Hk, Dk], [T, Hv, Dv]
    key_cache_ptr, value_cache_ptr,  # [N, bs, Hk, Dk], [N, bs, Hv, Dv]; 8-bit (CODES): [.., Dk + 2], [.., Dv + 2]
    key_offsets_ptr, value_offsets_ptr,  # [N] int64 element offset of each block (read only if HAS_OFFSETS)
    slot_mapping_ptr,  # [T]
    num_slots,  # N * bs: slots outside [0, num_slots) are skipped
    num_kv_heads,
    num_v_heads,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcn, stride_kcs, stride_kch, stride_kcd,
    stride_vcn, stride_vcs, stride_vch, stride_vcd,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    HEADS_PAD: tl.constexpr,  # next power of two >= num_kv_heads
    HEAD_DIM_PAD: tl.constexpr,  # next power of two >= HEAD_DIM
    V_HEAD_DIM: tl.constexpr,  # the values' (multi-head latent attention: other than the keys')
    V_HEADS_PAD: tl.constexpr,
    V_HEAD_DIM_PAD: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,  # block b starts at key/value_offsets[b] (slabs), not b * stride_kcn / vcn
    CODES: tl.constexpr,  # the pools' 8-bit codes (hf_paged.kernels._quant): 0 none, 1 int8, 2 float8_e4m3fn
):
    """One program per token: copy its ``[Hkv, D]`` key and value tiles into slot ``slot_mapping[t]`` (encoded into
    codes and a magnitude per head in an 8-bit pool)."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if (slot >= 0) & (slot < num_slots):
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        if HAS_OFFSETS:
            key_block = tl.multiple_of(tl.load(key_offsets_ptr + block), 16)  # checked by the launcher
            value_block = tl.multiple_of(tl.load(value_offsets_ptr + block), 16)
        else:
            key_block = block * stride_kcn
            value_block = block * stride_vcn
        heads = tl.arange(0, HEADS_PAD)
        dims = tl.arange(0, HEAD_DIM_PAD)
        mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < HEAD_DIM)

        key = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :] * stride_kd, mask=mask,
                      other=0.0)
        key_rows = key_cache_ptr + key_block + offset * stride_kcs + heads * stride_kch
        if CODES == 0:
            tl.store(key_rows[:, None] + dims[None, :] * stride_kcd, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
        else:
            codes, magnitude = quantize(key.to(tl.float32), CODES)
            tl.store(key_rows[:, None] + dims[None, :], codes, mask=mask)
            store_magnitude(key_rows + HEAD_DIM, magnitude, heads < num_kv_heads)

        v_heads = tl.arange(0, V_HEADS_PAD)
        v_dims = tl.arange(0, V_HEAD_DIM_PAD)
        v_mask = (v_heads[:, None] < num_v_heads) & (v_dims[None, :] < V_HEAD_DIM)
        value = tl.load(value_ptr + token * stride_vt + v_heads[:, None] * stride_vh + v_dims[None, :] * stride_vd,
                        mask=v_mask, other=0.0)
        value_rows = value_cache_ptr + value_block + offset * stride_vcs + v_heads * stride_vch
        if CODES == 0:
            tl.store(value_rows[:, None] + v_dims[None, :] * stride_vcd, value.to(value_cache_ptr.dtype.element_ty),
                     mask=v_mask)
        else:
            codes, magnitude = quantize(value.to(tl.float32), CODES)
            tl.store(value_rows[:, None] + v_dims[None, :], codes, mask=v_mask)
            store_magnitude(value_rows + V_HEAD_DIM, magnitude, v_heads < num_v_heads)


def reshape_and_cache_meta(kv_heads: int, head_dim: int, block_size: int, v_heads: int | None = None,
                           v_head_dim: int | None = None, has_offsets: bool = False, codes: int = 0) -> dict[str, int]:
    """Every constexpr of `reshape_and_cache_kernel` plus ``num_warps`` (shared by the launcher and the AOT check).
    ``v_heads`` / ``v_head_dim``: the values', when they differ from the keys'; ``has_offsets``: blocks addressed
    through offset tables (a pool of several slabs); ``codes``: the pools' 8-bit format (`_quant.codes_of`; the
    head dims are then the rows' logical widths, the pools' minus 2)."""
    v_heads = kv_heads if v_heads is None else v_heads
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_SIZE": block_size,
        "HEADS_PAD": next_power_of_2(kv_heads),
        "HEAD_DIM_PAD": next_power_of_2(head_dim),
        "V_HEAD_DIM": v_head_dim,
        "V_HEADS_PAD": next_power_of_2(v_heads),
        "V_HEAD_DIM_PAD": next_power_of_2(v_head_dim),
        "HAS_OFFSETS": has_offsets,
        "CODES": codes,
        "num_warps": 1 if max(kv_heads * head_dim, v_heads * v_head_dim) <= 512 else 4,
    }


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_offsets: torch.Tensor | None = None,
    value_offsets: torch.Tensor | None = None,
) -> None:
    """Write new keys and values into their slots (Triton; same contract as `hf_paged.ops.reshape_and_cache`).

    Args:
        key, value: ``[T, Hk, Dk]`` and ``[T, Hv, Dv]`` new states, any strides; cast to the pools' dtype on store
            (values may differ from keys in heads and width: multi-head latent attention), or encoded into an 8-bit
            pool's codes and magnitudes (`hf_paged.quant.encode`, bit for bit).
        key_cache, value_cache: ``[N, bs, Hk, Dk]`` and ``[N, bs, Hv, Dv]`` pools, written in place (any strides);
            8-bit pools (``int8``, ``float8_e4m3fn``, both alike) ``[N, bs, Hk, Dk + 2]`` and ``[N, bs, Hv, Dv + 2]``
            (unit last stride, even strides).
        slot_mapping: ``[T]`` int32/int64 slots (any stride) ``block * bs + offset``; negative slots are skipped. Slots past the
            end of the pool are skipped too (the reference raises instead; the kernel cannot).
        block_offsets: ``[N]`` int64, or None. A pool of several tensors (slabs): block ``b`` starts
            ``block_offsets[b]`` elements after ``key_cache.data_ptr()`` (offsets relative to the lowest-addressed
            slab, whose view ``key_cache`` is, so >= 0; multiples of 16) and ``key_cache``'s strides inside a block apply; its block
            stride and ``N`` are unused, and the pool's end (for skipped slots) is ``len(block_offsets) * bs``.
            None: block ``b`` at ``b * key_cache.stride(0)``, as with one tensor.
        value_offsets: the same for ``value_cache``; None uses `block_offsets` (K and V views of one slab tensor).
    """
    tensors = tensor_key(key, value, key_cache, value_cache, slot_mapping, block_offsets, value_offsets, fresh=2)
    launch = settled(
        None if tensors is None else ("reshape_and_cache", tensors),
        lambda: _settle(key, value, key_cache, value_cache, slot_mapping, block_offsets, value_offsets))
    if launch is None:
        return
    offsets = resolve_offsets(key_cache, value_cache, block_offsets, value_offsets, key_name="block_offsets",
                              settled=True)
    launch(key, value, raw(key_cache), raw(value_cache), *(offsets if offsets is not None else (slot_mapping, slot_mapping)),
           slot_mapping if slot_mapping.is_contiguous() else slot_mapping.contiguous())


def _settle(key, value, key_cache, value_cache, slot_mapping, block_offsets, value_offsets) -> Launch | None:
    """The launch (None when there is no token) after the checks, once per kind of call: the slots in the pool, the
    head counts and the strides are fixed by its key."""
    check_device(key=key, value=value, key_cache=key_cache, value_cache=value_cache, slot_mapping=slot_mapping)
    for name, t in (("key", key), ("value", value)):
        check_dtype(name, t, FLOAT_DTYPES)
    codes = check_caches(key_cache, value_cache)
    check_dtype("slot_mapping", slot_mapping, INDEX_DTYPES)
    check_shape("key_cache", key_cache, (None, None, None, None), "[N, bs, Hkv, D]")
    num_blocks, block_size, kv_heads, _ = key_cache.shape
    head_dim = ops.head_dim(key_cache)
    # With offset tables the caches are views of their base slabs, whose block counts may differ.
    has_offsets = block_offsets is not None or value_offsets is not None
    check_shape("value_cache", value_cache, (None if has_offsets else num_blocks, block_size, None, None),
                "[N, bs, Hv, Dv] like key_cache")
    v_heads, v_head_dim = value_cache.shape[2], ops.head_dim(value_cache)
    check_shape("key", key, (None, kv_heads, head_dim), "[T, Hkv, D]")
    tokens = key.shape[0]
    check_shape("value", value, (tokens, v_heads, v_head_dim), "[T, Hv, Dv] like key and value_cache")
    check_shape("slot_mapping", slot_mapping, (tokens,), "[T]")
    offsets = resolve_offsets(key_cache, value_cache, block_offsets, value_offsets, key_name="block_offsets")
    if offsets is not None:
        num_blocks = min(offsets[0].shape[0], offsets[1].shape[0])
    if tokens == 0:
        return None
    meta = reshape_and_cache_meta(kv_heads, head_dim, block_size, v_heads, v_head_dim, offsets is not None, codes)
    fixed = (num_blocks * block_size, kv_heads, v_heads, *key.stride(), *value.stride(), *key_cache.stride(),
             *value_cache.stride())
    return Launch(reshape_and_cache_kernel, (tokens,), meta, fixed)
