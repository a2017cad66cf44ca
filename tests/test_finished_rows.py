"""Rows that have ended (EOS) stop growing: the padding generate feeds them takes no new block.

A SmolLM-like tiny Llama (tied embeddings), a left-padded batch, and an EOS id chosen from what the model really
generates so that rows end at different steps. Tokens must equal sdpa's and the cache must hold fewer blocks than
when every row stores its padding; a call that returns scores stores every row, and its scores equal sdpa's.
"""

from __future__ import annotations

import pytest
import torch
from conftest import _COMMON, left_padded_batch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_paged  # noqa: F401  (registers "hf_paged")
from hf_paged import PagedCache

NEW_TOKENS = 40
LENGTHS = [21, 9, 17, 4, 13, 30]


def _pair():
    config = dict(_COMMON, tie_word_embeddings=True)
    torch.manual_seed(3)
    reference = AutoModelForCausalLM.from_config(LlamaConfig(**config), attn_implementation="sdpa").eval()
    paged = AutoModelForCausalLM.from_config(LlamaConfig(**config), attn_implementation="hf_paged").eval()
    paged.load_state_dict(reference.state_dict())
    return reference, paged


def _eos_for(reference, batch) -> int:
    """A token the model generates early in most rows, at different steps: rows then end at different times."""
    out = reference.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0)
    new = out[:, batch["input_ids"].shape[1]:]
    first_steps = new[:, 2:NEW_TOKENS // 2]
    values, counts = torch.unique(first_steps, return_counts=True)
    return int(values[counts.argmax()])


@pytest.fixture(scope="module")
def setup():
    reference, paged = _pair()
    batch = left_padded_batch(LENGTHS, seed=5)
    eos = _eos_for(reference, batch)
    return reference, paged, batch, eos


def _run(model, batch, eos, **kwargs):
    return model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=0,
                          return_dict_in_generate=True, **kwargs)


def _end_steps(sequences: torch.Tensor, prompt_len: int, eos: int) -> list[int]:
    """Per row, the step of its EOS (or the last step)."""
    new = sequences[:, prompt_len:]
    return [int((row == eos).nonzero()[0]) if (row == eos).any() else new.shape[1] - 1 for row in new]


@pytest.mark.parametrize("block_size", [4, 16])
def test_ended_rows_take_no_new_blocks_and_tokens_match(setup, block_size):
    reference, paged, batch, eos = setup
    expected = _run(reference, batch, eos, output_scores=True)
    ends = _end_steps(expected.sequences, batch["input_ids"].shape[1], eos)
    assert len(set(ends)) > 2 and min(ends) < NEW_TOKENS // 2  # rows really end at different steps

    out = _run(paged, batch, eos, past_key_values=PagedCache(paged.config, block_size=block_size))
    assert torch.equal(out.sequences, expected.sequences)
    stats = out.past_key_values.stats()
    out.past_key_values.manager.check()
    assert out.past_key_values.manager.scratch is not None

    # A call that returns scores stores every row, so that the scores of ended rows (computed from their padding)
    # stay exactly sdpa's; this is also the block count of storing the padding.
    scored = _run(paged, batch, eos, output_scores=True,
                  past_key_values=PagedCache(paged.config, block_size=block_size))
    assert torch.equal(scored.sequences, expected.sequences)
    assert len(scored.scores) == len(expected.scores)
    for mine, theirs in zip(scored.scores, expected.scores, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert scored.past_key_values.manager.scratch is None
    old_stats = scored.past_key_values.stats()
    assert stats.logical_tokens == old_stats.logical_tokens  # the same rows, as long as a DynamicCache's
    assert stats.peak_used_blocks < old_stats.peak_used_blocks
    assert stats.used_blocks < old_stats.used_blocks


def test_rows_are_stored_when_no_eos_criterion_feeds_padding(setup):
    """Without an EOS criterion, a row a custom criterion ended keeps producing returned tokens: all are stored."""
    reference, paged, batch, _ = setup
    from transformers import StoppingCriteria, StoppingCriteriaList

    class EndRowZeroAfterFive(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            done[0] = input_ids.shape[1] - batch["input_ids"].shape[1] >= 5
            return done

    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                  return_dict_in_generate=True)
    generation = paged.generation_config
    eos, generation.eos_token_id = generation.eos_token_id, None
    reference.generation_config.eos_token_id = None
    try:
        expected = reference.generate(**batch, stopping_criteria=StoppingCriteriaList([EndRowZeroAfterFive()]),
                                      **kwargs)
        out = paged.generate(**batch, stopping_criteria=StoppingCriteriaList([EndRowZeroAfterFive()]), **kwargs)
    finally:
        generation.eos_token_id = reference.generation_config.eos_token_id = eos
    assert torch.equal(out.sequences, expected.sequences)
    assert out.past_key_values.manager.scratch is None


def test_beam_search_with_eos_matches(setup):
    """Beam search keeps only running beams in the cache (finished hypotheses live in generate's tensors)."""
    reference, paged, batch, eos = setup
    kwargs = dict(num_beams=3, num_return_sequences=2, max_new_tokens=12, eos_token_id=eos, pad_token_id=0,
                  return_dict_in_generate=True, output_scores=True)
    expected = reference.generate(**batch, **kwargs)
    out = paged.generate(**batch, **kwargs)
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(out.sequences_scores, expected.sequences_scores, rtol=1e-4, atol=1e-4)


def test_sampled_copies_with_eos_match(setup):
    """num_return_sequences copies of a prompt share its blocks; the ones that end early stop growing."""
    reference, paged, batch, eos = setup
    kwargs = dict(do_sample=True, num_return_sequences=4, max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                  pad_token_id=0, return_dict_in_generate=True)
    torch.manual_seed(11)
    expected = reference.generate(**batch, **kwargs)
    torch.manual_seed(11)
    out = paged.generate(**batch, **kwargs)
    assert torch.equal(out.sequences, expected.sequences)
    assert (expected.sequences[:, batch["input_ids"].shape[1]:] == eos).any(dim=1).sum() >= 2
    out.past_key_values.manager.check()
