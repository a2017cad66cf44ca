"""The step plan: how one forward step of a layer group reads and writes its blocks.

Built once per step and device from the group's `BlockManager` (`build_step`): the block tables, lengths and slot
mapping as tensors, the backend, and the read plan (a block range read in place, one range per slab, blocks shared
by groups of rows, or a gather). Every layer of the group reads the same plan; masks built from it are memoised on
it (`StepPlan.memo`, `hf_paged.masks`).
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from dataclasses import dataclass, field

import torch

from . import backend
from .block_manager import NULL_BLOCK, BlockManager

__all__ = ["READ_PLANS", "SharedPrefix", "StepPlan", "build_step", "padded_tables", "read_plan", "table_tensor"]

# On the PyTorch path a step reads all rows' keys as one block range (`ops.window_attention`) when the range holds
# at most `_WINDOW_EXTRA_KEYS` keys (or a quarter of the longest row, if more) beyond the longest row's: every
# query scores those other rows' keys for nothing, which costs less than the gathers, the second attention call
# and the merge of `ops.shared_prefix_attention` up to about that many keys (measured on SmolLM2-135M, 8 rows).
# Only for steps of at most `_WINDOW_MAX_QUERIES` new tokens per row (decoding, assisted decoding; not prefill).
_WINDOW_EXTRA_KEYS = 1024
_WINDOW_MAX_QUERIES = 16
# With a pool of several slabs, a window is planned per slab holding some row's blocks, each read in place, and
# the partial attentions merged by log-sum-exp; beyond this many slabs in one step, the keys are gathered instead.
_WINDOW_MAX_SLABS = 8
# What ``HF_PAGED_READ_PLAN`` may ask for (`read_plan`).
READ_PLANS = ("auto", "shared_prefix", "gather")


@dataclass(frozen=True)
class SharedPrefix:
    """Rows ``[g * R, (g + 1) * R)`` share their first ``len(prefix_blocks[g])`` blocks (built once per step).

    Attributes:
        group_size: ``R``, rows per group.
        prefix_blocks: ``[G, F]`` int32, each group's shared blocks.
        prefix_start: the first block when there is one group and its blocks are consecutive (read in place).
        tail_tables: ``[B, nt]`` int32, each row's blocks after the prefix.
        prefix_len: ``F * block_size`` tokens.
    """

    group_size: int
    prefix_blocks: torch.Tensor
    prefix_start: int | None
    tail_tables: torch.Tensor
    prefix_len: int


@dataclass
class StepPlan:
    """How one forward step of a layer group reads and writes its blocks: built once per step and device (not once
    per layer), the only place that decides which read path a step takes (block range, several ranges, shared
    prefix, or a gather).

    Attributes:
        block_tables: ``[B, nb]`` int32.
        seq_lens: ``[B]`` int32, lengths including this step's tokens.
        slot_mapping: ``[B * q]`` int64, where each new token is written.
        q_len: query tokens per row in this step.
        max_seq_len: ``max(seq_lens)`` as a Python int.
        block_size: tokens per block.
        triton: whether this step's paged operations run the Triton kernels (`backend.use_triton`).
        shared: how rows share leading blocks (beams, samples of one prompt), or None; planned whenever `window`
            is None (always so on the Triton path, which plans no window).
        first_block: with a single row whose blocks are consecutive, the first one (keys are read in place).
        window: ``(first_block, num_blocks)``, a block range holding every row's blocks and not much else (see
            `_WINDOW_EXTRA_KEYS`), or None.
        skips: some new token is not stored (its slot is -1): left padding, or keys out of a sliding window.
        key_offset: positions the tables and lengths start at: every row's first ``key_offset / block_size``
            blocks hold only dead tokens (left padding, keys out of a sliding window), so they are left out. Key
            ``j`` of the tables is token ``key_offset + j`` of the row; masks indexed by token are cut to match.
        fresh: for a step that stores only its last tokens (a sliding-window prefill): per layer, the keys and
            values it was given, read by its attention (`PagedCache.fresh_inputs`); else None.
        context: with `fresh`, ``(first position, per layer the kept keys and values from there)`` gathered before
            the step, or None when the rows held nothing.
        kv_start: with `fresh`, the position of the first key its attention reads (kept or new).
        windows: with a pool of several slabs, one such range per slab holding some row's blocks (each inside one
            slab; together compact), whose partial attentions are merged (`ops.windows_attention`), or None. Also
            planned for a single row whose blocks cross a slab boundary.
        first_entries: ``[B]`` long, each row's first table entry that is not null, when some are (window masks
            skip null entries), else None.
    """

    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    q_len: int
    max_seq_len: int
    block_size: int
    triton: bool = False
    shared: SharedPrefix | None = None
    first_block: int | None = None
    window: tuple[int, int] | None = None
    windows: tuple[tuple[int, int], ...] | None = None
    first_entries: torch.Tensor | None = None
    skips: bool = False
    key_offset: int = 0
    fresh: dict | None = None
    context: tuple | None = None
    kv_start: int = 0
    _memo: dict = field(default_factory=dict)

    def memo(self, key: tuple, compute):
        """``compute()``, once per step for `key` (masks every layer of the step shares, `hf_paged.masks`)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def last_queries(self, q_len: int) -> StepPlan:
        """This step as seen by its last `q_len` queries only (Gemma 4's KV-shared layers in a prefill): the same
        tables and keys, masks for `q_len` queries (built once per step)."""
        return self.memo(("last_queries", q_len), lambda: dataclasses.replace(self, q_len=q_len, _memo={}))


def read_plan() -> str:
    """Which read plans a step may take, from the environment variable ``HF_PAGED_READ_PLAN`` (read once per step,
    as ``HF_PAGED_BACKEND`` is; the tokens are the same on every plan, only the work differs):

    * ``auto`` (or unset): the fastest plan that applies (on the PyTorch path a block range read in place when the
      rows' blocks are compact, else the shared prefix read once, else a gather).
    * ``shared_prefix``: never a block range (as on the Triton path): rows sharing leading blocks read them once,
      the others are gathered.
    * ``gather``: neither: every row's keys are gathered (a single row's consecutive blocks are still sliced in
      place).
    """
    choice = os.environ.get("HF_PAGED_READ_PLAN", "").strip().lower() or "auto"
    if choice not in READ_PLANS:
        raise ValueError(f"hf_paged: HF_PAGED_READ_PLAN must be one of {', '.join(READ_PLANS)} or unset, got "
                         f"{choice!r}.")
    return choice


def padded_tables(manager, device: torch.device) -> torch.Tensor:
    """The rows' block tables as one ``[B, nb]`` int32 tensor on `device` (short rows padded with block 0; null
    entries, which only dead tokens occupy, read block 0 too)."""
    return table_tensor(manager.tables, device).clamp_min_(0)


def table_tensor(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """``[B, nb]`` int32 on `device`, short rows padded with 0, null entries (`NULL_BLOCK`) kept."""
    width = max((len(table) for table in tables), default=0)
    return torch.tensor([table + [0] * (width - len(table)) for table in tables],
                        dtype=torch.int32).reshape(len(tables), width).to(device)


@dataclass
class _Rows:
    """The rows' tables and lengths as a step reads them: without the leading blocks no row needs."""

    tables: list[list[int]]
    lengths: list[int]
    block_size: int

    @property
    def num_rows(self) -> int:
        return len(self.tables)


def build_step(manager: BlockManager, lengths_before: list[int], q_len: int, device: torch.device,
                trim: bool = True, fresh: dict | None = None, context=None,
                starts: list[int] | None = None) -> StepPlan:
    """This step's plan: `trim` leaves out the leading blocks no row needs; `fresh` / `context` as in
    `StepPlan` (`fresh`: the dict the step's layers fill, shared by the plans of every device); `starts`: the
    first block id of each of the pool's slabs (None: one slab)."""
    bs = manager.block_size
    first = manager.first_live_block() if trim and manager.num_rows else 0
    if first:  # keep at least each row's last entry (a row all of dead tokens, e.g. an empty prompt)
        first = max(min(first, min(len(table) for table in manager.tables) - 1), 0)
    offset = first * bs
    rows = _Rows([table[first:] for table in manager.tables] if first else manager.tables,
                 [length - offset for length in manager.lengths] if first else manager.lengths, bs)
    raw = table_tensor(rows.tables, device)
    live = manager.live_from
    # A row's entries before its live start's block are null (`BlockManager`): count them instead of scanning.
    leading_nulls = [min(start // bs, len(table) + first) - first for start, table in zip(live, rows.tables, strict=True)]
    has_null = any(count > 0 for count in leading_nulls)
    block_tables = raw.clamp_min(0) if has_null else raw
    seq_lens = torch.tensor(rows.lengths, dtype=torch.int32).to(device)
    positions = torch.tensor([before - offset for before in lengths_before], dtype=torch.long,
                             device=device)[:, None] + torch.arange(q_len, device=device)
    # A new token before the step's first block (out of the window already) is not stored: `skips` covers it.
    entries = raw.to(torch.long).gather(1, (positions // bs).clamp_min(0))
    slots = entries * bs + positions % bs
    skips = any(start > before for start, before in zip(live, lengths_before, strict=True))
    if skips:
        live_starts = torch.tensor([start - offset for start in live], dtype=torch.long, device=device)
        slots = torch.where((entries < 0) | (positions < live_starts[:, None]), -1, slots)
    max_seq_len = max(rows.lengths)
    triton = backend.use_triton(device)
    plan = read_plan()
    starts = starts or [0]
    first_block = _consecutive_start(rows.tables[0], starts) if rows.num_rows == 1 else None
    window = windows = None
    if not triton and plan == "auto" and q_len <= _WINDOW_MAX_QUERIES and (
            rows.num_rows > 1 or (len(starts) > 1 and first_block is None)):
        planned = _window(rows.tables, max_seq_len, bs, starts)
        if planned is not None and len(planned) == 1 and rows.num_rows > 1:
            window = planned[0]
        elif planned is not None and len(planned) > 1:
            windows = tuple(planned)
    first_entries = None
    if (window is not None or windows is not None) and has_null:
        # Null entries (blocks of dead tokens) hold block 0 in the tensors: the window masks must skip them.
        first_entries = torch.tensor(leading_nulls, dtype=torch.long).to(device)
    return StepPlan(
        block_tables=block_tables,
        seq_lens=seq_lens,
        slot_mapping=slots.reshape(-1),
        q_len=q_len,
        max_seq_len=max_seq_len,
        block_size=bs,
        triton=triton,
        shared=None if window is not None or windows is not None or plan == "gather"
        else _shared_prefix(rows, q_len, device, starts),
        first_block=first_block,
        window=window,
        windows=windows,
        first_entries=first_entries,
        skips=skips,
        key_offset=offset,
        fresh=fresh,
        context=context,
        kv_start=context[0] if context is not None else min(lengths_before, default=0),
    )


def _window(tables: list[list[int]], max_seq_len: int, block_size: int,
             starts: list[int]) -> list[tuple[int, int]] | None:
    """Per slab holding some row's blocks, ``(first, count)``: the range from the lowest to the highest block the
    rows use there, if all ranges together are compact (see `_WINDOW_EXTRA_KEYS`) and few (`_WINDOW_MAX_SLABS`).
    Null entries (negative) are ignored."""
    used = set().union(*tables)
    used.discard(NULL_BLOCK)
    if not used:
        return None
    if len(starts) == 1:
        ranges = [(min(used), max(used) + 1 - min(used))]
    else:
        ordered = sorted(used)
        ranges = []
        for slab, start in enumerate(starts):
            lo = bisect.bisect_left(ordered, start)
            hi = bisect.bisect_left(ordered, starts[slab + 1]) if slab + 1 < len(starts) else len(ordered)
            if hi > lo:
                ranges.append((ordered[lo], ordered[hi - 1] + 1 - ordered[lo]))
        if len(ranges) > _WINDOW_MAX_SLABS:
            return None
    extra = sum(count for _, count in ranges) * block_size - max_seq_len
    return ranges if extra <= max(_WINDOW_EXTRA_KEYS, max_seq_len // 4) else None


def _consecutive_start(blocks: list[int], starts: list[int] | None = None) -> int | None:
    """``blocks[0]`` if the blocks are ``b, b + 1, b + 2, ...`` inside one slab (`starts`: the slabs' first block
    ids; None: one slab), else None."""
    if not blocks:
        return None
    start = blocks[0]
    if start < 0 or blocks != list(range(start, start + len(blocks))):
        return None
    if starts is not None and len(starts) > 1:
        if bisect.bisect_right(starts, start) != bisect.bisect_right(starts, start + len(blocks) - 1):
            return None
    return start


def _shared_prefix(manager: BlockManager | _Rows, q_len: int, device: torch.device,
                   starts: list[int] | None = None) -> SharedPrefix | None:
    """Find consecutive, equal-size groups of rows that share leading blocks (as ``generate`` lays out the k
    copies of each prompt), or None when no block is shared."""
    tables, rows = manager.tables, manager.num_rows
    if rows < 2 or not tables[0]:
        return None
    group_size = 1
    while group_size < rows and tables[group_size][:1] == tables[0][:1]:
        group_size += 1
    if group_size == 1 or rows % group_size:
        return None
    # Shared blocks must hold no token of this step (those are written to private blocks anyway).
    shared = (min(manager.lengths) - q_len) // manager.block_size
    groups = [tables[start:start + group_size] for start in range(0, rows, group_size)]
    for group in groups:
        first = group[0]
        for table in group[1:]:
            if table[:shared] != first[:shared]:  # compared in C; the first difference is looked up only then
                shared = next(i for i, (a, b) in enumerate(zip(table[:shared], first[:shared], strict=True)) if a != b)
    if shared == 0:
        return None
    prefixes = [group[0][:shared] for group in groups]
    width = max(len(table) for table in tables) - shared
    tails = [table[shared:] + [0] * (width - len(table) + shared) for table in tables]
    return SharedPrefix(
        group_size=group_size,
        prefix_blocks=torch.tensor(prefixes, dtype=torch.int32).to(device).clamp_min_(0),
        prefix_start=_consecutive_start(prefixes[0], starts) if len(prefixes) == 1 else None,
        tail_tables=torch.tensor(tails, dtype=torch.int32).to(device).clamp_min_(0),
        prefix_len=shared * manager.block_size,
    )
