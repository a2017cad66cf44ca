"""8-bit keys and values: how a pool stores them (``kv_dtype``), and the one definition of quantize and dequantize.

A pool of 8-bit storage (``int8`` or ``float8_e4m3fn``) keeps each token's vector of each KV head as ``D`` 8-bit
codes followed by the row's largest magnitude, a float16 held in two more elements: a stored row is ``D + 2``
elements wide (`stored_width`). The row's scale is that magnitude over the format's largest code (`KVFormat.qmax`),
so the codes use the format's whole range, and ``value = code * scale``. The magnitude rather than the scale is
stored because it stays a normal float16 down to ``6e-5`` where the scale (448 times smaller for float8) would
lose bits as a subnormal.

Why one scale per token and head, inline:

* Rows are written one token at a time as decoding goes on, into blocks already partly filled. A scale per block
  would be fixed by the block's first tokens (clipping a larger one later) or rewritten when a larger token arrives
  (rounding the earlier codes twice, and a write reading back the whole block). A scale per token and head is
  written once, with its codes, and never changes.
* Rotated first: keys carry a few outlier channels, which set a row's scale and leave the other channels few codes.
  Each row is stored as ``x @ R`` (`rotated`), ``R`` an orthonormal Hadamard matrix (block-diagonal for head sizes
  that are not a power of two), which spreads any channel over all of them; ``R`` is symmetric and its own inverse,
  and ``(q @ R) . (k @ R) = q . k``, so attention over rotated keys and values with a rotated query gives the
  rotated output of the same attention (`hf_paged.attention` rotates the query and the output). On SmolLM2, int8
  rows rotated agree with the unquantized cache on 99.2% of next-token argmaxes over 20,480 tokens, 98.4% unrotated
  (the bench's ``quality`` scenario).
  Layers that cache multi-head latent attention's latents (which serve as keys and values at once) are not rotated.
* Inline, the scales are part of the block: copy-on-write copies, gathers, slabs, prefix-cache pools and block
  offsets carry them with the codes, and nothing else in the pool changes. They cost 2 bytes per ``D`` codes
  (3% for ``D = 64``), so a pool of 8-bit rows takes ``(D + 2) / (4 D)`` of float32's bytes (0.258x at ``D = 64``).

The Triton kernels (`hf_paged.kernels`) compute the same function; PyTorch code reads and writes pools through
`encode` and `decode` (the writes in `hf_paged.ops.reshape_and_cache` and `hf_paged.storage.LayerStore.write`, the
reads wherever keys leave a pool: `hf_paged.ops.gather_kv`, the block-range reads).

Rounding, identical on both paths: the magnitude is clamped to ``[2**-24, 65504]`` and rounded to float16 first, the
scale is ``magnitude / qmax`` in float32, the codes ``x / scale``, then for int8 ``floor(c + 0.5)`` clamped to
``[-127, 127]``, for float8 clamped to ``[-448, 448]`` and rounded to nearest even by the cast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

__all__ = ["KV_FORMATS", "KVFormat", "SCALE_WIDTH", "decode", "encode", "encode_pair", "format_of", "from_storage",
           "is_quantized", "kv_format", "logical_width", "raw", "rotated", "rotation", "rounded", "stored_width",
           "to_storage", "to_storage_pair"]

#: Elements (bytes) after a row's codes that hold its largest magnitude, a float16.
SCALE_WIDTH = 2
# The stored magnitude's bounds: float16's smallest subnormal (a row of zeros still gets a usable scale) and largest
# finite value.
MAGNITUDE_MIN, MAGNITUDE_MAX = 2.0 ** -24, 65504.0


@dataclass(frozen=True)
class KVFormat:
    """An 8-bit storage format: its torch dtype, its name for users and its largest code."""

    dtype: torch.dtype
    name: str
    qmax: float


KV_FORMATS = {
    "int8": KVFormat(torch.int8, "int8", 127.0),
    "float8_e4m3fn": KVFormat(torch.float8_e4m3fn, "float8_e4m3fn", 448.0),
}
_ALIASES = {"fp8": "float8_e4m3fn", "float8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "e4m3": "float8_e4m3fn"}
_BY_DTYPE = {fmt.dtype: fmt for fmt in KV_FORMATS.values()}


def kv_format(kv_dtype) -> KVFormat | None:
    """The `KVFormat` a user's ``kv_dtype`` names (a torch dtype or its name; None, "auto" or a float dtype of the
    model: unquantized), or a ValueError that lists what is accepted."""
    if kv_dtype is None or (isinstance(kv_dtype, str) and kv_dtype.strip().lower() in ("", "auto", "none")):
        return None
    if isinstance(kv_dtype, torch.dtype):
        if kv_dtype in _BY_DTYPE:
            return _BY_DTYPE[kv_dtype]
    elif isinstance(kv_dtype, str):
        name = kv_dtype.strip().lower().removeprefix("torch.")
        name = _ALIASES.get(name, name)
        if name in KV_FORMATS:
            return KV_FORMATS[name]
    raise ValueError(
        f"hf_paged: kv_dtype={kv_dtype!r} is not a KV storage format; use 'int8' or 'float8_e4m3fn' (torch.int8, "
        "torch.float8_e4m3fn) for 8-bit keys and values, or leave kv_dtype unset to store them as the model computes "
        "them."
    )


def is_quantized(dtype: torch.dtype) -> bool:
    """Whether a pool of this storage dtype holds 8-bit codes with inline scales."""
    return dtype in _BY_DTYPE


def format_of(dtype: torch.dtype) -> KVFormat | None:
    """The `KVFormat` of a pool's storage dtype (None: unquantized)."""
    return _BY_DTYPE.get(dtype)


def stored_width(head_dim: int) -> int:
    """Elements of one stored row of `head_dim` values: the codes, then the scale."""
    if head_dim % 2:
        raise ValueError(
            f"hf_paged: 8-bit keys and values need an even head_dim (a row's float16 scale follows its codes, "
            f"aligned to 2 bytes); this model's is {head_dim}. Leave kv_dtype unset for it."
        )
    return head_dim + SCALE_WIDTH


def logical_width(width: int, dtype: torch.dtype) -> int:
    """The head_dim of rows stored `width` elements wide in a pool of storage dtype `dtype`."""
    return width - SCALE_WIDTH if is_quantized(dtype) else width


def encode(states: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., D + 2]`` stored rows of `dtype` for ``states`` (``[..., D]``): codes, then each row's largest
    magnitude as a float16 (module docstring)."""
    fmt = _BY_DTYPE[dtype]
    stored_width(states.shape[-1])  # an odd head_dim is refused: the scale that follows the codes needs 2 aligned bytes
    values = states.float()
    magnitude = values.abs().amax(-1, keepdim=True).clamp_(MAGNITUDE_MIN, MAGNITUDE_MAX).to(torch.float16)
    codes = values / magnitude.float().div_(fmt.qmax)
    if fmt.dtype == torch.int8:
        codes.add_(0.5).floor_()
    codes = codes.clamp_(-fmt.qmax, fmt.qmax).to(dtype)
    # In place and joined by one cat: a decode step encodes one token per row, where each operation's dispatch costs
    # more than its arithmetic. Bytes, since not every device's cat takes float8.
    return torch.cat((codes.view(torch.uint8), magnitude.view(torch.uint8)), -1).view(dtype)


def encode_pair(keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode` of a layer's keys and values, in one call where they are few rows of one shape (a decode step):
    half the operations, for a copy of the rows (which costs more than it saves past a few hundred tokens)."""
    if keys.shape != values.shape or keys.dtype != values.dtype or keys.numel() > _PAIR_MAX_ELEMENTS:
        return encode(keys, dtype), encode(values, dtype)
    stored = encode(torch.stack((keys, values)), dtype)
    return stored[0], stored[1]


# Elements up to which `encode_pair` stacks keys and values: a decode step's. (On a CPU, at 3 heads of 64, stacking
# saves 35% at one token and nothing from about 512.)
_PAIR_MAX_ELEMENTS = 32768


def decode(stored: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., D]`` values of `dtype` from stored rows ``[..., D + 2]`` (any strides whose last is 1)."""
    magnitude = stored[..., -SCALE_WIDTH:].view(torch.float16).to(torch.float32)
    codes = stored[..., :-SCALE_WIDTH]
    if stored.dtype == torch.int8:
        values = codes.to(torch.float32)
        scale = magnitude / _BY_DTYPE[torch.int8].qmax
    else:  # float8 codes as float32s 2**120 times smaller, times a scale 2**120 times larger: the same products
        values = _float8_as_float32(codes)
        # magnitude / 448 * 2**120 in one division, rounded alike: 448 * 2**-120 is exact, and a power of two
        # scales a quotient without rounding it again (finite up to the largest magnitude: 1.9e38).
        scale = magnitude / (_BY_DTYPE[torch.float8_e4m3fn].qmax * 2.0 ** -120)
    values.mul_(scale)
    return values if dtype == torch.float32 else values.to(dtype)


def _float8_as_float32(codes: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes as float32 values 2**120 times smaller, exactly, without PyTorch's float8 conversion (an
    element at a time on the CPU: ten times slower) and in three passes over the codes. An e4m3 code's sign, 4
    exponent and 3 mantissa bits, moved to a float32's sign, low exponent and top mantissa bits, read as a float32
    whose exponent bias is 127 where e4m3's is 7; e4m3's subnormals land on float32's, also 2**120 apart (under
    ``torch.set_flush_denormal(True)`` the CPU reads those, codes below 2**-6, as zero). NaN codes, which `encode`
    never writes, read as finite. (The Triton kernels go through float16, `hf_paged.kernels._quant`: same values.)"""
    bits = codes.view(torch.int8).to(torch.int32)  # sign-extended: bits 8-31 copy the sign
    bits <<= 20  # the sign to bit 31, exponent and mantissa to bits 20-26; bits 27-30 hold copies of the sign
    bits &= -2013265921  # clear bits 27-30 (0x87FFFFFF)
    return bits.view(torch.float32)


def to_storage(states: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``states`` (``[..., D]``) as a pool of storage dtype `dtype` holds them: as they are, cast, or encoded."""
    if states.dtype == dtype:
        return states
    return encode(states, dtype) if is_quantized(dtype) else states.to(dtype)


def to_storage_pair(keys: torch.Tensor, values: torch.Tensor, key_dtype: torch.dtype,
                    value_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`to_storage` of a layer's keys and values (8-bit rows of both through `encode_pair`)."""
    if key_dtype == value_dtype and is_quantized(key_dtype) and keys.dtype != key_dtype and values.dtype != key_dtype:
        return encode_pair(keys, values, key_dtype)
    return to_storage(keys, key_dtype), to_storage(values, value_dtype)


def from_storage(stored: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Keys or values read out of a pool (``[..., W]``): decoded (to `dtype`, float32 by default) if 8-bit, else as
    they are."""
    return decode(stored, dtype or torch.float32) if is_quantized(stored.dtype) else stored


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or its bytes where PyTorch lacks a kernel for its dtype (``index_copy_`` of float8 on the CPU):
    copying the codes' bits is copying the codes."""
    return tensor.view(torch.uint8) if tensor.dtype == torch.float8_e4m3fn else tensor


def rounded(states: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``states`` as a pool of storage dtype `dtype` would give them back (for attention that reads a step's keys
    before or instead of the pool: the same values either way)."""
    if dtype is None or not is_quantized(dtype):
        return states
    return decode(encode(states, dtype), states.dtype)


@cache
def _hadamard(size: int) -> torch.Tensor:
    """The ``size x size`` Sylvester Hadamard matrix over ``sqrt(size)`` (orthonormal, symmetric; a power of two)."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix / math.sqrt(size)


@cache
def rotation(head_dim: int, device: torch.device) -> torch.Tensor:
    """The float32 ``[D, D]`` rotation of 8-bit rows (module docstring): block-diagonal normalised Hadamard matrices
    of the largest power of two dividing `head_dim`; symmetric and its own inverse."""
    block = head_dim & -head_dim
    blocks = _hadamard(block)
    return torch.block_diag(*[blocks] * (head_dim // block)).to(device)


def rotated(states: torch.Tensor) -> torch.Tensor:
    """``states @ R`` over the last dimension (`rotation`), in `states`' dtype: rotates rows, and un-rotates them."""
    matrix = rotation(states.shape[-1], states.device)
    return torch.matmul(states.to(torch.float32), matrix).to(states.dtype)
