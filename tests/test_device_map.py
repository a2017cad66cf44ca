"""Layers placed through ``device_map`` (accelerate hooks, disk offload): one pool per device-map entry, shared
block tables, tokens equal to sdpa + DynamicCache."""

from __future__ import annotations

import pytest
import torch
from tiny_models import config, left_padded_batch
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged.devices import layer_placements

LAYERS = 4
# Layers 0-1 stay in memory, layers 2-3 are offloaded to disk (their weights are loaded for each forward).
DEVICE_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
              **{f"model.layers.{i}": "cpu" if i < 2 else "disk" for i in range(LAYERS)}}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``(reference, mapped)``: the same random weights, in memory with sdpa, and device-mapped with hf_paged."""
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config("llama", num_hidden_layers=LAYERS),
                                                 attn_implementation="sdpa").eval()
    folder = tmp_path_factory.mktemp("device_map")
    reference.save_pretrained(folder / "model")
    mapped = AutoModelForCausalLM.from_pretrained(
        folder / "model", device_map=DEVICE_MAP, offload_folder=str(folder / "offload"), attn_implementation="hf_paged",
    ).eval()
    return reference, mapped


def test_layer_placements_follow_the_device_map(models):
    reference, mapped = models
    cpu = torch.device("cpu")
    assert layer_placements(mapped) == [("cpu", cpu), ("cpu", cpu), ("disk", cpu), ("disk", cpu)]
    assert layer_placements(reference) is None  # no device_map: one pool on model.device


@pytest.mark.parametrize("mode", ["greedy", "beams", "sample"])
def test_device_mapped_generate_matches_sdpa(models, mode):
    reference, mapped = models
    batch = left_padded_batch([21, 37, 18], seed=1)
    kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "pad_token_id": 0}
    kwargs |= {"beams": {"num_beams": 3, "num_return_sequences": 2}, "sample": {"do_sample": True,
               "num_return_sequences": 3, "top_k": 0}}.get(mode, {})
    outputs = []
    for model in (reference, mapped):
        torch.manual_seed(7)
        outputs.append(model.generate(**batch, **kwargs, return_dict_in_generate=True))
    expected, got = outputs
    assert torch.equal(got.sequences, expected.sequences)
    cache = got.past_key_values
    assert isinstance(cache, hf_paged.PagedCache)
    # One pool per device-map entry, each holding only its layers, all with the same blocks.
    assert len(cache.pools) == 2
    assert [pool.tensor.shape[0] for pool in cache.pools] == [2, 2]
    assert len({pool.tensor.shape[2] for pool in cache.pools}) == 1
    assert [pool.starts for pool in cache.pools][0] == cache.pools[1].starts  # the same slabs in both
    assert cache.stats().pool_bytes == sum(tensor.numel() * tensor.element_size() for pool in cache.pools
                                           for slab in pool.slabs for tensor in slab)
    if mode != "greedy":
        stats = cache.stats()  # the rows share prompt blocks, and copied the partial one in both pools
        assert stats.shared_blocks > 0 and stats.cow_copies > 0


def test_layer_devices_in_a_fixed_pool_and_bad_arguments():
    four = config("llama", num_hidden_layers=LAYERS)
    cache = hf_paged.PagedCache(four, num_blocks=8, layer_devices=[("a", "cpu"), ("a", "cpu"), "cpu", "cpu"])
    assert len(cache.pools) == 2 and cache.pools[0].blocks is cache.pools[1].blocks
    with pytest.raises(ValueError, match="hf_paged: layer_devices has 3 entries"):
        hf_paged.PagedCache(four, layer_devices=["cpu"] * 3)
    with pytest.raises(ValueError, match="hf_paged: layer_devices places"):
        hf_paged.PagedCache(four, max_memory="1MiB", layer_devices=["cpu"] * LAYERS)


def test_a_fixed_size_cache_placed_by_the_user(models):
    reference, mapped = models
    batch = left_padded_batch([30, 19], seed=2)
    cache = hf_paged.PagedCache(mapped.config, num_blocks=12, layer_devices=layer_placements(mapped))
    kwargs = {"max_new_tokens": 10, "min_new_tokens": 10, "pad_token_id": 0}
    expected = reference.generate(**batch, **kwargs)
    assert torch.equal(mapped.generate(**batch, **kwargs, past_key_values=cache), expected)
    assert [pool.tensor.shape[2] for pool in cache.pools] == [12, 12] and cache.stats().num_blocks == 12


def test_keys_on_another_device_than_their_pool_fail_clearly():
    cache = hf_paged.PagedCache(config("llama", num_hidden_layers=LAYERS), device="meta")
    keys = torch.zeros(1, 2, 3, 16)
    with pytest.raises(ValueError, match="hf_paged: layer 0 computes its keys on cpu, but its PagedCache pool is on meta"):
        cache.update(keys, keys, 0)
