"""Paged attention's Triton kernels and their compile-time configuration (`paged_attention_meta`, shared by the
launcher, `hf_paged.kernels.paged_attention`, and the AOT check): queries against keys and values stored in
blocks named by a block table.

One kernel family serves decode (``q == 1``) and multi-token queries over cached context (prefill, chunked prefill,
speculative verification): query ``i`` of row ``b`` sits at ``p = seq_lens[b] - q + i`` and attends to keys
``key_start[b] <= j <= p`` (and ``j > p - window``; with chunked attention only keys of its own chunk,
``(j - key_start) // chunk == (p - key_start) // chunk``), as in `hf_paged.ops`. Attention sinks add one logit per
query head to every softmax denominator: the running max and sum start from it (in the first split only).

8-bit pools (`hf_paged.quant`: int8 or float8_e4m3fn codes and a float16 magnitude per token and head) are
dequantized as their tiles are loaded (`hf_paged.kernels._quant.dequantize`: ``code * magnitude / qmax`` in float32,
as `hf_paged.quant.decode`), then cast to the query's dtype for the products (its float32 with the interpreter or a
float32 query), as the reference attends over decoded keys cast to the query's dtype. A stored row is ``D + 2``
bytes, 2-byte aligned, so such tiles are loaded 2 bytes at a time into registers; latent tiles of 256 latents and more
(``HALVES``) are then taken in two halves, each loaded once for the scores and once more for the values, which keeps
DeepSeek-V3's 512-wide tile free of register spills on sm_80.

Multi-head latent attention (``latent=True``: DeepSeek-style layers served with absorbed weights, `hf_paged.latent`):
the key pool holds the compressed latents ``c`` and the value pool the shared rotary keys ``k_rot`` of one KV head.
The keys are ``[c | k_rot]``, read from both pools in place, the values are ``c`` (the key tile already loaded), and
the query is ``[q_latent | q_rot]``; the caller projects queries into the latent space and the output back out.

Layout of the work (see docs/KERNELS.md for the cost model):

* The grid is (rows x query tiles, KV heads, splits). A tile's ``BLOCK_M`` rows are ``BLOCK_Q`` query tokens times
  the ``GROUP`` query heads that share one KV head (GQA packing), so each key/value tile is loaded once for all of
  them and both products are ``tl.dot`` calls with an ``M`` of at least 16 (matrix units even at decode).
* Each program walks the block table over the keys its rows can see (causal limit, left padding, sliding window),
  ``BLOCK_N`` keys at a time, with an online softmax in fp32 (base 2).
* Split-KV (flash-decoding): with few programs and long contexts, the key range of each tile is cut into
  ``num_splits`` pieces handled by separate programs that write partial outputs with their max and sum; a second
  kernel merges them. `hf_paged.kernels.paged_attention.choose_num_splits` decides.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._launch import next_power_of_2
from ._quant import dequantize, load_magnitude

__all__ = ["base2_scores", "head_pointers", "key_value_slots", "online_softmax", "paged_attention_kernel",
           "paged_attention_meta", "reduce_splits_kernel", "reduce_splits_meta", "split_tiles", "tile_config", "tile_dot"]


@triton.jit
def _tanh(x):
    """tanh that saturates cleanly for large |x| (no inf/inf)."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def tile_dot(a, b, UPCAST: tl.constexpr):
    """``a @ b``: in float32 (``ieee``) if UPCAST, else with `a` in `b`'s dtype."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def split_tiles(tile_lo, tile_hi, split, NUM_SPLITS: tl.constexpr):
    """``(first, end)`` of the key tiles that split `split` of `NUM_SPLITS` walks, of ``tile_lo .. tile_hi - 1``."""
    if NUM_SPLITS > 1:
        per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + split * per_split
        tile_hi = tl.minimum(tile_hi, tile_lo + per_split)
    return tile_lo, tile_hi


#: log2(e): scores and sinks are kept in base 2, for ``exp2``.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def base2_scores(s, scale, softcap, USE_SOFTCAP: tl.constexpr):
    """Raw scores ``q . k`` scaled, soft-capped if USE_SOFTCAP, and in base 2 (times log2 e) for ``exp2``."""
    s = s * scale
    if USE_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    return s * LOG2E


@triton.jit
def online_softmax(s, m_i, l_i):
    """One key tile of the online softmax over base-2 scores `s` (``-inf`` where not visible), against each row's
    running max `m_i` and sum `l_i`: ``(p, alpha, m_new, l_new)``, the tile's weights, the factor that rescales the
    row's earlier sum and output, and the new max and sum."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _store_out(ptrs, acc, l_i, mask, NUM_SPLITS: tl.constexpr):
    """Store a tile's output: fp32 partials with splits, else ``acc / l_i`` in the output's dtype."""
    if NUM_SPLITS > 1:
        tl.store(ptrs, acc, mask=mask)
    else:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(ptrs, out.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def head_pointers(key_cache_ptr, value_cache_ptr, kv_head, stride_kh, stride_vh, CODES: tl.constexpr):
    """Where KV head `kv_head`'s rows start in the key and value caches. Over 8-bit codes, the caches themselves:
    the head's offset joins each row's in `key_value_slots`, where the sum keeps its 2-byte alignment hint."""
    if CODES != 0:
        k_head_ptr = key_cache_ptr
        v_head_ptr = value_cache_ptr
    else:
        k_head_ptr = key_cache_ptr + kv_head.to(tl.int64) * stride_kh
        v_head_ptr = value_cache_ptr + kv_head.to(tl.int64) * stride_vh
    return k_head_ptr, v_head_ptr


@triton.jit
def key_value_slots(table_ptr, stride_table, keys, key_valid, key_offsets_ptr, value_offsets_ptr,
                    stride_kn, stride_kt, stride_vn, stride_vt, kv_head, stride_kh, stride_vh,
                    BLOCK_SIZE: tl.constexpr, HAS_OFFSETS: tl.constexpr, CODES: tl.constexpr):
    """Element offsets of `keys` (token positions of one row, ``[BLOCK_N]``) from `head_pointers`: through the
    row's block table, then the block's offset table entry (a pool of several slabs) or its id x block stride."""
    block = tl.load(table_ptr + (keys // BLOCK_SIZE) * stride_table, mask=key_valid, other=0).to(tl.int64)
    if HAS_OFFSETS:
        # multiples of 16 elements (checked by the launcher): the loads after this stay 16-byte vectors
        k_block = tl.multiple_of(tl.load(key_offsets_ptr + block, mask=key_valid, other=0), 16)
        v_block = tl.multiple_of(tl.load(value_offsets_ptr + block, mask=key_valid, other=0), 16)
    else:
        k_block = block * stride_kn
        v_block = block * stride_vn
    k_slot = k_block + (keys % BLOCK_SIZE) * stride_kt
    v_slot = v_block + (keys % BLOCK_SIZE) * stride_vt
    if CODES != 0:  # 8-bit rows (codes, then the row's magnitude) start at even offsets: 2-byte loads
        k_slot = tl.multiple_of(k_slot + kv_head.to(tl.int64) * stride_kh, 2)
        v_slot = tl.multiple_of(v_slot + kv_head.to(tl.int64) * stride_vh, 2)
    return k_slot, v_slot


@triton.jit
def paged_attention_kernel(
    out_ptr,  # [B, q, H, Dv] output, or with NUM_SPLITS > 1 fp32 partials [B, q, H, S, Dv]
    max_ptr, sum_ptr,  # NUM_SPLITS > 1: fp32 [B, q, H, S] running max (base 2) and sum; unused otherwise
    query_ptr,  # [B, H, q, D], any strides
    key_cache_ptr, value_cache_ptr,  # [N, bs, Hkv, D] and [N, bs, Hkv, Dv], any strides (8-bit: D + 2, Dv + 2)
    key_offsets_ptr, value_offsets_ptr,  # [N] int64 element offset of each block (read only if HAS_OFFSETS)
    block_tables_ptr,  # [B, nb] int32
    seq_lens_ptr,  # [B] int32
    key_start_ptr,  # [B] int32 (read only if HAS_KEY_START)
    scale, softcap,  # fp32; softcap read only if USE_SOFTCAP
    window,  # int; read only if USE_WINDOW
    sinks_ptr,  # [H] fp32 sink logits (read only if HAS_SINKS)
    chunk,  # int chunk size; read only if USE_CHUNK
    q_len, num_q_tiles,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kn, stride_kt, stride_kh, stride_kd,
    stride_vn, stride_vt, stride_vh, stride_vd,
    stride_btb, stride_btn,
    stride_ob, stride_ot, stride_oh, stride_os,  # stride_os: split stride of the partials
    stride_mb, stride_mt, stride_mh,  # max/sum partials; their split stride is 1
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    V_DIM: tl.constexpr,  # the values' head dim (differs from HEAD_DIM in multi-head latent attention)
    V_DIM_PAD: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_M: tl.constexpr,  # rows per tile = BLOCK_Q * GROUP rounded up to a power of two (>= 16)
    BLOCK_Q: tl.constexpr,  # query tokens per tile
    BLOCK_N: tl.constexpr,  # keys per inner step
    BLOCK_SIZE: tl.constexpr,  # tokens per cache block
    NUM_SPLITS: tl.constexpr,
    HAS_KEY_START: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr,
    USE_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,  # do both products in fp32 (fp32 storage, or the interpreter, which has no bf16 dot)
    HAS_OFFSETS: tl.constexpr,  # block b starts at key/value_offsets[b] (slabs), not b * stride_kn / vn
    ROPE_DIM: tl.constexpr,  # > 0: latent mode, the value cache holds the keys' last ROPE_DIM dims (module doc)
    ROPE_DIM_PAD: tl.constexpr,
    CODES: tl.constexpr,  # 8-bit pools (hf_paged.kernels._quant): 0 none, 1 int8, 2 float8_e4m3fn (as uint8)
    HALVES: tl.constexpr,  # latent mode over 8-bit codes: the latents in two halves, each loaded twice (module doc)
):
    """Program (b * num_q_tiles + tile, kv_head, split): one query tile of one row against one KV head."""
    row_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    b = row_tile // num_q_tiles
    tile = row_tile % num_q_tiles

    seq_len = tl.load(seq_lens_ptr + b)
    if HAS_KEY_START:
        key_start = tl.load(key_start_ptr + b)
    else:
        key_start = 0

    # Row r of the tile is query token tile * BLOCK_Q + r // GROUP of head kv_head * GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    token = tile * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (token < q_len)
    position = seq_len - q_len + token  # [BLOCK_M]
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    vdims = tl.arange(0, V_DIM_PAD)
    vdim_valid = vdims < V_DIM

    b64 = b.to(tl.int64)
    q_rows = (query_ptr + b64 * stride_qb + head[:, None].to(tl.int64) * stride_qh
              + token[:, None].to(tl.int64) * stride_qt)
    q = tl.load(q_rows + dims[None, :] * stride_qd, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    elif CODES == 0:  # products in the storage's dtype; over 8-bit codes in the query's
        q = q.to(key_cache_ptr.dtype.element_ty)
    if ROPE_DIM > 0:  # latent mode: the query's last ROPE_DIM dims score against the value cache's rotary keys
        rdims = tl.arange(0, ROPE_DIM_PAD)
        rdim_valid = rdims < ROPE_DIM
        q_rope = tl.load(q_rows + (HEAD_DIM + rdims[None, :]) * stride_qd,
                         mask=row_valid[:, None] & rdim_valid[None, :], other=0.0)
        if UPCAST:
            q_rope = q_rope.to(tl.float32)
        elif CODES == 0:
            q_rope = q_rope.to(value_cache_ptr.dtype.element_ty)
    if HALVES:
        HALF: tl.constexpr = HEAD_DIM_PAD // 2
        hdims = tl.arange(0, HALF)
        a_valid = hdims < HEAD_DIM
        b_valid = HALF + hdims < HEAD_DIM
        q_a = tl.load(q_rows + hdims[None, :] * stride_qd, mask=row_valid[:, None] & a_valid[None, :], other=0.0)
        q_b = tl.load(q_rows + (HALF + hdims[None, :]) * stride_qd, mask=row_valid[:, None] & b_valid[None, :],
                      other=0.0)

    # Keys any row of this tile can see: [lo, hi].
    first_token = tile * BLOCK_Q
    last_token = tl.minimum(first_token + BLOCK_Q, q_len) - 1
    hi = seq_len - q_len + last_token
    lo = key_start
    if USE_WINDOW:
        lo = tl.maximum(lo, seq_len - q_len + first_token - window + 1)
    if USE_CHUNK:
        # A row's first visible key: the start of its chunk (a padded query's own position is below key_start).
        chunk_lo = key_start + tl.maximum(position - key_start, 0) // chunk * chunk  # [BLOCK_M]
        first_position = tl.maximum(seq_len - q_len + first_token - key_start, 0)
        lo = tl.maximum(lo, key_start + first_position // chunk * chunk)
    tile_lo = lo // BLOCK_N
    tile_hi = tl.where(hi >= lo, hi // BLOCK_N + 1, tile_lo)
    tile_lo, tile_hi = split_tiles(tile_lo, tile_hi, split, NUM_SPLITS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_SINKS:  # the sink is one more score (base 2) with no value: it starts the first split's max and sum
        starts = row_valid & (split == 0)
        m_i = tl.where(starts, tl.load(sinks_ptr + head, mask=row_valid, other=0.0) * LOG2E, float("-inf"))
        l_i = tl.where(starts, 1.0, 0.0)
    if HALVES:  # acc holds the first half of the latents, acc_b the second
        acc = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, V_DIM_PAD], dtype=tl.float32)

    table_ptr = block_tables_ptr + b64 * stride_btb
    k_head_ptr, v_head_ptr = head_pointers(key_cache_ptr, value_cache_ptr, kv_head, stride_kh, stride_vh, CODES)
    cols = tl.arange(0, BLOCK_N)
    for j in range(tile_lo, tile_hi):
        keys = j * BLOCK_N + cols
        key_valid = (keys >= lo) & (keys <= hi)
        k_slot, v_slot = key_value_slots(table_ptr, stride_btn, keys, key_valid, key_offsets_ptr, value_offsets_ptr,
                                         stride_kn, stride_kt, stride_vn, stride_vt, kv_head, stride_kh, stride_vh,
                                         BLOCK_SIZE, HAS_OFFSETS, CODES)
        if CODES != 0:
            k_magnitude = load_magnitude(k_head_ptr + k_slot + HEAD_DIM, key_valid)
        if ROPE_DIM > 0:  # latent mode: the rotary keys come from the value cache, the values are the keys
            k_rope = tl.load(v_head_ptr + v_slot[None, :] + rdims[:, None] * stride_vd,
                             mask=key_valid[None, :] & rdim_valid[:, None], other=0.0)  # [ROPE_DIM, BLOCK_N]
            if CODES != 0:
                r_magnitude = load_magnitude(v_head_ptr + v_slot + ROPE_DIM, key_valid)
                k_rope = dequantize(k_rope, r_magnitude[None, :], CODES)
        if HALVES:  # the scores half by half: each half of the codes is loaded again for the values below
            k = tl.load(k_head_ptr + k_slot[None, :] + hdims[:, None], mask=key_valid[None, :] & a_valid[:, None],
                        other=0.0)  # [D / 2, BLOCK_N]
            s = tile_dot(q_a, dequantize(k, k_magnitude[None, :], CODES).to(q_a.dtype), UPCAST)
            k = tl.load(k_head_ptr + k_slot[None, :] + HALF + hdims[:, None],
                        mask=key_valid[None, :] & b_valid[:, None], other=0.0)
            s += tile_dot(q_b, dequantize(k, k_magnitude[None, :], CODES).to(q_b.dtype), UPCAST)
        else:
            k = tl.load(k_head_ptr + k_slot[None, :] + dims[:, None] * stride_kd,
                        mask=key_valid[None, :] & dim_valid[:, None], other=0.0)  # [D, BLOCK_N]
            if CODES != 0:
                k = dequantize(k, k_magnitude[None, :], CODES).to(q.dtype)
            if ROPE_DIM > 0:
                v = tl.trans(k)  # [BLOCK_N, D]; V_DIM is HEAD_DIM
            else:
                v = tl.load(v_head_ptr + v_slot[:, None] + vdims[None, :] * stride_vd,
                            mask=key_valid[:, None] & vdim_valid[None, :], other=0.0)  # [BLOCK_N, Dv]
                if CODES != 0:
                    v_magnitude = load_magnitude(v_head_ptr + v_slot + V_DIM, key_valid)
                    v = dequantize(v, v_magnitude[:, None], CODES).to(q.dtype)
            s = tile_dot(q, k, UPCAST)
        if ROPE_DIM > 0:
            s += tile_dot(q_rope, k_rope.to(q_rope.dtype), UPCAST)
        s = base2_scores(s, scale, softcap, USE_SOFTCAP)

        visible = row_valid[:, None] & (keys[None, :] <= position[:, None]) & (keys[None, :] >= key_start)
        if USE_WINDOW:
            visible = visible & (keys[None, :] > position[:, None] - window)
        if USE_CHUNK:
            visible = visible & (keys[None, :] >= chunk_lo[:, None])
        s = tl.where(visible, s, float("-inf"))

        p, alpha, m_i, l_i = online_softmax(s, m_i, l_i)
        if HALVES:
            v = tl.load(k_head_ptr + k_slot[:, None] + hdims[None, :], mask=key_valid[:, None] & a_valid[None, :],
                        other=0.0)  # [BLOCK_N, D / 2]
            v = dequantize(v, k_magnitude[:, None], CODES).to(q_a.dtype)
            acc = acc * alpha[:, None] + tile_dot(p, v, UPCAST)
            v = tl.load(k_head_ptr + k_slot[:, None] + HALF + hdims[None, :],
                        mask=key_valid[:, None] & b_valid[None, :], other=0.0)
            v = dequantize(v, k_magnitude[:, None], CODES).to(q_b.dtype)
            acc_b = acc_b * alpha[:, None] + tile_dot(p, v, UPCAST)
        else:
            acc = acc * alpha[:, None] + tile_dot(p, v, UPCAST)

    out_rows = (out_ptr + b64 * stride_ob + token[:, None].to(tl.int64) * stride_ot
                + head[:, None].to(tl.int64) * stride_oh + split * stride_os)  # stride_os: 0 without splits
    if HALVES:
        _store_out(out_rows + hdims[None, :], acc, l_i, row_valid[:, None] & a_valid[None, :], NUM_SPLITS)
        _store_out(out_rows + HALF + hdims[None, :], acc_b, l_i, row_valid[:, None] & b_valid[None, :], NUM_SPLITS)
    else:
        _store_out(out_rows + vdims[None, :], acc, l_i, row_valid[:, None] & vdim_valid[None, :], NUM_SPLITS)
    if NUM_SPLITS > 1:
        stat_offsets = b64 * stride_mb + token.to(tl.int64) * stride_mt + head.to(tl.int64) * stride_mh + split
        tl.store(max_ptr + stat_offsets, m_i, mask=row_valid)
        tl.store(sum_ptr + stat_offsets, l_i, mask=row_valid)


@triton.jit
def reduce_splits_kernel(
    out_ptr,  # [B * q * H, D] contiguous output
    partial_ptr,  # fp32 [B * q * H, S, D]
    max_ptr, sum_ptr,  # fp32 [B * q * H, S]
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    """Program i: merge the splits of (row, token, head) i. Empty splits carry max -inf and sum 0."""
    i = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, SPLITS_PAD)
    split_valid = splits < NUM_SPLITS
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    m = tl.load(max_ptr + i * NUM_SPLITS + splits, mask=split_valid, other=float("-inf"))
    s = tl.load(sum_ptr + i * NUM_SPLITS + splits, mask=split_valid, other=0.0)
    m_all = tl.max(m, axis=0)
    weight = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))  # [S]; 0 for empty splits
    total = tl.sum(weight * s, axis=0)
    partial = tl.load(partial_ptr + (i * NUM_SPLITS + splits[:, None]) * HEAD_DIM + dims[None, :],
                      mask=split_valid[:, None] & dim_valid[None, :], other=0.0)
    out = tl.sum(partial * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + i * HEAD_DIM + dims, out.to(out_ptr.dtype.element_ty), mask=dim_valid)


def tile_config(q_len: int, group: int, head_dim: int, fp32_storage: bool = False,
                value_dim: int | None = None, latent: bool = False, codes: int = 0) -> dict[str, int]:
    """Tile sizes for a launch: ``BLOCK_M`` (>= 16, power of two), ``BLOCK_Q``, ``BLOCK_N``, ``num_warps``,
    ``num_stages`` (Triton's software pipelining depth).

    Decode packs the ``group`` heads of one token into 16 rows; multi-token queries use up to 64 rows so a tile of
    keys is reused by several tokens. ``BLOCK_N`` keeps the K and V tiles near 8 KB each in 16-bit storage. fp32
    storage (fp32 operands, no tensor cores) gets 16-key tiles and at most 32 rows, which keeps head_dim 256 free of
    register spills (see ``python -m hf_paged.kernels``). Keys and values of different widths (``value_dim``) wider
    than two 128-wide tiles together also get at most 32 rows (MiMo-V2-Flash's 192 + 128 spills at 64 on sm_80),
    and fp32 storage with heads wider than 128 at most 16 (Gemma-2's 256 spilled at 32 rows through offset tables
    on sm_80 with Triton 3.6). Tiles of 128-wide heads and wider get 8 warps even at 16 rows: with 4, Llama-8B's
    decode tile (16 x 32 keys x 128) spilled on sm_80 with Triton 3.6. fp32 storage with heads wider than 128
    pipelines 2 stages instead of Triton's default 3: at 3, Gemma-2's 16-row prefill through offset tables spilled
    on sm_90 with Triton 3.9 (and at 4 warps with 3.6); at 2 it is clean on both releases and both archs.
    Latent tiles (``latent``: keys as wide as the latents, 512 in DeepSeek-V3, and values the same tile) keep 16
    rows at any query length (the launcher gives a tile at most 16 query heads), 16-key tiles and 2
    stages. Over 8-bit codes (``codes``) 16-bit products take half as many keys per tile (32 up to 64-wide heads, 16
    above): the rows are ``D + 2`` bytes, so tiles are loaded 2 bytes at a time into registers rather than copied
    asynchronously (Gemma-2's 256-wide decode tile spilled on sm_80 at 32 keys, gpt-oss's 64-wide one at 64); and
    every tile over codes gets 8 warps (with 4, SmolLM2's decode tile over int8 codes for a float32 query spilled on
    sm_90 with Triton 3.6).
    """
    rows = max(16, next_power_of_2(group))
    if latent:
        return {"BLOCK_M": rows, "BLOCK_Q": rows // group, "BLOCK_N": 16, "num_warps": 4 if head_dim < 128 else 8,
                "num_stages": 2}
    wide = value_dim is not None and next_power_of_2(head_dim) + next_power_of_2(value_dim) > 256
    if q_len > 1:
        most = 64
        if fp32_storage or wide:
            most = 16 if fp32_storage and head_dim > 128 else 32
        rows = max(rows, min(most, next_power_of_2(q_len * group)))
    if fp32_storage:
        block_n = 16
    else:
        block_n = 64 if head_dim <= 64 else 32
        if codes:
            block_n = 32 if head_dim <= 64 else 16
    warps = 4 if rows <= 16 and head_dim < 128 and not codes else 8
    stages = 2 if fp32_storage and head_dim > 128 else 3
    return {"BLOCK_M": rows, "BLOCK_Q": rows // group, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def paged_attention_meta(
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
    has_sinks: bool = False,
    has_chunk: bool = False,
    value_dim: int | None = None,
    has_offsets: bool = False,
    rope_dim: int = 0,
    codes: int = 0,
) -> dict[str, int | bool]:
    """Every constexpr of `paged_attention_kernel` plus ``num_warps`` and ``num_stages`` (shared by the launcher
    and the AOT check).
    ``value_dim``: the values' head dim when it differs from the keys' `head_dim`; ``has_offsets``: blocks are
    addressed through per-block offset tables (a pool of several slabs); ``rope_dim``: latent mode (module
    docstring), the width of the rotary keys the value cache holds (`head_dim` is the latents'; the values are the
    keys, so `value_dim` must be None); ``codes``: 8-bit pools (`hf_paged.kernels._quant.codes_of`), the head dims
    then being the rows' logical widths (the pools' minus 2) and `fp32_storage` whether the products run in float32
    (a float32 query)."""
    if rope_dim and value_dim is not None:
        raise ValueError("latent mode reads the values out of the keys: give rope_dim or value_dim, not both")
    value_dim = head_dim if value_dim is None else value_dim
    return {
        **tile_config(q_len, group, max(head_dim, value_dim), fp32_storage,
                      value_dim if value_dim != head_dim else None, latent=rope_dim > 0, codes=codes),
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": next_power_of_2(head_dim),
        "V_DIM": value_dim,
        "V_DIM_PAD": next_power_of_2(value_dim),
        "GROUP": group,
        "BLOCK_SIZE": block_size,
        "NUM_SPLITS": num_splits,
        "HAS_KEY_START": has_key_start,
        "USE_WINDOW": has_window,
        "USE_SOFTCAP": has_softcap,
        "HAS_SINKS": has_sinks,
        "USE_CHUNK": has_chunk,
        "UPCAST": upcast,
        "HAS_OFFSETS": has_offsets,
        "ROPE_DIM": rope_dim,
        "ROPE_DIM_PAD": max(16, next_power_of_2(rope_dim)),
        "CODES": codes,
        # Latent tiles of 8-bit codes in halves: loaded through registers (2-byte rows: no asynchronous copies),
        # whole 512-wide tiles spilled on sm_80.
        "HALVES": bool(codes and rope_dim and head_dim >= 256),
    }


def reduce_splits_meta(head_dim: int, num_splits: int) -> dict[str, int]:
    """Every constexpr of `reduce_splits_kernel` plus ``num_warps`` (shared by the launcher and the AOT check)."""
    return {
        "HEAD_DIM": head_dim,
        "HEAD_DIM_PAD": next_power_of_2(head_dim),
        "NUM_SPLITS": num_splits,
        "SPLITS_PAD": next_power_of_2(num_splits),
        "num_warps": 1 if head_dim <= 64 else 2,
    }

