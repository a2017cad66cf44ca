"""`LayerGroup`: attention layers of one kind that share block tables, and how a forward step begins for them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import backend, kinds, ops
from .block_manager import BlockManager
from .kinds import AttentionKind
from .kv_pool import KVPool, device_pools
from .step import StepBuffer, StepPlan, build_step, draft_step, table_tensor

__all__ = ["LayerGroup", "RowPlan", "group_specs"]

# A growable pool grows by at least 1/_SLAB_FRACTION of what it holds (see `KVPool`): few slabs.
SLAB_FRACTION = 16


@dataclass(frozen=True)
class RowPlan:
    """What the cache knows about its rows for the coming step (`LayerGroup.begin_step`).

    Attributes:
        ended: per row, whether it has ended (`PagedCache.end_rows`), or None when none has.
        starts: for rows the step adds, each one's first real token (`PagedCache.set_row_starts`), or None.
        recording: past steps are kept for a rollback (`PagedCache.activate_past_recording`).
        forks: the rows each row of the coming steps becomes (`PagedCache.expect_forks`).
        max_length: the most tokens a row will hold in this call (`PagedCache.expect_length`), or None.
        left_padding: the step's attention masks pad each row exactly before its live start
            (`PagedCache.expect_left_padding`): the plan carries each row's first key (`StepPlan.key_starts`).
    """

    ended: list[bool] | None = None
    starts: list[int] | None = None
    recording: bool = False
    forks: int = 1
    max_length: int | None = None
    left_padding: bool = False


@dataclass(eq=False)
class LayerGroup:
    """Attention layers of one `hf_paged.kinds.AttentionKind` that share block tables: all full-attention (and
    chunked) layers, all latent layers, or all layers of one sliding window.

    Every group holds the same rows at the same lengths; a kind that `releases` gives back the blocks that fell
    wholly out of reach (`begin_step`). Each group has its own pools (one per device-map entry, sharing the first
    one's block ids) and `BlockManager`, and builds its own step plan.

    Attributes:
        kind: the layers' kind.
        pool: the first pool, which owns the block ids.
        pools: every pool of the group (``pool`` first).
        places: per layer of the group (its index in the model), its pool and its index there.
    """

    kind: AttentionKind
    pool: KVPool
    manager: BlockManager
    pools: list[KVPool]
    places: dict[int, tuple[KVPool, int]] = field(default_factory=dict)
    step: StepPlan | None = None
    step_layers: set = field(default_factory=set)
    device_steps: dict = field(default_factory=dict)
    lengths_before: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    left_padding: bool = False
    _drafts: dict = field(default_factory=dict)
    began: int = -1  # the cache's count of steps when this group last began one (`PagedCache._begin_step`)

    @property
    def window(self) -> int | None:
        """The sliding window the group keeps (None: every key); what prefix-cache pools are keyed by."""
        return self.kind.window

    @property
    def bytes_per_block(self) -> int:
        return sum(pool.bytes_per_block for pool in self.pools)

    def begin_step(self, batch: int, q_len: int, rows: RowPlan, buffers: dict | None = None) -> None:
        """Reserve slots for ``q_len`` new tokens in every row and lay the step's plan out, on the device of each of
        the group's pools, in `buffers` (device -> `hf_paged.step.StepBuffer`, shared by the groups beginning the
        step, then sent and given to `finish_step`); without `buffers` the plan is sent at once.

        What the step takes: a slot for every new token at or past the row's live start, which is its first real
        token (left padding takes no block) and, where the kind releases keys, the first key the step's first query
        still sees (blocks wholly before it are released first). A multi-token step of a sliding window whose first
        tokens are out of the window by its end stores only its last ``window - 1`` tokens: its attention reads the
        kept keys gathered beforehand (`StepPlan.context`) and the step's own keys as they are.
        """
        manager = self.manager
        new_rows = manager.num_rows == 0
        if not new_rows and manager.num_rows != batch:
            raise ValueError(
                f"hf_paged: the cache holds {manager.num_rows} sequences but the model was called with a batch of "
                f"{batch}. Pass a batch of the same size, or reset the cache (cache.reset()) to start over."
            )
        if new_rows:
            manager.add_rows(batch)
        ended = rows.ended if rows.ended is not None and len(rows.ended) == manager.num_rows else None
        lengths_before = list(manager.lengths)
        live = None
        if new_rows and rows.starts is not None and len(rows.starts) == batch:
            live = list(rows.starts)
        if ended is not None:  # an ended row of its own blocks gives them back, all but the one it writes into
            private = manager.private_rows(ended)
            if any(private):
                base = manager.live_from if live is None else live
                live = [length if mine else start for start, length, mine in zip(base, lengths_before, private,
                                                                                   strict=True)]
        context, partial = None, False
        if self.kind.releases(rows.recording):
            seen = [self.kind.first_seen(length) for length in lengths_before]  # what the first query sees
            kept = [self.kind.first_seen(length + q_len) for length in lengths_before]  # kept after the step
            # Rows of one length (as generate's) can keep only a step's last tokens: its attention reads the rest.
            # A prefix-cache pool (shared) stores every prompt token, so that its full blocks can be indexed.
            partial = (q_len > 1 and len(set(lengths_before)) == 1 and kept[0] > lengths_before[0]
                       and not self.pool.shared)
            if partial:
                if lengths_before[0] > 0:
                    context = self._gather_context(seen, lengths_before)
                target = kept
            else:
                target = seen
            live = target if live is None else [max(a, b) for a, b in zip(live, target, strict=True)]
        try:
            needed = manager.blocks_needed(q_len, ended, live)
            grows = needed > self.pool.blocks.num_free
            self.pool.ensure_free(needed, slack=self._slack(lengths_before, q_len, ended, rows) if grows else 0)
            for pool in self.pools[1:]:
                self.grow_to_first(pool)
            # The PyTorch path reads keys through views: rows laid out contiguously read in place (`StepPlan.row_stride`).
            contiguous = self.pool.device is not None and not backend.use_triton(self.pool.device)
            copies = manager.append(q_len, ended, live, contiguous=contiguous)
        except BaseException:
            if new_rows:
                manager.reset()
            raise
        self.copies, self.left_padding, self.lengths_before = copies, rows.left_padding, lengths_before
        self.step, self.step_layers, self.device_steps = None, set(), {}
        own = buffers is None
        buffers = {} if own else buffers
        fresh = {} if partial else None
        self._drafts = {}
        for device in dict.fromkeys(pool.device for pool in self.pools if pool.tensor is not None):
            buffer = buffers.setdefault(device, StepBuffer())
            self._drafts[device] = (draft_step(manager, lengths_before, q_len, buffer, backend.use_triton(device),
                                               self.kind.trims, fresh, context, self.pool.starts, copies,
                                               rows.left_padding), buffer)
        if own:
            self.finish_step({device: buffer.send(device) for device, buffer in buffers.items()})

    def finish_step(self, sent: dict) -> None:
        """Take the step's plans from what `begin_step` laid out, once sent (`sent`: device -> the buffer's
        tensors on it), and make the step's copy-on-write copies with them."""
        drafts, self._drafts = self._drafts, {}
        self.device_steps = {device: finish(sent[device]) for device, (finish, _) in drafts.items()}
        self.step = self.device_steps[self.pool.device]
        if self.copies:  # with the step's tables: the copies' block ids came in the same host-to-device copy
            src, dst = (list(ids) for ids in zip(*self.copies, strict=True))
            for pool in self.pools:
                if pool.tensor is not None:
                    plan = self.step_on(pool.device)
                    pool.copy_blocks(src, dst, plan.copies, plan.triton)

    def _slack(self, lengths_before: list[int], q_len: int, ended: list[bool] | None, rows: RowPlan) -> int:
        """The blocks of slack a growing pool adds beyond what a step misses (see `KVPool`): per row that takes
        blocks as decoding goes on (the step's rows not ended, each forked ``rows.forks`` ways right after it), the
        kind's `slack_per_row`, and at least 1/`SLAB_FRACTION` of the pool; but never more than those rows can
        still take before ``rows.max_length``."""
        manager, bs = self.manager, self.manager.block_size
        growing = [row for row in range(manager.num_rows) if ended is None or not ended[row]]
        per_row = self.kind.slack_per_row(sum(lengths_before) + q_len * len(lengths_before), len(lengths_before), bs,
                                          rows.recording)
        slack = max(per_row * max(len(growing) * rows.forks, 1), self.pool.num_blocks // SLAB_FRACTION)
        if rows.max_length is None:
            return slack
        # After the step a row can still take the blocks up to max_length's, and a fork its partial block's copy.
        reach, left = -(-rows.max_length // bs), 0
        for row in growing:
            length = lengths_before[row] + q_len
            left += max(reach - -(-length // bs) + (rows.forks > 1 and length % bs > 0), 0)
        return min(slack, left * rows.forks)

    def _gather_context(self, start: list[int], end: list[int]):
        """Per layer of the group, keys and values ``[B, H, n, D]`` of positions ``[min(start), max(end))``: what a
        sliding-window step that keeps only its last tokens reads besides them (``(first position, per layer)``)."""
        first, last = min(start), max(end)
        bs = self.manager.block_size
        tables = [table[first // bs:-(-last // bs)] for table in self.manager.tables]
        offset = first % bs
        per_device: dict[torch.device, torch.Tensor] = {}  # the tables once per device, not once per layer
        gathered = {}
        for layer, (pool, slot) in self.places.items():
            if pool.tensor is None:
                continue
            device = pool.tensor.device
            if device not in per_device:
                per_device[device] = table_tensor(tables, device).clamp_min_(0)
            gathered[layer] = tuple(
                ops.gather_kv(store, per_device[device], offset + last - first)[:, :, offset:]
                for store in pool.plain[slot])
        return first, gathered

    def step_on(self, device: torch.device) -> StepPlan:
        """This step's plan with its tensors on `device` (built from the same block tables, once per device)."""
        step = self.device_steps.get(device)
        if step is None:
            # One `fresh` dict: a layer's update and attention may see different devices.
            step = build_step(self.manager, self.lengths_before, self.step.q_len, device, backend.use_triton(device),
                              self.kind.trims, self.step.fresh, self.step.context, self.pool.starts, None,
                              self.left_padding)
            self.device_steps[device] = step
        return step

    def grow_to_first(self, pool: KVPool) -> None:
        """Give `pool` as many blocks as the group's first pool: the block ids are shared, so every pool holds all."""
        if pool is not self.pool and pool.tensor is not None and pool.num_blocks < self.pool.blocks.num_blocks:
            pool.follow(self.pool.starts, self.pool.blocks.num_blocks)

    def release_unseen(self, length: int) -> None:
        """After a rollback to `length` tokens, keep only what the kind keeps (as Transformers' sliding-window layers
        do after a crop)."""
        if self.kind.drops_keys and self.manager.num_rows:
            self.manager.release_before([self.kind.first_seen(length)] * self.manager.num_rows)

    def released_before(self, length: int) -> bool:
        """Whether some row has released keys a row of `length` tokens would still need."""
        return self.kind.drops_keys and any(live > self.kind.first_seen(length) for live in self.manager.live_from)

    def end(self) -> None:
        """Forget the step (rows were reordered, cropped or reset)."""
        self.step, self.step_layers, self.device_steps = None, set(), {}


def group_specs(plan: list[kinds.LayerKind], block_size: int, num_blocks: int | None, max_memory: int | None,
                device, dtype: torch.dtype | None, pools: dict[int | None, KVPool] | None,
                layer_devices: list | tuple | None) -> list[tuple]:
    """Per layer group of a cache with these layers, ``(kind, first pool, its attention layers (indices among the
    attention layers), per such layer (its pool, its index there))``: the pools given (`pools`, keyed by window), one
    per device-map entry (`layer_devices`), or a new one sized by `num_blocks` or its share of `max_memory`."""
    attention_layers = [layer for layer, kind in enumerate(plan) if kind.attention is not None]
    # Layers of one kind share block tables (`LayerGroup`): full attention (chunked layers with it), each sliding
    # window, the latents of multi-head latent attention; one shared pool holds every layer in one group.
    group_of = [kinds.group_kind(plan[layer].attention) for layer in attention_layers]
    group_kinds = sorted(set(group_of), key=lambda kind: -1 if kind.window is None else kind.window)
    if pools is not None and attention_layers:
        expected = {kind.window: group_of.count(kind) for kind in group_kinds}
        given = {window: p.num_layers for window, p in pools.items()}
        if given != expected:
            raise ValueError(
                f"hf_paged: the shared pools given to this PagedCache hold {given} layers per window, but this "
                f"config's attention layers need {expected} (window: layers). Build the pools for this model's "
                "config (hf_paged.enable_prefix_caching(model) does)."
            )
    specs = []
    for kind in group_kinds:
        members = [i for i, k in enumerate(group_of) if k == kind]
        if layer_devices is not None:
            first, slot_pools = device_pools([layer_devices[attention_layers[i]] for i in members], block_size,
                                             num_blocks, dtype)
        else:
            budget = None if max_memory is None else max(max_memory * len(members) // len(attention_layers), 1)
            first = pools[kind.window] if pools is not None else KVPool(
                len(members), block_size, num_blocks, budget,
                torch.device(device) if device is not None else None, dtype)
            slot_pools = [(first, slot) for slot in range(len(members))]
        specs.append((kind, first, members, slot_pools))
    return specs
