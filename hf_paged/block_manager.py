"""Block bookkeeping for the paged KV cache: physical block ids, reference counts and block tables.

This module never touches a tensor. It decides *where* every token's key and value live; `PagedCache` moves the
bytes. Keeping the two apart lets the invariants below be property-tested on their own.

Vocabulary
    block         a fixed-size slot group of `block_size` tokens, identified by an int in ``[0, num_blocks)``.
    row           one sequence of the batch (``generate`` addresses sequences by their batch row).
    block table   per row, the list of physical blocks holding its tokens in order: token ``t`` of a row lives in
                  block ``table[t // block_size]`` at offset ``t % block_size``.

Invariants (checked by `BlockManager.check` and by the property tests)
    1. Every block is exactly one of: free, or referenced (ref count > 0).
    2. A block's ref count equals the number of block-table entries, over all rows, that point at it.
    3. A row of length ``n`` has exactly ``ceil(n / block_size)`` blocks.
    4. A block that will be written (the block receiving a row's next token) has ref count 1: `append` copies a
       shared partial block first (copy-on-write) and reports the copy, so no row ever sees another's writes.
    5. After `reset` (or selecting zero rows) every block is free: nothing leaks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

__all__ = ["BlockManager", "OutOfBlocksError"]


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


class BlockManager:
    """Reference-counted block tables for a batch of rows.

    Args:
        num_blocks: size of the physical pool.
        block_size: tokens per block.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.ref_counts: list[int] = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.tables: list[list[int]] = []
        self.lengths: list[int] = []
        self.cow_copies = 0

    # ----------------------------------------------------------------------------------------------- queries
    @property
    def num_rows(self) -> int:
        return len(self.tables)

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def num_shared(self) -> int:
        """Blocks referenced by more than one table entry."""
        return sum(1 for count in self.ref_counts if count > 1)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks `append(num_tokens)` would take from the free list (new blocks and copy-on-write copies)."""
        if num_tokens <= 0:
            return 0
        bs = self.block_size
        needed = 0
        writers: dict[int, int] = {}  # shared partial tail block -> rows about to write into it
        for table, length in zip(self.tables, self.lengths, strict=True):
            needed += _blocks_for(length + num_tokens, bs) - len(table)
            if length % bs and self.ref_counts[table[-1]] > 1:
                writers[table[-1]] = writers.get(table[-1], 0) + 1
        # Every writer copies the shared block, except the last one when nothing else references it any more.
        for block, count in writers.items():
            needed += count if self.ref_counts[block] > count else count - 1
        return needed

    # ---------------------------------------------------------------------------------------------- mutators
    def grow(self, num_new_blocks: int) -> None:
        """Add `num_new_blocks` free blocks to the pool (ids continue after the current ones)."""
        start = self.num_blocks
        self.num_blocks += num_new_blocks
        self.ref_counts.extend([0] * num_new_blocks)
        self.free_blocks.extend(range(start, self.num_blocks))

    def add_rows(self, num_rows: int) -> None:
        """Append `num_rows` empty rows."""
        self.tables.extend([] for _ in range(num_rows))
        self.lengths.extend([0] * num_rows)

    def append(self, num_tokens: int) -> list[tuple[int, int]]:
        """Make room for `num_tokens` more tokens at the end of every row.

        Returns the copy-on-write copies ``(src, dst)`` the caller must perform *before* writing the new tokens:
        a row whose partial last block is shared gets a private copy of it. Raises `OutOfBlocksError` (having
        changed nothing) when the free list cannot cover the step.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        needed = self.blocks_needed(num_tokens)
        if needed > self.num_free:
            raise OutOfBlocksError(needed, self.num_free, self.num_blocks, self.block_size)
        copies: list[tuple[int, int]] = []
        bs = self.block_size
        for row, table in enumerate(self.tables):
            length = self.lengths[row]
            if length % bs != 0 and num_tokens > 0 and self.ref_counts[table[-1]] > 1:
                src = table[-1]
                dst = self._take()
                self.ref_counts[src] -= 1
                table[-1] = dst
                copies.append((src, dst))
            for _ in range(_blocks_for(length + num_tokens, bs) - len(table)):
                table.append(self._take())
            self.lengths[row] = length + num_tokens
        self.cow_copies += len(copies)
        return copies

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
                self.ref_counts[block] += 1
        for table in self.tables:
            self._release(table)
        self.tables, self.lengths = new_tables, new_lengths

    def truncate(self, length: int) -> None:
        """Keep only the first `length` tokens of every row, freeing blocks no longer needed."""
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        keep = _blocks_for(length, self.block_size)
        for row, table in enumerate(self.tables):
            if self.lengths[row] <= length:
                continue
            self._release(table[keep:])
            del table[keep:]
            self.lengths[row] = length

    def reset(self) -> None:
        """Drop every row and return all blocks to the free list."""
        for table in self.tables:
            self._release(table)
        self.tables, self.lengths = [], []

    # ------------------------------------------------------------------------------------------------ checks
    def check(self) -> None:
        """Assert the invariants in the module docstring. Cheap enough for tests, not for every step."""
        counts = [0] * self.num_blocks
        for table, length in zip(self.tables, self.lengths, strict=True):
            assert len(table) == _blocks_for(length, self.block_size), (len(table), length)
            for block in table:
                counts[block] += 1
        assert counts == self.ref_counts, "ref counts differ from table entries"
        free = set(self.free_blocks)
        assert len(free) == len(self.free_blocks), "a block is on the free list twice"
        for block in range(self.num_blocks):
            assert (block in free) != (counts[block] > 0), f"block {block} is neither free nor referenced (or both)"

    # ----------------------------------------------------------------------------------------------- helpers
    def _take(self) -> int:
        block = self.free_blocks.popleft()
        self.ref_counts[block] = 1
        return block

    def _release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
