"""`PagedCache.layers[i].keys` / `.values` mean what they mean in Transformers: each row's keys, gathered."""

from __future__ import annotations

import pytest
import torch
from tiny_models import left_padded_batch, model_pair

from hf_paged import PagedCache


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
