"""`KVPool`: the keys and values of one layer group's layers, in blocks held by one or more slabs."""

from __future__ import annotations

import bisect
import weakref

import torch

from . import backend, ops, quant, storage
from .block_manager import BlockPool, OutOfBlocksError
from .devices import as_device
from .guard import guarded

__all__ = ["KVPool", "device_pools", "parse_bytes"]


class KVPool:
    """Keys and values of all layers in blocks, held in one or more *slabs* (`hf_paged.storage`): each slab is one
    tensor ``[L, 2, n_s, bs, Hkv, D]`` (see `hf_paged.storage.slab_tensor` for its memory layout) holding the block ids
    ``[starts[s], starts[s] + n_s)``, and a `BlockPool` numbers the blocks of all slabs. When keys and values differ
    in width or head count (multi-head latent attention: DeepSeek-V2/V3, Kimi, MiMo-V2), they are stored as such,
    without padding, in two tensors per slab ``[L, 1, n_s, bs, Hk, Dk]`` and ``[L, 1, n_s, bs, Hv, Dv]``. A layer
    whose keys or values have another shape than the first layer's (Gemma 4's wider full-attention layers, MiMo-V2's
    sliding layers with more heads) gets tensors of its own, ``[1, ., n_s, bs, H, D]`` in every slab, made at its
    first write (`allocate_layer`); its row in the shared tensors then goes unused. `slabs` lists each slab's
    tensors (in one order: the shared ones, then each own layer's); `tensors` are the first slab's and `tensor` the
    first of them. `plain` gives each layer's keys and values: with one slab ``[N, bs, H, D]`` views, with several a
    `hf_paged.storage.LayerStore` each.

    Created empty; the first slab is allocated at the first write, when the KV head count, head size, dtype and
    device are known. A fixed pool (``num_blocks`` / ``max_memory``) is that one slab. A growable pool reserves
    nothing ahead and never copies what it holds: `ensure_free` appends a zeroed slab of what the step misses plus
    one *quantum* of slack, ``max(k blocks per row that grows this step, allocated // 16)`` blocks, where k is a
    quarter of a row's blocks, at least 1 and at most 4 (1 in a sliding-window group, whose rows reuse what they
    release), but never more than those rows can still take before the ``generate()`` call's ``max_length``
    (`PagedCache.expect_length`), so the last slab of a call holds no block no row can reach. A prompt's slab thus
    also holds the first tokens generated after it.
    It grows only when a step finds fewer free blocks than it needs, so after any step the pool holds less than one
    quantum beyond what its
    rows reference (allocated <= referenced + one quantum), and a call generating G tokens per row makes about one
    slab per 64 tokens per row (or per 1/16 of the pool), so few slabs. On the Triton path (`backend.use_triton` at
    allocation) slabs are block-major, so kernels address every slab through one offset table per tensor.

    A pool belongs to one `PagedCache`, or is shared by the caches of one model when prefix caching is
    on (`hf_paged.enable_prefix_caching`); `active` is the cache whose layer wrote last, which the attention of
    that layer then reads.

    Args:
        num_layers: model layers.
        block_size: tokens per block.
        num_blocks, max_memory: a fixed size (see `PagedCache`); with neither the pool grows on demand.
        device, dtype: where and how to store keys and values (default: those of the first keys written); an 8-bit
            dtype (``torch.int8``, ``torch.float8_e4m3fn``) stores each token's vector of each head as 8-bit codes
            and a scale, ``D + 2`` elements wide (`hf_paged.quant`): the tensors' last dimension is that stored width,
            while `shapes` and `describe` give the model's head sizes.
        blocks: the block ids to use (another pool's, for a layer group split across devices); default: new ones.
        shared: the pool is a prefix cache's, shared by the caches of one model (`hf_paged.enable_prefix_caching`).
    """

    def __init__(self, num_layers: int, block_size: int, num_blocks: int | None = None,
                 max_memory: int | None = None, device: torch.device | None = None, dtype: torch.dtype | None = None,
                 blocks: BlockPool | None = None, shared: bool = False):
        self.num_layers = num_layers
        self.block_size = block_size
        self.requested_blocks = num_blocks
        self.max_memory = max_memory
        self.growable = num_blocks is None and max_memory is None
        self.device, self.dtype = device, dtype
        self.shared = shared  # a prefix cache's pool (`enable_prefix_caching`): it outlives the caches that use it
        # The block ids; pools of one layer group on several devices share one set (`device_pools`).
        self.blocks = blocks if blocks is not None else BlockPool(0, block_size)
        self.peak_blocks = 0  # the most blocks the slabs have held
        self.block_major = False  # slab layout (`hf_paged.storage`): block-major for the Triton kernels
        self.tensor: torch.Tensor | None = None
        self.tensors: list[torch.Tensor] = []
        self.slabs: list[list[torch.Tensor]] = []
        self.starts: list[int] = []  # per slab, its first block id
        self.offsets: list[tuple[int, torch.Tensor] | None] = []  # per tensor, block-major offsets (several slabs)
        self.own: dict[int, list[int]] = {}  # layers with tensors of their own (another shape): their tensor indices
        self.plain: list[tuple] = []
        self.slot_views: list[tuple | None] = []
        # Per layer, where its keys and values lie: ((tensor index, row, kind), (tensor index, row, kind)).
        self.places: list[tuple[tuple[int, int, int], tuple[int, int, int]]] = []
        self.binds = 0  # how many times tensors were bound (`_bind`): views made before a bind are views of the past
        self.shapes: list[tuple[int, int, int, int]] = []
        self.read_features: list[tuple[bool, int]] = []
        self.guarded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.active: weakref.ref | None = None

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across keys and values of all layers (0 before the tensor exists)."""
        return sum(storage.block_elements(tensor.shape[0] * tensor.shape[1], self.block_size, *tensor.shape[4:],
                                          self.block_major) * tensor.element_size() for tensor in self.tensors)

    @property
    def num_blocks(self) -> int:
        """Blocks allocated over all slabs."""
        return self.starts[-1] + self.slabs[-1][0].shape[2] if self.slabs else 0

    def _new_slab(self, num_blocks: int) -> list[torch.Tensor]:
        """Zeroed tensors for `num_blocks` more blocks, one like each of the first slab's."""
        return [storage.slab_tensor(t.shape[0], num_blocks, *t.shape[3:], t.device, t.dtype, kinds=t.shape[1],
                                    block_major=self.block_major) for t in self.tensors]

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Create the first slab for keys like ``key_states`` (``[B, Hk, q, Dk]``) and values like ``value_states``
        (``[B, Hv, q, Dv]``, default: as the keys), sized by the pool's rule (empty for a growable pool)."""
        device = self.device or key_states.device
        dtype = self.dtype or key_states.dtype
        value_states = key_states if value_states is None else value_states
        key_shape = self._stored_shape(key_states, dtype)
        value_shape = self._stored_shape(value_states, dtype)
        blocks = self.requested_blocks or 0
        element = torch.empty((), dtype=dtype).element_size()
        self.block_major = backend.use_triton(device)
        if self.max_memory is not None:
            kinds = [(2, key_shape)] if key_shape == value_shape else [(1, key_shape), (1, value_shape)]
            per_block = sum(storage.block_elements(self.num_layers * count, self.block_size, *shape,
                                                   self.block_major) * element for count, shape in kinds)
            blocks = self.max_memory // per_block
            if blocks <= 0:
                raise ValueError(
                    f"hf_paged: max_memory={self.max_memory} bytes holds no block; one block of {self.block_size} "
                    f"tokens takes {per_block} bytes for this model. Raise max_memory or lower block_size."
                )
        if key_shape == value_shape:
            tensors = [storage.slab_tensor(self.num_layers, blocks, self.block_size, *key_shape, device, dtype,
                                           block_major=self.block_major)]
        else:
            tensors = [storage.slab_tensor(self.num_layers, blocks, self.block_size, *shape, device, dtype, kinds=1,
                                           block_major=self.block_major) for shape in (key_shape, value_shape)]
        self.device, self.dtype = tensors[0].device, dtype  # the tensors' own ("cuda" named as "cuda:0")
        self._bind([tensors], [0])
        if blocks:
            self.blocks.grow(max(blocks - self.blocks.num_blocks, 0))  # the block ids may be shared (device pools)
            self.peak_blocks = max(self.peak_blocks, blocks)

    def _stored_shape(self, states: torch.Tensor, dtype: torch.dtype) -> tuple[int, int]:
        """``(heads, stored width)`` of states ``[B, H, q, D]`` in a pool of storage dtype `dtype`."""
        heads, dim = states.shape[1], states.shape[3]
        return heads, quant.stored_width(dim) if quant.is_quantized(dtype) else dim

    def _logical(self, view: torch.Tensor) -> tuple[int, int]:
        """``(heads, head_dim)`` of the rows a ``[N, bs, H, W]`` view stores."""
        return view.shape[2], quant.logical_width(view.shape[3], view.dtype)

    @property
    def kv_format(self) -> quant.KVFormat | None:
        """The 8-bit format the pool stores keys and values in (None: as the model computes them)."""
        return quant.format_of(self.dtype) if self.dtype is not None else None

    def matches(self, key_states: torch.Tensor, value_states: torch.Tensor, layer: int | None = None) -> bool:
        """Whether layer `layer`'s stored keys and values (the shared tensors' when None) have these shapes."""
        if layer is not None:
            return self.shapes[layer] == (key_states.shape[1], key_states.shape[3], value_states.shape[1],
                                          value_states.shape[3])
        keys, values = self.tensors[0][0, 0], self.tensors[-1][0, -1]
        return (key_states.shape[1], key_states.shape[3]) == self._logical(keys) and (
            value_states.shape[1], value_states.shape[3]) == self._logical(values)

    def allocate_layer(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Give `layer` tensors of its own for keys like ``key_states`` and values like ``value_states`` (another
        shape than the shared tensors'), in every slab, zeroed (see `storage.slab_tensor`)."""
        if layer in self.own:
            raise ValueError(
                f"hf_paged: layer {layer} gives keys {tuple(key_states.shape)} and values {tuple(value_states.shape)}, "
                f"but it stored {self.describe(layer)} before; a layer's KV heads and head_dim must stay the same."
            )
        key_shape = self._stored_shape(key_states, self.dtype)
        value_shape = self._stored_shape(value_states, self.dtype)
        shapes = [key_shape] if key_shape == value_shape else [key_shape, value_shape]
        slabs = [tensors + [storage.slab_tensor(1, tensors[0].shape[2], self.block_size, *shape, self.device,
                                                self.dtype, kinds=3 - len(shapes), block_major=self.block_major)
                            for shape in shapes]
                 for tensors in self.slabs]
        self.own[layer] = list(range(len(self.tensors), len(self.tensors) + len(shapes)))
        self._bind(slabs, self.starts)  # the shared tensors and the other layers' own ones, then this layer's

    def write(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor, step, rotate: bool) -> tuple | None:
        """Store `layer`'s keys and values of a step (``[B, Hkv, q, D]``) at its slots (a `hf_paged.step.StepPlan`'s
        ``slot_mapping``), 8-bit rows rotated first where `rotate` (`hf_paged.quant`). For a step that keeps only its
        last tokens (``step.fresh``), returns them as the pool gives them back: what its attention reads."""
        if rotate:
            key_states, value_states = quant.rotated(key_states), quant.rotated(value_states)
        stored_keys, stored_values, fresh = key_states, value_states, None  # the write encodes 8-bit rows itself
        if step.fresh is not None:
            if self.kv_format is not None and not step.triton:  # encoded once: written as is, read back decoded
                stored_keys, stored_values = quant.encode_pair(key_states, value_states, self.dtype)
                fresh = (quant.decode(stored_keys, key_states.dtype), quant.decode(stored_values, value_states.dtype))
            else:
                fresh = (quant.rounded(key_states, self.dtype), quant.rounded(value_states, self.dtype))
        if key_states.shape[2] == 1:  # [T, Hkv, D] rows, one token per row: views
            keys, values = stored_keys.select(2, 0), stored_values.select(2, 0)
        else:
            keys, values = (stored.transpose(1, 2).flatten(0, 1) for stored in (stored_keys, stored_values))
        key_store, value_store = self.plain[layer]
        backend.reshape_and_cache(keys, values, key_store, value_store, step.slot_mapping, triton=step.triton,
                                  skip_negative=step.skips, stored=step.stored, slot_views=self.slot_views[layer])
        return fresh

    def describe(self, layer: int | None = None) -> str:
        """The stored key and value shapes (of `layer`, or of the shared tensors), for error messages."""
        keys, values = self.plain[layer] if layer is not None else (self.tensors[0][0, 0], self.tensors[-1][0, -1])
        (key_heads, key_dim), (value_heads, value_dim) = self._logical(keys), self._logical(values)
        return f"keys of {key_heads} heads of dim {key_dim}, values of {value_heads} heads of dim {value_dim}"

    def resize(self, num_blocks: int) -> None:
        """Grow the pool to `num_blocks` blocks by appending one zeroed slab (nothing stored moves or is copied).

        Zeroed: `ops.range_attention` scores every slot of its block range, unused ones included, and masks them,
        and a masked score is only harmless if the slot's key and value are finite.
        """
        self.follow(self.starts + [self.num_blocks], num_blocks)

    def follow(self, starts: list[int], num_blocks: int) -> None:
        """Append slabs so that this pool's slabs start at `starts` and hold `num_blocks` blocks (another device's
        pool of the same cache mirrors the first pool's slabs, so that a block range lies in one slab in both)."""
        current = self.num_blocks
        if num_blocks <= current:
            return
        if self.slabs and not self.slabs[-1][0].shape[2]:  # the empty first slab of a growable pool
            slabs, old_starts = [], []
        else:
            slabs, old_starts = list(self.slabs), list(self.starts)
        bounds = [start for start in starts if start > current] + [num_blocks]
        begin = current
        for end in bounds:
            if end > begin:
                old_starts.append(begin)
                slabs.append(self._new_slab(end - begin))
                begin = end
        self._bind(slabs, old_starts)
        self.blocks.grow(num_blocks - self.blocks.num_blocks)
        self.peak_blocks = max(self.peak_blocks, num_blocks)

    def ensure_free(self, needed: int, slack: int = 0) -> None:
        """Make `needed` blocks available, growing the pool by what it misses plus `slack` blocks if it may (one
        quantum, see the class docstring and `PagedCache._slack`), else raise `OutOfBlocksError`."""
        free = self.blocks.num_free
        if needed <= free:
            return
        current = self.blocks.num_blocks
        if not self.growable:
            raise OutOfBlocksError(needed, free, current, self.block_size)
        target = current + needed - free + max(int(slack), 0)
        try:
            self.resize(target)
        except torch.OutOfMemoryError:
            try:
                target = current + needed - free  # no slack: just what this step needs
                self.resize(target)
            except torch.OutOfMemoryError as error:
                raise OutOfBlocksError(
                    needed, free, current, self.block_size,
                    hint=f"Growing the pool to {target} blocks ran out of device memory ({error}). Pass a smaller "
                    "batch or fix the pool size with num_blocks / max_memory.",
                ) from error

    def copy_blocks(self, src: list[int], dst: list[int], ids: tuple[torch.Tensor, torch.Tensor] | None = None,
                    triton: bool | None = None) -> None:
        """Copy whole blocks ``src[i] -> dst[i]`` in every layer's keys and values (copy-on-write). `ids`: the same
        block ids as int32 tensors on the pool's device (a step's plan has them, `StepPlan.copies`); `triton`: the
        step's backend (`backend.use_triton` when None)."""
        if triton is None:
            triton = backend.use_triton(self.tensor.device)
        if ids is None:
            ids = tuple(torch.tensor(blocks, dtype=torch.int32, device=self.tensor.device) for blocks in (src, dst))
        if len(self.slabs) == 1:
            for tensor in self.tensors:
                backend.copy_blocks(tensor, *ids, triton=triton)
            return
        if triton and self.block_major:  # the kernel addresses every slab through the tensor's offset table
            for index, (base, offsets) in enumerate(self.offsets):
                backend.copy_blocks(self.slabs[base][index], *ids, block_offsets=offsets, triton=True)
            return
        # Several slabs: copied slab pair by slab pair (the backend's copy inside one slab, indexing across two).
        pairs: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        for a, b in zip(src, dst, strict=True):
            sa, sb = bisect.bisect_right(self.starts, a) - 1, bisect.bisect_right(self.starts, b) - 1
            local = pairs.setdefault((sa, sb), ([], []))
            local[0].append(a - self.starts[sa])
            local[1].append(b - self.starts[sb])
        for (sa, sb), (local_src, local_dst) in pairs.items():
            for source, target in zip(self.slabs[sa], self.slabs[sb], strict=True):
                src_ids = torch.tensor(local_src, dtype=torch.long, device=source.device)
                dst_ids = torch.tensor(local_dst, dtype=torch.long, device=target.device)
                if sa == sb:  # inside one slab: the backend's copy
                    backend.copy_blocks(source, src_ids.to(torch.int32), dst_ids.to(torch.int32), triton=triton)
                else:
                    target[:, :, dst_ids] = source[:, :, src_ids]

    def compacted(self, blocks: list[int]) -> KVPool:
        """A new pool of one slab holding `blocks` of this one, renumbered ``0 .. len(blocks) - 1`` in that order,
        all referenced by nobody yet (what `PagedCache.__deepcopy__` keeps), with this pool's layout."""
        pool = KVPool(self.num_layers, self.block_size, device=self.device, dtype=self.dtype)
        if self.tensor is not None:
            pool.own = {layer: list(own) for layer, own in self.own.items()}
            pool.block_major = self.block_major
            pool._bind([self.gather_blocks(blocks)], [0])
            pool.blocks.grow(len(blocks))
            pool.blocks.free_blocks.clear()  # every block is about to be referenced by the copy's rows
            pool.peak_blocks = len(blocks)
        return pool

    def rows_in_place(self, batch: int, kv_len: int, first: int, stride: int) -> list[tuple] | None:
        """Per layer, its ``(keys, values)`` as stored, rows read in place (`hf_paged.ops.rows_in_place`: row ``r``'s
        tokens from block ``first + r * stride`` on), all made at once for a step whose layers read so; None with
        several slabs or a layout that does not allow it. Valid until the tensors are bound again (`binds`: a layer
        of another shape given tensors of its own in the middle of a step)."""
        if len(self.slabs) > 1:
            return None
        per_tensor = [ops.rows_in_place(tensor, batch, kv_len, first, stride) for tensor in self.tensors]
        if any(views is None for views in per_tensor):
            return None

        def rows(index: int, layer: int, kind: int) -> torch.Tensor:
            kinds = self.tensors[index].shape[1]
            return per_tensor[index][layer * kinds + kind % kinds]

        return [(rows(*keys), rows(*values)) for keys, values in self.places]

    def gather_blocks(self, blocks: list[int], extra: int = 0) -> list[torch.Tensor]:
        """Per tensor, a new one-slab tensor holding `blocks` (in that order) then `extra` zeroed blocks."""
        out = []
        for i, first in enumerate(self.tensors):
            new = storage.slab_tensor(first.shape[0], len(blocks) + extra, *first.shape[3:], first.device, first.dtype,
                                      kinds=first.shape[1], block_major=self.block_major)
            ids = torch.tensor(blocks, dtype=torch.long)
            for slab, positions, local in storage.split_by_slab(ids, self.starts):
                new[:, :, positions.to(new.device)] = self.slabs[slab][i][:, :, local.to(new.device)]
            out.append(new)
        return out

    def _bind(self, slabs: list[list[torch.Tensor]], starts: list[int]) -> None:
        """Bind the slabs (each: the shared tensors, one or keys and values, followed by each of `own`'s layers'
        tensors, in order) starting at block ids `starts`."""
        self.slabs, self.starts = slabs, list(starts)
        self.binds += 1
        self.tensors, self.tensor = slabs[0], slabs[0][0]
        several = len(slabs) > 1
        self.offsets = [storage.block_offsets([slab[i] for slab in slabs], self.starts, backend.mark_offsets_checked)
                        if several and self.block_major else None for i in range(len(self.tensors))]
        shared = len(self.tensors) - sum(len(own) for own in self.own.values())
        places = [((0, layer, 0), (shared - 1, layer, -1)) for layer in range(self.num_layers)]
        for layer, own in self.own.items():
            places[layer] = ((own[0], 0, 0), (own[-1], 0, -1))

        def view(index: int, layer: int, kind: int):
            if not several:
                return slabs[0][index][layer, kind]
            return storage.LayerStore([slab[index][layer, kind] for slab in slabs], self.starts,
                                      self.offsets[index])

        self.plain = [(view(*keys), view(*values)) for keys, values in places]
        # The PyTorch path's writes index each layer's slots in one dimension: views made once per bind, not per write
        # (None: a pool of several slabs, or blocks that do not follow one another, as the Triton path lays them).
        self.slot_views = [None if several or self.block_major else tuple(ops.slot_view(t) for t in pair)
                           for pair in self.plain]
        self.places = places
        # Per layer, its stored (key heads, key dim, value heads, value dim): `matches` at every write; and what its
        # attention's read path depends on: (values as wide as keys, bytes of one token's key and value).
        self.shapes = [(*self._logical(keys), *self._logical(values)) for keys, values in self.plain]
        self.read_features = [(dk == dv, (keys.shape[2] * keys.shape[3] + values.shape[2] * values.shape[3])
                               * keys.element_size())
                              for (hk, dk, hv, dv), (keys, values) in zip(self.shapes, self.plain, strict=True)]
        self.guarded = []
        for layer, (keys, values) in enumerate(places):
            # What `update` returns to the model: the first slab's views, guarded; attention reads `plain`.
            self.guarded.append(tuple(guarded(slabs[0][index][row, kind], self, layer)
                                      for index, row, kind in (keys, values)))



_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"hf_paged: max_memory must be a number of bytes or a string like '2GiB', got {value!r}.")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):]
        if unit not in _UNITS or not digits:
            raise ValueError(f"hf_paged: cannot read max_memory={value!r}; use bytes or a string like '512MiB', '2GB'.")
        number = int(float(digits) * _UNITS[unit])
    if number <= 0:
        raise ValueError(f"hf_paged: max_memory must be positive, got {value!r}.")
    return number


def device_pools(attention_devices, block_size: int, num_blocks: int | None,
                  dtype: torch.dtype | None) -> tuple[KVPool, list[tuple[KVPool, int]]]:
    """``(the first pool, per attention layer (its pool, its index there))`` for `PagedCache`'s ``layer_devices``:
    one pool per distinct entry, all sharing the first pool's block ids."""
    keys = []
    for entry in attention_devices:
        name, device = entry if isinstance(entry, tuple) else (None, entry)
        device = as_device(device)
        keys.append((str(device) if name is None else str(name), device))
    groups: dict[tuple[str, torch.device], list[int]] = {}
    for layer, key in enumerate(keys):
        groups.setdefault(key, []).append(layer)
    first = KVPool(len(groups[keys[0]]), block_size, num_blocks, device=keys[0][1], dtype=dtype)
    # One set of block ids: every other pool follows the first one's size.
    pools = {key: first if key == keys[0] else KVPool(len(layers), block_size, num_blocks, device=key[1],
                                                      dtype=dtype, blocks=first.blocks)
             for key, layers in groups.items()}
    return first, [(pools[key], groups[key].index(layer)) for layer, key in enumerate(keys)]
