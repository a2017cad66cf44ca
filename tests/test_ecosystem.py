"""hf_paged inside the rest of Transformers' generation ecosystem.

Every test builds a tiny random Llama twice, once with ``attn_implementation="sdpa"`` (Transformers' own path and
its default `DynamicCache`) and once with ``"hf_paged"`` sharing the same weights, and checks that the paged model
gives what Transformers gives: pipelines, streamers, `GenerationConfig` objects, stop strings, custom logits
processors and stopping criteria, chunked prefill, prompt-lookup and assisted decoding (which crop the cache),
continuing from a returned (or deep-copied) cache, manual forward loops, other cache classes, ``use_cache=False``,
dtypes, concurrent ``generate`` calls, cache statistics and beam search's block sharing.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from tiny_models import assert_stats_consistent, left_padded_batch, model_pair, random_ids, watch_steps
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tokenizer_models
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)
from transformers.cache_utils import DynamicCache

from hf_paged import PagedCache, compat
from hf_paged import backend as paged_backend
from hf_paged.compat import cache_kwargs
from hf_paged.kv_pool import KVPool

VOCAB = 128  # the models' ("llama128") and the tokenizer's
PAD, EOS, BOS = 0, 1, 2

CORPUS = [
    "the quick brown fox jumps over the lazy dog while paged attention keeps every key and value in blocks",
    "beam search shares the prompt blocks between beams and copies a block only when a beam writes into it",
    "a small random model generates text one token at a time from a cache of keys and values",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """An offline BPE tokenizer trained on a few sentences to exactly the models' vocabulary size (ids 0-3 special)."""
    backend_tok = Tokenizer(tokenizer_models.BPE(unk_token="<unk>"))
    backend_tok.pre_tokenizer = pre_tokenizers.Metaspace()
    backend_tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "</s>", "<s>", "<unk>"], show_progress=False
    )
    backend_tok.train_from_iterator(CORPUS * 20, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend_tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    assert len(tok) == VOCAB and (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (PAD, EOS, BOS)
    return tok


@pytest.fixture(scope="module")
def models():
    return model_pair("llama128")


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture
def steps(models):
    """What the hf_paged model's forward steps stored in a PagedCache (proves the paged path really ran) and how far
    its caches were rolled back (`tiny_models.watch_steps`)."""
    with watch_steps(models[1]) as watched:
        yield watched


@pytest.fixture
def paged_steps(steps):
    """Per forward step that stored tokens in a PagedCache, how many (per row)."""
    return steps.tokens


def greedy(model, ids, mask=None, **kwargs):
    kwargs.setdefault("max_new_tokens", 10)
    return model.generate(ids, attention_mask=mask, do_sample=False, **kwargs)


# ------------------------------------------------------------------------------------------------- pipelines
def test_pipeline_text_generation_matches_sdpa(models, tok, paged_steps):
    ref, paged = models
    prompts = ["the quick brown fox", "a beam", "paged attention keeps every key and value in blocks"]
    expected = pipeline("text-generation", model=ref, tokenizer=tok)(
        prompts, max_new_tokens=8, do_sample=False, batch_size=3
    )
    got = pipeline("text-generation", model=paged, tokenizer=tok)(
        prompts, max_new_tokens=8, do_sample=False, batch_size=3
    )
    assert got == expected
    assert paged_steps, "the pipeline did not run on a PagedCache"


# ------------------------------------------------------------------------------------------------- streamers
def test_text_streamer_prints_the_returned_text(models, tok, capsys, paged_steps):
    ref, paged = models
    inputs = tok("the lazy dog jumps over", return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    out = paged.generate(**inputs, max_new_tokens=12, do_sample=False, streamer=TextStreamer(tok, skip_prompt=True))
    streamed = capsys.readouterr().out
    assert streamed.strip() == tok.decode(out[0, prompt_len:]).strip()
    assert torch.equal(out, ref.generate(**inputs, max_new_tokens=12, do_sample=False))
    assert paged_steps


def test_text_iterator_streamer_yields_the_returned_text(models, tok, paged_steps):
    ref, paged = models
    inputs = tok("a small random model", return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    streamer = TextIteratorStreamer(tok, skip_prompt=True, timeout=60)
    result = {}

    def run():
        result["out"] = paged.generate(**inputs, max_new_tokens=12, do_sample=False, streamer=streamer)

    thread = threading.Thread(target=run)
    thread.start()
    streamed = "".join(streamer)
    thread.join(timeout=60)
    out = result["out"]
    assert streamed.strip() == tok.decode(out[0, prompt_len:]).strip()
    assert torch.equal(out, ref.generate(**inputs, max_new_tokens=12, do_sample=False))
    assert paged_steps


# ----------------------------------------------------------------------------------------- GenerationConfig
@pytest.mark.parametrize(
    "settings",
    [
        dict(do_sample=False, max_new_tokens=10, repetition_penalty=1.3, no_repeat_ngram_size=2),
        dict(do_sample=True, max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9),
        dict(do_sample=False, max_new_tokens=6, num_beams=2, num_return_sequences=2, length_penalty=0.5),
        dict(do_sample=True, max_new_tokens=6, num_return_sequences=3, min_new_tokens=6),
    ],
    ids=["greedy-penalties", "sampling", "beams", "return-sequences"],
)
def test_generation_config_object(models, settings, paged_steps):
    ref, paged = models
    ids, mask = left_padded_batch([9, 6], seed=3).values()
    config = GenerationConfig(pad_token_id=PAD, eos_token_id=EOS, **settings)
    outs = []
    for model in (ref, paged):
        torch.manual_seed(1234)
        outs.append(model.generate(ids, attention_mask=mask, generation_config=config))
    assert torch.equal(outs[1], outs[0])
    assert paged_steps


def test_model_generation_config_defaults_are_used(tok):
    ref, paged = model_pair("llama128", seed=5)
    for model in (ref, paged):
        model.generation_config = GenerationConfig(
            max_new_tokens=7, do_sample=False, repetition_penalty=1.2, pad_token_id=PAD, eos_token_id=EOS
        )
    ids = random_ids(2, 8, seed=4)
    expected, got = ref.generate(ids), paged.generate(ids, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected)
    assert got.sequences.shape[1] == 8 + 7 or (got.sequences == EOS).any()
    assert isinstance(got.past_key_values, PagedCache)


# -------------------------------------------------------------------------------- stop strings and criteria
def test_stop_strings(models, tok, paged_steps):
    ref, paged = models
    inputs = tok("beam search shares", return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    max_new = 16
    full = ref.generate(**inputs, max_new_tokens=max_new, do_sample=False)[0]
    # A stop string taken from the reference's own continuation, so that generation ends early.
    for cut in range(3, max_new):
        stop = tok.decode(full[: prompt_len + cut])[-3:]
        if stop.strip():
            expected = ref.generate(**inputs, max_new_tokens=max_new, do_sample=False, stop_strings=stop, tokenizer=tok)
            if expected.shape[1] < prompt_len + max_new:
                break
    else:
        pytest.fail("no stop string taken from the reference output stopped it early")
    got = paged.generate(**inputs, max_new_tokens=max_new, do_sample=False, stop_strings=stop, tokenizer=tok)
    assert torch.equal(got, expected)
    assert stop in tok.decode(got[0])
    assert paged_steps


class BanTokens(LogitsProcessor):
    """Forbids some token ids and records the sequences it was shown."""

    def __init__(self, banned):
        self.banned = list(banned)
        self.seen = []

    def __call__(self, input_ids, scores):
        self.seen.append(input_ids.clone())
        scores = scores.clone()
        scores[:, self.banned] = -float("inf")
        return scores


class StopAfter(StoppingCriteria):
    """Stops every row once it has `n` tokens beyond `prompt_len`."""

    def __init__(self, prompt_len, n):
        self.limit = prompt_len + n
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.limit, dtype=torch.bool)


def test_custom_logits_processor_and_stopping_criteria(models, paged_steps):
    ref, paged = models
    ids, mask = left_padded_batch([10, 7], seed=21).values()
    plain = greedy(ref, ids, mask, max_new_tokens=12)
    banned = sorted(set(plain[:, 10:13].flatten().tolist()) - {PAD, EOS})
    results = []
    for model in (ref, paged):
        processor, criterion = BanTokens(banned), StopAfter(10, 7)
        out = greedy(
            model, ids, mask, max_new_tokens=30,
            logits_processor=LogitsProcessorList([processor]),
            stopping_criteria=StoppingCriteriaList([criterion]),
        )
        results.append((out, processor, criterion))
    (expected, ref_proc, ref_crit), (got, proc, crit) = results
    assert torch.equal(got, expected)
    assert got.shape[1] == 10 + 7
    assert not any(token in banned for token in got[:, 10:].flatten().tolist())
    assert len(proc.seen) == len(ref_proc.seen)
    assert all(torch.equal(a, b) for a, b in zip(proc.seen, ref_proc.seen, strict=True))
    assert crit.calls == ref_crit.calls
    assert paged_steps


# --------------------------------------------------------------------------------------------- prefill chunks
@pytest.mark.parametrize("chunk", [5, 16])
def test_prefill_chunk_size(models, chunk, paged_steps):
    ref, paged = models
    ids, mask = left_padded_batch([37, 30], seed=31).values()
    expected = greedy(ref, ids, mask, max_new_tokens=8)
    try:
        expected_chunked = greedy(ref, ids, mask, max_new_tokens=8, prefill_chunk_size=chunk)
    except ValueError as error:  # 5.0's own chunked prefill fails for sdpa ("without a cache"); hf_paged's must not
        assert "hf_paged" not in str(error) and compat.TRANSFORMERS_VERSION < (5, 17), error
        expected_chunked = expected
    got = greedy(paged, ids, mask, max_new_tokens=8, prefill_chunk_size=chunk)
    assert torch.equal(got, expected_chunked)
    assert torch.equal(got, expected)
    prefill_steps = [q for q in paged_steps if q > 1]
    assert prefill_steps == [len(c) for c in torch.arange(37).split(chunk)], "prefill was not chunked"


# ------------------------------------------------------------------------------- decoding that crops the cache
def test_prompt_lookup_decoding(models, steps):
    ref, paged = models
    pattern = random_ids(1, 6, seed=41)
    ids = torch.cat([pattern, random_ids(1, 3, seed=42), pattern, pattern[:, :3]], dim=1)
    expected = greedy(ref, ids, max_new_tokens=20)
    got = greedy(paged, ids, max_new_tokens=20, prompt_lookup_num_tokens=4)
    assert torch.equal(got, expected)
    assert torch.equal(greedy(ref, ids, max_new_tokens=20, prompt_lookup_num_tokens=4), expected)
    assert any(n < 0 for n in steps.rollbacks), "prompt lookup never rejected a candidate: crop was not exercised"
    assert any(q > 1 for q in steps.tokens[1:]), "no multi-token verification step ran on the PagedCache"


@pytest.mark.parametrize("main, helper", [("hf_paged", "hf_paged"), ("hf_paged", "sdpa"), ("sdpa", "hf_paged")])
def test_assistant_model_decoding(models, main, helper):
    ref, paged = models
    assistants = dict(zip(("sdpa", "hf_paged"), model_pair("llama128", seed=7, num_hidden_layers=1), strict=True))
    for assistant in assistants.values():  # draft whole rounds (5.25 stops a random model's drafts at one token)
        assistant.generation_config.assistant_confidence_threshold = 0.0
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
    model = paged if main == "hf_paged" else ref
    ids = random_ids(1, 11, seed=51)
    expected = greedy(ref, ids, max_new_tokens=20)
    with watch_steps(paged, assistants["hf_paged"]) as steps:  # the PagedCaches of either model
        got = greedy(model, ids, max_new_tokens=20, assistant_model=assistants[helper], return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected)
    # 5.0 gives the assistant cache_implementation="dynamic_full": an hf_paged assistant then runs its attention on
    # Transformers' DynamicCache (the plain path), and only the main model's cache can be a PagedCache.
    assert any(n < 0 for n in steps.rollbacks) or (compat.CROP_TAKES_LENGTH and main == "sdpa"), "crop not exercised"
    if main == "hf_paged":
        cache = got.past_key_values
        assert isinstance(cache, PagedCache)
        assert_stats_consistent(cache)
        assert cache.get_seq_length() == got.sequences.shape[1] - 1


# ------------------------------------------------------------------------------------ continuing from a cache
@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "batch2-left-padded"])
def test_continue_from_returned_cache(models, padded):
    ref, paged = models
    if padded:
        ids, mask = left_padded_batch([12, 8], seed=61).values()
    else:
        ids, mask = random_ids(1, 12, seed=61), torch.ones(1, 12, dtype=torch.long)
    extra = random_ids(ids.shape[0], 3, seed=62)
    results = []
    for model in (ref, paged):
        first = greedy(model, ids, mask, max_new_tokens=5, return_dict_in_generate=True)
        new_ids = torch.cat([first.sequences, extra], dim=1)
        new_mask = torch.cat([mask, torch.ones(ids.shape[0], new_ids.shape[1] - ids.shape[1], dtype=torch.long)], 1)
        second = greedy(
            model, new_ids, new_mask, max_new_tokens=6, **cache_kwargs(first.past_key_values),
            return_dict_in_generate=True,
        )
        results.append((first, second))
    (ref_first, ref_second), (first, second) = results
    assert isinstance(ref_first.past_key_values, DynamicCache)
    assert isinstance(first.past_key_values, PagedCache)
    assert second.past_key_values is first.past_key_values
    assert torch.equal(first.sequences, ref_first.sequences)
    assert torch.equal(second.sequences, ref_second.sequences)
    assert second.past_key_values.get_seq_length() == ref_second.past_key_values.get_seq_length()
    assert_stats_consistent(second.past_key_values)


@pytest.mark.parametrize("rows", [1, 2])
def test_continue_from_inputs_embeds(models, rows):
    """Multimodal and soft-prompt code continues a conversation from ``inputs_embeds`` and the returned cache (as
    Transformers' own generation tests do): sdpa's tokens and logits."""
    results = []
    ids = random_ids(rows, 9, seed=71)
    for model in models:
        embed = model.get_input_embeddings()
        first = greedy(model, None, inputs_embeds=embed(ids), max_new_tokens=3, return_dict_in_generate=True)
        more = torch.cat([ids, first.sequences, random_ids(rows, 2, seed=72)], dim=1)
        second = greedy(model, None, inputs_embeds=embed(more), max_new_tokens=4, return_dict_in_generate=True,
                        output_logits=True, **cache_kwargs(compat.output_cache(first)))
        results.append((compat.output_cache(first), second))
    (_, expected), (cache, got) = results
    assert isinstance(cache, PagedCache) and compat.output_cache(got) is cache
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert cache.get_seq_length() == compat.output_cache(expected).get_seq_length()
    assert_stats_consistent(cache)


def test_deepcopy_of_a_prefilled_prompt_cache(models):
    """Transformers' documented prompt reuse: prefill a shared prefix once, then generate from a deepcopy of that
    cache for each prompt. Each copy gives sdpa's tokens and the original stays untouched."""
    ref, paged = models
    prefix = random_ids(1, 20, seed=65)
    prompts = [torch.cat([prefix, random_ids(1, n, seed=66 + n)], dim=1) for n in (5, 13)]
    with torch.no_grad():
        ref_cache = ref(prefix, **cache_kwargs(DynamicCache(config=ref.config))).past_key_values
        cache = paged(prefix, **cache_kwargs(PagedCache(paged.config))).past_key_values
    stats_before, pool_before = cache.stats(), cache.kv_pool.clone()
    for ids in prompts:
        expected = greedy(ref, ids, max_new_tokens=6, **cache_kwargs(copy.deepcopy(ref_cache)))
        assert torch.equal(expected, greedy(ref, ids, max_new_tokens=6))
        copied = copy.deepcopy(cache)
        assert isinstance(copied, PagedCache) and copied is not cache
        got = greedy(paged, ids, max_new_tokens=6, **cache_kwargs(copied))
        assert torch.equal(got, expected)
        assert_stats_consistent(copied)
    assert cache.stats() == stats_before
    assert torch.equal(cache.kv_pool, pool_before)
    assert_stats_consistent(cache)


def test_manual_decoding_loop_with_forward_calls(models):
    """The documented manual loop: ``model(ids, past_key_values=cache)`` step by step, PagedCache vs DynamicCache."""
    ref, paged = models
    ids = random_ids(2, 18, seed=67)
    ref_cache, cache = DynamicCache(config=ref.config), PagedCache(paged.config, block_size=8)
    ref_next, next_ids = ids, ids
    with torch.no_grad():
        for _ in range(10):
            ref_logits = ref(ref_next, **cache_kwargs(ref_cache)).logits[:, -1]
            logits = paged(next_ids, **cache_kwargs(cache)).logits[:, -1]
            torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
            ref_next, next_ids = ref_logits.argmax(-1, keepdim=True), logits.argmax(-1, keepdim=True)
            assert torch.equal(next_ids, ref_next)
    assert cache.get_seq_length() == ref_cache.get_seq_length() == 18 + 9
    assert_stats_consistent(cache)


def test_forward_without_a_cache_argument(models, paged_steps):
    """A plain forward of an hf_paged model (no generate) gets Transformers' default cache and sdpa's logits."""
    ref, paged = models
    ids = random_ids(2, 9, seed=68)
    with torch.no_grad():
        expected, got = ref(ids, use_cache=True), paged(ids, use_cache=True)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-4, atol=1e-5)
    assert type(got.past_key_values) is type(expected.past_key_values)
    assert not paged_steps


def test_use_cache_false(models, paged_steps):
    ref, paged = models
    ids, mask = left_padded_batch([9, 5], seed=71).values()
    expected = greedy(ref, ids, mask, max_new_tokens=8)
    assert torch.equal(greedy(paged, ids, mask, max_new_tokens=8, use_cache=False), expected)
    assert torch.equal(greedy(ref, ids, mask, max_new_tokens=8, use_cache=False), expected)
    assert not paged_steps, "use_cache=False still stored keys in a PagedCache"


@pytest.mark.parametrize(
    "cache_kwargs",
    [
        lambda config: cache_kwargs(DynamicCache(config=config)),
        lambda config: dict(cache_implementation="dynamic"),
        lambda config: dict(cache_implementation="static"),
    ],
    ids=["DynamicCache-object", "cache_implementation=dynamic", "cache_implementation=static"],
)
def test_other_caches_with_an_hf_paged_model(models, cache_kwargs, paged_steps):
    """A non-paged cache is used as is: the hf_paged attention runs over its complete keys and values."""
    ref, paged = models
    for ids, mask in (left_padded_batch([12, 8], seed=75).values(), (random_ids(1, 12, seed=76), None)):
        expected = greedy(ref, ids, mask, max_new_tokens=8)
        got = greedy(paged, ids, mask, max_new_tokens=8, return_dict_in_generate=True, **cache_kwargs(paged.config))
        assert not isinstance(got.past_key_values, PagedCache)
        assert torch.equal(got.sequences, expected)
    assert not paged_steps


# ----------------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dtype_greedy_matches_sdpa(dtype):
    ref, paged = model_pair("llama128", dtype=dtype)
    ids, mask = left_padded_batch([14, 9], seed=81).values()
    expected = greedy(ref, ids, mask, max_new_tokens=10)
    got = greedy(paged, ids, mask, max_new_tokens=10, return_dict_in_generate=True)
    assert torch.equal(got.sequences, expected)
    cache = got.past_key_values
    assert isinstance(cache, PagedCache)
    assert cache.kv_pool.dtype == dtype
    assert cache.bytes_per_block == 2 * 2 * 16 * 2 * 16 * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------------- threads
def test_two_threads_generate_on_one_model(models):
    """Concurrent generate() calls on one model (one greedy, one beam search) each get what they get alone."""
    _, paged = models
    jobs = [
        (*left_padded_batch([13, 7], seed=91).values(), dict()),
        (random_ids(1, 21, seed=92), None, dict(num_beams=2)),
    ]
    alone = [greedy(paged, ids, mask, max_new_tokens=12, **kwargs) for ids, mask, kwargs in jobs]
    rounds = 5
    barrier = threading.Barrier(len(jobs))
    results = [[None] * rounds for _ in jobs]
    errors = []

    def worker(index):
        ids, mask, kwargs = jobs[index]
        try:
            for r in range(rounds):
                barrier.wait(timeout=60)
                out = greedy(paged, ids, mask, max_new_tokens=12, return_dict_in_generate=True, **kwargs)
                assert isinstance(out.past_key_values, PagedCache)
                results[index][r] = out.sequences
        except BaseException as error:  # reported in the main thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    for index, expected in enumerate(alone):
        for r in range(rounds):
            assert torch.equal(results[index][r], expected), f"thread {index} round {r} differs from running alone"


# ------------------------------------------------------------------------------------------------------ stats
@pytest.mark.parametrize(
    "settings",
    [
        dict(do_sample=False),
        dict(do_sample=True, num_return_sequences=3),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
    ],
    ids=["greedy", "return-sequences", "beams"],
)
def test_returned_cache_stats_are_consistent(models, settings):
    ref, paged = models
    ids, mask = left_padded_batch([20, 13], seed=101).values()
    torch.manual_seed(0)
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=9, **settings)
    torch.manual_seed(0)
    out = paged.generate(ids, attention_mask=mask, max_new_tokens=9, return_dict_in_generate=True, **settings)
    assert torch.equal(out.sequences, expected)
    cache = out.past_key_values
    assert isinstance(cache, PagedCache)
    assert_stats_consistent(cache)
    stats = cache.stats()
    rows = ids.shape[0] * max(settings.get("num_beams", 1), settings.get("num_return_sequences", 1))
    assert stats.num_rows == rows
    assert stats.logical_tokens == rows * cache.get_seq_length()
    assert cache.get_seq_length() == out.sequences.shape[1] - 1
    assert stats.logical_bytes == stats.logical_tokens * cache.bytes_per_block // cache.block_size


# ------------------------------------------------------------------------------------------------ beam search
def test_beam_search_shares_the_prompt_and_reorder_copies_nothing(monkeypatch):
    ref, paged = model_pair("llama128", seed=2)
    copied = []
    original_copy = KVPool.copy_blocks  # every K/V block copy of a pool (of one slab or several) goes through it

    def counting_copy(pool, src, dst, *args, **kwargs):
        copied.append(len(src))
        return original_copy(pool, src, dst, *args, **kwargs)

    monkeypatch.setattr(KVPool, "copy_blocks", counting_copy)
    prompt_len, num_beams, new_tokens = 70, 3, 10
    ids = random_ids(1, prompt_len, seed=111)
    expected = ref.generate(ids, num_beams=num_beams, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    out = paged.generate(
        ids, num_beams=num_beams, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, expected)
    cache = out.past_key_values
    assert_stats_consistent(cache)
    stats = cache.stats()
    assert stats.block_size == 16
    assert stats.num_rows == num_beams
    assert stats.shared_blocks >= prompt_len // 16, stats
    # Every beam row points at the same blocks for the prompt's full blocks.
    tables = cache.manager.tables
    assert all(table[: prompt_len // 16] == tables[0][: prompt_len // 16] for table in tables)
    assert 0 < stats.cow_copies <= new_tokens * num_beams, stats
    # The only K/V copies are copy-on-write copies: the reorders themselves copied nothing.
    assert sum(copied) == stats.cow_copies


def test_reorder_cache_remaps_tables_without_touching_kv(models, monkeypatch):
    _, paged = models
    ids = random_ids(3, 21, seed=121)
    cache = greedy(paged, ids, max_new_tokens=4, return_dict_in_generate=True).past_key_values
    copied = []
    monkeypatch.setattr(paged_backend, "copy_blocks", lambda *args: copied.append(args))
    pool_before = cache.kv_pool.clone()
    tables_before = [list(t) for t in cache.manager.tables]
    lengths_before = list(cache.manager.lengths)
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    assert not copied
    assert torch.equal(cache.kv_pool, pool_before)
    assert cache.manager.tables == [tables_before[2], tables_before[0], tables_before[0]]
    assert cache.manager.lengths == [lengths_before[2], lengths_before[0], lengths_before[0]]
    assert_stats_consistent(cache)
    assert cache.stats().shared_blocks == len(tables_before[0])
    # Row 1 (the old row 1) was dropped: its blocks went back to the free list.
    assert cache.stats().used_blocks == len(tables_before[0]) + len(tables_before[2])

