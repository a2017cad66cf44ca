"""Attention features that reach hf_paged through the interface's kwargs or through the mask functions.

Attention sinks (``s_aux``: gpt-oss, Flint, Granite SWA), chunked attention (Llama 4's ``create_chunked_causal_mask``),
sliding windows given only by the mask function (PhiMoE) or by ``config.layer_types`` (Gemma 3, gpt-oss, Granite
SWA) and by the ``sliding_window`` kwarg (Mistral): each family's tiny random-weight model gives eager's tokens
through ``generate`` on every path hf_paged takes (first prefill, cached decode, prefill-once forks, block-range
and shared-prefix attention, the prefix cache, no cache at all), with windows and chunks shorter than the prompts
and block sizes that do and do not divide them.
"""

from __future__ import annotations

import gc

import pytest
import torch
from tiny_models import (
    FEATURE_FAMILIES,
    MODES,
    SINK_FAMILIES,
    VOCAB,
    available,
    count_calls,
    left_padded_batch,
    model_pair,
)
from transformers import DynamicCache, masking_utils

import hf_paged
from hf_paged import PagedCache, masks, ops
from hf_paged.attention import paged_attention_mask

NEW_TOKENS = 8
FAMILIES = [family for family in FEATURE_FAMILIES if available(family)]


def make_pair(family: str):
    """``(eager, paged)`` with the same random weights (random sinks: `tiny_models.model_pair`)."""
    reference, paged = model_pair(family, reference="eager")
    assert any(name.endswith("sinks") for name in paged.state_dict()) == (family in SINK_FAMILIES)
    return reference, paged


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    return request.param, *make_pair(request.param)


def _generate(model, inputs, **kwargs):
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


def _assert_same(got, expected, label):
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences), f"{label}: tokens differ"


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("block_size", [None, 4, 5])
def test_same_tokens_as_eager(pair, mode, block_size):
    family, reference, paged = pair
    # Prompts longer than every window (6, 7) and chunk (8), left-padded to unequal lengths.
    inputs = left_padded_batch([21, 9, 15], seed=1)
    expected = _generate(reference, inputs, **MODES[mode])
    cache = {} if block_size is None else {"past_key_values": PagedCache(paged.config, block_size=block_size)}
    got = _generate(paged, inputs, **MODES[mode], **cache)
    assert isinstance(got.past_key_values, PagedCache)
    _assert_same(got, expected, f"{family}/{mode}/{block_size}")
    got.past_key_values.manager.check()


@pytest.mark.parametrize("path", ["window", "split", "gather"])
def test_every_pytorch_path(pair, path, monkeypatch):
    """Rows sharing their prompt's blocks go through `ops.window_attention` (one block range), through
    `ops.shared_prefix_attention` (the shared prefix once, then each row's tail; layers with a window or chunks
    gather instead) or gather every row's keys: each gives eager's tokens."""
    family, reference, paged = pair
    calls = count_calls(monkeypatch, ops, ("window_attention", "windows_attention", "shared_prefix_attention", "attend"))
    windowed = lambda: calls["window_attention"] + calls["windows_attention"]  # noqa: E731  (one slab, several)
    if path != "window":
        monkeypatch.setenv("HF_PAGED_READ_PLAN", {"split": "shared_prefix", "gather": "gather"}[path])
    inputs = left_padded_batch([21, 9, 15], seed=2)
    mode = dict(num_beams=2, num_return_sequences=2)
    expected = _generate(reference, inputs, **mode)
    got = _generate(paged, inputs, **mode, past_key_values=PagedCache(paged.config, block_size=5))
    _assert_same(got, expected, f"{family}/{path}")
    if path == "window":
        assert windowed() > 0
    elif path == "split":
        assert windowed() == 0
        # Layers without a window or chunks take the shared-prefix path, and so do sliding-window layers once the
        # window covers every key the step's tables still hold (their blocks outside it are released).
        assert calls["shared_prefix_attention"] > 0
    else:
        assert windowed() == calls["shared_prefix_attention"] == 0


def test_without_a_cache(pair):
    """``use_cache=False`` (plain keys and values, no paged metadata) gives eager's logits on a padded batch."""
    family, reference, paged = pair
    inputs = left_padded_batch([21, 9, 15], seed=3)
    with torch.no_grad():
        expected = reference(**inputs, use_cache=False).logits
        got = paged(**inputs, use_cache=False).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text", "phimoe"])
def test_prefix_cache(family):
    """A second call whose prompt starts with the first's blocks reuses them and attends from mid-sequence."""
    reference, paged = make_pair(family)
    hf_paged.enable_prefix_caching(paged, block_size=4)
    try:
        system = torch.randint(3, VOCAB, (1, 17), generator=torch.Generator().manual_seed(5))
        for suffix_len, seed in ((5, 6), (11, 7)):
            suffix = torch.randint(3, VOCAB, (1, suffix_len), generator=torch.Generator().manual_seed(seed))
            inputs = {"input_ids": torch.cat([system, suffix], dim=1)}
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            for mode in (dict(), dict(num_beams=2, num_return_sequences=2)):
                expected = _generate(reference, inputs, **mode)
                got = _generate(paged, inputs, **mode)
                _assert_same(got, expected, f"{family}/prefix/{suffix_len}")
                hits = got.past_key_values.stats().prefix_hit_tokens
                del got
                gc.collect()
        assert hits > 0
    finally:
        hf_paged.disable_prefix_caching(paged)


# The mask function: what it recognises, and the 4-D fallback for what it does not.

def _mask_args(batch=2, q_length=5, kv_length=9, attention_mask=None, **kwargs):
    return dict(batch_size=batch, q_length=q_length, kv_length=kv_length, q_offset=kv_length - q_length,
                kv_offset=0, attention_mask=attention_mask, device=torch.device("cpu"), **kwargs)


def test_describe_reads_transformers_mask_functions():
    left = torch.tensor([0, 2])
    assert masks.describe(None) == masks.MaskPattern()
    assert masks.describe(masking_utils.causal_mask_function) == masks.MaskPattern()
    window = masks.describe(masking_utils.sliding_window_causal_mask_function(6))
    assert (window.sliding_window, window.chunk_size) == (6, None)
    chunk = masks.describe(masking_utils.chunked_causal_mask_function(8, left))
    assert (chunk.sliding_window, chunk.chunk_size) == (None, 8) and chunk.chunk_start is left
    both = masks.describe(masking_utils.and_masks(masking_utils.sliding_window_causal_mask_function(6),
                                                  masking_utils.sliding_window_overlay(4)))
    assert both.sliding_window == 4
    assert masks.describe(masking_utils.bidirectional_mask_function) is None
    assert masks.describe(masking_utils.sliding_window_overlay(4)) is None  # not causal
    assert masks.describe(masking_utils.or_masks(masking_utils.causal_mask_function,
                                                 masking_utils.bidirectional_mask_function)) is None
    assert masks.describe(lambda b, h, q, k: k <= q) is None


@pytest.mark.parametrize("mask_function", [
    masking_utils.and_masks(masking_utils.causal_mask_function, lambda b, h, q, k: (k % 3) != 1),
    masking_utils.or_masks(masking_utils.sliding_window_causal_mask_function(3), lambda b, h, q, k: k == 0),
], ids=["and", "or"])
def test_unknown_mask_functions_get_transformers_4d_mask(mask_function):
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], dtype=torch.bool)
    got = paged_attention_mask(**_mask_args(attention_mask=padding, mask_function=mask_function))
    expected = masking_utils.sdpa_mask(**_mask_args(attention_mask=padding, mask_function=mask_function),
                                       allow_is_causal_skip=False)
    assert got.dim() == 4 and torch.equal(got, expected)


def test_known_patterns_travel_on_the_padding_mask():
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9], dtype=torch.bool)
    left = (padding.cumsum(-1) == 0).sum(-1)
    got = paged_attention_mask(**_mask_args(attention_mask=padding,
                                            mask_function=masking_utils.chunked_causal_mask_function(4, left)))
    pattern, mask = masks.detach(got)
    assert got.shape == (2, 1, 1, 9) and (pattern.chunk_size, pattern.sliding_window) == (4, None)
    assert torch.equal(mask, padding)
    # Transformers indexes masks as [B, heads, q, kv]: Gemma 4 slices the query dimension for its KV-shared layers
    # (`_maybe_slice_kv_shared_inputs`). The slice keeps the marks and the same padding object (memo keys).
    for sliced in (got[:, :, slice(-1, None), :], got[:, :, -3:, :], got.to(got.device), got.contiguous()):
        assert masks.detach(sliced)[0] == pattern and masks.detach(sliced)[1] is mask
    # Any other operation gives a plain tensor, which no longer claims to be a causal mask.
    assert masks.detach(~got)[0] is None and masks.detach(got[:, :, :, :4])[0] is None
    # Nothing padded: the mask still carries the pattern, and the attention sees no padding.
    got = paged_attention_mask(**_mask_args(mask_function=masking_utils.sliding_window_causal_mask_function(3)))
    pattern, mask = masks.detach(got)
    assert pattern.sliding_window == 3 and mask is None
    # A chunk origin that is not the count of leading padding cannot be expressed: the 4-D mask is built.
    wrong = masking_utils.chunked_causal_mask_function(4, torch.tensor([1, 0]))
    got = paged_attention_mask(**_mask_args(attention_mask=padding, mask_function=wrong))
    assert got.dim() == 4


# The PyTorch operations with sinks and chunks, against the reference built on `attend` with a full mask.

def _paged_case(seed=0, *, block_size=4, q_len=3, lengths=(13, 7, 11), starts=(0, 3, 1)):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, kv_heads, dim = len(lengths), 4, 2, 8
    nb = -(-max(lengths) // block_size)
    num_blocks = batch * nb + 2
    tables = torch.randperm(num_blocks, generator=gen)[: batch * nb].view(batch, nb).to(torch.int32)
    key_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=gen)
    query = torch.randn(batch, heads, q_len, dim, generator=gen)
    sinks = torch.randn(heads, generator=gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    key_start = torch.tensor(starts, dtype=torch.int32)
    return query, key_cache, value_cache, tables, seq_lens, key_start, sinks


def _dense_reference(query, key_cache, value_cache, tables, seq_lens, key_start, sinks, window, chunk):
    """Scores over every key, masked per element from the module docstring's rule, plus the sink logit."""
    kv_len = int(seq_lens.max())
    keys = ops.gather_kv(key_cache, tables, kv_len).repeat_interleave(2, dim=1)
    values = ops.gather_kv(value_cache, tables, kv_len).repeat_interleave(2, dim=1)
    batch, heads, q_len, _ = query.shape
    out = torch.zeros(batch, q_len, heads, query.shape[-1])
    for b in range(batch):
        s = int(key_start[b])
        for i in range(q_len):
            p = int(seq_lens[b]) - q_len + i
            visible = [j for j in range(kv_len) if s <= j <= p and (window is None or j > p - window)
                       and (chunk is None or (j - s) // chunk == (p - s) // chunk)]
            if not visible:
                continue
            scores = query[b, :, i, None, :].mul(keys[b][:, visible]).sum(-1) * 0.5  # [H, n]
            logits = scores if sinks is None else torch.cat([scores, sinks[:, None]], dim=1)
            probs = torch.softmax(logits, dim=1)[:, : len(visible)]
            out[b, i] = torch.einsum("hn,hnd->hd", probs, values[b][:, visible])
    return out


@pytest.mark.parametrize("window, chunk", [(None, None), (5, None), (None, 4), (None, 3), (6, 4)])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_ops_honour_sinks_and_chunks(window, chunk, with_sinks):
    query, key_cache, value_cache, tables, seq_lens, key_start, sinks = _paged_case()
    sinks = sinks if with_sinks else None
    expected = _dense_reference(query, key_cache, value_cache, tables, seq_lens, key_start, sinks, window, chunk)
    kv_len = int(seq_lens.max())
    got = ops.paged_attention(query, key_cache, value_cache, tables, seq_lens, key_start, scale=0.5,
                              max_seq_len=kv_len, sliding_window=window, chunk_size=chunk, sinks=sinks)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # The block-range path, given the padding as a 2-D mask.
    padding = torch.arange(kv_len)[None, :] >= key_start[:, None]
    first = int(tables.min())
    count = int(tables.max()) + 1 - first
    mask = ops.window_mask(tables, seq_lens, query.shape[2], first, count, key_cache.shape[1], groups=2,
                           dtype=query.dtype, key_padding=padding, sliding_window=window, chunk_size=chunk)
    got = ops.window_attention(query, key_cache, value_cache, first, count, mask, scale=0.5, sinks=sinks)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_sinks", [False, True])
def test_shared_prefix_attention_with_sinks(with_sinks):
    """Two groups of two rows sharing two blocks (8 tokens), each row with its own tail."""
    gen = torch.Generator().manual_seed(3)
    block_size, heads, kv_heads, dim, q_len = 4, 4, 2, 8, 2
    key_cache = torch.randn(20, block_size, kv_heads, dim, generator=gen)
    value_cache = torch.randn(20, block_size, kv_heads, dim, generator=gen)
    tables = torch.tensor([[0, 1, 4, 5], [0, 1, 6, 7], [2, 3, 8, 9], [2, 3, 10, 11]], dtype=torch.int32)
    seq_lens = torch.tensor([15, 14, 16, 13], dtype=torch.int32)
    query = torch.randn(4, heads, q_len, dim, generator=gen)
    sinks = torch.randn(heads, generator=gen) if with_sinks else None
    expected = _dense_reference(query, key_cache, value_cache, tables, seq_lens, torch.zeros(4, dtype=torch.int32),
                                sinks, None, None)
    tail_mask = ops.causal_mask(seq_lens - 8, None, q_len, 8)
    got = ops.shared_prefix_attention(query, key_cache, value_cache, tables[::2, :2].contiguous(),
                                      tables[:, 2:].contiguous(), 8, None, tail_mask, scale=0.5, sinks=sinks)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["greedy", "beams"])
def test_with_a_dynamic_cache(pair, mode):
    """A `DynamicCache` the user passes (plain tensors; sliding and chunked layers keep only their last keys, so
    chunked layers get Transformers' 4-D mask) gives eager's tokens."""
    family, reference, paged = pair
    inputs = left_padded_batch([21, 9, 15], seed=4)
    expected = _generate(reference, inputs, past_key_values=DynamicCache(config=reference.config), **MODES[mode])
    got = _generate(paged, inputs, past_key_values=DynamicCache(config=paged.config), **MODES[mode])
    assert isinstance(got.past_key_values, DynamicCache)
    _assert_same(got, expected, f"{family}/dynamic/{mode}")


@pytest.mark.parametrize("family", [*SINK_FAMILIES, "llama4_text"])
def test_training_dropout(family):
    """In training, attention dropout is applied as eager applies it: same seed, same logits; another seed, other
    logits (the dropout is really on)."""
    reference, paged = make_pair(family)
    for model in (reference, paged):
        model.train()
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = 0.3
    inputs = left_padded_batch([21, 9, 15], seed=5)
    real = inputs["attention_mask"].bool()
    torch.manual_seed(0)
    expected = reference(**inputs, use_cache=False).logits[real]
    torch.manual_seed(0)
    got = paged(**inputs, use_cache=False).logits[real]
    torch.manual_seed(1)
    other = paged(**inputs, use_cache=False).logits[real]
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert (other - expected).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["gpt_oss", "llama4_text", "mistral_window"])
def test_packed_sequences(family):
    """Two sequences packed in one row (``position_ids`` restart, no attention mask): Transformers' packed mask
    function is not one `hf_paged.masks.describe` knows, so its 4-D mask is used, and logits are eager's."""
    reference, paged = make_pair(family)
    input_ids = torch.randint(3, VOCAB, (1, 20), generator=torch.Generator().manual_seed(6))
    position_ids = torch.cat([torch.arange(12), torch.arange(8)])[None]
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        got = paged(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        unpacked = paged(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert (unpacked[0, 12:] - expected[0, 12:]).abs().max() > 1e-3  # the packing really changes the second part


def test_read_plan_environment_variable_is_checked(monkeypatch):
    """``HF_PAGED_READ_PLAN`` (the read plans a step may take, `hf_paged.step.read_plan`) refuses what it does not
    know, naming the choices."""
    _, paged = make_pair("mistral_window")
    monkeypatch.setenv("HF_PAGED_READ_PLAN", "window-please")
    with pytest.raises(ValueError, match="HF_PAGED_READ_PLAN must be one of auto, shared_prefix, gather"):
        paged.generate(**left_padded_batch([5, 3], seed=1), max_new_tokens=2)
