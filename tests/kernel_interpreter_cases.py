"""The Triton kernels against their PyTorch references, run by Triton's CPU interpreter (or on a GPU).

Not collected by a plain ``pytest`` run (the name does not start with ``test_``): Triton decides at decoration time
whether kernels are compiled or interpreted, so these cases need ``TRITON_INTERPRET=1`` before ``hf_paged.kernels``
is imported. ``tests/test_kernels.py`` runs this file in a subprocess with that variable set; to run it directly:

    TRITON_INTERPRET=1 python -m pytest tests/kernel_interpreter_cases.py   # CPU tensors, interpreter
    python -m pytest tests/kernel_interpreter_cases.py                      # CUDA tensors, compiled kernels

The cases are a covering subset of GQA ratio x head dim x block size x query length x left padding x dtype x
window x softcap x split-KV, with lengths that do not divide the block size. Shapes stay tiny: the interpreter runs
each program instance in Python.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported (tests/test_kernels.py sets it) or a GPU",
                allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from hf_paged import ops, quant  # noqa: E402
from hf_paged.kernels import (  # noqa: E402
    HAS_TRITON,
    copy_blocks,
    paged_attention,
    reshape_and_cache,
    shared_prefix_paged_attention,
)
from hf_paged.kernels._quant import float_to_fp8e4m3, fp8e4m3_as_float16  # noqa: E402
from hf_paged.kernels.paged_attention import choose_num_splits, launch_paged_attention  # noqa: E402
from hf_paged.kernels.shared_prefix_attention import launch_shared_prefix_attention  # noqa: E402

assert HAS_TRITON

TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def make_paged_inputs(
    *, group: int, kv_heads: int, head_dim: int, block_size: int, q_len: int, seq_lens: list[int],
    key_start: list[int] | None, dtype: torch.dtype, seed: int, value_dim: int | None = None,
) -> dict:
    """Random paged inputs on DEVICE; every slot a kernel must not read (outside ``[key_start, seq_len)``) is NaN.
    ``value_dim``: the values' head dim, when it differs from the keys' (multi-head latent attention)."""
    value_dim = head_dim if value_dim is None else value_dim
    gen = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    heads = group * kv_heads
    nb = max(triton_cdiv(n, block_size) for n in seq_lens) + 1  # one spare column: entries past the end are ignored
    num_blocks = batch * nb + 3
    physical = torch.randperm(num_blocks, generator=gen)[: batch * nb].view(batch, nb).to(torch.int32)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"))
    value_cache = torch.full((*shape[:3], value_dim), float("nan"))
    starts = key_start or [0] * batch
    for b, (length, start) in enumerate(zip(seq_lens, starts, strict=True)):
        for pos in range(start, length):
            block, offset = physical[b, pos // block_size], pos % block_size
            key_cache[block, offset] = torch.randn(kv_heads, head_dim, generator=gen)
            value_cache[block, offset] = torch.randn(kv_heads, value_dim, generator=gen)
    # Transformers passes the query as a transposed view of [B, q, H, D].
    query = torch.randn(batch, q_len, heads, head_dim, generator=gen).transpose(1, 2)
    inputs = {
        "query": query.to(dtype),
        "key_cache": key_cache.to(dtype),
        "value_cache": value_cache.to(dtype),
        "block_tables": physical,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "key_start": None if key_start is None else torch.tensor(key_start, dtype=torch.int32),
    }
    return {name: None if t is None else t.to(DEVICE) for name, t in inputs.items()}


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def readable(cache: torch.Tensor) -> torch.Tensor:
    """A pool's values in fp32 (an 8-bit pool decoded by `hf_paged.quant.decode`), unread NaN slots zeroed."""
    return quant.from_storage(cache).float().nan_to_num(0.0)


def reference_attention(inputs: dict, **kwargs) -> torch.Tensor:
    """`hf_paged.ops.paged_attention` in fp32 on the same stored values (unread NaN slots zeroed)."""
    return ops.paged_attention(
        inputs["query"].float(), readable(inputs["key_cache"]), readable(inputs["value_cache"]),
        inputs["block_tables"], inputs["seq_lens"], inputs["key_start"], **kwargs,
    )


# (group, kv_heads, head_dim, block_size, q_len, seq_lens, key_start, dtype, window, softcap, num_splits)
ATTENTION_CASES = [
    (1, 2, 64, 16, 1, [37, 5, 16], None, torch.float32, None, None, 1),
    (3, 1, 64, 16, 1, [37, 70, 9], [0, 11, 8], torch.float16, 8, None, 4),
    (8, 1, 128, 32, 1, [45, 33], [2, 0], torch.bfloat16, None, 30.0, 1),
    (3, 2, 128, 32, 5, [41, 5], [3, 1], torch.float32, 9, 5.0, 1),
    (1, 2, 128, 16, 7, [23, 30], None, torch.float16, None, None, 2),
    (8, 1, 64, 32, 3, [70, 3, 34], [0, 0, 33], torch.bfloat16, 6, None, 3),
    (3, 1, 64, 16, 4, [50, 19], None, torch.bfloat16, None, 2.0, 4),
    (8, 1, 64, 16, 1, [90, 17], [4, 16], torch.float32, 20, 10.0, 4),
    (1, 1, 64, 32, 9, [9, 40], [0, 7], torch.float32, None, None, 1),
    (2, 2, 80, 16, 2, [21, 50], [1, 0], torch.float16, None, None, 2),
    # several query tiles per row (prefill / chunked prefill shapes)
    (8, 1, 64, 16, 12, [40, 12], [0, 2], torch.float32, 5, None, 2),
    (1, 2, 64, 16, 70, [75, 70], [0, 3], torch.float16, None, None, 1),
    (3, 1, 128, 32, 30, [64, 31], None, torch.bfloat16, 16, None, 2),
]


def _case_id(case: tuple) -> str:
    group, kv_heads, head_dim, block_size, q_len, _, key_start, dtype, window, softcap, splits = case
    parts = [f"g{group}x{kv_heads}", f"D{head_dim}", f"bs{block_size}", f"q{q_len}", str(dtype).split(".")[-1]]
    parts += ["leftpad"] if key_start else []
    parts += [f"window{window}"] if window else []
    parts += [f"softcap{softcap:g}"] if softcap else []
    return "-".join([*parts, f"splits{splits}"])


@pytest.mark.parametrize(
    "group, kv_heads, head_dim, block_size, q_len, seq_lens, key_start, dtype, window, softcap, num_splits",
    ATTENTION_CASES, ids=[_case_id(case) for case in ATTENTION_CASES],
)
def test_paged_attention_matches_reference(
    group, kv_heads, head_dim, block_size, q_len, seq_lens, key_start, dtype, window, softcap, num_splits,
):
    inputs = make_paged_inputs(group=group, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                               q_len=q_len, seq_lens=seq_lens, key_start=key_start, dtype=dtype, seed=len(seq_lens))
    kwargs = {"scale": head_dim**-0.5, "max_seq_len": max(seq_lens), "sliding_window": window, "softcap": softcap}
    out = launch_paged_attention(**inputs, **kwargs, num_splits=num_splits)
    expected = reference_attention(inputs, **kwargs)
    assert out.shape == (len(seq_lens), q_len, group * kv_heads, head_dim)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


# (group, kv_heads, head_dim, block_size, q_len, seq_lens, key_start, dtype, window, chunk, sinks, num_splits)
FEATURE_CASES = [
    (2, 2, 64, 16, 1, [37, 5, 16], [0, 2, 3], torch.float32, None, None, True, 1),
    (3, 1, 64, 16, 1, [70, 37], [0, 11], torch.float16, None, None, True, 4),
    (8, 1, 64, 32, 5, [41, 9], [3, 1], torch.bfloat16, 9, None, True, 1),
    (2, 2, 64, 16, 1, [37, 50], [0, 5], torch.float32, None, 8, False, 1),
    (1, 2, 64, 16, 12, [40, 13], [0, 2], torch.float32, None, 8, True, 2),
    (3, 1, 128, 16, 7, [30, 61], [4, 0], torch.float16, None, 16, False, 2),
    (8, 1, 64, 32, 30, [64, 31], None, torch.bfloat16, 6, 10, True, 1),
    (2, 1, 64, 16, 1, [90, 17], [4, 16], torch.float32, None, 20, True, 4),
]


def _feature_id(case: tuple) -> str:
    group, kv_heads, head_dim, block_size, q_len, _, key_start, dtype, window, chunk, sinks, splits = case
    parts = [f"g{group}x{kv_heads}", f"D{head_dim}", f"bs{block_size}", f"q{q_len}", str(dtype).split(".")[-1]]
    parts += ["leftpad"] if key_start else []
    parts += [f"window{window}"] if window else []
    parts += [f"chunk{chunk}"] if chunk else []
    parts += ["sinks"] if sinks else []
    return "-".join([*parts, f"splits{splits}"])


@pytest.mark.parametrize(
    "group, kv_heads, head_dim, block_size, q_len, seq_lens, key_start, dtype, window, chunk, sinks, num_splits",
    FEATURE_CASES, ids=[_feature_id(case) for case in FEATURE_CASES],
)
def test_sinks_and_chunks_match_reference(
    group, kv_heads, head_dim, block_size, q_len, seq_lens, key_start, dtype, window, chunk, sinks, num_splits,
):
    inputs = make_paged_inputs(group=group, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                               q_len=q_len, seq_lens=seq_lens, key_start=key_start, dtype=dtype, seed=len(seq_lens))
    sink_logits = 2 * torch.randn(group * kv_heads, generator=torch.Generator().manual_seed(7)) if sinks else None
    kwargs = {"scale": head_dim**-0.5, "max_seq_len": max(seq_lens), "sliding_window": window, "chunk_size": chunk,
              "sinks": None if sink_logits is None else sink_logits.to(DEVICE)}
    out = launch_paged_attention(**inputs, **kwargs, num_splits=num_splits)
    expected = reference_attention(inputs, **kwargs)
    assert out.shape == (len(seq_lens), q_len, group * kv_heads, head_dim) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


# (group, kv_heads, head_dim, value_dim, block_size, q_len, seq_lens, key_start, dtype, num_splits)
NARROW_VALUE_CASES = [
    (4, 1, 48, 32, 16, 1, [37, 5], [0, 2], torch.float32, 1),
    (2, 2, 96, 64, 16, 1, [50, 21], None, torch.bfloat16, 4),
    (3, 1, 64, 24, 8, 5, [29, 9], [1, 0], torch.float16, 2),
    (1, 2, 32, 80, 16, 12, [40, 12], [0, 3], torch.float32, 1),  # values wider than keys
]


@pytest.mark.parametrize("group, kv_heads, head_dim, value_dim, block_size, q_len, seq_lens, key_start, dtype, "
                         "num_splits", NARROW_VALUE_CASES)
def test_paged_attention_with_values_of_another_width(
    group, kv_heads, head_dim, value_dim, block_size, q_len, seq_lens, key_start, dtype, num_splits,
):
    """Keys and values of different widths (MiMo-V2-Flash: keys 192 wide, values 128): the output has the values'."""
    inputs = make_paged_inputs(group=group, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                               q_len=q_len, seq_lens=seq_lens, key_start=key_start, dtype=dtype, seed=7,
                               value_dim=value_dim)
    kwargs = {"scale": head_dim**-0.5, "max_seq_len": max(seq_lens)}
    out = launch_paged_attention(**inputs, **kwargs, num_splits=num_splits)
    expected = reference_attention(inputs, **kwargs)
    assert out.shape == (len(seq_lens), q_len, group * kv_heads, value_dim)
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


# (heads, latent dim, rope dim, block_size, q_len, seq_lens, key_start, dtype, num_splits, slabs)
LATENT_CASES = [
    (4, 12, 8, 4, 1, [13, 5, 9], [0, 3, 1], torch.float32, 1, 0),  # the tiny test models' latents
    (4, 12, 8, 5, 6, [17, 6], [2, 0], torch.float32, 2, 0),  # several queries per row, split-KV
    (20, 48, 16, 16, 1, [37, 9], [0, 4], torch.bfloat16, 4, 0),  # 20 heads (GLM-4-MoE-Lite's): tiles of 10
    (32, 64, 16, 8, 3, [29, 40], None, torch.float16, 2, 0),  # 32 heads: tiles of 16
    (4, 48, 16, 8, 5, [29, 9], [1, 0], torch.float16, 1, 3),  # pools of 3 slabs: two offset tables
]


@pytest.mark.parametrize("heads, latent_dim, rope_dim, block_size, q_len, seq_lens, key_start, dtype, num_splits, "
                         "slabs", LATENT_CASES)
def test_latent_attention_matches_reference(heads, latent_dim, rope_dim, block_size, q_len, seq_lens, key_start,
                                            dtype, num_splits, slabs):
    """Latent mode (`hf_paged.latent`): keys ``[latents | rotary keys]`` read from the key and value pools, values
    the latents, one KV head for every query head."""
    inputs = make_paged_inputs(group=heads, kv_heads=1, head_dim=latent_dim, block_size=block_size, q_len=q_len,
                               seq_lens=seq_lens, key_start=key_start, dtype=dtype, seed=9, value_dim=rope_dim)
    query = torch.randn(len(seq_lens), q_len, heads, latent_dim + rope_dim, generator=torch.Generator().manual_seed(3))
    inputs["query"] = query.transpose(1, 2).to(dtype).to(DEVICE)
    kwargs = {"scale": (latent_dim + rope_dim) ** -0.5, "max_seq_len": max(seq_lens), "latent": True}
    caches = on_slabs(inputs, slabs) if slabs else inputs
    out = launch_paged_attention(**kernel_args(caches), **kwargs, num_splits=num_splits)
    expected = reference_attention(inputs, **kwargs)
    assert out.shape == (len(seq_lens), q_len, heads, latent_dim) and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_reshape_and_cache_with_values_of_another_shape():
    """DeepSeek-V3's latents: one 'key' head of kv_lora_rank and one 'value' head of qk_rope_head_dim; MiMo: keys
    wider than values."""
    gen = torch.Generator().manual_seed(5)
    num_blocks, block_size, tokens = 4, 8, 9
    for (k_heads, k_dim), (v_heads, v_dim) in (((1, 48), (1, 16)), ((2, 64), (2, 24))):
        key = torch.randn(tokens, k_heads, k_dim, generator=gen).to(DEVICE)
        value = torch.randn(tokens, v_heads, v_dim, generator=gen).to(DEVICE)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
        slots[3] = -1
        slots = slots.to(DEVICE)
        key_cache = torch.zeros(num_blocks, block_size, k_heads, k_dim, device=DEVICE)
        value_cache = torch.zeros(num_blocks, block_size, v_heads, v_dim, device=DEVICE)
        expected_k, expected_v = key_cache.clone(), value_cache.clone()
        reshape_and_cache(key, value, key_cache, value_cache, slots)
        ops.reshape_and_cache(key, value, expected_k, expected_v, slots)
        assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)


def test_copy_blocks_of_a_key_or_value_pool_alone():
    """A model whose keys and values differ in width has a key pool and a value pool ``[L, 1, N, bs, H, D]``."""
    gen = torch.Generator().manual_seed(6)
    storage = torch.randn(3, 1, 2, 7, 8, 40, generator=gen).to(DEVICE)  # head-major, as pool_tensor(kinds=1)
    pool = storage.permute(0, 1, 3, 4, 2, 5)
    expected = pool.clone()
    src = torch.tensor([0, 4], device=DEVICE)
    dst = torch.tensor([2, 6], device=DEVICE)
    copy_blocks(pool, src, dst)
    ops.copy_blocks(expected, src, dst)
    assert torch.equal(pool, expected)


def test_fully_masked_queries_are_zero():
    # Row 1 starts attending at key 6 but its first two queries sit at positions 4 and 5.
    inputs = make_paged_inputs(group=2, kv_heads=1, head_dim=64, block_size=16, q_len=3, seq_lens=[20, 7],
                               key_start=[0, 6], dtype=torch.float32, seed=0)
    kwargs = {"scale": 0.125, "max_seq_len": 20}
    for splits in (1, 2):
        out = launch_paged_attention(**inputs, **kwargs, num_splits=splits)
        assert torch.equal(out[1, :2], torch.zeros_like(out[1, :2]))
        torch.testing.assert_close(out, reference_attention(inputs, **kwargs), atol=2e-5, rtol=2e-5)


def test_calls_sharing_a_workspace_match_the_reference():
    """Calls that keep their split-KV scratch in one workspace (a step's layers) each give their own result, and
    the second call of the same sizes uses the first one's tensors; shared-prefix calls alike."""
    workspace: dict = {}
    kwargs = {"scale": 0.125, "max_seq_len": 40}
    for seed in (0, 1):
        inputs = make_paged_inputs(group=2, kv_heads=2, head_dim=32, block_size=16, q_len=1, seq_lens=[40, 23],
                                   key_start=[0, 3], dtype=torch.float32, seed=seed)
        out = launch_paged_attention(**inputs, **kwargs, num_splits=3, workspace=workspace)
        torch.testing.assert_close(out, reference_attention(inputs, **kwargs), atol=2e-5, rtol=2e-5)
        if seed == 0:
            kept = {key: [t.data_ptr() for t in tensors] for key, tensors in workspace.items()}
    assert len(workspace) == 1 and {key: [t.data_ptr() for t in tensors] for key, tensors in workspace.items()} == kept
    for seed in (2, 3):
        inputs = make_shared_prefix_inputs(group=2, kv_heads=1, head_dim=32, block_size=16, q_len=1, groups=1,
                                           prefix_blocks=2, tail_lens=[3, 9], key_start=[0, 2], dtype=torch.float32,
                                           seed=seed)
        kwargs = {"scale": 0.125, "max_seq_len": 41}
        out = shared_prefix_paged_attention(*inputs.values(), **kwargs, workspace=workspace)
        torch.testing.assert_close(out, reference_shared_prefix(inputs, **kwargs), atol=2e-5, rtol=2e-5)
    assert any(key[0] == "tail_lens" for key in workspace) and len(workspace) <= 3


def test_public_signature_is_a_drop_in_for_the_reference():
    inputs = make_paged_inputs(group=3, kv_heads=1, head_dim=64, block_size=16, q_len=1, seq_lens=[30, 12],
                               key_start=[0, 2], dtype=torch.float32, seed=1)
    # index tensors as strided views, as a caller slicing bigger buffers would pass them
    tables = torch.zeros(2, 2 * inputs["block_tables"].shape[1], dtype=torch.int32, device=DEVICE)
    tables[:, ::2] = inputs["block_tables"]
    lens = torch.stack([inputs["seq_lens"], inputs["key_start"]], dim=1)
    args = (inputs["query"], inputs["key_cache"], inputs["value_cache"], tables[:, ::2], lens[:, 0], lens[:, 1])
    out = paged_attention(*args, scale=0.125, max_seq_len=30)
    torch.testing.assert_close(out, reference_attention(inputs, scale=0.125, max_seq_len=30), atol=2e-5, rtol=2e-5)


def test_split_heuristic_splits_long_contexts_at_small_batch_only():
    cpu = torch.device("cpu")
    assert choose_num_splits(programs=3, max_seq_len=64, block_n=64, device=cpu) == 1
    assert choose_num_splits(programs=3, max_seq_len=4096, block_n=64, device=cpu) == 16
    assert choose_num_splits(programs=8, max_seq_len=1024, block_n=32, device=cpu) == 8
    assert choose_num_splits(programs=512, max_seq_len=32768, block_n=64, device=cpu) == 1


def test_split_heuristic_path_matches_reference():
    # Long enough that the heuristic picks split-KV for one row and one KV head.
    inputs = make_paged_inputs(group=3, kv_heads=1, head_dim=64, block_size=32, q_len=1, seq_lens=[520],
                               key_start=None, dtype=torch.float16, seed=2)
    kwargs = {"scale": 0.125, "max_seq_len": 520}
    assert choose_num_splits(programs=1, max_seq_len=520, block_n=64, device=torch.device("cpu")) == 2
    out = paged_attention(**inputs, **kwargs)
    torch.testing.assert_close(out.float(), reference_attention(inputs, **kwargs), atol=2e-3, rtol=2e-3)


# (kv_heads, head_dim, block_size, key dtype, cache dtype, slot dtype)
CACHE_CASES = [
    (1, 64, 16, torch.float32, torch.float32, torch.int64),
    (3, 64, 32, torch.float16, torch.float16, torch.int32),
    (8, 128, 16, torch.bfloat16, torch.bfloat16, torch.int64),
    (3, 128, 16, torch.float32, torch.float16, torch.int32),
    (2, 64, 16, torch.float32, torch.bfloat16, torch.int64),
]


@pytest.mark.parametrize("kv_heads, head_dim, block_size, key_dtype, cache_dtype, slot_dtype", CACHE_CASES)
def test_reshape_and_cache_matches_reference(kv_heads, head_dim, block_size, key_dtype, cache_dtype, slot_dtype):
    gen = torch.Generator().manual_seed(kv_heads)
    num_blocks, tokens = 5, 11
    # key and value are strided views into one fused projection, as in a model's qkv output
    fused = torch.randn(tokens, 3, kv_heads, head_dim, generator=gen).to(key_dtype)
    key, value = fused[:, 1], fused[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[2, 7]] = torch.tensor([-1, -3])  # skipped
    slots = torch.stack([slots, slots], dim=1)[:, 0]  # a strided view
    key, value, slots = key.to(DEVICE), value.to(DEVICE), slots.to(slot_dtype).to(DEVICE)
    initial = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(cache_dtype).to(DEVICE)
    expected_k, expected_v = initial[0].clone(), initial[1].clone()
    key_cache, value_cache = initial[0].clone(), initial[1].clone()
    reshape_and_cache(key, value, key_cache, value_cache, slots)
    ops.reshape_and_cache(key, value, expected_k, expected_v, slots)
    if key_dtype == cache_dtype:
        assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)
    else:
        # The interpreter narrows fp32 by truncation, a GPU (and torch) round to nearest: one ulp apart at most.
        ulp = torch.finfo(cache_dtype).eps
        torch.testing.assert_close(key_cache, expected_k, atol=0, rtol=ulp)
        torch.testing.assert_close(value_cache, expected_v, atol=0, rtol=ulp)


@pytest.mark.parametrize("dtype, index_dtype", [(torch.float16, torch.int32), (torch.bfloat16, torch.int64),
                                                (torch.float32, torch.int64)])
@pytest.mark.parametrize("head_major", [False, True], ids=["token-major", "head-major"])
def test_copy_blocks_matches_reference(dtype, index_dtype, head_major):
    gen = torch.Generator().manual_seed(3)
    # A pool whose N dim is a slice of a bigger one: outer strides are not those of a contiguous tensor. Head-major
    # is how a PagedCache stores its pool (hf_paged.storage.slab_tensor): a block is one run per head.
    backing = torch.randn(3, 2, 9, 16, 2, 64, generator=gen).to(dtype).to(DEVICE)
    if head_major:
        backing = backing.permute(0, 1, 4, 2, 3, 5).contiguous().permute(0, 1, 3, 4, 2, 5)
    pool = backing[:, :, 1:8]
    expected = pool.clone()
    outside = backing[:, :, [0, 8]].clone()
    src = torch.tensor([0, 3, 3], dtype=index_dtype, device=DEVICE)
    dst = torch.tensor([5, 1, 6], dtype=index_dtype, device=DEVICE)
    copy_blocks(pool, src, dst)
    ops.copy_blocks(expected, src, dst)
    assert torch.equal(pool, expected)
    assert torch.equal(backing[:, :, [0, 8]], outside)


@pytest.fixture
def default_device():
    """Make DEVICE the default for tensors the test creates."""
    with torch.device(DEVICE):
        yield


@pytest.mark.usefixtures("default_device")
def test_empty_launches_are_no_ops():
    pool = torch.randn(1, 2, 3, 16, 1, 64)
    before = pool.clone()
    copy_blocks(pool, torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))
    reshape_and_cache(torch.empty(0, 1, 64), torch.empty(0, 1, 64), pool[0, 0], pool[0, 1],
                      torch.empty(0, dtype=torch.int64))
    assert torch.equal(pool, before)


def _attention_args(**overrides):
    inputs = make_paged_inputs(group=2, kv_heads=2, head_dim=64, block_size=16, q_len=1, seq_lens=[20],
                               key_start=None, dtype=torch.float32, seed=4)
    kwargs = {"scale": 0.125, "max_seq_len": 20}
    for name, value in overrides.items():
        if isinstance(value, torch.Tensor) and value.device.type == "cpu":
            value = value.to(DEVICE)
        (inputs if name in inputs else kwargs)[name] = value
    return inputs, kwargs


@pytest.mark.parametrize("override, error, match", [
    ({"block_tables": torch.zeros(1, 3, dtype=torch.int64)}, TypeError, "block_tables must have dtype int32"),
    ({"seq_lens": torch.tensor([20.0])}, TypeError, "seq_lens must have dtype int32"),
    ({"query": torch.randn(1, 3, 1, 64)}, ValueError, "multiple of the cache's KV heads"),
    ({"query": torch.randn(1, 4, 1, 32)}, ValueError, "key_cache must be"),
    ({"block_tables": torch.zeros(2, 3, dtype=torch.int32)}, ValueError, r"block_tables must be \[B, nb\]"),
    ({"key_start": torch.zeros(2, dtype=torch.int32)}, ValueError, r"key_start must be \[B\]"),
    ({"max_seq_len": 1000}, ValueError, "exceeds what block_tables can address"),
    ({"sliding_window": 0}, ValueError, "sliding_window must be a positive"),
    ({"chunk_size": 0}, ValueError, "chunk_size must be a positive"),
    ({"sinks": torch.zeros(3)}, ValueError, r"sinks must be \[H\]"),
    ({"query": torch.randn(1, 4, 1, 64, dtype=torch.float64)}, TypeError, "query must have dtype"),
    ({"query": torch.randn(1, 4, 1, 64, device="meta")}, ValueError, "one device"),
])
def test_paged_attention_rejects_bad_inputs(override, error, match):
    inputs, kwargs = _attention_args(**override)
    with pytest.raises(error, match=match):
        paged_attention(**inputs, **kwargs)


@pytest.mark.usefixtures("default_device")
def test_copy_blocks_and_reshape_and_cache_reject_bad_inputs():
    pool = torch.zeros(1, 2, 4, 16, 2, 64)
    ids = torch.tensor([0])
    with pytest.raises(ValueError, match="last dim D must have stride 1"):
        copy_blocks(pool.transpose(4, 5), ids, ids)
    with pytest.raises(ValueError, match=r"kv_pool must be \[L, 2, N, bs, Hkv, D\]"):
        copy_blocks(pool[0], ids, ids)
    with pytest.raises(TypeError, match="src must have dtype"):
        copy_blocks(pool, ids.float(), ids)
    with pytest.raises(ValueError, match=r"dst must be \[C\] like src"):
        copy_blocks(pool, ids, torch.tensor([1, 2]))
    key = torch.zeros(3, 2, 64)
    with pytest.raises(ValueError, match=r"slot_mapping must be \[T\]"):
        reshape_and_cache(key, key, pool[0, 0], pool[0, 1], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"key must be \[T, Hkv, D\]"):
        reshape_and_cache(torch.zeros(3, 1, 64), key, pool[0, 0], pool[0, 1], torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="slot_mapping must have dtype"):
        reshape_and_cache(key, key, pool[0, 0], pool[0, 1], torch.tensor([0.0, 1.0, 2.0]))


def make_shared_prefix_inputs(
    *, group: int, kv_heads: int, head_dim: int, block_size: int, q_len: int, groups: int, prefix_blocks: int,
    tail_lens: list[int], key_start: list[int] | None, dtype: torch.dtype, seed: int,
) -> dict:
    """Random inputs of `shared_prefix_paged_attention` on DEVICE: ``groups`` groups of ``len(tail_lens) /
    groups`` rows share ``prefix_blocks`` blocks; row b holds ``prefix_blocks * block_size + tail_lens[b]`` tokens.
    Every slot no row may read (before a row's key_start, past its length) is NaN."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(tail_lens)
    rows = batch // groups
    prefix_len = prefix_blocks * block_size
    seq_lens = [prefix_len + n for n in tail_lens]
    starts = key_start or [0] * batch
    tail_width = max(triton_cdiv(n, block_size) for n in tail_lens) + 1
    num_blocks = groups * prefix_blocks + batch * tail_width + 3
    physical = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    prefix = physical[: groups * prefix_blocks].view(groups, prefix_blocks)
    tails = physical[groups * prefix_blocks: groups * prefix_blocks + batch * tail_width].view(batch, tail_width)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"))
    value_cache = torch.full(shape, float("nan"))

    def fill(block: int, offset: int) -> None:
        key_cache[block, offset] = torch.randn(kv_heads, head_dim, generator=gen)
        value_cache[block, offset] = torch.randn(kv_heads, head_dim, generator=gen)

    for g in range(groups):
        for pos in range(min(starts[g * rows:(g + 1) * rows]), prefix_len):
            fill(prefix[g, pos // block_size], pos % block_size)
    for b in range(batch):
        for pos in range(max(starts[b], prefix_len), seq_lens[b]):
            fill(tails[b, (pos - prefix_len) // block_size], (pos - prefix_len) % block_size)
    query = torch.randn(batch, q_len, group * kv_heads, head_dim, generator=gen).transpose(1, 2)
    inputs = {
        "query": query.to(dtype),
        "key_cache": key_cache.to(dtype),
        "value_cache": value_cache.to(dtype),
        "prefix_blocks": prefix,
        "tail_tables": tails,
        "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
        "key_start": None if key_start is None else torch.tensor(key_start, dtype=torch.int32),
    }
    return {name: None if t is None else t.to(DEVICE) for name, t in inputs.items()}


def reference_shared_prefix(inputs: dict, **kwargs) -> torch.Tensor:
    """`hf_paged.ops.shared_prefix_paged_attention` in fp32 on the same stored values (unread NaN slots zeroed)."""
    return ops.shared_prefix_paged_attention(
        inputs["query"].float(), readable(inputs["key_cache"]), readable(inputs["value_cache"]),
        inputs["prefix_blocks"], inputs["tail_tables"], inputs["seq_lens"], inputs["key_start"], **kwargs,
    )


# (group, kv_heads, head_dim, block_size, q_len, groups, prefix blocks, tail_lens, key_start, dtype, window,
#  softcap, num_splits (prefix, tail) or None for the heuristic)
SHARED_PREFIX_CASES = [
    (1, 2, 64, 16, 1, 1, 2, [3, 5, 1, 16], None, torch.float32, None, None, (1, 2)),
    # padding inside the prefix, different for the rows of a group (row 4 starts inside the prefix's last block)
    (3, 1, 64, 16, 1, 2, 3, [7, 2, 9, 1, 1, 20], [5, 5, 19, 0, 40, 2], torch.float16, None, None, (2, 2)),
    # 8 beams; the last row's padding covers the whole prefix
    (4, 2, 128, 32, 1, 1, 1, [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 33], torch.bfloat16, None, 30.0,
     (1, 4)),
    # q > 1; row 3's tail is shorter than q, so some of its queries sit inside the prefix (causal there too)
    (2, 2, 64, 16, 4, 2, 2, [4, 9, 6, 2], [3, 0, 0, 17], torch.float32, None, 5.0, (2, 3)),
    # a sliding window that cuts into the prefix (some queries see none of it), with softcap and q > 1
    (2, 2, 64, 16, 4, 2, 2, [4, 9, 6, 2], [3, 0, 0, 17], torch.float32, 9, 5.0, (2, 3)),
    # three groups of two rows
    (8, 1, 64, 32, 3, 3, 1, [5, 3, 3, 10, 4, 4], None, torch.bfloat16, 30, None, (1, 2)),
    (1, 1, 80, 16, 2, 1, 3, [2, 7, 2], [0, 1, 47], torch.float16, None, None, (4, 2)),
    # several packed-row tiles per group and several query tiles per tail (chunked prefill over a shared prompt)
    (3, 1, 64, 16, 12, 1, 2, [12, 20], [0, 9], torch.float32, 16, None, (1, 2)),
    (8, 1, 128, 16, 1, 1, 4, [1, 2, 3, 4, 5, 6, 7, 8], [1, 0, 0, 0, 0, 0, 0, 2], torch.float16, None, None, None),
]


def _shared_case_id(case: tuple) -> str:
    group, kv_heads, head_dim, block_size, q_len, groups, prefix, tails, key_start, dtype, window, softcap, splits = case
    parts = [f"g{group}x{kv_heads}", f"D{head_dim}", f"bs{block_size}", f"q{q_len}", f"{groups}x{len(tails) // groups}",
             f"F{prefix}", str(dtype).split(".")[-1]]
    parts += ["leftpad"] if key_start else []
    parts += [f"window{window}"] if window else []
    parts += [f"softcap{softcap:g}"] if softcap else []
    return "-".join([*parts, f"splits{splits[0]}+{splits[1]}" if splits else "auto"])


@pytest.mark.parametrize(
    "group, kv_heads, head_dim, block_size, q_len, groups, prefix_blocks, tail_lens, key_start, dtype, window, "
    "softcap, num_splits", SHARED_PREFIX_CASES, ids=[_shared_case_id(case) for case in SHARED_PREFIX_CASES],
)
def test_shared_prefix_attention_matches_reference(
    group, kv_heads, head_dim, block_size, q_len, groups, prefix_blocks, tail_lens, key_start, dtype, window,
    softcap, num_splits,
):
    inputs = make_shared_prefix_inputs(
        group=group, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, q_len=q_len, groups=groups,
        prefix_blocks=prefix_blocks, tail_lens=tail_lens, key_start=key_start, dtype=dtype, seed=len(tail_lens),
    )
    kwargs = {"scale": head_dim**-0.5, "max_seq_len": int(inputs["seq_lens"].max()), "sliding_window": window,
              "softcap": softcap}
    out = launch_shared_prefix_attention(**inputs, **kwargs, num_splits=num_splits)
    expected = reference_shared_prefix(inputs, **kwargs)
    assert out.shape == (len(tail_lens), q_len, group * kv_heads, head_dim)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    # The reference is plain paged attention over prefix + tail tables: the kernels agree with that one too.
    plain = launch_paged_attention(
        inputs["query"], inputs["key_cache"], inputs["value_cache"],
        torch.cat([inputs["prefix_blocks"].repeat_interleave(len(tail_lens) // groups, 0), inputs["tail_tables"]], 1),
        inputs["seq_lens"], inputs["key_start"], **kwargs,
    )
    torch.testing.assert_close(out.float(), plain.float(), atol=2 * TOLERANCE[dtype], rtol=2 * TOLERANCE[dtype])


def test_shared_prefix_public_signature_is_a_drop_in_for_the_reference():
    inputs = make_shared_prefix_inputs(group=2, kv_heads=1, head_dim=64, block_size=16, q_len=1, groups=1,
                                       prefix_blocks=2, tail_lens=[3, 4], key_start=[0, 2], dtype=torch.float32,
                                       seed=5)
    out = shared_prefix_paged_attention(*inputs.values(), scale=0.125, max_seq_len=36)
    torch.testing.assert_close(out, reference_shared_prefix(inputs, scale=0.125, max_seq_len=36), atol=2e-5,
                               rtol=2e-5)


@pytest.mark.parametrize("override, error, match", [
    ({"prefix_blocks": torch.zeros(1, 2, dtype=torch.int64)}, TypeError, "prefix_blocks must have dtype int32"),
    ({"prefix_blocks": torch.zeros(3, 2, dtype=torch.int32)}, ValueError, "must divide the 4 rows"),
    ({"tail_tables": torch.zeros(3, 2, dtype=torch.int32)}, ValueError, r"tail_tables must be \[B, nt\]"),
    ({"max_seq_len": 1000}, ValueError, "exceeds what prefix_blocks and tail_tables can address"),
    ({"num_splits": (1, 1)}, ValueError, r"num_splits must be \(prefix >= 1, tail >= 2\)"),
    ({"sliding_window": 0}, ValueError, "sliding_window must be a positive"),
])
def test_shared_prefix_attention_rejects_bad_inputs(override, error, match):
    inputs = make_shared_prefix_inputs(group=2, kv_heads=1, head_dim=64, block_size=16, q_len=1, groups=2,
                                       prefix_blocks=1, tail_lens=[3, 4, 1, 2], key_start=None, dtype=torch.float32,
                                       seed=6)
    kwargs = {"scale": 0.125, "max_seq_len": 20}
    for name, value in override.items():
        (inputs if name in inputs else kwargs)[name] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    with pytest.raises(error, match=match):
        launch_shared_prefix_attention(**inputs, **kwargs)


# ---- Pools of several slabs addressed through per-block offset tables (CONTRACT.md section 3) ----------------------


def split_into_slabs(pool: torch.Tensor, sizes: list[int]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Copy a logical pool ``[L, K, N, bs, H, D]`` into ``len(sizes)`` separate block-major tensors (memory
    ``[n_k, L, K, bs, H, D]``, as a Triton `KVPool` lays out its slabs), the k-th holding the next ``sizes[k]``
    blocks. Returns the slabs, the logical view ``[L, K, n, bs, H, D]`` of the lowest-addressed one (the base), and
    the int64 ``[N]`` table of each block's element offset relative to the base's data pointer (>= 0).

    The slabs are allocated last to first with spacers between them, so the base is not simply the first slab and
    the slabs are not adjacent in memory."""
    shape = pool.shape[:2] + pool.shape[3:]
    slabs: list[torch.Tensor | None] = [None] * len(sizes)
    spacers = []
    for k in reversed(range(len(sizes))):
        slabs[k] = torch.empty(sizes[k], *shape, dtype=pool.dtype, device=pool.device)
        spacers.append(torch.empty(4099, dtype=pool.dtype, device=pool.device))
    first = 0
    for slab, n in zip(slabs, sizes, strict=True):
        slab.copy_(pool[:, :, first:first + n].permute(2, 0, 1, 3, 4, 5))
        first += n
    assert first == pool.shape[2]
    base = min(slabs, key=lambda t: t.data_ptr())
    offsets = [(slab.data_ptr() - base.data_ptr()) // pool.element_size() + i * slab.stride(0)
               for slab, n in zip(slabs, sizes, strict=True) for i in range(n)]
    return slabs, base.permute(1, 2, 0, 3, 4, 5), torch.tensor(offsets, dtype=torch.int64, device=pool.device)


def gather_slabs(slabs: list[torch.Tensor]) -> torch.Tensor:
    """The slabs' blocks as one logical pool ``[L, K, N, bs, H, D]`` (the equivalent single tensor)."""
    return torch.cat([slab.permute(1, 2, 0, 3, 4, 5) for slab in slabs], dim=2)


def slab_sizes(num_blocks: int, count: int) -> list[int]:
    """`count` slab sizes summing to `num_blocks`, unequal (the last gets the remainder)."""
    head = [max(1, num_blocks * (k + 1) // (2 * count + 1)) for k in range(count - 1)]
    return [*head, num_blocks - sum(head)]


def on_slabs(inputs: dict, count: int, separate_values: bool = False) -> dict:
    """`inputs` of an attention case with the key and value caches moved to `count` slabs of a 2-layer pool, read
    as layer 1 (layer 0 is NaN: reading the wrong layer shows). K and V share slabs (one table) unless
    `separate_values` or their widths differ: then keys and values are pools of their own with different slab
    sizes, so two tables."""
    key_cache, value_cache = inputs["key_cache"], inputs["value_cache"]
    num_blocks = key_cache.shape[0]

    def layered(*caches: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(caches)  # [K, N, bs, H, D]
        if quant.is_quantized(stacked.dtype):  # 8-bit: every byte 0xFF (NaN magnitudes, NaN float8 codes)
            return torch.stack([torch.full_like(stacked.view(torch.uint8), 0xFF).view(stacked.dtype), stacked])
        return torch.stack([torch.full_like(stacked, float("nan")), stacked])

    out = dict(inputs)
    if not separate_values and key_cache.shape == value_cache.shape:
        slabs, base, offsets = split_into_slabs(layered(key_cache, value_cache), slab_sizes(num_blocks, count))
        out.update(key_cache=base[1, 0], value_cache=base[1, 1], key_offsets=offsets, _slabs=slabs)
    else:
        key_slabs, key_base, key_offsets = split_into_slabs(layered(key_cache), slab_sizes(num_blocks, count))
        value_slabs, value_base, value_offsets = split_into_slabs(layered(value_cache),
                                                                  slab_sizes(num_blocks, count + 1)[::-1])
        out.update(key_cache=key_base[1, 0], value_cache=value_base[1, 0], key_offsets=key_offsets,
                   value_offsets=value_offsets)
        out["_slabs"] = key_slabs + value_slabs
    return out


def kernel_args(inputs: dict) -> dict:
    """The launcher's arguments of `on_slabs` inputs, without the slabs: keep the `on_slabs` dict alive while the
    kernel runs (the base view holds only the base slab; the others are reached through the table alone)."""
    return {name: value for name, value in inputs.items() if not name.startswith("_")}


# (case of ATTENTION_CASES / FEATURE_CASES by index, slabs, separate value slabs): decode and multi-token queries,
# GQA, sliding window, softcap, left padding, split-KV; sinks and chunks from FEATURE_CASES.
SLAB_ATTENTION_CASES = [(0, 2, False), (1, 3, False), (3, 2, True), (5, 3, False), (11, 2, False), (12, 3, True)]
SLAB_FEATURE_CASES = [(1, 3, False), (4, 2, False)]


@pytest.mark.parametrize("index, count, separate_values", SLAB_ATTENTION_CASES,
                         ids=[f"{_case_id(ATTENTION_CASES[i])}-slabs{c}{'-separateV' if s else ''}"
                              for i, c, s in SLAB_ATTENTION_CASES])
def test_paged_attention_over_slabs_matches_reference(index, count, separate_values):
    group, kv_heads, head_dim, block_size, q_len, seq_lens, key_start, dtype, window, softcap, num_splits = (
        ATTENTION_CASES[index])
    inputs = make_paged_inputs(group=group, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                               q_len=q_len, seq_lens=seq_lens, key_start=key_start, dtype=dtype, seed=len(seq_lens))
    kwargs = {"scale": head_dim**-0.5, "max_seq_len": max(seq_lens), "sliding_window": window, "softcap": softcap}
    slabbed = on_slabs(inputs, count, separate_values)
    out = launch_paged_attention(**kernel_args(slabbed), **kwargs, num_splits=num_splits)
    torch.testing.assert_close(out.float(), reference_attention(inputs, **kwargs), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("index, count, separate_values", SLAB_FEATURE_CASES,
                         ids=[f"{_feature_id(FEATURE_CASES[i])}-slabs{c}" for i, c, _ in SLAB_FEATURE_CASES])
def test_sinks_and_chunks_over_slabs_match_reference(index, count, separate_values):
    group, kv_heads, head_dim, block_size, q_len, seq_lens, key_start, dtype, window, chunk, sinks, num_splits = (
        FEATURE_CASES[index])
    inputs = make_paged_inputs(group=group, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                               q_len=q_len, seq_lens=seq_lens, key_start=key_start, dtype=dtype, seed=len(seq_lens))
    sink_logits = 2 * torch.randn(group * kv_heads, generator=torch.Generator().manual_seed(7)) if sinks else None
    kwargs = {"scale": head_dim**-0.5, "max_seq_len": max(seq_lens), "sliding_window": window, "chunk_size": chunk,
              "sinks": None if sink_logits is None else sink_logits.to(DEVICE)}
    slabbed = on_slabs(inputs, count, separate_values)  # kept: the kernel reads slabs only the table names
    out = paged_attention(**kernel_args(slabbed), **kwargs)
    torch.testing.assert_close(out.float(), reference_attention(inputs, **kwargs), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])


def test_paged_attention_over_slabs_with_values_of_another_width():
    """Keys and values of different widths live in pools of their own: two offset tables."""
    inputs = make_paged_inputs(group=3, kv_heads=1, head_dim=64, block_size=8, q_len=5, seq_lens=[29, 9],
                               key_start=[1, 0], dtype=torch.float16, seed=7, value_dim=24)
    kwargs = {"scale": 0.125, "max_seq_len": 29}
    slabbed = on_slabs(inputs, 3)
    assert not torch.equal(slabbed["key_offsets"], slabbed["value_offsets"])
    out = launch_paged_attention(**kernel_args(slabbed), **kwargs, num_splits=2)
    torch.testing.assert_close(out.float(), reference_attention(inputs, **kwargs), atol=2e-3, rtol=2e-3)


# indices into SHARED_PREFIX_CASES: left padding inside the prefix, 8 beams with softcap, q > 1 with a window
SLAB_SHARED_PREFIX_CASES = [(1, 3), (2, 2), (4, 3)]


@pytest.mark.parametrize("index, count", SLAB_SHARED_PREFIX_CASES,
                         ids=[f"{_shared_case_id(SHARED_PREFIX_CASES[i])}-slabs{c}" for i, c in SLAB_SHARED_PREFIX_CASES])
def test_shared_prefix_attention_over_slabs_matches_reference(index, count):
    (group, kv_heads, head_dim, block_size, q_len, groups, prefix_blocks, tail_lens, key_start, dtype, window,
     softcap, num_splits) = SHARED_PREFIX_CASES[index]
    inputs = make_shared_prefix_inputs(
        group=group, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, q_len=q_len, groups=groups,
        prefix_blocks=prefix_blocks, tail_lens=tail_lens, key_start=key_start, dtype=dtype, seed=len(tail_lens),
    )
    kwargs = {"scale": head_dim**-0.5, "max_seq_len": int(inputs["seq_lens"].max()), "sliding_window": window,
              "softcap": softcap}
    slabbed = on_slabs(inputs, count, separate_values=index == 4)
    out = launch_shared_prefix_attention(**kernel_args(slabbed), **kwargs, num_splits=num_splits)
    torch.testing.assert_close(out.float(), reference_shared_prefix(inputs, **kwargs), atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype, index_dtype, count", [(torch.float16, torch.int32, 3), (torch.float32, torch.int64, 2)])
def test_reshape_and_cache_over_slabs_matches_reference(dtype, index_dtype, count):
    gen = torch.Generator().manual_seed(8)
    layers, num_blocks, block_size, kv_heads, head_dim, tokens = 2, 7, 4, 2, 32, 13
    pool = torch.randn(layers, 2, num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    fused = torch.randn(tokens, 3, kv_heads, head_dim, generator=gen).to(DEVICE)
    key, value = fused[:, 1], fused[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[2, 9]] = torch.tensor([-1, -5])  # skipped
    slots = slots.to(index_dtype).to(DEVICE)
    slabs, base, offsets = split_into_slabs(pool, slab_sizes(num_blocks, count))
    reshape_and_cache(key, value, base[1, 0], base[1, 1], slots, block_offsets=offsets)
    expected = pool.clone()
    ops.reshape_and_cache(key, value, expected[1, 0], expected[1, 1], slots)
    got = gather_slabs(slabs)
    if dtype == torch.float32:
        assert torch.equal(got, expected)
    else:  # the interpreter narrows fp32 by truncation, torch rounds to nearest: one ulp apart at most
        torch.testing.assert_close(got, expected, atol=0, rtol=torch.finfo(dtype).eps)
        assert torch.equal(got[0], expected[0])  # layer 0 untouched


def test_reshape_and_cache_over_separate_key_and_value_slabs():
    """Values of another shape (DeepSeek-V3 latents) in a pool of their own: a value table beside the keys'."""
    gen = torch.Generator().manual_seed(9)
    num_blocks, block_size, tokens = 6, 8, 11
    keys = torch.randn(1, 1, num_blocks, block_size, 1, 48, generator=gen).to(DEVICE)
    values = torch.randn(1, 1, num_blocks, block_size, 1, 16, generator=gen).to(DEVICE)
    key, value = torch.randn(tokens, 1, 48, generator=gen).to(DEVICE), torch.randn(tokens, 1, 16, generator=gen).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[4] = -1
    slots = slots.to(DEVICE)
    key_slabs, key_base, key_offsets = split_into_slabs(keys, [2, 4])
    value_slabs, value_base, value_offsets = split_into_slabs(values, [3, 1, 2])
    reshape_and_cache(key, value, key_base[0, 0], value_base[0, 0], slots, block_offsets=key_offsets,
                      value_offsets=value_offsets)
    ops.reshape_and_cache(key, value, keys[0, 0], values[0, 0], slots)
    assert torch.equal(gather_slabs(key_slabs), keys) and torch.equal(gather_slabs(value_slabs), values)


@pytest.mark.parametrize("kinds, count", [(2, 3), (1, 2)])
def test_copy_blocks_across_slabs_matches_reference(kinds, count):
    gen = torch.Generator().manual_seed(10)
    pool = torch.randn(3, kinds, 9, 4, 2, 32, generator=gen).to(torch.bfloat16).to(DEVICE)
    slabs, base, offsets = split_into_slabs(pool, slab_sizes(9, count))
    src = torch.tensor([0, 8, 3, 3], device=DEVICE)  # first and last slab, and one block copied twice
    dst = torch.tensor([7, 1, 4, 6], device=DEVICE)
    copy_blocks(base, src, dst, block_offsets=offsets)
    expected = pool.clone()
    ops.copy_blocks(expected, src, dst)
    assert torch.equal(gather_slabs(slabs), expected)


@pytest.mark.usefixtures("default_device")
def test_offset_tables_are_checked():
    inputs, kwargs = _attention_args()
    num_blocks = inputs["key_cache"].shape[0]
    good = torch.arange(num_blocks) * inputs["key_cache"].stride(0)
    for bad, error, match in (
        (good.int(), TypeError, "key_offsets must have dtype int64"),
        (good.view(1, -1), ValueError, r"key_offsets must be \[N\]"),
        (good[:0], ValueError, r"key_offsets must be \[N\]"),
        (good.to("meta"), ValueError, "key_offsets must be on key_cache's device"),
        (good.tolist(), TypeError, "key_offsets must be a torch.Tensor"),
        (good + 8, ValueError, "key_offsets must hold multiples of 16 elements"),
    ):
        with pytest.raises(error, match=match):
            paged_attention(**inputs, **kwargs, key_offsets=bad)
    with pytest.raises(TypeError, match="value_offsets must have dtype int64"):
        paged_attention(**inputs, **kwargs, key_offsets=good, value_offsets=good.float())
    # the table written out (block b at b * stride(0)) gives what no table gives, for keys and values alike
    plain = paged_attention(**inputs, **kwargs)
    torch.testing.assert_close(paged_attention(**inputs, **kwargs, key_offsets=good), plain)
    torch.testing.assert_close(paged_attention(**inputs, **kwargs, value_offsets=good), plain)
    pool = torch.zeros(1, 2, 4, 16, 2, 64)
    with pytest.raises(TypeError, match="block_offsets must have dtype int64"):
        copy_blocks(pool, torch.tensor([0]), torch.tensor([1]), block_offsets=torch.arange(4.0))
    key = torch.zeros(3, 2, 64)
    with pytest.raises(ValueError, match=r"block_offsets must be \[N\]"):
        reshape_and_cache(key, key, pool[0, 0], pool[0, 1], torch.tensor([0, 1, 2]),
                          block_offsets=torch.zeros(2, 2, dtype=torch.int64))


def test_backend_dispatch_passes_slabs_through(monkeypatch):
    """`hf_paged.backend` hands the kernels a store's ``base`` and ``block_offsets`` (CONTRACT.md section 2: what
    a multi-slab `LayerStore` exposes) or explicit offset keywords, for attention, writes and copies."""
    from types import SimpleNamespace

    from hf_paged import backend

    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    inputs = make_paged_inputs(group=2, kv_heads=2, head_dim=64, block_size=16, q_len=2, seq_lens=[37, 20],
                               key_start=[0, 3], dtype=torch.float32, seed=11)
    kwargs = {"scale": 0.125, "max_seq_len": 37}
    slabbed = on_slabs(inputs, 3)
    stores = [SimpleNamespace(base=slabbed[name], block_offsets=slabbed["key_offsets"])
              for name in ("key_cache", "value_cache")]
    expected = reference_attention(inputs, **kwargs)
    out = backend.paged_attention(inputs["query"], *stores, inputs["block_tables"], inputs["seq_lens"],
                                  inputs["key_start"], **kwargs)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
    out = backend.paged_attention(inputs["query"], slabbed["key_cache"], slabbed["value_cache"],
                                  inputs["block_tables"], inputs["seq_lens"], inputs["key_start"],
                                  key_offsets=slabbed["key_offsets"], **kwargs)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)

    gen = torch.Generator().manual_seed(12)
    pool = torch.randn(2, 2, 5, 4, 2, 32, generator=gen).to(DEVICE)
    slabs, base, offsets = split_into_slabs(pool, [2, 3])
    key, value = torch.randn(2, 6, 2, 32, generator=gen).to(DEVICE)
    slots = torch.tensor([0, 19, -1, 7, 12, 5], device=DEVICE)
    key_store, value_store = (SimpleNamespace(base=base[1, k], block_offsets=offsets) for k in (0, 1))
    backend.reshape_and_cache(key, value, key_store, value_store, slots)
    backend.copy_blocks(base, torch.tensor([4], device=DEVICE), torch.tensor([1], device=DEVICE),
                        block_offsets=offsets)
    ops.reshape_and_cache(key, value, pool[1, 0], pool[1, 1], slots)
    ops.copy_blocks(pool, torch.tensor([4]), torch.tensor([1]))
    assert torch.equal(gather_slabs(slabs), pool)
    with pytest.raises(TypeError, match="layer store with .base and .block_offsets"):
        backend.paged_attention(inputs["query"], object(), object(), inputs["block_tables"], inputs["seq_lens"],
                                **kwargs)


# ---- 8-bit pools (hf_paged.quant): each (token, head) row is D codes and a float16 magnitude -------------------------

CODE_DTYPES = [torch.int8, torch.float8_e4m3fn]
CODE_IDS = ["int8", "fp8"]


def quantized(inputs: dict, dtype: torch.dtype, query_dtype: torch.dtype | None = None) -> dict:
    """`inputs` with their key and value caches stored as 8-bit pools of `dtype` (`hf_paged.quant.encode`), every
    byte of an unread (NaN) slot 0xFF (a NaN magnitude, NaN float8 codes): a kernel reading one shows. The query in
    `query_dtype` if given."""
    out = dict(inputs)
    for name in ("key_cache", "value_cache"):
        cache = inputs[name].float()
        stored = quant.encode(cache.nan_to_num(0.0), dtype)
        stored.view(torch.uint8).masked_fill_(cache.isnan().any(-1, keepdim=True), 0xFF)
        out[name] = stored
    if query_dtype is not None:
        out["query"] = inputs["query"].to(query_dtype)
    return out


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of `tensor` (float8 tensors have no torch.equal on the CPU)."""
    return tensor.view(torch.uint8)


@triton.jit
def _fp8_encode_kernel(x_ptr, codes_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(codes_ptr + i, float_to_fp8e4m3(tl.load(x_ptr + i, mask=i < n, other=0.0)), mask=i < n)


@triton.jit
def _fp8_decode_kernel(codes_ptr, values_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(values_ptr + i, fp8e4m3_as_float16(tl.load(codes_ptr + i)).to(tl.float32) * 256.0)


def test_float8_conversions_are_pytorchs_bit_for_bit():
    """The kernels' integer float8_e4m3fn conversions (`hf_paged.kernels._quant`, used on every target: Triton cannot
    convert float8e4nv on sm_80) against PyTorch's cast. Decoded: all 256 codes, -0.0 included (the two NaN codes,
    which no write produces, read as finite values, as in `hf_paged.quant.decode`).
    Encoded: every float8 value, every midpoint between two neighbours (ties to even), one float32 ulp either side
    of each of those, subnormals, values beyond 448 (saturated to 448), infinities, NaNs and a random sweep over 42
    binades, with both signs."""
    codes = torch.arange(256, dtype=torch.uint8, device=DEVICE)
    exact = codes.view(torch.float8_e4m3fn).float()
    values = torch.empty(256, device=DEVICE)
    _fp8_decode_kernel[(1,)](codes, values, N=256)
    nan = exact.isnan()
    assert int(nan.sum()) == 2 and bool(values[nan].isfinite().all())
    assert torch.equal(values[~nan].view(torch.int32), exact[~nan].view(torch.int32))

    ordered = exact[~nan].double().unique()
    special = torch.tensor([449.0, 463.99, 464.0, 464.01, 479.0, 480.0, 500.0, 1e6, 3e38, float("inf"), 2.0**-10,
                            2.0**-6 * (1 - 2.0**-5), 1e-30, 1e-40], dtype=torch.float64)
    x = torch.cat([ordered, (ordered[1:] + ordered[:-1]) / 2, special]).float()
    x = torch.cat([x, -x])
    x = torch.cat([x, torch.nextafter(x, torch.full_like(x, float("inf"))),
                   torch.nextafter(x, torch.full_like(x, float("-inf")))])
    gen = torch.Generator().manual_seed(12)
    sweep = torch.randn(1 << 14, generator=gen) * torch.exp2(torch.randint(-30, 12, (1 << 14,), generator=gen).float())
    x = torch.cat([x, sweep, torch.tensor([float("nan"), -float("nan")])]).to(DEVICE)
    got = torch.empty(x.shape, dtype=torch.uint8, device=DEVICE)
    _fp8_encode_kernel[(triton_cdiv(x.numel(), 1024),)](x, got, x.numel(), BLOCK=1024)
    expected = bits(x.to(torch.float8_e4m3fn))
    wrong = (got != expected).nonzero().flatten()[:8]
    assert wrong.numel() == 0, (x[wrong].tolist(), got[wrong].tolist(), expected[wrong].tolist())


def edge_rows(states: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`states` ``[T, H, D]`` (T >= 4, D >= 16) with rows on the edges of the 8-bit format in head 0: all zeros (the
    smallest magnitude), beyond float16's range (magnitude 65504, codes clamped), below ``2**-24`` (magnitude
    clamped up), and a row of magnitude qmax (scale 1) whose values lie halfway between two codes (ties)."""
    states = states.clone()
    states[0, 0] = 0.0
    states[1, 0] *= 1e6
    states[2, 0] *= 1e-9
    if dtype == torch.int8:
        ties = [127.0, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 126.5, -126.5]
    else:  # midpoints of neighbouring float8 values: the subnormal step 2**-9, 1 and 1.125, 240 and 256, 416 and 448
        ties = [448.0, 2.0**-10, -3 * 2.0**-10, 1.0625, -1.1875, 248.0, -432.0]
    states[3, 0, :len(ties)] = torch.tensor(ties)
    return states


# (key heads, key dim, value heads, value dim, block size, states dtype)
WRITE_CASES = [
    (2, 16, 2, 16, 4, torch.float32),
    (3, 64, 3, 64, 16, torch.bfloat16),
    (1, 48, 1, 16, 8, torch.float16),  # MLA latents: keys and values of other widths
]


@pytest.mark.parametrize("dtype", CODE_DTYPES, ids=CODE_IDS)
@pytest.mark.parametrize("k_heads, k_dim, v_heads, v_dim, block_size, states_dtype", WRITE_CASES,
                         ids=[f"k{c[0]}x{c[1]}-v{c[2]}x{c[3]}-bs{c[4]}-{str(c[5]).split('.')[-1]}" for c in WRITE_CASES])
@pytest.mark.parametrize("slabs", [0, 3], ids=["one-tensor", "slabs3"])
def test_reshape_and_cache_into_8bit_pools_is_bit_exact(dtype, k_heads, k_dim, v_heads, v_dim, block_size,
                                                        states_dtype, slabs):
    """Triton's write encodes exactly as `hf_paged.ops.reshape_and_cache` (`hf_paged.quant.encode`): equal bytes,
    codes and magnitudes, in one pool tensor or in block-major slabs through offset tables; skipped slots and the
    other layer keep their bytes."""
    gen = torch.Generator().manual_seed(k_dim + slabs)
    num_blocks, tokens = 6, 13
    fused = torch.randn(tokens, 2, max(k_heads, v_heads), max(k_dim, v_dim), generator=gen) * 3
    key = edge_rows(fused[:, 0, :k_heads, :k_dim], dtype).to(states_dtype)
    value = edge_rows(fused[:, 1, :v_heads, :v_dim] / 7, dtype).to(states_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[5, 9]] = torch.tensor([-1, -4])  # skipped
    key, value, slots = key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE)
    # Every byte random to begin with: what the write leaves alone must stay as it was.
    pools = [torch.randint(0, 256, (2, 1, num_blocks, block_size, heads, quant.stored_width(dim)), generator=gen,
                           dtype=torch.uint8).view(dtype).to(DEVICE) for heads, dim in ((k_heads, k_dim), (v_heads, v_dim))]
    expected = [pool.clone() for pool in pools]
    ops.reshape_and_cache(key, value, expected[0][1, 0], expected[1][1, 0], slots)
    assert not torch.equal(bits(expected[0]), bits(pools[0]))  # the reference wrote
    if slabs:
        key_slabs, key_base, key_offsets = split_into_slabs(pools[0], slab_sizes(num_blocks, slabs))
        value_slabs, value_base, value_offsets = split_into_slabs(pools[1], slab_sizes(num_blocks, slabs + 1))
        reshape_and_cache(key, value, key_base[1, 0], value_base[1, 0], slots, block_offsets=key_offsets,
                          value_offsets=value_offsets)
        pools = [gather_slabs(key_slabs), gather_slabs(value_slabs)]
    else:
        reshape_and_cache(key, value, pools[0][1, 0], pools[1][1, 0], slots)
    assert torch.equal(bits(pools[0]), bits(expected[0])) and torch.equal(bits(pools[1]), bits(expected[1]))


@pytest.mark.parametrize("dtype", CODE_DTYPES, ids=CODE_IDS)
@pytest.mark.parametrize("slabs", [0, 2], ids=["head-major", "slabs2"])
def test_copy_blocks_copies_8bit_codes_and_magnitudes(dtype, slabs):
    """Copy-on-write of an 8-bit pool: the magnitudes live inside the block, so a block copy carries them. The
    copied blocks decode to their sources' values."""
    gen = torch.Generator().manual_seed(13)
    states = torch.randn(3, 2, 7, 4, 2, 24, generator=gen) * torch.rand(3, 2, 7, 4, 2, 1, generator=gen) * 10
    pool = quant.encode(states, dtype).to(DEVICE)  # [L, 2, N, bs, H, 26]
    src = torch.tensor([0, 6, 3], device=DEVICE)
    dst = torch.tensor([5, 1, 2], device=DEVICE)
    expected = bits(pool).clone()
    expected[:, :, dst] = expected[:, :, src]
    if slabs:
        slab_list, base, offsets = split_into_slabs(pool, slab_sizes(7, slabs))
        copy_blocks(base, src, dst, block_offsets=offsets)
        pool = gather_slabs(slab_list)
    else:
        head_major = bits(pool).permute(0, 1, 4, 2, 3, 5).contiguous().permute(0, 1, 3, 4, 2, 5).view(dtype)
        copy_blocks(head_major, src, dst)
        pool = head_major
    assert torch.equal(bits(pool), expected)
    torch.testing.assert_close(quant.decode(pool[:, :, dst]), quant.decode(pool[:, :, src]), atol=0, rtol=0)


# (group, kv_heads, head_dim, block_size, q_len, seq_lens, key_start, query dtype, window, softcap, num_splits): decode
# and multi-token queries, GQA, block sizes that do not divide the lengths, window, softcap, left padding, split-KV.
QUANTIZED_ATTENTION_CASES = [
    (3, 1, 64, 16, 1, [37, 70, 9], [0, 11, 8], torch.float32, 8, None, 4),
    (1, 2, 32, 16, 5, [23, 30], None, torch.float16, None, None, 2),
    (8, 1, 64, 32, 1, [45, 33], [2, 0], torch.bfloat16, None, 30.0, 1),
    (8, 1, 64, 16, 12, [40, 12], [0, 2], torch.float32, 5, None, 2),
]


@pytest.mark.parametrize("dtype", CODE_DTYPES, ids=CODE_IDS)
@pytest.mark.parametrize(
    "group, kv_heads, head_dim, block_size, q_len, seq_lens, key_start, query_dtype, window, softcap, num_splits",
    QUANTIZED_ATTENTION_CASES, ids=[_case_id(case) for case in QUANTIZED_ATTENTION_CASES],
)
def test_paged_attention_over_8bit_pools_matches_reference(
    dtype, group, kv_heads, head_dim, block_size, q_len, seq_lens, key_start, query_dtype, window, softcap,
    num_splits,
):
    """The kernel dequantizes as it loads: it matches `hf_paged.ops.paged_attention` over the same 8-bit storage
    (which decodes it with `hf_paged.quant.decode`)."""
    inputs = quantized(make_paged_inputs(group=group, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size,
                                         q_len=q_len, seq_lens=seq_lens, key_start=key_start, dtype=torch.float32,
                                         seed=len(seq_lens)), dtype, query_dtype)
    kwargs = {"scale": head_dim**-0.5, "max_seq_len": max(seq_lens), "sliding_window": window, "softcap": softcap}
    out = launch_paged_attention(**inputs, **kwargs, num_splits=num_splits)
    assert out.shape == (len(seq_lens), q_len, group * kv_heads, head_dim) and out.dtype == query_dtype
    torch.testing.assert_close(out.float(), reference_attention(inputs, **kwargs), atol=TOLERANCE[query_dtype],
                               rtol=TOLERANCE[query_dtype])


@pytest.mark.parametrize("dtype", CODE_DTYPES, ids=CODE_IDS)
def test_8bit_pools_with_sinks_chunks_slabs_and_narrow_values(dtype):
    """Attention sinks and chunks; the same pools in 3 block-major slabs through offset tables; values narrower than
    the keys (their magnitudes at another offset, in pools of their own)."""
    inputs = quantized(make_paged_inputs(group=2, kv_heads=2, head_dim=32, block_size=8, q_len=3, seq_lens=[29, 12],
                                         key_start=[0, 4], dtype=torch.float32, seed=14), dtype)
    sinks = 2 * torch.randn(4, generator=torch.Generator().manual_seed(7))
    kwargs = {"scale": 32**-0.5, "max_seq_len": 29, "chunk_size": 8, "sinks": sinks.to(DEVICE)}
    expected = reference_attention(inputs, **kwargs)
    torch.testing.assert_close(launch_paged_attention(**inputs, **kwargs, num_splits=2), expected, atol=2e-5,
                               rtol=2e-5)
    slabbed = on_slabs(inputs, 3)
    torch.testing.assert_close(launch_paged_attention(**kernel_args(slabbed), **kwargs, num_splits=1), expected,
                               atol=2e-5, rtol=2e-5)
    narrow = quantized(make_paged_inputs(group=3, kv_heads=1, head_dim=48, block_size=8, q_len=2, seq_lens=[21, 9],
                                         key_start=[1, 0], dtype=torch.float32, seed=15, value_dim=16), dtype)
    slabbed = on_slabs(narrow, 2)
    assert not torch.equal(slabbed["key_offsets"], slabbed["value_offsets"])
    torch.testing.assert_close(launch_paged_attention(**kernel_args(slabbed), scale=0.2, max_seq_len=21, num_splits=2),
                               reference_attention(narrow, scale=0.2, max_seq_len=21), atol=2e-5, rtol=2e-5)


# (heads, latent dim, rope dim, block size, q_len, seq_lens, key_start, query dtype, num_splits, slabs)
QUANTIZED_LATENT_CASES = [
    (4, 12, 8, 4, 1, [13, 5, 9], [0, 3, 1], torch.float32, 1, 0),  # the tiny test models' latents
    (20, 48, 16, 16, 3, [37, 9], [0, 4], torch.bfloat16, 2, 3),  # tiles of 10 heads, 3 slabs: two offset tables
    # latents of 256 and more: the kernel takes them in two halves (HALVES), the second padded at 320
    (4, 256, 16, 8, 1, [13, 6], [0, 2], torch.float32, 1, 0),
    (16, 320, 32, 4, 3, [11, 7], None, torch.float16, 2, 2),
]


@pytest.mark.parametrize("dtype", CODE_DTYPES, ids=CODE_IDS)
@pytest.mark.parametrize("heads, latent_dim, rope_dim, block_size, q_len, seq_lens, key_start, query_dtype, "
                         "num_splits, slabs", QUANTIZED_LATENT_CASES)
def test_latent_attention_over_8bit_pools_matches_reference(dtype, heads, latent_dim, rope_dim, block_size, q_len,
                                                            seq_lens, key_start, query_dtype, num_splits, slabs):
    """Latent mode: the latents (keys and values) and the rotary keys each dequantized with their own magnitudes."""
    inputs = make_paged_inputs(group=heads, kv_heads=1, head_dim=latent_dim, block_size=block_size, q_len=q_len,
                               seq_lens=seq_lens, key_start=key_start, dtype=torch.float32, seed=9, value_dim=rope_dim)
    query = torch.randn(len(seq_lens), q_len, heads, latent_dim + rope_dim, generator=torch.Generator().manual_seed(3))
    inputs["query"] = query.transpose(1, 2).to(DEVICE)
    inputs = quantized(inputs, dtype, query_dtype)
    kwargs = {"scale": (latent_dim + rope_dim) ** -0.5, "max_seq_len": max(seq_lens), "latent": True}
    caches = on_slabs(inputs, slabs) if slabs else inputs
    out = launch_paged_attention(**kernel_args(caches), **kwargs, num_splits=num_splits)
    assert out.shape == (len(seq_lens), q_len, heads, latent_dim) and out.dtype == query_dtype
    torch.testing.assert_close(out.float(), reference_attention(inputs, **kwargs), atol=TOLERANCE[query_dtype],
                               rtol=TOLERANCE[query_dtype])


# indices into SHARED_PREFIX_CASES: padding inside the prefix (fp16), q > 1 with a window that cuts into the prefix
QUANTIZED_SHARED_PREFIX_CASES = [1, 4]


@pytest.mark.parametrize("dtype", CODE_DTYPES, ids=CODE_IDS)
@pytest.mark.parametrize("index", QUANTIZED_SHARED_PREFIX_CASES,
                         ids=[_shared_case_id(SHARED_PREFIX_CASES[i]) for i in QUANTIZED_SHARED_PREFIX_CASES])
def test_shared_prefix_attention_over_8bit_pools_matches_reference(dtype, index):
    """Both passes of the shared-prefix kernel (the prefix once per group, the tails through the paged kernel)
    dequantize; also through 2 block-major slabs."""
    (group, kv_heads, head_dim, block_size, q_len, groups, prefix_blocks, tail_lens, key_start, query_dtype, window,
     softcap, num_splits) = SHARED_PREFIX_CASES[index]
    inputs = quantized(make_shared_prefix_inputs(
        group=group, kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, q_len=q_len, groups=groups,
        prefix_blocks=prefix_blocks, tail_lens=tail_lens, key_start=key_start, dtype=torch.float32,
        seed=len(tail_lens)), dtype, query_dtype)
    kwargs = {"scale": head_dim**-0.5, "max_seq_len": int(inputs["seq_lens"].max()), "sliding_window": window,
              "softcap": softcap}
    expected = reference_shared_prefix(inputs, **kwargs)
    for caches in (inputs, on_slabs(inputs, 2)):
        out = launch_shared_prefix_attention(**kernel_args(caches), **kwargs, num_splits=num_splits)
        torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[query_dtype], rtol=TOLERANCE[query_dtype])
