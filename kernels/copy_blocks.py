"""Copy-on-write: copy whole cache blocks in every layer's key and value pool in one launch.

Kernel, launcher and reference: the reference is `hf_paged.ops.copy_blocks`, and `copy_blocks` below has the same
signature and result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_paged.ops import copy_blocks as copy_blocks_reference

from ._launch import COMPILE_OPTIONS, FLOAT_DTYPES, INDEX_DTYPES, check_device, check_dtype, check_shape

__all__ = ["copy_blocks", "copy_blocks_kernel", "copy_blocks_meta", "copy_blocks_reference"]

@triton.jit
def copy_blocks_kernel(
    pool_ptr,  # [L, 2, N, bs, Hkv, D]; each block's bs * Hkv * D elements are contiguous
    src_ptr, dst_ptr,  # [C] block ids
    stride_layer, stride_kv, stride_block,
    block_numel,  # bs * Hkv * D
    CHUNK: tl.constexpr,
):
    """Program (c, l * 2 + kv): copy block ``src[c]`` to ``dst[c]`` in layer ``l``'s key (kv=0) or value pool."""
    pair = tl.program_id(0)
    layer_kv = tl.program_id(1)
    src = tl.load(src_ptr + pair).to(tl.int64)
    dst = tl.load(dst_ptr + pair).to(tl.int64)
    base = (layer_kv // 2).to(tl.int64) * stride_layer + (layer_kv % 2).to(tl.int64) * stride_kv
    src_base = pool_ptr + base + src * stride_block
    dst_base = pool_ptr + base + dst * stride_block
    offsets = tl.arange(0, CHUNK)
    for start in range(0, block_numel, CHUNK):
        mask = start + offsets < block_numel
        tl.store(dst_base + start + offsets, tl.load(src_base + start + offsets, mask=mask), mask=mask)


def copy_blocks_meta() -> dict[str, int]:
    """Every constexpr of `copy_blocks_kernel` plus ``num_warps``: 1024 elements per loop step (shared with AOT)."""
    return {"CHUNK": 1024, "num_warps": 4}


def copy_blocks(kv_pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy blocks ``src[i] -> dst[i]`` in every layer's key and value pool (Triton; same as `hf_paged.ops`).

    Args:
        kv_pool: ``[L, 2, N, bs, Hkv, D]``; the last three dims must be contiguous (a block is one run of memory),
            the first three may have any strides.
        src, dst: ``[C]`` int32/int64 block ids in ``[0, N)``; ``dst`` holds distinct blocks not in ``src``
            (not checked: that would need a device sync).
    """
    check_device(kv_pool=kv_pool, src=src, dst=dst)
    check_dtype("kv_pool", kv_pool, FLOAT_DTYPES)
    check_dtype("src", src, INDEX_DTYPES)
    check_dtype("dst", dst, INDEX_DTYPES)
    check_shape("kv_pool", kv_pool, (None, 2, None, None, None, None), "[L, 2, N, bs, Hkv, D]")
    check_shape("src", src, (None,), "[C]")
    check_shape("dst", dst, (src.shape[0],), "[C] like src")
    layers, _, _, block_size, kv_heads, head_dim = kv_pool.shape
    if kv_pool.stride()[3:] != (kv_heads * head_dim, head_dim, 1):
        raise ValueError(
            f"kv_pool's last three dims [bs, Hkv, D] must be contiguous, got strides {kv_pool.stride()}"
        )
    if src.shape[0] == 0 or layers == 0:
        return
    copy_blocks_kernel[(src.shape[0], layers * 2)](
        kv_pool, src.contiguous(), dst.contiguous(),
        kv_pool.stride(0), kv_pool.stride(1), kv_pool.stride(2),
        block_size * kv_heads * head_dim,
        **copy_blocks_meta(),
        **COMPILE_OPTIONS,
    )
