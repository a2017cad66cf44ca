"""Choose, per call, between the Triton kernels and the PyTorch implementation of each paged operation.

CUDA tensors use the Triton kernels (`hf_paged.kernels`) when Triton is importable; everything else uses
`hf_paged.ops`. The environment variable ``HF_PAGED_BACKEND=triton`` or ``torch`` forces one (with
``TRITON_INTERPRET=1``, ``triton`` runs the kernels on CPU tensors through Triton's interpreter).
"""

from __future__ import annotations

import os
from functools import cache

import torch

from . import ops

__all__ = ["copy_blocks", "kernels", "paged_attention", "shared_prefix_paged_attention", "use_triton"]


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


def copy_blocks(kv_pool, src, dst) -> None:
    impl = kernels() if use_triton(kv_pool.device) else ops
    impl.copy_blocks(kv_pool, src, dst)


def paged_attention(*args, **kwargs) -> torch.Tensor:
    return kernels().paged_attention(*args, **kwargs)


def shared_prefix_paged_attention(*args, **kwargs) -> torch.Tensor:
    return kernels().shared_prefix_paged_attention(*args, **kwargs)
