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
    out = backend.attend(cache.attention_inputs(key, module), query, None if full_mask is not None else attention_mask,
                         full_mask, scale=scale, sliding_window=sliding_window, softcap=softcap, chunk_size=chunk_size,
                         sinks=s_aux, module=module)
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
