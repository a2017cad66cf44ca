"""`PagedCache`: a `transformers.Cache` whose keys and values live in fixed-size blocks addressed by block tables.

This module keeps the `Cache` API and the rows' lifecycle (adding, forking, reordering, cropping, ending and
forgetting rows); what each layer keeps is its kind's (`hf_paged.kinds`), the blocks are its group's
(`hf_paged.groups`), the storage its pool's (`hf_paged.kv_pool`), and a step's plan `hf_paged.step`'s.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from transformers.cache_utils import Cache

from . import compat, kinds, latent, masks, options, support
from .block_manager import BlockManager
from .compat import LinearAttentionCacheLayerMixin, LinearAttentionLayer
from .groups import LayerGroup, RowPlan, group_specs
from .guard import place_of
from .kv_pool import KVPool
from .layers import KVSharedLayer, PagedHybridLayer, PagedLayer, copy_states, select_states, state_layers
from .stats import CacheStats, summarize
from .step import LayerRead

__all__ = ["CacheStats", "PagedCache"]


class PagedCache(Cache):
    """A KV cache held in fixed-size blocks that sequences share by reference.

    Keys and values of all layers of one attention kind live in one pool ``[L, 2, num_blocks, block_size, Hkv, D]``
    with one `BlockManager`, which maps each row of the batch to its blocks (`LayerGroup`). Full-attention (and
    chunked) layers form one group; layers that Transformers' own DynamicCache keeps only a sliding window of form one
    group per window, whose rows keep just the blocks of that window: blocks that fall wholly out of it are released
    as decoding advances, and a long prompt stores only its last ``window - 1`` tokens there. Left padding takes no
    block in any group (`set_row_starts`, which ``generate()`` calls). Rows that descend from a common prefix (beams,
    the ``num_return_sequences`` copies of a prompt) point at the same physical blocks; a shared block is copied only
    when a row writes into it (copy-on-write), so reordering beams never copies keys or values. Assisted decoding
    rolls rows back (`crop`): `activate_past_recording` (which ``generate()`` calls for it) keeps sliding-window keys
    until each crop.

    Sizing rule:
        * ``num_blocks=n``: a fixed pool of ``n`` blocks.
        * ``max_memory=bytes``: a fixed pool of as many blocks as fit in ``bytes`` (keys and values, all layers).
        * neither: the pool grows on demand by adding slabs (nothing stored is copied, nothing reserved ahead), so
          it holds at most one growth quantum beyond what the rows reference (see `KVPool`). A fixed
          pool that cannot hold a step raises `OutOfBlocksError` before anything is written.

    Args:
        config: the model's config (``num_hidden_layers`` is read from its text config).
        block_size: tokens per block (a positive int).
        num_blocks: fixed pool size in blocks.
        max_memory: fixed pool size in bytes (an int, or a string such as ``"512MiB"`` / ``"2GB"``).
        device, dtype: where and how to store keys and values; by default those of the first keys written.
        kv_dtype: ``"int8"`` or ``"float8_e4m3fn"`` (or those torch dtypes) to store keys and values in 8 bits, each
            token's vector of each KV head as 8-bit codes and a float16 scale (`hf_paged.quant`): about a quarter of
            float32's bytes, a half of bfloat16's. Attention decodes them where it reads them. None (default): as
            the model computes them (or as `dtype` says).
        pool: pools to share with other caches (what `enable_prefix_caching` sets up): a dict from each layer
            group's window (None for full attention, as `LayerGroup.window`) to a `KVPool` with that group's layers,
            or one `KVPool` that then holds every attention layer in one group. The sizing arguments must then be
            left unset.
        layer_devices: for a model split across devices (``device_map``), one entry per layer: the device its
            attention runs on, or a ``(name, device)`` pair (`hf_paged.devices.layer_placements`, which
            ``generate()`` passes). Attention layers with equal entries share a pool on that device; all pools share
            one set of block ids and block tables, and each device gets its own copy of a step's metadata.
            ``num_blocks`` sizes every pool; ``max_memory`` and ``device`` cannot be combined with it.
    """


    def __init__(
        self,
        config,
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_memory: int | str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        pool: KVPool | dict[int | None, KVPool] | None = None,
        layer_devices: list | tuple | None = None,
        kv_dtype: torch.dtype | str | None = None,
    ):
        max_memory, dtype = options.sizes(block_size, num_blocks, max_memory, dtype, kv_dtype)
        num_layers = getattr(compat.text_config(config), "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError("hf_paged: PagedCache needs a model config with `num_hidden_layers`.")
        support.check_layer_types(config)
        plan = kinds.plan_layers(config, one_group=isinstance(pool, KVPool))
        attn = getattr(config, "_attn_implementation", None)
        if attn is not None and attn != "hf_paged":
            raise ValueError(
                f"hf_paged: this config uses attn_implementation={attn!r}; a PagedCache only works with models loaded "
                'with attn_implementation="hf_paged" (its attention reads the block tables).'
            )
        attention_layers = sum(kind.attention is not None for kind in plan)
        options.check_placement(num_layers, attention_layers, pool, layer_devices, num_blocks, max_memory, device,
                                dtype)
        specs = group_specs(plan, block_size, num_blocks, max_memory, device, dtype,
                            {None: pool} if isinstance(pool, KVPool) else pool, layer_devices)
        self._init_state(specs, plan)

    def _init_state(self, specs: list, plan: list[kinds.LayerKind]) -> None:
        """Build the groups and layers. `specs`: per group ``(kind, first pool, its attention layers (indices among
        the attention layers), per such layer (its pool, its index there))``."""
        self._plan = plan
        if not specs:  # a model without attention layers: one empty group keeps the bookkeeping uniform
            specs = [(kinds.FullAttention(), KVPool(0, 16), [], [])]
        self.groups = [LayerGroup(kind, first, BlockManager(block_size=first.block_size, pool=first.blocks),
                                  list({id(p): p for p, _ in slot_pools}.values()) or [first])
                       for kind, first, _, slot_pools in specs]
        by_slot: dict[int, tuple[LayerGroup, tuple[KVPool, int]]] = {}
        for group, (_, _, members, slot_pools) in zip(self.groups, specs, strict=True):
            for member, place in zip(members, slot_pools, strict=True):
                by_slot[member] = (group, place)
        layers, slot = [], 0
        for i, kind in enumerate(plan):
            if kind.source is not None:
                layers.append(KVSharedLayer(self, i, kind.source))
            elif kind.attention is None:
                layers.append(LinearAttentionLayer(number_of_states=kind.states))
            else:
                group, place = by_slot[slot]
                group.places[i] = place
                if kind.states is not None:
                    layers.append(PagedHybridLayer(self, i, group, place, slot, kind.states))
                else:
                    layers.append(PagedLayer(self, i, group, place, slot))
                slot += 1
        super().__init__(layers=layers)
        # Per layer, its pool and its index there, and its group (None for layers without a pool). `pools` lists
        # every pool once; `pool` and `manager` are the first group's (the full-attention layers' when there are any).
        self.layer_pools = [getattr(layer, "place", None) for layer in layers]
        self.layer_groups: list[LayerGroup | None] = [getattr(layer, "group", None) for layer in layers]
        self.pools = [pool for group in self.groups for pool in group.pools]
        self.state_layers = state_layers(layers)
        self.pool = self.groups[0].pool  # it owns the block ids (`KVPool.blocks`) the first group's pools share
        self.block_size = self.pool.block_size
        self.manager = self.groups[0].manager
        # Multi-head latent attention caches the compressed latents and the model expands them into keys and values
        # after the cache: those layers get their rows' latents back, gathered out of the blocks.
        self.latent = any(isinstance(kind.attention, kinds.LatentAttention) for kind in plan)
        shared = [group.manager for group in self.groups if group.pool.shared]
        if shared:
            # A shared pool outlives this cache: give the rows' blocks back when the cache is collected.
            weakref.finalize(self, _release_rows, shared)
        self.record_past = False  # `activate_past_recording`: keep sliding-window keys until the next `crop`
        self.peak_used_blocks = 0
        self.peak_used_bytes = 0
        self.prefix_hit_tokens = 0
        self._row_starts: list[int] | None = None  # each new row's first real token (`set_row_starts`)
        self._pending_layer: int | None = None
        self._kv_sources = {layer: kind.source for layer, kind in enumerate(plan) if kind.source is not None}
        self._kv_read = sorted(set(self._kv_sources.values()))  # layers whose keys KV-shared layers read
        self._ended: torch.Tensor | None = None
        self._cache_windows: dict[int, tuple] = {}  # `cache_window`'s memo: id(config) -> (config, windows)
        self._forks = 1  # `expect_forks`: the rows each row of the next steps becomes
        self._max_length: int | None = None  # `expect_length`: the most tokens a row will hold in this call
        self._known_ids: torch.Tensor | None = None  # `note_tokens`: ``[rows, m]`` ids of each row's first m tokens
        self._left_padding = False  # `expect_left_padding`: the masks pad each row exactly before its live start
        self._weak_self = weakref.ref(self)  # what a pool this cache wrote holds (`KVPool.active`)
        self._steps = 0  # forward steps begun (`_begin_step`; `LayerGroup.began`)

    # ---------------------------------------------------------------------------------------- the pool
    @property
    def kv_pool(self) -> torch.Tensor | None:
        """The pool tensor ``[L, 2, N, bs, Hkv, D]`` (None before the first write); for keys and values of different
        widths, the keys' ``[L, 1, N, bs, Hk, Dk]`` (all of them: ``cache.pool.tensors``)."""
        return self.pool.tensor

    @property
    def is_initialized(self) -> bool:
        return self.pool.tensor is not None

    @property
    def max_memory(self) -> int | None:
        """The pool's byte budget, if it was sized by ``max_memory``."""
        return self.pool.max_memory

    @property
    def device(self) -> torch.device | None:
        return self.pool.device

    @property
    def dtype(self) -> torch.dtype | None:
        return self.pool.dtype

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across keys and values of all layers (0 before the pool exists)."""
        return sum(pool.bytes_per_block for pool in self.pools)

    # ------------------------------------------------------------------------------------ Cache API
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``key_states`` / ``value_states`` (``[B, Hkv, q, D]``) for `layer_idx`.

        Returns that layer's key and value pools ``[N, bs, Hkv, D]`` as `PagedPool`: the "hf_paged" attention
        function reads them through this step's block tables; any other attention raises.
        """
        if self._pending_layer is not None:
            pending, self._pending_layer = self._pending_layer, None
            raise RuntimeError(
                f"hf_paged: layer {pending} stored keys in a PagedCache but its attention never read them: the model "
                'does not run attn_implementation="hf_paged". Load it with attn_implementation="hf_paged" (or call '
                'model.set_attn_implementation("hf_paged")) before using a PagedCache.'
            )
        pool, slot = options.write_place(layer_idx, key_states, value_states, self.layer_pools, self._kv_sources)
        group = self.layer_groups[layer_idx]
        if pool.tensor is None:
            pool.allocate(key_states, value_states)
            group.grow_to_first(pool)
        options.check_write(layer_idx, key_states, value_states, pool)
        key_shape, value_shape = key_states.shape, value_states.shape
        if pool.shapes[slot] != (key_shape[1], key_shape[3], value_shape[1], value_shape[3]):  # `KVPool.matches`
            pool.allocate_layer(slot, key_states, value_states)  # a layer of another shape: tensors of its own
        if group.step is None or layer_idx in group.step_layers:
            self._begin_step(group, key_shape[0], key_shape[2])
        group.step_layers.add(layer_idx)
        step = group.step if pool is group.pool else group.step_on(pool.device)
        fresh = pool.write(slot, key_states, value_states, step, rotate=self.rotates(pool))
        if fresh is not None:  # a step that keeps only its last tokens: attention reads them as stored
            step.fresh[layer_idx] = fresh
        if self.latent:  # multi-head latent attention: each row's latents, or the pools once absorbed (latent.py)
            gathered = latent.gathered_latents(self, layer_idx, pool.plain[slot], step, key_states, value_states)
            if gathered is not None:
                return gathered
        self._pending_layer = layer_idx
        pool.active = self._weak_self
        return pool.guarded[slot]

    def rotates(self, pool: KVPool) -> bool:
        """Whether `pool` stores its rows rotated: 8-bit rows, unless they are the latents of multi-head latent
        attention (keys and values at once; `hf_paged.quant`)."""
        return pool.kv_format is not None and not self.latent

    def _begin_step(self, group: LayerGroup, batch: int, q_len: int) -> None:
        """Begin a forward step (`LayerGroup.begin_step`) with what this cache knows about its rows: at the step's
        first layer every group with a pool begins it, and their plans go to each device in one copy; a group whose
        pool its first layer has just made (the cache's first step) begins it alone."""
        if group.began == self._steps:  # the first layer of a new step
            self._steps += 1
            groups = [g for g in self.groups if g is group or g.pool.tensor is not None]
        else:
            groups = [group]
        ended = self._ended.tolist() if self._ended is not None and len(self._ended) == group.manager.num_rows \
            else None
        rows = RowPlan(ended=ended if ended is not None and any(ended) else None, starts=self._row_starts,
                       recording=self.record_past, forks=self._forks, max_length=self._max_length,
                       left_padding=self._left_padding)
        buffers: dict = {}
        for each in groups:
            each.begin_step(batch, q_len, rows, buffers)
            each.began = self._steps
        sent = {device: buffer.send(device) for device, buffer in buffers.items()}
        for each in groups:
            each.finish_step(sent)
        # Each peak on its own: groups of different bytes per block reach their block and byte peaks at other steps.
        self.peak_used_blocks = max(self.peak_used_blocks, sum(g.manager.num_used for g in self.groups))
        self.peak_used_bytes = max(self.peak_used_bytes,
                                   sum(g.manager.num_used * g.bytes_per_block for g in self.groups))

    def attention_inputs(self, key: torch.Tensor, module: torch.nn.Module | None = None) -> LayerRead:
        """Everything the attention function of the layer that owns the guarded key pool `key` (what its ``update``
        returned) reads this step, in one answer (`hf_paged.step.LayerRead`): the step's plan on the pool's
        device, the layer's plain key and value stores, the step's own keys and values when the step stores only
        its last tokens, and the window Transformers' own `DynamicCache` keeps for the layer of `module`.

        Marks the layer's new keys as read. Reading the layer off the pool (not the module's ``layer_idx``) serves
        models that run one module for several cache layers (HRM's cycles).
        """
        place = place_of(key)
        pending = self._pending_layer
        expected = self.layer_pools[pending] if pending is not None else None
        layer = pending
        if expected is None or expected[0] is not place[0] or expected[1] != place[1]:
            # A KV-shared layer (`support.kv_sources`) reads the pools of a layer that stored in this step.
            layer = self._reader_source(place) if pending is None else None
            if layer is None:
                raise RuntimeError(
                    "hf_paged: an attention layer ran without storing its keys in this step first (last layer "
                    f"stored: {pending})."
                )
        self._pending_layer = None
        pool, slot = self.layer_pools[layer]
        group = self.layer_groups[layer]
        plan = group.step if pool is group.pool else group.step_on(pool.device)
        fresh = None
        if plan.fresh is not None:
            # A layer other layers read (KV sharing) keeps its entry for them until the step ends.
            keys, values = plan.fresh[layer] if layer in self._kv_read else plan.fresh.pop(layer)
            kept = plan.context[1].get(layer) if plan.context is not None else None
            fresh = ((kept[0] if kept else None), (kept[1] if kept else None), keys, values)
        window = None if module is None else self.cache_window(getattr(module, "config", None), module.layer_idx)
        keys, values = pool.plain[slot]
        return LayerRead(plan, keys, values, fresh, window, self.latent, *pool.read_features[slot], pool, slot)

    def _reader_source(self, place: tuple) -> int | None:
        """The layer whose pools are `place` ``(pool, index there)``, if it stored keys in this step and some layer
        reads its keys (KV sharing), else None."""
        for layer in self._kv_read:
            group = self.layer_groups[layer]
            if (group is not None and group.step is not None and layer in group.step_layers
                    and self.layer_pools[layer][0] is place[0] and self.layer_pools[layer][1] == place[1]):
                return layer
        return None

    def cache_window(self, config, layer_idx: int) -> int | None:
        """`masks.cache_windows` of layer `layer_idx` (None past its layers), memoised per config object for this
        cache's lifetime (one ``generate`` call): without it, every layer of every step would build a `DynamicCache`
        to find out (a model config is unhashable, so no memo keyed by the config can live in `masks`)."""
        entry = self._cache_windows.get(id(config))
        if entry is None or entry[0] is not config:
            entry = self._cache_windows[id(config)] = (config, masks.cache_windows(config))
        windows = entry[1]
        return windows[layer_idx] if 0 <= layer_idx < len(windows) else None

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held per row (all rows of a `generate` batch have the same length, padding included)."""
        return max(self.manager.lengths, default=0)

    def get_mask_sizes(self, query_length: int | torch.Tensor, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for a query of `query_length` tokens (older releases pass its positions)."""
        return self.get_seq_length() + compat.query_length(query_length), 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:  # the name of `get_max_length` in older 5.x releases
        return -1

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``. Remaps block tables; copies no keys or values
        (linear-attention / Mamba states, one per row, are reordered as Transformers does)."""
        self._select(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row `repeats` times (each copy shares the original's blocks)."""
        rows = self.manager.num_rows or self._state_rows()
        self._select([row for row in range(rows) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (in that order)."""
        self._select(torch.as_tensor(indices).tolist())

    def _state_rows(self) -> int:
        for layer in self.state_layers:
            for states in (layer.conv_states, layer.recurrent_states):
                for state in states.values():
                    if state is not None:
                        return state.shape[0]
        return 0

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every row (``tokens_to_remove`` <= 0, as `DynamicCache`)."""
        if tokens_to_remove > 0 and compat.CROP_TAKES_LENGTH:  # the length to keep, as older releases pass it
            tokens_to_remove = min(tokens_to_remove - self.get_seq_length(), 0)
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        length = max(self.get_seq_length() + tokens_to_remove, 0)
        for group in self.groups:
            if group.released_before(length):
                raise RuntimeError(
                    f"hf_paged: crop({tokens_to_remove}) would need keys of a sliding-window layer (window "
                    f"{group.window}) that the PagedCache has already released. Call cache.activate_past_recording() "
                    "before decoding steps that may be rolled back (generate() does so for assisted decoding)."
                )
        for layer in self.state_layers:
            layer.crop(tokens_to_remove)  # as Transformers: only when recording past states (assisted decoding)
        if self._known_ids is not None:
            self._known_ids = self._known_ids[:, :length]
        for group in self.groups:
            if tokens_to_remove:
                group.manager.truncate(length)
            group.release_unseen(length)  # as Transformers' sliding-window layers: after a crop only the window
            group.end()

    def activate_past_recording(self, **kwargs) -> None:
        """Keep the keys sliding-window layers no longer need until the next `crop`, so that decoding steps can be
        rolled back (assisted decoding); Transformers' state layers (and the state part of hybrid layers) record
        their past states as well, with whatever `kwargs` this release passes them (``recurrent_states_to_keep``)."""
        for layer in self.layers:  # as `Cache.activate_past_recording` (which releases before 5.24 lack)
            if hasattr(layer, "activate_past_recording"):
                compat.call_accepting(layer.activate_past_recording, **kwargs)
        self.record_past = True

    def set_row_starts(self, starts: list[int] | None) -> None:
        """The first real token of each row the next forward step adds (left padding before it takes no block).
        ``generate`` passes them from the prompt's attention mask; they are used once, when the rows are added."""
        self._row_starts = None if starts is None else [int(start) for start in starts]

    def note_prefix_hit(self, tokens: int) -> None:
        """Count `tokens` prompt tokens taken from the prefix cache (`CacheStats.prefix_hit_tokens`)."""
        self.prefix_hit_tokens += int(tokens)

    def expect_forks(self, k: int) -> None:
        """Tell the cache that each row of the coming steps will be forked into `k` rows (``generate()``'s prompt,
        computed once for its ``num_beams`` / ``num_return_sequences`` rows), so that a growing pool's slack is
        sized for the `k` rows that will grow: their first blocks then lie in the prompt's slab. 1 (the default)
        when the rows stay as they are."""
        self._forks = max(int(k), 1)

    def expect_length(self, max_length: int | None) -> None:
        """Tell the cache that no row will hold more than `max_length` tokens in the coming steps (``generate()``'s
        ``max_length``, for the length of one call): a growing pool then reserves no slack for blocks past it.
        None (the default, and after every ``generate()`` call) when nothing is known. Only slack depends on it:
        a step that needs more blocks still gets them."""
        self._max_length = None if max_length is None else max(int(max_length), 0)

    def expect_left_padding(self, follows: bool) -> None:
        """Tell the cache whether the attention masks of the coming steps pad each row exactly before its first real
        token, the live start its rows were added with (`set_row_starts`): ``generate()``'s masks, a prompt's pure
        left padding extended by ones. The attention then takes each row's first key from the cache instead of
        reading the mask (no host synchronisation per step). False (the default, and after every ``generate()``
        call): the masks are read."""
        self._left_padding = bool(follows)

    @contextlib.contextmanager
    def locked(self):
        """Hold the lock of every group's block ids (`BlockPool.lock`): what changes rows of pools that other caches
        share (prefix caching) does so under it."""
        with contextlib.ExitStack() as stack:
            for blocks in {id(g.pool.blocks): g.pool.blocks for g in self.groups}.values():
                stack.enter_context(blocks.lock)
            yield

    def reset(self) -> None:
        """Forget every sequence; the pool is kept for reuse."""
        for group in self.groups:
            group.manager.reset()
            group.end()
        self._pending_layer, self._ended, self._row_starts, self._known_ids = None, None, None, None
        self._left_padding = False
        for layer in self.state_layers:
            layer.reset()

    def note_tokens(self, token_ids: torch.Tensor) -> None:
        """Remember which token ids each row holds: ``token_ids`` ``[rows, n]`` are the ids of each row's first
        ``min(n, held)`` tokens (``generate`` notes its prompt and, after greedy or sampled decoding, the sequences
        it returns). `first_difference` checks later input against them; rows that move (beams, forks) take
        theirs along."""
        held = self.get_seq_length()
        if (not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2 or token_ids.shape[0] != self.manager.num_rows
                or not held or not token_ids.shape[1]):
            return
        self._known_ids = token_ids[:, :held].detach().to("cpu", torch.long)

    def first_difference(self, input_ids: torch.Tensor) -> tuple[int, int] | None:
        """``(row, position)`` of the first token of `input_ids` ``[rows, >= held]`` that differs from what this
        cache holds there, as far as it knows its tokens (`note_tokens`), or None."""
        known = self._known_ids
        if known is None or input_ids.dim() != 2 or input_ids.shape[0] != known.shape[0]:
            return None
        width = min(known.shape[1], input_ids.shape[1])
        given = input_ids[:, :width].detach().to("cpu", torch.long)
        if torch.equal(given, known[:, :width]):
            return None
        row, position = (given != known[:, :width]).nonzero()[0].tolist()
        return row, position

    def end_rows(self, done: torch.Tensor | None) -> None:
        """Mark the rows where ``done`` (``[B]`` bool) is True as ended: from the next step on nothing will be read
        from them, so their new tokens are not stored (see `BlockManager.append`), and a row that references only
        blocks of its own (`BlockManager.private_rows`: not a prompt its forks share) gives all of them back, its
        live start following its length. Its attention then reads garbage, finite keys (zeroed or written slots).
        ``generate`` marks rows this way only in a cache that dies with the call (see
        `hf_paged.generation._sample`): such a row's keys are gone for good. ``None`` clears the marks."""
        if done is None:
            self._ended = None
        else:
            done = done.detach().to(torch.bool)
            self._ended = done if self._ended is None or self._ended.shape != done.shape else self._ended | done

    def _select(self, indices: list[int]) -> None:
        ended, rows = self._ended, self.manager.num_rows
        if not rows and indices and not self.state_layers:
            raise RuntimeError(
                "hf_paged: generate() reordered the rows of a PagedCache that no layer ever wrote to: this model's "
                "attention does not store its keys and values through the cache it is given. "
                f"{support.fallback_advice(None)}"
            )
        for group in self.groups:
            if group.manager.num_rows or not self.state_layers:
                group.manager.select(indices)
            group.end()
        if self.state_layers:
            index = torch.tensor(indices, dtype=torch.long)
            for layer in self.state_layers:
                select_states(layer, index)
        self._row_starts = None
        if self._known_ids is not None:
            keep = self._known_ids.shape[0] == rows and (not indices or max(indices) < rows)
            self._known_ids = self._known_ids[indices] if keep else None
        if ended is not None:
            keep = ended.shape == (rows,)
            self._ended = ended[torch.tensor(indices, dtype=torch.long, device=ended.device)] if keep else None

    # ------------------------------------------------------------------------------------------- stats
    def stats(self) -> CacheStats:
        """A snapshot of the pools' use (see `CacheStats`), summed over the layer groups."""
        return summarize(self.groups, self.block_size, self.peak_used_blocks, self.peak_used_bytes,
                         self.prefix_hit_tokens)

    def __deepcopy__(self, memo: dict) -> PagedCache:
        """An independent copy with pools of its own (one per layer group) holding just this cache's blocks
        (Transformers' prompt-reuse recipe: ``copy.deepcopy(prompt_cache)``). Sharing between rows is kept."""
        if any(len(group.pools) > 1 for group in self.groups):
            raise NotImplementedError("hf_paged: copying a PagedCache whose layers are on several devices is not "
                                      "supported; run the prompt again for each copy instead.")
        specs, sources = [], []
        for group in self.groups:
            used = sorted({block for table in group.manager.tables for block in table if block >= 0})
            pool = group.pool.compacted(used)
            # The group's layers (by their index among the attention layers) at the same places in the new pool.
            layers = [layer for layer in self.layers if isinstance(layer, PagedLayer) and layer.group is group]
            specs.append((group.kind, pool, [layer.slot for layer in layers],
                          [(pool, layer.place[1]) for layer in layers]))
            sources.append((group.manager, {block: new for new, block in enumerate(used)}))
        clone = PagedCache.__new__(PagedCache)
        memo[id(self)] = clone
        clone._init_state(specs, self._plan)
        clone.record_past = self.record_past
        for mine, theirs in zip(self.layers, clone.layers, strict=True):
            if isinstance(mine, LinearAttentionCacheLayerMixin):
                copy_states(mine, theirs, memo)
        for group, (source, renumber) in zip(clone.groups, sources, strict=True):
            group.manager.adopt(source, renumber)
        clone.peak_used_blocks, clone.prefix_hit_tokens = self.peak_used_blocks, self.prefix_hit_tokens
        clone.peak_used_bytes, clone._known_ids = self.peak_used_bytes, self._known_ids
        return clone

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"PagedCache(block_size={s.block_size}, rows={s.num_rows}, tokens={s.logical_tokens}, "
            f"blocks={s.used_blocks}/{s.num_blocks} used, {s.shared_blocks} shared)"
        )


def _release_rows(managers: list[BlockManager]) -> None:
    for manager in managers:
        with manager.pool.lock:
            manager.reset()
