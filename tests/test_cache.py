"""`PagedCache` as a `transformers.Cache`: its arguments (and ``generate(cache_config=...)``'s), `OutOfBlocksError`
from a fixed pool (message, consistency and reuse afterwards), a `PagedCache` handed to a model that does not run
``"hf_paged"``, misuse of an existing cache (batch size change, positive crop, another model's shapes, autograd),
its stats, and what its layers' ``keys`` / ``values`` mean. Errors must be clear (and leave the cache consistent),
never wrong tokens.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import assert_stats_consistent, config, left_padded_batch, model_pair, random_ids
from transformers import AutoModelForCausalLM, PretrainedConfig

import hf_paged
from hf_paged import OutOfBlocksError, PagedCache, compat
from hf_paged.compat import cache_kwargs, output_cache
from hf_paged.kv_pool import KVPool

# Bytes of one block of the tiny Llama below ("llama128") in float32:
# layers * (K, V) * block_size * kv_heads * head_dim * 4.
BLOCK_BYTES_16 = 2 * 2 * 16 * 2 * 16 * 4


def greedy(model, ids, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, **kwargs)


@pytest.fixture(scope="module")
def models():
    return model_pair("llama128")


# ------------------------------------------------------------------------------------ constructor arguments
@pytest.mark.parametrize("block_size", [0, -1, 1.5, "16", True, None], ids=repr)
def test_block_size_must_be_a_positive_int(models, block_size):
    _, paged = models
    with pytest.raises(ValueError, match="block_size"):
        PagedCache(paged.config, block_size=block_size)


@pytest.mark.parametrize("block_size", [1, 7, 16, 64])
def test_valid_block_sizes_are_accepted(models, block_size):
    _, paged = models
    assert PagedCache(paged.config, block_size=block_size).block_size == block_size


@pytest.mark.parametrize("num_blocks", [0, -1, 1.5, "4", True], ids=repr)
def test_num_blocks_must_be_a_positive_int(models, num_blocks):
    _, paged = models
    with pytest.raises(ValueError, match="num_blocks"):
        PagedCache(paged.config, num_blocks=num_blocks)


def test_num_blocks_and_max_memory_are_exclusive(models):
    _, paged = models
    with pytest.raises(ValueError, match="num_blocks or max_memory"):
        PagedCache(paged.config, num_blocks=4, max_memory="1MiB")


@pytest.mark.parametrize("max_memory", [0, -1, "", "abc", "12XB", "-5MiB", "0GB", True, False], ids=repr)
def test_max_memory_must_be_a_positive_size(models, max_memory):
    _, paged = models
    with pytest.raises(ValueError, match="max_memory"):
        PagedCache(paged.config, max_memory=max_memory)


@pytest.mark.parametrize(
    "max_memory, expected",
    [(4096, 4096), ("4096", 4096), ("1MiB", 2**20), ("2GB", 2 * 10**9), ("1.5 KiB", 1536), ("64kb", 64_000)],
)
def test_max_memory_sizes_are_parsed(models, max_memory, expected):
    _, paged = models
    assert PagedCache(paged.config, max_memory=max_memory).max_memory == expected


def test_max_memory_smaller_than_one_block(models):
    _, paged = models
    cache = PagedCache(paged.config, max_memory=BLOCK_BYTES_16 - 1)
    with pytest.raises(ValueError, match="max_memory") as info:
        greedy(paged, random_ids(1, 5, seed=1), **cache_kwargs(cache))
    assert str(BLOCK_BYTES_16) in str(info.value)


def test_cache_for_a_config_that_is_not_hf_paged(models):
    ref, _ = models
    with pytest.raises(ValueError, match="hf_paged"):
        PagedCache(ref.config)


def test_cache_for_a_config_without_layers():
    with pytest.raises(ValueError, match="num_hidden_layers"):
        PagedCache(PretrainedConfig())


# ----------------------------------------------------------------------------------------- OutOfBlocksError
@pytest.mark.parametrize(
    "pool, batch, prompt_len, new_tokens, extra",
    [
        (dict(num_blocks=2), 2, 20, 4, {}),  # the prompt itself does not fit
        (dict(num_blocks=5), 2, 20, 30, {}),  # fits at first, runs out while decoding
        (dict(max_memory=5 * BLOCK_BYTES_16 + 100), 2, 20, 30, {}),  # the same, sized in bytes
        (dict(num_blocks=5), 2, 40, 4, dict(prefill_chunk_size=8)),  # runs out in the middle of a chunked prefill
        (dict(num_blocks=4), 1, 20, 30, dict(num_beams=2, min_new_tokens=30)),  # beams: shared prompt, copy-on-write
    ],
    ids=["prefill", "decode", "max_memory", "chunked-prefill", "beams"],
)
def test_out_of_blocks(models, pool, batch, prompt_len, new_tokens, extra):
    ref, paged = models
    cache = PagedCache(paged.config, **pool)
    ids = random_ids(batch, prompt_len, seed=11)
    with pytest.raises(OutOfBlocksError) as info:
        greedy(paged, ids, max_new_tokens=new_tokens, **cache_kwargs(cache), **extra)
    error = info.value
    assert isinstance(error, RuntimeError)
    message = str(error)
    assert "hf_paged" in message
    assert error.needed > error.free
    assert f"needs {error.needed} more block" in message
    assert f"{error.free} of {error.num_blocks}" in message
    assert "num_blocks" in message and "max_memory" in message
    # The fixed pool did not grow, and the cache is consistent.
    assert cache.stats().num_blocks == error.num_blocks == pool.get("num_blocks", 5)
    assert_stats_consistent(cache)
    # ... and usable: reset, then a generate that fits gives sdpa's tokens.
    cache.reset()
    assert cache.stats().used_blocks == 0
    small = random_ids(1, 6, seed=12)
    out = greedy(paged, small, max_new_tokens=4, **cache_kwargs(cache), return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy(ref, small, max_new_tokens=4))
    assert out.past_key_values is cache
    assert cache.stats().num_blocks == error.num_blocks
    assert_stats_consistent(cache)


def test_out_of_blocks_is_raised_before_anything_is_written(models):
    _, paged = models
    cache = PagedCache(paged.config, num_blocks=4)
    with torch.no_grad():
        paged(random_ids(2, 20, seed=21), **cache_kwargs(cache))  # 2 rows x 2 blocks: the pool is full
        for step in range(12):  # positions 20..31 still fit in the rows' second blocks
            paged(random_ids(2, 1, seed=22 + step), **cache_kwargs(cache))
        pool_before = cache.kv_pool.clone()
        tables_before = [list(t) for t in cache.manager.tables]
        with pytest.raises(OutOfBlocksError):
            paged(random_ids(2, 1, seed=40), **cache_kwargs(cache))  # position 32 needs a third block per row
    assert torch.equal(cache.kv_pool, pool_before)
    assert cache.manager.tables == tables_before
    assert cache.manager.lengths == [32, 32]
    assert cache.get_seq_length() == 32
    assert_stats_consistent(cache)
    # Still usable after making room.
    cache.crop(-4)
    with torch.no_grad():
        paged(random_ids(2, 1, seed=41), **cache_kwargs(cache))
    assert cache.manager.lengths == [29, 29]
    assert_stats_consistent(cache)


def test_a_step_that_fits_does_not_raise(models):
    _, paged = models
    cache = PagedCache(paged.config, num_blocks=3)
    with torch.no_grad():
        paged(random_ids(1, 20, seed=51), **cache_kwargs(cache))  # 2 blocks, the second partly filled
        cache.batch_repeat_interleave(2)  # two rows share both blocks; 1 block free
        # Writing one token per row copies the shared tail once (the second row keeps the original): 1 block.
        paged(random_ids(2, 1, seed=52), **cache_kwargs(cache))
    stats = cache.stats()
    assert stats.cow_copies == 1 and stats.free_blocks == 0
    assert_stats_consistent(cache)


def test_growing_pool_out_of_device_memory(models, monkeypatch):
    """A growable pool whose growth hits OutOfMemoryError raises OutOfBlocksError saying so, and stays usable."""
    ref, paged = models
    original = KVPool.resize

    def resize_or_oom(self, num_blocks):
        if num_blocks > 2:
            raise torch.OutOfMemoryError("injected: no memory for more blocks")
        return original(self, num_blocks)

    monkeypatch.setattr(KVPool, "resize", resize_or_oom)
    cache = PagedCache(paged.config)
    ids = random_ids(2, 12, seed=45)
    with pytest.raises(OutOfBlocksError, match="ran out of device memory") as info:
        greedy(paged, ids, max_new_tokens=30, **cache_kwargs(cache))
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert "num_blocks" in str(info.value) and "max_memory" in str(info.value)
    assert cache.stats().num_blocks == 2
    assert_stats_consistent(cache)
    monkeypatch.setattr(KVPool, "resize", original)
    cache.reset()
    out = greedy(paged, ids, max_new_tokens=8, **cache_kwargs(cache))
    assert torch.equal(out, greedy(ref, ids, max_new_tokens=8))
    assert_stats_consistent(cache)


# --------------------------------------------------------------------------- a PagedCache in the wrong model
def test_paged_cache_passed_to_an_sdpa_model_generate(models):
    ref, paged = models
    cache = PagedCache(paged.config)
    with pytest.raises(ValueError, match="hf_paged") as info:
        greedy(ref, random_ids(1, 8, seed=61), **cache_kwargs(cache))
    assert "attn_implementation" in str(info.value)
    assert cache.stats().used_blocks == 0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "num_layers, block_size",
    [(2, 16), (2, 4), (1, 4), (1, 16)],
    ids=["2-layers-block16", "2-layers-block4", "1-layer-block4", "1-layer-block16"],
)
def test_direct_forward_of_a_non_paged_model_with_a_paged_cache(num_layers, block_size, attention):
    """Never logits computed from a block pool taken for keys: a RuntimeError naming hf_paged instead.

    (With 4 heads and block_size 4, a ``[N, bs, Hkv, D]`` pool has a shape sdpa accepts as ``[B, H, kv, D]``.)
    """
    _, paged = model_pair("llama128", seed=3, num_hidden_layers=num_layers)
    other = AutoModelForCausalLM.from_config(config("llama128", num_hidden_layers=num_layers),
                                             attn_implementation=attention).eval()
    cache = PagedCache(paged.config, block_size=block_size)
    ids = random_ids(1, 3, seed=71)
    with torch.no_grad(), pytest.raises(RuntimeError, match="hf_paged"):
        other(ids, **cache_kwargs(cache), use_cache=True)
    # A second forward on the same cache does not give logits either.
    with torch.no_grad(), pytest.raises(RuntimeError, match="hf_paged"):
        other(random_ids(1, 1, seed=72), **cache_kwargs(cache), use_cache=True)


# ------------------------------------------------------------------------------------ misuse of a live cache
def test_batch_size_change_with_an_existing_cache(models):
    ref, paged = models
    ids = random_ids(2, 10, seed=101)
    first = greedy(paged, ids, max_new_tokens=3, return_dict_in_generate=True)
    cache = first.past_key_values
    before = cache.stats()
    with pytest.raises(ValueError, match="holds 2 sequences.*batch of 3"):
        greedy(paged, random_ids(3, 16, seed=102), **cache_kwargs(cache))
    with torch.no_grad(), pytest.raises(ValueError, match="reset"):
        paged(random_ids(3, 1, seed=103), **cache_kwargs(cache))
    assert cache.stats() == before
    assert_stats_consistent(cache)
    # The same cache still continues the original batch exactly as sdpa's DynamicCache does.
    ref_first = greedy(ref, ids, max_new_tokens=3, return_dict_in_generate=True)
    more = random_ids(2, 2, seed=104)
    expected = greedy(ref, torch.cat([ref_first.sequences, more], 1), **cache_kwargs(ref_first.past_key_values))
    got = greedy(paged, torch.cat([first.sequences, more], 1), **cache_kwargs(cache))
    assert torch.equal(got, expected)


def test_crop_with_a_positive_value(models):
    _, paged = models
    cache = greedy(paged, random_ids(2, 10, seed=111), return_dict_in_generate=True).past_key_values
    before = cache.stats()
    if compat.CROP_TAKES_LENGTH:  # 5.0: a positive value is the length to keep, as DynamicCache takes it there
        cache.crop(before.logical_tokens // 2 + 5)  # longer than the cache: nothing changes
        assert cache.stats() == before
    else:
        with pytest.raises(ValueError, match="positive"):
            cache.crop(3)
    cache.crop(0)
    assert cache.stats() == before
    cache.crop(-4)
    assert cache.get_seq_length() == before.logical_tokens // 2 - 4
    assert_stats_consistent(cache)


def test_reorder_with_an_out_of_range_row(models):
    _, paged = models
    cache = greedy(paged, random_ids(2, 10, seed=121), return_dict_in_generate=True).past_key_values
    before = cache.stats()
    with pytest.raises(IndexError):
        cache.reorder_cache(torch.tensor([0, 2]))
    assert cache.stats() == before
    assert_stats_consistent(cache)


@pytest.mark.parametrize("first_family", ["llama128", "llama"])
def test_cache_reused_by_a_model_with_other_kv_shapes(first_family):
    """A reset cache reused by a model whose layers have other KV shapes gives those layers tensors of their own
    (as for Gemma 4's wider layers), each as the first step reaches it, after earlier layers of the same step have
    read their rows in place: each layer reads its own keys, never views of the tensors as they were before
    (`KVPool.rows_in_place`, valid until the next bind), and the tokens are those of a fresh cache."""
    _, first = model_pair(first_family)
    cache = PagedCache(first.config)
    greedy(first, random_ids(1, 8, seed=131), **cache_kwargs(cache))
    cache.reset()
    reference, other = model_pair("llama128", seed=4, num_key_value_heads=4)
    ids = random_ids(1, 8, seed=132)
    assert torch.equal(greedy(other, ids, **cache_kwargs(cache)), greedy(reference, ids))
    assert set(cache.pool.own) == set(range(len(cache.pool.plain)))  # every layer has tensors of its own now
    assert cache.groups[0].step.first_block is not None  # a single row's blocks, read in place
    cache.manager.check()


def test_generate_sizes_the_cache_it_builds_from_cache_config(models):
    """``generate(cache_config={...})`` (Transformers' place for the cache's arguments) sizes the `PagedCache` the
    call builds; other keys, and a model whose caches share the prefix cache's pools, are refused saying what to do."""
    ref, paged = models
    ids = random_ids(2, 10, seed=151)
    out = greedy(paged, ids, cache_config={"block_size": 4, "num_blocks": 12}, return_dict_in_generate=True)
    assert torch.equal(out.sequences, greedy(ref, ids))
    cache = output_cache(out)
    assert cache.block_size == 4 and cache.stats().num_blocks == 12
    with pytest.raises(ValueError, match=r"cache_config.* block_size, num_blocks, max_memory, kv_dtype; got \['nbits'\]"):
        greedy(paged, ids, cache_config={"nbits": 4})
    hf_paged.enable_prefix_caching(paged)
    try:
        with pytest.raises(ValueError, match=r"prefix caching.*enable_prefix_caching\(model, block_size="):
            greedy(paged, ids, cache_config={"block_size": 4})
    finally:
        hf_paged.disable_prefix_caching(paged)


def test_stats_of_a_fixed_pool_show_its_size_before_the_first_write(models):
    """``stats()`` of ``PagedCache(num_blocks=n)`` reports n blocks (all free) before anything is written, and the
    same n after the first write."""
    _, paged = models
    cache = PagedCache(paged.config, block_size=16, num_blocks=7)
    before = cache.stats()
    assert (before.num_blocks, before.free_blocks, before.used_blocks) == (7, 7, 0)
    greedy(paged, random_ids(1, 5, seed=141), max_new_tokens=2, **cache_kwargs(cache))
    after = cache.stats()
    assert after.num_blocks == 7 and after.free_blocks + after.used_blocks == 7


def test_a_forward_under_autograd_is_refused_before_anything_is_written(models):
    """Keys that require grad cannot go through blocks written in place: a clear error, the cache untouched and
    usable under no_grad, and the model still trainable without a PagedCache."""
    ref, paged = models
    ids = random_ids(1, 9, seed=40)
    cache = PagedCache(paged.config, block_size=4)
    with pytest.raises(RuntimeError, match="hf_paged: layer 0 stored keys that require grad.*torch.no_grad"):
        paged(ids, past_key_values=cache)
    assert cache.stats().used_blocks == 0 and cache.get_seq_length() == 0
    with torch.no_grad():
        got = paged(ids, past_key_values=cache).logits
        expected = ref(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    loss = paged(ids, use_cache=False).logits.sum()
    loss.backward()
    assert paged.model.embed_tokens.weight.grad is not None
    paged.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ the layers' keys and values
# `PagedCache.layers[i].keys` / `.values` mean what they mean in Transformers: each row's keys, gathered.
@pytest.mark.parametrize("family", ["llama", "gemma"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_layer_keys_and_values_match_dynamic_cache(family, num_beams):
    reference, paged = model_pair(family)
    batch = left_padded_batch([21, 9, 14])
    kwargs = dict(max_new_tokens=5, do_sample=False, num_beams=num_beams, return_dict_in_generate=True)
    with torch.no_grad():
        expected = reference.generate(**batch, **kwargs)
        got = paged.generate(**batch, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    cache, dynamic = got.past_key_values, expected.past_key_values
    assert isinstance(cache, PagedCache) and type(dynamic).__name__ == "DynamicCache"
    assert len(cache.layers) == len(dynamic.layers)
    for layer, dynamic_layer in zip(cache.layers, dynamic.layers, strict=True):
        for name in ("keys", "values"):
            mine, theirs = getattr(layer, name), getattr(dynamic_layer, name)
            assert mine.shape == theirs.shape  # [B * num_beams, Hkv, seq, D]
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        assert layer.get_seq_length() == dynamic_layer.get_seq_length()


def test_layer_pools_keep_their_own_names(llama_pair):
    _, paged = llama_pair
    with torch.no_grad():
        out = paged.generate(**left_padded_batch([20, 7]), max_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
    cache = out.past_key_values
    layer = cache.layers[1]
    assert layer.key_pool.shape == layer.value_pool.shape == cache.kv_pool.shape[2:]  # [N, bs, Hkv, D]
    assert layer.key_pool.data_ptr() == cache.kv_pool[1, 0].data_ptr()
    keys = layer.keys
    keys.zero_()  # a gather: writing into it leaves the cache alone
    assert layer.keys.abs().sum() > 0


def test_layer_keys_before_the_first_write():
    _, paged = model_pair("llama")
    cache = PagedCache(paged.config)
    assert cache.layers[0].keys is None and cache.layers[0].value_pool is None
