"""Prefix caching across generate() calls: a shared system prompt is computed once and reused."""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_models import VOCAB, config, count_prefill_positions, model_pair, system_prompt

import hf_paged
from hf_paged import PagedCache, prefix
from hf_paged.block_manager import NULL_BLOCK

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
    # Same rows, but the second one left-padded by 2 (not a whole block): its real tokens lie at other offsets in
    # its blocks, whose keys therefore differ, so the batch hit is 0.
    padded_ids = torch.cat([ids[:1], torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[1:, :-2]], 1)])
    padded_mask = torch.ones_like(padded_ids)
    padded_mask[1, :2] = 0
    out = paged.generate(padded_ids, attention_mask=padded_mask, **kwargs)
    assert out.past_key_values.stats().prefix_hit_tokens == 0
    expected = reference.generate(padded_ids, attention_mask=padded_mask, **kwargs)
    assert torch.equal(out.sequences, expected.sequences)


def _left_padded(rows: list[torch.Tensor], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``(input_ids, attention_mask, pads)``: the ``[1, n]`` prompts `rows` left-padded with 0 to `width` (default:
    the longest), and each row's padding."""
    width = width or max(row.shape[1] for row in rows)
    pads = [width - row.shape[1] for row in rows]
    ids = torch.cat([torch.nn.functional.pad(row, (pad, 0)) for row, pad in zip(rows, pads, strict=True)])
    mask = torch.cat([torch.nn.functional.pad(torch.ones_like(row), (pad, 0)) for row, pad in zip(rows, pads,
                                                                                                  strict=True)])
    return ids, mask, pads


def _no_block_leaks(state) -> None:
    """Every invariant holds in every pool of `state` and, with no cache alive, every block is free or evictable."""
    gc.collect()
    for pool in state.pools.values():
        pool.blocks.check()
        assert pool.blocks.num_free == pool.blocks.num_blocks, "a block is still referenced"


def test_block_hashes_skip_whole_blocks_of_left_padding():
    """A row padded by p hashes like the same row padded by p mod block_size: its whole pad blocks have no key and
    the chain starts at its first real block. Another in-block offset shares no key, and without position ids (a
    model whose positions are the padded indices) every amount of padding keys differently."""
    bs = 4
    row = torch.randint(3, VOCAB, (1, 13), generator=torch.Generator().manual_seed(3))

    def hashes(pad: int, with_positions: bool = True):
        ids, mask, _ = _left_padded([row], width=row.shape[1] + pad)
        positions = (mask.cumsum(-1) - 1).clamp_min(0) if with_positions else None  # as generate() passes them
        return prefix.block_hashes(ids, mask, bs, salt="s", starts=[pad], position_ids=positions)[0]

    base = hashes(2)
    assert base.start == 2 and None not in base.keys
    for pad in (6, 10, 14):
        padded = hashes(pad)
        assert padded.start == pad
        assert padded.keys[:pad // bs] == [None] * (pad // bs)
        assert padded.keys[pad // bs:] == base.keys[:len(padded.keys) - pad // bs]
    for other in (hashes(1), hashes(3), hashes(7)):
        assert not set(other.keys) & set(base.keys) - {None}
    assert not set(hashes(6, with_positions=False).keys) & set(hashes(2, with_positions=False).keys) - {None}


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beams"])
@pytest.mark.parametrize(("block_size", "tail"), [(8, 8), (7, 4)], ids=["bs8-divides", "bs7-does-not-divide"])
def test_whole_blocks_of_left_padding_do_not_matter(prefix_pair, mode, block_size, tail):
    """Prompts indexed with some left padding hit again with other amounts that differ by whole blocks (one block,
    more than a block, none), also when the rows of one batch have different numbers of pad blocks; each row takes
    its blocks from its first real one, and exactly sdpa's tokens come out."""
    reference, paged = prefix_pair
    bs = block_size
    state = hf_paged.enable_prefix_caching(paged, block_size=bs)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True, **mode)
    a, b, c, d = (_prompt(tail + extra, seed=seed) for seed, extra in enumerate((2 * bs, bs, 0, bs - 3), start=11))

    def run(rows: list[torch.Tensor], expected_pads: list[int], expected_hit: int) -> None:
        ids, mask, pads = _left_padded(rows)
        batch, length = ids.shape
        assert pads == expected_pads
        positions, out = count_prefill_positions(paged, lambda: paged.generate(ids, attention_mask=mask, **kwargs))
        assert positions == batch * (length - expected_hit)  # the prefill computed only [hit, L)
        # Real tokens taken from the index: each row's from its first real token up to the hit.
        assert out.past_key_values.stats().prefix_hit_tokens == sum(max(expected_hit - pad, 0) for pad in pads)
        assert torch.equal(out.sequences, reference.generate(ids, attention_mask=mask, **kwargs).sequences)
        for group in out.past_key_values.groups:
            group.manager.check()
        del out
        _no_block_leaks(state)

    run([a, b, c, d], [0, bs, 2 * bs, bs + 3], 0)
    # b unpadded (was one block), c by one whole block (was two), d by 3 (was a block and 3): every full block of
    # every row is indexed, so the hit is as long as the last prompt token allows.
    run([b, c, d], [0, bs, 3], (b.shape[1] - 1) // bs * bs)
    # A new row n shares only the system prompt (found from a's blocks); c and b are padded by more than a block.
    n = _prompt(tail + 3 * bs, seed=15)
    run([n, c, b], [0, 3 * bs, 2 * bs], SYSTEM // bs * bs)


def test_a_batch_padded_by_whole_blocks_skips_them(prefix_pair):
    """A batch whose rows are all left-padded by at least one whole block (padded to a fixed width) does not
    compute those columns, even with nothing indexed: no row has a real token there. Nothing counts as a hit."""
    reference, paged = prefix_pair
    state = hf_paged.enable_prefix_caching(paged, block_size=8)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True)
    rows = [_prompt(3, seed=21), _prompt(12, seed=22)]
    ids, mask, pads = _left_padded(rows, width=rows[1].shape[1] + 2 * 8 + 5)
    batch, length = ids.shape
    skipped = min(pads) // 8 * 8  # 2 whole blocks
    positions, out = count_prefill_positions(paged, lambda: paged.generate(ids, attention_mask=mask, **kwargs))
    assert skipped == 16 and positions == batch * (length - skipped)
    assert out.past_key_values.stats().prefix_hit_tokens == 0
    assert torch.equal(out.sequences, reference.generate(ids, attention_mask=mask, **kwargs).sequences)
    del out
    _no_block_leaks(state)


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
    reference, _ = model_pair("llama")
    with pytest.raises(ValueError, match="hf_paged"):
        hf_paged.enable_prefix_caching(reference)


# ------------------------------------------------------------------ layer groups: sliding-window layers
WINDOW = 8
SLIDING_SYSTEM = 40
# 3 sliding-window layers (window `WINDOW`) to 1 full: two layer groups, each with its own pool and index. Every
# layer sliding (Mistral): one group, and a hit needs no leading block at all.
SLIDING_FAMILIES = {"gemma3": "gemma3_groups", "mistral": "mistral_window8"}


@pytest.fixture(params=list(SLIDING_FAMILIES))
def sliding_prefix_pair(request):
    reference, paged = model_pair(SLIDING_FAMILIES[request.param])
    yield reference, paged
    hf_paged.disable_prefix_caching(paged)


def _sliding_prompt(suffix_len: int, seed: int) -> torch.Tensor:
    return system_prompt(SLIDING_SYSTEM, suffix_len, seed)


def _sliding_group(cache):
    return next(group for group in cache.groups if group.window is not None)


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beams"])
def test_sliding_window_layers_are_indexed_per_group(sliding_prefix_pair, mode):
    """Each layer group has its own pool and index; sliding-window layers still release what leaves the window
    while decoding, and a second call takes the shared system prompt from both groups."""
    reference, paged = sliding_prefix_pair
    state = hf_paged.enable_prefix_caching(paged, block_size=4)
    windows = {group.window for group in PagedCache(paged.config).groups}
    assert set(state.pools) == windows and WINDOW in windows
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, return_dict_in_generate=True, **mode)
    first_ids, second_ids = _sliding_prompt(5, seed=1), _sliding_prompt(9, seed=2)
    positions, first = count_prefill_positions(paged, lambda: paged.generate(first_ids, **kwargs))
    assert positions == first_ids.shape[1]
    sliding = _sliding_group(first.past_key_values)
    assert sliding.pool is state.pools[WINDOW]
    for table, start in zip(sliding.manager.tables, sliding.manager.live_from, strict=True):
        live = [block for block in table if block != NULL_BLOCK]
        assert len(live) <= -(-WINDOW // 4) + 1  # the window's blocks, not the 15 of the row
        assert table[:start // 4] == [NULL_BLOCK] * (start // 4)
    # Released prompt blocks stay indexed until the pool reuses them, the least recently released first: the
    # blocks a hit at the end of the system prompt needs (positions 33-39) were released last.
    assert state.pools[WINDOW].blocks.num_cached >= -(-WINDOW // 4)
    assert torch.equal(first.sequences, reference.generate(first_ids, **kwargs).sequences)
    del first, sliding
    gc.collect()

    positions, second = count_prefill_positions(paged, lambda: paged.generate(second_ids, **kwargs))
    assert second.past_key_values.stats().prefix_hit_tokens == SLIDING_SYSTEM
    assert positions == second_ids.shape[1] - SLIDING_SYSTEM
    assert torch.equal(second.sequences, reference.generate(second_ids, **kwargs).sequences)
    second.past_key_values.manager.check()
    _sliding_group(second.past_key_values).manager.check()


def test_a_sliding_window_hit_needs_only_the_window(sliding_prefix_pair):
    """In a sliding-window group a hit of n blocks needs only the blocks of the keys position n * block_size still
    sees; when one of those is gone from that group's index, the hit shrinks to what every group can serve."""
    reference, paged = sliding_prefix_pair
    state = hf_paged.enable_prefix_caching(paged, block_size=4)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True)
    paged.generate(_sliding_prompt(5, seed=1), **kwargs)
    gc.collect()
    chain = prefix.block_hashes(_sliding_prompt(5, seed=1), None, 4, salt=state.salt_for(paged))[0].keys
    index = state.pools[WINDOW].blocks
    # Forget the sliding group's first 6 blocks (positions 0-23): a hit of 10 blocks reads positions 33-39 there.
    for key in chain[:6]:
        index.unindex(index.lookup(key))
    ids = _sliding_prompt(9, seed=2)
    out = paged.generate(ids, **kwargs)
    assert out.past_key_values.stats().prefix_hit_tokens == SLIDING_SYSTEM
    assert torch.equal(out.sequences, reference.generate(ids, **kwargs).sequences)
    del out
    gc.collect()
    # Forget the block of positions 36-39 there: 10 blocks can no longer be served, 9 can (positions 29-35).
    index.unindex(index.lookup(chain[9]))
    ids = _sliding_prompt(7, seed=3)
    out = paged.generate(ids, **kwargs)
    assert out.past_key_values.stats().prefix_hit_tokens == SLIDING_SYSTEM - 4
    assert torch.equal(out.sequences, reference.generate(ids, **kwargs).sequences)


def _padded_calls_hit(reference, paged, state, prompts, system_len, kwargs, check_cache=None) -> None:
    """Two calls with `prompts` ``(first, again, new)``, which share a system prompt of `system_len` tokens: the first
    pads ``again`` by one whole block of 4 (nothing to hit), the second pads it by two beside a longer ``new`` and
    hits the system prompt. Each gives the reference's tokens, computes only what it did not hit, counts real hit
    tokens only, and leaks no block; `check_cache` looks at each call's cache."""
    first, again, new = prompts
    for rows, pads, hit in (([first, again], [0, 4], 0), ([new, again], [0, 8], system_len)):
        ids, mask, got_pads = _left_padded(rows)
        batch, length = ids.shape
        assert got_pads == pads
        positions, out = count_prefill_positions(
            paged, lambda ids=ids, mask=mask: paged.generate(ids, attention_mask=mask, **kwargs))
        assert positions == batch * (length - hit)
        assert out.past_key_values.stats().prefix_hit_tokens == sum(max(hit - pad, 0) for pad in pads)
        assert torch.equal(out.sequences, reference.generate(ids, attention_mask=mask, **kwargs).sequences)
        if check_cache is not None:
            check_cache(out.past_key_values)
        del out
        _no_block_leaks(state)


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beams"])
def test_sliding_window_groups_hit_across_whole_pad_blocks(sliding_prefix_pair, mode):
    """In a sliding-window group a row needs only the blocks holding keys the first computed token sees, from its
    first real block on: a row padded by two whole blocks (one in the first call) hits beside an unpadded one."""
    reference, paged = sliding_prefix_pair
    state = hf_paged.enable_prefix_caching(paged, block_size=4)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True, **mode)
    prompts = _sliding_prompt(9, seed=1), _sliding_prompt(5, seed=2), _sliding_prompt(13, seed=3)

    def null_pad_blocks(cache):
        sliding = _sliding_group(cache)
        for table, start in zip(sliding.manager.tables, sliding.manager.live_from, strict=True):
            assert table[:start // 4] == [NULL_BLOCK] * (start // 4)
        sliding.manager.check()

    _padded_calls_hit(reference, paged, state, prompts, SLIDING_SYSTEM, kwargs, null_pad_blocks)


@pytest.mark.parametrize("mode", [dict(), dict(num_beams=3, num_return_sequences=2)], ids=["greedy", "beams"])
# Llama 4: layer 0 chunked (chunks of 8 from each row's first real token), layer 1 full attention. gpt-oss: attention
# sinks on a sliding-window layer (window 6) and a full one.
@pytest.mark.parametrize("family", ["llama4_text", "gpt_oss"])
def test_chunks_and_sinks_hit_across_whole_pad_blocks(family, mode):
    """Chunked attention (chunks counted from each row's first real token) and attention sinks: a row padded by
    two whole blocks takes the blocks it was given with one block of padding, and eager's tokens come out."""
    reference, paged = model_pair(family, reference="eager")
    try:
        state = hf_paged.enable_prefix_caching(paged, block_size=4)
        kwargs = dict(max_new_tokens=6, min_new_tokens=6, return_dict_in_generate=True, **mode)
        prompts = tuple(system_prompt(24, suffix, seed) for suffix, seed in ((9, 1), (5, 2), (13, 3)))
        _padded_calls_hit(reference, paged, state, prompts, 24, kwargs)
    finally:
        hf_paged.disable_prefix_caching(paged)


def test_pools_of_another_model_are_refused(sliding_prefix_pair):
    _, paged = sliding_prefix_pair
    state = hf_paged.enable_prefix_caching(paged, block_size=4)
    other = config("llama", num_hidden_layers=3)
    other._attn_implementation = "hf_paged"
    with pytest.raises(ValueError, match="hf_paged: the shared pools given to this PagedCache"):
        PagedCache(other, pool=state.pools)


@pytest.mark.parametrize("family", ["mistral_window", "gemma2"])
def test_sliding_window_families_hit_and_match(family):
    """Families of the parity suite with sliding windows (Gemma 2's softcaps included): a second call hits the
    system prompt in every layer group and gives the reference's tokens."""
    reference, paged = model_pair(family)
    try:
        hf_paged.enable_prefix_caching(paged, block_size=4)
        kwargs = dict(max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True)
        paged.generate(_sliding_prompt(3, seed=1), **kwargs)
        gc.collect()
        ids = _sliding_prompt(6, seed=2)
        out = paged.generate(ids, **kwargs)
        assert out.past_key_values.stats().prefix_hit_tokens == SLIDING_SYSTEM
        assert any(group.window is not None for group in out.past_key_values.groups)
        assert torch.equal(out.sequences, reference.generate(ids, **kwargs).sequences)
    finally:
        hf_paged.disable_prefix_caching(paged)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text", "phimoe"])
def test_attention_features_hit_mid_sequence(family):
    """Attention sinks, chunks and a window given only by the mask function: a second call whose prompt starts with
    the first's blocks reuses them and attends from mid-sequence, with eager's tokens and logits."""
    reference, paged = model_pair(family, reference="eager")
    hf_paged.enable_prefix_caching(paged, block_size=4)
    try:
        for suffix_len, seed in ((5, 6), (11, 7)):
            ids = system_prompt(17, suffix_len, seed, system_seed=5)
            for mode in (dict(), dict(num_beams=2, num_return_sequences=2)):
                outputs = []
                for model in (reference, paged):
                    torch.manual_seed(0)
                    outputs.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                                  min_new_tokens=8, return_dict_in_generate=True, output_logits=True,
                                                  **mode))
                expected, got = outputs
                torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4,
                                           rtol=1e-4)
                assert torch.equal(got.sequences, expected.sequences), f"{family}/prefix/{suffix_len}: tokens differ"
                hits = got.past_key_values.stats().prefix_hit_tokens
                del got, outputs
                gc.collect()
        assert hits > 0
    finally:
        hf_paged.disable_prefix_caching(paged)
