"""`CacheStats`: what a `PagedCache` holds and has allocated, summed over its layer groups."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CacheStats", "summarize"]


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a `PagedCache`. Byte counts cover keys and values of all layers.

    ``num_blocks``, ``free_blocks``, ``pool_bytes``, ``peak_pool_bytes`` and ``cached_blocks`` describe the pool
    (shared by the caches of a model when prefix caching is on); the other fields describe this cache's rows. For a
    cache with a pool of its own, ``used_blocks + free_blocks == num_blocks``.

    Referenced and allocated bytes differ: ``used_bytes`` counts the blocks this cache's rows point at,
    ``pool_bytes`` what the pool has allocated (used or not), which is what the device's memory pays for.

    A cache whose layers form several groups (sliding-window layers beside full-attention ones, `PagedCache`) has a
    pool per group: block counts and bytes are summed over them (a block of one group holds its layers only).
    ``logical_tokens`` counts each row's tokens once, ``logical_bytes`` them in every layer.
    """

    block_size: int
    num_blocks: int
    used_blocks: int  # physical blocks referenced by at least one row of this cache
    free_blocks: int  # blocks a step may take (free, or cached but unreferenced)
    shared_blocks: int  # blocks referenced more than once by this cache's rows (a shared prompt, beams)
    logical_tokens: int  # sum of the rows' lengths: what a contiguous cache would hold
    used_bytes: int  # bytes of the used blocks
    logical_bytes: int  # bytes a contiguous (DynamicCache-like) cache would need for the same rows
    pool_bytes: int  # bytes allocated for the whole pool (referenced or not)
    peak_used_blocks: int
    peak_used_bytes: int
    peak_pool_bytes: int  # the most bytes the pool has had allocated
    cow_copies: int  # block copies made by copy-on-write so far
    num_rows: int
    prefix_hit_tokens: int  # prompt tokens (left padding not counted) taken from the prefix cache, rows summed
    cached_blocks: int  # blocks in the pool's prefix index


def summarize(groups, block_size: int, peak_used_blocks: int, peak_used_bytes: int,
              prefix_hit_tokens: int) -> CacheStats:
    """The `CacheStats` of a cache with these layer groups (`hf_paged.groups.LayerGroup`) and counters."""
    used = blocks = free = shared = cached = pool_bytes = used_bytes = peak_pool = logical_bytes = 0
    for group in groups:
        manager, pool, per_block = group.manager, group.pool, group.bytes_per_block
        # A fixed pool of num_blocks is allocated at the first write: report its configured size before that.
        unallocated = pool.tensor is None and pool.requested_blocks is not None
        num_blocks = pool.requested_blocks if unallocated else manager.num_blocks
        used += manager.num_used
        blocks += num_blocks
        free += num_blocks - manager.num_used if unallocated else manager.num_free
        shared += manager.num_shared
        cached += pool.blocks.num_cached
        used_bytes += manager.num_used * per_block
        pool_bytes += manager.num_blocks * per_block
        peak_pool += pool.peak_blocks * per_block
        logical_bytes += sum(manager.lengths) * (per_block // block_size)
    first = groups[0].manager
    return CacheStats(
        block_size=block_size,
        num_blocks=blocks,
        used_blocks=used,
        free_blocks=free,
        shared_blocks=shared,
        logical_tokens=sum(first.lengths),
        used_bytes=used_bytes,
        logical_bytes=logical_bytes,
        pool_bytes=pool_bytes,
        peak_used_blocks=peak_used_blocks,
        peak_used_bytes=peak_used_bytes,
        peak_pool_bytes=peak_pool,
        cow_copies=sum(group.manager.cow_copies for group in groups),
        num_rows=first.num_rows,
        prefix_hit_tokens=prefix_hit_tokens,
        cached_blocks=cached,
    )
