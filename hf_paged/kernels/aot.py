"""Ahead-of-time compile of every kernel for sm_80 and sm_90, without a GPU or a CUDA driver.

`triton.compile` with an explicit `GPUTarget` runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) on the
CPU; the ptxas and nvdisasm shipped in Triton's wheel then give registers, spills and the SASS. Each
config mimics what the launcher would run: the same constexprs (from the launchers' own helpers) and the JIT's
specialisation of runtime arguments (an integer equal to 1 becomes a constant, a multiple of 16 is marked divisible
by 16, pointers are 16-byte aligned).

Run it as ``python -m hf_paged.kernels``; it exits non-zero if a kernel fails to compile or spills registers, or
if a 16-bit attention config's ``tl.dot`` did not become matrix instructions.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from ._launch import COMPILE_OPTIONS
from ._quant import FP8, INT8
from .copy_blocks import copy_blocks_kernel, copy_blocks_meta
from .paged_attention_kernel import (
    paged_attention_kernel,
    paged_attention_meta,
    reduce_splits_kernel,
    reduce_splits_meta,
)
from .reshape_and_cache import reshape_and_cache_kernel, reshape_and_cache_meta
from .shared_prefix_attention import shared_prefix_kernel, shared_prefix_meta

__all__ = ["ARCHS", "CONFIGS", "CompileResult", "KernelConfig", "compile_config", "main"]

#: (label, compute capability) pairs compiled by default.
ARCHS = (("sm_80", 80), ("sm_90", 90))


class Pointer(str):
    """A pointer argument's Triton type, e.g. ``Pointer("*bf16")`` (16-byte aligned, as torch allocations are)."""


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One representative launch: the kernel, a sample value per runtime argument and the constexprs."""

    kernel: Any
    label: str
    args: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3  # Triton's default
    mma_expected: bool = False  # the kernel's inner loop is tl.dot on 16-bit operands


@dataclasses.dataclass
class CompileResult:
    config: KernelConfig
    arch: str
    registers: int = 0
    spill_bytes: int = 0  # spill stores + spill loads reported by ptxas
    stack_bytes: int = 0
    shared_bytes: int = 0
    mma: str = "-"  # matrix instructions found in the SASS
    wide_memory_ops: str = "-"  # "16-byte global memory instructions / all global memory instructions"
    error: str = ""


def _specialize(config: KernelConfig) -> tuple[dict[str, str], dict[str, Any], dict[tuple[int, ...], list]]:
    """The signature, constants and attributes the JIT would build for `config`'s sample arguments."""
    arg_names = config.kernel.arg_names
    signature: dict[str, str] = {}
    constants = dict(config.constexprs)
    attrs: dict[tuple[int, ...], list] = {}
    for name in arg_names:
        if name in config.constexprs:
            signature[name] = "constexpr"
            continue
        value = config.args[name]
        index = (arg_names.index(name),)
        if isinstance(value, Pointer):
            signature[name] = str(value)
            attrs[index] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[index] = [["tt.divisibility", 16]]
    missing = set(config.args) - set(arg_names)
    if missing:
        raise ValueError(f"{config.label}: unknown arguments {sorted(missing)}")
    return signature, constants, attrs


def _ptxas_usage(ptx: str, capability: int, workdir: Path) -> tuple[int, int, int]:
    """Registers, spill bytes (stores + loads) and stack frame bytes as reported by ``ptxas -v``.

    Re-runs the ptxas Triton itself picks for `capability` (the wheel ships an older one for sm_80 and a newer one
    for sm_90+) with Triton's register-allocation flag, so the numbers are those of the cubin Triton built.
    """
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE).group(1)
    path = workdir / "kernel.ptx"
    path.write_text(ptx)
    # Triton < 3.5 ships one ptxas for every architecture: its `get_ptxas` takes no argument.
    ptxas = get_ptxas(capability) if inspect.signature(get_ptxas).parameters else get_ptxas()
    command = [ptxas.path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(path),
               "-o", str(workdir / "kernel.o")]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"ptxas failed: {run.stderr.strip().splitlines()[-1]}")
    log = run.stdout + run.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stack, spill_st, spill_ld = (int(x) for x in re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return registers, spill_st + spill_ld, stack


def _sass_summary(cubin: bytes, workdir: Path) -> tuple[str, str]:
    """From the SASS: the matrix instructions (HMMA = mma.sync, HGMMA = wgmma; ``none`` if absent), and how many
    global memory instructions move 16 bytes per thread (LDG/STG/LDGSTS ``.128``) out of all of them."""
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    run = subprocess.run([triton.knobs.nvidia.nvdisasm.path, "-c", str(path)], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"nvdisasm failed: {run.stderr.strip().splitlines()[-1]}")
    sass = run.stdout
    counts: dict[str, int] = {}
    for op, shape in re.findall(r"\b(HGMMA|HMMA|IMMA)\.(\S+?)[\s;]", sass):
        key = f"{op}.{shape.split('.')[0]}"
        counts[key] = counts.get(key, 0) + 1
    mma = " ".join(f"{key} x{n}" for key, n in sorted(counts.items())) or "none"
    memory = re.findall(r"\b(?:LDGSTS|LDG|STG)(?:\.[A-Z0-9]+)*\b", sass)
    wide = sum(op.endswith(".128") for op in memory)
    return mma, f"{wide}/{len(memory)}"


def compile_config(config: KernelConfig, arch: str, capability: int) -> CompileResult:
    """Compile `config` for one architecture and measure it; compile errors are captured in ``error``."""
    result = CompileResult(config, arch)
    signature, constants, attrs = _specialize(config)
    source = ASTSource(fn=config.kernel, signature=signature, constexprs=constants, attrs=attrs)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages,
                                           **COMPILE_OPTIONS})
        with tempfile.TemporaryDirectory() as tmp:
            result.registers, result.spill_bytes, result.stack_bytes = _ptxas_usage(compiled.asm["ptx"], capability, Path(tmp))
            result.mma, result.wide_memory_ops = _sass_summary(compiled.asm["cubin"], Path(tmp))
        result.shared_bytes = compiled.metadata.shared
    except Exception as exc:  # report every failing config, not just the first
        lines = str(exc).strip().splitlines()
        result.error = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    return result


def _split_meta(meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, int]]:
    """A launcher's ``*_meta`` dict as (constexprs, launch options: ``num_warps`` and ``num_stages`` if given)."""
    constexprs = dict(meta)
    options = {"num_warps": constexprs.pop("num_warps")}
    if "num_stages" in constexprs:
        options["num_stages"] = constexprs.pop("num_stages")
    return constexprs, options


_NUM_BLOCKS = 4096  # pool size the configs assume (it only sets the head stride of the head-major pool)


_NUM_LAYERS = 32  # layers of a block-major slab (only sets its block stride, which offset tables make unused)


def _cache_strides(block_size: int, kv_heads: int, head_dim: int, slabs: bool = False) -> tuple[int, int, int, int]:
    """Strides of one layer's ``[N, bs, Hkv, D]`` pool as `hf_paged.storage.slab_tensor` lays it out (head-major),
    or with `slabs` as a block-major slab of the Triton path does (memory ``[n, L, 2, bs, Hkv, D]``)."""
    if slabs:
        return _NUM_LAYERS * 2 * block_size * kv_heads * head_dim, kv_heads * head_dim, head_dim, 1
    return block_size * head_dim, head_dim, _NUM_BLOCKS * block_size * head_dim, 1


#: 8-bit pools (`hf_paged.quant`): a config's ``codes`` name -> (the kernels' CODES, the cache pointer's type).
_CODES = {None: (0, None), "int8": (INT8, "*i8"), "fp8": (FP8, "*u8")}


def _cache_pointer(dtype: str, codes: str | None) -> Pointer:
    """The pool pointer of a config: the storage dtype, or 8-bit codes (float8 as their uint8 bits)."""
    return Pointer(_CODES[codes][1] or f"*{dtype}")


def _stored(head_dim: int, codes: str | None) -> int:
    """Elements of a stored row: 8-bit rows hold a float16 magnitude after the codes."""
    return head_dim + 2 if codes else head_dim


def _attention_config(label: str, dtype: str, *, q_len: int, heads: int, kv_heads: int, head_dim: int,
                      block_size: int = 16, num_splits: int = 1, window: int | None = None,
                      softcap: float | None = None, sinks: bool = False, chunk: int | None = None,
                      value_dim: int | None = None, slabs: bool = False, rope_dim: int = 0,
                      codes: str | None = None) -> KernelConfig:
    """`paged_attention_kernel`; `slabs`: a pool of several block-major slabs read through offset tables;
    `rope_dim`: latent mode (`head_dim` the latents', `heads` those of one tile, the value cache the rotary keys);
    `codes`: 8-bit pools (``"int8"``, ``"fp8"``) and queries of `dtype`."""
    constexprs, options = _split_meta(paged_attention_meta(
        q_len, heads // kv_heads, head_dim, block_size, num_splits,
        has_key_start=True, has_window=window is not None, has_softcap=softcap is not None,
        fp32_storage=dtype == "fp32", upcast=dtype == "fp32", has_sinks=sinks, has_chunk=chunk is not None,
        value_dim=value_dim, has_offsets=slabs, rope_dim=rope_dim, codes=_CODES[codes][0],
    ))
    value_dim = head_dim if value_dim is None else value_dim
    out = Pointer("*fp32") if num_splits > 1 else Pointer(f"*{dtype}")
    cache_strides = _cache_strides(block_size, kv_heads, _stored(head_dim, codes), slabs)
    value_strides = _cache_strides(block_size, kv_heads, _stored(rope_dim or value_dim, codes), slabs)
    query_dim = head_dim + rope_dim
    out_strides = (q_len * heads * value_dim * num_splits, heads * value_dim * num_splits, value_dim * num_splits)
    args = {
        "out_ptr": out, "max_ptr": Pointer("*fp32"), "sum_ptr": Pointer("*fp32"),
        "query_ptr": Pointer(f"*{dtype}"), "key_cache_ptr": _cache_pointer(dtype, codes),
        "value_cache_ptr": _cache_pointer(dtype, codes), "block_tables_ptr": Pointer("*i32"),
        "key_offsets_ptr": Pointer("*i64"), "value_offsets_ptr": Pointer("*i64"),
        "seq_lens_ptr": Pointer("*i32"), "key_start_ptr": Pointer("*i32"),
        "scale": 0.125, "softcap": float(softcap or 1.0), "window": window or 0,
        "sinks_ptr": Pointer("*fp32"), "chunk": chunk or 0,
        # num_q_tiles: a batch of rows makes it a runtime value (a 1 would be specialised away)
        "q_len": q_len, "num_q_tiles": triton.cdiv(q_len, constexprs["BLOCK_Q"]) + 2,
        # query is Transformers' [B, q, H, D] tensor seen as [B, H, q, D]
        "stride_qb": q_len * heads * query_dim, "stride_qh": query_dim, "stride_qt": heads * query_dim, "stride_qd": 1,
        **dict(zip(("stride_kn", "stride_kt", "stride_kh", "stride_kd"), cache_strides, strict=True)),
        **dict(zip(("stride_vn", "stride_vt", "stride_vh", "stride_vd"), value_strides, strict=True)),
        "stride_btb": 64, "stride_btn": 1,  # a block table 64 blocks wide
        "stride_ob": out_strides[0], "stride_ot": out_strides[1], "stride_oh": out_strides[2],
        "stride_os": value_dim if num_splits > 1 else 0,
        "stride_mb": q_len * heads * num_splits, "stride_mt": heads * num_splits, "stride_mh": num_splits,
    }
    return KernelConfig(paged_attention_kernel, label, args, constexprs, **options, mma_expected=dtype != "fp32")


def _shared_prefix_config(label: str, dtype: str, *, group_rows: int, q_len: int, heads: int, kv_heads: int,
                          head_dim: int, block_size: int = 16, num_splits: int = 1, tail_splits: int = 2,
                          window: int | None = None, softcap: float | None = None,
                          slabs: bool = False, codes: str | None = None) -> KernelConfig:
    """`shared_prefix_kernel` for one group of `group_rows` rows (beams or samples) over a 2048-token prefix;
    `slabs`: a pool of several block-major slabs read through offset tables; `codes`: 8-bit pools."""
    constexprs, options = _split_meta(shared_prefix_meta(
        group_rows, q_len, heads // kv_heads, head_dim, block_size, num_splits,
        has_key_start=True, has_window=window is not None, has_softcap=softcap is not None,
        fp32_storage=dtype == "fp32", upcast=dtype == "fp32", has_offsets=slabs, codes=_CODES[codes][0],
    ))
    splits = num_splits + tail_splits
    cache_strides = _cache_strides(block_size, kv_heads, _stored(head_dim, codes), slabs)
    args = {
        "partial_ptr": Pointer("*fp32"), "max_ptr": Pointer("*fp32"), "sum_ptr": Pointer("*fp32"),
        "tail_lens_ptr": Pointer("*i32"), "query_ptr": Pointer(f"*{dtype}"),
        "key_cache_ptr": _cache_pointer(dtype, codes), "value_cache_ptr": _cache_pointer(dtype, codes),
        "prefix_blocks_ptr": Pointer("*i32"),
        "key_offsets_ptr": Pointer("*i64"), "value_offsets_ptr": Pointer("*i64"),
        "seq_lens_ptr": Pointer("*i32"), "key_start_ptr": Pointer("*i32"),
        "scale": 0.125, "softcap": float(softcap or 1.0), "window": window or 0,
        "batch": group_rows, "q_len": q_len, "group_rows": group_rows, "prefix_len": 2048,
        "num_m_tiles": triton.cdiv(group_rows * q_len, constexprs["BLOCK_Q"]), "first_split": tail_splits,
        "stride_qb": q_len * heads * head_dim, "stride_qh": head_dim, "stride_qt": heads * head_dim, "stride_qd": 1,
        **dict(zip(("stride_kn", "stride_kt", "stride_kh", "stride_kd"), cache_strides, strict=True)),
        **dict(zip(("stride_vn", "stride_vt", "stride_vh", "stride_vd"), cache_strides, strict=True)),
        "stride_pbg": 2048 // block_size, "stride_pbn": 1,
        "stride_ob": q_len * heads * splits * head_dim, "stride_ot": heads * splits * head_dim,
        "stride_oh": splits * head_dim, "stride_os": head_dim,
        "stride_mb": q_len * heads * splits, "stride_mt": heads * splits, "stride_mh": splits,
    }
    return KernelConfig(shared_prefix_kernel, label, args, constexprs, **options, mma_expected=dtype != "fp32")


def _reshape_and_cache_config(label: str, dtype: str, kv_heads: int, head_dim: int, block_size: int = 16,
                              value_dim: int | None = None, slabs: bool = False,
                              codes: str | None = None) -> KernelConfig:
    """`reshape_and_cache_kernel`; `codes`: into 8-bit pools (states of `dtype` encoded)."""
    value_dim = head_dim if value_dim is None else value_dim
    token_stride = kv_heads * (2 * head_dim + value_dim)  # k and v are views into a fused qkv projection
    cache_strides = _cache_strides(block_size, kv_heads, _stored(head_dim, codes), slabs)
    value_strides = _cache_strides(block_size, kv_heads, _stored(value_dim, codes), slabs)
    args = {
        "key_ptr": Pointer(f"*{dtype}"), "value_ptr": Pointer(f"*{dtype}"),
        "key_cache_ptr": _cache_pointer(dtype, codes), "value_cache_ptr": _cache_pointer(dtype, codes),
        "key_offsets_ptr": Pointer("*i64"), "value_offsets_ptr": Pointer("*i64"), "slot_mapping_ptr": Pointer("*i64"), "num_slots": 4096 * block_size, "num_kv_heads": kv_heads,
        "num_v_heads": kv_heads,
        "stride_kt": token_stride, "stride_kh": head_dim, "stride_kd": 1,
        "stride_vt": token_stride, "stride_vh": value_dim, "stride_vd": 1,
        **dict(zip(("stride_kcn", "stride_kcs", "stride_kch", "stride_kcd"), cache_strides, strict=True)),
        **dict(zip(("stride_vcn", "stride_vcs", "stride_vch", "stride_vcd"), value_strides, strict=True)),
    }
    constexprs, options = _split_meta(reshape_and_cache_meta(kv_heads, head_dim, block_size, kv_heads, value_dim,
                                                               has_offsets=slabs, codes=_CODES[codes][0]))
    return KernelConfig(reshape_and_cache_kernel, label, args, constexprs, **options)


def _copy_blocks_config(label: str, dtype: str, kv_heads: int, head_dim: int, block_size: int = 16,
                        kinds: int = 2, slabs: bool = False) -> KernelConfig:
    """`copy_blocks_kernel`; an 8-bit pool is copied as its bytes (`dtype` ``"i8"`` or ``"u8"``, `head_dim` its stored
    width)."""
    block = block_size * kv_heads * head_dim
    stride_block, stride_token, stride_head, _ = _cache_strides(block_size, kv_heads, head_dim, slabs)
    # head-major: [L, K, H, N * bs, D] in memory; block-major slabs: [n, L, K, bs, H, D]
    stride_layer, stride_kv = (kinds * block, block) if slabs else (kinds * _NUM_BLOCKS * block, _NUM_BLOCKS * block)
    args = {"pool_ptr": Pointer(f"*{dtype}"), "src_ptr": Pointer("*i64"), "dst_ptr": Pointer("*i64"),
            "offsets_ptr": Pointer("*i64"), "num_kinds": kinds, "stride_layer": stride_layer, "stride_kv": stride_kv,
            "stride_block": stride_block, "stride_token": stride_token, "stride_head": stride_head,
            "block_numel": block}
    constexprs, options = _split_meta(copy_blocks_meta(kv_heads, head_dim, has_offsets=slabs))
    return KernelConfig(copy_blocks_kernel, label, args, constexprs, **options)


def _reduce_config(label: str, dtype: str, head_dim: int, num_splits: int) -> KernelConfig:
    args = {"out_ptr": Pointer(f"*{dtype}"), "partial_ptr": Pointer("*fp32"), "max_ptr": Pointer("*fp32"),
            "sum_ptr": Pointer("*fp32")}
    constexprs, options = _split_meta(reduce_splits_meta(head_dim, num_splits))
    return KernelConfig(reduce_splits_kernel, label, args, constexprs, **options)


#: Shapes: SmolLM2-135M (9 heads, 3 KV heads, D 64), Llama-3-8B (32 heads, 8 KV heads, D 128) and Gemma-2-2B
#: (8 heads, 4 KV heads, D 256, sliding window 4096, softcap 50), gpt-oss-20b (64 heads, 8 KV heads, D 64, sinks,
#: window 128) and Llama-4-Scout (40 heads, 8 KV heads, D 128, chunks of 8192).
CONFIGS: tuple[KernelConfig, ...] = (
    _reshape_and_cache_config("SmolLM2 fp16", "fp16", kv_heads=3, head_dim=64),
    _reshape_and_cache_config("Llama-8B bf16", "bf16", kv_heads=8, head_dim=128),
    _attention_config("decode SmolLM2 fp16", "fp16", q_len=1, heads=9, kv_heads=3, head_dim=64),
    _attention_config("decode SmolLM2 bf16 split=8", "bf16", q_len=1, heads=9, kv_heads=3, head_dim=64,
                      num_splits=8),
    _attention_config("decode Llama-8B bf16", "bf16", q_len=1, heads=32, kv_heads=8, head_dim=128),
    _attention_config("decode Llama-8B bf16 split=16", "bf16", q_len=1, heads=32, kv_heads=8, head_dim=128,
                      num_splits=16),
    _attention_config("prefill q=512 Llama-8B bf16", "bf16", q_len=512, heads=32, kv_heads=8, head_dim=128),
    _attention_config("decode Gemma2-2B bf16 window+softcap", "bf16", q_len=1, heads=8, kv_heads=4, head_dim=256,
                      window=4096, softcap=50.0),
    _attention_config("tail decode Llama-8B bf16 split=2", "bf16", q_len=1, heads=32, kv_heads=8, head_dim=128,
                      num_splits=2),
    _attention_config("decode SmolLM2 fp32 (ieee dot)", "fp32", q_len=1, heads=9, kv_heads=3, head_dim=64),
    _attention_config("prefill q=64 Gemma2-2B fp32 (ieee dot)", "fp32", q_len=64, heads=8, kv_heads=4, head_dim=256,
                      window=4096, softcap=50.0),
    _attention_config("decode gpt-oss-20b bf16 sinks+window", "bf16", q_len=1, heads=64, kv_heads=8, head_dim=64,
                      window=128, sinks=True),
    _attention_config("decode gpt-oss-20b bf16 sinks split=8", "bf16", q_len=1, heads=64, kv_heads=8, head_dim=64,
                      num_splits=8, sinks=True),
    _attention_config("decode Llama4-Scout bf16 chunk", "bf16", q_len=1, heads=40, kv_heads=8, head_dim=128,
                      chunk=8192),
    _attention_config("prefill q=512 Llama4-Scout bf16 chunk", "bf16", q_len=512, heads=40, kv_heads=8,
                      head_dim=128, chunk=8192),
    _attention_config("prefill q=64 gpt-oss fp32 (ieee dot) sinks+window+chunk", "fp32", q_len=64, heads=64,
                      kv_heads=8, head_dim=64, window=128, sinks=True, chunk=8192),
    _shared_prefix_config("n=8 SmolLM2 fp16", "fp16", group_rows=8, q_len=1, heads=9, kv_heads=3,
                          head_dim=64),
    _shared_prefix_config("beams=8 Llama-8B bf16 split=8", "bf16", group_rows=8, q_len=1, heads=32,
                          kv_heads=8, head_dim=128, num_splits=8),
    _shared_prefix_config("n=4 q=16 Llama-8B bf16", "bf16", group_rows=4, q_len=16, heads=32, kv_heads=8,
                          head_dim=128),
    _shared_prefix_config("n=8 Gemma2-2B bf16 softcap", "bf16", group_rows=8, q_len=1, heads=8, kv_heads=4,
                          head_dim=256, softcap=50.0),
    _shared_prefix_config("n=8 Gemma2-2B bf16 window+softcap", "bf16", group_rows=8, q_len=1, heads=8,
                          kv_heads=4, head_dim=256, window=4096, softcap=50.0),
    _shared_prefix_config("n=8 SmolLM2 fp32 (ieee dot)", "fp32", group_rows=8, q_len=1, heads=9, kv_heads=3,
                          head_dim=64),
    _reduce_config("D=64 splits=8", "bf16", head_dim=64, num_splits=8),
    _reduce_config("D=128 splits=16", "bf16", head_dim=128, num_splits=16),
    _reduce_config("D=128 splits=16+16 (shared prefix)", "bf16", head_dim=128, num_splits=32),
    _reduce_config("D=256 splits=1+2 (shared prefix)", "bf16", head_dim=256, num_splits=3),
    # Keys and values of different widths: MiMo-V2-Flash (64 heads, 4 KV heads, keys 192 wide, values 128), its
    # separate key and value pools ([L, 1, N, bs, Hkv, D] each) and DeepSeek-V3's latents (1 head: 512 and 64).
    _reshape_and_cache_config("MiMo-V2-Flash bf16 Dk=192 Dv=128", "bf16", kv_heads=4, head_dim=192, value_dim=128),
    _attention_config("decode MiMo-V2-Flash bf16 Dk=192 Dv=128", "bf16", q_len=1, heads=64, kv_heads=4,
                      head_dim=192, value_dim=128),
    _attention_config("decode MiMo-V2-Flash bf16 Dk=192 Dv=128 split=8", "bf16", q_len=1, heads=64, kv_heads=4,
                      head_dim=192, value_dim=128, num_splits=8),
    _attention_config("prefill q=128 MiMo-V2-Flash bf16 Dk=192 Dv=128", "bf16", q_len=128, heads=64, kv_heads=4,
                      head_dim=192, value_dim=128),
    _reshape_and_cache_config("DeepSeek-V3 latents bf16 Dk=512 Dv=64", "bf16", kv_heads=1, head_dim=512, value_dim=64),
    _copy_blocks_config("DeepSeek-V3 latents bf16 (one pool of two)", "bf16", kv_heads=1, head_dim=512, kinds=1),
    # Latent mode (absorbed MLA, hf_paged.latent): DeepSeek-V3's 512-wide latents and 64-wide rotary keys, one KV
    # head; the launcher gives a tile 16 of the query heads (128 in all: 8 tiles per row and token).
    _attention_config("decode DeepSeek-V3 latent bf16 512+64", "bf16", q_len=1, heads=16, kv_heads=1, head_dim=512,
                      rope_dim=64),
    _attention_config("decode DeepSeek-V3 latent bf16 512+64 split=8", "bf16", q_len=1, heads=16, kv_heads=1,
                      head_dim=512, rope_dim=64, num_splits=8),
    _attention_config("q=4 DeepSeek-V3 latent bf16 512+64", "bf16", q_len=4, heads=16, kv_heads=1, head_dim=512,
                      rope_dim=64),
    _attention_config("slabs decode DeepSeek-V3 latent bf16 512+64", "bf16", q_len=1, heads=16, kv_heads=1,
                      head_dim=512, rope_dim=64, slabs=True),
    _attention_config("decode DeepSeek-V3 latent fp32 (ieee dot) 512+64", "fp32", q_len=1, heads=16, kv_heads=1,
                      head_dim=512, rope_dim=64),
    _attention_config("decode MiniCPM3 latent fp16 256+32 (40 heads: tiles of 10)", "fp16", q_len=1, heads=10,
                      kv_heads=1, head_dim=256, rope_dim=32),
    _copy_blocks_config("SmolLM2 fp16", "fp16", kv_heads=3, head_dim=64),
    _copy_blocks_config("Llama-8B bf16", "bf16", kv_heads=8, head_dim=128),
    # Pools of several block-major slabs (memory [n, L, 2, bs, Hkv, D] each), blocks read through offset tables.
    _reshape_and_cache_config("slabs SmolLM2 fp16", "fp16", kv_heads=3, head_dim=64, slabs=True),
    _reshape_and_cache_config("slabs Llama-8B bf16", "bf16", kv_heads=8, head_dim=128, slabs=True),
    _attention_config("slabs decode SmolLM2 bf16 split=8", "bf16", q_len=1, heads=9, kv_heads=3, head_dim=64,
                      num_splits=8, slabs=True),
    _attention_config("slabs decode Llama-8B bf16", "bf16", q_len=1, heads=32, kv_heads=8, head_dim=128, slabs=True),
    _attention_config("slabs prefill q=512 Llama-8B bf16", "bf16", q_len=512, heads=32, kv_heads=8, head_dim=128,
                      slabs=True),
    _attention_config("slabs decode Gemma2-2B bf16 window+softcap", "bf16", q_len=1, heads=8, kv_heads=4,
                      head_dim=256, window=4096, softcap=50.0, slabs=True),
    _attention_config("slabs tail decode Llama-8B bf16 split=2", "bf16", q_len=1, heads=32, kv_heads=8,
                      head_dim=128, num_splits=2, slabs=True),
    _attention_config("slabs prefill q=64 Gemma2-2B fp32 (ieee dot)", "fp32", q_len=64, heads=8, kv_heads=4,
                      head_dim=256, window=4096, softcap=50.0, slabs=True),
    _attention_config("slabs decode gpt-oss-20b bf16 sinks+window", "bf16", q_len=1, heads=64, kv_heads=8,
                      head_dim=64, window=128, sinks=True, slabs=True),
    _attention_config("slabs prefill q=128 MiMo-V2-Flash bf16 Dk=192 Dv=128", "bf16", q_len=128, heads=64,
                      kv_heads=4, head_dim=192, value_dim=128, slabs=True),
    _shared_prefix_config("slabs beams=8 Llama-8B bf16 split=8", "bf16", group_rows=8, q_len=1, heads=32,
                          kv_heads=8, head_dim=128, num_splits=8, slabs=True),
    _shared_prefix_config("slabs n=8 Gemma2-2B bf16 window+softcap", "bf16", group_rows=8, q_len=1, heads=8,
                          kv_heads=4, head_dim=256, window=4096, softcap=50.0, slabs=True),
    _copy_blocks_config("slabs Llama-8B bf16", "bf16", kv_heads=8, head_dim=128, slabs=True),
    # Block size 32, and head dims that are not powers of two: Phi-3-mini (32 heads, 32 KV heads, D 96) and Phi-2
    # (32 heads, D 80), padded to 128-wide tiles with masked loads.
    _reshape_and_cache_config("bs=32 Llama-8B bf16", "bf16", kv_heads=8, head_dim=128, block_size=32),
    _attention_config("bs=32 decode Llama-8B bf16", "bf16", q_len=1, heads=32, kv_heads=8, head_dim=128,
                      block_size=32),
    _attention_config("bs=32 slabs prefill q=512 Llama-8B bf16", "bf16", q_len=512, heads=32, kv_heads=8,
                      head_dim=128, block_size=32, slabs=True),
    _shared_prefix_config("bs=32 n=8 Llama-8B bf16", "bf16", group_rows=8, q_len=1, heads=32, kv_heads=8,
                          head_dim=128, block_size=32),
    _copy_blocks_config("bs=32 Llama-8B bf16", "bf16", kv_heads=8, head_dim=128, block_size=32),
    _reshape_and_cache_config("Phi-3-mini bf16 D=96", "bf16", kv_heads=32, head_dim=96),
    _attention_config("decode Phi-3-mini bf16 D=96", "bf16", q_len=1, heads=32, kv_heads=32, head_dim=96),
    _attention_config("decode Phi-3-mini bf16 D=96 split=8", "bf16", q_len=1, heads=32, kv_heads=32, head_dim=96,
                      num_splits=8),
    _attention_config("prefill q=512 Phi-3-mini bf16 D=96", "bf16", q_len=512, heads=32, kv_heads=32, head_dim=96),
    _attention_config("decode Phi-3-mini fp32 (ieee dot) D=96", "fp32", q_len=1, heads=32, kv_heads=32,
                      head_dim=96),
    _shared_prefix_config("n=8 Phi-3-mini bf16 D=96", "bf16", group_rows=8, q_len=1, heads=32, kv_heads=32,
                          head_dim=96),
    _attention_config("decode Phi-2 fp16 D=80", "fp16", q_len=1, heads=32, kv_heads=32, head_dim=80),
    _attention_config("prefill q=512 Phi-2 fp16 D=80", "fp16", q_len=512, heads=32, kv_heads=32, head_dim=80),
    _attention_config("slabs decode Phi-2 fp16 D=80", "fp16", q_len=1, heads=32, kv_heads=32, head_dim=80,
                      slabs=True),
    _reduce_config("D=96 splits=8", "bf16", head_dim=96, num_splits=8),
    # 8-bit pools (hf_paged.quant: int8 / float8_e4m3fn codes, a float16 magnitude per token and head, rows D + 2
    # wide): encoded by the write, dequantized as the attention loads its tiles, copied as bytes.
    _reshape_and_cache_config("int8 SmolLM2 bf16", "bf16", kv_heads=3, head_dim=64, codes="int8"),
    _reshape_and_cache_config("fp8 slabs Llama-8B bf16", "bf16", kv_heads=8, head_dim=128, slabs=True, codes="fp8"),
    _reshape_and_cache_config("fp8 DeepSeek-V3 latents bf16 Dk=512 Dv=64", "bf16", kv_heads=1, head_dim=512,
                              value_dim=64, codes="fp8"),
    _attention_config("int8 decode Llama-8B bf16", "bf16", q_len=1, heads=32, kv_heads=8, head_dim=128,
                      codes="int8"),
    _attention_config("fp8 decode Llama-8B bf16", "bf16", q_len=1, heads=32, kv_heads=8, head_dim=128, codes="fp8"),
    _attention_config("fp8 slabs decode Llama-8B bf16 split=16", "bf16", q_len=1, heads=32, kv_heads=8,
                      head_dim=128, num_splits=16, slabs=True, codes="fp8"),
    _attention_config("int8 slabs prefill q=512 Llama-8B bf16", "bf16", q_len=512, heads=32, kv_heads=8,
                      head_dim=128, slabs=True, codes="int8"),
    _attention_config("fp8 prefill q=512 Llama-8B fp16", "fp16", q_len=512, heads=32, kv_heads=8, head_dim=128,
                      codes="fp8"),
    _attention_config("fp8 decode Gemma2-2B bf16 window+softcap", "bf16", q_len=1, heads=8, kv_heads=4, head_dim=256,
                      window=4096, softcap=50.0, codes="fp8"),
    _attention_config("int8 decode gpt-oss-20b bf16 sinks+window", "bf16", q_len=1, heads=64, kv_heads=8,
                      head_dim=64, window=128, sinks=True, codes="int8"),
    _attention_config("int8 decode SmolLM2 fp32 (ieee dot)", "fp32", q_len=1, heads=9, kv_heads=3, head_dim=64,
                      codes="int8"),
    _attention_config("fp8 decode DeepSeek-V3 latent bf16 512+64", "bf16", q_len=1, heads=16, kv_heads=1,
                      head_dim=512, rope_dim=64, codes="fp8"),
    _attention_config("int8 slabs q=4 DeepSeek-V3 latent bf16 512+64 split=8", "bf16", q_len=4, heads=16,
                      kv_heads=1, head_dim=512, rope_dim=64, num_splits=8, slabs=True, codes="int8"),
    _attention_config("fp8 decode MiniCPM3 latent fp16 256+32 (40 heads: tiles of 10)", "fp16", q_len=1, heads=10,
                      kv_heads=1, head_dim=256, rope_dim=32, codes="fp8"),
    _attention_config("int8 decode Phi-3-mini bf16 D=96 split=8", "bf16", q_len=1, heads=32, kv_heads=32,
                      head_dim=96, num_splits=8, codes="int8"),
    _shared_prefix_config("int8 beams=8 Llama-8B bf16 split=8", "bf16", group_rows=8, q_len=1, heads=32,
                          kv_heads=8, head_dim=128, num_splits=8, codes="int8"),
    _shared_prefix_config("fp8 slabs n=8 Gemma2-2B bf16 window+softcap", "bf16", group_rows=8, q_len=1, heads=8,
                          kv_heads=4, head_dim=256, window=4096, softcap=50.0, slabs=True, codes="fp8"),
    _copy_blocks_config("int8 slabs Llama-8B", "i8", kv_heads=8, head_dim=130, slabs=True),
    _copy_blocks_config("fp8 DeepSeek-V3 latents (one pool of two)", "u8", kv_heads=1, head_dim=514, kinds=1),
)


def format_table(results: Iterable[CompileResult]) -> str:
    """A fixed-width table, one line per (kernel, config, arch)."""
    header = ("kernel", "config", "arch", "warps", "regs", "spill B", "stack B", "smem B", "16B ld/st",
              "matrix units (SASS)")
    rows = [header]
    for r in results:
        name = r.config.kernel.__name__
        if r.error:
            rows.append((name, r.config.label, r.arch, str(r.config.num_warps), "-", "-", "-", "-", "-",
                         f"COMPILE FAILED {r.error}"))
            continue
        rows.append((name, r.config.label, r.arch, str(r.config.num_warps), str(r.registers), str(r.spill_bytes),
                     str(r.stack_bytes), str(r.shared_bytes), r.wide_memory_ops, r.mma))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def failures(results: Iterable[CompileResult]) -> list[str]:
    """Why the check fails: compile errors, spills, and dot loops that did not reach the matrix units."""
    problems = []
    for r in results:
        where = f"{r.config.label} on {r.arch}"
        if r.error:
            problems.append(f"{where}: compile failed ({r.error})")
        elif r.spill_bytes:
            problems.append(f"{where}: {r.spill_bytes} bytes of register spills")
        elif r.config.mma_expected and r.mma == "none":
            problems.append(f"{where}: tl.dot did not lower to matrix instructions")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Compile every config for every arch, print the table, return 0 if nothing failed or spilled."""
    del argv
    if triton.knobs.runtime.interpret:
        print("TRITON_INTERPRET=1 is set: the kernels are interpreter functions and cannot be compiled; unset it",
              file=sys.stderr)
        return 2
    results = [compile_config(config, arch, cap) for config in CONFIGS for arch, cap in ARCHS]
    print(f"Triton {triton.__version__}: ahead-of-time compile for {', '.join(a for a, _ in ARCHS)} (no GPU used)")
    print(format_table(results))
    problems = failures(results)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    print(f"{len(results)} compiles, {len(problems)} problems")
    return 1 if problems else 0
