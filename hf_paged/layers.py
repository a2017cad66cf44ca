"""The entries of a `PagedCache`'s ``layers``: Transformers' cache-layer API over the cache's pools.

`PagedLayer` is an attention layer (its pool, its group); `PagedHybridLayer` adds Transformers' linear-attention /
Mamba states; `KVSharedLayer` reads another layer's keys. Layers of states alone are Transformers' own
`LinearAttentionLayer`. Bookkeeping (rows, steps) is per cache, not per layer.
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import CacheLayerMixin

from . import compat, ops, quant
from .compat import LinearAttentionCacheLayerMixin, LinearAttentionLayer
from .groups import LayerGroup
from .kinds import AttentionKind
from .kv_pool import KVPool
from .step import padded_tables

if TYPE_CHECKING:
    from .cache import PagedCache

__all__ = ["KVSharedLayer", "PagedHybridLayer", "PagedLayer", "copy_states", "select_states", "state_layers"]


class PagedLayer(CacheLayerMixin):
    """One layer's entry in a `PagedCache`.

    `keys` / `values` have their Transformers meaning: each row's keys (values) gathered out of the blocks,
    ``[B, Hkv, seq, D]``, computed on every access (a copy: writing into it changes nothing in the cache). The
    layer's block pools ``[N, bs, Hkv, D]`` themselves are `key_pool` / `value_pool`.

    All bookkeeping is per cache, not per layer: every method delegates to the owning `PagedCache`.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: PagedCache, layer_idx: int, group: LayerGroup, place: tuple[KVPool, int],
                 slot: int):  # no super().__init__: keys/values are properties
        self._cache = weakref.proxy(cache)
        self.layer_idx = layer_idx
        self.group = group
        self.place = place  # (its pool, its index there)
        self.slot = slot  # its index among the cache's attention layers

    @property
    def kind(self) -> AttentionKind:
        return self.group.kind

    @property
    def is_initialized(self) -> bool:
        return self.place[0].tensor is not None

    @property
    def key_pool(self) -> torch.Tensor | None:
        """This layer's key pool ``[N, bs, Hkv, D]`` (a `hf_paged.storage.LayerStore` when the pool has several
        slabs; None before the first write), as stored: ``[N, bs, Hkv, D + 2]`` codes and scales when the cache
        stores 8 bits (``kv_dtype``, `hf_paged.quant.decode` reads them)."""
        pool, index = self.place
        return pool.plain[index][0] if pool.plain else None

    @property
    def value_pool(self) -> torch.Tensor | None:
        """This layer's value pool ``[N, bs, Hkv, D]`` (None before the first write), as stored (see `key_pool`)."""
        pool, index = self.place
        return pool.plain[index][1] if pool.plain else None

    @property
    def keys(self) -> torch.Tensor | None:
        """Each row's keys ``[B, Hkv, seq, D]``, gathered (decoded to float32 from 8 bits; None before the first
        write)."""
        return self._gather(self.key_pool)

    @property
    def values(self) -> torch.Tensor | None:
        """Each row's values ``[B, Hkv, seq, D]``, gathered (decoded to float32 from 8 bits; None before the first
        write)."""
        return self._gather(self.value_pool)

    def _gather(self, pool: torch.Tensor | None) -> torch.Tensor | None:
        if pool is None:
            return None
        manager = self.group.manager
        rows = ops.gather_kv(pool, padded_tables(manager, pool.device), max(manager.lengths, default=0))
        return quant.rotated(rows) if self._cache.rotates(self.place[0]) else rows  # stored rotated: rotated back

    @property
    def record_past(self) -> bool:
        """The cache's `PagedCache.record_past` (Transformers sets it on layers that have it)."""
        return self._cache.record_past

    @record_past.setter
    def record_past(self, value: bool) -> None:
        self._cache.record_past = bool(value)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.place[0].allocate(key_states, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._cache.update(key_states, value_states, self.layer_idx)

    # Computed here rather than by asking the cache: some families (RecurrentGemma in 5.17) point the cache's own
    # get_seq_length / get_mask_sizes at their first attention layer's.
    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        return self.get_seq_length() + compat.query_length(query_length), 0

    def get_seq_length(self) -> int:
        return max(self._cache.manager.lengths, default=0)

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of `get_max_length` in older 5.x releases
        return -1


class PagedHybridLayer(PagedLayer, LinearAttentionLayer):
    """A layer with both attention (paged, as `PagedLayer`) and linear-attention / Mamba states (Transformers' own
    `LinearAttentionLayer` bookkeeping: ``conv_states`` / ``recurrent_states`` ``[B, ...]`` per row)."""

    is_compileable = False

    def __init__(self, cache: PagedCache, layer_idx: int, group: LayerGroup, place: tuple[KVPool, int], slot: int,
                 number_of_states: int = 1):
        PagedLayer.__init__(self, cache, layer_idx, group, place, slot)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        if len(args) == 2 and not kwargs:
            PagedLayer.lazy_initialization(self, *args)
        else:
            LinearAttentionLayer.lazy_initialization(self, **kwargs)

    @property
    def is_croppable(self) -> bool:
        return compat.class_attribute(LinearAttentionLayer, "is_croppable", self)

    def activate_past_recording(self, *args, **kwargs) -> None:
        """Start recording past states (Transformers' `LinearAttentionLayer` bookkeeping: 5.25 passes
        ``recurrent_states_to_keep`` and keeps a history of recurrent states); the cache records its keys itself."""
        compat.call_accepting(functools.partial(LinearAttentionLayer.activate_past_recording, self, *args), **kwargs)


class KVSharedLayer(CacheLayerMixin):
    """The entry of a layer that keeps no keys and values: it attends over those of layer `source` (KV sharing,
    `support.kv_sources`), whose pools the model hands its attention; it has no pool and never calls ``update``, as
    Transformers' own caches give such layers no storage. `keys` / `values` are the source layer's."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: PagedCache, layer_idx: int, source: int):  # no super().__init__: keys/values are properties
        self._cache = weakref.proxy(cache)
        self.layer_idx = layer_idx
        self.source = source

    @property
    def is_initialized(self) -> bool:
        return self._cache.layers[self.source].is_initialized

    @property
    def keys(self) -> torch.Tensor | None:
        return self._cache.layers[self.source].keys

    @property
    def values(self) -> torch.Tensor | None:
        return self._cache.layers[self.source].values

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._cache.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        return self._cache.layers[self.source].get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self._cache.layers[self.source].get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1


def state_layers(layers: list) -> list:
    """The layers of a cache that hold Transformers' per-row linear-attention / Mamba states."""
    return [layer for layer in layers if isinstance(layer, LinearAttentionCacheLayerMixin)]


def select_states(layer: LinearAttentionCacheLayerMixin, index: torch.Tensor) -> None:
    """Row ``i`` of every conv / recurrent state of `layer` becomes old row ``index[i]``."""
    for states, ready in ((layer.conv_states, layer.is_conv_states_initialized),
                          (layer.recurrent_states, layer.is_recurrent_states_initialized)):
        for i in states:
            if ready[i]:
                states[i] = states[i].index_select(0, index.to(states[i].device))
    if hasattr(layer, "batch_size"):
        layer.batch_size = len(index)



def copy_states(source: LinearAttentionCacheLayerMixin, target: LinearAttentionCacheLayerMixin, memo: dict) -> None:
    """Give `target` deep copies of `source`'s per-row states (`PagedCache.__deepcopy__`)."""
    for name in ("conv_states", "recurrent_states", "is_conv_states_initialized", "is_recurrent_states_initialized",
                 "has_previous_state", "conv_kernel_size", "device", "dtype", "record_past"):
        setattr(target, name, copy.deepcopy(getattr(source, name), memo))
