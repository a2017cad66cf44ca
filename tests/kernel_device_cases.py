"""The paged-attention kernel against its PyTorch reference over a grid sized for a GPU (the device check).

Not collected by a plain ``pytest`` run (like ``kernel_interpreter_cases.py``, whose inputs and reference it uses):
``scripts/gpu_check.sh`` runs it on CUDA. Every combination of dtype (fp16 / bf16 / fp32), GQA ratio (1 / 4 / 8)
and head dim (64 / 80 / 96 / 128) runs once, with block size 16 or 32 by turns; each combination also takes its turn, by its index, at
sliding windows, softcap, left padding, multi-token queries, split-KV on or off and, when both the kernel and the
reference accept ``sinks``, attention sinks, and a pool of three slabs read through offset tables, and 8-bit pools
(int8, float8_e4m3fn: `hf_paged.quant`). Lengths are odd and span many blocks. ``HF_PAGED_DEVICE_GRID=tiny``
keeps four small cases (two of them 8-bit), for the device check's dry run under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import inspect
import itertools
import os

import pytest
import torch
from kernel_interpreter_cases import (
    TOLERANCE,
    kernel_args,
    make_paged_inputs,
    on_slabs,
    quantized,
    reference_attention,
)

from hf_paged import ops, quant
from hf_paged.kernels.paged_attention import launch_paged_attention

TINY = os.environ.get("HF_PAGED_DEVICE_GRID") == "tiny"
HAS_SINKS = all("sinks" in inspect.signature(f).parameters for f in (launch_paged_attention, ops.paged_attention))

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
GROUPS = (1, 4, 8)
HEAD_DIMS = (64, 80, 96, 128)  # 80 and 96: Phi-2 and Phi-3-mini, padded to 128-wide tiles
BLOCK_SIZES = (16, 32)


def _cases() -> list[dict]:
    cases = []
    for index, (dtype, group, head_dim) in enumerate(itertools.product(DTYPES, GROUPS, HEAD_DIMS)):
        block_size = BLOCK_SIZES[(index // len(HEAD_DIMS)) % 2]  # each head dim meets both block sizes per dtype
        q_len = (1, 1, 5, 33)[index % 4]
        seq_lens = [q_len + 517, q_len + 37, q_len + 1000 - 7 * index][: 3 - index % 2]
        cases.append({
            "dtype": dtype, "group": group, "kv_heads": 2 if group < 8 else 1, "head_dim": head_dim,
            "block_size": block_size, "q_len": q_len, "seq_lens": seq_lens,
            "key_start": [3, 0, 11][: len(seq_lens)] if index % 3 == 1 else None,
            "window": (None, None, 100)[index % 3],
            "softcap": (None, None, 30.0, 5.0)[(index // 2) % 4],
            "num_splits": (1, 4, 1, 2, 8)[index % 5],
            "sinks": HAS_SINKS and index % 4 == 3,
            "slabs": 3 if index % 4 == 1 else 0,
            "codes": {4: torch.int8, 8: torch.float8_e4m3fn}.get(index % 9),
        })
    if TINY:
        cases = [{**case, "seq_lens": [length % 45 + case["q_len"] for length in case["seq_lens"]],
                  "q_len": min(case["q_len"], 5), "codes": (None, torch.int8, None, torch.float8_e4m3fn)[i]}
                 for i, case in enumerate(cases[:: len(cases) // 4][:4])]
    return cases


CASES = _cases()


def _case_id(case: dict) -> str:
    parts = [str(case["dtype"]).split(".")[-1], f"g{case['group']}x{case['kv_heads']}", f"D{case['head_dim']}",
             f"bs{case['block_size']}", f"q{case['q_len']}", f"splits{case['num_splits']}"]
    parts += ["leftpad"] if case["key_start"] else []
    parts += [f"window{case['window']}"] if case["window"] else []
    parts += [f"softcap{case['softcap']:g}"] if case["softcap"] else []
    parts += ["sinks"] if case["sinks"] else []
    parts += [f"slabs{case['slabs']}"] if case["slabs"] else []
    parts += [{torch.int8: "int8", torch.float8_e4m3fn: "fp8"}[case["codes"]]] if case["codes"] else []
    return "-".join(parts)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(case) for case in CASES])
def test_paged_attention_matches_reference_on_device(case):
    inputs = make_paged_inputs(group=case["group"], kv_heads=case["kv_heads"], head_dim=case["head_dim"],
                               block_size=case["block_size"], q_len=case["q_len"], seq_lens=case["seq_lens"],
                               key_start=case["key_start"], dtype=case["dtype"], seed=len(case["seq_lens"]))
    reference_inputs = inputs
    if case["codes"] is not None:  # 8-bit pools; the kernel multiplies their decoded values in the query's dtype
        inputs = quantized(inputs, case["codes"])
        reference_inputs = {**inputs, **{name: quant.decode(inputs[name]).to(case["dtype"])
                                         for name in ("key_cache", "value_cache")}}
    kwargs = {"scale": case["head_dim"] ** -0.5, "max_seq_len": max(case["seq_lens"]),
              "sliding_window": case["window"], "softcap": case["softcap"]}
    if case["sinks"]:
        heads = case["group"] * case["kv_heads"]
        kwargs["sinks"] = torch.randn(heads, generator=torch.Generator().manual_seed(heads)).to(inputs["query"].device)
    slabbed = on_slabs(inputs, case["slabs"]) if case["slabs"] else inputs  # kept alive while the kernel runs
    out = launch_paged_attention(**kernel_args(slabbed), **kwargs, num_splits=case["num_splits"])
    expected = reference_attention(reference_inputs, **kwargs)
    assert out.shape == (len(case["seq_lens"]), case["q_len"], case["group"] * case["kv_heads"], case["head_dim"])
    tolerance = TOLERANCE[case["dtype"]]
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)
