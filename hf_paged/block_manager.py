"""Block bookkeeping for the paged KV cache: physical block ids, reference counts, block tables, prefix index.

This module never touches a tensor. It decides *where* every token's key and value live; `PagedCache` moves the
bytes. Keeping the two apart lets the invariants below be property-tested on their own.

Vocabulary
    block         a fixed-size group of `block_size` token slots, identified by an int in ``[0, num_blocks)``.
    `BlockPool`   the physical blocks: reference counts, the free list, and the optional prefix index. One pool may
                  serve several managers (the persistent pool of `enable_prefix_caching`).
    `BlockManager`  the rows of one cache. Per row, a block table: token ``t`` lives in block ``table[t // bs]``
                  at offset ``t % bs``.
    prefix index  full blocks registered under a hash that covers every token before and in them. A block whose
                  ref count drops to 0 while indexed is *evictable*: it keeps its contents and hash until the pool
                  needs room, and is reclaimed least-recently-released first.

Invariants (checked by `BlockPool.check` and by the property tests)
    1. Every block is exactly one of: free, evictable (indexed, ref count 0), or referenced (ref count > 0).
    2. A block's ref count equals the number of block-table entries, over all rows of all managers of the pool,
       that point at it, plus one for each manager whose scratch block it is.
    3. A row of length ``n`` has exactly ``ceil(n / block_size)`` blocks.
    4. The block receiving a row's next token has ref count 1 and is not indexed: `append` copies a shared partial
       block first (copy-on-write, reported to the caller) and un-indexes a private one before it is written.
       The one exception is a *finished* row (`append`'s ``finished``): tokens past its own blocks go to its
       manager's scratch block, which many entries share, which is never indexed, and whose contents no returned
       token depends on.
    5. The index maps each hash to one block and each indexed block to one hash.
    6. After every manager is reset, every block is free or evictable: nothing leaks.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence

__all__ = ["BlockManager", "BlockPool", "OutOfBlocksError"]


class OutOfBlocksError(RuntimeError):
    """The block pool cannot hold what a step needs. Raised before anything is written."""

    def __init__(self, needed: int, free: int, num_blocks: int, block_size: int, hint: str | None = None):
        self.needed, self.free, self.num_blocks, self.block_size = needed, free, num_blocks, block_size
        message = (
            f"hf_paged: the KV block pool is full: this step needs {needed} more block(s) of {block_size} tokens "
            f"but only {free} of {num_blocks} are free."
        )
        message += " " + (
            hint
            or "Give the cache a larger pool with `PagedCache(config, num_blocks=...)` or "
            "`PagedCache(config, max_memory=...)`, or leave both unset so the pool grows on demand."
        )
        super().__init__(message)


def _blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockPool:
    """Reference-counted physical blocks with a free list and an optional prefix index.

    Args:
        num_blocks: initial number of blocks.
        block_size: tokens per block.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.ref_counts: list[int] = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()  # indexed blocks with ref count 0, LRU first
        self.hash_to_block: dict[Hashable, int] = {}
        self.block_to_hash: dict[int, Hashable] = {}
        self.lock = threading.RLock()
        self.managers: weakref.WeakSet[BlockManager] = weakref.WeakSet()

    @property
    def num_free(self) -> int:
        """Blocks a step may take: free ones and evictable ones."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks in the prefix index (referenced or evictable)."""
        return len(self.block_to_hash)

    def grow(self, num_new_blocks: int) -> None:
        """Add `num_new_blocks` free blocks (ids continue after the current ones)."""
        start = self.num_blocks
        self.num_blocks += num_new_blocks
        self.ref_counts.extend([0] * num_new_blocks)
        self.free_blocks.extend(range(start, self.num_blocks))

    def take(self) -> int:
        """A block with ref count 1: a free one, else the least recently released evictable one."""
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            self.unindex(block)
        self.ref_counts[block] = 1
        return block

    def acquire(self, block: int) -> None:
        """One more table entry points at `block` (reviving it if it was evictable)."""
        if self.ref_counts[block] == 0:
            del self.evictable[block]
        self.ref_counts[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """One table entry fewer points at each of `blocks`; indexed blocks stay as evictable."""
        for block in blocks:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self.block_to_hash:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)

    def index(self, block: int, key: Hashable) -> None:
        """Register the full, referenced `block` under `key` (no-op if either is already indexed)."""
        if key not in self.hash_to_block and block not in self.block_to_hash:
            self.hash_to_block[key] = block
            self.block_to_hash[block] = key

    def lookup(self, key: Hashable) -> int | None:
        return self.hash_to_block.get(key)

    def unindex(self, block: int) -> None:
        key = self.block_to_hash.pop(block, None)
        if key is not None:
            del self.hash_to_block[key]
            if block in self.evictable:  # its contents are no longer findable: plain free block
                del self.evictable[block]
                self.free_blocks.append(block)

    def clear_index(self) -> None:
        """Forget every indexed block; evictable ones become free."""
        for block in list(self.block_to_hash):
            self.unindex(block)

    def check(self) -> None:
        """Assert the invariants in the module docstring over every live manager of this pool."""
        counts = [0] * self.num_blocks
        for manager in list(self.managers):
            manager.check_rows()
            for table in manager.tables:
                for block in table:
                    counts[block] += 1
            if manager.scratch is not None:
                counts[manager.scratch] += 1
                assert manager.scratch not in self.block_to_hash, "a scratch block is indexed"
        assert counts == self.ref_counts, "ref counts differ from table entries"
        free, evictable = set(self.free_blocks), set(self.evictable)
        assert len(free) == len(self.free_blocks), "a block is on the free list twice"
        for block in range(self.num_blocks):
            states = (block in free) + (block in evictable) + (counts[block] > 0)
            assert states == 1, f"block {block} is not exactly one of free / evictable / referenced"
        assert evictable <= set(self.block_to_hash), "an evictable block is not indexed"
        assert {b: k for k, b in self.hash_to_block.items()} == self.block_to_hash, "index maps disagree"


class BlockManager:
    """The block tables of one cache's rows, over a `BlockPool` of its own or a shared one.

    Args:
        num_blocks: size of a new private pool (ignored when `pool` is given).
        block_size: tokens per block (must match `pool`'s).
        pool: a shared `BlockPool`.
    """

    def __init__(self, num_blocks: int = 0, block_size: int = 16, pool: BlockPool | None = None):
        self.pool = pool if pool is not None else BlockPool(num_blocks, block_size)
        if self.pool.block_size != block_size:
            raise ValueError(f"block_size {block_size} differs from the pool's {self.pool.block_size}")
        self.block_size = block_size
        self.tables: list[list[int]] = []
        self.lengths: list[int] = []
        self.cow_copies = 0
        self.scratch: int | None = None  # the block finished rows write into (held while this manager has rows)
        self.pool.managers.add(self)

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def num_rows(self) -> int:
        return len(self.tables)

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_used(self) -> int:
        """Distinct blocks referenced by this manager's rows (and its scratch block)."""
        used = {block for table in self.tables for block in table}
        return len(used) + (self.scratch is not None and self.scratch not in used)

    @property
    def num_shared(self) -> int:
        """Distinct blocks referenced more than once by this manager's rows."""
        seen: set[int] = set()
        shared: set[int] = set()
        for table in self.tables:
            for block in table:
                (shared if block in seen else seen).add(block)
        return len(shared)

    def blocks_needed(self, num_tokens: int, finished: Sequence[bool] | None = None) -> int:
        """Blocks `append(num_tokens, finished)` would take from the pool (new blocks and copy-on-write copies)."""
        if num_tokens <= 0:
            return 0
        bs, refs = self.block_size, self.pool.ref_counts
        needed = 0
        writers: dict[int, int] = {}  # shared partial tail block -> rows about to write into it
        scratch_needed = False
        for row, (table, length) in enumerate(zip(self.tables, self.lengths, strict=True)):
            ended = finished is not None and finished[row]
            missing = _blocks_for(length + num_tokens, bs) - len(table)
            if ended:
                scratch_needed = scratch_needed or missing > 0
            else:
                needed += missing
            if length % bs and refs[table[-1]] > 1 and not (ended and table[-1] == self.scratch):
                writers[table[-1]] = writers.get(table[-1], 0) + 1
        # Every writer copies the shared block, except the last one when nothing else references it any more.
        for block, count in writers.items():
            needed += count if refs[block] > count else count - 1
        return needed + (scratch_needed and self.scratch is None)

    # ---------------------------------------------------------------------------------------------- mutators
    def add_rows(self, num_rows: int) -> None:
        """Append `num_rows` empty rows."""
        self.tables.extend([] for _ in range(num_rows))
        self.lengths.extend([0] * num_rows)

    def append(self, num_tokens: int, finished: Sequence[bool] | None = None) -> list[tuple[int, int]]:
        """Make room for `num_tokens` more tokens at the end of every row.

        Returns the copy-on-write copies ``(src, dst)`` the caller must perform *before* writing the new tokens:
        a row whose partial last block is shared gets a private copy of it. Raises `OutOfBlocksError` (having
        changed nothing) when the pool cannot cover the step.

        ``finished[row]`` marks rows whose new tokens nobody will read (``generate`` feeds padding to rows that
        have ended): they still grow by `num_tokens`, so every row keeps its positions, but the tokens that fall
        past their own blocks go to this manager's scratch block instead of new blocks.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if finished is not None and len(finished) != self.num_rows:
            raise ValueError(f"finished has {len(finished)} entries for {self.num_rows} rows")
        pool = self.pool
        needed = self.blocks_needed(num_tokens, finished)
        if needed > pool.num_free:
            raise OutOfBlocksError(needed, pool.num_free, pool.num_blocks, self.block_size)
        copies: list[tuple[int, int]] = []
        bs = self.block_size
        for row, table in enumerate(self.tables):
            length = self.lengths[row]
            ended = finished is not None and finished[row]
            if length % bs and num_tokens > 0 and not (ended and table[-1] == self.scratch):
                tail = table[-1]
                if pool.ref_counts[tail] > 1:
                    dst = pool.take()
                    pool.release([tail])
                    table[-1] = dst
                    copies.append((tail, dst))
                else:
                    pool.unindex(tail)  # about to be written: its old contents are no longer what was indexed
            missing = _blocks_for(length + num_tokens, bs) - len(table)
            if missing > 0 and ended:
                if self.scratch is None:
                    self.scratch = pool.take()
                for _ in range(missing):
                    pool.acquire(self.scratch)
                    table.append(self.scratch)
            else:
                for _ in range(missing):
                    table.append(pool.take())
            self.lengths[row] = length + num_tokens
        self.cow_copies += len(copies)
        return copies

    def set_row(self, row: int, blocks: Sequence[int], length: int) -> None:
        """Point the empty `row` at existing `blocks` holding its first `length` tokens (a prefix-cache hit)."""
        if self.tables[row]:
            raise ValueError(f"row {row} is not empty")
        if len(blocks) != _blocks_for(length, self.block_size):
            raise ValueError(f"{len(blocks)} blocks cannot hold exactly {length} tokens")
        for block in blocks:
            self.pool.acquire(block)
        self.tables[row] = list(blocks)
        self.lengths[row] = length

    def select(self, indices: Sequence[int]) -> None:
        """Replace the rows by ``rows[indices]`` (reorder, duplicate or drop rows) without copying any block.

        This is beam search's reorder, ``num_return_sequences``'s repeat-interleave and a batch selection alike.
        """
        for index in indices:
            if not 0 <= index < self.num_rows:
                raise IndexError(f"row index {index} out of range for {self.num_rows} rows")
        new_tables = [list(self.tables[i]) for i in indices]
        new_lengths = [self.lengths[i] for i in indices]
        for table in new_tables:
            for block in table:
                self.pool.acquire(block)
        for table in self.tables:
            self.pool.release(table)
        self.tables, self.lengths = new_tables, new_lengths

    def truncate(self, length: int) -> None:
        """Keep only the first `length` tokens of every row, releasing blocks no longer needed."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        keep = _blocks_for(length, self.block_size)
        for row, table in enumerate(self.tables):
            if self.lengths[row] <= length:
                continue
            self.pool.release(table[keep:])
            del table[keep:]
            self.lengths[row] = length

    def reset(self) -> None:
        """Drop every row and release all its blocks (and the scratch block)."""
        for table in self.tables:
            self.pool.release(table)
        self.tables, self.lengths = [], []
        if self.scratch is not None:
            self.pool.release([self.scratch])
            self.scratch = None

    # ------------------------------------------------------------------------------------------------ checks
    def check_rows(self) -> None:
        """Assert invariant 3 for this manager's rows."""
        for table, length in zip(self.tables, self.lengths, strict=True):
            assert len(table) == _blocks_for(length, self.block_size), (len(table), length)

    def check(self) -> None:
        """Assert the invariants of the module docstring for the pool and every manager sharing it."""
        self.pool.check()
