"""The step plan: how one forward step of a layer group reads and writes its blocks.

Built once per step and device from the group's `BlockManager` (`draft_step`, `build_step`): the block tables,
lengths and slot mapping (and each row's first key, the copy-on-write copies, the shared-prefix tables) of every
layer group beginning the step are laid out in one flat int32 host buffer per device (`StepBuffer`, pinned for a
CUDA device) and sent with one non-blocking copy, then read as views of the device copy; the backend (`StepPlan.triton`); and the read plan (a block range read in place, one range per slab, blocks
shared by groups of rows, or a gather). Every layer of the group reads the same plan; masks built from it are
memoised on it (`StepPlan.memo`, `hf_paged.masks`). `read_path` is the one place that picks, per layer, how its
attention reads the keys; `LayerRead` is what the cache hands that attention.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .block_manager import NULL_BLOCK, BlockManager

__all__ = ["READ_PLANS", "LayerRead", "SharedPrefix", "StepBuffer", "StepPlan", "build_step", "draft_step",
           "padded_tables", "read_path", "read_plan", "table_tensor"]

# On the PyTorch path a step reads all rows' keys as one block range (`ops.range_attention`) when the range holds
# at most `_RANGE_EXTRA_KEYS` keys (or a quarter of the longest row, if more) beyond the longest row's: every
# query scores those other rows' keys for nothing, which costs less than the gathers, the second attention call
# and the merge of `ops.shared_prefix_attention` up to about that many keys (measured on SmolLM2-135M, 8 rows).
# Only for steps of at most `_RANGE_MAX_QUERIES` new tokens per row (decoding, assisted decoding; not prefill).
_RANGE_EXTRA_KEYS = 1024
_RANGE_MAX_QUERIES = 16
# With a pool of several slabs, a block range is planned per slab holding some row's blocks, each read in place, and
# the partial attentions merged by log-sum-exp; beyond this many slabs in one step, the keys are gathered instead.
_RANGE_MAX_SLABS = 8
# A single row whose blocks lie in several slabs, consecutive inside each (it grew past its prompt's slab), is read
# by concatenating its spans (one copy of its keys and values, `ops.gather_kv`) while that copy is at most this many
# bytes, and else one range per slab merged by log-sum-exp (`ops.ranges_attention`, which copies nothing but costs
# two attentions and a merge): on one CPU thread the copy is cheaper up to about 600 KB of keys and values per layer
# (SmolLM2's 3 x 64 fp32 heads: 256 keys 119 us vs 184 us, 1024 keys 411 us vs 282 us; a 2 x 16 head tiny Llama's
# 88 keys 52 us vs 175 us).
SPAN_COPY_BYTES = 512 * 1024
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
    prefix, or a gather; `read_path`).

    Attributes:
        block_tables: ``[B, nb]`` int32.
        seq_lens: ``[B]`` int32, lengths including this step's tokens.
        slot_mapping: ``[B * q]`` where each new token is written (int32 on the Triton path, int64 on PyTorch's).
        q_len: query tokens per row in this step.
        max_seq_len: ``max(seq_lens)`` as a Python int.
        block_size: tokens per block.
        triton: whether this step's paged operations run the Triton kernels (`hf_paged.backend.use_triton`), chosen once
            per step and device; every paged op of the step (write, copy, attend) follows it.
        shared: how rows share leading blocks (beams, samples of one prompt), or None; planned whenever
            `block_range` and `row_stride` are None (always so on the Triton path, which plans neither).
        first_block: with a single row whose blocks are consecutive, the first one (keys are read in place).
        row_stride: on the PyTorch path, with several rows whose blocks lie at one stride from each other's (entry
            ``i`` of row ``r`` is block ``first + r * stride + i``, null entries aside; laid out so by
            `BlockManager.append`'s ``contiguous``), ``(first, stride)``: every row's keys are read in place as one
            strided view. Else None.
        spans: a single row whose blocks lie in several slabs, consecutive inside each: per slab ``(first block,
            count)`` in the row's order (read in place and concatenated, see `SPAN_COPY_BYTES`), else None.
        block_range: ``(first_block, num_blocks)``, a block range holding every row's blocks and not much else (see
            `_RANGE_EXTRA_KEYS`), or None.
        skips: some new token is not stored (its slot is -1): left padding, or keys out of a sliding window.
        stored: with `skips`, ``[T']`` long, the new tokens that are stored (the PyTorch path writes only those),
            else None.
        key_offset: positions the tables and lengths start at: every row's first ``key_offset / block_size``
            blocks hold only dead tokens (left padding, keys out of a sliding window), so they are left out. Key
            ``j`` of the tables is token ``key_offset + j`` of the row; masks indexed by token are cut to match.
        fresh: for a step that stores only its last tokens (a sliding-window prefill): per layer, the keys and
            values it was given, read by its attention (`PagedCache.attention_inputs`); else None.
        context: with `fresh`, ``(first position, per layer the kept keys and values from there)`` gathered before
            the step, or None when the rows held nothing.
        kv_start: with `fresh`, the position of the first key its attention reads (kept or new).
        block_ranges: with a pool of several slabs, one such range per slab holding some row's blocks (each inside one
            slab; together compact), whose partial attentions are merged (`ops.ranges_attention`), or None. Also
            planned for a single row whose blocks cross a slab boundary.
        first_entries: ``[B]`` long, each row's first table entry that is not null, when some are (block-range masks
            skip null entries), else None.
        lengths: ``seq_lens`` on the host (a list).
        key_starts: when the attention masks of the step pad each row exactly before its live start (the masks
            ``generate`` builds, `PagedCache.expect_left_padding`): ``[B]`` int32, each row's first key (its live
            start, from `key_offset`), read instead of the mask; else None.
        host_key_starts: `key_starts` on the host (a list), or None.
        copies: ``(src, dst)`` int32 ``[C]``, this step's copy-on-write copies on this device, or None.
        workspace: the Triton attention kernels' scratch tensors, used again by every layer of the step (its layers
            run on one stream): the kernels' ``workspace``.
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
    row_stride: tuple[int, int] | None = None
    spans: tuple[tuple[int, int], ...] | None = None
    block_range: tuple[int, int] | None = None
    block_ranges: tuple[tuple[int, int], ...] | None = None
    first_entries: torch.Tensor | None = None
    skips: bool = False
    stored: torch.Tensor | None = None
    key_offset: int = 0
    fresh: dict | None = None
    context: tuple | None = None
    kv_start: int = 0
    lengths: list[int] = field(default_factory=list)
    key_starts: torch.Tensor | None = None
    host_key_starts: list[int] | None = None
    copies: tuple[torch.Tensor, torch.Tensor] | None = None
    workspace: dict = field(default_factory=dict)
    _memo: dict = field(default_factory=dict)

    def memo(self, key: tuple, compute):
        """``compute()``, once per step for `key` (masks every layer of the step shares, `hf_paged.masks`)."""
        found = self._memo.get(key)
        if found is None and key not in self._memo:
            found = self._memo[key] = compute()
        return found

    def last_queries(self, q_len: int) -> StepPlan:
        """This step as seen by its last `q_len` queries only (Gemma 4's KV-shared layers in a prefill): the same
        tables and keys, masks for `q_len` queries (built once per step)."""
        return self.memo(("last_queries", q_len), lambda: dataclasses.replace(self, q_len=q_len, _memo={}))


def read_plan() -> str:
    """Which read plans a step may take, from the environment variable ``HF_PAGED_READ_PLAN`` (read once per step,
    as ``HF_PAGED_BACKEND`` is; the tokens are the same on every plan, only the work differs):

    * ``auto`` (or unset): the fastest plan that applies (on the PyTorch path rows at one stride read as one view,
      else a block range read in place when the rows' blocks are compact, else the shared prefix read once, else
      a gather).
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


class LayerRead(NamedTuple):
    """What the attention of one layer reads in one step, in one answer (`PagedCache.attention_inputs`).

    Attributes:
        plan: the step's plan on the layer's device.
        keys, values: the layer's key and value stores (``[N, bs, Hkv, D]`` views, or layer stores of several slabs).
        fresh: for a step that stores only its last tokens (``plan.fresh`` set): ``(kept keys, kept values, the
            step's keys, the step's values)``, the kept ones ``[B, H, n, D]`` from position ``plan.kv_start`` on
            (None when the rows held nothing before), the step's own ``[B, H, q, D]`` as given; else None.
        cache_window: the window Transformers' own `DynamicCache` keeps for this layer (`masks.cache_windows`), or
            None.
        latent: the stores hold the latents of multi-head latent attention (`hf_paged.latent`).
        same_width: the values are as wide as the keys.
        token_bytes: bytes of one token's key and value.
        pool, slot: the layer's `hf_paged.kv_pool.KVPool` and its index there (the step's rows read in place for
            all its layers at once, `KVPool.rows_in_place`), or None.
    """

    plan: StepPlan
    keys: Any
    values: Any
    fresh: tuple | None = None
    cache_window: int | None = None
    latent: bool = False
    same_width: bool = True
    token_bytes: int = 0
    pool: Any = None
    slot: int = 0


def read_path(plan: StepPlan, *, full_mask: bool, left_padding: bool, groups_padded_alike: bool,
              sliding_window: int | None, chunk_size: int | None, sinks: bool, same_width: bool,
              token_bytes: int = 0, latent: bool = False) -> str:
    """How a layer's attention reads its keys this step, decided once per step and kind of layer (memoised):

    * ``"fresh"``: a step that stores only its last tokens attends over the kept keys and its own;
    * ``"latent"``: cached latents of multi-head latent attention (`hf_paged.latent.attention`, which absorbs the
      weights or expands the latents);
    * ``"triton"``: the paged kernel (`hf_paged.kernels.paged_attention`);
    * ``"triton_shared"``: the shared-prefix kernel (rows sharing blocks read them once per group);
    * ``"spans"``: a single row's blocks, one span per slab, concatenated (while small: `SPAN_COPY_BYTES`);
    * ``"gather"`` with the step's `StepPlan.row_stride`: rows at one stride, read in place as one view;
    * ``"range"`` / ``"ranges"``: one block range read in place (several: one per slab, merged);
    * ``"shared"``: the shared blocks once per group of rows, each row's tail, merged (PyTorch);
    * ``"gather"``: each row's keys gathered, then ordinary attention (any mask).

    Args:
        full_mask: the attention got a 4-D mask (a pattern hf_paged does not describe): gathered keys.
        left_padding: the key padding is none or pure left padding (the kernels' ``key_start``).
        groups_padded_alike: the rows of each group that shares a prefix are padded alike inside it.
        sliding_window, chunk_size: the layer's window and chunk (None: none, or wider than every row).
        sinks: the layer has attention sinks.
        same_width: values as wide as keys (the shared-prefix kernel needs it).
        token_bytes: bytes of one token's key and value (what concatenating spans copies).
        latent: the layer caches latents (multi-head latent attention).
    """
    return plan.memo(("read_path", full_mask, left_padding, groups_padded_alike, sliding_window, chunk_size, sinks,
                      same_width, token_bytes, latent),
                     lambda: _read_path(plan, full_mask, left_padding, groups_padded_alike, sliding_window, chunk_size,
                                        sinks, same_width, token_bytes, latent))


def _read_path(plan, full_mask, left_padding, groups_padded_alike, sliding_window, chunk_size, sinks,
               same_width, token_bytes, latent) -> str:
    if plan.fresh is not None:
        return "fresh"
    if latent:
        return "latent"
    if full_mask:
        return "gather"
    if plan.triton:
        if not left_padding:
            return "gather"
        if plan.shared is not None and not sinks and chunk_size is None and same_width:
            return "triton_shared"
        return "triton"
    if plan.row_stride is not None:  # `ops.gather_kv` reads the rows in place (latents keep their block ranges)
        return "gather"
    if plan.block_range is not None:
        return "range"
    if plan.spans is not None and plan.max_seq_len * token_bytes <= SPAN_COPY_BYTES:
        return "spans"
    if plan.block_ranges is not None:
        return "ranges"
    if plan.shared is not None and sliding_window is None and chunk_size is None and groups_padded_alike:
        return "shared"
    return "gather"


def padded_tables(manager, device: torch.device) -> torch.Tensor:
    """The rows' block tables as one ``[B, nb]`` int32 tensor on `device` (short rows padded with block 0; null
    entries, which only dead tokens occupy, read block 0 too)."""
    return table_tensor(manager.tables, device).clamp_min_(0)


def table_tensor(tables: list[list[int]], device: torch.device | None) -> torch.Tensor:
    """``[B, nb]`` int32 on `device` (None: the host), short rows padded with 0, null entries (`NULL_BLOCK`) kept."""
    width = max((len(table) for table in tables), default=0)
    table = torch.tensor([table + [0] * (width - len(table)) for table in tables],
                         dtype=torch.int32).reshape(len(tables), width)
    return table if device is None else table.to(device)


@dataclass
class _Rows:
    """The rows' tables and lengths as a step reads them: without the leading blocks no row needs."""

    tables: list[list[int]]
    lengths: list[int]
    block_size: int

    @property
    def num_rows(self) -> int:
        return len(self.tables)


class StepBuffer:
    """Host int32 parts laid end to end, sent to one device in one copy (`send`), then read back as views: what the
    layer groups beginning a step on that device share (`draft_step`)."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []

    def add(self, part: torch.Tensor) -> int:
        """Append `part` (any integer host tensor); returns its index for `view`."""
        self.parts.append(part.to(torch.int32).reshape(-1) if part.dtype != torch.int32 else part.reshape(-1))
        return len(self.parts) - 1

    def send(self, device: torch.device) -> list[torch.Tensor]:
        """Every part on `device`: one flat host buffer (pinned for CUDA, from PyTorch's caching host allocator,
        which keeps a block until the copies that read it have run), one non-blocking copy, views."""
        total = sum(part.numel() for part in self.parts)
        host = torch.empty(total, dtype=torch.int32, pin_memory=device.type == "cuda")
        torch.cat(self.parts, out=host)
        flat = host.to(device, non_blocking=True)
        return list(flat.split([part.numel() for part in self.parts]))


def build_step(manager: BlockManager, lengths_before: list[int], q_len: int, device: torch.device,
               triton: bool = False, trim: bool = True, fresh: dict | None = None, context=None,
               starts: list[int] | None = None, copies: list[tuple[int, int]] | None = None,
               follows_rows: bool = False) -> StepPlan:
    """This step's plan on `device` for one layer group alone, its tensors sent in one copy (`draft_step`)."""
    buffer = StepBuffer()
    finish = draft_step(manager, lengths_before, q_len, buffer, triton, trim, fresh, context, starts, copies,
                        follows_rows)
    return finish(buffer.send(device))


def draft_step(manager: BlockManager, lengths_before: list[int], q_len: int, buffer: StepBuffer,
               triton: bool = False, trim: bool = True, fresh: dict | None = None, context=None,
               starts: list[int] | None = None, copies: list[tuple[int, int]] | None = None,
               follows_rows: bool = False):
    """Lay this step's tensors out in `buffer` (host work only) and return ``finish(sent) -> StepPlan``, to call
    with ``buffer.send(device)`` once every group beginning the step has added its own.

    `triton`: the step's backend on that device (`hf_paged.backend.use_triton`); `trim` leaves out the leading
    blocks no row needs; `fresh` / `context` as in `StepPlan` (`fresh`: the dict the step's layers fill, shared by
    the plans of every device); `starts`: the first block id of each of the pool's slabs (None: one slab);
    `copies`: the step's copy-on-write ``(src, dst)`` block pairs; `follows_rows`: the step's masks pad each row
    exactly before its live start (`StepPlan.key_starts`)."""
    bs = manager.block_size
    first = manager.first_live_block() if trim and manager.num_rows else 0
    if first:  # keep at least each row's last entry (a row all of dead tokens, e.g. an empty prompt)
        first = max(min(first, min(len(table) for table in manager.tables) - 1), 0)
    offset = first * bs
    rows = _Rows([table[first:] for table in manager.tables] if first else manager.tables,
                 [length - offset for length in manager.lengths] if first else list(manager.lengths), bs)
    live = manager.live_from
    raw = table_tensor(rows.tables, None)
    # A row's entries before its live start's block are null (`BlockManager`): count them instead of scanning.
    leading_nulls = [min(start // bs, len(table) + first) - first for start, table in zip(live, rows.tables, strict=True)]
    has_null = any(count > 0 for count in leading_nulls)
    tables_at = buffer.add(raw.clamp_min(0) if has_null else raw)
    lengths_at = buffer.add(torch.tensor(rows.lengths, dtype=torch.int32))
    slots, skips, stored = _slots(rows.tables, raw, lengths_before, live, offset, q_len, bs)
    slots_at = buffer.add(slots)
    stored_at = buffer.add(stored) if stored is not None and not triton else None
    host_key_starts = [max(start - offset, 0) for start in live] if follows_rows else None
    key_starts_at = buffer.add(torch.tensor(host_key_starts, dtype=torch.int32)) if follows_rows else None
    max_seq_len = max(rows.lengths)
    choice = read_plan()
    starts = starts or [0]
    first_block = _consecutive_start(rows.tables[0], starts) if rows.num_rows == 1 else None
    spans = None
    if not triton and rows.num_rows == 1 and first_block is None and len(starts) > 1 and not has_null:
        spans = _spans(rows.tables[0], starts)
    row_stride = None
    if not triton and rows.num_rows > 1 and len(starts) == 1 and choice == "auto":
        row_stride = _row_stride(rows.tables, leading_nulls, manager.pool.num_blocks)
    block_range = block_ranges = None
    if not triton and choice == "auto" and q_len <= _RANGE_MAX_QUERIES and (
            rows.num_rows > 1 or (len(starts) > 1 and first_block is None)):
        planned = _block_ranges(rows.tables, max_seq_len, bs, starts)
        if planned is not None and len(planned) == 1 and rows.num_rows > 1:
            block_range = planned[0]
        elif planned is not None and len(planned) > 1:
            block_ranges = tuple(planned)
    # Null entries (blocks of dead tokens) hold block 0 in the tensors: the block-range masks must skip them.
    entries_at = buffer.add(torch.tensor(leading_nulls)) if (block_range or block_ranges) and has_null else None
    shared = None
    if block_range is None and block_ranges is None and row_stride is None and choice != "gather":
        shared = _shared_prefix(rows, q_len, starts)
    if shared is not None:
        prefix_at, tail_at = buffer.add(shared[1]), buffer.add(shared[3])
    copies_at = buffer.add(torch.tensor(copies, dtype=torch.int32).t()) if copies else None
    kv_start = context[0] if context is not None else min(lengths_before, default=0)

    def finish(sent: list[torch.Tensor]) -> StepPlan:
        return StepPlan(
            block_tables=sent[tables_at].view(raw.shape),
            seq_lens=sent[lengths_at],
            slot_mapping=sent[slots_at] if triton else sent[slots_at].long(),
            q_len=q_len,
            max_seq_len=max_seq_len,
            block_size=bs,
            triton=triton,
            shared=None if shared is None else SharedPrefix(
                group_size=shared[0], prefix_blocks=sent[prefix_at].view(shared[1].shape), prefix_start=shared[2],
                tail_tables=sent[tail_at].view(shared[3].shape), prefix_len=shared[4]),
            first_block=first_block,
            row_stride=row_stride,
            spans=spans,
            block_range=block_range,
            block_ranges=block_ranges,
            first_entries=None if entries_at is None else sent[entries_at].long(),
            skips=skips,
            stored=None if stored_at is None else sent[stored_at].long(),
            key_offset=offset,
            fresh=fresh,
            context=context,
            kv_start=kv_start,
            lengths=rows.lengths,
            key_starts=None if key_starts_at is None else sent[key_starts_at],
            host_key_starts=host_key_starts,
            copies=None if copies_at is None else tuple(sent[copies_at].view(2, -1)),
        )

    return finish


def _slots(tables: list[list[int]], raw: torch.Tensor, lengths_before: list[int], live: list[int], offset: int, q_len: int,
           bs: int) -> tuple[torch.Tensor, bool, torch.Tensor | None]:
    """On the host: ``(slots [B * q], skips, stored)``: where each new token is written (-1: not stored), whether
    some is not, and then the indices of those that are."""
    skips = any(start > before for start, before in zip(live, lengths_before, strict=True))
    if q_len == 1 and not skips:  # decoding: a Python expression per row
        slots = [table[(before - offset) // bs] * bs + (before - offset) % bs
                 for table, before in zip(tables, lengths_before, strict=True)]
        return torch.tensor(slots, dtype=torch.int32), False, None
    positions = torch.tensor([before - offset for before in lengths_before], dtype=torch.long)[:, None] \
        + torch.arange(q_len)
    # A new token before the step's first block (out of the window already) is not stored: `skips` covers it.
    entries = raw.to(torch.long).gather(1, (positions // bs).clamp_min(0))
    slots = entries * bs + positions % bs
    if not skips:
        return slots.reshape(-1), False, None
    live_starts = torch.tensor([start - offset for start in live], dtype=torch.long)
    slots = torch.where((entries < 0) | (positions < live_starts[:, None]), -1, slots).reshape(-1)
    return slots, True, (slots >= 0).nonzero().reshape(-1)


def _block_ranges(tables: list[list[int]], max_seq_len: int, block_size: int,
             starts: list[int]) -> list[tuple[int, int]] | None:
    """Per slab holding some row's blocks, ``(first, count)``: the range from the lowest to the highest block the
    rows use there, if all ranges together are compact (see `_RANGE_EXTRA_KEYS`) and few (`_RANGE_MAX_SLABS`).
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
        if len(ranges) > _RANGE_MAX_SLABS:
            return None
    extra = sum(count for _, count in ranges) * block_size - max_seq_len
    return ranges if extra <= max(_RANGE_EXTRA_KEYS, max_seq_len // 4) else None


def _spans(blocks: list[int], starts: list[int]) -> tuple[tuple[int, int], ...] | None:
    """``((first, count), ...)``: `blocks` as runs ``b, b + 1, ...`` each inside one slab (`starts`: the slabs'
    first block ids), if there are at most `_RANGE_MAX_SLABS` of them, else None. Each run is compared as a whole
    (in C); a block breaking it is looked for only then."""
    runs, index = [], 0
    while index < len(blocks):
        if len(runs) == _RANGE_MAX_SLABS:
            return None
        first = blocks[index]
        slab = bisect.bisect_right(starts, first)
        end = starts[slab] if slab < len(starts) else first + len(blocks)  # the slab's last block + 1
        count = min(len(blocks) - index, end - first)
        if blocks[index:index + count] != list(range(first, first + count)):
            count = next(i for i in range(1, count) if blocks[index + i] != first + i)
        runs.append((first, count))
        index += count
    return tuple(runs)


def _row_stride(tables: list[list[int]], leading_nulls: list[int], num_blocks: int) -> tuple[int, int] | None:
    """``(first, stride)`` when entry ``i`` of row ``r`` is block ``first + r * stride + i`` for every entry past its
    `leading_nulls` (the rows read as one strided view of the pool's blocks, `StepPlan.row_stride`) and every row's
    view lies inside the pool's `num_blocks`, else None."""
    bases = []
    for table, nulls in zip(tables, leading_nulls, strict=True):
        if nulls >= len(table):  # a row of dead tokens only
            return None
        base = table[nulls] - nulls
        if table[nulls:] != list(range(base + nulls, base + len(table))):
            return None
        bases.append(base)
    first, stride = bases[0], bases[1] - bases[0]
    if first < 0 or stride < 0 or any(base != first + row * stride for row, base in enumerate(bases)):
        return None
    if bases[-1] + max(len(table) for table in tables) > num_blocks:
        return None
    return first, stride


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


def _shared_prefix(manager: BlockManager | _Rows, q_len: int, starts: list[int] | None = None) -> tuple | None:
    """Find consecutive, equal-size groups of rows that share leading blocks (as ``generate`` lays out the k
    copies of each prompt): ``(group size, prefix blocks [G, F], the first of them when one group's are
    consecutive, tail tables [B, nt], prefix length)`` (host int32 tensors, null entries as block 0, for
    `SharedPrefix`), or None when no block is shared."""
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
    return (group_size, torch.tensor(prefixes, dtype=torch.int32).clamp_min_(0),
            _consecutive_start(prefixes[0], starts) if len(prefixes) == 1 else None,
            torch.tensor(tails, dtype=torch.int32).clamp_min_(0), shared * manager.block_size)
