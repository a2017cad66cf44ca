"""The ``"hf_paged"`` mask and attention functions, and the read plan a step takes (`hf_paged.step`).

* Read plans: rows sharing their prompt's blocks are read as one block range (`ops.range_attention`; one range
  per slab, `ops.ranges_attention`), as a shared prefix read once plus each row's tail
  (`ops.shared_prefix_attention`), or gathered; one row's consecutive blocks are read in place. Each path is
  reached on the same model through ``HF_PAGED_READ_PLAN`` (`hf_paged.step.read_plan`), the calls of each op are
  counted, and every path gives the reference's tokens: plain families (sdpa), attention-feature families (eager:
  sinks, chunks, windows from the mask function or the layer types), values narrower than keys.
* The mask function: which of Transformers' mask functions it describes (windows, chunks), and the 4-D mask for
  what it does not know (``or`` masks, packed sequences).
* The attention function over plain tensors (no cache, a `DynamicCache`, training with dropout, packed sequences):
  eager's logits.

Whole-generate parity per family is ``tests/test_generate_parity.py``'s; the ops themselves are ``tests/test_ops.py``'s.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    FEATURE_FAMILIES,
    MODES,
    PARITY_FAMILIES,
    SINK_FAMILIES,
    available,
    count_calls,
    left_padded_batch,
    model_pair,
    random_ids,
)
from transformers import DynamicCache, masking_utils

from hf_paged import PagedCache, compat, masks, ops, storage
from hf_paged import step as step_module
from hf_paged.attention import paged_attention_mask
from hf_paged.block_manager import NULL_BLOCK, BlockManager
from hf_paged.compat import cache_kwargs
from hf_paged.step import build_step
from hf_paged.storage import LayerStore

# Beams and samples of the parity suite (tests/test_generate_parity.py).
PARITY_MODES = {
    "beams": dict(num_beams=3, num_return_sequences=2, length_penalty=0.7, early_stopping=True),
    "sample": dict(do_sample=True, num_return_sequences=3, top_k=0),
}


@pytest.fixture(scope="module", params=[family for family in FEATURE_FAMILIES if available(family)])
def pair(request):
    return request.param, *model_pair(request.param, reference="eager")


@pytest.fixture(scope="module", params=PARITY_FAMILIES)
def parity_pair(request):
    return request.param, *model_pair(request.param)


def _generate(model, inputs, new_tokens=8, **kwargs):
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          return_dict_in_generate=True, output_logits=True, **kwargs)


def _assert_same(got, expected, label):
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences), f"{label}: tokens differ"


# ---------------------------------------------------------------------------------------------------------- read plans
@pytest.mark.parametrize("path", ["window", "split", "gather"])
def test_every_pytorch_path(pair, path, monkeypatch):
    """Rows sharing their prompt's blocks go through `ops.range_attention` (one block range), through
    `ops.shared_prefix_attention` (the shared prefix once, then each row's tail; layers with a window or chunks
    gather instead) or gather every row's keys: each gives eager's tokens."""
    family, reference, paged = pair
    calls = count_calls(monkeypatch, ops, ("range_attention", "ranges_attention", "shared_prefix_attention",
                                           "attend"))
    windowed = lambda: calls["range_attention"] + calls["ranges_attention"]  # noqa: E731  (one slab, several)
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


@pytest.mark.parametrize("mode", ["beams", "sample"])
@pytest.mark.parametrize("path", ["window", "split"])
def test_both_attention_paths_for_rows_sharing_prompts(parity_pair, mode, path, monkeypatch):
    """Rows that share their prompt's blocks are attended either over one block range holding all rows' keys
    (`ops.range_attention`) or over the shared prefix once plus each row's tail (`ops.shared_prefix_attention`;
    layers with a sliding window gather instead). Both give sdpa's tokens."""
    family, reference, paged = parity_pair
    calls = count_calls(monkeypatch, ops, ("range_attention", "ranges_attention", "shared_prefix_attention"))
    windowed = lambda: calls["range_attention"] + calls["ranges_attention"]  # noqa: E731  (one slab, several)
    if path == "split":
        monkeypatch.setenv("HF_PAGED_READ_PLAN", "shared_prefix")
    inputs = left_padded_batch([37, 12, 26], seed=1)
    expected = _generate(reference, inputs, new_tokens=10, **PARITY_MODES[mode])
    got = _generate(paged, inputs, new_tokens=10, **PARITY_MODES[mode],
                    **cache_kwargs(PagedCache(paged.config, block_size=5)))
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences), f"{family}/{mode}/{path}: tokens differ"
    if compat.builds_own_mask(paged):
        return  # this release's family code builds a 4-D mask: the general path serves it (tokens checked above)
    if path == "window":
        assert windowed() > 0 and calls["shared_prefix_attention"] == 0
    else:
        assert windowed() == 0
        assert calls["shared_prefix_attention"] > 0 or family == "mistral_window"  # every layer has a window


@pytest.mark.skipif(not available("mimo_v2_flash"), reason="this Transformers has no MiMo-V2-Flash")
@pytest.mark.parametrize("path", ["window", "split", "gathered"])
def test_every_attention_path_with_narrower_values(path, monkeypatch):
    """Values narrower than keys (MiMo-V2-Flash) through each PyTorch attention path: one block range for all rows
    (`ops.range_attention`), shared prefix plus tails (`ops.shared_prefix_attention`), per-row gathers."""
    reference, paged = model_pair("mimo_v2_flash")
    calls = count_calls(monkeypatch, ops, ("range_attention", "ranges_attention", "shared_prefix_attention",
                                           "gather_kv"))
    if path != "window":
        monkeypatch.setenv("HF_PAGED_READ_PLAN", {"split": "shared_prefix", "gathered": "gather"}[path])
    inputs = left_padded_batch([12, 5, 9], seed=1)
    expected = _generate(reference, inputs, new_tokens=5, **MODES["beams"])
    got = _generate(paged, inputs, new_tokens=5, **MODES["beams"], past_key_values=PagedCache(paged.config,
                                                                                             block_size=4))
    assert isinstance(got.past_key_values, PagedCache)
    _assert_same(got, expected, f"mimo_v2_flash/{path}")
    got.past_key_values.manager.check()
    assert (calls["range_attention"] + calls["ranges_attention"] > 0) == (path == "window")  # one slab, several
    assert (calls["shared_prefix_attention"] > 0) == (path == "split")


@pytest.mark.parametrize("family", ["llama", "gemma2", "mistral_window"])
def test_single_sequence_reads_its_blocks_in_place(family):
    """One row with consecutive blocks is attended in place (no gather): as one range of a single slab, or one
    window per slab when the growing pool has several (hf_paged.storage); tokens are unchanged."""
    reference, paged = model_pair(family)
    inputs = left_padded_batch([29], seed=4)
    cache = PagedCache(paged.config, block_size=4)
    expected = _generate(reference, inputs, new_tokens=10)
    got = _generate(paged, inputs, new_tokens=10, **cache_kwargs(cache))
    # Full-attention layers read their blocks in place, across slab boundaries too (a sliding-window group reuses
    # the blocks it releases, so its blocks need not stay consecutive).
    full = [group for group in cache.groups if group.window is None]
    assert full or family != "llama"
    for group in full:
        if len(group.pool.slabs) == 1:
            assert group.step.first_block == group.manager.tables[0][0]
        else:
            assert sum(count for _, count in group.step.block_ranges) == len(group.manager.tables[0])
    assert torch.equal(got.sequences, expected.sequences)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_distinct_rows_are_read_in_place_at_one_stride(monkeypatch, family):
    """A batch of distinct prompts of one length on the PyTorch path: the cache generate builds lays its rows out at
    one stride (`BlockManager.append`'s ``contiguous``: the rows grow into the slack the pool took at the prefill),
    and the full-attention layers read every row as one strided view of the pool at every step, prefill included
    (nothing gathered; the views of every layer made once per step, `KVPool.rows_in_place`), with the reference's
    tokens and logits."""
    reference, paged = model_pair(family)
    inputs = left_padded_batch([60, 60, 60], seed=5)
    expected = _generate(reference, inputs, new_tokens=10)
    calls = count_calls(monkeypatch, storage, ["select_blocks"])
    reads = count_calls(monkeypatch, ops, ["gather_kv", "rows_in_place"])
    got = _generate(paged, inputs, new_tokens=10, cache_config={"block_size": 4})
    _assert_same(got, expected, family)
    cache = compat.output_cache(got)
    full = [group for group in cache.groups if group.window is None]
    assert full
    for group in full:
        first, stride = group.step.row_stride
        for row, table in enumerate(group.manager.tables):
            assert all(block == first + row * stride + index for index, block in enumerate(table) if block >= 0)
    if family == "llama":  # (gemma2's sliding-window layers reuse the blocks they release: those are gathered)
        assert calls["select_blocks"] == 0 and reads["gather_kv"] == 0
        assert reads["rows_in_place"] == 10  # once per step (one pool tensor), not once per layer


@pytest.mark.parametrize("copy_bytes", [None, 0])
def test_single_row_crossing_slabs_is_read_in_place(monkeypatch, copy_bytes):
    """Greedy decoding of one row right after its prefill: the row's blocks cross slab boundaries, and every decode
    step reads them in place, with sdpa's tokens: its spans concatenated while small (`step.SPAN_COPY_BYTES`),
    else one window per slab (nothing gathered either way)."""
    if copy_bytes is not None:
        monkeypatch.setattr(step_module, "SPAN_COPY_BYTES", copy_bytes)
    reference, paged = model_pair("llama")
    ids = random_ids(1, 12, seed=4)
    expected = reference.generate(ids, max_new_tokens=40, do_sample=False)
    calls = count_calls(monkeypatch, ops, ["ranges_attention", "range_attention", "shared_prefix_attention"])
    gathers = count_calls(monkeypatch, LayerStore, ["index_select"])  # its own Counter (update() copies counts)
    cache = PagedCache(paged.config, block_size=4)
    got = paged.generate(ids, max_new_tokens=40, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)
    assert len(cache.pool.slabs) >= 3
    assert gathers["index_select"] == 0 and calls["shared_prefix_attention"] == 0
    assert (calls["ranges_attention"] > 0) == (copy_bytes == 0)


def _hold_tables(manager: BlockManager) -> None:
    """Take the blocks of tables set by hand off the free list, one reference per entry (the invariants hold)."""
    for block in (block for table in manager.tables for block in table if block != NULL_BLOCK):
        if manager.pool.ref_counts[block] == 0:
            manager.pool.free_blocks.remove(block)
        manager.pool.ref_counts[block] += 1
    manager.check()


def test_a_pool_of_several_slabs_is_read_one_window_per_slab():
    """The step planner (`hf_paged.step.build_step`) reads rows whose blocks lie in three slabs as one window per slab,
    each from the lowest to the highest block the rows use there, null entries skipped (what
    tests/test_ops.py::test_ranges_attention_equals_paged_attention attends over)."""
    manager = BlockManager(num_blocks=12, block_size=4)
    # Row 0: a null entry (its first block holds only dead tokens), then blocks of slabs 0 and 1; block 8 is shared.
    manager.tables = [[NULL_BLOCK, 2, 3, 4], [0, 1, 8, 9], [7, 8, 10, 11]]
    manager.lengths, manager.live_from = [15, 14, 16], [4, 0, 0]
    _hold_tables(manager)
    step = build_step(manager, [13, 12, 14], 2, torch.device("cpu"), trim=False, starts=[0, 3, 7])
    assert step.block_ranges == ((0, 3), (3, 2), (7, 5)) and step.block_range is None and step.shared is None
    assert step.first_entries.tolist() == [1, 0, 0]


@pytest.mark.parametrize("tables, expected", [
    ([[NULL_BLOCK, 1, 2], [4, 5, 6], [NULL_BLOCK, NULL_BLOCK, 10]], (0, 4)),  # null entries keep their places
    ([[0, 1, 2], [0, 1, 2], [0, 1, 2]], (0, 0)),  # the same blocks: one stride of 0
    ([[0, 1, 2], [4, 5, 7], [8, 9, 10]], None),  # a row whose blocks are not consecutive
    ([[0, 1, 2], [4, 5, 6], [9, 10, 11]], None),  # a row off the stride
    ([[4, 5, 6], [0, 1, 2], [8, 9, 10]], None),  # rows in another order
    ([[NULL_BLOCK, 0, 1], [4, 5, 6], [8, 9, 10]], None),  # row 0's view would start before block 0
    ([[3, 4, 5, 6], [7, 8, 9, 10], [11, 12]], None),  # a short last row whose view would end past the pool
])
def test_rows_at_one_stride_are_planned_as_one_view(tables, expected):
    """The step planner reads several rows as one strided view of the pool (`StepPlan.row_stride`) exactly when
    entry ``i`` of row ``r`` is block ``first + r * stride + i`` (null entries aside) and the view stays inside the
    pool; never on the Triton path, which reads through the tables."""
    manager = BlockManager(num_blocks=13, block_size=4)
    manager.tables = [list(table) for table in tables]
    manager.lengths = [4 * len(table) for table in tables]
    manager.live_from = [4 * sum(block == NULL_BLOCK for block in table) for table in tables]
    _hold_tables(manager)
    before = [length - 1 for length in manager.lengths]
    assert build_step(manager, before, 1, torch.device("cpu"), trim=False).row_stride == expected
    assert build_step(manager, before, 1, torch.device("cpu"), triton=True, trim=False).row_stride is None


def test_read_plan_environment_variable_is_checked(llama_pair, monkeypatch):
    """``HF_PAGED_READ_PLAN`` (the read plans a step may take, `hf_paged.step.read_plan`) refuses what it does not
    know, naming the choices."""
    _, paged = llama_pair
    monkeypatch.setenv("HF_PAGED_READ_PLAN", "window-please")
    with pytest.raises(ValueError, match="HF_PAGED_READ_PLAN must be one of auto, shared_prefix, gather"):
        paged.generate(**left_padded_batch([5, 3], seed=1), max_new_tokens=2)


# --------------------------------------------------------------------------------------------------- the mask function
# What it recognises, and the 4-D fallback for what it does not.
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


# ---------------------------------------------------------------------------------------- attention over plain tensors
def test_without_a_cache(pair):
    """``use_cache=False`` (plain keys and values, no paged metadata) gives eager's logits on a padded batch."""
    family, reference, paged = pair
    inputs = left_padded_batch([21, 9, 15], seed=3)
    with torch.no_grad():
        expected = reference(**inputs, use_cache=False).logits
        got = paged(**inputs, use_cache=False).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-4, rtol=1e-4)


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
    reference, paged = model_pair(family, reference="eager")
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
    reference, paged = model_pair(family, reference="eager")
    input_ids = random_ids(1, 20, seed=6)
    position_ids = torch.cat([torch.arange(12), torch.arange(8)])[None]
    with torch.no_grad():
        expected = reference(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        got = paged(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        unpacked = paged(input_ids=input_ids, use_cache=False).logits
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    assert (unpacked[0, 12:] - expected[0, 12:]).abs().max() > 1e-3  # the packing really changes the second part
