"""What a Transformers mask function asks for, carried from the ``"hf_paged"`` mask function to the attention.

Transformers expresses sliding windows and chunked attention (Llama 4) in the mask function it hands the mask
interface (``create_sliding_window_causal_mask``, ``create_chunked_causal_mask``, a model's ``and``/``or`` masks),
not always in the attention's kwargs. Rather than materialise that mask as a 4-D tensor, `describe` reads the
function's structure: causal, optionally intersected with a sliding window and/or a chunk overlay. Anything else
(bidirectional parts, ``or`` masks, packed sequences, a model's own function) is not described, and the caller
builds Transformers' full 4-D mask instead: correctness first.

Every mask a paged step needs is built here too, from the step's plan (`hf_paged.step.StepPlan`) and memoised on
it, so all layers of a step share one: `step_padding` (the keys' padding as the step reads it: its 2-D mask, and
each row's first key for the kernels' left padding, with the keys a cache window dropped), `step_mask` (gathered
keys), `range_mask` / `ranges_masks` (block ranges), `shared_masks` (rows sharing a prefix).

The padding is read without a host synchronisation where the cache knows it (``generate``'s masks pad each row
exactly before its live start: `hf_paged.step.StepPlan.key_starts`); otherwise once per step, in one read.

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

from . import ops

__all__ = ["MaskPattern", "Padding", "PaddingMask", "attach", "cache_windows", "describe", "detach", "drop_keys_before",
           "first_real_keys", "key_padding_mask", "padded_alike", "real_padding", "shared_masks", "step_mask",
           "step_padding", "range_mask", "ranges_masks"]


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
            per step by its id), or None when no key is padded (known without reading it: no mask was given).
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


def attach(padding: torch.Tensor, pattern: MaskPattern, unpadded: bool = False) -> PaddingMask:
    """The `PaddingMask` of the 2-D boolean mask `padding` ``[B, kv]`` marked with `pattern`; `unpadded`: it is all
    True (known on the host). Whether a given mask pads anything is not read here (that would synchronise with
    the device once per forward): the attention reads it where it must (`step_padding`, `real_padding`)."""
    pattern = MaskPattern(pattern.sliding_window, pattern.chunk_size)
    return _marked(padding[:, None, None, :], pattern, None if unpadded else padding, {})


def detach(attention_mask: torch.Tensor | None) -> tuple[MaskPattern | None, torch.Tensor | None]:
    """``(pattern, 2-D padding mask ``[B, kv]``, or None when nothing is padded)`` of a `PaddingMask` (the mask is
    not read: it may pad nothing, see `real_padding`); ``(None, mask)`` for any other mask."""
    if not isinstance(attention_mask, PaddingMask):
        return None, attention_mask
    return attention_mask.pattern, attention_mask.padding  # on the mask's device (every move moves it, `_marked`)


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


def key_padding_mask(attention_mask: torch.Tensor, kv_len: int) -> torch.Tensor:
    """A 2-D mask ``[B, >=0]`` cut (or padded with False on the right, as Transformers does) to ``[B, kv_len]``."""
    mask = attention_mask[:, :kv_len].to(torch.bool)
    if mask.shape[1] < kv_len:
        mask = torch.nn.functional.pad(mask, (0, kv_len - mask.shape[1]), value=False)
    return mask


def first_real_keys(padding: torch.Tensor) -> torch.Tensor:
    """Per row of a 2-D boolean mask (True: a real token), how many keys lead before its first real one."""
    return (~padding).to(torch.long).cumprod(dim=1).sum(dim=1)


def real_padding(padding: torch.Tensor | None) -> torch.Tensor | None:
    """`padding` (2-D, True: a real token), or None when it pads nothing: read once per mask object and in-place
    version (one host synchronisation per forward; the answer is kept on the tensor, which every layer of the
    forward shares)."""
    if padding is None or padding.dim() != 2:
        return padding
    try:
        version = padding._version
    except RuntimeError:  # an inference tensor keeps no version: read it every time
        version = None
    known = getattr(padding, "_hf_paged_unpadded", None)
    if known is not None and version is not None and known[0] == version:
        unpadded = known[1]
    else:
        unpadded = bool(padding.all())
        if version is not None:
            padding._hf_paged_unpadded = (version, unpadded)
    return None if unpadded else padding


@dataclass(frozen=True)
class Padding:
    """The keys' padding of one step as its paged attention reads it (`step_padding`).

    Attributes:
        mask: ``[B, max_seq_len]`` bool (True: a key to attend to), or None when no key is padded.
        starts: ``[B]`` int32, each row's first key, when the padding is pure left padding (the kernels'
            ``key_start``); None when nothing is padded or the padding is not pure left padding.
        left: no padding, or pure left padding.
        host_starts: `starts` on the host (a list), when known.
    """

    mask: torch.Tensor | None
    starts: torch.Tensor | None
    left: bool
    host_starts: list[int] | None = None


def step_padding(step, padding: torch.Tensor | None, cache_window: int | None = None) -> Padding:
    """The step's key `Padding` from the 2-D mask `padding` (``[B, kv]`` indexed by token, or None: nothing padded)
    and, when `cache_window` is set, with the keys Transformers' window-keeping `DynamicCache` has dropped for the
    layer masked out too (`cache_windows`), memoised.

    When the plan carries each row's first key (`hf_paged.step.StepPlan.key_starts`: the masks ``generate``
    builds pad each row exactly before its live start), `padding` is not read at all; otherwise it is read once per
    step, in one host synchronisation (whether it pads anything, whether it is pure left padding, and where each row
    starts)."""
    return step.memo(("padding", id(padding), cache_window), lambda: _step_padding(step, padding, cache_window))


def _step_padding(step, padding, cache_window) -> Padding:
    kv_len = step.max_seq_len
    first_kept = None
    if cache_window is not None:  # per row, the first key the DynamicCache still holds
        first_kept = step.seq_lens - step.q_len - (cache_window - 1)
    if step.key_starts is not None:
        starts, host = step.key_starts, step.host_key_starts
        if first_kept is not None:
            starts = torch.maximum(starts, first_kept.clamp_min(0).to(starts.dtype))
            host = [max(start, length - step.q_len - (cache_window - 1))
                    for start, length in zip(host, step.lengths, strict=True)]
        if not any(host):
            return Padding(None, None, True, host)
        keys = torch.arange(kv_len, device=starts.device)
        return Padding(keys[None, :] >= starts[:, None], starts, True, host)
    if padding is None and first_kept is None:
        return Padding(None, None, True, None)
    if padding is not None:
        padding = key_padding_mask(padding[:, step.key_offset:] if step.key_offset else padding, kv_len)
    if first_kept is not None:
        padding = drop_keys_before(padding, first_kept, kv_len)
    starts = (~padding).to(torch.int32).cumprod(dim=1).sum(dim=1, dtype=torch.int32)
    keys = torch.arange(kv_len, device=padding.device)
    pure = (padding == (keys[None, :] >= starts[:, None])).all()
    *host, pure, unpadded = torch.cat([starts, torch.stack([pure, padding.all()]).to(torch.int32)]).tolist()
    if unpadded:
        return Padding(None, None, True, host)
    return Padding(padding, starts, True, host) if pure else Padding(padding, None, False, None)


def padded_alike(step, padding: Padding) -> bool:
    """Whether the rows of each group sharing a prefix (``step.shared``) are padded alike inside the prefix (what
    `shared_masks` needs), decided on the host; True without a shared prefix or padding."""
    shared = step.shared
    if shared is None or padding.mask is None:
        return True
    if padding.host_starts is None:
        return False
    starts = [min(start, shared.prefix_len) for start in padding.host_starts]
    size = shared.group_size
    return all(len(set(starts[first:first + size])) == 1 for first in range(0, len(starts), size))


def step_mask(step, attention_mask: torch.Tensor | None, window: int | None,
              chunk_size: int | None = None) -> torch.Tensor | None:
    """The boolean ``[B, 1, q, kv]`` mask of a step's gathered keys (None when nothing is masked), memoised.
    `attention_mask`: the 2-D ``[B, kv]`` padding (`Padding.mask`), a 4-D mask, or None."""
    return step.memo((id(attention_mask), window, chunk_size),
                     lambda: _step_mask(step, attention_mask, window, chunk_size))


def _step_mask(step, attention_mask: torch.Tensor | None, window: int | None,
               chunk_size: int | None = None) -> torch.Tensor | None:
    kv_len = step.max_seq_len
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask[..., :kv_len].to(torch.bool)
    if attention_mask is None and window is None and chunk_size is None and step.q_len in (1, kv_len):
        return None  # nothing to mask (decode), or a plain causal mask `attend` applies itself (first prefill)
    padding = attention_mask
    chunk_start = None
    if chunk_size is not None and padding is not None:  # chunks start at each row's first real token
        chunk_start = first_real_keys(padding)
    mask = ops.causal_mask(step.seq_lens, None, step.q_len, kv_len, window, chunk_size, chunk_start)
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    return mask


def range_mask(step, padding: torch.Tensor | None, sliding_window: int | None, groups: int,
               dtype: torch.dtype, chunk_size: int | None = None) -> torch.Tensor:
    """The mask of `ops.range_attention` over the step's block range (``step.block_range``), memoised. `padding`: the
    step's ``[B, max_seq_len]`` key padding (`Padding.mask`) or None."""
    def build():
        return ops.range_mask(
            step.block_tables, step.seq_lens, step.q_len, *step.block_range, step.block_size, groups=groups,
            dtype=dtype, key_padding=padding, sliding_window=sliding_window, chunk_size=chunk_size,
            first_entries=step.first_entries,
        )

    return step.memo(("window", id(padding), sliding_window, groups, dtype, chunk_size), build)


def ranges_masks(step, padding: torch.Tensor | None, sliding_window: int | None, groups: int,
                 dtype: torch.dtype, chunk_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per range of ``step.block_ranges``, its `ops.range_mask` and which packed queries see any of its slots
    (``[1, 1, M]`` bool), for `ops.ranges_attention`, memoised. `padding` as in `range_mask`."""
    def build():
        out = []
        for first, count in step.block_ranges:
            mask = ops.range_mask(
                step.block_tables, step.seq_lens, step.q_len, first, count, step.block_size, groups=groups,
                dtype=dtype, key_padding=padding, sliding_window=sliding_window, chunk_size=chunk_size,
                first_entries=step.first_entries,
            )
            visible = mask == 0
            out.append((None, None) if bool(visible.all()) else (mask, visible.any(dim=-1)))
        return out

    return step.memo(("windows", id(padding), sliding_window, groups, dtype, chunk_size), build)


def shared_masks(step, padding: torch.Tensor | None):
    """``(prefix_mask [G, 1, 1, S] | None, tail_mask [B, 1, q, T] | None)`` for `ops.shared_prefix_attention`, from
    the step's ``[B, max_seq_len]`` key padding (`Padding.mask`, its rows padded alike in each group's prefix:
    `padded_alike`) or None, memoised."""
    return step.memo(("shared", id(padding)), lambda: _shared_masks(step, padding))


def _shared_masks(step, padding: torch.Tensor | None):
    shared = step.shared
    prefix_len = shared.prefix_len
    tail_mask = None
    if step.q_len > 1:
        tail_mask = ops.causal_mask(step.seq_lens - prefix_len, None, step.q_len, step.max_seq_len - prefix_len)
    if padding is None:
        return None, tail_mask
    prefix_keys = padding[:, :prefix_len].unflatten(0, (-1, shared.group_size))
    tail_keys = padding[:, None, None, prefix_len:]
    tail_mask = tail_keys if tail_mask is None else tail_mask & tail_keys
    prefix_mask = prefix_keys[:, 0, None, None, :]
    return prefix_mask, tail_mask
