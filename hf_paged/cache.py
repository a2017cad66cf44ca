"""`PagedCache`: a `transformers.Cache` whose keys and values live in fixed-size blocks addressed by block tables."""

from __future__ import annotations

import bisect
import contextlib
import copy
import dataclasses
import functools
import weakref
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import backend, compat, latent, masks, ops, storage, support
from .block_manager import NULL_BLOCK, BlockManager, BlockPool, OutOfBlocksError
from .compat import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    LinearAttentionCacheLayerMixin,
    LinearAttentionLayer,
    get_layer_types_and_kwargs,
)
from .devices import as_device

__all__ = ["CacheStats", "KVPool", "PagedCache", "StepMetadata", "pool_tensor"]

# A growable pool grows by a slab holding what a step misses plus slack: up to this many blocks per row that takes
# blocks in the step (a quarter of a row's blocks, at least 1), and at least 1/_SLAB_FRACTION of what it holds (see
# `KVPool`): few slabs, and at most one such quantum unreferenced.
_SLAB_BLOCKS_PER_ROW = 4
_SLAB_FRACTION = 16
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
_OWNER_ATTR = "_hf_paged_owner"
_LAYER_ATTR = "_hf_paged_layer"


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a `PagedCache`. Byte counts cover keys and values of all layers.

    ``num_blocks``, ``free_blocks``, ``pool_bytes``, ``peak_pool_bytes`` and ``cached_blocks`` describe the pool
    (shared by the caches of a model when prefix caching is on); the other fields describe this cache's rows. For a
    cache with a pool of its own, ``used_blocks + free_blocks == num_blocks``.

    Referenced and allocated bytes differ: ``used_bytes`` counts the blocks this cache's rows point at,
    ``pool_bytes`` what the pool has allocated (used or not), which is what the device's memory pays for.

    A cache whose layers form several groups (sliding-window layers beside full-attention ones, `PagedCache`) has a
    pool per group: block counts and bytes are summed over them (a block of one group holds its layers only).
    ``logical_tokens`` counts each row's tokens once, ``logical_bytes`` them in every layer.
    """

    block_size: int
    num_blocks: int
    used_blocks: int  # physical blocks referenced by at least one row of this cache
    free_blocks: int  # blocks a step may take (free, or cached but unreferenced)
    shared_blocks: int  # blocks referenced more than once by this cache's rows (a shared prompt, beams)
    logical_tokens: int  # sum of the rows' lengths: what a contiguous cache would hold
    used_bytes: int  # bytes of the used blocks
    logical_bytes: int  # bytes a contiguous (DynamicCache-like) cache would need for the same rows
    pool_bytes: int  # bytes allocated for the whole pool (referenced or not)
    peak_used_blocks: int
    peak_used_bytes: int
    peak_pool_bytes: int  # the most bytes the pool has had allocated
    cow_copies: int  # block copies made by copy-on-write so far
    num_rows: int
    prefix_hit_tokens: int  # prompt tokens (left padding not counted) taken from the prefix cache, rows summed
    cached_blocks: int  # blocks in the pool's prefix index


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
class StepMetadata:
    """What one forward step's attention calls share, built once per step (not once per layer).

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
    _masks: dict = field(default_factory=dict)

    def window_mask(self, attention_mask: torch.Tensor | None, sliding_window: int | None, groups: int,
                    dtype: torch.dtype, chunk_size: int | None = None) -> torch.Tensor:
        """The mask of `ops.window_attention` over `window` (built once per step for all layers)."""
        key = ("window", id(attention_mask), sliding_window, groups, dtype, chunk_size)
        if key not in self._masks:
            padding = None if attention_mask is None else key_padding_mask(attention_mask, self.max_seq_len)
            self._masks[key] = ops.window_mask(
                self.block_tables, self.seq_lens, self.q_len, *self.window, self.block_size, groups=groups,
                dtype=dtype, key_padding=padding, sliding_window=sliding_window, chunk_size=chunk_size,
                first_entries=self.first_entries,
            )
        return self._masks[key]

    def windows_masks(self, attention_mask: torch.Tensor | None, sliding_window: int | None, groups: int,
                      dtype: torch.dtype, chunk_size: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per range of `windows`, its `ops.window_mask` and which packed queries see any of its slots
        (``[1, 1, M]`` bool), for `ops.windows_attention` (built once per step for all layers)."""
        key = ("windows", id(attention_mask), sliding_window, groups, dtype, chunk_size)
        if key not in self._masks:
            padding = None if attention_mask is None else key_padding_mask(attention_mask, self.max_seq_len)
            masks = []
            for first, count in self.windows:
                mask = ops.window_mask(
                    self.block_tables, self.seq_lens, self.q_len, first, count, self.block_size, groups=groups,
                    dtype=dtype, key_padding=padding, sliding_window=sliding_window, chunk_size=chunk_size,
                    first_entries=self.first_entries,
                )
                visible = mask == 0
                masks.append((None, None) if bool(visible.all()) else (mask, visible.any(dim=-1)))
            self._masks[key] = masks
        return self._masks[key]

    def shared_masks(self, attention_mask: torch.Tensor | None):
        """``(prefix_mask [G, 1, 1, S] | None, tail_mask [B, 1, q, T] | None)`` for `shared_prefix_attention`, or
        None when the rows of a group are padded differently inside the prefix (memoised per step)."""
        key = ("shared", id(attention_mask))
        if key not in self._masks:
            self._masks[key] = _shared_masks(self, attention_mask)
        return self._masks[key]

    def last_queries(self, q_len: int) -> StepMetadata:
        """This step as seen by its last `q_len` queries only (Gemma 4's KV-shared layers in a prefill): the same
        tables and keys, masks for `q_len` queries (built once per step)."""
        key = ("last_queries", q_len)
        if key not in self._masks:
            self._masks[key] = dataclasses.replace(self, q_len=q_len, _masks={})
        return self._masks[key]

    def mask(self, attention_mask: torch.Tensor | None, sliding_window: int | None,
             chunk_size: int | None = None) -> torch.Tensor | None:
        """The boolean ``[B, 1, q, kv]`` mask for this step (None when nothing is masked), memoised per step."""
        key = (id(attention_mask), sliding_window, chunk_size)
        if key not in self._masks:
            self._masks[key] = _step_mask(self, attention_mask, sliding_window, chunk_size)
        return self._masks[key]


def _step_mask(step: StepMetadata, attention_mask: torch.Tensor | None, window: int | None,
               chunk_size: int | None = None) -> torch.Tensor | None:
    kv_len = step.max_seq_len
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask[..., :kv_len].to(torch.bool)
    if attention_mask is None and window is None and chunk_size is None and step.q_len in (1, kv_len):
        return None  # nothing to mask (decode), or a plain causal mask `attend` applies itself (first prefill)
    padding = None if attention_mask is None else key_padding_mask(attention_mask, kv_len)
    chunk_start = None
    if chunk_size is not None and padding is not None:  # chunks start at each row's first real token
        chunk_start = (~padding).to(torch.long).cumprod(dim=1).sum(dim=1)
    mask = ops.causal_mask(step.seq_lens, None, step.q_len, kv_len, window, chunk_size, chunk_start)
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    return mask


def _shared_masks(step: StepMetadata, attention_mask: torch.Tensor | None):
    shared = step.shared
    prefix_len, tail_len = shared.prefix_len, step.max_seq_len - shared.prefix_len
    tail_mask = None
    if step.q_len > 1:
        tail_mask = ops.causal_mask(step.seq_lens - prefix_len, None, step.q_len, tail_len)
    if attention_mask is None:
        return None, tail_mask
    keys = key_padding_mask(attention_mask, step.max_seq_len)
    prefix_keys = keys[:, :prefix_len].unflatten(0, (-1, shared.group_size))
    if not bool((prefix_keys == prefix_keys[:, :1]).all()):
        return None
    tail_keys = keys[:, None, None, prefix_len:]
    tail_mask = tail_keys if tail_mask is None else tail_mask & tail_keys
    prefix_mask = prefix_keys[:, 0, None, None, :]
    return (None if bool(prefix_mask.all()) else prefix_mask), tail_mask


def key_padding_mask(attention_mask: torch.Tensor, kv_len: int) -> torch.Tensor:
    """A 2-D mask ``[B, >=0]`` cut (or padded with False on the right, as Transformers does) to ``[B, kv_len]``."""
    mask = attention_mask[:, :kv_len].to(torch.bool)
    if mask.shape[1] < kv_len:
        mask = torch.nn.functional.pad(mask, (0, kv_len - mask.shape[1]), value=False)
    return mask


class PagedPool(torch.Tensor):
    """A layer's pool as `PagedCache.update` returns it: only the "hf_paged" attention may read it.

    Any other attention implementation (sdpa, eager, ...) that received it would compute garbage from a
    ``[N, bs, Hkv, D]`` block pool taken for ``[B, Hkv, kv, D]`` keys; every torch operation on it therefore raises
    a clear error instead. Reading metadata (shape, dtype, device) stays allowed.
    """

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("__get__", "__repr__", "__format__"):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        if func is torch.Tensor.to and args and isinstance(args[0], PagedPool):
            # Gemma 3n / 4 before 5.25 move a shared layer's keys to its queries' device: the same device is no move.
            with torch._C.DisableTorchFunctionSubclass():
                moved = func(*args, **(kwargs or {}))
            if moved is args[0]:
                return moved
            raise RuntimeError(
                f"hf_paged: a PagedCache's block pool on {args[0].device} was moved to {moved.device}: a KV-shared "
                "layer (Gemma 3n / Gemma 4) runs on another device than the layer whose keys it reads. Place the "
                "layers that share keys on one device (device_map), or load the model with "
                'attn_implementation="sdpa".'
            )
        raise RuntimeError(
            "hf_paged: a PagedCache's block pool reached an attention implementation other than \"hf_paged\" "
            f"(it called {getattr(func, '__name__', func)}). Load the model with attn_implementation=\"hf_paged\" "
            '(or call model.set_attn_implementation("hf_paged")) before using a PagedCache.'
        )


def pool_tensor(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                device: torch.device, dtype: torch.dtype, kinds: int = 2) -> torch.Tensor:
    """An uninitialised pool ``[L, 2, N, bs, Hkv, D]`` stored head-major: ``[L, 2, Hkv, N * bs, D]`` in memory.

    ``kinds=1`` makes a ``[L, 1, N, bs, Hkv, D]`` pool of keys or of values alone: what a model whose keys and values
    differ in width (multi-head latent attention) gets, one for each (see `KVPool`).

    Every operation sees the logical shape, through strides. Storing each (layer, key/value, head) as one run of
    all the pool's slots makes any range of consecutive blocks one contiguous ``[tokens, D]`` matrix per head,
    which is how the attention kernels read keys best (twice as fast on CPU as token-major rows, in which a
    head's keys are strided by ``Hkv * D``); a block stays ``Hkv`` runs of ``bs * D`` elements for copies.
    """
    storage = torch.empty((num_layers, kinds, kv_heads, num_blocks, block_size, head_dim), device=device, dtype=dtype)
    return storage.permute(0, 1, 3, 4, 2, 5)


class KVPool:
    """Keys and values of all layers in blocks, held in one or more *slabs* (`hf_paged.storage`): each slab is one
    tensor ``[L, 2, n_s, bs, Hkv, D]`` (see `pool_tensor` for its memory layout) holding the block ids
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
        device, dtype: where and how to store keys and values (default: those of the first keys written).
    """

    def __init__(self, num_layers: int, block_size: int, num_blocks: int | None = None,
                 max_memory: int | None = None, device: torch.device | None = None, dtype: torch.dtype | None = None):
        self.num_layers = num_layers
        self.block_size = block_size
        self.requested_blocks = num_blocks
        self.max_memory = max_memory
        self.growable = num_blocks is None and max_memory is None
        self.device, self.dtype = device, dtype
        self.shared = False  # set by enable_prefix_caching: the pool outlives the caches that use it
        self.blocks = BlockPool(0, block_size)
        self.peak_blocks = 0  # the most blocks the slabs have held
        self.block_major = False  # slab layout (`hf_paged.storage`): block-major for the Triton kernels
        self.tensor: torch.Tensor | None = None
        self.tensors: list[torch.Tensor] = []
        self.slabs: list[list[torch.Tensor]] = []
        self.starts: list[int] = []  # per slab, its first block id
        self.offsets: list[tuple[int, torch.Tensor] | None] = []  # per tensor, block-major offsets (several slabs)
        self.own: dict[int, list[int]] = {}  # layers with tensors of their own (another shape): their tensor indices
        self.plain: list[tuple] = []
        self.guarded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.active: weakref.ref | None = None

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across keys and values of all layers (0 before the tensor exists)."""
        return sum(tensor.shape[0] * tensor.shape[1] * tensor.shape[3:].numel() * tensor.element_size()
                   for tensor in self.tensors)

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
        key_shape = (key_states.shape[1], key_states.shape[3])
        value_shape = (value_states.shape[1], value_states.shape[3])
        blocks = self.requested_blocks or 0
        element = torch.empty((), dtype=dtype).element_size()
        if self.max_memory is not None:
            per_block = (self.num_layers * self.block_size * (key_shape[0] * key_shape[1] + value_shape[0] * value_shape[1])
                         * element)
            blocks = self.max_memory // per_block
            if blocks <= 0:
                raise ValueError(
                    f"hf_paged: max_memory={self.max_memory} bytes holds no block; one block of {self.block_size} "
                    f"tokens takes {per_block} bytes for this model. Raise max_memory or lower block_size."
                )
        self.block_major = backend.use_triton(device)
        if key_shape == value_shape:
            tensors = [storage.slab_tensor(self.num_layers, blocks, self.block_size, *key_shape, device, dtype,
                                           block_major=self.block_major)]
        else:
            tensors = [storage.slab_tensor(self.num_layers, blocks, self.block_size, *shape, device, dtype, kinds=1,
                                           block_major=self.block_major) for shape in (key_shape, value_shape)]
        self.device, self.dtype = device, dtype
        self._bind([tensors], [0])
        if blocks:
            self.blocks.grow(max(blocks - self.blocks.num_blocks, 0))  # the block ids may be shared (device pools)
            self.peak_blocks = max(self.peak_blocks, blocks)

    def matches(self, key_states: torch.Tensor, value_states: torch.Tensor, layer: int | None = None) -> bool:
        """Whether layer `layer`'s stored keys and values (the shared tensors' when None) have these shapes."""
        keys, values = self.plain[layer] if layer is not None else (self.tensors[0][0, 0], self.tensors[-1][0, -1])
        return (key_states.shape[1], key_states.shape[3]) == (keys.shape[2], keys.shape[3]) and (
            value_states.shape[1], value_states.shape[3]) == (values.shape[2], values.shape[3])

    def allocate_layer(self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Give `layer` tensors of its own for keys like ``key_states`` and values like ``value_states`` (another
        shape than the shared tensors'), in every slab, zeroed (see `storage.slab_tensor`)."""
        if layer in self.own:
            raise ValueError(
                f"hf_paged: layer {layer} gives keys {tuple(key_states.shape)} and values {tuple(value_states.shape)}, "
                f"but it stored {self.describe(layer)} before; a layer's KV heads and head_dim must stay the same."
            )
        key_shape = (key_states.shape[1], key_states.shape[3])
        value_shape = (value_states.shape[1], value_states.shape[3])
        shapes = [key_shape] if key_shape == value_shape else [key_shape, value_shape]
        slabs = [tensors + [storage.slab_tensor(1, tensors[0].shape[2], self.block_size, *shape, self.device,
                                                self.dtype, kinds=3 - len(shapes), block_major=self.block_major)
                            for shape in shapes]
                 for tensors in self.slabs]
        self.own[layer] = list(range(len(self.tensors), len(self.tensors) + len(shapes)))
        self._bind(slabs, self.starts)  # the shared tensors and the other layers' own ones, then this layer's

    def describe(self, layer: int | None = None) -> str:
        """The stored key and value shapes (of `layer`, or of the shared tensors), for error messages."""
        keys, values = self.plain[layer] if layer is not None else (self.tensors[0][0, 0], self.tensors[-1][0, -1])
        return f"keys of {keys.shape[2]} heads of dim {keys.shape[3]}, values of {values.shape[2]} heads of dim " \
            f"{values.shape[3]}"

    def resize(self, num_blocks: int) -> None:
        """Grow the pool to `num_blocks` blocks by appending one zeroed slab (nothing stored moves or is copied).

        Zeroed: `ops.window_attention` scores every slot of its block range, unused ones included, and masks them,
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

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks ``src[i] -> dst[i]`` in every layer's keys and values (copy-on-write)."""
        if len(self.slabs) == 1:
            for tensor in self.tensors:
                backend.copy_blocks(tensor, torch.tensor(src, dtype=torch.int32, device=tensor.device),
                                    torch.tensor(dst, dtype=torch.int32, device=tensor.device))
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
                if sa == sb:  # inside one slab: the backend's copy (a kernel on the Triton path)
                    backend.copy_blocks(source, src_ids.to(torch.int32), dst_ids.to(torch.int32))
                else:
                    target[:, :, dst_ids] = source[:, :, src_ids]

    def gather_blocks(self, blocks: list[int], extra: int = 0) -> list[torch.Tensor]:
        """Per tensor, a new one-slab tensor holding `blocks` (in that order) then `extra` zeroed blocks: what
        `PagedCache.__deepcopy__` keeps."""
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
        self.tensors, self.tensor = slabs[0], slabs[0][0]
        several = len(slabs) > 1
        self.offsets = [storage.block_offsets([slab[i] for slab in slabs], self.starts)
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
        self.guarded = []
        for layer, (keys, values) in enumerate(places):
            # What `update` returns to the model: the first slab's views, guarded; attention reads `plain`.
            first = (slabs[0][keys[0]][keys[1], keys[2]], slabs[0][values[0]][values[1], values[2]])
            pair = (first[0].as_subclass(PagedPool), first[1].as_subclass(PagedPool))
            for pool in pair:
                setattr(pool, _OWNER_ATTR, weakref.ref(self))
                setattr(pool, _LAYER_ATTR, layer)
            self.guarded.append(pair)


@dataclass(eq=False)
class LayerGroup:
    """Attention layers that share block tables: all full-attention (and chunked) layers, or all layers of one
    sliding window (``window``: the keys Transformers' own DynamicCache keeps for them, `masks.cache_windows`).

    Every group holds the same rows at the same lengths; a sliding-window group releases the blocks that fell
    wholly out of its window (`PagedCache._begin_step`). Each group has its own pools (one per device-map entry,
    sharing the first one's block ids) and `BlockManager`, and builds its own step metadata.
    """

    window: int | None
    pool: KVPool
    manager: BlockManager
    pools: list[KVPool]
    step: StepMetadata | None = None
    step_layers: set = field(default_factory=set)
    device_steps: dict = field(default_factory=dict)
    lengths_before: list[int] = field(default_factory=list)
    _trim: bool = True

    @property
    def bytes_per_block(self) -> int:
        return sum(pool.bytes_per_block for pool in self.pools)

    def begin(self, lengths_before: list[int], q_len: int, trim: bool, fresh: bool = False, context=None) -> None:
        """Build the step's metadata after its slots were reserved (`PagedCache._begin_step`)."""
        device = self.pool.tensor.device
        self._trim = trim
        self.step = _build_step(self.manager, lengths_before, q_len, device, trim, fresh, context, self.pool.starts)
        self.device_steps, self.lengths_before, self.step_layers = {device: self.step}, lengths_before, set()

    def step_on(self, device: torch.device) -> StepMetadata:
        """This step's metadata with its tensors on `device` (built from the same block tables, once per device)."""
        step = self.device_steps.get(device)
        if step is None:
            step = _build_step(self.manager, self.lengths_before, self.step.q_len, device, self._trim,
                               self.step.fresh is not None, self.step.context, self.pool.starts)
            if step.fresh is not None:
                step.fresh = self.step.fresh  # one dict: a layer's update and attention may see different devices
            self.device_steps[device] = step
        return step

    def grow_to_first(self, pool: KVPool) -> None:
        """Give `pool` as many blocks as the group's first pool: the block ids are shared, so every pool holds all."""
        if pool is not self.pool and pool.tensor is not None and pool.num_blocks < self.pool.blocks.num_blocks:
            pool.follow(self.pool.starts, self.pool.blocks.num_blocks)

    def end(self) -> None:
        """Forget the step (rows were reordered, cropped or reset)."""
        self.step, self.step_layers, self.device_steps = None, set(), {}


class PagedLayer(CacheLayerMixin):
    """One layer's entry in a `PagedCache`.

    `keys` / `values` have their Transformers meaning: each row's keys (values) gathered out of the blocks,
    ``[B, Hkv, seq, D]``, computed on every access (a copy: writing into it changes nothing in the cache). The
    layer's block pools ``[N, bs, Hkv, D]`` themselves are `key_pool` / `value_pool`.

    All bookkeeping is per cache, not per layer: every method delegates to the owning `PagedCache`.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: PagedCache, layer_idx: int, slot: int | None = None):  # no super().__init__: keys/values are properties
        self._cache = weakref.proxy(cache)
        self.layer_idx = layer_idx
        self.slot = layer_idx if slot is None else slot  # this layer's index in the pool (attention layers only)

    @property
    def is_initialized(self) -> bool:
        return self._cache.layer_pools[self.layer_idx][0].tensor is not None

    @property
    def key_pool(self) -> torch.Tensor | None:
        """This layer's key pool ``[N, bs, Hkv, D]`` (a `hf_paged.storage.LayerStore` when the pool has several
        slabs; None before the first write)."""
        pool, slot = self._cache.layer_pools[self.layer_idx]
        return pool.plain[slot][0] if pool.plain else None

    @property
    def value_pool(self) -> torch.Tensor | None:
        """This layer's value pool ``[N, bs, Hkv, D]`` (None before the first write)."""
        pool, slot = self._cache.layer_pools[self.layer_idx]
        return pool.plain[slot][1] if pool.plain else None

    @property
    def keys(self) -> torch.Tensor | None:
        """Each row's keys ``[B, Hkv, seq, D]``, gathered (None before the first write)."""
        return self._gather(self.key_pool)

    @property
    def values(self) -> torch.Tensor | None:
        """Each row's values ``[B, Hkv, seq, D]``, gathered (None before the first write)."""
        return self._gather(self.value_pool)

    def _gather(self, pool: torch.Tensor | None) -> torch.Tensor | None:
        if pool is None:
            return None
        manager = self._cache.layer_groups[self.layer_idx].manager
        return ops.gather_kv(pool, _padded_tables(manager, pool.device), max(manager.lengths, default=0))

    @property
    def record_past(self) -> bool:
        """The cache's `PagedCache.record_past` (Transformers sets it on layers that have it)."""
        return self._cache.record_past

    @record_past.setter
    def record_past(self, value: bool) -> None:
        self._cache.record_past = bool(value)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._cache.layer_pools[self.layer_idx][0].allocate(key_states, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._cache.update(key_states, value_states, self.layer_idx)

    # Computed here rather than by asking the cache: some families (RecurrentGemma in 5.17) point the cache's own
    # get_seq_length / get_mask_sizes at their first attention layer's.
    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        return self.get_seq_length() + compat.query_length(query_length), 0

    def get_seq_length(self) -> int:
        return max(self._cache.manager.lengths, default=0)

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of `get_max_length` in older 5.x releases
        return -1


class PagedHybridLayer(PagedLayer, LinearAttentionLayer):
    """A layer with both attention (paged, as `PagedLayer`) and linear-attention / Mamba states (Transformers' own
    `LinearAttentionLayer` bookkeeping: ``conv_states`` / ``recurrent_states`` ``[B, ...]`` per row)."""

    is_compileable = False

    def __init__(self, cache: PagedCache, layer_idx: int, slot: int, number_of_states: int = 1):
        PagedLayer.__init__(self, cache, layer_idx, slot)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)

    def lazy_initialization(self, *args, **kwargs) -> None:
        if len(args) == 2 and not kwargs:
            PagedLayer.lazy_initialization(self, *args)
        else:
            LinearAttentionLayer.lazy_initialization(self, **kwargs)

    @property
    def is_croppable(self) -> bool:
        return compat.class_attribute(LinearAttentionLayer, "is_croppable", self)

    def activate_past_recording(self, *args, **kwargs) -> None:
        """Start recording past states (Transformers' `LinearAttentionLayer` bookkeeping: 5.25 passes
        ``recurrent_states_to_keep`` and keeps a history of recurrent states); the cache records its keys itself."""
        compat.call_accepting(functools.partial(LinearAttentionLayer.activate_past_recording, self, *args), **kwargs)


class KVSharedLayer(CacheLayerMixin):
    """The entry of a layer that keeps no keys and values: it attends over those of layer `source` (KV sharing,
    `support.kv_sources`), whose pools the model hands its attention; it has no pool and never calls ``update``, as
    Transformers' own caches give such layers no storage. `keys` / `values` are the source layer's."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: PagedCache, layer_idx: int, source: int):  # no super().__init__: keys/values are properties
        self._cache = weakref.proxy(cache)
        self.layer_idx = layer_idx
        self.source = source

    @property
    def is_initialized(self) -> bool:
        return self._cache.layers[self.source].is_initialized

    @property
    def keys(self) -> torch.Tensor | None:
        return self._cache.layers[self.source].keys

    @property
    def values(self) -> torch.Tensor | None:
        return self._cache.layers[self.source].values

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._cache.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        return self._cache.layers[self.source].get_mask_sizes(query_length)

    def get_seq_length(self) -> int:
        return self._cache.layers[self.source].get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1


def _state_layers(layers: list) -> list:
    """The layers of a cache that hold Transformers' per-row linear-attention / Mamba states."""
    return [layer for layer in layers if isinstance(layer, LinearAttentionCacheLayerMixin)]


def _select_states(layer: LinearAttentionCacheLayerMixin, index: torch.Tensor) -> None:
    """Row ``i`` of every conv / recurrent state of `layer` becomes old row ``index[i]``."""
    for states, ready in ((layer.conv_states, layer.is_conv_states_initialized),
                          (layer.recurrent_states, layer.is_recurrent_states_initialized)):
        for i in states:
            if ready[i]:
                states[i] = states[i].index_select(0, index.to(states[i].device))
    if hasattr(layer, "batch_size"):
        layer.batch_size = len(index)


def layer_plan(config) -> tuple[list[str], list[dict]]:
    """Per layer, its kind for a `PagedCache` (``"paged"``, ``"state"``, ``"hybrid"``, or ``"shared"`` for a layer that
    reads another layer's keys and values, `support.kv_sources`) and the keyword arguments of Transformers' cache layer
    class for it, read from the config's ``layer_types`` as `DynamicCache` does."""
    kinds, layer_kwargs = _layer_kinds(config)
    for layer, source in support.kv_sources(config).items():
        if layer < len(kinds) and source < len(kinds) and kinds[source] == "paged":
            kinds[layer], layer_kwargs[layer] = "shared", {"source": source}
    return kinds, layer_kwargs


def _layer_kinds(config) -> tuple[list[str], list[dict]]:
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    num_layers = getattr(text_config, "num_hidden_layers", None)
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    except Exception:  # a config Transformers' own helper cannot read: every layer is plain attention
        layer_types, layer_kwargs = [], []
    if not isinstance(num_layers, int) or len(layer_types) != num_layers:
        count = num_layers if isinstance(num_layers, int) and num_layers > 0 else 0
        return ["paged"] * count, [{} for _ in range(count)]
    kinds = []
    for layer_type in layer_types:
        cls = DYNAMIC_LAYER_TYPE_MAPPING.get(layer_type)
        if isinstance(cls, type) and issubclass(cls, LinearAttentionCacheLayerMixin):
            kinds.append("hybrid" if issubclass(cls, CacheLayerMixin) else "state")
        else:
            kinds.append("paged")
    if isinstance(layer_kwargs, dict):  # 5.17 and before: one dict for every layer
        layer_kwargs = [layer_kwargs] * len(kinds)
    return kinds, [dict(kwargs) for kwargs in layer_kwargs]


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
    ):
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"hf_paged: block_size must be a positive int, got {block_size!r}.")
        if num_blocks is not None and max_memory is not None:
            raise ValueError("hf_paged: pass either num_blocks or max_memory to PagedCache, not both.")
        if num_blocks is not None and (isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0):
            raise ValueError(f"hf_paged: num_blocks must be a positive int, got {num_blocks!r}.")
        max_memory = _parse_bytes(max_memory) if max_memory is not None else None
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        num_layers = getattr(text_config, "num_hidden_layers", None)
        if not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError("hf_paged: PagedCache needs a model config with `num_hidden_layers`.")
        support.check_layer_types(config)
        kinds, layer_kwargs = layer_plan(config)
        # Multi-head latent attention (DeepSeek-V2/V3, Kimi, ...) caches the compressed latents and expands them into
        # keys and values after the cache: those layers get their rows' latents back, gathered out of the blocks.
        latent = getattr(text_config, "kv_lora_rank", None) is not None
        paged_layers = sum(kind in ("paged", "hybrid") for kind in kinds)
        attn = getattr(config, "_attn_implementation", None)
        if attn is not None and attn != "hf_paged":
            raise ValueError(
                f"hf_paged: this config uses attn_implementation={attn!r}; a PagedCache only works with models loaded "
                'with attn_implementation="hf_paged" (its attention reads the block tables).'
            )
        attention_layers = [layer for layer, kind in enumerate(kinds) if kind in ("paged", "hybrid")]
        if layer_devices is not None:
            if pool is not None or device is not None or max_memory is not None:
                raise ValueError(
                    "hf_paged: layer_devices places every layer's pool itself; leave pool, device and max_memory "
                    "unset (num_blocks may size the pools)."
                )
            if len(layer_devices) != num_layers:
                raise ValueError(f"hf_paged: layer_devices has {len(layer_devices)} entries but the model has "
                                 f"{num_layers} layers; give one device (or (name, device) pair) per layer.")
        elif pool is not None and ((num_blocks, max_memory, device, dtype) != (None, None, None, None)
                                   or (isinstance(pool, KVPool) and pool.num_layers != paged_layers)):
            raise ValueError("hf_paged: a PagedCache given a shared pool takes its size, device and dtype from it.")
        # Layers whose keys Transformers' own DynamicCache keeps only for a sliding window get block tables of their
        # own, whose blocks outside the window are released (`LayerGroup`). One shared pool and the latents of
        # multi-head latent attention (which the model reads whole) keep every layer in one group.
        # Chunked-attention layers (Llama 4) stay with the full-attention layers: their chunks start at each row's
        # first real token, which the tables' positions must keep.
        layer_types = getattr(text_config, "layer_types", None) or []
        if isinstance(pool, KVPool) or latent:
            windows = [None] * len(attention_layers)
        else:
            cache_windows = masks.cache_windows(config)  # one DynamicCache asked, not one per layer
            windows = [None if layer < len(layer_types) and "chunk" in str(layer_types[layer])
                       else (cache_windows[layer] if layer < len(cache_windows) else None)
                       for layer in attention_layers]
        group_windows = sorted(set(windows), key=lambda w: -1 if w is None else w)
        pools = {None: pool} if isinstance(pool, KVPool) else pool
        if pools is not None and attention_layers:
            expected = {w: windows.count(w) for w in group_windows}
            given = {w: p.num_layers for w, p in pools.items()}
            if given != expected:
                raise ValueError(
                    f"hf_paged: the shared pools given to this PagedCache hold {given} layers per window, but this "
                    f"config's attention layers need {expected} (window: layers). Build the pools for this model's "
                    "config (hf_paged.enable_prefix_caching(model) does)."
                )
        specs = []
        for window in group_windows:
            members = [i for i, w in enumerate(windows) if w == window]
            if layer_devices is not None:
                devices = [layer_devices[attention_layers[i]] for i in members]
                first, slot_pools = _device_pools(devices, block_size, num_blocks, dtype)
            else:
                budget = None if max_memory is None else max(max_memory * len(members) // len(attention_layers), 1)
                first = pools[window] if pools is not None else KVPool(
                    len(members), block_size, num_blocks, budget,
                    torch.device(device) if device is not None else None, dtype)
                slot_pools = [(first, slot) for slot in range(len(members))]
            specs.append((window, first, members, slot_pools))
        self._init_state(specs, kinds, layer_kwargs, latent)

    def _init_state(self, specs: list, kinds: list[str], layer_kwargs: list[dict], latent: bool = False) -> None:
        """Build the layers and groups. `specs`: per group ``(window, first pool, its attention layers (indices
        among the attention layers), per such layer (its pool, its index there))``."""
        self._kinds, self._layer_kwargs, self.latent = kinds, layer_kwargs, latent
        layers, slot = [], 0
        for i, (kind, kwargs) in enumerate(zip(kinds, layer_kwargs, strict=True)):
            if kind == "state":
                layers.append(LinearAttentionLayer(**{k: v for k, v in kwargs.items() if k == "number_of_states"}))
                continue
            if kind == "shared":
                layers.append(KVSharedLayer(self, i, kwargs["source"]))
                continue
            if kind == "hybrid":
                layers.append(PagedHybridLayer(self, i, slot, kwargs.get("number_of_states", 1)))
            else:
                layers.append(PagedLayer(self, i, slot))
            slot += 1
        super().__init__(layers=layers)
        if not specs:  # a model without attention layers: one empty group keeps the bookkeeping uniform
            specs = [(None, KVPool(0, 16), [], [])]
        self.groups = [LayerGroup(window, first, BlockManager(block_size=first.block_size, pool=first.blocks),
                                  list({id(p): p for p, _ in slot_pools}.values()) or [first])
                       for window, first, _, slot_pools in specs]
        # Per layer, its pool and its index there, and its group (None for state layers). `pools` lists every pool
        # once; `pool` and `manager` are the first group's (the full-attention layers' when there are any).
        by_slot: dict[int, tuple[LayerGroup, tuple[KVPool, int]]] = {}
        for group, (_, _, members, slot_pools) in zip(self.groups, specs, strict=True):
            for member, place in zip(members, slot_pools, strict=True):
                by_slot[member] = (group, place)
        attention = [layer for layer in layers if isinstance(layer, PagedLayer)]
        self.layer_pools = [None] * len(layers)
        self.layer_groups: list[LayerGroup | None] = [None] * len(layers)
        for layer in attention:
            self.layer_groups[layer.layer_idx], self.layer_pools[layer.layer_idx] = by_slot[layer.slot]
        self.pools = [pool for group in self.groups for pool in group.pools]
        self.state_layers = _state_layers(layers)
        self.pool = self.groups[0].pool  # it owns the block ids (`KVPool.blocks`) the first group's pools share
        self.block_size = self.pool.block_size
        self.manager = self.groups[0].manager
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
        self._read_layer: int | None = None  # the layer whose pools `attention_inputs` returned last
        self._kv_sources = {layer: layer_.source for layer, layer_ in enumerate(layers)
                            if isinstance(layer_, KVSharedLayer)}
        self._kv_read = sorted(set(self._kv_sources.values()))  # layers whose keys KV-shared layers read
        self._ended: torch.Tensor | None = None
        self._cache_windows: dict[int, tuple] = {}  # `cache_window`'s memo: id(config) -> (config, windows)
        self._forks = 1  # `expect_forks`: the rows each row of the next steps becomes
        self._max_length: int | None = None  # `expect_length`: the most tokens a row will hold in this call
        self._known_ids: torch.Tensor | None = None  # `note_tokens`: ``[rows, m]`` ids of each row's first m tokens

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
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.layer_pools):
            raise ValueError(
                f"hf_paged: layer {layer_idx!r} wrote to a PagedCache built for {len(self.layer_pools)} layer(s) "
                f"(layers 0..{len(self.layer_pools) - 1}, from the num_hidden_layers of the config it was given). Build the cache "
                "from the config of the model that uses it: PagedCache(model.config)."
            )
        if key_states.requires_grad or value_states.requires_grad:
            raise RuntimeError(
                f"hf_paged: layer {layer_idx} stored keys that require grad in a PagedCache. Its blocks are written in "
                "place and its attention reads them back, so no gradient could flow through them: run the forward "
                "pass under torch.no_grad() or torch.inference_mode() (generate() does), or, to train, call the "
                "model without a PagedCache (use_cache=False or a DynamicCache)."
            )
        if isinstance(self.layers[layer_idx], KVSharedLayer):
            raise ValueError(
                f"hf_paged: layer {layer_idx} stored keys and values in a PagedCache, but the model config makes it a "
                f"KV-shared layer (it reads layer {self._kv_sources[layer_idx]}'s keys and values and keeps none). The "
                "cache must be built from this model's config."
            )
        if self.layer_pools[layer_idx] is None:
            raise ValueError(
                f"hf_paged: layer {layer_idx} stored keys and values in a PagedCache, but the model config makes it a "
                "linear-attention / state-space layer. The cache must be built from this model's config."
            )
        pool, slot = self.layer_pools[layer_idx]
        group = self.layer_groups[layer_idx]
        if pool.tensor is None:
            pool.allocate(key_states, value_states)
            group.grow_to_first(pool)
        if key_states.device != pool.tensor.device:
            raise ValueError(
                f"hf_paged: layer {layer_idx} computes its keys on {key_states.device}, but its PagedCache pool is on "
                f"{pool.tensor.device}. For a model split across devices (device_map), let generate() build the cache "
                "or pass PagedCache(config, layer_devices=hf_paged.devices.layer_placements(model)); prefix caching "
                "(enable_prefix_caching) keeps one pool on one device and does not support such models yet."
            )
        if value_states.shape[0] != key_states.shape[0] or value_states.shape[2] != key_states.shape[2]:
            raise ValueError(
                f"hf_paged: layer {layer_idx} gives keys {tuple(key_states.shape)} and values "
                f"{tuple(value_states.shape)}: a PagedCache needs keys and values of the same batch size and number "
                "of tokens."
            )
        if not pool.matches(key_states, value_states, slot):
            pool.allocate_layer(slot, key_states, value_states)  # a layer of another shape: tensors of its own
        if group.step is None or layer_idx in group.step_layers:
            self._begin_step(group, key_states.shape[0], key_states.shape[2])
        group.step_layers.add(layer_idx)
        batch, _, q_len, _ = key_states.shape
        keys = key_states.transpose(1, 2).reshape(batch * q_len, *key_states.shape[1:2], key_states.shape[3])
        values = value_states.transpose(1, 2).reshape(batch * q_len, value_states.shape[1], value_states.shape[3])
        key_pool, value_pool = pool.plain[slot]
        step = group.step_on(pool.tensor.device)
        if isinstance(key_pool, storage.LayerStore) or isinstance(value_pool, storage.LayerStore):
            # Several slabs: the kernels address them through the pool's offset tables, PyTorch slab by slab.
            backend.reshape_and_cache(keys, values, key_pool, value_pool, step.slot_mapping, triton=step.triton)
        elif step.triton:
            backend.kernels().reshape_and_cache(keys, values, key_pool, value_pool, step.slot_mapping)
        else:
            ops.reshape_and_cache(keys, values, key_pool, value_pool, step.slot_mapping, skip_negative=step.skips)
        if step.fresh is not None:  # a step that keeps only its last tokens: attention reads them as they are
            step.fresh[layer_idx] = (key_states, value_states)
        if self.latent:  # multi-head latent attention: each row's latents, or the pools once absorbed (latent.py)
            gathered = latent.gathered_latents(self, layer_idx, (key_pool, value_pool), step, key_states, value_states)
            if gathered is not None:
                return gathered
        self._pending_layer = layer_idx
        pool.active = weakref.ref(self)
        return pool.guarded[slot]

    def _begin_step(self, group: LayerGroup, batch: int, q_len: int) -> None:
        """Reserve slots for ``q_len`` new tokens in every row of `group` and build its step's metadata.

        What the step takes: a slot for every new token at or past the row's live start, which is its first real
        token (left padding takes no block) and, in a sliding-window group, the first key the step's first query
        still sees (blocks wholly before it are released first). A multi-token step in a sliding-window group whose
        first tokens are out of the window by its end stores only its last ``window - 1`` tokens: its attention reads
        the kept keys gathered beforehand (`StepMetadata.context`) and the step's own keys as they are.
        """
        manager = group.manager
        new_rows = manager.num_rows == 0
        if not new_rows and manager.num_rows != batch:
            raise ValueError(
                f"hf_paged: the cache holds {manager.num_rows} sequences but the model was called with a batch of "
                f"{batch}. Pass a batch of the same size, or reset the cache (cache.reset()) to start over."
            )
        if new_rows:
            manager.add_rows(batch)
        ended = self._ended.tolist() if self._ended is not None and len(self._ended) == manager.num_rows else None
        ended = ended if ended is not None and any(ended) else None
        lengths_before = list(manager.lengths)
        live = None
        if new_rows and self._row_starts is not None and len(self._row_starts) == batch:
            live = list(self._row_starts)
        if ended is not None:  # an ended row of its own blocks gives them back, all but the one it writes into
            private = manager.private_rows(ended)
            if any(private):
                base = manager.live_from if live is None else live
                live = [length if mine else start for start, length, mine in zip(base, lengths_before, private,
                                                                                   strict=True)]
        context, partial = None, False
        window = group.window
        if window is not None and not self.record_past:
            seen = [max(length - window + 1, 0) for length in lengths_before]  # first key the first query sees
            kept = [max(length + q_len - window + 1, 0) for length in lengths_before]  # first key kept after it
            # Rows of one length (as generate's) can keep only a step's last tokens: its attention reads the rest.
            # A prefix-cache pool (shared) stores every prompt token, so that its full blocks can be indexed.
            partial = (q_len > 1 and len(set(lengths_before)) == 1 and kept[0] > lengths_before[0]
                       and not group.pool.shared)
            if partial:
                if lengths_before[0] > 0:
                    context = self._gather_context(group, seen, lengths_before)
                target = kept
            else:
                target = seen
            live = target if live is None else [max(a, b) for a, b in zip(live, target, strict=True)]
        try:
            needed = manager.blocks_needed(q_len, ended, live)
            grows = needed > group.pool.blocks.num_free
            group.pool.ensure_free(needed, slack=self._slack(group, lengths_before, q_len, ended) if grows else 0)
            for pool in group.pools[1:]:
                group.grow_to_first(pool)
            copies = manager.append(q_len, ended, live)
        except BaseException:
            if new_rows:
                manager.reset()
            raise
        if copies:
            src, dst = zip(*copies, strict=True)
            for pool in group.pools:
                if pool.tensor is not None:
                    pool.copy_blocks(list(src), list(dst))
        # Each peak on its own: groups of different bytes per block reach their block and byte peaks at other steps.
        self.peak_used_blocks = max(self.peak_used_blocks, sum(g.manager.num_used for g in self.groups))
        self.peak_used_bytes = max(self.peak_used_bytes,
                                   sum(g.manager.num_used * g.bytes_per_block for g in self.groups))
        group.begin(lengths_before, q_len, trim=not self.latent, fresh=partial, context=context)

    def _slack(self, group: LayerGroup, lengths_before: list[int], q_len: int, ended: list[bool] | None) -> int:
        """The blocks of slack a growing pool adds beyond what a step misses (see `KVPool`): per row that takes
        blocks as decoding goes on (the step's rows not ended, each forked `_forks` ways right after it), a quarter
        of a row's blocks, 1 to `_SLAB_BLOCKS_PER_ROW` (short rows waste little, long ones make few slabs; 1 in a
        sliding-window group, whose rows reuse what they release), and at least 1/`_SLAB_FRACTION` of the pool;
        but never more than those rows can still take before `expect_length`'s ``max_length``."""
        manager, bs = group.manager, group.manager.block_size
        rows = [row for row in range(manager.num_rows) if ended is None or not ended[row]]
        if group.window is not None and not self.record_past:
            per_row = 1
        else:
            per_row = min(_SLAB_BLOCKS_PER_ROW, max(1, (sum(lengths_before) + q_len * len(lengths_before))
                                                    // (4 * bs * max(len(lengths_before), 1))))
        slack = max(per_row * max(len(rows) * self._forks, 1), group.pool.num_blocks // _SLAB_FRACTION)
        if self._max_length is None:
            return slack
        # After the step a row can still take the blocks up to max_length's, and a fork its partial block's copy.
        reach, left = -(-self._max_length // bs), 0
        for row in rows:
            length = lengths_before[row] + q_len
            left += max(reach - -(-length // bs) + (self._forks > 1 and length % bs > 0), 0)
        return min(slack, left * self._forks)

    def _gather_context(self, group: LayerGroup, start: list[int], end: list[int]):
        """Per layer of `group`, keys and values ``[B, H, n, D]`` of positions ``[min(start), max(end))``: what a
        sliding-window step that keeps only its last tokens reads besides them (``(first position, per layer)``)."""
        first, last = min(start), max(end)
        bs = group.manager.block_size
        tables = [table[first // bs:-(-last // bs)] for table in group.manager.tables]
        offset = first % bs
        per_device: dict[torch.device, torch.Tensor] = {}  # the tables once per device, not once per layer
        gathered = {}
        for layer, place in enumerate(self.layer_pools):
            if place is None or self.layer_groups[layer] is not group or place[0].tensor is None:
                continue
            pool, slot = place
            device = pool.tensor.device
            if device not in per_device:
                per_device[device] = _table_tensor(tables, device).clamp_min_(0)
            gathered[layer] = tuple(
                ops.gather_kv(store, per_device[device], offset + last - first)[:, :, offset:]
                for store in pool.plain[slot])
        return first, gathered

    def attention_inputs(self, key: torch.Tensor) -> tuple[StepMetadata, torch.Tensor, torch.Tensor]:
        """This step's metadata (on the pool's device) and the plain key and value pools behind `key`, the guarded
        key pool the layer's ``update`` returned, for its attention function.

        Marks the layer's new keys as read. Reading the layer off the pool (not the module's ``layer_idx``) serves
        models that run one module for several cache layers (HRM's cycles).
        """
        pool_ref = getattr(key, _OWNER_ATTR, None)
        place = (pool_ref() if pool_ref is not None else None, getattr(key, _LAYER_ATTR, None))
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
        self._read_layer = layer
        pool, slot = self.layer_pools[layer]
        return (self.layer_groups[layer].step_on(pool.tensor.device), *pool.plain[slot])

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

    def fresh_inputs(self, step: StepMetadata) -> tuple:
        """For a step that stores only its last tokens (``step.fresh`` set), the layer just read: ``(kept
        keys, kept values, the step's keys, the step's values)``, the kept ones ``[B, H, n, D]`` from position
        ``step.kv_start`` on (None when the rows held nothing before), the step's own ``[B, H, q, D]`` as given."""
        layer = self._read_layer
        # A layer other layers read (KV sharing) keeps its entry for them until the step ends.
        keys, values = step.fresh[layer] if layer in self._kv_read else step.fresh.pop(layer)
        kept = step.context[1].get(layer) if step.context is not None else None
        return (kept[0] if kept else None), (kept[1] if kept else None), keys, values

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
            if group.window is not None and any(live > max(length - group.window + 1, 0)
                                                for live in group.manager.live_from):
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
            if group.window is not None and group.manager.num_rows:
                # As Transformers' sliding-window layers: after a crop only the window is kept.
                group.manager.release_before([max(length - group.window + 1, 0)] * group.manager.num_rows)
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
                _select_states(layer, index)
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
        used = blocks = free = shared = cached = pool_bytes = used_bytes = peak_pool = logical_bytes = 0
        for group in self.groups:
            manager, pool, per_block = group.manager, group.pool, group.bytes_per_block
            # A fixed pool of num_blocks is allocated at the first write: report its configured size before that.
            unallocated = pool.tensor is None and pool.requested_blocks is not None
            num_blocks = pool.requested_blocks if unallocated else manager.num_blocks
            used += manager.num_used
            blocks += num_blocks
            free += num_blocks - manager.num_used if unallocated else manager.num_free
            shared += manager.num_shared
            cached += pool.blocks.num_cached
            used_bytes += manager.num_used * per_block
            pool_bytes += manager.num_blocks * per_block
            peak_pool += pool.peak_blocks * per_block
            logical_bytes += sum(manager.lengths) * (per_block // self.block_size)
        return CacheStats(
            block_size=self.block_size,
            num_blocks=blocks,
            used_blocks=used,
            free_blocks=free,
            shared_blocks=shared,
            logical_tokens=sum(self.manager.lengths),
            used_bytes=used_bytes,
            logical_bytes=logical_bytes,
            pool_bytes=pool_bytes,
            peak_used_blocks=self.peak_used_blocks,
            peak_used_bytes=self.peak_used_bytes,
            peak_pool_bytes=peak_pool,
            cow_copies=sum(group.manager.cow_copies for group in self.groups),
            num_rows=self.manager.num_rows,
            prefix_hit_tokens=self.prefix_hit_tokens,
            cached_blocks=cached,
        )

    def __deepcopy__(self, memo: dict) -> PagedCache:
        """An independent copy with pools of its own (one per layer group) holding just this cache's blocks
        (Transformers' prompt-reuse recipe: ``copy.deepcopy(prompt_cache)``). Sharing between rows is kept."""
        if any(len(group.pools) > 1 for group in self.groups):
            raise NotImplementedError("hf_paged: copying a PagedCache whose layers are on several devices is not "
                                      "supported; run the prompt again for each copy instead.")
        specs, managers = [], []
        for group in self.groups:
            used = sorted({block for table in group.manager.tables for block in table if block >= 0})
            renumber = {block: new for new, block in enumerate(used)}
            renumber[NULL_BLOCK] = NULL_BLOCK
            old = group.pool
            pool = KVPool(old.num_layers, old.block_size, device=old.device, dtype=old.dtype)
            if old.tensor is not None:
                pool.own = {layer: list(own) for layer, own in old.own.items()}  # the same layout (`KVPool._bind`)
                pool.block_major = old.block_major
                pool._bind([old.gather_blocks(used)], [0])  # one slab, whatever the original's count
                pool.blocks.grow(len(used))
                pool.blocks.free_blocks.clear()
                pool.peak_blocks = len(used)
            # The group's layers (by their index among the attention layers) at the same places in the new pool.
            layers = [layer for layer in self.layers if isinstance(layer, PagedLayer)
                      and self.layer_groups[layer.layer_idx] is group]
            specs.append((group.window, pool, [layer.slot for layer in layers],
                          [(pool, self.layer_pools[layer.layer_idx][1]) for layer in layers]))
            managers.append((group.manager, renumber))
        clone = PagedCache.__new__(PagedCache)
        memo[id(self)] = clone
        clone._init_state(specs, self._kinds, self._layer_kwargs, self.latent)
        clone.record_past = self.record_past
        for mine, theirs in zip(self.layers, clone.layers, strict=True):
            if isinstance(mine, LinearAttentionCacheLayerMixin):
                for name in ("conv_states", "recurrent_states", "is_conv_states_initialized",
                             "is_recurrent_states_initialized", "has_previous_state", "conv_kernel_size", "device",
                             "dtype", "record_past"):
                    setattr(theirs, name, copy.deepcopy(getattr(mine, name), memo))
        for group, (source, renumber) in zip(clone.groups, managers, strict=True):
            manager = group.manager
            manager.tables = [[renumber[block] for block in table] for table in source.tables]
            manager.lengths = list(source.lengths)
            manager.live_from = list(source.live_from)
            manager.cow_copies = source.cow_copies
            for table in manager.tables:
                for block in table:
                    if block >= 0:
                        group.pool.blocks.ref_counts[block] += 1
        clone.peak_used_blocks, clone.prefix_hit_tokens = self.peak_used_blocks, self.prefix_hit_tokens
        clone.peak_used_bytes, clone._known_ids = self.peak_used_bytes, self._known_ids
        return clone

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"PagedCache(block_size={s.block_size}, rows={s.num_rows}, tokens={s.logical_tokens}, "
            f"blocks={s.used_blocks}/{s.num_blocks} used, {s.shared_blocks} shared)"
        )


def owner_of(tensor: torch.Tensor) -> PagedCache | None:
    """The `PagedCache` that just wrote into the pool `tensor` belongs to, or None for ordinary key/value tensors."""
    pool_ref = getattr(tensor, _OWNER_ATTR, None)
    pool = pool_ref() if pool_ref is not None else None
    return pool.active() if pool is not None and pool.active is not None else None


def _release_rows(managers: list[BlockManager]) -> None:
    for manager in managers:
        with manager.pool.lock:
            manager.reset()


def _padded_tables(manager, device: torch.device) -> torch.Tensor:
    """The rows' block tables as one ``[B, nb]`` int32 tensor on `device` (short rows padded with block 0; null
    entries, which only dead tokens occupy, read block 0 too)."""
    return _table_tensor(manager.tables, device).clamp_min_(0)


def _table_tensor(tables: list[list[int]], device: torch.device) -> torch.Tensor:
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


def _build_step(manager: BlockManager, lengths_before: list[int], q_len: int, device: torch.device,
                trim: bool = True, fresh: bool = False, context=None, starts: list[int] | None = None) -> StepMetadata:
    """This step's metadata: `trim` leaves out the leading blocks no row needs; `fresh` / `context` as in
    `StepMetadata`; `starts`: the first block id of each of the pool's slabs (None: one slab)."""
    bs = manager.block_size
    first = manager.first_live_block() if trim and manager.num_rows else 0
    if first:  # keep at least each row's last entry (a row all of dead tokens, e.g. an empty prompt)
        first = max(min(first, min(len(table) for table in manager.tables) - 1), 0)
    offset = first * bs
    rows = _Rows([table[first:] for table in manager.tables] if first else manager.tables,
                 [length - offset for length in manager.lengths] if first else manager.lengths, bs)
    raw = _table_tensor(rows.tables, device)
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
    starts = starts or [0]
    first_block = _consecutive_start(rows.tables[0], starts) if rows.num_rows == 1 else None
    window = windows = None
    if not triton and q_len <= _WINDOW_MAX_QUERIES and (
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
    return StepMetadata(
        block_tables=block_tables,
        seq_lens=seq_lens,
        slot_mapping=slots.reshape(-1),
        q_len=q_len,
        max_seq_len=max_seq_len,
        block_size=bs,
        triton=triton,
        shared=_shared_prefix(rows, q_len, device, starts) if window is None and windows is None else None,
        first_block=first_block,
        window=window,
        windows=windows,
        first_entries=first_entries,
        skips=skips,
        key_offset=offset,
        fresh={} if fresh else None,
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


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def _parse_bytes(value: int | str) -> int:
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


def _device_pools(attention_devices, block_size: int, num_blocks: int | None,
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
    pools = {key: KVPool(len(layers), block_size, num_blocks, device=key[1], dtype=dtype)
             for key, layers in groups.items()}
    first = pools[keys[0]]
    for pool in pools.values():
        pool.blocks = first.blocks  # one set of block ids; every other pool follows the first one's size
    return first, [(pools[key], groups[key].index(layer)) for layer, key in enumerate(keys)]
