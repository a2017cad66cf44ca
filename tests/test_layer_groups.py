"""Layer groups: sliding-window layers hold only their window, left padding takes no block (issue 10, items 1-2).

Every check compares with Transformers itself (sdpa, whose `DynamicCache` keeps only the window of sliding layers)
and counts the blocks the cache's rows reference.
"""

from __future__ import annotations

import copy

import families
import pytest
import tiny_models
import torch
from tiny_models import VOCAB, left_padded_batch, model_pair, system_prompt
from transformers import DynamicCache

import hf_paged
from hf_paged import PagedCache, compat
from hf_paged.block_manager import NULL_BLOCK

WINDOW = 8
NEW_TOKENS = 12
MODES = {**tiny_models.MODES, "sample": dict(tiny_models.MODES["sample"], num_return_sequences=2)}  # 2 samples


@pytest.fixture(scope="module")
def sliding_pair():
    """3 sliding-window layers (window `WINDOW`) to 1 full one, against sdpa."""
    return model_pair("gemma3_groups")


def _generate(model, inputs, new_tokens=NEW_TOKENS, **kwargs):
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


def _cache(output) -> PagedCache:
    cache = compat.output_cache(output)
    assert isinstance(cache, PagedCache)
    return cache


def _blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def test_sliding_layers_get_a_group_of_their_own(sliding_pair):
    _, paged = sliding_pair
    cache = PagedCache(paged.config, block_size=4)
    assert [group.window for group in cache.groups] == [None, WINDOW]
    assert [group.pool.num_layers for group in cache.groups] == [1, 3]
    assert cache.layer_groups[3] is cache.groups[0] and cache.layer_groups[0] is cache.groups[1]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("block_size", [3, 4, 16])
def test_sliding_window_model_matches_sdpa(sliding_pair, mode, block_size):
    """Prompts longer than the window, left-padded to unequal lengths, block sizes that do and do not divide them."""
    reference, paged = sliding_pair
    inputs = left_padded_batch([29, 7, 18], seed=1)
    expected = _generate(reference, inputs, **MODES[mode])
    got = _generate(paged, inputs, **MODES[mode], **compat.cache_kwargs(PagedCache(paged.config,
                                                                                   block_size=block_size)))
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences)
    cache = _cache(got)
    cache.manager.check()
    sliding = cache.groups[1].manager
    sliding.check()
    length = inputs["input_ids"].shape[1] + NEW_TOKENS - 1
    # Each row keeps the blocks of its last WINDOW - 1 keys: everything before is released.
    for table, live in zip(sliding.tables, sliding.live_from, strict=True):
        assert live >= length - WINDOW  # the last step's first query saw keys from there on
        real = [block for block in table if block != NULL_BLOCK]
        assert len(real) <= _blocks(WINDOW, block_size) + 1
    assert sliding.num_used <= sliding.num_rows * (_blocks(WINDOW, block_size) + 1)


def test_a_long_prefill_stores_only_the_window(sliding_pair):
    """The prompt's keys of sliding layers are attended as computed; only the last WINDOW - 1 are stored, so the
    sliding group never holds the prompt."""
    reference, paged = sliding_pair
    inputs = {"input_ids": torch.randint(3, VOCAB, (1, 100), generator=torch.Generator().manual_seed(3))}
    cache = PagedCache(paged.config, block_size=4)
    expected = _generate(reference, inputs, new_tokens=4)
    got = _generate(paged, inputs, new_tokens=4, **compat.cache_kwargs(cache))
    assert torch.equal(got.sequences, expected.sequences)
    sliding = cache.groups[1]
    assert sliding.pool.peak_blocks <= _blocks(WINDOW, 4) + 2  # not the 25 blocks of the prompt
    assert cache.groups[0].manager.num_used == _blocks(103, 4)


def test_a_continued_cache_attends_over_the_kept_window(sliding_pair):
    """A second call that continues the returned cache with a message longer than the window (a multi-token step
    with kept keys before it) gives what sdpa gives continuing its own DynamicCache."""
    reference, paged = sliding_pair
    first = {"input_ids": torch.randint(3, VOCAB, (1, 23), generator=torch.Generator().manual_seed(5))}
    message = torch.randint(3, VOCAB, (1, 19), generator=torch.Generator().manual_seed(6))
    results = []
    for model, cache in ((reference, None), (paged, PagedCache(paged.config, block_size=4))):
        kwargs = {} if cache is None else compat.cache_kwargs(cache)
        out = _generate(model, first, new_tokens=5, **kwargs)
        follow = {"input_ids": torch.cat([out.sequences, message], dim=1)}
        results.append(_generate(model, follow, new_tokens=6, **compat.cache_kwargs(compat.output_cache(out))))
    expected, got = results
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences)


def test_assisted_decoding_keeps_the_window_until_crop(sliding_pair):
    """Prompt-lookup decoding rolls the cache back: keys are kept until each crop, and the tokens are sdpa's greedy
    ones (what greedy assisted decoding must give; Transformers 5.0's own sliding-window cache refuses this crop)."""
    reference, paged = sliding_pair
    pattern = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(7))
    inputs = {"input_ids": pattern.repeat(1, 4)}
    expected = reference.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    got = paged.generate(**inputs, max_new_tokens=16, min_new_tokens=16, prompt_lookup_num_tokens=3, do_sample=False)
    assert torch.equal(got, expected)


def test_deepcopy_of_a_sliding_window_prompt_cache(sliding_pair):
    """Transformers' prompt-reuse recipe on a model with layer groups: each group's blocks are copied into a pool of
    the copy's own (null entries and live starts kept), the copies give sdpa's tokens and the original is untouched."""
    reference, paged = sliding_pair
    shared = torch.randint(3, VOCAB, (1, 21), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref_cache = reference(shared, **compat.cache_kwargs(DynamicCache(config=reference.config))).past_key_values
        cache = paged(shared, **compat.cache_kwargs(PagedCache(paged.config, block_size=4))).past_key_values
    assert cache.groups[1].manager.tables[0][0] == NULL_BLOCK  # the window's blocks only
    before = [(list(g.manager.tables[0]), list(g.manager.live_from)) for g in cache.groups]
    for length in (3, 11):
        ids = torch.cat([shared, torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))],
                        dim=1)
        expected = _generate(reference, {"input_ids": ids}, **compat.cache_kwargs(copy.deepcopy(ref_cache)))
        copied = copy.deepcopy(cache)
        for mine, original in zip(copied.groups, cache.groups, strict=True):
            assert mine.pool is not original.pool and mine.manager.live_from == original.manager.live_from
            assert [b == NULL_BLOCK for b in mine.manager.tables[0]] == [b == NULL_BLOCK for b in
                                                                        original.manager.tables[0]]
        got = _generate(paged, {"input_ids": ids}, **compat.cache_kwargs(copied))
        assert torch.equal(got.sequences, expected.sequences)
        for group in copied.groups:
            group.manager.check()
    assert [(list(g.manager.tables[0]), list(g.manager.live_from)) for g in cache.groups] == before


@torch.no_grad()
def test_crop_past_released_keys_says_what_to_do(sliding_pair):
    _, paged = sliding_pair
    cache = PagedCache(paged.config, block_size=4)
    ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(8))
    paged(input_ids=ids, **compat.cache_kwargs(cache))
    paged(input_ids=ids[:, :1], **compat.cache_kwargs(cache))
    with pytest.raises(RuntimeError, match="activate_past_recording"):
        cache.crop(-5)
    assert cache.get_seq_length() == 31  # nothing changed
    cache.reset()
    cache.activate_past_recording()
    paged(input_ids=ids, **compat.cache_kwargs(cache))
    paged(input_ids=ids[:, :3], **compat.cache_kwargs(cache))
    cache.crop(-2)
    assert cache.get_seq_length() == 31
    # After the crop only the window is kept, as Transformers' sliding layers keep it.
    assert min(cache.groups[1].manager.live_from) == 31 - WINDOW + 1
    cache.groups[1].manager.check()


@pytest.mark.parametrize("block_size", [4, 5])
def test_left_padding_takes_no_block(llama_pair, block_size):
    """Each row's blocks start at the block of its first real token: pad-only blocks are never allocated."""
    reference, paged = llama_pair
    lengths = [31, 6, 17]
    inputs = left_padded_batch(lengths, seed=2)
    expected = _generate(reference, inputs)
    cache = PagedCache(paged.config, block_size=block_size)
    got = _generate(paged, inputs, **compat.cache_kwargs(cache))
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences)
    width, total = max(lengths), max(lengths) + NEW_TOKENS - 1
    expected_blocks = sum(_blocks(total, block_size) - (width - length) // block_size for length in lengths)
    assert cache.manager.num_used == expected_blocks
    for table, length in zip(cache.manager.tables, lengths, strict=True):
        pads = (width - length) // block_size
        assert table[:pads] == [NULL_BLOCK] * pads and NULL_BLOCK not in table[pads:]
    cache.manager.check()


def test_left_padded_beams_share_and_match(llama_pair):
    reference, paged = llama_pair
    inputs = left_padded_batch([26, 3], seed=4)
    expected = _generate(reference, inputs, **MODES["beams"])
    cache = PagedCache(paged.config, block_size=4)
    got = _generate(paged, inputs, **MODES["beams"], **compat.cache_kwargs(cache))
    assert torch.equal(got.sequences, expected.sequences)
    assert cache.stats().used_bytes < cache.stats().logical_bytes
    cache.manager.check()


def test_layers_of_another_shape_get_a_group_not_unused_rows():
    """Gemma 4's full-attention layers have wider heads than its sliding ones: being in another group, each pool's
    tensors have its layers' shape, and no layer needs tensors of its own (a row left unused in the shared ones)."""
    if "gemma4_text" not in families.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip("this Transformers has no Gemma 4")
    model = families._load("gemma4_text", families.tiny_config("gemma4_text"), "hf_paged")
    cache = _cache(families._generate(model, families._batch()))
    widths = {group.window: group.pool.tensors[0].shape[-1] for group in cache.groups}
    assert None in widths and len(widths) == 2 and len(set(widths.values())) == 2, widths
    assert all(not group.pool.own for group in cache.groups)


def test_peaks_never_fall_below_what_is_used(sliding_pair):
    """Groups of different bytes per block (3 sliding layers, 1 full) reach their block and byte peaks at different
    steps: each peak is kept on its own, so neither ever reads below the current use (with prefix caching and a
    continued cache, where the sliding group releases blocks as the full group grows)."""
    _, paged = sliding_pair
    hf_paged.enable_prefix_caching(paged, block_size=4)
    try:
        inputs = left_padded_batch([30, 19], seed=7)
        first = _generate(paged, inputs, new_tokens=6)
        cache = _cache(first)
        assert len({group.bytes_per_block for group in cache.groups}) == 2
        again = _generate(paged, inputs, new_tokens=6)  # prefix hits: mapped blocks before the prefill's step
        more = torch.cat([first.sequences, left_padded_batch([9, 9], seed=8)["input_ids"]], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, more.shape[1] - inputs["attention_mask"].shape[1],
                                                               dtype=torch.long)], dim=1)
        second = _generate(paged, {"input_ids": more, "attention_mask": mask}, new_tokens=6,
                           **compat.cache_kwargs(cache))
        for output in (first, again, second):
            stats = _cache(output).stats()
            assert stats.peak_used_blocks >= stats.used_blocks, stats
            assert stats.peak_used_bytes >= stats.used_bytes, stats
    finally:
        hf_paged.disable_prefix_caching(paged)


# KV sharing (issue 18, item 3): Gemma 3n and Gemma 4's last `num_kv_shared_layers` layers store no keys and attend
# over those of the last earlier layer of their kind (the default of real Gemma 3n / small Gemma 4 checkpoints).
# Gemma 4 gives those layers only the prompt's last query in a prefill and slices the masks to it.
@pytest.fixture(scope="module", params=["gemma3n", "gemma4"])
def kv_shared_pair(request):
    """Layers 3-5 read layers 1 and 2 (sliding, sliding, full twice; window `WINDOW`), against eager."""
    if request.param == "gemma4" and compat.TRANSFORMERS_VERSION < (5, 17):
        pytest.skip("this Transformers has no Gemma 4")
    return model_pair(f"{request.param}_kv_shared")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("lengths", [[21, 10, 15], [12, 5, 9]], ids=["long", "short"])
def test_kv_shared_layers_match_eager(kv_shared_pair, mode, block_size, lengths):
    """Left-padded prompts longer than the window (a prefill that stores only the window's tokens in the sliding
    group; the short ones' prefill reads the full group's keys as one block range, `ops.range_attention`): greedy,
    beams and samples give eager's tokens, and the shared layers have no pool of their own."""
    reference, paged = kv_shared_pair
    inputs = left_padded_batch(lengths, seed=5)
    expected = _generate(reference, inputs, **MODES[mode])
    got = _generate(paged, inputs, **MODES[mode], **compat.cache_kwargs(PagedCache(paged.config,
                                                                                   block_size=block_size)))
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    cache = _cache(got)
    assert [type(layer).__name__ for layer in cache.layers[3:]] == ["KVSharedLayer"] * 3
    assert sum(group.pool.num_layers for group in cache.groups) == 3  # layers 0-2 store, 3-5 read
    assert cache.groups[1].window == WINDOW
    if block_size < WINDOW:  # the sliding group keeps only the blocks of its window
        assert cache.groups[1].manager.num_used < cache.manager.num_used
    for group in cache.groups:
        group.manager.check()


def test_family_walk_keeps_the_default_kv_sharing():
    """The family walk's tiny Gemma 3n keeps KV sharing on (its default), and a PagedCache gives its shared layers
    no pool."""
    if compat.TRANSFORMERS_VERSION < (5, 17):
        pytest.skip("the family walk's tiny configs need Transformers 5.17 or later")
    config = families.tiny_config("gemma3n_text")
    assert 0 < config.num_kv_shared_layers < config.num_hidden_layers
    cache = PagedCache(config)
    shared = [layer.layer_idx for layer in cache.layers if type(layer).__name__ == "KVSharedLayer"]
    assert len(shared) == config.num_kv_shared_layers
    assert sum(group.pool.num_layers for group in cache.groups) == config.num_hidden_layers - len(shared)


def test_kv_shared_layers_read_prefix_cache_hits(kv_shared_pair):
    """With prefix caching, the second call computes only its suffix; the shared layers read the mapped blocks."""
    reference, paged = kv_shared_pair
    hf_paged.enable_prefix_caching(paged, block_size=4)
    try:
        for call, seed in enumerate((1, 2)):
            ids = system_prompt(20, 5, seed)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            expected = _generate(reference, inputs, new_tokens=5, do_sample=False)
            got = _generate(paged, inputs, new_tokens=5, do_sample=False)
            assert torch.equal(got.sequences, expected.sequences)
            assert _cache(got).stats().prefix_hit_tokens == 20 * call
    finally:
        hf_paged.disable_prefix_caching(paged)


def test_kv_shared_pool_stays_on_its_device(kv_shared_pair):
    """Gemma 3n / 4 before 5.25 move a shared layer's keys to its queries' device: a no-op passes, a move (a shared
    layer placed on another device than the layer it reads) says what to do."""
    _, paged = kv_shared_pair
    cache = PagedCache(paged.config, block_size=4)
    states = torch.randn(1, 2, 3, 16)
    key_pool, _ = cache.update(states, states, 0)
    assert key_pool.to(key_pool.device) is key_pool
    with pytest.raises(RuntimeError, match=r"hf_paged: .* KV-shared layer .* another device .* one device"):
        key_pool.to("meta")
