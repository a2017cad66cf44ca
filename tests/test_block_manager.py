"""The block manager's invariants, under thousands of random operation sequences."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_paged.block_manager import BlockManager, BlockPool, OutOfBlocksError


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
@given(block_size=st.integers(1, 5), num_blocks=st.integers(0, 24), rows=st.integers(1, 4), ops=operations)
def test_invariants_hold_under_random_operations(block_size, num_blocks, rows, ops):
    manager = BlockManager(num_blocks, block_size)
    manager.add_rows(rows)
    for name, arg in ops:
        if name in ("append", "append_ended", "give_back"):
            finished = live = None
            if name != "append":  # some rows have ended: their new tokens go to the scratch block
                arg, bits = arg
                finished = [bool(bits >> row & 1) for row in range(manager.num_rows)]
            if name == "give_back":  # ended rows of their own blocks give them back (PagedCache._begin_step)
                private = manager.private_rows(finished)
                live = [length if mine else start
                        for start, length, mine in zip(manager.live_from, manager.lengths, private, strict=True)]
            needed, free = manager.blocks_needed(arg, finished, live), manager.num_free
            before = list(manager.lengths)
            if needed > free:
                with pytest.raises(OutOfBlocksError):
                    manager.append(arg, finished, live)
                assert manager.num_free == free
            else:  # the forecast is exact: a step that fits never raises (and one that gives back may free some)
                manager.append(arg, finished, live)
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
