"""Prefix caching across ``generate()`` calls: a model-wide block pool whose full prompt blocks are indexed by hash.

Each full block of a prompt is registered under a hash chained over every token before and in it (a padded
position counts as its own symbol, so rows padded differently never match). A later call whose prompt starts
with indexed blocks maps them into its rows (ref count + 1, no copy) and computes only the rest of the prompt;
at least the last prompt token is always computed, since its logits start the decoding. Blocks no row
references stay indexed until the pool needs room, evicted least recently released first.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import KVPool, PagedCache, _parse_bytes

__all__ = ["disable_prefix_caching", "enable_prefix_caching", "PrefixCache"]

_ATTR = "_hf_paged_prefix_cache"


@dataclass
class PrefixCache:
    """A model's persistent pool; `lock` serialises the ``generate`` calls that use it.

    ``weights`` is the `weights_version` the index was filled with and ``epoch`` counts the changes seen: keys and
    values computed with other weights are never served (see `salt_for`).
    """

    pool: KVPool
    lock: threading.RLock = field(default_factory=threading.RLock)
    weights: object = None
    epoch: int = 0

    def new_cache(self, config) -> PagedCache:
        return PagedCache(config, pool=self.pool)

    def salt_for(self, model) -> str:
        """The hash salt of a call on `model`: its dtype and the weights epoch. When the weights changed since the
        last call (`load_state_dict`, an optimizer step, ``model.to(...)``), the index is emptied first."""
        version = weights_version(model)
        if version != self.weights:
            if self.weights is not None:
                self.pool.blocks.clear_index()
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
        a time.
    """
    from .generation import uses_hf_paged

    if not uses_hf_paged(model):
        raise ValueError(
            f"hf_paged: enable_prefix_caching needs a model loaded with attn_implementation=\"hf_paged\"; this one "
            f"uses {model.config._attn_implementation!r}."
        )
    probe = PagedCache(model.config, block_size=block_size, num_blocks=num_blocks, max_memory=max_memory)
    # One pool for every attention layer: a shared pool keeps all layers in one group (no sliding-window release).
    layers = sum(place is not None for place in probe.layer_pools)
    pool = KVPool(layers, block_size, num_blocks, _parse_bytes(max_memory) if max_memory is not None else None)
    pool.shared = True
    state = PrefixCache(pool)
    setattr(model, _ATTR, state)
    return state


def disable_prefix_caching(model) -> None:
    """Remove `model`'s persistent pool; its memory is freed once no returned cache uses it any more."""
    state = getattr(model, _ATTR, None)
    if state is not None:
        with state.lock:
            state.pool.blocks.clear_index()
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
    """Point the empty rows of `cache` at the longest prefix of indexed blocks that every row has.

    Returns the number of prompt tokens per row taken from the index (a multiple of the block size, less than
    `prompt_len`).
    """
    if cache.state_layers:
        return 0  # linear-attention / Mamba states need every prompt token: nothing can be skipped
    blocks = cache.pool.blocks
    bs = cache.block_size
    limit = (prompt_len - 1) // bs  # always compute at least the last prompt token
    hits: list[list[int]] = []
    for chain in hashes:
        found = []
        for key in chain[:limit]:
            block = blocks.lookup(key)
            if block is None:
                break
            found.append(block)
        hits.append(found)
    shared = min((len(found) for found in hits), default=0)
    if shared == 0:
        return 0
    cache.manager.add_rows(len(hits))
    for row, found in enumerate(hits):
        cache.manager.set_row(row, found[:shared], shared * bs)
    cache.prefix_hit_tokens += shared * bs * len(hits)
    return shared * bs


def index_prompt_blocks(cache: PagedCache, hashes: list[list[bytes]]) -> None:
    """Register the full prompt blocks of every row of `cache` under their hashes."""
    blocks = cache.pool.blocks
    for table, chain in zip(cache.manager.tables, hashes, strict=True):
        for block, key in zip(table, chain, strict=False):
            if block >= 0:  # a null entry (left padding) holds nothing to find again
                blocks.index(block, key)

