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

from . import backend, latent, masks, ops
from .compat import bool_mask, sdpa_mask
from .guard import owner_of
from .masks import key_padding_mask

__all__ = ["paged_attention_forward", "paged_attention_mask"]


def paged_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    mask_function=None,
    **kwargs,
) -> torch.Tensor:
    """Mask function for ``"hf_paged"``: the padding mask as a `hf_paged.masks.PaddingMask` ``[B, 1, 1, kv_length]``
    (a broadcast view of the 2-D one), carrying the mask's pattern.

    Causality, sliding windows and chunked attention are applied by the attention function itself, which takes the
    queries to be the last keys: `hf_paged.masks.describe` reads them off ``mask_function`` and the returned mask
    carries them (`hf_paged.masks.attach`; it is all True when nothing is padded). When that does not
    hold (a `StaticCache` has spare slots after the queries, a sliding-window cache dropped the first keys of a
    chunked layer) or the model asks for a pattern `describe` does not know (``or`` masks, packed sequences,
    block-wise attention, a model's own function), Transformers' full 4-D boolean mask is built instead and used
    as is.
    """
    queries_end_keys = int(q_offset) + q_length == kv_offset + kv_length  # False for a StaticCache's spare slots
    pattern = masks.describe(mask_function)
    device = kwargs.get("device") or (attention_mask.device if attention_mask is not None else None)
    padding = None
    if pattern is not None:
        if attention_mask is None:
            padding = torch.ones(batch_size, kv_length, dtype=torch.bool, device=device)
        else:
            padding = key_padding_mask(attention_mask[:, kv_offset:], kv_length)
        if pattern.chunk_size is not None:
            # Chunks start at each row's first real token, counted from key 0: the keys must all be there.
            leading = masks.first_real_keys(padding)
            if kv_offset != 0 or not torch.equal(leading.cpu(), pattern.chunk_start.to(torch.long).cpu().expand(
                    batch_size)):
                pattern = None
    if pattern is None or not allow_is_causal_skip or kwargs.get("use_vmap", False) or not queries_end_keys:
        if mask_function is not None:
            kwargs["mask_function"] = mask_function
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
    return masks.attach(padding, pattern)


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
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``"hf_paged"``.

    Args:
        query: ``[B, H, q, D]`` with rotary embeddings applied.
        key, value: a layer's block pools ``[N, bs, Hkv, D]`` (from a `PagedCache`) or plain ``[B, Hkv, kv, D]``.
        attention_mask: what `paged_attention_mask` returned: a `hf_paged.masks.PaddingMask` (the padding and the
            mask's pattern), a 4-D boolean mask, or (from elsewhere) None or a plain 2-D padding mask. The queries are
            the last ``q`` positions of the keys (fewer than the step's tokens where a model computes only the last
            ones, as Gemma 4's KV-shared layers do).
        scaling: multiplies ``q @ k^T`` (``1/sqrt(D)`` when None).
        sliding_window, softcap: as the model passes them; a pattern carried by the mask (what eager and sdpa
            apply) takes precedence over the ``sliding_window`` kwarg.
        s_aux: attention sinks ``[H]`` (gpt-oss and others), or None.

    Returns:
        ``(output [B, q, H, D], None)``: attention weights are never materialised.
    """
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    pattern, attention_mask = masks.detach(attention_mask)  # first: a PaddingMask dispatches every operation on it
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = bool_mask(attention_mask)  # a family's own additive mask (older releases)
    chunk_size = None
    if pattern is not None:
        sliding_window, chunk_size = pattern.sliding_window, pattern.chunk_size
    sinks = s_aux
    cache = owner_of(key)
    if cache is None:
        latent.prepare(module)  # a latent layer's expand_kv lets pools through from now on (latent.py)
        return _contiguous_attention(module, query, key, value, attention_mask, dropout, scale, sliding_window,
                                     softcap, is_causal, chunk_size, sinks), None
    step, key, value = cache.attention_inputs(key)
    if query.shape[2] != step.q_len:  # the step's last queries only (Gemma 4's KV-shared layers in a prefill)
        step = step.last_queries(query.shape[2])
    if step.fresh is not None:  # a sliding-window step that stores only its last tokens
        return _fresh_attention(cache, step, query, attention_mask, scale, sliding_window, softcap, sinks), None
    if step.key_offset and attention_mask is not None:  # the step's tables leave out the first blocks
        attention_mask = attention_mask[..., step.key_offset:]
    if sliding_window is not None and sliding_window >= step.max_seq_len:
        sliding_window = None  # the window covers every key: no mask needed
    if chunk_size is not None and chunk_size >= step.max_seq_len:
        chunk_size = None  # every key is in the first chunk
    if sliding_window is None and chunk_size is None and (attention_mask is None or attention_mask.dim() == 2):
        # Keys Transformers' own DynamicCache would already have dropped for this layer (Moshi's cache window)
        window = cache.cache_window(getattr(module, "config", None), module.layer_idx)
        if window is not None and step.max_seq_len - step.q_len > window - 1:
            attention_mask = masks.cache_window_mask(step, attention_mask, window)
    if cache.latent:  # cached latents of multi-head latent attention, attended with absorbed weights (latent.py)
        key_start = masks.key_starts(step, attention_mask) if step.triton and getattr(attention_mask, "ndim", 2) == 2 \
            else None
        return latent.attention(module, step, query, key, value, attention_mask, key_start, scale=scale,
                                sliding_window=sliding_window, softcap=softcap, chunk_size=chunk_size,
                                sinks=sinks), None
    if attention_mask is not None and attention_mask.dim() == 4:
        return _gathered_attention(step, query, key, value, attention_mask, scale, None, softcap, None, sinks), None
    if step.triton:
        key_start = masks.key_starts(step, attention_mask)
        if key_start is not None or attention_mask is None:
            same_width = value.shape[-1] == key.shape[-1]  # the shared-prefix kernel reads values of the keys' width
            if step.shared is not None and sinks is None and chunk_size is None and same_width:  # shared blocks once
                out = backend.shared_prefix_paged_attention(
                    query, key, value, step.shared.prefix_blocks, step.shared.tail_tables, step.seq_lens, key_start,
                    scale=scale, max_seq_len=step.max_seq_len, sliding_window=sliding_window, softcap=softcap,
                )
            else:
                features = {"chunk_size": chunk_size} if chunk_size is not None else {}
                if sinks is not None:
                    features["sinks"] = sinks
                out = backend.paged_attention(
                    query, key, value, step.block_tables, step.seq_lens, key_start,
                    scale=scale, max_seq_len=step.max_seq_len, sliding_window=sliding_window, softcap=softcap,
                    **features,
                )
            return out, None
    elif step.window is not None:
        mask = masks.window_mask(step, attention_mask, sliding_window, query.shape[1] // key.shape[2], query.dtype,
                                 chunk_size)
        out = ops.window_attention(query, key, value, *step.window, mask, scale=scale, softcap=softcap, sinks=sinks)
        return out, None
    elif step.windows is not None:  # a pool of several slabs: one window per slab, merged
        window_masks = masks.windows_masks(step, attention_mask, sliding_window, query.shape[1] // key.shape[2],
                                           query.dtype, chunk_size)
        out = ops.windows_attention(query, key, value, step.windows, window_masks, scale=scale, softcap=softcap,
                                    sinks=sinks)
        return out, None
    elif step.shared is not None and sliding_window is None and chunk_size is None:
        shared_masks = masks.shared_masks(step, attention_mask)
        if shared_masks is not None:
            shared = step.shared
            out = ops.shared_prefix_attention(
                query, key, value, shared.prefix_blocks, shared.tail_tables, step.max_seq_len - shared.prefix_len,
                *shared_masks, scale=scale, softcap=softcap, prefix_start=shared.prefix_start, sinks=sinks,
            )
            return out, None
    return _gathered_attention(step, query, key, value, attention_mask, scale, sliding_window, softcap, chunk_size,
                               sinks), None


def _fresh_attention(cache, step, query, attention_mask, scale, sliding_window, softcap, sinks) -> torch.Tensor:
    """Attention of a step that stores only its last tokens: over the keys kept before it and its own keys, as
    Transformers' sliding-window cache layer returns them (``DynamicSlidingWindowLayer.update``)."""
    kept_keys, kept_values, keys, values = cache.fresh_inputs(step)
    if kept_keys is not None:
        keys = torch.cat([kept_keys.to(keys.dtype), keys], dim=2)
        values = torch.cat([kept_values.to(values.dtype), values], dim=2)
    kv_len = keys.shape[2]
    q_len = query.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        end = step.kv_start + kv_len
        mask = attention_mask[..., -q_len:, step.kv_start:end].to(torch.bool)
        return ops.attend(query, keys, values, mask, scale=scale, softcap=softcap, sinks=sinks)
    seq_lens = torch.full((query.shape[0],), kv_len, dtype=torch.long, device=query.device)
    window = sliding_window if sliding_window is not None and sliding_window < kv_len else None
    if attention_mask is None and window is None and q_len == kv_len:
        return ops.attend(query, keys, values, None, scale=scale, softcap=softcap, is_causal=True, sinks=sinks)
    mask = ops.causal_mask(seq_lens, None, q_len, kv_len, window)
    if attention_mask is not None:
        padding = key_padding_mask(attention_mask[:, step.kv_start:], kv_len)
        mask = mask & padding[:, None, None, :]
    return ops.attend(query, keys, values, mask, scale=scale, softcap=softcap, sinks=sinks)


def _gathered_attention(step, query, key, value, attention_mask, scale, sliding_window, softcap, chunk_size=None,
                        sinks=None) -> torch.Tensor:
    """Gather each row's keys and values out of the pools, then attend as over contiguous tensors."""
    keys = ops.gather_kv(key, step.block_tables, step.max_seq_len, step.first_block)
    values = ops.gather_kv(value, step.block_tables, step.max_seq_len, step.first_block)
    mask = masks.step_mask(step, attention_mask, sliding_window, chunk_size)
    # Every row holds exactly this step's tokens: a mask-free causal attention is the whole story.
    is_causal = mask is None and 1 < step.q_len == step.max_seq_len
    return ops.attend(query, keys, values, mask, scale=scale, softcap=softcap, is_causal=is_causal, sinks=sinks)


def _contiguous_attention(module, query, key, value, attention_mask, dropout, scale, sliding_window, softcap,
                          is_causal, chunk_size=None, sinks=None) -> torch.Tensor:
    """Attention over ordinary ``[B, Hkv, kv, D]`` keys and values (no paged cache involved)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    dropout = dropout if module.training else 0.0
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[..., :kv_len].to(torch.bool)
        return ops.attend(query, key, value, mask, scale=scale, softcap=softcap, dropout=dropout, sinks=sinks)
    window = sliding_window if sliding_window is not None and sliding_window < kv_len else None
    chunk = chunk_size if chunk_size is not None and chunk_size < kv_len else None
    if attention_mask is None and window is None and chunk is None and (q_len == kv_len or q_len == 1 or not causal):
        return ops.attend(query, key, value, None, scale=scale, softcap=softcap, dropout=dropout,
                          is_causal=causal and q_len > 1, sinks=sinks)
    batch = query.shape[0]
    padding = None if attention_mask is None else key_padding_mask(attention_mask, kv_len)
    if causal:
        seq_lens = torch.full((batch,), kv_len, dtype=torch.long, device=query.device)
        chunk_start = None if padding is None or chunk is None else masks.first_real_keys(padding)
        mask = ops.causal_mask(seq_lens, None, q_len, kv_len, window, chunk, chunk_start)
    else:
        mask = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool, device=query.device)
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    return ops.attend(query, key, value, mask, scale=scale, softcap=softcap, dropout=dropout, sinks=sinks)
