"""Storage: the pools (`KVPool`) and their slabs (`hf_paged.storage`: `LayerStore`, offset tables). A growable pool
adds slabs instead of copying, reserves nothing ahead and zeroes what it adds, and a pool of several slabs gives
Transformers' own tokens on every path (windows per slab merged by log-sum-exp, shared prefixes, gathers,
copy-on-write, multi-head latent attention, sliding windows, sinks); a fixed pool is one slab, and a deep copy
consolidates the slabs into one."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import MODES, VOCAB, count_calls, left_padded_batch, model_pair

import hf_paged
from hf_paged import PagedCache, ops, storage
from hf_paged.compat import cache_kwargs
from hf_paged.kv_pool import KVPool
from hf_paged.storage import LayerStore

NEW_TOKENS = 40


@pytest.fixture(scope="module", params=["llama", "gemma3", "gpt_oss", "deepseek_v3"])
def pair(request):
    return request.param, *model_pair(request.param)


def _generate(model, inputs, new_tokens=NEW_TOKENS, **kwargs):
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
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
        # (Transformers 5.24 renamed the keyword past_key_values to cache: look for the cache itself.)
        cache = next((value for value in kwargs.values() if isinstance(value, PagedCache)), None)
        if cache is not None and cache.pool.slabs:
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
    calls = count_calls(monkeypatch, ops, ["ranges_attention"])
    try:
        cache = PagedCache(paged.config, block_size=4)
        got = _generate(paged, inputs, past_key_values=cache, **MODES[mode])
    finally:
        watch.handle.remove()
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences), f"{family} {mode}: tokens differ"
    pool = cache.pool
    assert len(pool.slabs) >= 2, pool.starts
    assert watch.pointers and all(len(pointers) == 1 for pointers in watch.pointers.values())  # slabs never move
    # Every block of every pool (a sliding-window model has one per layer group) is allocated once: no copy.
    assert sum(watch.allocated) == sum(len(each.tensors) * each.num_blocks for each in cache.pools)
    assert max(watch.allocated) < pool.num_blocks
    if family != "deepseek_v3":  # (latent layers read their slabs' ranges in hf_paged.latent, not through ops)
        assert calls["ranges_attention"] > 0  # one window per slab, merged
    cache.manager.check()


@pytest.mark.parametrize("mode", list(MODES))
def test_allocated_within_one_quantum_of_referenced(mode):
    """Over a generate call, the pool never holds more than one growth quantum beyond what its rows reference at
    their peak (the rule documented on `KVPool`), and it reserved nothing ahead."""
    _, paged = model_pair("llama")
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
    _, paged = model_pair("llama")
    ids = torch.randint(3, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))  # 4 full blocks of 4
    cache = PagedCache(paged.config, block_size=4)
    _generate(paged, {"input_ids": ids}, past_key_values=cache, **{**MODES[mode], "num_return_sequences": 3})
    # The prompt's slab: its 4 blocks + one block of slack for each of the 3 rows (1 row's worth without the hint).
    first = cache.pool.starts[1] if len(cache.pool.slabs) > 1 else cache.pool.num_blocks
    assert first >= 4 + 3
    if mode == "sample":  # no reorders: each row's first new block is the one it took after the prompt
        assert all(table[4] < first for table in cache.manager.tables)
    assert cache._forks == 1  # reset after the prompt


def test_fixed_pool_is_one_slab():
    _, paged = model_pair("llama")
    cache = PagedCache(paged.config, block_size=4, num_blocks=64)
    paged.generate(**left_padded_batch([13, 6, 9], seed=5), max_new_tokens=NEW_TOKENS, do_sample=False,
                   past_key_values=cache)
    assert len(cache.pool.slabs) == 1 and cache.pool.num_blocks == 64
    assert isinstance(cache.layers[0].key_pool, torch.Tensor)


def test_deepcopy_of_a_pool_of_several_slabs_continues_like_the_original():
    reference, paged = model_pair("llama")
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
    by_block = reference.index_select(0, ids.long()).permute(2, 0, 1, 3)  # the head-by-head gather, block by block
    assert torch.equal(storage.select_blocks(store, ids), by_block)
    assert torch.equal(storage.select_blocks(reference, ids.long()), by_block)
    assert storage.is_head_major(store) == (not block_major)
    tables = torch.tensor([[9, 0, 4], [3, 7, 8]], dtype=torch.int32)
    rows = torch.stack([torch.cat([reference[block] for block in row.tolist()])[:10] for row in tables])
    for pool in (store, reference):
        assert torch.equal(ops.gather_kv(pool, tables, 10), rows.transpose(1, 2))
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


@pytest.mark.parametrize("block_major", [False, True])
def test_block_major_blocks_are_padded_to_aligned_offsets(block_major):
    """Block-major slabs (the Triton path) pad each block to a multiple of 16 elements, so the offset tables of a
    pool of any block shape are aligned, and a pool counts the padding among the bytes it allocates."""
    shape = (2, 5, 1, 14)  # 2 layers of 5-token blocks of one 14-wide head: 140 elements a block
    slabs = [storage.slab_tensor(*shape[:1], n, *shape[1:], torch.device("cpu"), torch.int8, kinds=1,
                                 block_major=block_major) for n in (3, 4)]
    assert slabs[0].stride(2) == (144 if block_major else 5 * 14)
    assert all(bool((slab == 0).all()) for slab in slabs)
    if block_major:
        aligned = []
        storage.block_offsets(slabs, [0, 3], aligned.append)
        assert len(aligned) == 1
    assert storage.block_elements(2, 5, 1, 14, block_major) == (144 if block_major else 140)


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


@pytest.mark.parametrize("num_blocks", [None, 40])
def test_blocks_no_row_has_written_hold_zeros(num_blocks):
    """`ops.range_attention` scores every slot of its range: the pool must never expose garbage (a NaN left by
    an earlier tensor in the same memory would survive the mask)."""
    reference, paged = model_pair("llama")
    inputs = left_padded_batch([9], seed=5)
    config = paged.config
    head_dim = config.hidden_size // config.num_attention_heads
    block_numel = config.num_hidden_layers * 2 * 4 * config.num_key_value_heads * head_dim  # all layers, K and V
    for _ in range(3):  # leave NaN-filled memory behind, about a pool's size, for the allocator to hand out again
        garbage = torch.full((64 * block_numel,), float("nan"))
        del garbage
        cache = PagedCache(paged.config, block_size=4, num_blocks=num_blocks)
        got = _generate(paged, inputs, new_tokens=10, num_return_sequences=3, do_sample=True, **cache_kwargs(cache))
        unused = []
        for _ in range(16):  # more tokens, one at a time, until a growable pool has added a slab with slack
            with torch.no_grad():
                paged(torch.randint(3, 90, (3, 1)), **cache_kwargs(cache))
            used = {block for table in cache.manager.tables for block in table}
            unused = [block for block in range(cache.manager.num_blocks) if block not in used]
            if unused and (num_blocks is not None or len(cache.pool.slabs) > 1):
                break
        assert unused and (num_blocks is not None or len(cache.pool.slabs) > 1)
        for slab, start in zip(cache.pool.slabs, cache.pool.starts, strict=True):  # every slab's unused blocks
            local = [block - start for block in unused if start <= block < start + slab[0].shape[2]]
            assert all(torch.count_nonzero(tensor[:, :, local]) == 0 for tensor in slab)
        expected = _generate(reference, inputs, new_tokens=10, num_return_sequences=3, do_sample=True)
        assert torch.equal(got.sequences, expected.sequences)
