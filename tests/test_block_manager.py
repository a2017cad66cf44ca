"""`BlockPool` and `BlockManager` alone (pure Python, no tensors): examples, and their invariants under thousands of
random operation sequences; then null block-table entries and per-row live starts (left padding, sliding windows):
examples and a model-based property test over random operation sequences on one pool shared by one or two
managers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_paged.block_manager import NULL_BLOCK, BlockManager, BlockPool, OutOfBlocksError


def test_append_allocates_blocks_and_forks_share_them():
    manager = BlockManager(num_blocks=10, block_size=4)
    manager.add_rows(1)
    assert manager.append(6) == []
    assert manager.tables == [[0, 1]] and manager.lengths == [6]
    manager.select([0, 0, 0])  # fork three ways: nothing is copied
    assert manager.num_used == 2 and manager.num_shared == 2
    copies = manager.append(1)  # each row writes into the shared partial block 1
    assert [src for src, _ in copies] == [1, 1]  # two rows copy it, the last one keeps the original
    assert manager.num_shared == 1  # only the full block 0 is still shared
    assert manager.cow_copies == 2
    manager.check()


def test_contiguous_append_keeps_rows_at_one_stride():
    """`append(..., contiguous=True)` (the PyTorch path's layout): rows that take their first blocks together start
    evenly spaced over the free run, each growing into the block after its last; left padding's null entries keep
    their places. The same number of blocks is taken, and the invariants hold."""
    manager = BlockManager(num_blocks=40, block_size=4)
    manager.add_rows(3)
    needed = manager.blocks_needed(10, live_from=[0, 4, 8])
    manager.append(10, live_from=[0, 4, 8], contiguous=True)  # 3 entries each; rows 1 and 2 start with null ones
    assert needed == 6 == manager.num_used
    assert manager.tables == [[0, 1, 2], [NULL_BLOCK, 14, 15], [NULL_BLOCK, NULL_BLOCK, 28]]  # stride 40 // 3
    for _ in range(6):
        manager.append(1, contiguous=True)
    assert manager.tables == [[0, 1, 2, 3], [NULL_BLOCK, 14, 15, 16], [NULL_BLOCK, NULL_BLOCK, 28, 29]]
    manager.pool.check()
    # A row whose next block is taken grows into the oldest free block instead.
    manager.pool.take(4)
    manager.append(4, contiguous=True)
    assert manager.tables[0][-1] != 4 and manager.tables[1][-1] == 17 and manager.tables[2][-1] == 30
    manager.pool.release([4])
    manager.pool.check()


def test_contiguous_append_spaces_rows_only_over_a_long_enough_free_run():
    """Rows are spaced over the run of free blocks at the lowest free one only when each gets as many blocks as it
    takes; otherwise they take the oldest free blocks, as without ``contiguous``."""
    manager = BlockManager(num_blocks=16, block_size=4)
    manager.pool.take(5)  # the run at block 0 is 5 blocks long: 1 per row, fewer than the 2 each takes
    manager.add_rows(3)
    manager.append(8, contiguous=True)
    assert manager.tables == [[0, 1], [2, 3], [4, 6]]
    manager.pool.release([5])
    manager.pool.check()


def test_writing_at_a_block_boundary_copies_nothing():
    manager = BlockManager(num_blocks=10, block_size=4)
    manager.add_rows(1)
    manager.append(8)
    manager.select([0, 0])
    assert manager.append(1) == []
    manager.check()


def test_out_of_blocks_changes_nothing():
    manager = BlockManager(num_blocks=3, block_size=4)
    manager.add_rows(2)
    manager.append(4)
    before = ([list(t) for t in manager.tables], list(manager.lengths), manager.num_free)
    with pytest.raises(OutOfBlocksError, match="needs 2 more block"):
        manager.append(1)
    assert ([list(t) for t in manager.tables], list(manager.lengths), manager.num_free) == before
    manager.check()


def test_ended_rows_write_past_their_blocks_into_one_scratch_block():
    manager = BlockManager(num_blocks=10, block_size=4)
    manager.add_rows(3)
    manager.append(3)  # three private blocks, partly filled
    assert manager.blocks_needed(3, [True, True, False]) == 2  # row 2 needs a block, rows 0 and 1 the scratch one
    assert manager.append(3, [True, True, False]) == []
    scratch = manager.scratch
    assert [table[1] for table in manager.tables[:2]] == [scratch, scratch] and manager.lengths == [6, 6, 6]
    assert manager.blocks_needed(4, [True, True, False]) == 1  # the ended rows keep writing into the scratch block
    manager.append(4, [True, True, False])
    assert manager.tables[0] == [0, scratch, scratch] and manager.num_used == 6
    copies = manager.append(1)  # a row that goes on after ending gets a private copy of its scratch tail
    assert [src for src, _ in copies] == [scratch, scratch]
    manager.check()
    manager.reset()
    assert manager.scratch is None and manager.num_free == 10
    manager.check()


def test_truncate_and_reset_free_everything():
    manager = BlockManager(num_blocks=8, block_size=4)
    manager.add_rows(2)
    manager.append(9)
    manager.truncate(5)
    assert manager.lengths == [5, 5] and manager.num_used == 4
    manager.reset()
    assert manager.num_free == 8
    manager.check()


def test_select_rejects_bad_rows():
    manager = BlockManager(num_blocks=4, block_size=4)
    manager.add_rows(2)
    with pytest.raises(IndexError):
        manager.select([0, 2])
    manager.check()


operations = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 9)),
        st.tuples(st.just("append_ended"), st.tuples(st.integers(0, 9), st.integers(0, 255))),
        st.tuples(st.just("give_back"), st.tuples(st.integers(0, 9), st.integers(0, 255))),
        st.tuples(st.just("select"), st.lists(st.integers(0, 7), min_size=0, max_size=8)),
        st.tuples(st.just("truncate"), st.integers(0, 40)),
        st.tuples(st.just("grow"), st.integers(1, 4)),
        st.tuples(st.just("reset"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=400, deadline=None)
@given(block_size=st.integers(1, 5), num_blocks=st.integers(0, 24), rows=st.integers(1, 4), ops=operations,
       contiguous=st.booleans())
def test_invariants_hold_under_random_operations(block_size, num_blocks, rows, ops, contiguous):
    manager = BlockManager(num_blocks, block_size)
    manager.add_rows(rows)
    for name, arg in ops:
        if name in ("append", "append_ended", "give_back"):
            finished = live = None
            if name != "append":  # some rows have ended: their new tokens go to the scratch block
                arg, bits = arg
                finished = [bool(bits >> row & 1) for row in range(manager.num_rows)]
            if name == "give_back":  # ended rows of their own blocks give them back (LayerGroup.begin_step)
                private = manager.private_rows(finished)
                live = [length if mine else start
                        for start, length, mine in zip(manager.live_from, manager.lengths, private, strict=True)]
            needed, free = manager.blocks_needed(arg, finished, live), manager.num_free
            before = list(manager.lengths)
            if needed > free:
                with pytest.raises(OutOfBlocksError):
                    manager.append(arg, finished, live, contiguous)
                assert manager.num_free == free
            else:  # the forecast is exact: a step that fits never raises (and one that gives back may free some)
                manager.append(arg, finished, live, contiguous)
                assert manager.num_free == free - needed if needed else manager.num_free >= free
                if name == "give_back":  # a row that gave its blocks back holds at most the one it wrote into
                    for row in (row for row, mine in enumerate(private) if mine):
                        own = {b for b in manager.tables[row] if b >= 0 and b != manager.scratch}
                        assert len(own) <= 1 and all(manager.pool.ref_counts[b] == 1 for b in own)
                        assert manager.live_from[row] == before[row]
        elif name == "truncate" and any(arg < min(length, start)
                                        for length, start in zip(manager.lengths, manager.live_from, strict=True)):
            with pytest.raises(ValueError, match="were released"):
                manager.truncate(arg)
        elif name == "select":
            indices = [i % manager.num_rows for i in arg] if manager.num_rows else []
            manager.select(indices)
            if manager.num_rows == 0:
                manager.add_rows(rows)
        elif name == "truncate":
            manager.truncate(arg)
        elif name == "grow":
            manager.pool.grow(arg)
        else:
            manager.reset()
            manager.add_rows(rows)
        manager.check()
    manager.reset()
    manager.check()
    assert manager.num_free == manager.num_blocks  # nothing leaks


@settings(max_examples=200, deadline=None)
@given(block_size=st.integers(1, 5), forks=st.integers(1, 6), prompt=st.integers(1, 30), steps=st.integers(1, 12))
def test_forked_rows_copy_at_most_their_partial_block(block_size, forks, prompt, steps):
    manager = BlockManager(1000, block_size)
    manager.add_rows(1)
    manager.append(prompt)
    manager.select([0] * forks)
    copies = 0
    for _ in range(steps):
        for src, dst in manager.append(1):
            copies += 1
            assert src != dst
        for table in manager.tables:  # after append every row's last block is private
            assert manager.pool.ref_counts[table[-1]] == 1
    # Only the shared partial last block of the prompt is ever copied, once per row but one.
    assert copies == (forks - 1 if prompt % block_size else 0)
    assert manager.num_used == prompt // block_size + forks * (-(-(prompt % block_size + steps) // block_size))
    manager.check()


shared_pool_ops = st.lists(
    st.tuples(st.sampled_from(["append", "index", "hit", "select", "truncate", "reset"]), st.integers(0, 2),
              st.integers(0, 9)),
    max_size=50,
)


@settings(max_examples=300, deadline=None)
@given(block_size=st.integers(1, 4), num_blocks=st.integers(0, 20), ops=shared_pool_ops)
def test_shared_pool_with_prefix_index_keeps_invariants(block_size, num_blocks, ops):
    """Three caches share one pool; full blocks get indexed, found again, evicted; nothing leaks."""
    pool = BlockPool(num_blocks, block_size)
    managers = [BlockManager(block_size=block_size, pool=pool) for _ in range(3)]
    for manager in managers:
        manager.add_rows(2)
    for name, which, arg in ops:
        manager = managers[which]
        if name == "append":
            try:
                manager.append(arg)
            except OutOfBlocksError:
                pass
        elif name == "index":  # register the full blocks of row 0 under keys that name their contents' origin
            for position, block in enumerate(manager.tables[0][: manager.lengths[0] // block_size]):
                pool.index(block, (arg % 3, position))
        elif name == "hit" and all(not table for table in manager.tables):
            found = []
            while (block := pool.lookup((arg % 3, len(found)))) is not None:
                found.append(block)
            if found:
                for row in range(manager.num_rows):
                    manager.set_row(row, found, len(found) * block_size)
        elif name == "select":
            manager.select([arg % 2, (arg + 1) % 2])
        elif name == "truncate":
            manager.truncate(arg)
        elif name == "reset":
            manager.reset()
            manager.add_rows(2)
        pool.check()
    for manager in managers:
        manager.reset()
    pool.check()
    assert pool.num_free == pool.num_blocks  # every block free or evictable: nothing leaks


# =============================================== null entries and live starts (left padding, sliding windows)
N = NULL_BLOCK


def snapshot(pool: BlockPool, *managers: BlockManager) -> tuple:
    """Everything a failed call must leave unchanged."""
    rows = tuple(
        ([list(t) for t in m.tables], list(m.lengths), list(m.live_from), m.scratch, m.cow_copies) for m in managers
    )
    return (rows, list(pool.ref_counts), list(pool.free_blocks), list(pool.evictable), dict(pool.hash_to_block),
            pool.num_blocks)


# ------------------------------------------------------------------------------------------------------ examples
def test_left_padding_takes_no_block_for_whole_pad_blocks():
    manager = BlockManager(num_blocks=10, block_size=4)
    manager.add_rows(3)
    # Row 0 has 9 pad tokens, row 1 has 6 (its first real token sits in the middle of block 1), row 2 none.
    assert manager.blocks_needed(12, live_from=[9, 6, 0]) == 1 + 2 + 3
    assert manager.append(12, live_from=[9, 6, 0]) == []
    assert [t[:2] for t in manager.tables] == [[N, N], [N, manager.tables[1][1]], manager.tables[2][:2]]
    assert manager.tables[1][1] != N and N not in manager.tables[2]
    assert manager.lengths == [12, 12, 12] and manager.live_from == [9, 6, 0]
    assert manager.num_used == 6 and manager.first_live_block() == 0
    manager.check()
    manager.select([0, 1])  # drop the unpadded row: the first two entries of every table are now null
    assert manager.first_live_block() == 1 and manager.num_used == 3
    manager.check()


def test_sliding_window_prefill_allocates_only_its_last_tokens_and_decode_releases_behind_it():
    window, bs = 8, 4
    manager = BlockManager(num_blocks=3, block_size=bs)
    manager.add_rows(1)
    manager.append(20, live_from=[20 - window + 1])  # keeps positions 13..19: blocks 3 and 4
    assert manager.tables == [[N, N, N, manager.tables[0][3], manager.tables[0][4]]] and manager.num_used == 2
    for length in range(21, 60):  # 7 live tokens span at most 3 blocks: a pool of 3 is never short
        assert manager.blocks_needed(1, live_from=[length - window + 1]) <= manager.num_free
        manager.append(1, live_from=[length - window + 1])
        assert manager.num_used == len({p // bs for p in range(length - window + 1, length)})
        manager.check()
    assert manager.first_live_block() == (59 - window + 1) // bs


def test_a_full_pool_still_takes_a_step_that_releases_what_it_takes():
    manager = BlockManager(num_blocks=2, block_size=4)
    manager.add_rows(1)
    manager.append(8)
    assert manager.num_free == 0
    assert manager.blocks_needed(1, live_from=[5]) == 0  # block 0 dies, block 2 of the row reuses it
    manager.append(1, live_from=[5])
    assert manager.tables[0][0] == N and manager.num_free == 0
    manager.check()


def test_live_start_past_the_new_length_leaves_only_null_entries():
    manager = BlockManager(num_blocks=4, block_size=4)
    manager.add_rows(2)
    assert manager.blocks_needed(3, live_from=[9, 0]) == 1
    manager.append(3, live_from=[9, 0])
    assert manager.tables[0] == [N] and manager.num_used == 1
    manager.check()
    manager.append(8)  # row 0 reaches position 10: its block 2 (positions 8..11, live from 9) is real
    assert manager.tables[0][:2] == [N, N] and manager.tables[0][2] != N
    manager.check()


def test_a_dead_shared_tail_is_released_never_copied():
    manager = BlockManager(num_blocks=10, block_size=4)
    manager.add_rows(1)
    manager.append(6)
    tail = manager.tables[0][1]
    manager.select([0, 0, 0])  # three beams share the partial block 1
    # Three new blocks, no copy, and blocks 0 and 1 come back to the pool first: the step needs one more.
    assert manager.blocks_needed(3, live_from=[8, 8, 8]) == 3 - 2
    assert manager.append(3, live_from=[8, 8, 8]) == []
    assert manager.num_free == 10 - 3 and manager.tables[0][:2] == [N, N]
    assert manager.pool.ref_counts[tail] == 0 and tail in manager.pool.free_blocks
    manager.check()


def test_a_shared_live_tail_is_copied_except_by_its_last_holder():
    manager = BlockManager(num_blocks=10, block_size=4)
    manager.add_rows(1)
    manager.append(6)
    tail = manager.tables[0][1]
    manager.select([0, 0, 0])
    # Row 0 leaves block 1 behind; rows 1 and 2 still write into it: one copy, the last writer keeps the original.
    assert manager.blocks_needed(1, live_from=[8, 0, 0]) == 1
    copies = manager.append(1, live_from=[8, 0, 0])
    assert [src for src, _ in copies] == [tail]
    assert manager.tables[0][1] == N and tail in (manager.tables[1][1], manager.tables[2][1])
    assert manager.pool.ref_counts[tail] == 1
    manager.check()


def test_release_before_drops_each_beams_own_reference():
    manager = BlockManager(num_blocks=6, block_size=4)
    manager.add_rows(1)
    manager.append(10)
    first = manager.tables[0][0]
    manager.select([0, 0])
    manager.release_before([4, 0])
    assert manager.tables[0][0] == N and manager.pool.ref_counts[first] == 1
    manager.release_before([0, 5])  # never lowers row 0's start; row 1 drops the last reference
    assert manager.live_from == [4, 5] and manager.pool.ref_counts[first] == 0 and first in manager.pool.free_blocks
    assert manager.num_shared == 2
    manager.check()
    with pytest.raises(ValueError, match="live_from has 1 entries for 2 rows"):
        manager.release_before([8])


def test_finished_rows_with_a_live_start_use_null_entries_below_it_and_the_scratch_block_above():
    manager = BlockManager(num_blocks=10, block_size=4)
    manager.add_rows(2)
    manager.append(3)
    manager.append(6, finished=[True, False])
    scratch = manager.scratch
    assert manager.tables[0][1:] == [scratch, scratch]
    # Row 0 (finished) slides past its two scratch entries (dropping their references; the scratch block stays held)
    # and gets one new scratch entry, block 3.
    refs = manager.pool.ref_counts[scratch]
    manager.append(4, finished=[True, False], live_from=[12, 0])
    assert manager.tables[0] == [N, N, N, scratch] and manager.pool.ref_counts[scratch] == refs - 2 + 1
    assert manager.scratch == scratch
    manager.check()
    manager.reset()
    assert manager.num_free == 10 and manager.scratch is None
    manager.check()


def test_out_of_blocks_with_live_starts_changes_nothing():
    pool = BlockPool(4, 4)
    manager = BlockManager(block_size=4, pool=pool)
    manager.add_rows(2)
    manager.append(6, live_from=[4, 0])
    pool.index(manager.tables[1][0], "k")
    manager.select([0, 1, 1])
    before = snapshot(pool, manager)
    needed = manager.blocks_needed(7, finished=[False, True, False], live_from=[9, 0, 2])
    assert needed > pool.num_free
    with pytest.raises(OutOfBlocksError, match=f"needs {needed} more block"):
        manager.append(7, finished=[False, True, False], live_from=[9, 0, 2])
    assert snapshot(pool, manager) == before
    manager.check()


def test_truncate_below_the_live_start_refuses_and_changes_nothing():
    manager = BlockManager(num_blocks=6, block_size=4)
    manager.add_rows(2)
    manager.append(14, live_from=[9, 0])
    before = snapshot(manager.pool, manager)
    with pytest.raises(ValueError, match="cannot truncate row 0 to 8 tokens: its tokens before position 9"):
        manager.truncate(8)
    assert snapshot(manager.pool, manager) == before
    manager.truncate(9)  # at the live start: block 2 (positions 8..11) stays real
    assert manager.tables[0] == [N, N, manager.tables[0][2]] and manager.tables[0][2] != N
    manager.check()


def test_prefix_index_never_holds_a_null_entry_and_set_row_takes_a_live_start():
    pool = BlockPool(8, 4)
    first = BlockManager(block_size=4, pool=pool)
    first.add_rows(1)
    first.append(12, live_from=[4])
    for position, block in enumerate(first.tables[0]):
        pool.index(block, position)
    assert pool.lookup(0) is None and N not in pool.block_to_hash  # the null entry was not indexed
    second = BlockManager(block_size=4, pool=pool)
    second.add_rows(2)
    hit = [N, pool.lookup(1), pool.lookup(2)]
    second.set_row(0, hit, 12, live_from=4)
    second.set_row(1, first.tables[0], 12, live_from=9)  # a real block wholly below the start is not referenced
    assert second.tables == [hit, [N, N, hit[2]]] and pool.ref_counts[hit[1]] == 2 and pool.ref_counts[hit[2]] == 3
    third = BlockManager(block_size=4, pool=pool)
    third.add_rows(1)
    before = snapshot(pool, first, second, third)
    with pytest.raises(ValueError, match="entry -1 at block 0 of row 0, at or above its live start 0"):
        third.set_row(0, hit, 12)  # without a live start, a null entry is a caller's mistake
    assert snapshot(pool, first, second, third) == before
    pool.check()
    for manager in (first, second):
        manager.reset()
    assert pool.num_free == 8
    pool.check()


def test_writing_into_an_indexed_block_after_truncate_unindexes_it_first():
    manager = BlockManager(num_blocks=4, block_size=4)
    manager.add_rows(1)
    manager.append(8, live_from=[4])
    block = manager.tables[0][1]
    manager.pool.index(block, "prompt")
    manager.truncate(6)  # the indexed full block is the row's partial tail again
    assert manager.append(1) == [] and manager.pool.lookup("prompt") is None
    manager.check()


def test_the_scratch_block_is_never_indexed():
    manager = BlockManager(num_blocks=6, block_size=2)
    manager.add_rows(2)
    manager.append(2)
    manager.append(4, finished=[True, False])  # row 0's blocks 1 and 2 are the full scratch block
    for position, block in enumerate(manager.tables[0]):
        manager.pool.index(block, position)
    assert manager.pool.lookup(0) == manager.tables[0][0] and manager.pool.lookup(1) is None
    assert manager.scratch not in manager.pool.block_to_hash
    manager.check()


def test_rows_put_in_tables_directly_start_live_at_zero():
    manager = BlockManager(num_blocks=4, block_size=4)
    manager.tables, manager.lengths = [[0], [1]], [3, 4]
    manager.pool.ref_counts[0] = manager.pool.ref_counts[1] = 1
    manager.pool.free_blocks.remove(0)
    manager.pool.free_blocks.remove(1)
    assert manager.live_from == [0, 0]
    manager.check()


# -------------------------------------------------------------------------------------------- property test
class Model:
    """What the rows of one manager should hold, independent of the block manager: per row, its length, its live
    start and the value written at every position (None: nobody may read it)."""

    def __init__(self, manager: BlockManager, rows: int):
        self.manager, self.rows = manager, rows
        self.values: list[list[int | None]] = []
        self.live_from: list[int] = []
        self.add(rows)

    def add(self, rows: int) -> None:
        self.manager.add_rows(rows)
        self.values += [[] for _ in range(rows)]
        self.live_from += [0] * rows


class Sim:
    """A pool, its managers, their models and the pool's contents (block -> slot values)."""

    def __init__(self, num_blocks: int, block_size: int, managers: int, rows: int):
        self.pool = BlockPool(num_blocks, block_size)
        self.bs = block_size
        self.models = [Model(BlockManager(block_size=block_size, pool=self.pool), rows) for _ in range(managers)]
        self.storage: dict[int, list[int | None]] = {}
        self.recorded: dict[object, list[int | None]] = {}  # prefix key -> contents of its block when indexed
        self.counter = 0

    def slots(self, block: int) -> list[int | None]:
        return self.storage.setdefault(block, [None] * self.bs)

    def append(self, model: Model, num_tokens: int, finished: list[bool] | None, live_from: list[int] | None):
        manager, pool = model.manager, self.pool
        needed, free = manager.blocks_needed(num_tokens, finished, live_from), pool.num_free
        if needed > free:
            before = snapshot(pool, *(m.manager for m in self.models))
            with pytest.raises(OutOfBlocksError):
                manager.append(num_tokens, finished, live_from)
            assert snapshot(pool, *(m.manager for m in self.models)) == before
            return
        copies = manager.append(num_tokens, finished, live_from)
        assert needed == max(0, free - pool.num_free)  # the forecast is exact
        for src, dst in copies:  # the caller copies before it writes
            assert src != dst and dst != NULL_BLOCK
            self.storage[dst] = list(self.slots(src))
        if live_from is not None:
            model.live_from = [max(a, b) for a, b in zip(model.live_from, live_from, strict=True)]
        for row, table in enumerate(manager.tables):
            values = model.values[row]
            start = len(values)
            for position in range(start, start + num_tokens):
                if position < model.live_from[row]:  # dead: the caller writes nothing (slot -1)
                    values.append(None)
                    continue
                block = table[position // self.bs]
                assert block != NULL_BLOCK
                self.counter += 1
                self.slots(block)[position % self.bs] = self.counter
                scratch = finished is not None and finished[row] and block == manager.scratch
                values.append(None if scratch else self.counter)
            if num_tokens and not (finished and finished[row]) and start + num_tokens > model.live_from[row]:
                tail = table[-1]  # invariant 4: the block that took the row's last live token is its own
                assert pool.ref_counts[tail] == 1 and tail not in pool.block_to_hash

    def index(self, model: Model, row: int, tag: int) -> None:
        """Register the full blocks of `row` under keys naming an origin and a position (as `prefix.py` does)."""
        manager, pool = model.manager, self.pool
        for position, block in enumerate(manager.tables[row][: manager.lengths[row] // self.bs]):
            new = (tag, position) not in pool.hash_to_block
            pool.index(block, (tag, position))
            if new and pool.lookup((tag, position)) == block:
                self.recorded[(tag, position)] = list(self.slots(block))
        assert NULL_BLOCK not in pool.block_to_hash
        assert not {m.manager.scratch for m in self.models} & set(pool.block_to_hash)

    def check(self) -> None:
        self.pool.check()
        for model in self.models:
            manager = model.manager
            assert manager.lengths == [len(v) for v in model.values]
            assert manager.live_from == model.live_from
            for table, values, start in zip(manager.tables, model.values, model.live_from, strict=True):
                # The real entries are exactly the blocks of positions >= live_from (invariant 3, from the model).
                real = [i for i, block in enumerate(table) if block != NULL_BLOCK]
                assert real == list(range(start // self.bs, -(-len(values) // self.bs)))
                for position in range(start, len(values)):
                    if values[position] is not None:
                        assert self.slots(table[position // self.bs])[position % self.bs] == values[position]


append_op = st.tuples(st.just("append"), st.integers(0, 1), st.integers(0, 9), st.integers(0, 15),
                      st.one_of(st.just(0), st.integers(1, 12)))
operation = st.one_of(
    append_op, append_op, append_op,
    st.tuples(st.just("release_before"), st.integers(0, 1), st.integers(0, 30), st.integers(0, 15)),
    st.tuples(st.just("select"), st.integers(0, 1), st.lists(st.integers(0, 7), max_size=6)),
    st.tuples(st.just("fork"), st.integers(0, 1), st.integers(0, 7), st.integers(2, 4)),
    st.tuples(st.just("fork"), st.integers(0, 1), st.integers(0, 7), st.integers(2, 4)),
    st.tuples(st.just("truncate"), st.integers(0, 1), st.integers(0, 40)),
    st.tuples(st.just("index"), st.integers(0, 1), st.integers(0, 7), st.integers(0, 2)),
    st.tuples(st.just("add_row"), st.integers(0, 1)),
    st.tuples(st.just("hit"), st.integers(0, 1), st.integers(0, 7), st.integers(0, 2), st.integers(0, 12)),
    st.tuples(st.just("grow"), st.integers(0, 1), st.integers(1, 4)),
    st.tuples(st.just("reset"), st.integers(0, 1)),
    st.tuples(st.just("clear_index"), st.integers(0, 1)),
)


@settings(max_examples=300, deadline=None)
@given(block_size=st.integers(1, 5), num_blocks=st.integers(0, 30), managers=st.integers(1, 2),
       rows=st.integers(1, 3), prompt=st.integers(0, 12), ops=st.lists(operation, min_size=10, max_size=50))
def test_live_starts_keep_every_invariant_and_every_live_token(block_size, num_blocks, managers, rows, prompt, ops):
    sim = Sim(num_blocks, block_size, managers, rows)
    pool = sim.pool
    sim.append(sim.models[0], prompt, None, None)
    for name, which, *args in ops:
        model = sim.models[which % managers]
        manager = model.manager
        if name == "append":
            num_tokens, bits, growth = args
            finished = [bool(bits >> row & 1) for row in range(manager.num_rows)] if bits & 12 == 12 else None
            live_from = None
            if growth:  # each row's new start is its current one plus a different amount, up to past its end
                live_from = [s + (growth * (row + 1)) % 13 for row, s in enumerate(manager.live_from)]
            sim.append(model, num_tokens, finished, live_from)
        elif name == "release_before":
            base, spread = args
            positions = [base + spread * row for row in range(manager.num_rows)]
            manager.release_before(positions)
            model.live_from = [max(a, b) for a, b in zip(model.live_from, positions, strict=True)]
        elif name == "select":
            indices = [i % manager.num_rows for i in args[0]] if manager.num_rows else []
            manager.select(indices)
            model.values = [list(model.values[i]) for i in indices]
            model.live_from = [model.live_from[i] for i in indices]
            if manager.num_rows == 0:
                model.add(model.rows)
        elif name == "fork":  # one row becomes several beams sharing all its blocks
            row = args[0] % manager.num_rows if manager.num_rows else 0
            indices = [row] * args[1] + [i for i in range(manager.num_rows) if i != row][:1]
            if manager.num_rows:
                manager.select(indices)
                model.values = [list(model.values[i]) for i in indices]
                model.live_from = [model.live_from[i] for i in indices]
        elif name == "add_row":
            if manager.num_rows < 6:
                model.add(1)
        elif name == "truncate":
            length = args[0]
            if any(length < current and length < start
                   for current, start in zip(manager.lengths, manager.live_from, strict=True)):
                before = snapshot(pool, manager)
                with pytest.raises(ValueError, match="cannot truncate row"):
                    manager.truncate(length)
                assert snapshot(pool, manager) == before
            else:
                manager.truncate(length)
                model.values = [values[:length] for values in model.values]
        elif name == "index":
            sim.index(model, args[0] % manager.num_rows, args[1])
        elif name == "hit":  # a row of the other manager is indexed, then a new empty row here picks its blocks up
            source = sim.models[(which + 1) % managers]
            sim.index(source, args[0] % source.manager.num_rows, args[1])
            if manager.lengths[-1] and manager.num_rows < 6:
                model.add(1)
            row, tag, start = manager.num_rows - 1, args[1], args[2]
            if manager.lengths[row] == 0:
                found = []
                while (block := pool.lookup((tag, len(found)))) is not None:
                    found.append(block)
                if found:
                    length = len(found) * block_size
                    manager.set_row(row, found, length, live_from=start)
                    model.live_from[row] = max(model.live_from[row], start)
                    model.values[row] = [v for i in range(len(found)) for v in sim.recorded[(tag, i)]]
                    # Positions below the live start may hold anything: nobody reads them.
                    model.values[row][: model.live_from[row]] = [None] * min(length, model.live_from[row])
        elif name == "grow":
            pool.grow(args[0])
        elif name == "reset":
            manager.reset()
            model.values, model.live_from = [], []
            model.add(model.rows)
        else:
            pool.clear_index()
        sim.check()
    for model in sim.models:
        model.manager.reset()
    pool.check()
    assert pool.num_free == pool.num_blocks  # nothing leaks
