"""Copy-on-write: copy whole cache blocks in every layer's key and value pool in one launch.

Kernel, launcher and reference: the reference is `hf_paged.ops.copy_blocks`, and `copy_blocks` below has the same
signature and result. An 8-bit pool's rows keep their float16 magnitudes inline (`hf_paged.quant`): copying a block's
elements copies its scales too, so the kernel copies such a pool as it copies any other (float8 codes as their bytes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_paged.ops import copy_blocks as copy_blocks_reference

from ._launch import CACHE_DTYPES, COMPILE_OPTIONS, INDEX_DTYPES, check_device, check_dtype, check_offsets, check_shape
from ._quant import raw

__all__ = ["copy_blocks", "copy_blocks_kernel", "copy_blocks_meta", "copy_blocks_reference"]

@triton.jit
def copy_blocks_kernel(
    pool_ptr,  # [L, K, N, bs, Hkv, D] (K = 2: keys and values; 1: keys or values alone); unit stride along D
    src_ptr, dst_ptr,  # [C] block ids
    offsets_ptr,  # [N] int64 element offset of each block (layer 0, kind 0; read only if HAS_OFFSETS)
    num_kinds,  # K
    stride_layer, stride_kv, stride_block, stride_token, stride_head,
    block_numel,  # bs * Hkv * D
    HEAD_DIM: tl.constexpr,
    KV_HEADS: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_OFFSETS: tl.constexpr,  # block b starts at offsets[b] (slabs), not b * stride_block
):
    """Program (c, l * K + kv): copy block ``src[c]`` to ``dst[c]`` in layer ``l``'s key (kv=0) or value pool."""
    pair = tl.program_id(0)
    layer_kv = tl.program_id(1)
    src = tl.load(src_ptr + pair).to(tl.int64)
    dst = tl.load(dst_ptr + pair).to(tl.int64)
    base = (layer_kv // num_kinds).to(tl.int64) * stride_layer + (layer_kv % num_kinds).to(tl.int64) * stride_kv
    if HAS_OFFSETS:
        src_base = pool_ptr + base + tl.multiple_of(tl.load(offsets_ptr + src), 16)  # checked by the launcher
        dst_base = pool_ptr + base + tl.multiple_of(tl.load(offsets_ptr + dst), 16)
    else:
        src_base = pool_ptr + base + src * stride_block
        dst_base = pool_ptr + base + dst * stride_block
    offsets = tl.arange(0, CHUNK)
    for start in range(0, block_numel, CHUNK):
        index = start + offsets  # element (token, head, dim) of the block, in logical order
        mask = index < block_numel
        token = index // (KV_HEADS * HEAD_DIM)
        head = index // HEAD_DIM % KV_HEADS
        at = token.to(tl.int64) * stride_token + head.to(tl.int64) * stride_head + index % HEAD_DIM
        tl.store(dst_base + at, tl.load(src_base + at, mask=mask), mask=mask)


def copy_blocks_meta(kv_heads: int, head_dim: int, has_offsets: bool = False) -> dict[str, int]:
    """Every constexpr of `copy_blocks_kernel` plus ``num_warps``: 1024 elements per loop step (shared with AOT)."""
    return {"HEAD_DIM": head_dim, "KV_HEADS": kv_heads, "CHUNK": 1024, "HAS_OFFSETS": has_offsets, "num_warps": 4}


def copy_blocks(
    kv_pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, block_offsets: torch.Tensor | None = None
) -> None:
    """Copy blocks ``src[i] -> dst[i]`` in every layer's key and value pool (Triton; same as `hf_paged.ops`).

    Args:
        kv_pool: ``[L, 2, N, bs, Hkv, D]`` with any strides but a unit stride along ``D`` (a `PagedCache`'s
            pool is stored head-major: see `hf_paged.storage.slab_tensor`), or ``[L, 1, N, bs, Hkv, D]`` (the key or
            the value pool of a model whose keys and values differ in width); an 8-bit pool's ``D`` is its stored
            width (codes and magnitude, `hf_paged.quant`).
        src, dst: ``[C]`` int32/int64 block ids in ``[0, N)``; ``dst`` holds distinct blocks not in ``src``
            (not checked: that would need a device sync).
        block_offsets: ``[N]`` int64, or None. A pool of several tensors (slabs, each laid out like `kv_pool`):
            block ``b`` of layer ``l``, kind ``k`` starts ``block_offsets[b] + l * kv_pool.stride(0) + k *
            kv_pool.stride(1)`` elements after ``kv_pool.data_ptr()`` (offsets relative to the lowest-addressed
            slab, whose view `kv_pool` is, so >= 0; multiples of 16); the strides inside a block apply, ``kv_pool.stride(2)`` and
            its ``N`` are unused. In a block-major slab (memory ``[n, L, K, bs, Hkv, D]``) a block of every layer is
            one contiguous run of ``L * K * bs * Hkv * D`` elements at ``block_offsets[b]``, and that is what gets
            copied. None: block ``b`` at ``b * kv_pool.stride(2)``, as with one tensor.
    """
    check_device(kv_pool=kv_pool, src=src, dst=dst)
    check_dtype("kv_pool", kv_pool, CACHE_DTYPES)
    check_dtype("src", src, INDEX_DTYPES)
    check_dtype("dst", dst, INDEX_DTYPES)
    if kv_pool.dim() != 6 or kv_pool.shape[1] not in (1, 2):
        check_shape("kv_pool", kv_pool, (None, 2, None, None, None, None), "[L, 2, N, bs, Hkv, D]")
    check_shape("src", src, (None,), "[C]")
    check_shape("dst", dst, (src.shape[0],), "[C] like src")
    layers, kinds, _, block_size, kv_heads, head_dim = kv_pool.shape
    if kv_pool.stride(5) != 1:
        raise ValueError(f"kv_pool's last dim D must have stride 1, got strides {kv_pool.stride()}")
    block_offsets = check_offsets("block_offsets", block_offsets, kv_pool, "kv_pool")
    if src.shape[0] == 0 or layers == 0:
        return
    copy_blocks_kernel[(src.shape[0], layers * kinds)](
        raw(kv_pool), src.contiguous(), dst.contiguous(), block_offsets if block_offsets is not None else src, kinds,
        *kv_pool.stride()[:5],
        block_size * kv_heads * head_dim,
        **copy_blocks_meta(kv_heads, head_dim, block_offsets is not None),
        **COMPILE_OPTIONS,
    )
