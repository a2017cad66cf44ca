"""Prefix caching across ``generate()`` calls: a model-wide block pool whose full prompt blocks are indexed by hash.

Each full block of a prompt is registered under a hash chained over every token before and in it (a padded
position counts as its own symbol, so rows padded differently never match). A later call whose prompt starts
with indexed blocks maps them into its rows (ref count + 1, no copy) and computes only the rest of the prompt;
at least the last prompt token is always computed, since its logits start the decoding. Blocks no row
references stay indexed until the pool needs room, evicted least recently released first.

Each layer group of the model (`hf_paged.cache.LayerGroup`: full attention, each sliding window) has a pool and
an index of its own. A sliding-window group stores every prompt token (so its full blocks can be indexed) and then
releases what falls out of the window as decoding advances, as without prefix caching; released prompt blocks stay
indexed until evicted. A hit of ``n`` blocks needs, in every full-attention group, each row's first ``n`` blocks,
and in each sliding-window group only the blocks holding the keys the first computed token still sees (its last
``window - 1`` positions): the hit is the longest ``n`` every group can serve.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .block_manager import NULL_BLOCK
from .cache import KVPool, PagedCache

__all__ = ["disable_prefix_caching", "enable_prefix_caching", "PrefixCache"]

_ATTR = "_hf_paged_prefix_cache"


@dataclass
class PrefixCache:
    """A model's persistent pools, one per layer group (keyed by its window, None for full attention; `pool` is the
    first group's); `lock` serialises the ``generate`` calls that use them.

    ``weights`` is the `weights_version` the index was filled with and ``epoch`` counts the changes seen: keys and
    values computed with other weights are never served (see `salt_for`).
    """

    pools: dict[int | None, KVPool]
    lock: threading.RLock = field(default_factory=threading.RLock)
    weights: object = None
    epoch: int = 0

    @property
    def pool(self) -> KVPool:
        """The first group's pool (the full-attention layers' when there are any)."""
        return next(iter(self.pools.values()))

    def new_cache(self, config) -> PagedCache:
        return PagedCache(config, pool=self.pools)

    def clear_index(self) -> None:
        """Forget every indexed block of every pool."""
        for pool in self.pools.values():
            pool.blocks.clear_index()

    def salt_for(self, model) -> str:
        """The hash salt of a call on `model`: its dtype and the weights epoch. When the weights changed since the
        last call (`load_state_dict`, an optimizer step, ``model.to(...)``), the index is emptied first."""
        version = weights_version(model)
        if version != self.weights:
            if self.weights is not None:
                self.clear_index()
                self.epoch += 1
            self.weights = version
        return f"{model.dtype}:{self.epoch}"


def weights_version(model) -> object:
    """What identifies the current values of `model`'s parameters and buffers, cheaply: each tensor's storage
    address and version counter (every in-place write, such as ``load_state_dict``'s copies or an optimizer step,
    bumps it). A tensor without a version counter (created in inference mode) makes every call look new. Writes
    through ``tensor.data`` bypass the counter: after those, call `enable_prefix_caching` again."""
    version = []
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        try:
            version.append((tensor.data_ptr(), tensor._version))
        except RuntimeError:  # inference tensors have no version counter: nothing can prove they are unchanged
            return object()
    return tuple(version)


def enable_prefix_caching(model, *, num_blocks: int | None = None, max_memory: int | str | None = None,
                          block_size: int = 16) -> PrefixCache:
    """Give `model` a persistent block pool so that ``generate`` calls reuse each other's prompt blocks.

    Args:
        model: a model loaded with ``attn_implementation="hf_paged"``.
        num_blocks, max_memory: fix the pool's size (as for `PagedCache`); with neither it grows on demand and
            keeps unreferenced prompt blocks until it needs room.
        block_size: tokens per block.

    Returns:
        The model's `PrefixCache` (calling this again replaces it). ``generate`` calls on the model then run one at
        a time. Each layer group gets its own pool (`PrefixCache.pools`); `num_blocks` sizes each of them, and
        `max_memory` is split between them by their layers, as for `PagedCache`.
    """
    from .generation import uses_hf_paged

    if not uses_hf_paged(model):
        raise ValueError(
            f"hf_paged: enable_prefix_caching needs a model loaded with attn_implementation=\"hf_paged\"; this one "
            f"uses {model.config._attn_implementation!r}."
        )
    probe = PagedCache(model.config, block_size=block_size, num_blocks=num_blocks, max_memory=max_memory)
    pools = {}
    for group in probe.groups:  # the pools a cache of this model would have, to be shared by its caches
        pools[group.window] = KVPool(group.pool.num_layers, block_size, group.pool.requested_blocks,
                                     group.pool.max_memory)
        pools[group.window].shared = True
    state = PrefixCache(pools)
    setattr(model, _ATTR, state)
    return state


def disable_prefix_caching(model) -> None:
    """Remove `model`'s persistent pool; its memory is freed once no returned cache uses it any more."""
    state = getattr(model, _ATTR, None)
    if state is not None:
        with state.lock:
            state.clear_index()
            delattr(model, _ATTR)


def prefix_cache_of(model) -> PrefixCache | None:
    return getattr(model, _ATTR, None)


def block_hashes(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, block_size: int,
                 salt: str) -> list[list[bytes]]:
    """Per row, the chained hashes of its full blocks.

    Args:
        input_ids: ``[B, L]``.
        attention_mask: ``[B, L]`` (0 = padding) or None.
        salt: what besides the tokens decides the keys and values (`PrefixCache.salt_for`: the model's dtype and
            the version of its weights).
    """
    ids = input_ids.detach().to("cpu", torch.int64)
    if attention_mask is not None:
        ids = torch.where(attention_mask.detach().to("cpu").bool(), ids, torch.full_like(ids, -1))
    tokens = np.ascontiguousarray(ids.numpy())
    full = tokens.shape[1] // block_size
    root = hashlib.sha256(f"hf_paged:{salt}:{block_size}".encode()).digest()
    rows = []
    for row in tokens:
        chain, parent = [], root
        for block in range(full):
            parent = hashlib.sha256(parent + row[block * block_size:(block + 1) * block_size].tobytes()).digest()
            chain.append(parent)
        rows.append(chain)
    return rows


def map_cached_prefix(cache: PagedCache, hashes: list[list[bytes]], prompt_len: int) -> int:
    """Point the empty rows of `cache` at the longest prefix of indexed blocks that every row has, in every layer
    group (`longest_hit`).

    Returns the number of prompt tokens per row taken from the index (a multiple of the block size, less than
    `prompt_len`).
    """
    if cache.state_layers:
        return 0  # linear-attention / Mamba states need every prompt token: nothing can be skipped
    bs = cache.block_size
    shared = longest_hit(cache, hashes, (prompt_len - 1) // bs)  # always compute at least the last prompt token
    if shared == 0:
        return 0
    length = shared * bs
    for group in cache.groups:
        blocks = group.pool.blocks
        start = 0 if group.window is None else max(length - group.window + 1, 0)
        group.manager.add_rows(len(hashes))
        for row, chain in enumerate(hashes):
            found = [NULL_BLOCK if index < start // bs else blocks.lookup(chain[index]) for index in range(shared)]
            group.manager.set_row(row, found, length, live_from=start)
    cache.prefix_hit_tokens += length * len(hashes)
    return length


def longest_hit(cache: PagedCache, hashes: list[list[bytes]], limit: int) -> int:
    """The most leading blocks (at most `limit`) that every row of every layer group of `cache` can take from the
    index: in a full-attention group all of them, in a sliding-window group those holding the keys the first
    computed token sees (positions from ``n * block_size - window + 1`` on)."""
    bs = cache.block_size
    found = {id(group): [[group.pool.blocks.lookup(key) is not None for key in chain[:limit]] for chain in hashes]
             for group in cache.groups}
    best = limit
    for group in cache.groups:
        if group.window is None:
            for hits in found[id(group)]:
                best = min(best, hits.index(False) if False in hits else len(hits))
    sliding = [group for group in cache.groups if group.window is not None]
    for n in range(best, 0, -1):
        if all(all(hits[max(n * bs - group.window + 1, 0) // bs:n]) and len(hits) >= n
               for group in sliding for hits in found[id(group)]):
            return n
    return 0


def index_prompt_blocks(cache: PagedCache, hashes: list[list[bytes]]) -> None:
    """Register the full prompt blocks of every row of `cache`, in every layer group, under their hashes."""
    for group in cache.groups:
        blocks = group.pool.blocks
        for table, chain in zip(group.manager.tables, hashes, strict=True):
            for block, key in zip(table, chain, strict=False):
                if block >= 0:  # a null entry (left padding, out of a sliding window) holds nothing to find again
                    blocks.index(block, key)
