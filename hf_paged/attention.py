"""The ``"hf_paged"`` attention and mask functions registered with Transformers.

Transformers calls the attention function with whatever the cache's ``update`` returned. For a `PagedCache` that
is the layer's block pool, which carries a weak reference to its `KVPool`, whose ``active`` cache wrote it just
before: the step's block tables travel with the cache object of *this* ``generate`` call, so concurrent calls on
one model never see each other's metadata (calls sharing a prefix-cache pool run one at a time). For plain
tensors (``use_cache=False``, a `DynamicCache` or a `StaticCache` the user passed) the function computes ordinary
attention over them.
"""

from __future__ import annotations

import torch

from . import backend, ops
from .cache import key_padding_mask, owner_of
from .compat import bool_mask, sdpa_mask

__all__ = ["paged_attention_forward", "paged_attention_mask"]


def paged_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function for ``"hf_paged"``: the 2-D padding mask ``[B, kv_length]`` (None when nothing is padded).

    Causality and sliding windows are applied by the attention function itself, which takes the queries to be the
    last ``q_length`` keys. When that does not hold (a `StaticCache` has spare slots after the queries) or the model
    asks for a custom pattern (``or``/``and`` mask functions, packed sequences, block-wise attention),
    Transformers' full 4-D boolean mask is built instead and used as is.
    """
    queries_end_keys = int(q_offset) + q_length == kv_offset + kv_length  # False for a StaticCache's spare slots
    if not allow_is_causal_skip or kwargs.get("use_vmap", False) or not queries_end_keys:
        return sdpa_mask(
            batch_size=batch_size,
            q_length=q_length,
            kv_length=kv_length,
            q_offset=q_offset,
            kv_offset=kv_offset,
            attention_mask=attention_mask,
            allow_is_causal_skip=False,
            **kwargs,
        )
    if attention_mask is None:
        return None
    mask = key_padding_mask(attention_mask[:, kv_offset:], kv_length)
    return None if bool(mask.all()) else mask


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``"hf_paged"``.

    Args:
        query: ``[B, H, q, D]`` with rotary embeddings applied.
        key, value: a layer's block pools ``[N, bs, Hkv, D]`` (from a `PagedCache`) or plain ``[B, Hkv, kv, D]``.
        attention_mask: what `paged_attention_mask` returned: None, a 2-D padding mask or a 4-D boolean mask.
        scaling: multiplies ``q @ k^T`` (``1/sqrt(D)`` when None).
        sliding_window, softcap: as the model passes them.

    Returns:
        ``(output [B, q, H, D], None)``: attention weights are never materialised.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = bool_mask(attention_mask)  # a family's own additive mask (older releases)
    cache = owner_of(key)
    if cache is None:
        return _contiguous_attention(module, query, key, value, attention_mask, dropout, scale, sliding_window,
                                     softcap, is_causal), None
    step, key, value = cache.attention_inputs(module.layer_idx)
    if sliding_window is not None and sliding_window >= step.max_seq_len:
        sliding_window = None  # the window covers every key: no mask needed
    if attention_mask is not None and attention_mask.dim() == 4:
        return _gathered_attention(step, query, key, value, attention_mask, scale, sliding_window, softcap), None
    if step.triton:
        key_start = _key_start(step, attention_mask)
        if key_start is not None or attention_mask is None:
            out = backend.paged_attention(
                query, key, value, step.block_tables, step.seq_lens, key_start,
                scale=scale, max_seq_len=step.max_seq_len, sliding_window=sliding_window, softcap=softcap,
            )
            return out, None
    elif step.window is not None:
        mask = step.window_mask(attention_mask, sliding_window, query.shape[1] // key.shape[2], query.dtype)
        out = ops.window_attention(query, key, value, *step.window, mask, scale=scale, softcap=softcap)
        return out, None
    elif step.shared is not None and sliding_window is None:
        masks = step.shared_masks(attention_mask)
        if masks is not None:
            shared = step.shared
            out = ops.shared_prefix_attention(
                query, key, value, shared.prefix_blocks, shared.tail_tables, step.max_seq_len - shared.prefix_len,
                *masks, scale=scale, softcap=softcap, prefix_start=shared.prefix_start,
            )
            return out, None
    return _gathered_attention(step, query, key, value, attention_mask, scale, sliding_window, softcap), None


def _gathered_attention(step, query, key, value, attention_mask, scale, sliding_window, softcap) -> torch.Tensor:
    """Gather each row's keys and values out of the pools, then attend as over contiguous tensors."""
    keys = ops.gather_kv(key, step.block_tables, step.max_seq_len, step.first_block)
    values = ops.gather_kv(value, step.block_tables, step.max_seq_len, step.first_block)
    mask = step.mask(attention_mask, sliding_window)
    # Every row holds exactly this step's tokens: a mask-free causal attention is the whole story.
    is_causal = mask is None and 1 < step.q_len == step.max_seq_len
    return ops.attend(query, keys, values, mask, scale=scale, softcap=softcap, is_causal=is_causal)


def _key_start(step, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Per row, the first unpadded key, when the 2-D mask is pure left padding (memoised per step); else None."""
    if attention_mask is None:
        return None
    memo_key = ("key_start", id(attention_mask))
    if memo_key not in step._masks:
        mask = key_padding_mask(attention_mask, step.max_seq_len)
        start = (~mask).to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)
        positions = torch.arange(mask.shape[1], device=mask.device)
        pure_left_padding = bool((mask == (positions[None, :] >= start[:, None])).all())
        step._masks[memo_key] = start if pure_left_padding else None
    return step._masks[memo_key]


def _contiguous_attention(module, query, key, value, attention_mask, dropout, scale, sliding_window, softcap,
                          is_causal) -> torch.Tensor:
    """Attention over ordinary ``[B, Hkv, kv, D]`` keys and values (no paged cache involved)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    dropout = dropout if module.training else 0.0
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[..., :kv_len].to(torch.bool)
        return ops.attend(query, key, value, mask, scale=scale, softcap=softcap, dropout=dropout)
    window = sliding_window if sliding_window is not None and sliding_window < kv_len else None
    if attention_mask is None and window is None and (q_len == kv_len or q_len == 1 or not causal):
        return ops.attend(query, key, value, None, scale=scale, softcap=softcap, dropout=dropout,
                          is_causal=causal and q_len > 1)
    batch = query.shape[0]
    if causal:
        seq_lens = torch.full((batch,), kv_len, dtype=torch.long, device=query.device)
        mask = ops.causal_mask(seq_lens, None, q_len, kv_len, window)
    else:
        mask = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool, device=query.device)
    if attention_mask is not None:
        mask = mask & key_padding_mask(attention_mask, kv_len)[:, None, None, :]
    return ops.attend(query, key, value, mask, scale=scale, softcap=softcap, dropout=dropout)
