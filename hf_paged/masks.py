"""What a Transformers mask function asks for, carried from the ``"hf_paged"`` mask function to the attention.

Transformers expresses sliding windows and chunked attention (Llama 4) in the mask function it hands the mask
interface (``create_sliding_window_causal_mask``, ``create_chunked_causal_mask``, a model's ``and``/``or`` masks),
not always in the attention's kwargs. Rather than materialise that mask as a 4-D tensor, `describe` reads the
function's structure: causal, optionally intersected with a sliding window and/or a chunk overlay. Anything else
(bidirectional parts, ``or`` masks, packed sequences, a model's own function) is not described, and the caller
builds Transformers' full 4-D mask instead: correctness first.

The mask function returns the boolean key padding mask as a `PaddingMask` ``[B, 1, 1, kv]`` (a view of the 2-D
``[B, kv]`` one, broadcast over heads and queries) that carries the `MaskPattern` (`attach`); the attention function
reads both back (`detach`). It has the four dimensions of Transformers' masks because Transformers indexes them so:
Gemma 4 gives its KV-shared layers only the last ``logits_to_keep`` queries of a prefill and slices every mask to
them (``mask[:, :, -1:, :]``, `_maybe_slice_kv_shared_inputs`); on the broadcast query dimension that slice is the
same mask, and the attention takes its queries to be the last ``query.shape[2]`` positions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import masking_utils

__all__ = ["MaskPattern", "PaddingMask", "attach", "cache_windows", "describe", "detach", "drop_keys_before"]


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


class PaddingMask(torch.Tensor):
    """The ``"hf_paged"`` mask as Transformers holds it: boolean ``[B, 1, 1, kv]``, True where a key is a real token,
    broadcast over heads and queries, with the `MaskPattern` the attention applies (causality, window, chunks).

    Indexing that keeps the batch and key dimensions (a slice of the query dimension, as Gemma 4's KV-shared layers
    take) and moves or copies (``to``, ``contiguous``, ``clone``, ``detach``) return a `PaddingMask` with the same marks;
    every other operation returns a plain tensor, which no longer describes a causal mask.

    Attributes:
        pattern: the `MaskPattern`.
        padding: the 2-D ``[B, kv]`` mask, one object for every mask derived from this one (the attention memoises
            per step by its id), or None when no key is padded.
    """

    pattern: MaskPattern
    padding: torch.Tensor | None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if (func in _KEEPS_MARKS and isinstance(source, PaddingMask) and isinstance(out, torch.Tensor)
                and out.dim() == 4 and out.dtype == torch.bool
                and (out.shape[0], out.shape[-1]) == (source.shape[0], source.shape[-1])):
            return _marked(out, source.pattern, source.padding_on(out.device), source._moved)
        return out

    def padding_on(self, device: torch.device) -> torch.Tensor | None:
        """`padding` on `device` (moved once per device: every mask derived from this one gets the same object)."""
        if self.padding is None or self.padding.device == device:
            return self.padding
        if device not in self._moved:
            self._moved[device] = self.padding.to(device)
        return self._moved[device]


_KEEPS_MARKS = frozenset({torch.Tensor.__getitem__, torch.Tensor.to, torch.Tensor.contiguous, torch.Tensor.clone,
                          torch.Tensor.detach})


def _marked(mask: torch.Tensor, pattern: MaskPattern, padding: torch.Tensor | None, moved: dict) -> PaddingMask:
    out = mask.as_subclass(PaddingMask)
    out.pattern, out.padding, out._moved = pattern, padding, moved
    return out


def attach(padding: torch.Tensor, pattern: MaskPattern) -> PaddingMask:
    """The `PaddingMask` of the 2-D boolean mask `padding` ``[B, kv]`` marked with `pattern`."""
    pattern = MaskPattern(pattern.sliding_window, pattern.chunk_size)
    return _marked(padding[:, None, None, :], pattern, None if bool(padding.all()) else padding, {})


def detach(attention_mask: torch.Tensor | None) -> tuple[MaskPattern | None, torch.Tensor | None]:
    """``(pattern, 2-D padding mask ``[B, kv]`` or None when nothing is padded)`` of a `PaddingMask`; ``(None, mask)``
    for any other mask."""
    if not isinstance(attention_mask, PaddingMask):
        return None, attention_mask
    return attention_mask.pattern, attention_mask.padding_on(attention_mask.device)


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
