"""Checks shared by the kernel launchers: devices, dtypes, index tensors and the interpreter.

The launchers validate everything a kernel would otherwise read out of bounds or misinterpret, and raise
`ValueError` (wrong shape, device or layout) or `TypeError` (wrong dtype) with the argument's name in the message.
"""

from __future__ import annotations

import weakref

import torch
import triton

#: Storage dtypes the kernels accept for queries, keys and values.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Compile options every launch passes: FMA contraction on, as Triton 3.9 defaults to (3.10 will default to off).
COMPILE_OPTIONS = {"enable_fp_fusion": True}
#: Dtypes accepted for slot mappings and block-id lists (block tables and lengths must be int32).
INDEX_DTYPES = (torch.int32, torch.int64)
#: Every entry of a block offset table is a multiple of this many elements, so that the kernels keep 16-byte loads
#: and stores (`tl.multiple_of`). Torch allocates storages 64-byte (CPU) or 512-byte (CUDA) aligned, so offsets
#: between slabs qualify whenever the element counts inside a slab (its block stride) are multiples of 16.
OFFSET_ALIGNMENT = 16
#: CUDA offset tables already checked, by id: (weak reference, version); see `check_offsets`.
_CHECKED_TABLES: dict[int, tuple[weakref.ref, int]] = {}


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1`` before the kernels were built)."""
    return bool(triton.knobs.runtime.interpret)


def check_device(**tensors: torch.Tensor | None) -> torch.device:
    """Return the common device of `tensors` (None entries are skipped) or raise ValueError.

    CUDA tensors run compiled kernels; CPU tensors run only under the Triton interpreter.
    """
    named = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in named.values()}
    if len(devices) != 1:
        listing = ", ".join(f"{name} on {t.device}" for name, t in named.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        raise ValueError(
            "CPU tensors can only run under the Triton interpreter: set TRITON_INTERPRET=1 before hf_paged.kernels "
            "is imported, or call the PyTorch implementation in hf_paged.ops"
        )
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"Triton kernels run on CUDA (or CPU under TRITON_INTERPRET=1), got device {device}")
    return device


def check_dtype(name: str, tensor: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """Raise TypeError unless ``tensor.dtype`` is one of `allowed`."""
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {str(tensor.dtype).removeprefix('torch.')}")


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int | None, ...], meaning: str) -> None:
    """Raise ValueError unless `tensor` has ``len(expected)`` dims matching `expected` (None = any size)."""
    ok = tensor.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, tensor.shape, strict=True))
    if not ok:
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name} must be {meaning} = [{want}], got shape {list(tensor.shape)}")


def check_offsets(
    name: str, offsets: torch.Tensor | None, cache: torch.Tensor, cache_name: str
) -> torch.Tensor | None:
    """Validate a per-block offset table for `cache` and return it contiguous (None stays None).

    A table addresses a pool made of several separate tensors (slabs): block ``b``'s element (token ``t``, head
    ``h``, dim ``d``) is at element ``offsets[b] + t * cache.stride(1) + h * cache.stride(2) + d * cache.stride(3)``
    of ``cache.data_ptr()``; ``cache.stride(0)`` is not used. It must be int64 ``[N]`` (one entry per block id the
    block tables or slots can name) on the cache's device, every entry a multiple of `OFFSET_ALIGNMENT`. Block ids
    themselves are not checked against ``N`` (that would need a device sync), as without a table they are not
    checked against ``cache.shape[0]``.

    The alignment is checked on the host, as a `ValueError`: for CPU tensors (the interpreter) at every call, for
    CUDA tensors once per table and in-place version of it (one small copy to the host and a sync; a `PagedCache`
    builds a table only when its pool grows). A device-side assertion would cost no sync, but it reports a bad
    table only at some later synchronisation, as a CUDA error that leaves the context unusable for the rest of
    the process.
    """
    if offsets is None:
        return None
    if not isinstance(offsets, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 block offsets or None, got {type(offsets).__name__}")
    check_dtype(name, offsets, (torch.int64,))
    if offsets.dim() != 1 or offsets.shape[0] == 0:
        raise ValueError(f"{name} must be [N], one int64 element offset per block (N >= 1), got shape "
                         f"{list(offsets.shape)}")
    if offsets.device != cache.device:
        raise ValueError(f"{name} must be on {cache_name}'s device {cache.device}, got {offsets.device}")
    _check_alignment(name, offsets)
    return offsets.contiguous()


def _check_alignment(name: str, offsets: torch.Tensor) -> None:
    """Raise ValueError unless every offset is a multiple of `OFFSET_ALIGNMENT`; a CUDA table is checked once per
    table and version (`check_offsets`)."""
    if offsets.device.type == "meta":
        return
    cuda = offsets.device.type == "cuda"
    if cuda:
        version = offsets._version if not offsets.is_inference() else -1  # inference tensors keep no version
        seen = _CHECKED_TABLES.get(id(offsets))
        if seen is not None and seen[0]() is offsets and seen[1] == version:
            return
    host = offsets.cpu() if cuda else offsets
    misaligned = host % OFFSET_ALIGNMENT != 0
    if bool(misaligned.any()):
        raise ValueError(f"{name} must hold multiples of {OFFSET_ALIGNMENT} elements (slabs and blocks 16-element "
                         f"aligned) so the kernels can use 16-byte memory accesses; got {host[misaligned][:4].tolist()}")
    if cuda:
        if len(_CHECKED_TABLES) > 256:
            for key in [key for key, (ref, _) in _CHECKED_TABLES.items() if ref() is None]:
                del _CHECKED_TABLES[key]
        _CHECKED_TABLES[id(offsets)] = (weakref.ref(offsets), version)


def resolve_offsets(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    key_offsets: torch.Tensor | None,
    value_offsets: torch.Tensor | None,
    key_name: str = "key_offsets",
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A launcher's ``(key table, value table)`` after checks, or None when neither is given (then
    the kernels address block b at ``b * stride(0)``). Values default to the keys' table; keys given no table while
    values have one get ``arange(key_cache.shape[0]) * key_cache.stride(0)``, today's addressing as a table."""
    key_offsets = check_offsets(key_name, key_offsets, key_cache, "key_cache")
    value_offsets = check_offsets("value_offsets", value_offsets, value_cache, "value_cache")
    if key_offsets is None and value_offsets is None:
        return None
    if key_offsets is None:
        key_offsets = torch.arange(key_cache.shape[0], device=key_cache.device) * key_cache.stride(0)
    return key_offsets, key_offsets if value_offsets is None else value_offsets


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << max(0, n - 1).bit_length()
