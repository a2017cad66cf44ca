"""The rows' lifecycle: what a cache holds after weights change, after a call fails, when it is misused, and when
rows end.

The first tests are regression tests of defects found by fuzzing: a prefix cache serving keys and values of old
weights, a failed call keeping its blocks for as long as its exception lives, a cache built for fewer layers than
the model, and a cache reused after `OutOfBlocksError`.

Then rows that have ended (EOS) stop growing: the padding generate feeds them takes no new block, and a row holding
only blocks of its own gives them back. A SmolLM-like tiny Llama (tied embeddings), a left-padded batch, and an EOS
id chosen from what the model really generates so that rows end at different steps. Tokens must equal sdpa's. That
holds only in a cache the call builds and drops (its stats come from `hf_paged.recorded_stats`); a cache that
outlives the call (passed in, or returned with ``return_dict_in_generate``) stores every row as a DynamicCache does,
so that it can be continued exactly.
"""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_models import config, left_padded_batch, model_pair, system_prompt, watch_steps
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


# ------------------------------------------------------------------------------------- rows that end (EOS)
NEW_TOKENS = 40
LENGTHS = [21, 9, 17, 4, 13, 30]


def _eos_for(reference, batch, seed: int = 0, **kwargs) -> int:
    """A token the model generates early in most rows, at different steps: rows then end at different times."""
    kwargs.setdefault("do_sample", False)
    torch.manual_seed(seed)
    out = reference.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0, **kwargs)
    new = out[:, batch["input_ids"].shape[1]:]
    first_steps = new[:, 2:NEW_TOKENS // 2]
    values, counts = torch.unique(first_steps, return_counts=True)
    return int(values[counts.argmax()])


@pytest.fixture(scope="module")
def setup():
    reference, paged = model_pair("llama", seed=3, tie_word_embeddings=True)  # tied embeddings, as SmolLM's
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


def _live_blocks(sequences: torch.Tensor, attention_mask: torch.Tensor, rows: list[int], block_size: int) -> int:
    """Blocks the given rows of a finished call hold: from each row's first real token's block to its end."""
    length = sequences.shape[1] - 1  # the last token generated is never fed back
    starts = (attention_mask == 0).sum(dim=1).tolist()
    return sum(-(-length // block_size) - starts[row] // block_size for row in rows)


@pytest.mark.parametrize("block_size", [4, 16])
def test_ended_rows_give_their_blocks_back_and_tokens_match(setup, block_size):
    reference, paged, batch, eos = setup
    expected = _run(reference, batch, eos)
    prompt_len = batch["input_ids"].shape[1]
    ends = _end_steps(expected.sequences, prompt_len, eos)
    assert len(set(ends)) > 2 and min(ends) < NEW_TOKENS // 2  # rows really end at different steps
    running = [row for row, end in enumerate(ends) if end == max(ends)]

    # The cache that outlives the call (passed in and returned) keeps every row: the ended rows' padding too.
    with hf_paged.recorded_stats() as recorded:
        kept = _run(paged, batch, eos, past_key_values=PagedCache(paged.config, block_size=block_size))
    assert recorded == []  # only the caches generate builds are recorded
    assert torch.equal(kept.sequences, expected.sequences)
    assert kept.past_key_values.manager.scratch is None
    kept_stats = kept.past_key_values.stats()

    # The cache generate builds, of this block size: the block manager's invariants hold after every step.
    with hf_paged.recorded_stats() as recorded, watch_steps(paged, check=True):
        out = paged.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=0,
                             cache_config={"block_size": block_size})
    assert torch.equal(out, expected.sequences)
    (stats,) = recorded
    assert stats.logical_tokens == kept_stats.logical_tokens  # the same rows, as long as a DynamicCache's
    assert stats.peak_used_blocks < kept_stats.peak_used_blocks
    assert stats.peak_pool_bytes < kept_stats.peak_pool_bytes
    # When the call returns, the ended rows have given back all but at most their last block (what their last
    # padding went into), and share one scratch block: only the rows still running hold theirs.
    ended = len(ends) - len(running)
    live = _live_blocks(out, batch["attention_mask"], running, block_size)
    assert live <= stats.used_blocks <= live + ended + 1


def test_ended_rows_sampled_give_their_blocks_back(setup):
    """Sampling draws from every row's logits, the ended rows' too (then discarded): reading keys given back must
    keep them finite, and the seeded draws must stay sdpa's."""
    reference, paged, batch, _ = setup
    eos = _eos_for(reference, batch, seed=7, do_sample=True, top_k=0)
    kwargs = dict(do_sample=True, top_k=0, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    torch.manual_seed(7)
    expected = reference.generate(**batch, **kwargs)
    torch.manual_seed(7)
    with hf_paged.recorded_stats() as recorded, watch_steps(paged, check=True):
        out = paged.generate(**batch, **kwargs)
    assert torch.equal(out, expected)
    assert (expected[:, batch["input_ids"].shape[1]:] == eos).any(dim=1).sum() >= 2
    torch.manual_seed(7)
    kept = paged.generate(**batch, **kwargs, return_dict_in_generate=True)
    assert torch.equal(kept.sequences, expected)
    assert recorded[0].peak_used_blocks < kept.past_key_values.stats().peak_used_blocks


def test_a_returned_cache_continues_its_ended_rows_exactly(setup):
    """The cache a call returns holds the ended rows' padding too, so a second call continuing every row from it
    (the padding unmasked, as generate left it) gives sdpa's tokens, also in the rows that had ended."""
    reference, paged, batch, eos = setup
    outputs = {}
    for name, model in (("sdpa", reference), ("hf_paged", paged)):
        first = _run(model, batch, eos)
        ids = torch.cat([first.sequences, torch.full((len(first.sequences), 1), 7)], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones(len(ids), ids.shape[1] - batch["attention_mask"].shape[1],
                                                               dtype=batch["attention_mask"].dtype)], dim=1)
        outputs[name] = model.generate(input_ids=ids, attention_mask=mask, past_key_values=first.past_key_values,
                                       max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0,
                                       return_dict_in_generate=True, output_logits=True)
    ends = _end_steps(outputs["sdpa"].sequences[:, :batch["input_ids"].shape[1] + NEW_TOKENS],
                      batch["input_ids"].shape[1], eos)
    assert min(ends) < NEW_TOKENS - 1  # some row had ended and was fed padding in the first call
    assert torch.equal(outputs["hf_paged"].sequences, outputs["sdpa"].sequences)
    torch.testing.assert_close(torch.stack(outputs["hf_paged"].logits), torch.stack(outputs["sdpa"].logits),
                               rtol=1e-4, atol=1e-4)


def test_a_call_returning_scores_keeps_every_row_exact(setup):
    """Scores (and logits) are returned for ended rows too, computed from their padding: they must equal sdpa's."""
    reference, paged, batch, eos = setup
    expected = _run(reference, batch, eos, output_scores=True)
    scored = _run(paged, batch, eos, output_scores=True)
    assert torch.equal(scored.sequences, expected.sequences)
    assert len(scored.scores) == len(expected.scores)
    for mine, theirs in zip(scored.scores, expected.scores, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert scored.past_key_values.manager.scratch is None


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
    """num_return_sequences copies of a prompt share its blocks; the ones that end early stop growing (and keep
    the prompt's blocks, which their copies still read)."""
    reference, paged, batch, eos = setup
    kwargs = dict(do_sample=True, num_return_sequences=4, max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                  pad_token_id=0)
    torch.manual_seed(11)
    expected = reference.generate(**batch, **kwargs)
    torch.manual_seed(11)
    with watch_steps(paged, check=True):
        out = paged.generate(**batch, **kwargs)
    assert torch.equal(out, expected)
    assert (expected[:, batch["input_ids"].shape[1]:] == eos).any(dim=1).sum() >= 2
