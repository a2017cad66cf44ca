"""Slab storage (issue 10, item 4): a growable pool adds slabs instead of copying, reserves nothing ahead, and a pool
of several slabs gives Transformers' own tokens on every path (windows per slab merged by log-sum-exp, shared
prefixes, gathers, copy-on-write, multi-head latent attention, sliding windows, sinks)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, count_calls, left_padded_batch, make_pair, needs_triton_interpreter
from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig, GptOssConfig

import hf_paged.masks
import hf_paged.step
from hf_paged import PagedCache, ops, storage
from hf_paged.kv_pool import KVPool
from hf_paged.storage import LayerStore

NEW_TOKENS = 40
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MIXED = dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"], head_dim=16)


def _config(family: str):
    if family == "gemma3":
        return Gemma3TextConfig(**_COMMON, **_MIXED)
    if family == "gpt_oss":
        return GptOssConfig(**_COMMON, **_MIXED, num_local_experts=4, num_experts_per_tok=2)
    return AutoConfig.for_model(  # multi-head latent attention: latents of two widths are paged
        "deepseek_v3", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2, num_hidden_layers=2,
        first_k_dense_replace=1, moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
        topk_group=1, n_shared_experts=1, kv_lora_rank=12, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=12, num_key_value_heads=4)


def _pair(family: str):
    if family == "llama":
        return make_pair("llama")
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager").eval()
    state = reference.state_dict()
    for name in state:
        if name.endswith("sinks"):  # random sinks (gpt-oss starts them at zero, which would hide a wrong merge)
            state[name].copy_(torch.randn_like(state[name]))
    reference.load_state_dict(state)
    paged = AutoModelForCausalLM.from_config(_config(family), attn_implementation="hf_paged").eval()
    paged.load_state_dict(state)
    for model in (reference, paged):
        model.generation_config.pad_token_id = 0
    return reference, paged


@pytest.fixture(scope="module", params=["llama", "gemma3", "gpt_oss", "deepseek_v3"])
def pair(request):
    return request.param, *_pair(request.param)


MODES = {
    "greedy": dict(do_sample=False),
    "beams": dict(num_beams=3, num_return_sequences=2),
    "sample": dict(do_sample=True, num_return_sequences=3, top_k=0),
}


def _generate(model, inputs, **kwargs):
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


class _SlabWatch:
    """Records every slab the pools allocate, and (before each forward step) each slab's tensors' data pointers."""

    def __init__(self, monkeypatch, model):
        self.allocated: list[int] = []  # blocks of each slab tensor allocated
        self.pointers: dict[int, set[int]] = {}  # id of a slab tensor -> the data pointers it was seen with
        self.keep: list[torch.Tensor] = []  # keeps the slab tensors alive, so ids are not reused
        original = storage.slab_tensor

        def recorded(num_layers, num_blocks, *args, **kwargs):
            tensor = original(num_layers, num_blocks, *args, **kwargs)
            self.allocated.append(num_blocks)
            return tensor

        monkeypatch.setattr(storage, "slab_tensor", recorded)
        self.caches: list[PagedCache] = []
        self.handle = model.register_forward_pre_hook(self._look, with_kwargs=True)

    def _look(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        if isinstance(cache, PagedCache) and cache.pool.slabs:
            for slab in cache.pool.slabs:
                for tensor in slab:
                    self.keep.append(tensor)
                    self.pointers.setdefault(id(tensor), set()).add(tensor.data_ptr())


@pytest.mark.parametrize("mode", list(MODES))
def test_growing_pool_gives_reference_tokens(pair, mode, monkeypatch):
    """Left-padded prompts, 40 new tokens, blocks of 4: the pool ends with several slabs; tokens and logits are the
    reference's, no slab ever moves, and the pool allocates each block once (nothing copied into a bigger pool)."""
    family, reference, paged = pair
    inputs = left_padded_batch([13, 6, 9], seed=2)
    expected = _generate(reference, inputs, **MODES[mode])
    watch = _SlabWatch(monkeypatch, paged)
    calls = count_calls(monkeypatch, ops, ["windows_attention"])
    try:
        cache = PagedCache(paged.config, block_size=4)
        got = _generate(paged, inputs, past_key_values=cache, **MODES[mode])
    finally:
        watch.handle.remove()
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences), f"{family} {mode}: tokens differ"
    pool = cache.pool
    assert len(pool.slabs) >= 2, pool.starts
    assert all(len(pointers) == 1 for pointers in watch.pointers.values())  # old slabs never move
    # Every block of every pool (a sliding-window model has one per layer group) is allocated once: no copy.
    assert sum(watch.allocated) == sum(len(each.tensors) * each.num_blocks for each in cache.pools)
    assert max(watch.allocated) < pool.num_blocks
    if family != "deepseek_v3":  # (latent layers read their slabs' ranges in hf_paged.latent, not through ops)
        assert calls["windows_attention"] > 0  # one window per slab, merged
    cache.manager.check()


@pytest.mark.parametrize("mode", list(MODES))
def test_allocated_within_one_quantum_of_referenced(mode):
    """Over a generate call, the pool never holds more than one growth quantum beyond what its rows reference at
    their peak (the rule documented on `KVPool`), and it reserved nothing ahead."""
    _, paged = make_pair("llama")
    inputs = left_padded_batch([13, 6, 9], seed=3)
    cache = PagedCache(paged.config, block_size=4)
    _generate(paged, inputs, past_key_values=cache, **MODES[mode])
    stats = cache.stats()
    rows = stats.num_rows
    quantum = max(hf_paged.kinds.SLACK_BLOCKS_PER_ROW * rows, stats.num_blocks // hf_paged.groups.SLAB_FRACTION)
    assert stats.peak_pool_bytes == stats.pool_bytes == stats.num_blocks * cache.bytes_per_block
    assert stats.peak_pool_bytes <= stats.peak_used_bytes + quantum * cache.bytes_per_block
    assert len(cache.pool.slabs) >= 2


@pytest.mark.parametrize("mode", ["beams", "sample"])
def test_forked_rows_grow_inside_the_prompts_slab(mode):
    """A prompt computed once for its k rows sizes the pool's slack for the k rows that will grow (`expect_forks`):
    the rows' first new blocks lie in the prompt's slab, so decoding reads one slab, not a prompt slab and a tail."""
    _, paged = make_pair("llama")
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))  # 4 full blocks of 4
    cache = PagedCache(paged.config, block_size=4)
    _generate(paged, {"input_ids": ids}, past_key_values=cache, **{**MODES[mode], "num_return_sequences": 3})
    # The prompt's slab: its 4 blocks + one block of slack for each of the 3 rows (1 row's worth without the hint).
    first = cache.pool.starts[1] if len(cache.pool.slabs) > 1 else cache.pool.num_blocks
    assert first >= 4 + 3
    if mode == "sample":  # no reorders: each row's first new block is the one it took after the prompt
        assert all(table[4] < first for table in cache.manager.tables)
    assert cache._forks == 1  # reset after the prompt


@pytest.mark.parametrize("copy_bytes", [None, 0])
def test_single_row_crossing_slabs_is_read_in_place(monkeypatch, copy_bytes):
    """Greedy decoding of one row right after its prefill: the row's blocks cross slab boundaries, and every decode
    step reads them in place, with sdpa's tokens: its spans concatenated while small (`step.SPAN_COPY_BYTES`),
    else one window per slab (nothing gathered either way)."""
    if copy_bytes is not None:
        monkeypatch.setattr(hf_paged.step, "SPAN_COPY_BYTES", copy_bytes)
    reference, paged = make_pair("llama")
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    expected = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    calls = count_calls(monkeypatch, ops, ["windows_attention", "window_attention", "shared_prefix_attention"])
    calls.update(count_calls(monkeypatch, LayerStore, ["index_select"]))
    cache = PagedCache(paged.config, block_size=4)
    got = paged.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)
    assert len(cache.pool.slabs) >= 3
    assert calls["index_select"] == 0 and calls["shared_prefix_attention"] == 0
    assert (calls["windows_attention"] > 0) == (copy_bytes == 0)


def test_fixed_pool_is_one_slab():
    _, paged = make_pair("llama")
    cache = PagedCache(paged.config, block_size=4, num_blocks=64)
    paged.generate(**left_padded_batch([13, 6, 9], seed=5), max_new_tokens=NEW_TOKENS, do_sample=False,
                   past_key_values=cache)
    assert len(cache.pool.slabs) == 1 and cache.pool.num_blocks == 64
    assert isinstance(cache.layers[0].key_pool, torch.Tensor)


def test_deepcopy_of_a_pool_of_several_slabs_continues_like_the_original():
    reference, paged = make_pair("llama")
    inputs = left_padded_batch([13, 6, 9], seed=6)
    cache = PagedCache(paged.config, block_size=4)
    first = paged.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, past_key_values=cache)
    assert len(cache.pool.slabs) >= 3
    clone = copy.deepcopy(cache)
    assert len(clone.pool.slabs) == 1  # the copy is consolidated into one slab
    for layer, theirs in zip(cache.layers, clone.layers, strict=True):
        torch.testing.assert_close(layer.keys, theirs.keys, rtol=0, atol=0)
        torch.testing.assert_close(layer.values, theirs.values, rtol=0, atol=0)
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(first[:, inputs["input_ids"].shape[1]:])], dim=1)
    again = paged.generate(first, attention_mask=mask, max_new_tokens=8, do_sample=False, past_key_values=clone)
    expected = reference.generate(first, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(again, expected)


@pytest.mark.parametrize("block_major", [False, True])
def test_layer_store_matches_a_single_tensor(block_major):
    """`LayerStore` over three slabs reads and writes exactly as the same blocks in one tensor."""
    generator = torch.Generator().manual_seed(0)
    sizes, starts = [3, 5, 2], [0, 3, 8]
    slabs = [storage.slab_tensor(2, n, 4, 2, 8, torch.device("cpu"), torch.float32, block_major=block_major)
             for n in sizes]
    for slab in slabs:
        slab.copy_(torch.randn(slab.shape, generator=generator))
    whole = torch.cat(slabs, dim=2)  # [L, 2, 10, bs, H, D]
    offsets = storage.block_offsets(slabs, starts) if block_major else None
    store = LayerStore([slab[1, 0] for slab in slabs], starts, offsets)
    reference = whole[1, 0]
    assert store.shape == reference.shape and store.dtype == reference.dtype and store.device == reference.device
    ids = torch.tensor([9, 0, 4, 3, 3, 7, 2, 8], dtype=torch.int32)
    assert torch.equal(store.index_select(0, ids), reference.index_select(0, ids.long()))
    assert torch.equal(store[3:8], reference[3:8]) and torch.equal(store[8:10], reference[8:10])
    assert store[4:6].data_ptr() == slabs[1][1, 0, 1].data_ptr()  # read in place
    with pytest.raises(IndexError, match="span several slabs"):
        store[2:4]
    assert [store.slab_of(block) for block in (0, 2, 3, 7, 8, 9)] == [0, 0, 1, 1, 2, 2]
    tables = torch.tensor([[9, 0, 4], [3, 7, 8]], dtype=torch.int32)
    assert torch.equal(ops.gather_kv(store, tables, 10), ops.gather_kv(reference, tables, 10))
    slots = torch.tensor([0, 13, -1, 39, 12, 33, 5])
    states = torch.randn(7, 2, 8, generator=generator)
    store.write(slots, states)
    expected = reference.clone()
    ops.reshape_and_cache(states, states, expected, expected.clone(), slots)
    assert torch.equal(torch.cat([slab[1, 0] for slab in slabs]), expected)
    if block_major:  # block b of every slab is at base + offsets[b]: one table for every layer, keys and values
        base, table = offsets
        flat = slabs[base]
        for layer, kind in ((0, 0), (1, 1)):
            view = flat[layer, kind]
            for block in range(10):
                slab = store.slab_of(block)
                got = slabs[slab][layer, kind, block - starts[slab]]
                assert got.data_ptr() == view.data_ptr() + int(table[block]) * view.element_size()


def test_growth_appends_slabs_and_keeps_the_old_ones():
    """A direct pool test: growth adds zeroed slabs, old slabs keep their storage and contents, no slab holds the
    whole pool, and a pool on several devices' worth of layers mirrors the slab boundaries (`follow`)."""
    pool = KVPool(3, 4)
    states = torch.randn(2, 2, 5, 8)
    pool.allocate(states)
    pool.ensure_free(6, slack=4)
    first = [tensor.clone() for tensor in pool.slabs[0]]
    first[0].normal_()
    pool.slabs[0][0].copy_(first[0])
    pointers = [tensor.data_ptr() for tensor in pool.slabs[0]]
    pool.ensure_free(pool.blocks.num_free + 3, slack=8)
    # What each step misses plus the slack asked for: 6 + 4 blocks, then 3 + 8.
    assert len(pool.slabs) == 2 and pool.starts == [0, 10] and pool.num_blocks == 10 + 3 + 8
    assert [tensor.data_ptr() for tensor in pool.slabs[0]] == pointers
    assert torch.equal(pool.slabs[0][0], first[0]) and not pool.slabs[1][0].any()
    assert isinstance(pool.plain[0][0], LayerStore) and pool.plain[0][0].shape[0] == 21
    other = KVPool(1, 4)
    other.allocate(states)
    other.follow(pool.starts, pool.num_blocks)
    assert other.starts == pool.starts and other.num_blocks == pool.num_blocks


_TRITON_SCRIPT = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from conftest import VOCAB, left_padded_batch, make_pair
from hf_paged import PagedCache
reference, paged = make_pair("llama")
results = {}
for mode, kwargs in {"greedy": dict(do_sample=False), "beams": dict(num_beams=3, num_return_sequences=2)}.items():
    inputs = left_padded_batch([13, 6], seed=7)
    expected = reference.generate(**inputs, max_new_tokens=20, min_new_tokens=20, **kwargs)
    cache = PagedCache(paged.config, block_size=4)
    got = paged.generate(**inputs, max_new_tokens=20, min_new_tokens=20, past_key_values=cache, **kwargs)
    results[mode] = {"same": bool(torch.equal(got, expected)), "slabs": len(cache.pool.slabs),
                     "block_major": cache.pool.block_major}
print(json.dumps(results))
'''


@needs_triton_interpreter
def test_triton_path_under_the_interpreter(tmp_path):
    """``generate`` through the Triton kernels (interpreter on CPU) with a growable pool: it grows by block-major
    slabs, which the kernels address through their offset tables, and gives sdpa's tokens."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    script = tmp_path / "run.py"
    script.write_text(_TRITON_SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_PAGED_BACKEND": "triton", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    for mode, result in json.loads(run.stdout.strip().splitlines()[-1]).items():
        assert result["same"] and result["block_major"], (mode, result)
        assert result["slabs"] >= 2, (mode, result)


@pytest.mark.parametrize(("softcap", "sinks", "window"), [(None, False, None), (5.0, False, 7), (None, True, None)])
def test_windows_attention_equals_paged_attention(softcap, sinks, window):
    """One window per slab, merged by log-sum-exp, equals `ops.paged_attention` over the same blocks in one tensor,
    null entries (dead leading blocks, 0 in the tensors) skipped, queries that see nothing in a slab included."""
    generator = torch.Generator().manual_seed(1)
    starts, sizes, bs = [0, 3, 7], [3, 4, 5], 4
    slabs = [storage.slab_tensor(1, n, bs, 2, 8, torch.device("cpu"), torch.float32) for n in sizes]
    for slab in slabs:
        slab.copy_(torch.randn(slab.shape, generator=generator))
    keys, values = (LayerStore([slab[0, kind] for slab in slabs], starts) for kind in (0, 1))
    whole = torch.cat(slabs, dim=2)[0]
    tables = [[-1, 2, 3, 4], [0, 1, 8, 9], [7, 8, 10, 11]]  # row 0: a null entry, then blocks of slabs 0 and 1
    seq_lens = torch.tensor([15, 14, 16], dtype=torch.int32)
    q_len = 2
    ranges = hf_paged.step._window(tables, 16, bs, starts)
    assert ranges is not None and len(ranges) == 3
    first_entries = torch.tensor([1, 0, 0])
    block_tables = torch.tensor([[max(b, 0) for b in table] for table in tables], dtype=torch.int32)
    step = hf_paged.step.StepPlan(block_tables=block_tables, seq_lens=seq_lens, slot_mapping=None, q_len=q_len,
                                  max_seq_len=16, block_size=bs, windows=tuple(ranges), first_entries=first_entries)
    query = torch.randn(3, 4, q_len, 8, generator=generator)
    sink = torch.randn(4, generator=generator) if sinks else None
    masks = hf_paged.masks.windows_masks(step, None, window, 2, torch.float32)
    got = ops.windows_attention(query, keys, values, step.windows, masks, scale=0.3, softcap=softcap, sinks=sink)
    expected = ops.paged_attention(query, whole[0], whole[1], block_tables, seq_lens, (first_entries * bs).to(
        torch.int32), scale=0.3, max_seq_len=16, sliding_window=window, softcap=softcap, sinks=sink)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
