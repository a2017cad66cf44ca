"""The ``"hf_paged"`` attention and mask functions registered with Transformers.

Transformers calls the attention function with whatever the cache's ``update`` returned. For a `PagedCache` that
is the layer's block pool, which carries a weak reference to its `KVPool`, whose ``active`` cache wrote it just
before: the step's block tables travel with the cache object of *this* ``generate`` call, so concurrent calls on
one model never see each other's metadata (calls sharing a prefix-cache pool run one at a time). For plain
tensors (``use_cache=False``, a `DynamicCache` or a `StaticCache` the user passed) the function computes ordinary
attention over them.

Over a `PagedCache`'s pools, a layer's attention runs the read path its step plan picks (`hf_paged.step.read_path`,
memoised per step for the layers of one kind): the Triton kernels (`hf_paged.backend`), a block range or one range
per slab read in place, a shared prefix read once per group of rows, the rows gathered, or the latents of
multi-head latent attention (`hf_paged.latent`).
"""

from __future__ import annotations

import torch

from . import backend, latent, masks, ops, quant
from .compat import bool_mask, sdpa_mask
from .guard import owner_of
from .masks import key_padding_mask
from .step import read_path

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
    return masks.attach(padding, pattern, unpadded=attention_mask is None)


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
    cache = owner_of(key)
    if cache is None:
        latent.prepare(module)  # a latent layer's expand_kv lets pools through from now on (latent.py)
        return _contiguous_attention(module, query, key, value, attention_mask, dropout, scale, sliding_window,
                                     softcap, is_causal, chunk_size, s_aux), None
    full_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
    padding = None if full_mask is not None else attention_mask
    out = _layer_attention(cache.attention_inputs(key, module), query, padding, full_mask, scale=scale,
                           sliding_window=sliding_window, softcap=softcap, chunk_size=chunk_size, sinks=s_aux,
                           module=module)
    return out, None


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
    attention_mask = masks.real_padding(attention_mask)
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


def _layer_attention(layer, query: torch.Tensor, padding: torch.Tensor | None, full_mask: torch.Tensor | None, *,
                     scale: float, sliding_window: int | None, softcap: float | None, chunk_size: int | None,
                     sinks: torch.Tensor | None, module: torch.nn.Module | None = None) -> torch.Tensor:
    """One layer's attention over its paged keys, by the read path `hf_paged.step.read_path` picks. Over 8-bit rows
    stored rotated (`hf_paged.quant`, every layer but latents), the query is rotated the same way and the output
    rotated back.

    Args:
        layer: the layer's `hf_paged.step.LayerRead` (its step plan, key and value stores, fresh inputs, cache
            window).
        query: ``[B, H, q, D]``, the step's last ``q`` positions.
        padding: the 2-D key padding mask ``[B, kv]`` (True: a real token), not checked for padding yet, or None
            when nothing is padded.
        full_mask: a 4-D boolean mask (a pattern `hf_paged.masks.describe` does not know), or None.
        scale, sliding_window, softcap, chunk_size, sinks: the layer's (see `paged_attention_forward`).
        module: the attention module (a latent layer's weights, `hf_paged.latent`).

    Returns:
        ``[B, q, H, Dv]``.
    """
    if layer.latent or not quant.is_quantized(layer.keys.dtype):
        return _read_attention(layer, query, padding, full_mask, scale=scale, sliding_window=sliding_window,
                               softcap=softcap, chunk_size=chunk_size, sinks=sinks, module=module)
    out = _read_attention(layer, quant.rotated(query), padding, full_mask, scale=scale, sliding_window=sliding_window,
                          softcap=softcap, chunk_size=chunk_size, sinks=sinks, module=module)
    return quant.rotated(out)


def _read_attention(layer, query, padding, full_mask, *, scale, sliding_window, softcap, chunk_size, sinks, module):
    """`_layer_attention` over the stores as they hold the rows."""
    plan = layer.plan
    if query.shape[2] != plan.q_len:  # the step's last queries only (Gemma 4's KV-shared layers in a prefill)
        plan = plan.last_queries(query.shape[2])
    if plan.fresh is not None:  # a sliding-window step that stores only its last tokens
        return _fresh_attention(plan, layer.fresh, query, full_mask if full_mask is not None else padding, scale,
                                sliding_window, softcap, sinks)
    if sliding_window is not None and sliding_window >= plan.max_seq_len:
        sliding_window = None  # the window covers every key: no mask needed
    if chunk_size is not None and chunk_size >= plan.max_seq_len:
        chunk_size = None  # every key is in the first chunk
    keys, values = layer.keys, layer.values
    if full_mask is not None:
        if plan.key_offset:  # the step's tables leave out the first blocks
            full_mask = full_mask[..., plan.key_offset:]
        keys_padding = None
        path = read_path(plan, full_mask=True, left_padding=False, groups_padded_alike=False,
                         sliding_window=sliding_window, chunk_size=chunk_size, sinks=sinks is not None,
                         same_width=layer.same_width, latent=layer.latent)
    else:
        cache_window = layer.cache_window
        if (cache_window is None or sliding_window is not None or chunk_size is not None
                or plan.max_seq_len - plan.q_len <= cache_window - 1):
            cache_window = None  # else keys Transformers' own DynamicCache would already have dropped (Moshi)
        path, keys_padding = plan.memo(
            ("attend", id(padding), cache_window, sliding_window, chunk_size, sinks is None, layer.same_width,
             layer.token_bytes, layer.latent),
            lambda: _route(plan, padding, cache_window, sliding_window, chunk_size, sinks is not None,
                           layer.same_width, layer.token_bytes, layer.latent))
    if path == "latent":  # cached latents: absorbed weights, or the latents expanded (latent.py)
        return latent.attention(module, plan, query, keys, values,
                                full_mask if keys_padding is None else keys_padding.mask,
                                None if keys_padding is None else keys_padding.starts, scale=scale,
                                sliding_window=sliding_window, softcap=softcap, chunk_size=chunk_size, sinks=sinks)
    if full_mask is not None:
        return _gathered_attention(plan, query, keys, values, full_mask, scale, None, softcap, None, sinks)
    if path == "triton":
        features = {"chunk_size": chunk_size} if chunk_size is not None else {}
        if sinks is not None:
            features["sinks"] = sinks
        return backend.paged_attention(query, keys, values, plan.block_tables, plan.seq_lens, keys_padding.starts,
                                       scale=scale, max_seq_len=plan.max_seq_len, sliding_window=sliding_window,
                                       softcap=softcap, workspace=plan.workspace, **features)
    if path == "triton_shared":  # the shared blocks once per group of rows
        return backend.shared_prefix_paged_attention(
            query, keys, values, plan.shared.prefix_blocks, plan.shared.tail_tables, plan.seq_lens,
            keys_padding.starts, scale=scale, max_seq_len=plan.max_seq_len, sliding_window=sliding_window,
            softcap=softcap, workspace=plan.workspace)
    if path == "range":
        mask = masks.range_mask(plan, keys_padding.mask, sliding_window, query.shape[1] // keys.shape[2],
                                query.dtype, chunk_size)
        return ops.range_attention(query, keys, values, *plan.block_range, mask, scale=scale, softcap=softcap,
                                   sinks=sinks)
    if path == "ranges":  # a pool of several slabs: one range per slab, merged
        range_masks = masks.ranges_masks(plan, keys_padding.mask, sliding_window, query.shape[1] // keys.shape[2],
                                         query.dtype, chunk_size)
        return ops.ranges_attention(query, keys, values, plan.block_ranges, range_masks, scale=scale,
                                    softcap=softcap, sinks=sinks)
    if path == "shared":
        shared = plan.shared
        return ops.shared_prefix_attention(
            query, keys, values, shared.prefix_blocks, shared.tail_tables, plan.max_seq_len - shared.prefix_len,
            *masks.shared_masks(plan, keys_padding.mask), scale=scale, softcap=softcap,
            prefix_start=shared.prefix_start, sinks=sinks,
        )
    return _gathered_attention(plan, query, keys, values, keys_padding.mask, scale, sliding_window, softcap,
                               chunk_size, sinks, spans=plan.spans if path == "spans" else None, layer=layer)


def _route(plan, padding, cache_window, sliding_window, chunk_size, sinks, same_width, token_bytes,
           is_latent) -> tuple[str, masks.Padding]:
    """``(read path, key padding)`` of the layers of one kind in one step (memoised on the plan by
    `_read_attention`)."""
    keys_padding = masks.step_padding(plan, padding, cache_window)
    path = read_path(plan, full_mask=False, left_padding=keys_padding.left,
                     groups_padded_alike=masks.padded_alike(plan, keys_padding), sliding_window=sliding_window,
                     chunk_size=chunk_size, sinks=sinks, same_width=same_width, token_bytes=token_bytes,
                     latent=is_latent)
    return path, keys_padding


def _fresh_attention(plan, fresh, query, attention_mask, scale, sliding_window, softcap, sinks) -> torch.Tensor:
    """Attention of a step that stores only its last tokens: over the keys kept before it and its own keys, as
    Transformers' sliding-window cache layer returns them (``DynamicSlidingWindowLayer.update``)."""
    kept_keys, kept_values, keys, values = fresh
    if kept_keys is not None:
        keys = torch.cat([kept_keys.to(keys.dtype), keys], dim=2)
        values = torch.cat([kept_values.to(values.dtype), values], dim=2)
    kv_len = keys.shape[2]
    q_len = query.shape[2]
    if attention_mask is not None and attention_mask.dim() == 4:
        end = plan.kv_start + kv_len
        mask = attention_mask[..., -q_len:, plan.kv_start:end].to(torch.bool)
        return ops.attend(query, keys, values, mask, scale=scale, softcap=softcap, sinks=sinks)
    attention_mask = masks.real_padding(attention_mask)
    seq_lens = torch.full((query.shape[0],), kv_len, dtype=torch.long, device=query.device)
    window = sliding_window if sliding_window is not None and sliding_window < kv_len else None
    if attention_mask is None and window is None and q_len == kv_len:
        return ops.attend(query, keys, values, None, scale=scale, softcap=softcap, is_causal=True, sinks=sinks)
    mask = ops.causal_mask(seq_lens, None, q_len, kv_len, window)
    if attention_mask is not None:
        padding = key_padding_mask(attention_mask[:, plan.kv_start:], kv_len)
        mask = mask & padding[:, None, None, :]
    return ops.attend(query, keys, values, mask, scale=scale, softcap=softcap, sinks=sinks)


def _gathered_attention(plan, query, key, value, attention_mask, scale, sliding_window, softcap, chunk_size=None,
                        sinks=None, spans=None, layer=None) -> torch.Tensor:
    """Gather each row's keys and values out of the pools (or a single row's `spans`, concatenated), then attend as
    over contiguous tensors. Rows read in place (`StepPlan.row_stride`, a single row's `first_block`) come from
    views made once per step for every layer of `layer`'s pool."""
    rows = None if spans is not None or layer is None else _rows_in_place(plan, layer)
    if rows is not None:
        keys, values = (quant.from_storage(stored) for stored in rows)
    else:
        keys = ops.gather_kv(key, plan.block_tables, plan.max_seq_len, plan.first_block, spans, plan.row_stride)
        values = ops.gather_kv(value, plan.block_tables, plan.max_seq_len, plan.first_block, spans, plan.row_stride)
    mask = masks.step_mask(plan, attention_mask, sliding_window, chunk_size)
    # Every row holds exactly this step's tokens: a mask-free causal attention is the whole story.
    is_causal = mask is None and 1 < plan.q_len == plan.max_seq_len
    return ops.attend(query, keys, values, mask, scale=scale, softcap=softcap, is_causal=is_causal, sinks=sinks)


def _rows_in_place(plan, layer) -> tuple | None:
    """``layer``'s stored keys and values, its rows read in place where the step's plan reads them so, from the views
    of every layer of its pool made at the step's first such read (memoised on the plan, for the pool's tensors as
    bound now); else None."""
    if layer.pool is None or (plan.row_stride is None and plan.first_block is None):
        return None
    first, stride = plan.row_stride if plan.row_stride is not None else (plan.first_block, 0)
    batch = plan.block_tables.shape[0]
    rows = plan.memo(("rows in place", id(layer.pool), layer.pool.binds),
                     lambda: layer.pool.rows_in_place(batch, plan.max_seq_len, first, stride))
    return None if rows is None else rows[layer.slot]
