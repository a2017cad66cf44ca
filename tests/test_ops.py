"""Every PyTorch op of `hf_paged.ops` (the CPU path, and the kernels' reference) against plain attention over
contiguous keys and values, or a dense reference built on `ops.attend` with a full mask: paged, block-range
("window"), one-window-per-slab and shared-prefix attention, sinks and chunks, writes and block copies."""

from __future__ import annotations

import pytest
import torch

from hf_paged import masks, ops, storage
from hf_paged.step import StepPlan
from hf_paged.storage import LayerStore


def _random_paged(batch, kv_heads, dim, block_size, lengths, num_blocks=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    key_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, dim, generator=generator)
    perm = torch.randperm(num_blocks, generator=generator).tolist()
    width = max(-(-n // block_size) for n in lengths)
    tables = [[perm.pop() for _ in range(width)] for _ in range(batch)]
    return key_cache, value_cache, tables


@pytest.mark.parametrize("q", [1, 3])
def test_paged_attention_matches_contiguous_attention(q):
    batch, heads, kv_heads, dim, bs = 3, 6, 2, 16, 4
    lengths = [13, 9, 13]
    key_cache, value_cache, tables = _random_paged(batch, kv_heads, dim, bs, lengths)
    block_tables = torch.tensor(tables, dtype=torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    key_start = torch.tensor([0, 2, 5], dtype=torch.int32)
    query = torch.randn(batch, heads, q, dim)
    out = ops.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, key_start, scale=0.3,
                              max_seq_len=13, sliding_window=6)
    for row in range(batch):
        n = lengths[row]
        keys = key_cache[block_tables[row].long()].flatten(0, 1)[:n]
        values = value_cache[block_tables[row].long()].flatten(0, 1)[:n]
        for i in range(q):
            pos = n - q + i
            visible = [j for j in range(n) if key_start[row] <= j <= pos and j > pos - 6]
            for h in range(heads):
                k, v = keys[visible, h // 3], values[visible, h // 3]
                weights = torch.softmax(query[row, h, i] @ k.T * 0.3, dim=-1)
                torch.testing.assert_close(out[row, i, h], weights @ v, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["head_major", "token_major", "block_major"])
@pytest.mark.parametrize("batch, first, stride", [(3, 2, 5), (1, 4, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8])
def test_rows_in_place_are_every_layers_gathered_rows(layout, batch, first, stride, dtype):
    """`ops.rows_in_place` views a pool tensor's rows at one stride (or a single row's consecutive blocks) for every
    layer and kind at once: the same stored rows as `gather_kv` reads layer by layer; None where blocks do not
    follow token by token (a block-major slab, the Triton path's)."""
    layers, kinds, blocks, bs, heads, dim, kv_len = 3, 2, 24, 4, 2, 6, 11
    if layout == "token_major":
        pool = torch.empty(layers, kinds, blocks, bs, heads, dim, dtype=dtype)
    else:
        pool = storage.slab_tensor(layers, blocks, bs, heads, dim, torch.device("cpu"), dtype,
                                   block_major=layout == "block_major")
    pool.copy_((torch.randn(pool.shape, generator=torch.Generator().manual_seed(3)) * 40).to(dtype))
    views = ops.rows_in_place(pool, batch, kv_len, first, stride)
    if layout == "block_major":
        assert views is None
        return
    assert len(views) == layers * kinds
    tables = torch.tensor([[first + row * stride + i for i in range(3)] for row in range(batch)], dtype=torch.int32)
    for layer in range(layers):
        for kind in range(kinds):
            view = views[layer * kinds + kind]
            assert view.shape == (batch, heads, kv_len, dim) and view.dtype == dtype
            assert view.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()  # read in place
            expected = pool[layer, kind].index_select(0, tables.flatten().long()).view(batch, -1, heads, dim)
            assert torch.equal(view, expected[:, :kv_len].transpose(1, 2))
            if dtype == torch.float32:
                gathered = ops.gather_kv(pool[layer, kind], tables, kv_len, row_stride=(first, stride))
                assert torch.equal(view, gathered)


@pytest.mark.parametrize("mask_kind", ["none", "rows", "heads", "additive"])
@pytest.mark.parametrize("value_dim", [16, 8])
def test_decode_attention_over_grouped_heads(mask_kind, value_dim):
    """One query per row with GQA (``attend`` packs each KV head's query heads as its queries) equals attention
    computed head by head, for every kind of mask it may get."""
    gen = torch.Generator().manual_seed(5)
    batch, heads, kv_heads, kv_len, dim = 3, 6, 2, 11, 16
    query = torch.randn(batch, heads, 1, dim, generator=gen)
    keys = torch.randn(batch, kv_heads, kv_len, dim, generator=gen)
    values = torch.randn(batch, kv_heads, kv_len, value_dim, generator=gen)
    allowed = torch.rand(batch, heads, 1, kv_len, generator=gen) > 0.3
    allowed[..., 0] = True
    mask = {"none": None, "rows": allowed[:, :1], "heads": allowed,
            "additive": torch.zeros(batch, 1, 1, kv_len).masked_fill(~allowed[:, :1], -torch.inf)}[mask_kind]
    got = ops.attend(query, keys, values, mask, scale=0.3)
    assert got.shape == (batch, 1, heads, value_dim) and got.is_contiguous()
    for row in range(batch):
        for h in range(heads):
            visible = {"none": torch.ones(kv_len, dtype=torch.bool), "heads": allowed[row, h, 0]}.get(
                mask_kind, allowed[row, 0, 0])
            weights = torch.softmax(query[row, h, 0] @ keys[row, h // 3, visible].T * 0.3, dim=-1)
            torch.testing.assert_close(got[row, 0, h], weights @ values[row, h // 3, visible], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize(
    "groups, per_group, consecutive", [(1, 4, True), (1, 4, False), (2, 3, False)],
    ids=["one-group-in-place", "one-group-gathered", "two-groups"],
)
def test_shared_prefix_attention_equals_gathered_attention(q_len, groups, per_group, softcap, consecutive):
    kv_heads, heads, dim, bs = 2, 6, 8, 4
    batch = groups * per_group
    prefix_blocks_per_group, tail_blocks = 3, 2
    generator = torch.Generator().manual_seed(groups * 10 + per_group)
    num_blocks = 40
    key_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=generator)
    value_cache = torch.randn(num_blocks, bs, kv_heads, dim, generator=generator)
    free = list(range(num_blocks))[::-1]
    prefixes = [[5, 6, 7]] if consecutive else [[free.pop() for _ in range(3)] for _ in range(groups)]
    free = [b for b in free if b not in {5, 6, 7}]
    tables = [prefixes[row // per_group] + [free.pop() for _ in range(tail_blocks)] for row in range(batch)]
    length = prefix_blocks_per_group * bs + 6  # the tails hold 6 tokens
    seq_lens = torch.full((batch,), length, dtype=torch.int32)
    padding = torch.ones(batch, length, dtype=torch.bool)
    padding[:per_group, :3] = False  # the first group's prompt is left-padded by 3
    query = torch.randn(batch, heads, q_len, dim, generator=generator)
    block_tables = torch.tensor(tables, dtype=torch.int32)

    keys = ops.gather_kv(key_cache, block_tables, length)
    values = ops.gather_kv(value_cache, block_tables, length)
    mask = ops.causal_mask(seq_lens, None, q_len, length) & padding[:, None, None, :]
    expected = ops.attend(query, keys, values, mask, scale=0.25, softcap=softcap)

    prefix_len = prefix_blocks_per_group * bs
    tail_mask = ops.causal_mask(seq_lens - prefix_len, None, q_len, length - prefix_len) & padding[
        :, None, None, prefix_len:]
    prefix_mask = padding[::per_group, None, None, :prefix_len]
    got = ops.shared_prefix_attention(
        query, key_cache, value_cache, torch.tensor(prefixes, dtype=torch.int32),
        block_tables[:, prefix_blocks_per_group:], length - prefix_len, prefix_mask, tail_mask,
        scale=0.25, softcap=softcap, prefix_start=5 if consecutive else None,
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # The Triton kernel's reference takes the same plan with lengths and left padding instead of masks.
    key_start = torch.tensor([3] * per_group + [0] * (batch - per_group), dtype=torch.int32)
    got = ops.shared_prefix_paged_attention(
        query, key_cache, value_cache, torch.tensor(prefixes, dtype=torch.int32),
        block_tables[:, prefix_blocks_per_group:], seq_lens, key_start, scale=0.25, max_seq_len=length,
        softcap=softcap,
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("sliding_window", [None, 7])
def test_window_attention_equals_paged_attention(q_len, softcap, sliding_window):
    """Rows share leading blocks (one of them a partial block), own interleaved tails of different lengths, and the
    range holds a block no row uses; one row is left-padded and another has a padding hole."""
    kv_heads, heads, dim, bs = 2, 6, 8, 4
    generator = torch.Generator().manual_seed(q_len)
    key_cache = torch.randn(30, bs, kv_heads, dim, generator=generator)
    value_cache = torch.randn(30, bs, kv_heads, dim, generator=generator)
    shared = [10, 11, 12]
    tails = [[13, 17], [14], [15, 18], [12, 19]]  # the last row still shares the partial block 12; 16 is unused
    lengths = [20, 16, 19, 13]
    tables = [shared + tail if row < 3 else shared[:2] + tail for row, tail in enumerate(tails)]
    width = max(len(table) for table in tables)
    block_tables = torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=torch.int32)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    padding = torch.ones(4, 20, dtype=torch.bool)
    padding[1, :3] = False
    padding[2, 5] = False
    query = torch.randn(4, heads, q_len, dim, generator=generator)

    keys = ops.gather_kv(key_cache, block_tables, 20)
    values = ops.gather_kv(value_cache, block_tables, 20)
    mask = ops.causal_mask(seq_lens, None, q_len, 20, sliding_window) & padding[:, None, None, :]
    expected = ops.attend(query, keys, values, mask, scale=0.25, softcap=softcap)

    window = ops.range_mask(block_tables, seq_lens, q_len, 10, 10, bs, groups=3, dtype=query.dtype,
                             key_padding=padding, sliding_window=sliding_window)
    assert window.shape == (1, 1, 4 * 3 * q_len, 40)
    assert torch.all(window[..., 6 * bs:7 * bs] == -torch.inf)  # block 16 is nobody's
    got = ops.range_attention(query, key_cache, value_cache, 10, 10, window, scale=0.25, softcap=softcap)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_reshape_and_cache_skips_negative_slots_and_copy_blocks_copies_every_layer():
    key_cache = torch.zeros(4, 2, 1, 3)
    value_cache = torch.zeros(4, 2, 1, 3)
    key = torch.arange(9.0).view(3, 1, 3)
    ops.reshape_and_cache(key, -key, key_cache, value_cache, torch.tensor([5, -1, 0]))
    assert torch.equal(key_cache[2, 1, 0], key[0, 0]) and torch.equal(key_cache[0, 0, 0], key[2, 0])
    assert torch.equal(value_cache[2, 1, 0], -key[0, 0]) and key_cache.count_nonzero() == 5
    pool = torch.randn(3, 2, 4, 2, 1, 3)
    before = pool.clone()
    ops.copy_blocks(pool, torch.tensor([0, 1]), torch.tensor([3, 2]))
    assert torch.equal(pool[:, :, 3], before[:, :, 0]) and torch.equal(pool[:, :, 2], before[:, :, 1])
    assert torch.equal(pool[:, :, :2], before[:, :, :2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.float8_e4m3fn])
def test_reshape_and_cache_through_slot_views_writes_the_pools(dtype):
    """Writing through the pools' `slot_view`s (what a `KVPool` keeps per layer for the PyTorch path) stores in the
    pools what writing through the pools stores, 8-bit rows included."""
    width = 6 if dtype == torch.float32 else 8  # 8-bit rows: 6 codes, then the float16 scale
    states = torch.randn(3, 2, 6, generator=torch.Generator().manual_seed(0))
    slots = torch.tensor([5, 0, 7])
    pools = [torch.zeros(4, 2, 2, width * dtype.itemsize, dtype=torch.uint8).view(dtype) for _ in range(4)]
    ops.reshape_and_cache(states, -states, pools[0], pools[1], slots)
    ops.reshape_and_cache(states, -states, ops.slot_view(pools[2]), ops.slot_view(pools[3]), slots)
    for direct, through_views in ((pools[0], pools[2]), (pools[1], pools[3])):
        assert direct.view(torch.uint8).count_nonzero() > 0
        assert torch.equal(through_views.view(torch.uint8), direct.view(torch.uint8))


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
    mask = ops.range_mask(tables, seq_lens, query.shape[2], first, count, key_cache.shape[1], groups=2,
                           dtype=query.dtype, key_padding=padding, sliding_window=window, chunk_size=chunk)
    got = ops.range_attention(query, key_cache, value_cache, first, count, mask, scale=0.5, sinks=sinks)
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


@pytest.mark.parametrize(("softcap", "sinks", "window"), [(None, False, None), (5.0, False, 7), (None, True, None)])
def test_ranges_attention_equals_paged_attention(softcap, sinks, window):
    """One window per slab, merged by log-sum-exp, equals `ops.paged_attention` over the same blocks in one tensor,
    null entries (dead leading blocks, 0 in the tensors) skipped, queries that see nothing in a slab included."""
    generator = torch.Generator().manual_seed(1)
    starts, sizes, bs = [0, 3, 7], [3, 4, 5], 4
    slabs = [storage.slab_tensor(1, n, bs, 2, 8, torch.device("cpu"), torch.float32) for n in sizes]
    for slab in slabs:
        slab.copy_(torch.randn(slab.shape, generator=generator))
    keys, values = (LayerStore([slab[0, kind] for slab in slabs], starts) for kind in (0, 1))
    whole = torch.cat(slabs, dim=2)[0]
    tables = [[-1, 2, 3, 4], [0, 1, 8, 9], [7, 8, 10, 11]]  # row 0: a null entry, then blocks of slabs 0 and 1
    seq_lens = torch.tensor([15, 14, 16], dtype=torch.int32)
    q_len = 2
    # Per slab, the range from the lowest to the highest block the rows use there (as the step planner reads these
    # tables: tests/test_attention.py::test_a_pool_of_several_slabs_is_read_one_window_per_slab).
    ranges = ((0, 3), (3, 2), (7, 5))
    first_entries = torch.tensor([1, 0, 0])
    block_tables = torch.tensor([[max(b, 0) for b in table] for table in tables], dtype=torch.int32)
    step = StepPlan(block_tables=block_tables, seq_lens=seq_lens, slot_mapping=None, q_len=q_len, max_seq_len=16,
                    block_size=bs, block_ranges=ranges, first_entries=first_entries)
    query = torch.randn(3, 4, q_len, 8, generator=generator)
    sink = torch.randn(4, generator=generator) if sinks else None
    range_masks = masks.ranges_masks(step, None, window, 2, torch.float32)
    got = ops.ranges_attention(query, keys, values, step.block_ranges, range_masks, scale=0.3, softcap=softcap,
                                sinks=sink)
    expected = ops.paged_attention(query, whole[0], whole[1], block_tables, seq_lens, (first_entries * bs).to(
        torch.int32), scale=0.3, max_seq_len=16, sliding_window=window, softcap=softcap, sinks=sink)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
