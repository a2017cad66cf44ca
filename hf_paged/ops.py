"""The PyTorch implementation of the paged-attention operations.

These functions are what the CPU path runs and the references the Triton kernels in `hf_paged.kernels` are tested
against. Shapes use these letters:

    N  physical blocks in the pool          bs  tokens per block
    B  rows (sequences) in the batch        q   query tokens per row in this step
    H  query heads                          Hkv key/value heads (H is a multiple of Hkv: GQA)
    D  head dimension                       nb  blocks in the longest block table

A KV pool is ``[N, bs, Hkv, D]`` (the "NHD" shape of vLLM's Triton backend), token-major (contiguous) or head-major
in memory; every function here and every kernel takes either. The whole cache keeps all layers in one tensor
``[L, 2, N, bs, Hkv, D]``, so that copy-on-write copies every layer in one operation, stored head-major (see
`hf_paged.storage.slab_tensor`): a range of consecutive blocks is then one contiguous ``[tokens, D]`` matrix per head.

Attention semantics shared by every implementation: query ``i`` of row ``b`` sits at position
``p = seq_lens[b] - q + i`` and attends to the keys ``j`` with ``key_start[b] <= j <= p`` (``key_start`` skips left
padding) and, with a sliding window ``w``, ``j > p - w``; with chunked attention of chunk size ``c`` (Llama 4),
only keys of the query's own chunk, ``(j - s) // c == (p - s) // c`` where ``s`` is the row's first real token. With
attention sinks (gpt-oss), one extra logit per query head joins the softmax denominator (it has no value). A query
with no key to attend to gets a zero output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from . import quant, storage

if TYPE_CHECKING:
    from .storage import LayerStore

__all__ = [
    "attend",
    "causal_mask",
    "copy_blocks",
    "gather_kv",
    "head_dim",
    "paged_attention",
    "read_blocks",
    "reshape_and_cache",
    "rows_in_place",
    "shared_prefix_paged_attention",
    "slot_view",
    "range_attention",
    "range_mask",
    "ranges_attention",
]


def reshape_and_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    skip_negative: bool = True,
) -> None:
    """Write new keys and values into their slots.

    Args:
        key, value: ``[T, Hkv, D]`` new states, one row per token.
        key_cache, value_cache: ``[N, bs, Hkv, D]`` pools, their ``[N * bs, Hkv, D]`` `slot_view`s, or
            `hf_paged.storage.LayerStore`s, written in place; an 8-bit pool (`hf_paged.quant`) stores
            ``[N, bs, Hkv, D + 2]`` codes and scales, encoded here.
        slot_mapping: ``[T]`` integer slots ``block * bs + offset``; a negative slot means "do not store".
        skip_negative: False when the caller knows no slot is negative: saves the check, which reads the slots
            on the host (a `PagedCache` step never has one).
    """
    if not isinstance(key_cache, torch.Tensor):  # a `hf_paged.storage.LayerStore` (a pool of several slabs)
        slots = slot_mapping if slot_mapping.dtype == torch.long else slot_mapping.to(torch.long)
        key, value = quant.to_storage_pair(key, value, key_cache.dtype, value_cache.dtype)
        key_cache.write(slots, key)
        value_cache.write(slots, value)
        return
    flat_k = key_cache if key_cache.dim() == 3 else slot_view(key_cache)
    flat_v = value_cache if value_cache.dim() == 3 else slot_view(value_cache)
    slots = slot_mapping if slot_mapping.dtype == torch.long else slot_mapping.to(torch.long)
    if skip_negative:
        keep = slots >= 0
        if not bool(keep.all()):
            slots, key, value = slots[keep], key[keep], value[keep]
    if key.dtype != flat_k.dtype or value.dtype != flat_v.dtype:  # cast, or encode 8-bit rows
        key, value = quant.to_storage_pair(key, value, flat_k.dtype, flat_v.dtype)
    quant.raw(flat_k).index_copy_(0, slots, quant.raw(key))
    quant.raw(flat_v).index_copy_(0, slots, quant.raw(value))


def slot_view(cache: torch.Tensor) -> torch.Tensor:
    """``[N * bs, Hkv, D]``: the slots of a ``[N, bs, Hkv, D]`` pool in one dimension (slot ``block * bs + offset``),
    a view (a pool whose blocks do not follow one another has none: RuntimeError)."""
    return cache.view(cache.shape[0] * cache.shape[1], *cache.shape[2:])


def copy_blocks(kv_pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy whole blocks ``src[i] -> dst[i]`` in every layer's key and value pool at once.

    Args:
        kv_pool: ``[L, 2, N, bs, Hkv, D]``.
        src, dst: ``[C]`` integer block ids; ``dst`` holds distinct blocks not in ``src``.
    """
    kv_pool[:, :, dst.to(torch.long)] = kv_pool[:, :, src.to(torch.long)]


def gather_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, kv_len: int, first_block: int | None = None,
    spans: Sequence[tuple[int, int]] | None = None, row_stride: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Read each row's first `kv_len` tokens out of a pool.

    Args:
        cache: ``[N, bs, Hkv, D]`` pool.
        block_tables: ``[B, nb]`` integer block ids (entries past a row's length are ignored).
        kv_len: tokens to read per row, at most ``nb * bs``.
        first_block: set when there is one row and its blocks are ``first_block, first_block + 1, ...``: the
            tokens are then read in place, without a copy.
        spans: set when there is one row whose blocks are the runs ``(first, count)`` (each inside one slab of a
            `hf_paged.storage.LayerStore`): each run is read in place, and the runs concatenated.
        row_stride: ``(first, stride)`` when row ``r``'s blocks are ``first + r * stride + i`` (its entries that are
            not null; `hf_paged.step.StepPlan.row_stride`): the rows are read in place, one strided view. Blocks
            read at a row's null entries or past its length belong to other rows or none: callers mask them.

    Returns:
        ``[B, Hkv, kv_len, D]`` (a strided view, of the pool itself or of a fresh gather); from an 8-bit pool
        (`hf_paged.quant`), the decoded float32 values.
    """
    return quant.from_storage(_gather_stored(cache, block_tables, kv_len, first_block, spans, row_stride))


def _gather_stored(cache, block_tables, kv_len, first_block, spans, row_stride=None) -> torch.Tensor:
    """`gather_kv` of the rows as the pool stores them."""
    batch, nb = block_tables.shape
    if first_block is not None:  # (a layer store's blocks inside one slab: a plain view of that slab)
        cache, row_stride = cache[first_block:first_block + nb], (0, 0)
    if row_stride is not None:
        views = rows_in_place(cache[None, None], batch, kv_len, *row_stride)
        if views is not None:  # blocks follow token by token: the rows read in place
            return views[0]
    if first_block is not None:
        gathered = cache
    elif spans is not None:
        gathered = torch.cat([cache[first:first + count] for first, count in spans])
    elif storage.is_head_major(cache):
        heads = storage.select_blocks(cache, block_tables.reshape(-1))  # [H, B * nb, bs, D]
        return heads.view(heads.shape[0], batch, -1, heads.shape[3])[:, :, :kv_len].transpose(0, 1)
    else:
        gathered = cache.index_select(0, block_tables.reshape(-1))
    return gathered.view(batch, -1, *cache.shape[2:])[:, :kv_len].transpose(1, 2)


def rows_in_place(pool: torch.Tensor, batch: int, kv_len: int, first: int, stride: int) -> tuple | None:
    """`gather_kv` with a ``row_stride`` of ``(first, stride)`` (``stride`` 0 for a single row) for every layer of a
    pool tensor at once: of a ``[L, K, N, bs, Hkv, D]`` tensor (`hf_paged.kv_pool.KVPool.tensors`), the ``L * K``
    stored rows ``[B, Hkv, kv_len, D]`` of its ``[N, bs, Hkv, D]`` tensors (index ``layer * K + kind``), views made
    in one call (per layer, a view costs as much host time as a short op), or None where the layout does not let
    one view hold them (blocks that do not follow token by token, layers and kinds not one after the other)."""
    layers, kinds, _, block_size, heads, dim = pool.shape
    if pool.stride(2) != block_size * pool.stride(3) or pool.stride(0) != kinds * pool.stride(1):
        return None
    views = pool.as_strided((layers * kinds, batch, heads, kv_len, dim),
                            (pool.stride(1), stride * pool.stride(2), pool.stride(4), pool.stride(3), pool.stride(5)),
                            pool.storage_offset() + first * pool.stride(2))
    return views.unbind(0)


def head_dim(cache) -> int:
    """The head size of the keys or values a ``[N, bs, H, W]`` pool (or layer store) holds (``W - 2`` if 8-bit)."""
    return quant.logical_width(cache.shape[-1], cache.dtype)


def read_blocks(cache, first_block: int, num_blocks: int) -> torch.Tensor:
    """``[1, H, num_blocks * bs, D]``: the blocks ``[first_block, first_block + num_blocks)`` of a pool (inside one
    slab), in place, or decoded from 8 bits."""
    stored = cache[first_block:first_block + num_blocks]
    return quant.from_storage(stored.reshape(1, -1, *stored.shape[2:]).transpose(1, 2))


def causal_mask(
    seq_lens: torch.Tensor,
    key_start: torch.Tensor | None,
    q_len: int,
    kv_len: int,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    chunk_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean ``[B, 1, q, kv_len]`` mask (True = attend) following the module docstring's semantics.

    ``chunk_start`` (``[B]``, the first real token of each row) is where the chunks start; it defaults to
    ``key_start`` (or 0).
    """
    device = seq_lens.device
    positions = seq_lens.to(torch.long)[:, None] - q_len + torch.arange(q_len, device=device)  # [B, q]
    keys = torch.arange(kv_len, device=device)
    allowed = keys[None, None, :] <= positions[:, :, None]
    if key_start is not None:
        allowed &= keys[None, None, :] >= key_start.to(torch.long)[:, None, None]
    if sliding_window is not None:
        allowed &= keys[None, None, :] > positions[:, :, None] - sliding_window
    if chunk_size is not None:
        origin = chunk_start if chunk_start is not None else key_start
        origin = torch.zeros_like(seq_lens, dtype=torch.long) if origin is None else origin.to(torch.long)
        own = (positions - origin[:, None]).clamp_min(0) // chunk_size * chunk_size + origin[:, None]  # [B, q]
        allowed &= keys[None, None, :] >= own[:, :, None]
    return allowed[:, None]


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    softcap: float | None = None,
    is_causal: bool = False,
    dropout: float = 0.0,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over contiguous keys and values.

    Args:
        query: ``[B, H, q, D]``.
        key, value: ``[B, Hkv, kv, D]``.
        mask: broadcastable to ``[B, H, q, kv]``: boolean (True = attend) or additive (0 / -inf), or None.
        scale: multiplies ``q @ k^T``.
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before masking.
        is_causal: with ``mask=None`` and as many queries as keys, apply a causal mask.
        dropout: dropout probability on the attention weights (training only).
        sinks: attention sinks, ``[H]`` (one logit per query head) or broadcastable to ``[B, H, q]``: an extra
            logit in each softmax denominator, with no value (gpt-oss's ``s_aux``), or None.

    Returns:
        ``[B, q, H, D]`` contiguous; rows with no key to attend to are zero.
    """
    if key.dtype != query.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    elif value.dtype != query.dtype:
        value = value.to(query.dtype)
    heads, kv_heads = query.shape[1], key.shape[1]
    groups = heads // kv_heads
    if softcap is None and sinks is None:
        heads_share_mask = mask is None or (mask.dim() == 4 and mask.shape[1] == 1)
        if query.shape[2] == 1 and groups > 1 and heads_share_mask and not is_causal:
            # Decode with GQA: each KV head's query heads as its queries, Hkv heads of `groups` queries instead of
            # H heads of one (on the CPU down to 0.65x the time of enable_gqa).
            batch, value_dim = query.shape[0], value.shape[-1]
            out = F.scaled_dot_product_attention(query.reshape(batch, kv_heads, groups, -1), key, value,
                                                 attn_mask=mask, dropout_p=dropout, scale=scale)
            return out.reshape(batch, 1, heads, value_dim)
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale, is_causal=is_causal and mask is None,
            enable_gqa=heads != kv_heads,
        )
        return out.transpose(1, 2).contiguous()

    batch, _, q_len, dim = query.shape
    q = query.reshape(batch, kv_heads, groups, q_len, dim)
    scores = torch.matmul(q.float(), key.float()[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, g, q, kv]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None and is_causal:
        kv_len = key.shape[2]
        mask = torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if mask is not None:
        mask = mask.reshape(mask.shape[0], -1, 1, *mask.shape[-2:]) if mask.shape[1] == 1 else mask.view(
            mask.shape[0], kv_heads, groups, *mask.shape[-2:]
        )
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sinks is None:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    else:
        sink = sinks.float()[None, :, None] if sinks.dim() == 1 else sinks.float()
        sink = sink.expand(batch, heads, q_len).reshape(batch, kv_heads, groups, q_len, 1)
        total = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1, keepdim=True)
        probs = torch.exp(scores - total)
    if dropout:
        probs = F.dropout(probs, p=dropout)
    out = torch.matmul(probs, value.float()[:, :, None]).to(query.dtype)  # [B, Hkv, g, q, Dv]
    return out.reshape(batch, heads, q_len, value.shape[-1]).transpose(1, 2).contiguous()


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    key_start: torch.Tensor | None = None,
    *,
    scale: float,
    max_seq_len: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    sinks: torch.Tensor | None = None,
    latent: bool = False,
) -> torch.Tensor:
    """Attention of ``query`` against the paged keys and values (reference semantics: see module docstring).

    Args:
        query: ``[B, H, q, D]``.
        key_cache, value_cache: ``[N, bs, Hkv, D]``.
        block_tables: ``[B, nb]`` int32 block ids.
        seq_lens: ``[B]`` int32, tokens of each row including this step's ``q``.
        key_start: ``[B]`` int32 first attended key (left padding), or None for 0.
        scale: multiplies ``q @ k^T``.
        max_seq_len: ``max(seq_lens)`` as a Python int (avoids a device sync).
        sliding_window, softcap, sinks: see `attend`.
        chunk_size: chunked attention (chunks start at ``key_start``), or None.
        latent: multi-head latent attention over cached latents (`hf_paged.latent`): ``key_cache`` holds the
            latents ``[N, bs, Hkv, Dc]`` and ``value_cache`` the rotary keys ``[N, bs, Hkv, Dr]``; the keys are both
            together (``D = Dc + Dr``) and the values the latents.

    Returns:
        ``[B, q, H, D]`` (``Dc`` wide in latent mode).
    """
    keys = gather_kv(key_cache, block_tables, max_seq_len)
    values = gather_kv(value_cache, block_tables, max_seq_len)
    if latent:
        keys, values = torch.cat([keys, values.to(keys.dtype)], dim=-1), keys
    mask = causal_mask(seq_lens, key_start, query.shape[2], max_seq_len, sliding_window, chunk_size)
    return attend(query, keys, values, mask, scale=scale, softcap=softcap, sinks=sinks)


def attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention that also returns the log-sum-exp of each query's scores, for merging partial results.

    Args:
        query: ``[B, Hq, M, D]``.
        key, value: ``[B, Hq, kv, D]`` (any strides; GQA is handled by packing query heads into ``M``).
        mask: boolean broadcastable to ``[B, Hq, M, kv]`` (True = attend), or None.

    Returns:
        ``(out [B, Hq, M, D], lse [B, Hq, M])`` in fp32; a query with no key gets ``out = 0`` and ``lse = -inf``.
    """
    if softcap is None and query.device.type == "cpu" and _FLASH_CPU is not None and value.shape[-1] == query.shape[-1]:
        additive = None
        if mask is not None:
            additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~mask, -torch.inf)
        out, lse = _FLASH_CPU(query, key.to(query.dtype), value.to(query.dtype), 0.0, False, attn_mask=additive,
                              scale=scale)
        if mask is not None:
            lse = lse.masked_fill(~mask.any(dim=-1), -torch.inf)
        return out.float(), lse.float()
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf)
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.matmul(torch.exp(scores - finite[..., None]), value.float()), lse


# PyTorch's fused CPU attention kernel, which also returns the log-sum-exp (a private but long-standing op).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> torch.Tensor:
    """Combine attention over two disjoint key sets from their outputs ``[..., M, D]`` and log-sum-exps ``[..., M]``."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weight_a, weight_b = torch.exp(lse_a - top)[..., None], torch.exp(lse_b - top)[..., None]
    total = (weight_a + weight_b).clamp_min(torch.finfo(weight_a.dtype).tiny)
    return (out_a * weight_a + out_b * weight_b) / total


def shared_prefix_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    prefix_blocks: torch.Tensor,
    tail_tables: torch.Tensor,
    tail_len: int,
    prefix_mask: torch.Tensor | None,
    tail_mask: torch.Tensor | None,
    *,
    scale: float,
    softcap: float | None = None,
    prefix_start: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged attention where groups of rows share their leading blocks: the shared keys are read once per group.

    The ``B`` rows form ``G`` consecutive groups of ``R = B / G`` rows (the k beams or samples of one prompt). The
    rows of a group share their first ``S = F * bs`` tokens (blocks ``prefix_blocks[g]``); each row's remaining
    ``tail_len`` tokens live in ``tail_tables``. Attention over the shared prefix runs once for all ``R * H * q``
    queries of a group, attention over each row's tail runs per row, and the two are merged by log-sum-exp.
    The prefix holds no token of this step, so it needs no causal mask.

    Args:
        query: ``[B, H, q, D]``.
        key_cache, value_cache: ``[N, bs, Hkv, D]``.
        prefix_blocks: ``[G, F]`` block ids of each group's shared prefix.
        tail_tables: ``[B, nt]`` block ids of each row after its prefix.
        tail_len: tokens read from the tails (the longest row's tail).
        prefix_mask: boolean ``[G, 1, 1, S]`` (left padding inside the prefix), or None.
        tail_mask: boolean ``[B, 1, q, tail_len]`` (causal and padding within the tails), or None.
        prefix_start: with one group whose prefix blocks are consecutive, the first of them: the prefix is then read
            in place, without a gather.
        sinks: ``[H]`` attention sinks (see `attend`), or None.

    Returns:
        ``[B, q, H, D]`` in ``query``'s dtype.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads = key_cache.shape[2]
    groups, per_group, gq = prefix_blocks.shape[0], batch // prefix_blocks.shape[0], heads // kv_heads * q_len
    packed = query.reshape(batch, kv_heads, gq, dim)  # the query heads of one KV head, as rows

    def packed_mask(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
        if mask is None or mask.shape[-2] == 1:
            return mask
        return mask[:, :, None].expand(-1, -1, gq // q_len, -1, -1).reshape(mask.shape[0], 1, rows, mask.shape[-1])

    tail_keys = gather_kv(key_cache, tail_tables, tail_len)
    tail_values = gather_kv(value_cache, tail_tables, tail_len)
    out_tail, lse_tail = attention_with_lse(
        packed, tail_keys, tail_values, packed_mask(tail_mask, gq), scale=scale, softcap=softcap
    )

    prefix_len = prefix_blocks.shape[1] * key_cache.shape[1]
    prefix_keys = gather_kv(key_cache, prefix_blocks, prefix_len, prefix_start)
    prefix_values = gather_kv(value_cache, prefix_blocks, prefix_len, prefix_start)
    grouped = packed.reshape(groups, per_group, kv_heads, gq, dim).transpose(1, 2).reshape(
        groups, kv_heads, per_group * gq, dim
    )
    out_prefix, lse_prefix = attention_with_lse(
        grouped, prefix_keys, prefix_values, prefix_mask, scale=scale, softcap=softcap
    )
    value_dim = head_dim(value_cache)  # may differ from the keys' (multi-head latent attention)
    out_prefix = out_prefix.view(groups, kv_heads, per_group, gq, value_dim).transpose(1, 2).reshape(
        batch, kv_heads, gq, value_dim
    )
    lse_prefix = lse_prefix.view(groups, kv_heads, per_group, gq).transpose(1, 2).reshape(batch, kv_heads, gq)

    out = merge_attention(out_prefix, lse_prefix, out_tail, lse_tail)
    if sinks is not None:
        # The sink joins the denominator: scale by exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink).
        lse = torch.logaddexp(lse_prefix, lse_tail)
        sink = sinks.float().view(1, kv_heads, heads // kv_heads, 1).expand(-1, -1, -1, q_len).reshape(1, kv_heads, gq)
        out = out * torch.sigmoid(lse - sink)[..., None]
    return out.reshape(batch, heads, q_len, value_dim).transpose(1, 2).to(query.dtype).contiguous()


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
) -> torch.Tensor:
    """`paged_attention` for rows that share leading blocks, with the block tables given as prefix and tails.

    The ``B`` rows form ``G`` consecutive groups of ``R = B / G`` rows; row ``b`` of group ``g = b // R`` has the
    block table ``prefix_blocks[g]`` followed by ``tail_tables[b]``. The result is that of `paged_attention` over
    those tables (module docstring's semantics). This is the reference of the Triton kernel
    ``hf_paged.kernels.shared_prefix_paged_attention``, which reads each group's prefix once for all its rows'
    queries and merges it with each row's tail by log-sum-exp; `shared_prefix_attention` is the PyTorch path's
    version of the same idea.

    Args:
        query: ``[B, H, q, D]``.
        key_cache, value_cache: ``[N, bs, Hkv, D]``.
        prefix_blocks: ``[G, F]`` int32, each group's shared blocks (``G`` divides ``B``).
        tail_tables: ``[B, nt]`` int32, each row's blocks after its prefix.
        seq_lens, key_start, scale, max_seq_len, sliding_window, softcap: as in `paged_attention` (whole-row lengths and
            positions, prefix included).

    Returns:
        ``[B, q, H, D]``.
    """
    group_size = query.shape[0] // prefix_blocks.shape[0]
    tables = torch.cat([prefix_blocks.repeat_interleave(group_size, dim=0), tail_tables], dim=1)
    return paged_attention(query, key_cache, value_cache, tables, seq_lens, key_start, scale=scale,
                           max_seq_len=max_seq_len, sliding_window=sliding_window, softcap=softcap)


def range_mask(
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    q_len: int,
    first_block: int,
    num_blocks: int,
    block_size: int,
    *,
    groups: int,
    dtype: torch.dtype,
    key_padding: torch.Tensor | None = None,
    sliding_window: int | None = None,
    chunk_size: int | None = None,
    first_entries: torch.Tensor | None = None,
) -> torch.Tensor:
    """The additive mask of `range_attention`: which slots of the blocks ``[first_block, first_block +
    num_blocks)`` each packed query may attend to.

    Rows may share blocks; blocks no row uses are never visible, and neither are a row's blocks outside the range
    (another slab's: `ranges_attention` merges the ranges).
    The slot holding token ``j`` of row ``b`` is visible to the row's queries ``i`` when ``j`` passes the module
    docstring's rule (causal, window) and, if given, ``key_padding[b, j]``.

    Args:
        block_tables: ``[B, nb]`` integer block ids (entries past a row's length are ignored).
        seq_lens: ``[B]`` tokens of each row including this step's ``q_len``.
        groups: query heads per KV head.
        dtype: the queries' dtype.
        key_padding: boolean ``[B, >= max(seq_lens)]`` (True = a real token), or None.
        chunk_size: chunked attention, the chunks starting at each row's first real token, or None.
        first_entries: ``[B]``, each row's first table entry that is not null (null entries, blocks of dead tokens,
            are ignored), or None (every entry is real).

    Returns:
        ``[1, 1, B * groups * q, num_blocks * block_size]``: 0 where visible, -inf elsewhere; packed query rows in
        `range_attention`'s order (row, query head of the KV head, query token).
    """
    batch, width = block_tables.shape
    device = block_tables.device
    lengths = seq_lens.to(torch.long)
    # token[b, s]: which of row b's tokens slot s holds (-1: none). A row's unused table entries go to a spare
    # block past the range, cut off below.
    entries = torch.arange(width, device=device)[None, :]
    used = entries < (lengths[:, None] + block_size - 1) // block_size
    if first_entries is not None:
        used &= entries >= first_entries.to(device)[:, None]
    target = block_tables.to(torch.long) - first_block
    target = torch.where(used & (target >= 0) & (target < num_blocks), target, num_blocks)
    tokens = torch.arange(width * block_size, device=device).view(1, width, block_size).expand(batch, -1, -1)
    token = torch.full((batch, num_blocks + 1, block_size), -1, dtype=torch.long, device=device)
    token.scatter_(1, target[:, :, None].expand(-1, -1, block_size), tokens)
    token = token[:, :num_blocks].reshape(batch, 1, num_blocks * block_size)
    positions = lengths[:, None] - q_len + torch.arange(q_len, device=device)  # [B, q]
    visible = (token >= 0) & (token <= positions[:, :, None])  # [B, q, W]
    if sliding_window is not None:
        visible &= token > positions[:, :, None] - sliding_window
    if chunk_size is not None:
        origin = torch.zeros(batch, 1, dtype=torch.long, device=device) if key_padding is None else (
            (~key_padding).to(torch.long).cumprod(dim=1).sum(dim=1, keepdim=True))
        own = (positions - origin).clamp_min(0) // chunk_size * chunk_size + origin  # [B, q]
        visible &= token >= own[:, :, None]
    if key_padding is not None:
        visible &= key_padding.gather(1, token[:, 0].clamp(0, key_padding.shape[1] - 1))[:, None, :]
    visible = visible[:, None].expand(-1, groups, -1, -1).reshape(1, 1, batch * groups * q_len, -1)
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, -torch.inf)


def range_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    first_block: int,
    num_blocks: int,
    mask: torch.Tensor,
    *,
    scale: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Paged attention of all rows at once over one range of consecutive blocks that holds every row's keys.

    When the rows' blocks are packed together (the k samples or beams of one prompt share its blocks, and their
    own blocks follow), the range is read in place as one key sequence: all ``B * H * q`` queries attend to it in a
    single call, and `mask` keeps each query to its own row's keys. Nothing is gathered and nothing is merged; the
    price is the other rows' private keys, which every query scores and the mask discards. Every slot of the range
    must hold finite values, used or not (a masked NaN still spoils the softmax): a `PagedCache` zeroes new blocks.

    Args:
        query: ``[B, H, q, D]``.
        key_cache, value_cache: ``[N, bs, Hkv, D]``.
        first_block, num_blocks: the range ``[first_block, first_block + num_blocks)``.
        mask: ``[1, 1, B * H / Hkv * q, num_blocks * bs]`` from `range_mask`.
        sinks: ``[H]`` attention sinks (see `attend`), or None.

    Returns:
        ``[B, q, H, D]``.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads = key_cache.shape[2]
    groups = heads // kv_heads
    # One row of queries per (row, query head of the KV head, query token), for each KV head.
    packed = query.reshape(batch, kv_heads, groups * q_len, dim).transpose(0, 1).reshape(1, kv_heads, -1, dim)
    keys = read_blocks(key_cache, first_block, num_blocks)
    values = read_blocks(value_cache, first_block, num_blocks)
    value_dim = values.shape[-1]  # may differ from the keys' (multi-head latent attention)
    if sinks is not None:  # one logit per packed query row: the sink of its query head
        sinks = sinks.float().view(1, kv_heads, groups, 1).expand(batch, -1, -1, q_len).transpose(0, 1).reshape(
            1, kv_heads, -1)
    out = attend(packed, keys, values, mask, scale=scale, softcap=softcap, sinks=sinks)  # [1, B * g * q, Hkv, Dv]
    return out.view(batch, groups, q_len, kv_heads, value_dim).permute(0, 2, 3, 1, 4).reshape(
        batch, q_len, heads, value_dim)


def ranges_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor | LayerStore,
    value_cache: torch.Tensor | LayerStore,
    block_ranges: Sequence[tuple[int, int]],
    masks: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]],
    *,
    scale: float,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """`range_attention` over several block ranges (one per slab of a pool, `hf_paged.storage`): each range is
    read in place, attended by all packed queries, and the partial results are merged by log-sum-exp.

    Args:
        query: ``[B, H, q, D]``.
        key_cache, value_cache: ``[N, bs, Hkv, D]`` pools or `hf_paged.storage.LayerStore`s (each range must lie in
            one slab).
        block_ranges: ``[(first_block, num_blocks), ...]``; together they hold every row's keys.
        masks: per range, ``(mask, visible)``: its `range_mask` and ``[1, 1, M]`` bool, whether each packed query
            sees any slot of it; ``(None, None)`` when every query sees every slot.
        sinks: ``[H]`` attention sinks (see `attend`), or None.

    Returns:
        ``[B, q, H, Dv]``.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads = key_cache.shape[2]
    groups = heads // kv_heads
    value_dim = head_dim(value_cache)
    packed = query.reshape(batch, kv_heads, groups * q_len, dim).transpose(0, 1).reshape(1, kv_heads, -1, dim)
    out = lse = None
    for (first, count), (mask, visible) in zip(block_ranges, masks, strict=True):
        keys, values = read_blocks(key_cache, first, count), read_blocks(value_cache, first, count)
        part, part_lse = _additive_attention_with_lse(packed, keys, values, mask, visible, scale, softcap)
        if out is None:
            out, lse = part, part_lse
        else:
            out, lse = merge_attention(out, lse, part, part_lse), torch.logaddexp(lse, part_lse)
    if sinks is not None:  # the sink joins the denominator (as in `shared_prefix_attention`)
        sink = sinks.float().view(1, kv_heads, groups, 1).expand(batch, -1, -1, q_len).transpose(0, 1).reshape(
            1, kv_heads, -1)
        out = out * torch.sigmoid(lse - sink)[..., None]
    return out[0].view(kv_heads, batch, groups, q_len, value_dim).permute(1, 3, 0, 2, 4).reshape(
        batch, q_len, heads, value_dim).to(query.dtype)


def _additive_attention_with_lse(query, key, value, mask, visible, scale, softcap):
    """`attention_with_lse` for an additive mask ``[1, 1, M, kv]`` and its ``visible`` rows ``[1, 1, M]`` (both
    None: nothing masked)."""
    key, value = key.to(query.dtype), value.to(query.dtype)
    if softcap is None and query.device.type == "cpu" and _FLASH_CPU is not None and value.shape[-1] == query.shape[-1]:
        if mask is None:
            out, lse = _FLASH_CPU(query, key, value, 0.0, False, scale=scale)
            return out.float(), lse.float()
        out, lse = _FLASH_CPU(query, key, value, 0.0, False, attn_mask=mask.to(query.dtype), scale=scale)
        return out.float(), lse.float().masked_fill(~visible, -torch.inf)  # a query seeing nothing: out is 0
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return torch.matmul(torch.exp(scores - finite[..., None]), value.float()), lse
