"""Same tokens (and logits) as Transformers' own attention, family by family, across decoding modes and block sizes
that do and do not divide the left-padded prompts.

The plain families are compared with sdpa (eager for Gemma 2's softcap). The attention-feature families, whose
features reach hf_paged through the attention interface's kwargs or through the mask functions, are compared with
eager: attention sinks (``s_aux``: gpt-oss, Flint, Granite SWA), chunked attention (Llama 4's
``create_chunked_causal_mask``), sliding windows given only by the mask function (PhiMoE), by ``config.layer_types``
(Gemma 3, gpt-oss, Granite SWA) or by the ``sliding_window`` kwarg (Mistral), with windows and chunks shorter than
the prompts. Which read path a step takes is ``tests/test_attention.py``'s business; layer groups, MLA and hybrids,
prefill-once and prefix caching have files of their own.
"""

from __future__ import annotations

import pytest
import tiny_models
import torch
from tiny_models import FEATURE_FAMILIES, PARITY_FAMILIES, available, left_padded_batch, model_pair, random_draw

from hf_paged import PagedCache
from hf_paged.compat import cache_kwargs

NEW_TOKENS = 10
MODES = {
    "greedy": dict(do_sample=False),
    "beams": dict(num_beams=3, num_return_sequences=2, length_penalty=0.7, early_stopping=True),
    "sample": dict(do_sample=True, num_return_sequences=3, top_k=0),
    "beam_sample": dict(do_sample=True, num_beams=2, top_k=0),
}


@pytest.fixture(scope="module", params=PARITY_FAMILIES)
def pair(request):
    return request.param, *model_pair(request.param)


@pytest.fixture(scope="module", params=[family for family in FEATURE_FAMILIES if available(family)])
def feature_pair(request):
    return request.param, *model_pair(request.param, reference="eager")


def _generate(model, inputs, seed=0, new_tokens=NEW_TOKENS, **kwargs):
    torch.manual_seed(seed)
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("block_size", [None, 5])
def test_same_tokens_as_reference(pair, mode, block_size):
    family, reference, paged = pair
    # 37 tokens span 8 blocks of 5 (not dividing) and 3 blocks of 16; rows are left-padded to unequal lengths.
    inputs = left_padded_batch([37, 12, 26], seed=1)
    expected = _generate(reference, inputs, **MODES[mode])
    cache = {} if block_size is None else cache_kwargs(PagedCache(paged.config, block_size=block_size))
    got = _generate(paged, inputs, **MODES[mode], **cache)
    assert isinstance(got.past_key_values, PagedCache)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences), f"{family}/{mode}: tokens differ"
    got.past_key_values.manager.check()


@pytest.mark.parametrize("seed", range(48))
def test_random_settings_give_the_reference_tokens(pairs, seed):
    """A seeded random `generate()` call (`tiny_models.random_draw`: batch and padding, decoding mode and widths,
    early EOS, logits processors, prompt lookup, block size) on a parity or attention-feature family."""
    draw = random_draw(seed, PARITY_FAMILIES + FEATURE_FAMILIES)
    reference, paged = pairs(draw.family)
    expected = draw.reference_run(reference)
    got = draw.run(paged, cache_config={"block_size": draw.block_size})
    assert torch.equal(got, expected), f"tokens differ: {draw}"


@pytest.mark.parametrize("family", ["llama", "mistral_window", "gemma2"])
def test_prompt_without_padding_spanning_many_blocks(family):
    reference, paged = model_pair(family)
    inputs = left_padded_batch([70, 70], seed=3)
    expected = _generate(reference, inputs, num_beams=2)
    got = _generate(paged, inputs, num_beams=2, **cache_kwargs(PagedCache(paged.config, block_size=4)))
    assert torch.equal(got.sequences, expected.sequences)


@pytest.mark.parametrize("mode", list(tiny_models.MODES))
@pytest.mark.parametrize("block_size", [None, 4, 5])
def test_same_tokens_as_eager(feature_pair, mode, block_size):
    """The attention-feature families against eager."""
    family, reference, paged = feature_pair
    # Prompts longer than every window (6, 7) and chunk (8), left-padded to unequal lengths.
    inputs = left_padded_batch([21, 9, 15], seed=1)
    expected = _generate(reference, inputs, new_tokens=8, **tiny_models.MODES[mode])
    cache = {} if block_size is None else cache_kwargs(PagedCache(paged.config, block_size=block_size))
    got = _generate(paged, inputs, new_tokens=8, **tiny_models.MODES[mode], **cache)
    assert isinstance(got.past_key_values, PagedCache)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences), f"{family}/{mode}/{block_size}: tokens differ"
    got.past_key_values.manager.check()
