"""What a Transformers mask function asks for, carried from the ``"hf_paged"`` mask function to the attention.

Transformers expresses sliding windows and chunked attention (Llama 4) in the mask function it hands the mask
interface (``create_sliding_window_causal_mask``, ``create_chunked_causal_mask``, a model's ``and``/``or`` masks),
not always in the attention's kwargs. Rather than materialise that mask as a 4-D tensor, `describe` reads the
function's structure: causal, optionally intersected with a sliding window and/or a chunk overlay. Anything else
(bidirectional parts, ``or`` masks, packed sequences, a model's own function) is not described, and the caller
builds Transformers' full 4-D mask instead: correctness first.

The mask function returns a 2-D boolean padding mask ``[B, kv]`` that carries the `MaskPattern` as an attribute
(`attach`); the attention function reads it back (`detach`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import masking_utils

__all__ = ["MaskPattern", "attach", "cache_windows", "describe", "detach", "drop_keys_before"]

_PATTERN_ATTR = "_hf_paged_pattern"
_PADDED_ATTR = "_hf_paged_padded"


@dataclass(frozen=True)
class MaskPattern:
    """A causal mask, optionally restricted to a sliding window and/or to the query's chunk.

    Attributes:
        sliding_window: query ``p`` sees keys ``j > p - sliding_window``, or None.
        chunk_size: query ``p`` sees keys of its own chunk, ``(j - s) // c == (p - s) // c`` with ``s`` the row's
            first real token, or None.
        chunk_start: ``[B]`` the ``s`` Transformers used (its count of leading padding), when chunked; only
            checked by the mask function, never used as a memo key.
    """

    sliding_window: int | None = None
    chunk_size: int | None = None
    chunk_start: torch.Tensor | None = None


def _leaves(fn) -> list | None:
    """The functions an ``and_masks`` tree intersects, flattened; None if it holds anything but ``and`` nodes."""
    if getattr(fn, "__module__", None) != masking_utils.__name__:
        return None
    if getattr(fn, "__qualname__", "") == "and_masks.<locals>.and_mask":
        out = []
        for child in inspect.getclosurevars(fn).nonlocals.get("mask_functions", ()):
            leaves = _leaves(child)
            if leaves is None:
                return None
            out += leaves
        return out
    return [fn]


def describe(mask_function) -> MaskPattern | None:
    """The `MaskPattern` of a Transformers mask function (None: the default causal one), or None if it is not one."""
    if mask_function is None:
        return MaskPattern()
    leaves = _leaves(mask_function)
    if not leaves:
        return None
    causal, window, chunk, chunk_start = False, None, None, None
    for leaf in leaves:
        name = leaf.__qualname__
        if leaf is masking_utils.causal_mask_function:
            causal = True
        elif name == "sliding_window_overlay.<locals>.inner_mask":
            size = inspect.getclosurevars(leaf).nonlocals.get("sliding_window")
            if not isinstance(size, int) or size < 1:
                return None
            window = size if window is None else min(window, size)
        elif name == "chunked_overlay.<locals>.inner_mask":
            closure = inspect.getclosurevars(leaf).nonlocals
            size, start = closure.get("chunk_size"), closure.get("left_padding")
            if chunk is not None or not isinstance(size, int) or size < 1 or not isinstance(start, torch.Tensor):
                return None
            chunk, chunk_start = size, start
        else:
            return None
    return MaskPattern(window, chunk, chunk_start) if causal else None


def attach(padding: torch.Tensor, pattern: MaskPattern) -> torch.Tensor:
    """Mark the 2-D boolean mask `padding` ``[B, kv]`` with `pattern` (and whether any key is padded)."""
    setattr(padding, _PATTERN_ATTR, MaskPattern(pattern.sliding_window, pattern.chunk_size))
    setattr(padding, _PADDED_ATTR, not bool(padding.all()))
    return padding


def detach(attention_mask: torch.Tensor | None) -> tuple[MaskPattern | None, torch.Tensor | None]:
    """``(pattern, padding mask or None when nothing is padded)`` of a mask from `attach`; ``(None, mask)`` for any
    other mask."""
    pattern = getattr(attention_mask, _PATTERN_ATTR, None)
    if pattern is None:
        return None, attention_mask
    return pattern, attention_mask if getattr(attention_mask, _PADDED_ATTR, True) else None


def cache_windows(config) -> tuple[int | None, ...]:
    """Per layer, the window Transformers' own `DynamicCache` keeps for a model with `config` (None: all keys).

    A `DynamicCache` built from a config with a ``sliding_window`` (or ``layer_types`` of sliding / chunked
    layers) keeps only the last ``window - 1`` keys of those layers between steps. For models whose mask has the
    same window or chunk, that changes nothing; but a model whose config has a ``sliding_window`` its attention
    never applies (Moshi) attends, in Transformers' cached decoding, only to what the cache kept. hf_paged mirrors
    that: it asks Transformers' `DynamicCache` which of its layers slide, so the answer follows the installed
    release. It builds a `DynamicCache`: callers memoise it (`hf_paged.PagedCache.cache_window`, once per cache;
    Transformers' configs are unhashable, so no memo keyed by the config could work).
    """
    from transformers.cache_utils import DynamicCache

    try:
        layers = DynamicCache(config=config).layers
    except Exception:  # a config DynamicCache cannot read: assume no layer slides (the model's own mask decides)
        return ()
    return tuple(getattr(layer, "sliding_window", None) if "Sliding" in type(layer).__name__ else None
                 for layer in layers)


def drop_keys_before(attention_mask: torch.Tensor | None, first_kept: torch.Tensor, kv_len: int) -> torch.Tensor:
    """`attention_mask` (2-D ``[B, >= kv_len]`` or None) with every key before ``first_kept[b]`` masked out in row
    ``b``: the keys a window-keeping `DynamicCache` has already dropped (see `cache_windows`)."""
    keys = torch.arange(kv_len, device=first_kept.device)
    kept = keys[None, :] >= first_kept.to(torch.long)[:, None]
    if attention_mask is None:
        return kept
    return attention_mask[:, :kv_len].to(torch.bool) & kept
