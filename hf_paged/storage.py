"""Slab storage: a KV pool that grows by adding tensors ("slabs") instead of copying into a bigger one.

A `hf_paged.kv_pool.KVPool` holds its blocks in one or more slabs. Slab ``s`` holds the blocks ``[starts[s],
starts[s] + sizes[s])``: block ids stay plain ints and continue from one slab to the next, so block tables never
change when the pool grows, and nothing already stored moves (issue 10, item 4).

Each slab has the pool's tensors (``[L, kinds, n_s, bs, H, D]``, see `hf_paged.storage.slab_tensor`). A layer's keys
(or values) are therefore one ``[n_s, bs, H, D]`` view per slab. With a single slab attention gets that view itself
(every fast path unchanged); with several it gets a `LayerStore`, which behaves like the ``[N, bs, H, D]`` tensor
for what `hf_paged.ops` does with a pool: ``shape`` / ``dtype`` / ``device``, ``index_select(0, ids)`` (a gather,
slab by slab), ``store[a:b]`` when the blocks ``a .. b-1`` lie in one slab (read in place), and ``write`` (new tokens).

Two memory layouts (chosen once, when the pool is allocated):
    * head-major (PyTorch path): each slab ``[L, kinds, H, n_s * bs, D]`` in memory, so a block range inside one
      slab is one contiguous ``[tokens, D]`` matrix per head (`slab_tensor`).
    * block-major (Triton path): each slab ``[n_s, L, kinds, bs, H, D]`` in memory, each block padded to a multiple
      of `BLOCK_ALIGNMENT` elements (the offsets the kernels take must be). Strides inside a block are the same in
      every slab, so a kernel addresses block ``b`` of any slab as ``base + block_offsets[b]`` (elements,
      relative to the data pointer of the *base* slab, the lowest-addressed one, so offsets are >= 0). A layer's
      view starts at the same offset inside every slab, so one table per tensor serves all its layers, keys and
      values (`hf_paged.kernels`' ``key_offsets`` / ``value_offsets`` / ``block_offsets``).
"""

from __future__ import annotations

import bisect

import torch

from . import quant

__all__ = ["BLOCK_ALIGNMENT", "LayerStore", "block_elements", "block_offsets", "select_blocks", "slab_tensor",
           "split_by_slab"]

#: Elements a block-major block is padded to a multiple of (the kernels' offset alignment).
BLOCK_ALIGNMENT = 16


def slab_tensor(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                device: torch.device, dtype: torch.dtype, kinds: int = 2, block_major: bool = False) -> torch.Tensor:
    """A zeroed slab ``[L, kinds, n, bs, H, D]`` (logical shape), head-major or block-major in memory (module
    docstring). Zeroed: `hf_paged.ops.range_attention` scores unused slots too, which must be finite."""
    if block_major:
        # Each block padded to a multiple of BLOCK_ALIGNMENT elements, so that every block of every slab starts at
        # such an offset: the kernels' offset tables must hold multiples of it (`block_offsets`).
        size = num_layers * kinds * block_size * kv_heads * head_dim
        padded = block_elements(num_layers * kinds, block_size, kv_heads, head_dim, block_major=True)
        storage = torch.zeros((num_blocks, padded), device=device, dtype=dtype)[:, :size]
        return storage.view(num_blocks, num_layers, kinds, block_size, kv_heads, head_dim).permute(1, 2, 0, 3, 4, 5)
    storage = torch.zeros((num_layers, kinds, kv_heads, num_blocks, block_size, head_dim), device=device, dtype=dtype)
    return storage.permute(0, 1, 3, 4, 2, 5)


def block_elements(rows: int, block_size: int, kv_heads: int, head_dim: int, block_major: bool) -> int:
    """Elements one block of a slab tensor takes for `rows` (layers x kinds) rows of ``[bs, H, D]``: block-major
    blocks are padded to a multiple of `BLOCK_ALIGNMENT` (what the pool allocates, and counts)."""
    size = rows * block_size * kv_heads * head_dim
    return -(-size // BLOCK_ALIGNMENT) * BLOCK_ALIGNMENT if block_major else size


def select_blocks(store, ids: torch.Tensor) -> torch.Tensor:
    """``[H, len(ids), bs, D]``: the blocks `ids` of a layer's ``[N, bs, H, D]`` keys or values (a plain view or a
    `LayerStore`), gathered head by head into a new tensor.

    A head-major slab keeps each head's blocks as one contiguous ``[N, bs, D]`` run, so gathering per head copies
    whole ``bs * D`` blocks (a memcpy each) where a block-first gather copies ``D``-element rows through strides:
    four times faster on the CPU for 16-token blocks of 16-wide heads (issue 19)."""
    if isinstance(store, LayerStore):
        out = torch.empty((store.shape[2], len(ids), store.shape[1], store.shape[3]), dtype=store.dtype,
                          device=store.device)
        for slab, positions, local in store._split_ids(ids):
            quant.raw(out).index_copy_(1, positions,
                                       quant.raw(store.views[slab].permute(2, 0, 1, 3).index_select(1, local)))
        return out
    return store.permute(2, 0, 1, 3).index_select(1, ids)


def is_head_major(store) -> bool:
    """Whether a layer's ``[N, bs, H, D]`` view (or a `LayerStore`'s slabs) keeps each head's blocks contiguous."""
    view = store.views[0] if isinstance(store, LayerStore) else store
    return view.stride(2) > view.stride(0) or view.shape[2] == 1


def block_offsets(slabs: list[torch.Tensor], starts: list[int], on_aligned=None) -> tuple[int, torch.Tensor]:
    """``(base, offsets)`` for block-major slabs ``[L, kinds, n_s, bs, H, D]`` of one tensor kind: the index of the
    lowest-addressed slab and, per block id, the element offset of its first element (layer 0, kind 0) from that
    slab's data pointer (int64 ``[N]``, made on the slabs' device: nothing is copied to it).

    `on_aligned`: called with the table when every entry is a multiple of 16 elements, known here without reading
    it (each slab's start and block stride are), so that the kernels need not check it (`hf_paged.backend`)."""
    base = min(range(len(slabs)), key=lambda s: slabs[s].data_ptr())
    origin, size = slabs[base].data_ptr(), slabs[base].element_size()
    device = slabs[0].device
    parts, aligned = [], True
    for slab in slabs:
        delta = slab.data_ptr() - origin
        if delta % size:
            raise RuntimeError("hf_paged: a slab is not aligned to its element size; cannot address it by offsets.")
        first, stride = delta // size, slab.stride(2)
        aligned = aligned and first % 16 == 0 and (slab.shape[2] <= 1 or stride % 16 == 0)
        parts.append(torch.arange(slab.shape[2], dtype=torch.int64, device=device) * stride + first)
    del starts  # the slabs are in block-id order: offsets follow them
    table = torch.cat(parts)
    if aligned and on_aligned is not None:
        on_aligned(table)
    return base, table


def split_by_slab(ids: torch.Tensor, starts: list[int]):
    """Yield ``(slab, positions, local_ids)``: for each slab that holds some of `ids` (int tensor, negative =
    none), where those ids are in `ids` (``[k]`` long) and their indices inside the slab."""
    ids = ids.to(torch.long)
    if len(starts) == 1:
        positions = torch.arange(len(ids), device=ids.device)
        yield 0, positions, ids
        return
    bounds = torch.tensor(starts[1:], dtype=torch.long, device=ids.device)
    slab_of = torch.bucketize(ids, bounds, right=True)
    slab_of = torch.where(ids < 0, -1, slab_of)
    for slab in torch.unique(slab_of).tolist():
        if slab < 0:
            continue
        positions = (slab_of == slab).nonzero().squeeze(1)
        yield slab, positions, ids.index_select(0, positions) - starts[slab]


class _LastSplit:
    """The split by slab of the last tensor asked about, under a key that identifies that tensor and the slabs.
    It holds the tensor, so neither its id nor its storage can be reused while memoised."""

    def __init__(self):
        self.tensor, self.key, self.value = None, None, None

    def get(self, tensor: torch.Tensor, key: tuple, compute):
        if self.tensor is None or self.key != key:
            self.tensor, self.key, self.value = tensor, key, compute()
        return self.value


_LAST_SLOTS = _LastSplit()  # `LayerStore._split_slots`: keyed by the slots tensor itself
_LAST_IDS = _LastSplit()  # `LayerStore._split_ids`: keyed by the ids' storage, layout and version


class LayerStore:
    """One layer's keys (or values) across the pool's slabs: quacks like their ``[N, bs, H, D]`` pool for
    `hf_paged.ops` (module docstring). Only built when the pool has several slabs.

    Args:
        views: per slab, the layer's ``[n_s, bs, H, D]`` view.
        starts: per slab, its first block id (increasing, ``starts[0] == 0``).
        offsets: for block-major slabs, ``(base, block_offsets)`` from `block_offsets` (for the Triton kernels).
    """

    def __init__(self, views: list[torch.Tensor], starts: list[int], offsets: tuple[int, torch.Tensor] | None = None):
        self.views, self.starts = views, starts
        first = views[0]
        self.shape = torch.Size((starts[-1] + views[-1].shape[0], *first.shape[1:]))
        self.dtype, self.device = first.dtype, first.device
        self._offsets = offsets
        # For the Triton kernels (`base`, `block_offsets`): the lowest-addressed slab's view and the offset table.
        self._kernel = None if offsets is None else (views[offsets[0]], offsets[1])

    def __len__(self) -> int:
        return self.shape[0]

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return 4

    def element_size(self) -> int:
        return self.views[0].element_size()

    @property
    def num_slabs(self) -> int:
        return len(self.views)

    def slab_of(self, block: int) -> int:
        """The slab holding block id `block` (a non-negative int)."""
        return bisect.bisect_right(self.starts, block) - 1

    def __getitem__(self, index):
        """``store[a:b]``: the blocks ``a .. b-1`` read in place; they must lie in one slab."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"hf_paged: a LayerStore supports only block ranges store[a:b], got {index!r}.")
        start = 0 if index.start is None else index.start
        stop = self.shape[0] if index.stop is None else index.stop
        slab = self.slab_of(start)
        first = self.starts[slab]
        if stop - first > self.views[slab].shape[0] and stop > start:
            raise IndexError(f"hf_paged: blocks {start}..{stop - 1} span several slabs (slab {slab} holds blocks "
                             f"{first}..{first + self.views[slab].shape[0] - 1}); gather them with index_select.")
        return self.views[slab][start - first:stop - first]

    def index_select(self, dim: int, ids: torch.Tensor) -> torch.Tensor:
        """``[len(ids), bs, H, D]``: the blocks `ids` (any valid ids), gathered slab by slab (a new tensor)."""
        if dim != 0:
            raise ValueError("hf_paged: a LayerStore gathers along dim 0 (blocks) only.")
        out = torch.empty((len(ids), *self.shape[1:]), dtype=self.dtype, device=self.device)
        for slab, positions, local in self._split_ids(ids):
            quant.raw(out).index_copy_(0, positions, quant.raw(self.views[slab].index_select(0, local)))
        return out

    def _split_ids(self, ids: torch.Tensor) -> list:
        """`split_by_slab` of `ids`, memoised for the last ids read (a step gathers the same block tables for every
        layer's keys and values; each call passes a new view of them, so the memo keys by storage and version)."""
        try:
            key = (ids.data_ptr(), ids.dtype, tuple(ids.shape), tuple(ids.stride()), ids._version, ids.device,
                   tuple(self.starts))
        except RuntimeError:  # an inference-mode tensor has no version counter: nothing proves it unchanged
            return list(split_by_slab(ids, self.starts))
        return _LAST_IDS.get(ids, key, lambda: list(split_by_slab(ids, self.starts)))

    def write(self, slots: torch.Tensor, states: torch.Tensor) -> None:
        """Store ``states`` (``[T, H, D]``) at ``slots`` (``[T]``, ``block * bs + offset``; negative = skip)."""
        states = quant.to_storage(states, self.dtype)
        for slab, positions, local, offsets in self._split_slots(slots):
            self.views[slab].index_put_((local, offsets), states.index_select(0, positions))

    def _split_slots(self, slots: torch.Tensor) -> list:
        """``[(slab, positions, blocks in the slab, offsets in the block)]`` for `slots`; memoised for the last
        slots tensor (a step writes the same slots in every layer's keys and values)."""
        block_size = self.shape[1]

        def split():
            long_slots = slots.to(torch.long)
            blocks = torch.where(long_slots < 0, -1, long_slots // block_size)
            return [(slab, positions, local, long_slots.index_select(0, positions) % block_size)
                    for slab, positions, local in split_by_slab(blocks, self.starts)]

        return _LAST_SLOTS.get(slots, (id(slots), tuple(self.starts), block_size), split)

    @property
    def base(self) -> torch.Tensor:
        """For the Triton kernels: the layer's view in the lowest-addressed slab (`block_offsets` are relative to
        its data pointer)."""
        return self._require_offsets()[0]

    @property
    def block_offsets(self) -> torch.Tensor:
        """For the Triton kernels: int64 ``[N]`` element offset of each block from ``base``'s data pointer."""
        return self._require_offsets()[1]

    def _require_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._kernel is None:
            raise RuntimeError(
                "hf_paged: this pool's slabs are head-major (allocated for the PyTorch path): the Triton kernels "
                "cannot address them. Keep HF_PAGED_BACKEND the same for a cache's whole life, or reset it."
            )
        return self._kernel

    def consolidated(self) -> torch.Tensor:
        """All blocks in one new ``[N, bs, H, D]`` tensor (a copy; for `PagedLayer.keys` and tests)."""
        return torch.cat(list(self.views), dim=0)

    def __repr__(self) -> str:
        return f"LayerStore(shape={tuple(self.shape)}, slabs={self.num_slabs}, dtype={self.dtype})"
