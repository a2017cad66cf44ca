"""Shared-prefix (cascade) paged attention: rows that share leading blocks read those blocks once.

When the ``R`` rows of a group (the beams or samples of one prompt, or prompts behind one system prompt) share
their first ``F`` blocks, plain paged attention reads those blocks ``R`` times per step. Here a step takes three
launches:

1. `shared_prefix_kernel`: grid (groups x packed-row tiles, KV heads, prefix splits). A tile's rows are the
   queries of *all* the group's rows for one KV head (row, query token, query head of the KV head), so each
   prefix key/value tile is loaded once for the whole group. It writes unnormalised fp32 partials with their
   running max (base 2) and sum, the split-KV format of `paged_attention_kernel`. It also writes the tail pass's
   lengths and first keys (``seq_lens - P`` and ``max(key_start - P, 0)`` with ``P = F * bs``), which saves two
   elementwise launches per layer.
2. `paged_attention_kernel` (imported unchanged) over each row's tail blocks, in its split-KV mode (at least two
   splits), writing its partials beside the prefix's.
3. `reduce_splits_kernel` (imported unchanged) merges all partials of a query by log-sum-exp.

The reference is `hf_paged.ops.shared_prefix_paged_attention`: paged attention over the tables
``prefix_blocks[g] + tail_tables[b]``. Masks are per query row, so rows of a group may differ in left padding
inside the prefix, and a prefix may even hold keys later than some queries (causal masking applies there too);
a sliding window applies in both passes. 8-bit pools are dequantized as their tiles are loaded, in both passes, as
in `paged_attention_kernel`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_paged import ops
from hf_paged.ops import shared_prefix_paged_attention as shared_prefix_paged_attention_reference

from ._launch import (
    FLOAT_DTYPES,
    Launch,
    check_caches,
    check_device,
    check_dtype,
    check_shape,
    interpreting,
    kept,
    next_power_of_2,
    resolve_offsets,
    settled,
    split_buffers,
    tensor_key,
)
from ._quant import codes_of, dequantize, load_magnitude, raw
from .paged_attention import choose_num_splits
from .paged_attention_kernel import (
    base2_scores,
    head_pointers,
    key_value_slots,
    online_softmax,
    paged_attention_kernel,
    paged_attention_meta,
    reduce_splits_kernel,
    reduce_splits_meta,
    split_tiles,
    tile_config,
    tile_dot,
)

__all__ = [
    "launch_shared_prefix_attention",
    "shared_prefix_kernel",
    "shared_prefix_meta",
    "shared_prefix_paged_attention",
    "shared_prefix_paged_attention_reference",
    "shared_prefix_splits",
]


@triton.jit
def shared_prefix_kernel(
    partial_ptr,  # fp32 [B, q, H, S, D]: unnormalised partial outputs; this kernel writes splits FIRST_SPLIT...
    max_ptr, sum_ptr,  # fp32 [B, q, H, S]: running max (base 2) and sum; split stride 1
    tail_lens_ptr,  # int32 [2, B], written: seq_lens - P and max(key_start - P, 0)
    query_ptr,  # [B, H, q, D], any strides
    key_cache_ptr, value_cache_ptr,  # [N, bs, Hkv, D], any strides (8-bit: D + 2)
    key_offsets_ptr, value_offsets_ptr,  # [N] int64 element offset of each block (read only if HAS_OFFSETS)
    prefix_blocks_ptr,  # [G, F] int32
    seq_lens_ptr,  # [B] int32
    key_start_ptr,  # [B] int32 (read only if HAS_KEY_START)
    scale, softcap,  # fp32; softcap read only if USE_SOFTCAP
    window,  # int; read only if USE_WINDOW
    batch, q_len, group_rows, prefix_len, num_m_tiles, first_split,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kn, stride_kt, stride_kh, stride_kd,
    stride_vn, stride_vt, stride_vh, stride_vd,
    stride_pbg, stride_pbn,
    stride_ob, stride_ot, stride_oh, stride_os,
    stride_mb, stride_mt, stride_mh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_M: tl.constexpr,  # rows per tile = BLOCK_Q * GROUP rounded up to a power of two (>= 16)
    BLOCK_Q: tl.constexpr,  # (row, query token) pairs per tile
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    NUM_SPLITS: tl.constexpr,  # pieces the prefix is cut into (grid axis 2)
    HAS_KEY_START: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,  # both products in fp32 (fp32 storage, or the interpreter, which has no bf16 dot)
    HAS_OFFSETS: tl.constexpr,  # block b starts at key/value_offsets[b] (slabs), not b * stride_kn / vn
    CODES: tl.constexpr,  # 8-bit pools (hf_paged.kernels._quant): 0 none, 1 int8, 2 float8_e4m3fn (as uint8)
):
    """Program (g * num_m_tiles + tile, kv_head, split): one tile of group g's packed queries against its prefix."""
    group_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    g = group_tile // num_m_tiles
    tile = group_tile % num_m_tiles

    # Row r of the tile is pair t = tile * BLOCK_Q + r // GROUP of the group (row t // q, query token t % q), for
    # query head kv_head * GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    pair = tile * BLOCK_Q + rows // GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (pair < group_rows * q_len)
    b = g * group_rows + pair // q_len
    token = pair % q_len
    head = kv_head * GROUP + rows % GROUP
    seq_len = tl.load(seq_lens_ptr + b, mask=row_valid, other=0)
    position = seq_len - q_len + token
    if HAS_KEY_START:
        key_start = tl.load(key_start_ptr + b, mask=row_valid, other=0)
    else:
        key_start = tl.zeros([BLOCK_M], dtype=tl.int32)

    # The tail pass's inputs, once per row of the batch (its first query token, first head, first program).
    if kv_head + split == 0:
        lead = row_valid & (token == 0) & (rows % GROUP == 0)
        tl.store(tail_lens_ptr + b, seq_len - prefix_len, mask=lead)
        tl.store(tail_lens_ptr + batch + b, tl.maximum(key_start - prefix_len, 0), mask=lead)

    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    q_ptrs = (query_ptr + b[:, None].to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh
              + token[:, None].to(tl.int64) * stride_qt + dims[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    elif CODES == 0:  # products in the storage's dtype; over 8-bit codes in the query's
        q = q.to(key_cache_ptr.dtype.element_ty)

    # Prefix keys any row of this tile can see: [lo, hi].
    lo = tl.min(tl.where(row_valid, key_start, prefix_len), axis=0)
    if USE_WINDOW:
        lo = tl.maximum(lo, tl.min(tl.where(row_valid, position, prefix_len + window), axis=0) - window + 1)
    hi = tl.minimum(tl.max(tl.where(row_valid, position, -1), axis=0), prefix_len - 1)
    tile_lo = lo // BLOCK_N
    tile_hi = tl.where(hi >= lo, hi // BLOCK_N + 1, tile_lo)
    tile_lo, tile_hi = split_tiles(tile_lo, tile_hi, split, NUM_SPLITS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    table_ptr = prefix_blocks_ptr + g.to(tl.int64) * stride_pbg
    k_head_ptr, v_head_ptr = head_pointers(key_cache_ptr, value_cache_ptr, kv_head, stride_kh, stride_vh, CODES)
    cols = tl.arange(0, BLOCK_N)
    for j in range(tile_lo, tile_hi):
        keys = j * BLOCK_N + cols
        key_valid = (keys >= lo) & (keys <= hi)
        k_slot, v_slot = key_value_slots(table_ptr, stride_pbn, keys, key_valid, key_offsets_ptr, value_offsets_ptr,
                                         stride_kn, stride_kt, stride_vn, stride_vt, kv_head, stride_kh, stride_vh,
                                         BLOCK_SIZE, HAS_OFFSETS, CODES)
        k = tl.load(k_head_ptr + k_slot[None, :] + dims[:, None] * stride_kd,
                    mask=key_valid[None, :] & dim_valid[:, None], other=0.0)  # [D, BLOCK_N]
        v = tl.load(v_head_ptr + v_slot[:, None] + dims[None, :] * stride_vd,
                    mask=key_valid[:, None] & dim_valid[None, :], other=0.0)  # [BLOCK_N, D]
        if CODES != 0:
            k = dequantize(k, load_magnitude(k_head_ptr + k_slot + HEAD_DIM, key_valid)[None, :], CODES).to(q.dtype)
            v = dequantize(v, load_magnitude(v_head_ptr + v_slot + HEAD_DIM, key_valid)[:, None], CODES).to(q.dtype)
        s = base2_scores(tile_dot(q, k, UPCAST), scale, softcap, USE_SOFTCAP)

        visible = (row_valid[:, None] & key_valid[None, :] & (keys[None, :] <= position[:, None])
                   & (keys[None, :] >= key_start[:, None]))
        if USE_WINDOW:
            visible = visible & (keys[None, :] > position[:, None] - window)
        s = tl.where(visible, s, float("-inf"))

        p, alpha, m_i, l_i = online_softmax(s, m_i, l_i)
        acc = acc * alpha[:, None] + tile_dot(p, v, UPCAST)

    slot = first_split + split
    b64, token64, head64 = b.to(tl.int64), token.to(tl.int64), head.to(tl.int64)
    out_ptrs = (partial_ptr + b64[:, None] * stride_ob + token64[:, None] * stride_ot + head64[:, None] * stride_oh
                + slot * stride_os + dims[None, :])
    tl.store(out_ptrs, acc, mask=row_valid[:, None] & dim_valid[None, :])
    stat_offsets = b64 * stride_mb + token64 * stride_mt + head64 * stride_mh + slot
    tl.store(max_ptr + stat_offsets, m_i, mask=row_valid)
    tl.store(sum_ptr + stat_offsets, l_i, mask=row_valid)


def shared_prefix_meta(
    group_rows: int,
    q_len: int,
    group: int,
    head_dim: int,
    block_size: int,
    num_splits: int,
    *,
    has_key_start: bool,
    has_window: bool,
    has_softcap: bool,
    fp32_storage: bool,
    upcast: bool,
    has_offsets: bool = False,
    codes: int = 0,
) -> dict[str, int | bool]:
    """Every constexpr of `shared_prefix_kernel` plus ``num_warps`` and ``num_stages`` (shared by the launcher and
    the AOT check).

    The tile packs ``group_rows * q_len`` (row, token) pairs times ``group`` heads, sized as `tile_config` sizes a
    multi-token query of that many tokens. ``codes``: 8-bit pools, as in `paged_attention_meta`.
    """
    return {
        **tile_config(group_rows * q_len, group, head_dim, fp32_storage, codes=codes),
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": next_power_of_2(head_dim),
        "GROUP": group,
        "BLOCK_SIZE": block_size,
        "NUM_SPLITS": num_splits,
        "HAS_KEY_START": has_key_start,
        "USE_WINDOW": has_window,
        "USE_SOFTCAP": has_softcap,
        "UPCAST": upcast,
        "HAS_OFFSETS": has_offsets,
        "CODES": codes,
    }


def shared_prefix_splits(
    prefix_programs: int, prefix_len: int, tail_programs: int, tail_len: int, block_n: int, device: torch.device
) -> tuple[int, int]:
    """``(prefix splits, tail splits)`` by `choose_num_splits`; the tail gets at least 2, since the tail pass runs
    `paged_attention_kernel` in its split-KV mode (the mode that writes partials)."""
    prefix = choose_num_splits(prefix_programs, prefix_len, block_n, device)
    tail = max(2, choose_num_splits(tail_programs, tail_len, block_n, device))
    return prefix, tail


def _check_inputs(query, key_cache, value_cache, prefix_blocks, tail_tables, seq_lens, key_start, sliding_window,
                  has_offsets=False):
    check_device(query=query, key_cache=key_cache, value_cache=value_cache, prefix_blocks=prefix_blocks,
                 tail_tables=tail_tables, seq_lens=seq_lens, key_start=key_start)
    check_dtype("query", query, FLOAT_DTYPES)
    check_caches(key_cache, value_cache)
    for name, t in (("prefix_blocks", prefix_blocks), ("tail_tables", tail_tables), ("seq_lens", seq_lens)):
        check_dtype(name, t, (torch.int32,))
    check_shape("query", query, (None, None, None, None), "[B, H, q, D]")
    batch, heads, _, head_dim = query.shape
    check_shape("key_cache", key_cache, (None, None, None, head_dim + key_cache.shape[-1] - ops.head_dim(key_cache)),
                "[N, bs, Hkv, D] with the query's D")
    # With offset tables the caches are views of their base slabs, whose block counts may differ.
    value_blocks = None if has_offsets else key_cache.shape[0]
    check_shape("value_cache", value_cache, (value_blocks, *key_cache.shape[1:]), "[N, bs, Hkv, D] like key_cache")
    kv_heads = key_cache.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of the cache's KV heads ({kv_heads})")
    check_shape("prefix_blocks", prefix_blocks, (None, None), "[G, F]")
    groups = prefix_blocks.shape[0]
    if groups == 0 or batch % groups:
        raise ValueError(f"prefix_blocks has {groups} groups, which must divide the {batch} rows of the query")
    check_shape("tail_tables", tail_tables, (batch, None), "[B, nt]")
    check_shape("seq_lens", seq_lens, (batch,), "[B]")
    if key_start is not None:
        check_dtype("key_start", key_start, (torch.int32,))
        check_shape("key_start", key_start, (batch,), "[B]")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive number of tokens or None, got {sliding_window}")


def launch_shared_prefix_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    prefix_blocks: torch.Tensor,
    tail_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    key_start: torch.Tensor | None = None,
    *,
    scale: float,
    max_seq_len: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: tuple[int, int] | None = None,
    key_offsets: torch.Tensor | None = None,
    value_offsets: torch.Tensor | None = None,
    workspace: dict | None = None,
) -> torch.Tensor:
    """`shared_prefix_paged_attention` with the split choice exposed: ``num_splits=(prefix, tail)`` forces them
    (the tail needs at least 2), None asks `shared_prefix_splits`."""
    tensors = tensor_key(query, key_cache, value_cache, prefix_blocks, tail_tables, seq_lens, key_start, key_offsets,
                         value_offsets, fresh=1)
    setup = settled(
        None if tensors is None else ("shared_prefix_attention", tensors, sliding_window, softcap is None),
        lambda: _settle(query, key_cache, value_cache, prefix_blocks, tail_tables, seq_lens, key_start,
                        sliding_window, softcap, key_offsets, value_offsets))
    offsets = resolve_offsets(key_cache, value_cache, key_offsets, value_offsets, settled=True)
    if max_seq_len > setup.max_keys:
        raise ValueError(
            f"max_seq_len ({max_seq_len}) exceeds what prefix_blocks and tail_tables can address "
            f"({prefix_blocks.shape[1] + tail_tables.shape[1]} blocks x {key_cache.shape[1]} tokens)"
        )
    batch, heads, q_len, head_dim = query.shape
    if num_splits is None:
        num_splits = shared_prefix_splits(setup.prefix_programs, setup.prefix_len, setup.tail_programs,
                                          max(max_seq_len - setup.prefix_len, 1), setup.block_n, query.device)
    prefix_splits, tail_splits = num_splits
    if prefix_splits < 1 or tail_splits < 2:
        raise ValueError(f"num_splits must be (prefix >= 1, tail >= 2), got {num_splits}")
    offset_tables = offsets if offsets is not None else (prefix_blocks, prefix_blocks)  # unread without a table

    out = torch.empty(batch, q_len, heads, head_dim, dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    total_splits = prefix_splits + tail_splits
    partial, running_max, running_sum = split_buffers(workspace, batch, q_len, heads, total_splits, head_dim,
                                                      query.device)
    tail_lens = kept(workspace, ("tail_lens", batch, query.device),
                     lambda: torch.empty(2, batch, dtype=torch.int32, device=query.device))
    seq_lens = seq_lens.contiguous()
    key_start = key_start.contiguous() if key_start is not None else None

    prefix_pass, tail_pass, merge = setup.launches_for(prefix_splits, tail_splits)
    prefix_pass(
        partial, running_max, running_sum, tail_lens,
        query, raw(key_cache), raw(value_cache), *offset_tables, prefix_blocks, seq_lens,
        key_start if key_start is not None else seq_lens,
        float(scale), float(softcap) if softcap is not None else 1.0,
        int(sliding_window) if sliding_window is not None else 0,
        batch, q_len, setup.group_rows, setup.prefix_len, setup.num_m_tiles, tail_splits,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *prefix_blocks.stride(),
        *partial.stride()[:4], *running_max.stride()[:3],
    )
    tail_pass(
        partial, running_max, running_sum,
        query, raw(key_cache), raw(value_cache), *offset_tables, tail_tables, tail_lens[0], tail_lens[1],
        float(scale), float(softcap) if softcap is not None else 1.0,
        int(sliding_window) if sliding_window is not None else 0,
        tail_lens[1], 0,  # no sinks (the prefix pass applies them), no chunking
        q_len, setup.num_q_tiles,
        *query.stride(), *key_cache.stride(), *value_cache.stride(), *tail_tables.stride(),
        *partial.stride()[:4], *running_max.stride()[:3],
    )
    merge(out, partial, running_max, running_sum)
    return out


class _Settled:
    """What a call of `launch_shared_prefix_attention` settles once per key (`hf_paged.kernels._launch.settled`):
    its checks passed, the sizes, and the three launches per pair of split counts."""

    def __init__(self, query, key_cache, prefix_blocks, tail_tables, sliding_window, softcap, has_key_start,
                 has_offsets):
        batch, heads, q_len, head_dim = query.shape
        _, block_size, kv_heads, _ = key_cache.shape
        groups, prefix_width = prefix_blocks.shape
        self.batch, self.heads, self.q_len, self.head_dim = batch, heads, q_len, head_dim
        self.block_size, self.kv_heads, self.groups = block_size, kv_heads, groups
        self.group_rows, self.group = batch // groups, heads // kv_heads
        self.prefix_len = prefix_width * block_size
        self.max_keys = (prefix_width + tail_tables.shape[1]) * block_size
        codes = codes_of(key_cache.dtype)
        # Products in float32: float32 storage, or 8-bit codes and a float32 query (they run in the query's dtype).
        fp32_storage = (query.dtype if codes else key_cache.dtype) == torch.float32
        upcast = fp32_storage or interpreting()  # the interpreter has no bf16 dot
        self.flags = {"has_key_start": has_key_start, "has_window": sliding_window is not None,
                      "has_softcap": softcap is not None, "fp32_storage": fp32_storage, "upcast": upcast,
                      "has_offsets": has_offsets, "codes": codes}
        prefix_tiles = tile_config(self.group_rows * q_len, self.group, head_dim, fp32_storage, codes=codes)
        self.num_m_tiles = -(-self.group_rows * q_len // prefix_tiles["BLOCK_Q"])
        tail_tiles = tile_config(q_len, self.group, head_dim, fp32_storage, codes=codes)
        self.num_q_tiles = -(-q_len // tail_tiles["BLOCK_Q"])
        self.block_n = tail_tiles["BLOCK_N"]
        self.prefix_programs = groups * self.num_m_tiles * kv_heads
        self.tail_programs = batch * self.num_q_tiles * kv_heads
        self.launches: dict[tuple[int, int], tuple[Launch, Launch, Launch]] = {}

    def launches_for(self, prefix_splits: int, tail_splits: int) -> tuple[Launch, Launch, Launch]:
        """The prefix pass, the tail pass and the merge."""
        found = self.launches.get((prefix_splits, tail_splits))
        if found is None:
            meta = shared_prefix_meta(self.group_rows, self.q_len, self.group, self.head_dim, self.block_size,
                                      prefix_splits, **self.flags)
            tail_meta = paged_attention_meta(self.q_len, self.group, self.head_dim, self.block_size, tail_splits,
                                             **self.flags)
            found = self.launches[(prefix_splits, tail_splits)] = (
                Launch(shared_prefix_kernel, (self.groups * self.num_m_tiles, self.kv_heads, prefix_splits), meta),
                Launch(paged_attention_kernel, (self.batch * self.num_q_tiles, self.kv_heads, tail_splits),
                       tail_meta),
                Launch(reduce_splits_kernel, (self.batch * self.q_len * self.heads,),
                       reduce_splits_meta(self.head_dim, prefix_splits + tail_splits)),
            )
        return found


def _settle(query, key_cache, value_cache, prefix_blocks, tail_tables, seq_lens, key_start, sliding_window, softcap,
            key_offsets, value_offsets) -> _Settled:
    has_offsets = key_offsets is not None or value_offsets is not None
    _check_inputs(query, key_cache, value_cache, prefix_blocks, tail_tables, seq_lens, key_start, sliding_window,
                  has_offsets=has_offsets)
    resolve_offsets(key_cache, value_cache, key_offsets, value_offsets)
    return _Settled(query, key_cache, prefix_blocks, tail_tables, sliding_window, softcap, key_start is not None,
                    has_offsets)


def shared_prefix_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    prefix_blocks: torch.Tensor,
    tail_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    key_start: torch.Tensor | None = None,
    *,
    scale: float,
    max_seq_len: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
    key_offsets: torch.Tensor | None = None,
    value_offsets: torch.Tensor | None = None,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Paged attention where groups of rows share leading blocks, reading them once per group (Triton; same
    contract as `hf_paged.ops.shared_prefix_paged_attention`).

    Args:
        query: ``[B, H, q, D]``, any strides (Transformers passes a transposed view).
        key_cache, value_cache: ``[N, bs, Hkv, D]`` pools, any strides; or 8-bit pools ``[N, bs, Hkv, D + 2]``
            (as in `hf_paged.kernels.paged_attention`).
        prefix_blocks: ``[G, F]`` int32: rows ``[g * R, (g + 1) * R)`` (``R = B / G``) start with these blocks.
        tail_tables: ``[B, nt]`` int32: each row's blocks after its prefix.
        seq_lens: ``[B]`` int32, tokens of each row (prefix included) including this step's ``q``.
        key_start: ``[B]`` int32 first attended key (left padding), or None for 0.
        scale: multiplies ``q @ k^T``.
        max_seq_len: ``max(seq_lens)`` as a Python int (sizes the split choice; no device sync).
        sliding_window: attend only to the last `sliding_window` positions (the query's own included), or None.
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` after scaling.
        key_offsets, value_offsets: ``[N]`` int64 per-block element offsets for a pool of several slabs, as in
            `hf_paged.kernels.paged_attention` (values default to the keys' table; None: one tensor).
        workspace: where calls on one stream keep their scratch tensors to use again, as in
            `hf_paged.kernels.paged_attention`; None: new ones per call.

    Returns:
        ``[B, q, H, D]`` contiguous, in the query's dtype; query rows with no visible key are zero.
    """
    return launch_shared_prefix_attention(
        query, key_cache, value_cache, prefix_blocks, tail_tables, seq_lens, key_start,
        scale=scale, max_seq_len=max_seq_len, sliding_window=sliding_window, softcap=softcap,
        key_offsets=key_offsets, value_offsets=value_offsets, workspace=workspace,
    )
