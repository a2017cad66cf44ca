"""The prompt is computed once per distinct prompt row, and its blocks are shared by the k copies."""

from __future__ import annotations

import pytest
import torch
from tiny_models import count_prefill_positions, left_padded_batch, model_pair

import hf_paged
from hf_paged import PagedCache
from hf_paged.compat import cache_kwargs

NEW = 12


@pytest.mark.parametrize(
    "mode",
    [
        dict(num_beams=4),
        dict(num_beams=3, num_return_sequences=3, do_sample=True, top_k=0),
        dict(do_sample=True, num_return_sequences=4, top_k=0),
        dict(num_beams=2, num_return_sequences=2, output_hidden_states=True, output_logits=True, output_scores=True),
    ],
    ids=["beams", "beam_sample", "sample_n", "beams_with_outputs"],
)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_is_computed_once_and_tokens_match(family, mode):
    reference, paged = model_pair(family)
    inputs = left_padded_batch([21, 9], seed=5)
    kwargs = dict(max_new_tokens=NEW, min_new_tokens=NEW, return_dict_in_generate=True, **mode)

    def generate(model):
        torch.manual_seed(7)
        return model.generate(**inputs, **kwargs)

    ref_positions, expected = count_prefill_positions(reference, lambda: generate(reference))
    positions, got = count_prefill_positions(paged, lambda: generate(paged))
    k = max(mode.get("num_beams", 1), mode.get("num_return_sequences", 1))
    assert ref_positions == 2 * k * 21  # Transformers computes the prompt k times...
    assert positions == 2 * 21  # ...hf_paged once per prompt row.
    assert torch.equal(got.sequences, expected.sequences)
    for name in ("scores", "logits", "hidden_states"):
        if getattr(expected, name, None) is not None:
            torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("prompt_len", [40, 45])
@pytest.mark.parametrize("mode", [dict(do_sample=True, num_return_sequences=8), dict(num_beams=8)],
                         ids=["sample8", "beams8"])
def test_shared_prompt_memory_bound(block_size, prompt_len, mode):
    _, paged = model_pair("llama")
    inputs = left_padded_batch([prompt_len], seed=9)
    cache = PagedCache(paged.config, block_size=block_size)
    torch.manual_seed(0)
    paged.generate(**inputs, **cache_kwargs(cache), max_new_tokens=NEW, min_new_tokens=NEW, **mode)
    stats = cache.stats()
    k = 8
    bound = prompt_len // block_size + k * -(-(prompt_len % block_size + NEW) // block_size) + 1
    assert stats.used_blocks <= stats.peak_used_blocks <= bound
    # The pool reserved nothing ahead: it holds at most one growth quantum (`KVPool.ensure_free`) beyond the
    # most its rows referenced.
    quantum = max(hf_paged.kinds.SLACK_BLOCKS_PER_ROW * k, stats.num_blocks // hf_paged.groups.SLAB_FRACTION)
    assert stats.num_blocks <= stats.peak_used_blocks + quantum
    assert stats.shared_blocks >= prompt_len // block_size  # the prompt's full blocks are stored once
    cache.manager.check()


def test_continuing_a_cache_with_beams_prefills_once():
    """A cache holding one row per prompt continues under beam search: the new tokens are computed once too."""
    reference, paged = model_pair("llama")
    inputs = left_padded_batch([17], seed=2)
    first = paged.generate(**inputs, max_new_tokens=3, min_new_tokens=3, return_dict_in_generate=True)
    more = torch.cat([first.sequences, torch.tensor([[5, 6, 7]])], dim=1)
    positions, got = count_prefill_positions(
        paged, lambda: paged.generate(more, **cache_kwargs(first.past_key_values), num_beams=3, max_new_tokens=5,
                                      min_new_tokens=5))
    assert positions == 4  # the last generated token (not yet cached) and the 3 new ones, once
    expected = reference.generate(more, num_beams=3, max_new_tokens=5, min_new_tokens=5)
    assert torch.equal(got, expected)
