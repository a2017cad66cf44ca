"""Prefix caching across ``generate()`` calls: a model-wide block pool whose full prompt blocks are indexed by hash.

Each full block of a prompt row is registered under a key chained over the row's tokens and position ids from its
first real block to the block's end, from a root holding the in-block offset of its first real token (`block_hashes`;
a padded position counts as its own symbol). A later call whose rows start with indexed blocks maps them into its
rows (ref count + 1, no copy) and computes only the rest of the prompt; at least the last prompt token is always
computed, since its logits start the decoding. Blocks no row references stay indexed until the pool needs room,
evicted least recently released first.

What left padding changes (``generate()`` pads on the left, so the rows of a batch share one padded length ``L``):
    * Whole blocks of padding do not matter. They take no block (null entries, `PagedCache.set_row_starts`) and do
      not enter the chain, so a row padded by ``p`` has, from its first real block on, the keys of the same row
      padded by ``p % block_size``, and the rows of one batch may have any numbers of pad blocks. A hit is one block
      index ``m`` for the whole batch (the prefill computes positions ``[m * block_size, L)`` of every row): every
      row must have its blocks from its first real one up to ``m`` indexed, and a row whose real tokens all start
      at or after block ``m`` needs none (`longest_hit`).
    * Padding inside a block does matter: a block holds its row's tokens at the slots their padded positions give,
      so rows whose padding differs modulo the block size hold their real tokens at other offsets in their blocks,
      and share none (a prompt cached unpadded and sent again padded by 5 tokens, with blocks of 16, is computed
      again). Sharing those too needs each row's real tokens to start at a block boundary, a per-row offset between
      padded positions and slots that every attention path, mask and kernel would have to honour.
    * Keys and values depend on position ids, which the chain covers: ``generate()``'s (``cumsum(mask) - 1``) do not
      depend on the padding. A model that gets no position ids is hashed with each token's padded index, so there
      every amount of padding keys differently (`hf_paged.compat.prompt_position_ids`).

Each layer group of the model (`hf_paged.groups.LayerGroup`: full attention, each sliding window) has a pool and
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
from .cache import PagedCache
from .kv_pool import KVPool
from .support import uses_hf_paged

__all__ = ["disable_prefix_caching", "enable_prefix_caching", "PrefixCache", "RowHashes"]

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
                          block_size: int = 16, kv_dtype: torch.dtype | str | None = None) -> PrefixCache:
    """Give `model` a persistent block pool so that ``generate`` calls reuse each other's prompt blocks.

    Args:
        model: a model loaded with ``attn_implementation="hf_paged"``.
        num_blocks, max_memory: fix the pool's size (as for `PagedCache`); with neither it grows on demand and
            keeps unreferenced prompt blocks until it needs room.
        block_size: tokens per block.
        kv_dtype: 8-bit keys and values (as for `PagedCache`): every cache of the model then stores its blocks so,
            and the index only ever holds blocks of that format.

    Returns:
        The model's `PrefixCache` (calling this again replaces it). ``generate`` calls on the model then run one at
        a time. Each layer group gets its own pool (`PrefixCache.pools`); `num_blocks` sizes each of them, and
        `max_memory` is split between them by their layers, as for `PagedCache`.
    """
    if not uses_hf_paged(model):
        raise ValueError(
            f"hf_paged: enable_prefix_caching needs a model loaded with attn_implementation=\"hf_paged\"; this one "
            f"uses {model.config._attn_implementation!r}."
        )
    probe = PagedCache(model.config, block_size=block_size, num_blocks=num_blocks, max_memory=max_memory,
                       kv_dtype=kv_dtype)
    pools = {}
    for group in probe.groups:  # the pools a cache of this model would have, to be shared by its caches
        pools[group.window] = KVPool(group.pool.num_layers, block_size, group.pool.requested_blocks,
                                     group.pool.max_memory, dtype=group.pool.dtype, shared=True)
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


@dataclass(frozen=True)
class RowHashes:
    """One prompt row's keys in the prefix index.

    Attributes:
        start: the row's first real token (its left padding), where its live start will be; 0 when the batch is
            not purely left-padded (`hf_paged.generation._row_starts`).
        keys: per full block of the padded row (``L // block_size`` of them), its key; None for the blocks wholly
            before `start`, which hold only padding, take no block (null entries) and are never indexed.
    """

    start: int
    keys: list[bytes | None]


def block_hashes(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, block_size: int, salt: str,
                 starts: list[int] | None = None, position_ids: torch.Tensor | None = None) -> list[RowHashes]:
    """Per row, the chained keys of its full blocks, from its first real block on.

    A row's chain starts at block ``start // block_size`` from a root holding the salt, the block size and the
    in-block offset ``start % block_size``; each key then covers the previous key and its block's tokens and
    position ids (a masked position counts as its own symbol, -1, whatever its token or position). So a key
    stands for everything that decides its block's keys and values: the row's real tokens up to the block's end,
    their positions and the block's alignment. Whole blocks of left padding before the chain do not enter it:
    a row padded by ``p`` gets, from its first real block on, the keys of the same row padded by
    ``p % block_size`` (when its position ids do not depend on the padding, as ``generate()``'s, derived from the
    attention mask, do not); rows whose real tokens start at another offset inside a block share no key.

    Args:
        input_ids: ``[B, L]``.
        attention_mask: ``[B, L]`` (0 = padding) or None.
        block_size: tokens per block.
        salt: what besides the tokens decides the keys and values (`PrefixCache.salt_for`: the model's dtype and
            the version of its weights).
        starts: ``[B]`` each row's first real token (what ``generate()`` passes to `PagedCache.set_row_starts`);
            None: every row starts at 0 (its padding, if any, is hashed as -1 symbols).
        position_ids: ``[B, L]`` (or ``[3, B, L]``, multimodal RoPE) the position ids the model gets; None: each
            token's index in the padded row, for a model that derives no positions from the mask, whose keys then
            depend on the amount of padding, which the chain then includes.
    """
    ids = input_ids.detach().to("cpu", torch.int64)
    batch, length = ids.shape
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else \
        attention_mask.detach().to("cpu")[:, :length].bool()
    positions = None
    if position_ids is not None and position_ids.dim() in (2, 3) and position_ids.shape[-1] == length:
        positions = position_ids.detach().to("cpu", torch.int64)
        positions = positions.transpose(0, 1) if positions.dim() == 3 else positions[:, None]  # [B or 1, P, L]
    if positions is None or positions.shape[0] not in (1, batch):
        positions = torch.arange(length, dtype=torch.int64)[None, None]
    positions = positions.expand(batch, -1, -1)
    # Per token: its id, then its position id(s); a masked position is -1 throughout.
    symbols = torch.cat([ids[:, None], positions], dim=1).masked_fill(~real[:, None], -1)
    tokens = np.ascontiguousarray(symbols.transpose(1, 2).numpy())  # [B, L, 1 + positions]
    full = length // block_size
    starts = [0] * batch if starts is None else [min(int(start), length) for start in starts]
    rows = []
    for row, start in zip(tokens, starts, strict=True):
        first = start // block_size
        parent = hashlib.sha256(f"hf_paged:{salt}:{block_size}:{start % block_size}".encode()).digest()
        chain: list[bytes | None] = [None] * min(first, full)
        for block in range(first, full):
            parent = hashlib.sha256(parent + row[block * block_size:(block + 1) * block_size].tobytes()).digest()
            chain.append(parent)
        rows.append(RowHashes(start, chain))
    return rows


def map_cached_prefix(cache: PagedCache, hashes: list[RowHashes], prompt_len: int) -> int:
    """Point the empty rows of `cache` at the longest prefix that every row can take from the index, in every layer
    group (`longest_hit`): ``m`` blocks, positions ``[0, m * block_size)`` of the padded rows.

    Each row gets null entries for its blocks wholly before its live start (its first real token; in a
    sliding-window group also the first key position ``m * block_size`` sees) and the indexed blocks after it, as
    its prefill would have laid them out (`PagedCache.set_row_starts`). `cache.prefix_hit_tokens` grows by the
    positions so taken from each row's first real token on (its left padding is never counted).

    Returns the number of prompt positions per row taken from the index (a multiple of the block size, less than
    `prompt_len`): ``generate()`` computes only the rest.
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
        seen = group.kind.first_seen(length)
        group.manager.add_rows(len(hashes))
        for row, chain in enumerate(hashes):
            start = max(chain.start, seen)
            found = [NULL_BLOCK if index < start // bs else blocks.lookup(chain.keys[index])
                     for index in range(shared)]
            group.manager.set_row(row, found, length, live_from=start)
    cache.note_prefix_hit(sum(max(length - chain.start, 0) for chain in hashes))
    return length


def longest_hit(cache: PagedCache, hashes: list[RowHashes], limit: int) -> int:
    """The largest block index ``m <= limit`` such that every row of every layer group of `cache` can take positions
    ``[0, m * block_size)`` from the index: in a full-attention group, each row's blocks from its first real block
    up to ``m``; in a sliding-window group, only those of them holding the keys the first computed token sees
    (positions from ``m * block_size - window + 1`` on). A row's blocks of padding alone need nothing, so a row
    whose real tokens start at or after block ``m`` needs no block at all."""
    bs = cache.block_size
    # Per group and row, per block index below `limit`: whether the row can have that block (null or indexed).
    found = {id(group): [[key is None or group.pool.blocks.lookup(key) is not None for key in chain.keys[:limit]]
                         for chain in hashes]
             for group in cache.groups}
    best = limit
    for group in cache.groups:
        if not group.kind.drops_keys:
            for hits in found[id(group)]:
                best = min(best, hits.index(False) if False in hits else len(hits))
    dropping = [group for group in cache.groups if group.kind.drops_keys]
    for n in range(best, 0, -1):
        if all(all(hits[group.kind.first_seen(n * bs) // bs:n]) and len(hits) >= n
               for group in dropping for hits in found[id(group)]):
            return n
    return 0


def index_prompt_blocks(cache: PagedCache, hashes: list[RowHashes]) -> None:
    """Register the full prompt blocks of every row of `cache`, in every layer group, under their keys."""
    for group in cache.groups:
        blocks = group.pool.blocks
        for table, chain in zip(group.manager.tables, hashes, strict=True):
            for block, key in zip(table, chain.keys, strict=False):
                if block >= 0 and key is not None:  # a null entry (padding, out of a window) holds nothing to find
                    blocks.index(block, key)
