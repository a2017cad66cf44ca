"""Block bookkeeping for the paged KV cache: physical block ids, reference counts, block tables, prefix index.

This module never touches a tensor. It decides *where* every token's key and value live; `PagedCache` moves the
bytes. Keeping the two apart lets the invariants below be property-tested on their own.

Vocabulary
    block         a fixed-size group of `block_size` token slots, identified by an int in ``[0, num_blocks)``.
    `BlockPool`   the physical blocks: reference counts, the free list, and the optional prefix index. One pool may
                  serve several managers (the persistent pool of `enable_prefix_caching`).
    `BlockManager`  the rows of one cache. Per row, a block table: token ``t`` lives in block ``table[t // bs]``
                  at offset ``t % bs``.
    live start    per row, ``live_from[row]``: a token position (0 by default) below which every token is *dead*,
                  one no query will ever read unmasked (left padding, keys that fell out of a sliding window), or
                  whose reads nothing returned depends on (a row that has ended gives its own blocks back,
                  `private_rows`). It only ever grows (`append`'s ``live_from``, `release_before`).
    null entry    a table entry `NULL_BLOCK` (-1): that block of the row holds only dead tokens. It takes no block
                  and no reference, is never indexed, copied or counted in `num_used` / `num_shared`. Tensors built
                  from tables replace it with any valid block id; attention masks those positions anyway.
    prefix index  full blocks registered under a hash that stands for everything their contents depend on: every
                  live token of the row before and in them, with its position (`hf_paged.prefix.block_hashes`;
                  blocks of dead tokens alone have no hash). A block whose ref count drops to 0 while indexed is
                  *evictable*: it keeps its contents and hash until the pool needs room, and is reclaimed
                  least-recently-released first.

Invariants (checked by `BlockPool.check` and by the property tests)
    1. Every block is exactly one of: free, evictable (indexed, ref count 0), or referenced (ref count > 0).
    2. A block's ref count equals the number of non-null block-table entries, over all rows of all managers of the
       pool, that point at it, plus one for each manager whose scratch block it is.
    3. A row of length ``n`` has exactly ``ceil(n / block_size)`` entries: its entries of index
       ``< live_from // block_size`` (blocks wholly below the live start) are `NULL_BLOCK`, every other one is a
       real block. A row whose live start lies past its length has only null entries.
    4. The block receiving a row's next live token has ref count 1 and is not indexed: `append` copies a shared
       partial block first (copy-on-write, reported to the caller) and un-indexes a private one before it is
       written; a shared partial block that is dead after the step is released instead, never copied.
       The one exception is a *finished* row (`append`'s ``finished``): tokens past its own blocks go to its
       manager's scratch block, which many entries share, which is never indexed, and whose contents no returned
       token depends on.
    5. The index maps each hash to one block and each indexed block to one hash.
    6. After every manager is reset, every block is free or evictable: nothing leaks.
    7. `append` and `set_row` raise (`OutOfBlocksError`, `ValueError`) before changing anything; `blocks_needed`
       is exactly how many free blocks `append` needs beyond those its own releases free.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence

__all__ = ["NULL_BLOCK", "BlockManager", "BlockPool", "OutOfBlocksError"]

NULL_BLOCK = -1
"""A block-table entry for a block of a row that holds only dead tokens: no block, no reference."""


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

    def take(self, preferred: int | None = None) -> int:
        """A block with ref count 1: `preferred` if it is free, else the oldest free one, else the least recently
        released evictable one."""
        if preferred is not None and self._take_free(preferred):
            block = preferred
        elif self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            self.unindex(block)
        self.ref_counts[block] = 1
        return block

    def _take_free(self, block: int) -> bool:
        """Take `block` off the free list if it is on it (a scan of the list: callers prefer blocks near its front,
        see `BlockManager.append`'s ``contiguous``)."""
        if not 0 <= block < self.num_blocks or self.ref_counts[block] or block in self.evictable:
            return False
        try:
            self.free_blocks.remove(block)
        except ValueError:  # not free after all (a test holding it aside)
            return False
        return True

    def free_run(self) -> tuple[int, int]:
        """``(first, count)``: the run of consecutive free blocks that starts at the lowest free block (``(0, 0)``
        when none is free)."""
        free = set(self.free_blocks)
        if not free:
            return 0, 0
        first = count = min(free)
        while count in free:
            count += 1
        return first, count - first

    def acquire(self, block: int) -> None:
        """One more table entry points at `block` (reviving it if it was evictable). `NULL_BLOCK`: nothing."""
        if block == NULL_BLOCK:
            return
        if self.ref_counts[block] == 0:
            del self.evictable[block]
        self.ref_counts[block] += 1

    def release(self, blocks: Sequence[int]) -> None:
        """One table entry fewer points at each of `blocks`; indexed blocks stay as evictable. Null entries are
        skipped."""
        for block in blocks:
            if block == NULL_BLOCK:
                continue
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if block in self.block_to_hash:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)

    def index(self, block: int, key: Hashable) -> None:
        """Register the full, referenced `block` under `key`. No-op if either is already indexed, if `block` is
        `NULL_BLOCK` (a null entry is never indexed) or a manager's scratch block (its contents are garbage)."""
        if block == NULL_BLOCK or any(manager.scratch == block for manager in list(self.managers)):
            return
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
                    if block != NULL_BLOCK:
                        assert 0 <= block < self.num_blocks, f"table entry {block} is not a block of the pool"
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
        self._live_from: list[int] = []
        self.cow_copies = 0
        self.scratch: int | None = None  # the block finished rows write into (held while this manager has rows)
        self.pool.managers.add(self)

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def live_from(self) -> list[int]:
        """Per row, the token position below which every token is dead (see the module docstring).

        Rows that a caller put into `tables` directly, without going through this manager, start live at 0.
        """
        missing = len(self.tables) - len(self._live_from)
        if missing > 0:
            self._live_from.extend([0] * missing)
        return self._live_from

    @live_from.setter
    def live_from(self, values: Sequence[int]) -> None:
        self._live_from = [int(value) for value in values]

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
        used = {block for table in self.tables for block in table if block != NULL_BLOCK}
        return len(used) + (self.scratch is not None and self.scratch not in used)

    @property
    def num_shared(self) -> int:
        """Distinct blocks referenced more than once by this manager's rows."""
        seen: set[int] = set()
        shared: set[int] = set()
        for table in self.tables:
            for block in table:
                if block != NULL_BLOCK:
                    (shared if block in seen else seen).add(block)
        return len(shared)

    def first_live_block(self) -> int:
        """The smallest ``live_from[row] // block_size`` over all rows (0 without rows): that many leading entries
        are null in every row's table."""
        return min((start // self.block_size for start in self.live_from), default=0)

    def blocks_needed(self, num_tokens: int, finished: Sequence[bool] | None = None,
                      live_from: Sequence[int] | None = None) -> int:
        """Free blocks `append(num_tokens, finished, live_from)` needs: the blocks it takes from the pool (new blocks,
        copy-on-write copies, the scratch block) less those its releases of newly dead blocks give back first."""
        taken, freed = self._forecast(num_tokens, finished, self._new_live_from(live_from))
        return max(0, taken - freed)

    def private_rows(self, rows: Sequence[bool]) -> list[bool]:
        """Per row, whether it is marked in `rows` and references only blocks of its own: every real entry has ref
        count 1 (or is this manager's scratch block). Releasing such a row's blocks gives them all back to the pool;
        a row sharing blocks with its forks or beams (or with another cache) would give back only its references."""
        if len(rows) != self.num_rows:
            raise ValueError(f"rows has {len(rows)} entries for {self.num_rows} rows")
        refs, scratch, bs = self.pool.ref_counts, self.scratch, self.block_size
        # Entries below the live start's block are null (invariant 3): a row that gave its blocks back is one check.
        return [bool(marked) and all(block == scratch or refs[block] == 1 for block in table[start // bs:])
                for marked, table, start in zip(rows, self.tables, self.live_from, strict=True)]

    def _new_live_from(self, live_from: Sequence[int] | None) -> list[int]:
        """Each row's live start after a step given `live_from` (None: unchanged; never lowered)."""
        current = self.live_from
        if live_from is None:
            return list(current)
        if len(live_from) != self.num_rows:
            raise ValueError(f"hf_paged: live_from has {len(live_from)} entries for {self.num_rows} rows")
        return [max(old, int(new)) for old, new in zip(current, live_from, strict=True)]

    def _forecast(self, num_tokens: int, finished: Sequence[bool] | None, new_live: list[int]) -> tuple[int, int]:
        """``(taken, freed)``: blocks `append` takes from the pool, and blocks its releases return to it (ref count
        reaching 0). Mirrors `append` exactly: all releases first, then per row copy-on-write and new entries."""
        bs, refs = self.block_size, self.pool.ref_counts
        releases: dict[int, int] = {}  # block -> entries of this manager that drop it
        writers: dict[int, int] = {}  # shared partial tail block -> rows about to write into it
        taken = 0
        scratch_needed = False
        for row, (table, length) in enumerate(zip(self.tables, self.lengths, strict=True)):
            dead = new_live[row] // bs
            for block in table[:dead]:
                if block != NULL_BLOCK:
                    releases[block] = releases.get(block, 0) + 1
            if num_tokens <= 0:
                continue
            ended = finished is not None and finished[row]
            missing = _blocks_for(length + num_tokens, bs) - max(len(table), dead)
            if missing > 0:
                if ended:
                    scratch_needed = True
                else:
                    taken += missing
            if length % bs and len(table) > dead and not (ended and table[-1] == self.scratch):
                writers[table[-1]] = writers.get(table[-1], 0) + 1
        # Every writer copies the shared block, except the last one when nothing else references it any more.
        # (A private tail is a single writer with nothing else referencing it: no copy.)
        for block, count in writers.items():
            holders = refs[block] - releases.get(block, 0)  # >= count: each writer still holds its entry
            taken += count if holders > count else count - 1
        taken += scratch_needed and self.scratch is None
        freed = sum(refs[block] == count for block, count in releases.items())
        return taken, freed

    # ---------------------------------------------------------------------------------------------- mutators
    def add_rows(self, num_rows: int) -> None:
        """Append `num_rows` empty rows (live from position 0)."""
        live_from = self.live_from
        self.tables.extend([] for _ in range(num_rows))
        self.lengths.extend([0] * num_rows)
        live_from.extend([0] * num_rows)

    def append(self, num_tokens: int, finished: Sequence[bool] | None = None,
               live_from: Sequence[int] | None = None, contiguous: bool = False) -> list[tuple[int, int]]:
        """Make room for `num_tokens` more tokens at the end of every row.

        Returns the copy-on-write copies ``(src, dst)`` the caller must perform *before* writing the new tokens:
        a row whose partial last block is shared (and live) gets a private copy of it. Raises `OutOfBlocksError`
        (having changed nothing) when the pool cannot cover the step.

        ``finished[row]`` marks rows whose new tokens nobody will read (``generate`` feeds padding to rows that
        have ended): they still grow by `num_tokens`, so every row keeps its positions, but the tokens that fall
        past their own blocks go to this manager's scratch block instead of new blocks.

        ``live_from[row]`` is the row's live start after this step (None: unchanged; a value below the current
        one changes nothing). Blocks wholly below it are released (entry -> `NULL_BLOCK`) before anything is
        taken, or never allocated: a prefill with left padding takes nothing for whole pad blocks, a sliding-window
        prefill only the blocks of its last tokens. The caller writes no token below it.

        ``contiguous`` lays rows out for reads in place (the PyTorch path, which reads keys through views rather
        than block tables): a row's new block is the one after its last if that is free, and rows that take their
        first blocks together (a prefill of distinct prompts) start evenly spaced over the free run at the lowest
        free block (`BlockPool.free_run`), entry ``i`` of row ``r`` at ``first + r * stride + i``, so that every
        row's blocks stay at one stride from the next row's while they fit (`hf_paged.step.StepPlan.row_stride`).
        The blocks taken, and their number, are the same either way; only which free ones.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if finished is not None and len(finished) != self.num_rows:
            raise ValueError(f"finished has {len(finished)} entries for {self.num_rows} rows")
        pool = self.pool
        new_live = self._new_live_from(live_from)
        taken, freed = self._forecast(num_tokens, finished, new_live)
        if taken - freed > pool.num_free:
            raise OutOfBlocksError(taken - freed, pool.num_free, pool.num_blocks, self.block_size)
        self._release_dead(new_live)
        copies: list[tuple[int, int]] = []
        bs = self.block_size
        if num_tokens == 0:
            return copies
        homes = self._homes(num_tokens) if contiguous else None
        for row, table in enumerate(self.tables):
            length = self.lengths[row]
            dead = new_live[row] // bs
            ended = finished is not None and finished[row]
            if length % bs and len(table) > dead and not (ended and table[-1] == self.scratch):
                tail = table[-1]
                if pool.ref_counts[tail] > 1:
                    dst = pool.take()
                    pool.release([tail])
                    table[-1] = dst
                    copies.append((tail, dst))
                else:
                    pool.unindex(tail)  # about to be written: its old contents are no longer what was indexed
            for index in range(len(table), _blocks_for(length + num_tokens, bs)):
                if index < dead:
                    table.append(NULL_BLOCK)
                elif ended:
                    if self.scratch is None:
                        self.scratch = pool.take()
                    pool.acquire(self.scratch)
                    table.append(self.scratch)
                elif not contiguous:
                    table.append(pool.take())
                elif table and table[-1] != NULL_BLOCK and table[-1] != self.scratch:
                    table.append(pool.take(table[-1] + 1))
                else:
                    table.append(pool.take(None if homes is None else homes[row] + index))
            self.lengths[row] = length + num_tokens
        self.cow_copies += len(copies)
        return copies

    def _homes(self, num_tokens: int) -> list[int] | None:
        """For `append` with ``contiguous``: where each row's entry 0 would lie when every row is empty and there
        are several (``first + r * stride``: the free run at the lowest free block split evenly, each part at least
        as long as the rows' tables will be), else None."""
        if self.num_rows < 2 or any(self.tables):
            return None
        first, count = self.pool.free_run()
        stride = count // self.num_rows
        if stride < _blocks_for(max(self.lengths) + num_tokens, self.block_size):
            return None
        return [first + row * stride for row in range(self.num_rows)]

    def release_before(self, positions: Sequence[int]) -> None:
        """Raise each row's live start to ``positions[row]`` (never lowering it) and release the blocks now wholly
        below it: one reference fewer each (beams sharing a block each drop their own), entry -> `NULL_BLOCK`."""
        self._release_dead(self._new_live_from(positions))

    def _release_dead(self, new_live: list[int]) -> None:
        bs = self.block_size
        for row, table in enumerate(self.tables):
            for index in range(min(new_live[row] // bs, len(table))):
                if table[index] != NULL_BLOCK:
                    self.pool.release([table[index]])
                    table[index] = NULL_BLOCK
        self.live_from = new_live

    def set_row(self, row: int, blocks: Sequence[int], length: int, live_from: int | None = None) -> None:
        """Point the empty `row` at existing `blocks` holding its first `length` tokens (a prefix-cache hit).

        With `live_from`, the row's live start is raised to it: entries of `blocks` wholly below it may be
        `NULL_BLOCK` (or real blocks, which the row then does not reference); every other one must be real.
        """
        if self.tables[row]:
            raise ValueError(f"row {row} is not empty")
        if len(blocks) != _blocks_for(length, self.block_size):
            raise ValueError(f"{len(blocks)} blocks cannot hold exactly {length} tokens")
        start = max(self.live_from[row], 0 if live_from is None else int(live_from))
        dead = min(start // self.block_size, len(blocks))
        table = [NULL_BLOCK] * dead + [int(block) for block in blocks[dead:]]
        for index in range(dead, len(table)):
            if not 0 <= table[index] < self.pool.num_blocks:
                raise ValueError(f"hf_paged: set_row got entry {table[index]} at block {index} of row {row}, at or "
                                 f"above its live start {start}: it must be a block of the pool")
        for block in table:
            self.pool.acquire(block)
        self.tables[row] = table
        self.lengths[row] = length
        self.live_from[row] = start

    def adopt(self, source: BlockManager, renumber: dict[int, int]) -> None:
        """Take `source`'s rows (tables, lengths, live starts, copy count), block ``b`` of its pool becoming
        ``renumber[b]`` of this empty manager's: a copy of a cache into a new pool holding those blocks, none of
        them free or referenced yet (`hf_paged.kv_pool.KVPool.compacted`)."""
        if self.tables:
            raise ValueError("hf_paged: adopt() needs a manager without rows")
        self.tables = [[NULL_BLOCK if block == NULL_BLOCK else renumber[block] for block in table]
                       for table in source.tables]
        self.lengths, self.live_from, self.cow_copies = list(source.lengths), list(source.live_from), source.cow_copies
        for table in self.tables:
            for block in table:
                if block != NULL_BLOCK:
                    self.pool.ref_counts[block] += 1

    def select(self, indices: Sequence[int]) -> None:
        """Replace the rows by ``rows[indices]`` (reorder, duplicate or drop rows) without copying any block.

        This is beam search's reorder, ``num_return_sequences``'s repeat-interleave and a batch selection alike.
        """
        for index in indices:
            if not 0 <= index < self.num_rows:
                raise IndexError(f"row index {index} out of range for {self.num_rows} rows")
        new_tables = [list(self.tables[i]) for i in indices]
        new_lengths = [self.lengths[i] for i in indices]
        new_live = [self.live_from[i] for i in indices]
        for table in new_tables:
            for block in table:
                self.pool.acquire(block)
        for table in self.tables:
            self.pool.release(table)
        self.tables, self.lengths, self.live_from = new_tables, new_lengths, new_live

    def truncate(self, length: int) -> None:
        """Keep only the first `length` tokens of every row, releasing blocks no longer needed.

        Raises `ValueError` (changing nothing) if that would cut a row below its live start: the tokens it would
        then end with are gone.
        """
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        for row, (current, start) in enumerate(zip(self.lengths, self.live_from, strict=True)):
            if length < current and length < start:
                raise ValueError(
                    f"hf_paged: cannot truncate row {row} to {length} tokens: its tokens before position {start} "
                    "were released (left padding or out of the sliding window). Truncate to at least that length, "
                    "or run the prompt again."
                )
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
        self.tables, self.lengths, self.live_from = [], [], []
        if self.scratch is not None:
            self.pool.release([self.scratch])
            self.scratch = None

    # ------------------------------------------------------------------------------------------------ checks
    def check_rows(self) -> None:
        """Assert invariant 3 for this manager's rows."""
        assert len(self.live_from) == len(self.tables), "live_from and tables differ in rows"
        for table, length, start in zip(self.tables, self.lengths, self.live_from, strict=True):
            assert len(table) == _blocks_for(length, self.block_size), (len(table), length)
            assert start >= 0, start
            dead = start // self.block_size
            for index, block in enumerate(table):
                assert (block == NULL_BLOCK) == (index < dead), (table, start)

    def check(self) -> None:
        """Assert the invariants of the module docstring for the pool and every manager sharing it."""
        self.pool.check()
