"""Prefix caching across generate() calls: a shared system prompt is computed once and reused."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import count_prefill_positions, make_pair, system_prompt

import hf_paged

SYSTEM = 160

def _prompt(suffix_len: int, seed: int, system_seed: int = 0) -> torch.Tensor:
    return system_prompt(SYSTEM, suffix_len, seed, system_seed)


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beams"])
def test_second_call_computes_only_the_new_suffix(prefix_pair, mode):
    reference, paged = prefix_pair
    hf_paged.enable_prefix_caching(paged)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True, **mode)
    first_ids, second_ids = _prompt(9, seed=1), _prompt(21, seed=2)

    positions, first = count_prefill_positions(paged, lambda: paged.generate(first_ids, **kwargs))
    assert positions == first_ids.shape[1]
    assert first.past_key_values.stats().prefix_hit_tokens == 0
    del first
    gc.collect()

    positions, second = count_prefill_positions(paged, lambda: paged.generate(second_ids, **kwargs))
    assert positions <= 21 + 16  # the new suffix, plus at most one block
    stats = second.past_key_values.stats()
    assert stats.prefix_hit_tokens == SYSTEM  # 10 full blocks of the system prompt
    assert torch.equal(second.sequences, reference.generate(second_ids, **kwargs).sequences)


def test_hits_are_shared_by_a_live_cache_and_never_cross_prompts(prefix_pair):
    reference, paged = prefix_pair
    hf_paged.enable_prefix_caching(paged, block_size=8)
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True)
    first = paged.generate(_prompt(3, seed=1), **kwargs)  # kept alive: its blocks are shared, not copied
    other_system = _prompt(3, seed=1, system_seed=99)
    positions, other = count_prefill_positions(paged, lambda: paged.generate(other_system, **kwargs))
    assert positions == other_system.shape[1] and other.past_key_values.stats().prefix_hit_tokens == 0
    again = paged.generate(_prompt(5, seed=3), **kwargs)
    assert again.past_key_values.stats().prefix_hit_tokens == SYSTEM
    assert torch.equal(again.sequences, reference.generate(_prompt(5, seed=3), **kwargs).sequences)
    first.past_key_values.manager.check()  # one pool, three live caches: every invariant holds across them


def test_left_padded_batch_hits_only_identical_rows(prefix_pair):
    reference, paged = prefix_pair
    hf_paged.enable_prefix_caching(paged)
    ids = torch.cat([_prompt(4, seed=5), _prompt(4, seed=6)])
    mask = torch.ones_like(ids)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True)
    paged.generate(ids, attention_mask=mask, **kwargs)
    # Same rows, but the second one left-padded by 2: its blocks are different keys, so the batch hit is 0.
    padded_ids = torch.cat([ids[:1], torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[1:, :-2]], 1)])
    padded_mask = torch.ones_like(padded_ids)
    padded_mask[1, :2] = 0
    out = paged.generate(padded_ids, attention_mask=padded_mask, **kwargs)
    assert out.past_key_values.stats().prefix_hit_tokens == 0
    expected = reference.generate(padded_ids, attention_mask=padded_mask, **kwargs)
    assert torch.equal(out.sequences, expected.sequences)


def test_unreferenced_blocks_are_evicted_lru_when_the_pool_is_full(prefix_pair):
    _, paged = prefix_pair
    state = hf_paged.enable_prefix_caching(paged, num_blocks=15, block_size=16)
    blocks = state.pool.blocks
    kwargs = dict(max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True)
    paged.generate(_prompt(4, seed=1), **kwargs)  # 168 tokens: 11 blocks, the 10 full prompt blocks indexed
    gc.collect()
    assert blocks.num_cached == 10 and blocks.num_free == 15  # 5 free + 10 evictable
    # Another system prompt needs 11 blocks: the 5 free ones, then the 6 least recently released cached ones.
    paged.generate(_prompt(4, seed=1, system_seed=7), **kwargs)
    gc.collect()
    assert blocks.num_cached == 14 and blocks.num_free == 15
    blocks.check()
    # The second prompt still hits; the first lost its leading blocks (released first, evicted first).
    out = paged.generate(_prompt(2, seed=4, system_seed=7), **kwargs)
    assert out.past_key_values.stats().prefix_hit_tokens == SYSTEM
    del out
    gc.collect()
    assert paged.generate(_prompt(2, seed=4), **kwargs).past_key_values.stats().prefix_hit_tokens == 0


def test_disable_prefix_caching_drops_the_pool(prefix_pair):
    _, paged = prefix_pair
    state = hf_paged.enable_prefix_caching(paged)
    paged.generate(_prompt(4, seed=1), max_new_tokens=2)
    hf_paged.disable_prefix_caching(paged)
    assert state.pool.blocks.num_cached == 0
    out = paged.generate(_prompt(4, seed=1), max_new_tokens=2, return_dict_in_generate=True)
    assert out.past_key_values.pool is not state.pool


def test_enable_prefix_caching_needs_hf_paged():
    reference, _ = make_pair("llama")
    with pytest.raises(ValueError, match="hf_paged"):
        hf_paged.enable_prefix_caching(reference)
