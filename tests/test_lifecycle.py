"""Block lifecycle: what a cache holds after weights change, after a call fails, and when it is misused.

Each test is the regression test of a defect found by fuzzing: a prefix cache serving keys and values of old
weights, a failed call keeping its blocks for as long as its exception lives, a cache built for fewer layers than
the model, and a cache reused after `OutOfBlocksError`.
"""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_models import config, system_prompt
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged import OutOfBlocksError, PagedCache, compat

SYSTEM = 48
KWARGS = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True)


def _prompt(suffix_len: int, seed: int) -> torch.Tensor:
    return system_prompt(SYSTEM, suffix_len, seed)


def _generate(model, ids, **kwargs):
    return model.generate(ids, attention_mask=torch.ones_like(ids), **{**KWARGS, **kwargs})


def _changes(reference, paged, change) -> None:
    """After `change(paged)`, a prompt whose system blocks were cached gives the tokens of the new weights."""
    hf_paged.enable_prefix_caching(paged, block_size=16)
    _generate(paged, _prompt(5, seed=1))
    gc.collect()
    again = _generate(paged, _prompt(7, seed=2))
    assert again.past_key_values.stats().prefix_hit_tokens == SYSTEM  # the index works before the change
    del again
    gc.collect()
    change(paged)
    reference.load_state_dict(paged.state_dict())
    ids = _prompt(9, seed=3)
    out = _generate(paged, ids)
    assert out.past_key_values.stats().prefix_hit_tokens == 0
    assert torch.equal(out.sequences, _generate(reference, ids).sequences)
    del out
    gc.collect()
    after = _generate(paged, _prompt(4, seed=4))  # blocks computed with the new weights are found again
    assert after.past_key_values.stats().prefix_hit_tokens == SYSTEM
    assert torch.equal(after.sequences, _generate(reference, _prompt(4, seed=4)).sequences)


def test_prefix_cache_is_not_served_after_load_state_dict(prefix_pair):
    reference, paged = prefix_pair
    torch.manual_seed(7)
    other = AutoModelForCausalLM.from_config(config("llama"), attn_implementation="sdpa")
    _changes(reference, paged, lambda model: model.load_state_dict(other.state_dict()))


def test_prefix_cache_is_not_served_after_an_optimizer_step(prefix_pair):
    reference, paged = prefix_pair

    def step(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        ids = _prompt(5, seed=9)
        model.train()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()

    _changes(reference, paged, step)


def test_a_failed_call_releases_its_blocks_at_once(prefix_pair):
    reference, paged = prefix_pair
    state = hf_paged.enable_prefix_caching(paged, num_blocks=6, block_size=16)
    with pytest.raises(OutOfBlocksError) as info:  # `info` keeps the exception, and its traceback, alive
        _generate(paged, _prompt(20, seed=1), max_new_tokens=40, min_new_tokens=40)  # 68 tokens fit, 108 do not
    assert state.pool.blocks.num_free == state.pool.blocks.num_blocks  # free, or indexed and unreferenced
    state.pool.blocks.check()
    ids = _prompt(20, seed=2)  # 74 tokens: 5 of the 6 blocks, only there if the failed call let go of its own
    out = _generate(paged, ids)
    assert out.past_key_values.stats().prefix_hit_tokens == SYSTEM
    assert torch.equal(out.sequences, _generate(reference, ids).sequences)
    assert info.value.needed > info.value.free


def test_a_cache_built_for_fewer_layers_says_so(prefix_pair):
    _, paged = prefix_pair
    fewer = config("llama", num_hidden_layers=1)
    fewer._attn_implementation = "hf_paged"
    cache = PagedCache(fewer)
    ids = _prompt(2, seed=1)
    with pytest.raises(ValueError, match=r"hf_paged: layer 1 .* built for 1 layer\(s\).*PagedCache\(model.config\)"):
        _generate(paged, ids, past_key_values=cache)


def test_an_empty_cache_is_reusable_after_out_of_blocks(prefix_pair):
    reference, paged = prefix_pair
    cache = PagedCache(paged.config, num_blocks=5)
    with pytest.raises(OutOfBlocksError):  # 58 prompt tokens fit in 4 blocks; decoding runs out
        _generate(paged, _prompt(10, seed=1), past_key_values=cache, max_new_tokens=30, min_new_tokens=30)
    assert cache.manager.num_rows == 0 and cache.stats().used_blocks == 0  # the call gave its rows back
    small = _prompt(4, seed=3)
    out = _generate(paged, small, past_key_values=cache)  # no reset() needed
    assert torch.equal(out.sequences, _generate(reference, small).sequences)


def test_a_continued_cache_after_out_of_blocks_says_to_reset(prefix_pair):
    _, paged = prefix_pair
    cache = PagedCache(paged.config, num_blocks=5)
    ids = _prompt(10, seed=1)
    first = _generate(paged, ids, past_key_values=cache)
    with pytest.raises(OutOfBlocksError):
        _generate(paged, first.sequences, past_key_values=cache, max_new_tokens=40, min_new_tokens=40)
    with pytest.raises(ValueError, match=r"hf_paged: .*already holds \d+ tokens.*cache\.reset\(\)"):
        _generate(paged, first.sequences, past_key_values=cache)
    cache.reset()
    out = _generate(paged, ids, past_key_values=cache)
    assert torch.equal(out.sequences, first.sequences)


@pytest.mark.parametrize("settings", [dict(), dict(do_sample=True, num_return_sequences=2), dict(num_beams=2)],
                         ids=["greedy", "samples", "beams"])
def test_a_cache_refuses_input_with_other_tokens_than_it_holds(prefix_pair, settings):
    """Continuing a returned cache with input that is longer but starts with other tokens than the cache holds
    raises before anything is written (the prompt's tokens after any call; the sequences after greedy or sampled
    decoding), and the cache still continues with its own tokens as sdpa does."""
    reference, paged = prefix_pair
    ids = torch.cat([_prompt(3, seed=1), _prompt(3, seed=5)])
    torch.manual_seed(0)
    first = _generate(paged, ids, **settings)
    cache = compat.output_cache(first)
    held, rows = cache.get_seq_length(), cache.manager.num_rows
    sequences = first.sequences.shape[0] == rows and not settings.get("num_beams")
    known = first.sequences if sequences else ids.repeat_interleave(rows // len(ids), 0)
    extra = torch.randint(4, 90, (rows, held + 3 - known.shape[1]), generator=torch.Generator().manual_seed(2))
    for position in [3, held - 1] if sequences else [3]:  # beams: the cache knows its prompt's tokens
        other = known.clone()
        other[0, position] = other[0, position] % 90 + 4
        with pytest.raises(ValueError, match=rf"hf_paged: .*holds other tokens.*row 0 differs at position {position}"):
            _generate(paged, torch.cat([other, extra], dim=1), past_key_values=cache)
        assert cache.get_seq_length() == held and cache.manager.num_rows == rows
        cache.manager.check()
    if settings:
        return
    more = torch.cat([first.sequences, extra[:, :3]], dim=1)
    expected = _generate(reference, more, past_key_values=compat.output_cache(_generate(reference, ids)))
    assert torch.equal(_generate(paged, more, past_key_values=cache).sequences, expected.sequences)
