"""8-bit keys and values in the kernels: `hf_paged.quant`'s encode and decode as Triton functions, bit for bit.

A pool of 8-bit storage holds each (token, KV head) row as ``D`` codes followed by the row's largest magnitude, a
float16 in two more elements (`hf_paged.quant`). The kernels get such a pool as a pointer to its codes (`raw`:
``int8`` codes as int8, ``float8_e4m3fn`` codes as their uint8 bits), read and write the magnitude through a float16
pointer to the two elements after a row's codes (every stride of an 8-bit pool is even, `check_codes`), and work in
the row's logical width ``D``. A kernel's ``CODES`` constexpr names the format: `FLOAT` (no codes), `INT8`, `FP8`.

float8 codes are converted with integer operations (`fp8e4m3_as_float16`, `float_to_fp8e4m3`), not with Triton's
``.to(tl.float8e4nv)``: that does not compile for sm_80 ("type fp8e4nv not supported in this architecture"; sm_89 and
later convert in hardware), and Triton's interpreter rounds it by truncation and reads code 0x7F as 480 instead of
NaN. The encoding is PyTorch's own (c10's ``fp8e4m3fn_from_fp32_value``), the decoding `hf_paged.quant.decode`'s,
so every target and the interpreter give exactly PyTorch's codes and values.

Divisions use ``tl.math.div_rn`` (IEEE, as PyTorch divides): Triton's ``/`` on float32 is ``div.full.f32`` on NVIDIA
GPUs, which may be off by an ulp, and one ulp moves a code that sits on a rounding boundary.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_paged import quant

__all__ = ["FLOAT", "FP8", "INT8", "check_codes", "codes_of", "dequantize", "float_to_fp8e4m3", "fp8e4m3_as_float16",
           "load_magnitude", "quantize", "raw", "store_magnitude"]

#: The kernels' ``CODES`` constexpr: float storage (no codes), int8 codes, float8_e4m3fn codes (as uint8 bits).
FLOAT, INT8, FP8 = 0, 1, 2
_CODES = {torch.int8: INT8, torch.float8_e4m3fn: FP8}


def codes_of(dtype: torch.dtype) -> int:
    """The ``CODES`` constexpr of a pool of storage dtype `dtype`."""
    return _CODES.get(dtype, FLOAT)


def raw(cache: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel gets for a pool: itself, or for float8 codes their bits as uint8 (see the module doc)."""
    return quant.raw(cache)


def check_codes(name: str, cache: torch.Tensor) -> None:
    """Raise ValueError unless the rows of the 8-bit pool `cache` (``[N, bs, H, D + 2]``) can hold their float16
    magnitudes where the kernels read them: a unit stride along the row, every other stride and the address even."""
    strides = cache.stride()
    if strides[-1] != 1 or any(stride % 2 for stride in strides[:-1]) or cache.data_ptr() % 2:
        raise ValueError(f"{name} holds 8-bit rows with float16 magnitudes (hf_paged.quant): its last stride must be "
                         f"1 and its other strides and its address even, got strides {strides}")


@triton.jit
def fp8e4m3_as_float16(bits):
    """float8_e4m3fn codes given as uint8 bits (any shape) as float16 values ``2**8`` times smaller, exactly (as
    `hf_paged.quant.decode` reads them): the code's sign, exponent and mantissa moved into a float16's, whose exponent
    bias is 15 where e4m3's is 7; e4m3's subnormals land on float16's, also ``2**8`` apart. The NaN codes (0x7F,
    0xFF), which no write produces, read as finite values."""
    bits = bits.to(tl.uint16)
    return (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.float16, bitcast=True)


@triton.jit
def float_to_fp8e4m3(x):
    """float8_e4m3fn codes (uint8 bits) of float32 `x`, as PyTorch casts: rounded to nearest even, beyond +-448
    saturated to +-448, NaN to 0x7F (sign kept)."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.minimum(tl.abs(x), 448.0)
    a_bits = a.to(tl.uint32, bitcast=True)
    # Below 2**-6 (the smallest normal code): adding 2**14 rounds to a multiple of 2**-9 (the subnormal step), to
    # nearest even, and leaves that multiple in the low mantissa bits.
    subnormal = (a + 16384.0).to(tl.uint32, bitcast=True) - (141 << 23)
    # Normal: round the 23-bit mantissa to 3 bits, to nearest even, then rebias the exponent (127 -> 7).
    normal = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20) - (120 << 3)
    magnitude = tl.where(a_bits < (121 << 23), subnormal, normal)
    magnitude = tl.where(x != x, 0x7F, magnitude)
    return (sign | magnitude).to(tl.uint8)


@triton.jit
def load_magnitude(after_codes, mask):
    """The float16 magnitudes of rows whose codes end just before the pointers `after_codes` (0 where masked)."""
    return tl.load(after_codes.to(tl.pointer_type(tl.float16), bitcast=True), mask=mask, other=0.0)


@triton.jit
def store_magnitude(after_codes, magnitude, mask):
    """Store float16 `magnitude` after rows whose codes end just before the pointers `after_codes`."""
    tl.store(after_codes.to(tl.pointer_type(tl.float16), bitcast=True), magnitude, mask=mask)


@triton.jit
def dequantize(codes, magnitude, CODES: tl.constexpr):
    """float32 values ``code * magnitude / qmax`` (`hf_paged.quant.decode`); `magnitude` float16, broadcastable to
    `codes` (one per row)."""
    if CODES == 1:
        values = codes.to(tl.float32) * tl.math.div_rn(magnitude.to(tl.float32), 127.0)
    else:  # the float16 values 2**8 times smaller, times the scale 2**8 times larger: the same products
        values = fp8e4m3_as_float16(codes).to(tl.float32) * (tl.math.div_rn(magnitude.to(tl.float32), 448.0) * 256.0)
    return values


@triton.jit
def quantize(values, CODES: tl.constexpr):
    """``(codes, magnitude)`` of float32 rows ``[R, C]`` (`hf_paged.quant.encode`; padding columns must be 0): the
    codes ``[R, C]`` (int8, or float8_e4m3fn bits as uint8) and each row's largest magnitude ``[R]`` as float16."""
    magnitude = tl.max(tl.abs(values), axis=1)
    magnitude = tl.minimum(tl.maximum(magnitude, 5.960464477539063e-08), 65504.0)  # [2**-24, 65504]
    magnitude = magnitude.to(tl.float16, fp_downcast_rounding="rtne")
    if CODES == 1:
        codes = tl.math.div_rn(values, tl.math.div_rn(magnitude.to(tl.float32), 127.0)[:, None])
        codes = tl.minimum(tl.maximum(tl.floor(codes + 0.5), -127.0), 127.0).to(tl.int8)
    else:
        codes = float_to_fp8e4m3(tl.math.div_rn(values, tl.math.div_rn(magnitude.to(tl.float32), 448.0)[:, None]))
    return codes, magnitude
