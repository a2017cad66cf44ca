"""`PagedCache`: a `transformers.Cache` whose keys and values live in fixed-size blocks addressed by block tables."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import backend, compat, ops
from .block_manager import BlockManager, BlockPool, OutOfBlocksError

__all__ = ["CacheStats", "KVPool", "PagedCache", "StepMetadata", "pool_tensor"]

# When the pool must grow, it grows to at least this factor of its current size (amortises the copy).
_GROWTH_FACTOR = 1.5
# On the PyTorch path a step reads all rows' keys as one block range (`ops.window_attention`) when the range holds
# at most `_WINDOW_EXTRA_KEYS` keys (or a quarter of the longest row, if more) beyond the longest row's: every
# query scores those other rows' keys for nothing, which costs less than the gathers, the second attention call
# and the merge of `ops.shared_prefix_attention` up to about that many keys (measured on SmolLM2-135M, 8 rows).
# Only for steps of at most `_WINDOW_MAX_QUERIES` new tokens per row (decoding, assisted decoding; not prefill).
_WINDOW_EXTRA_KEYS = 1024
_WINDOW_MAX_QUERIES = 16
_OWNER_ATTR = "_hf_paged_owner"


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of a `PagedCache`. Byte counts cover keys and values of all layers.

    ``num_blocks``, ``free_blocks``, ``pool_bytes`` and ``cached_blocks`` describe the pool (shared by the caches of
    a model when prefix caching is on); the other fields describe this cache's rows. For a cache with a pool of
    its own, ``used_blocks + free_blocks == num_blocks``.
    """

    block_size: int
    num_blocks: int
    used_blocks: int  # physical blocks referenced by at least one row of this cache
    free_blocks: int  # blocks a step may take (free, or cached but unreferenced)
    shared_blocks: int  # blocks referenced more than once by this cache's rows (a shared prompt, beams)
    logical_tokens: int  # sum of the rows' lengths: what a contiguous cache would hold
    used_bytes: int  # bytes of the used blocks
    logical_bytes: int  # bytes a contiguous (DynamicCache-like) cache would need for the same rows
    pool_bytes: int  # bytes allocated for the whole pool
    peak_used_blocks: int
    peak_used_bytes: int
    cow_copies: int  # block copies made by copy-on-write so far
    num_rows: int
    prefix_hit_tokens: int  # prompt tokens taken from the prefix cache instead of computed, per row summed
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
        shared: how rows share leading blocks (beams, samples of one prompt), or None; only planned for the
            PyTorch path when `window` is None.
        first_block: with a single row whose blocks are consecutive, the first one (keys are read in place).
        window: ``(first_block, num_blocks)``, a block range holding every row's blocks and not much else (see
            `_WINDOW_EXTRA_KEYS`), or None.
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
    _masks: dict = field(default_factory=dict)

    def window_mask(self, attention_mask: torch.Tensor | None, sliding_window: int | None, groups: int,
                    dtype: torch.dtype) -> torch.Tensor:
        """The mask of `ops.window_attention` over `window` (built once per step for all layers)."""
        key = ("window", id(attention_mask), sliding_window, groups, dtype)
        if key not in self._masks:
            padding = None if attention_mask is None else key_padding_mask(attention_mask, self.max_seq_len)
            self._masks[key] = ops.window_mask(
                self.block_tables, self.seq_lens, self.q_len, *self.window, self.block_size, groups=groups,
                dtype=dtype, key_padding=padding, sliding_window=sliding_window,
            )
        return self._masks[key]

    def shared_masks(self, attention_mask: torch.Tensor | None):
        """``(prefix_mask [G, 1, 1, S] | None, tail_mask [B, 1, q, T] | None)`` for `shared_prefix_attention`, or
        None when the rows of a group are padded differently inside the prefix (memoised per step)."""
        key = ("shared", id(attention_mask))
        if key not in self._masks:
            self._masks[key] = _shared_masks(self, attention_mask)
        return self._masks[key]

    def mask(self, attention_mask: torch.Tensor | None, sliding_window: int | None) -> torch.Tensor | None:
        """The boolean ``[B, 1, q, kv]`` mask for this step (None when nothing is masked), memoised per step."""
        key = (id(attention_mask), sliding_window)
        if key not in self._masks:
            self._masks[key] = _step_mask(self, attention_mask, sliding_window)
        return self._masks[key]


def _step_mask(step: StepMetadata, attention_mask: torch.Tensor | None, window: int | None) -> torch.Tensor | None:
    kv_len = step.max_seq_len
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask[..., :kv_len].to(torch.bool)
    if attention_mask is None and window is None and step.q_len in (1, kv_len):
        return None  # nothing to mask (decode), or a plain causal mask `attend` applies itself (first prefill)
    mask = ops.causal_mask(step.seq_lens, None, step.q_len, kv_len, window)
    if attention_mask is not None:
        mask = mask & key_padding_mask(attention_mask, kv_len)[:, None, None, :]
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
        raise RuntimeError(
            "hf_paged: a PagedCache's block pool reached an attention implementation other than \"hf_paged\" "
            f"(it called {getattr(func, '__name__', func)}). Load the model with attn_implementation=\"hf_paged\" "
            '(or call model.set_attn_implementation("hf_paged")) before using a PagedCache.'
        )


def pool_tensor(num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised pool ``[L, 2, N, bs, Hkv, D]`` stored head-major: ``[L, 2, Hkv, N * bs, D]`` in memory.

    Every operation sees the logical shape, through strides. Storing each (layer, key/value, head) as one run of
    all the pool's slots makes any range of consecutive blocks one contiguous ``[tokens, D]`` matrix per head,
    which is how the attention kernels read keys best (twice as fast on CPU as token-major rows, in which a
    head's keys are strided by ``Hkv * D``); a block stays ``Hkv`` runs of ``bs * D`` elements for copies.
    """
    storage = torch.empty((num_layers, 2, kv_heads, num_blocks, block_size, head_dim), device=device, dtype=dtype)
    return storage.permute(0, 1, 3, 4, 2, 5)


class KVPool:
    """Keys and values of all layers in blocks: one tensor ``[L, 2, N, bs, Hkv, D]`` (see `pool_tensor` for its
    memory layout) and its `BlockPool`.

    Created empty; the tensor is allocated at the first write, when the KV head count, head size, dtype and device
    are known. A pool belongs to one `PagedCache`, or is shared by the caches of one model when prefix caching is
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
        self.forecast_blocks = 0  # a growable pool starts with this many blocks (what `generate` expects to use)
        self.device, self.dtype = device, dtype
        self.shared = False  # set by enable_prefix_caching: the pool outlives the caches that use it
        self.blocks = BlockPool(0, block_size)
        self.tensor: torch.Tensor | None = None
        self.plain: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.guarded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.active: weakref.ref | None = None

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across keys and values of all layers (0 before the tensor exists)."""
        if self.tensor is None:
            return 0
        return self.tensor[:, :, 0].numel() * self.tensor.element_size()

    def allocate(self, key_states: torch.Tensor) -> None:
        """Create the tensor for keys like ``key_states`` (``[B, Hkv, q, D]``), sized by the pool's rule."""
        device = self.device or key_states.device
        dtype = self.dtype or key_states.dtype
        num_kv_heads, head_dim = key_states.shape[1], key_states.shape[3]
        tensor = pool_tensor(self.num_layers, 0, self.block_size, num_kv_heads, head_dim, device, dtype)
        blocks = self.requested_blocks or 0
        if self.max_memory is not None:
            per_block = self.num_layers * 2 * self.block_size * num_kv_heads * head_dim * tensor.element_size()
            blocks = self.max_memory // per_block
            if blocks <= 0:
                raise ValueError(
                    f"hf_paged: max_memory={self.max_memory} bytes holds no block; one block of {self.block_size} "
                    f"tokens takes {per_block} bytes for this model. Raise max_memory or lower block_size."
                )
        self.device, self.dtype = device, dtype
        self._bind(tensor)
        if blocks:
            self.resize(blocks)
        elif self.growable and self.forecast_blocks:
            try:
                self.resize(self.forecast_blocks)
            except torch.OutOfMemoryError:
                pass  # only a forecast: the pool grows on demand instead, and says so if it cannot

    def matches(self, key_states: torch.Tensor) -> bool:
        return key_states.shape[1] == self.tensor.shape[4] and key_states.shape[3] == self.tensor.shape[5]

    def resize(self, num_blocks: int) -> None:
        """Grow the tensor to `num_blocks` blocks, keeping the contents of the existing ones.

        New blocks are zeroed: `ops.window_attention` scores every slot of its block range, unused ones included,
        and masks them, and a masked score is only harmless if the slot's key and value are finite.
        """
        old = self.tensor
        new = pool_tensor(self.num_layers, num_blocks, *old.shape[3:], old.device, old.dtype)
        new[:, :, : old.shape[2]] = old
        new[:, :, old.shape[2]:].zero_()
        self._bind(new)
        self.blocks.grow(num_blocks - self.blocks.num_blocks)

    def ensure_free(self, needed: int) -> None:
        """Make `needed` blocks available, growing the pool if it may, else raise `OutOfBlocksError`."""
        free = self.blocks.num_free
        if needed <= free:
            return
        current = self.blocks.num_blocks
        if not self.growable:
            raise OutOfBlocksError(needed, free, current, self.block_size)
        target = max(current + needed - free, int(current * _GROWTH_FACTOR))
        try:
            self.resize(target)
        except torch.OutOfMemoryError as error:
            raise OutOfBlocksError(
                needed, free, current, self.block_size,
                hint=f"Growing the pool to {target} blocks ran out of device memory ({error}). Pass a smaller batch "
                "or fix the pool size with num_blocks / max_memory.",
            ) from error

    def _bind(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.plain = [(tensor[layer, 0], tensor[layer, 1]) for layer in range(self.num_layers)]
        self.guarded = []
        for keys, values in self.plain:
            pair = (keys.as_subclass(PagedPool), values.as_subclass(PagedPool))
            for pool in pair:
                setattr(pool, _OWNER_ATTR, weakref.ref(self))
            self.guarded.append(pair)


class PagedLayer(CacheLayerMixin):
    """One layer's entry in a `PagedCache`. `keys` / `values` are that layer's pools ``[N, bs, Hkv, D]``.

    All bookkeeping is per cache, not per layer: every method delegates to the owning `PagedCache`.
    """

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: PagedCache, layer_idx: int):  # no super().__init__: keys/values are properties
        self._cache = weakref.proxy(cache)
        self.layer_idx = layer_idx

    @property
    def is_initialized(self) -> bool:
        return self._cache.pool.tensor is not None

    @property
    def keys(self) -> torch.Tensor | None:
        plain = self._cache.pool.plain
        return plain[self.layer_idx][0] if plain else None

    @property
    def values(self) -> torch.Tensor | None:
        plain = self._cache.pool.plain
        return plain[self.layer_idx][1] if plain else None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._cache.pool.allocate(key_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._cache.update(key_states, value_states, self.layer_idx)

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length, self.layer_idx)

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the name of `get_max_length` in older 5.x releases
        return -1


class PagedCache(Cache):
    """A KV cache held in fixed-size blocks that sequences share by reference.

    Keys and values of all layers live in one pool ``[L, 2, num_blocks, block_size, Hkv, D]``. A `BlockManager`
    maps each row of the batch to its blocks. Rows that descend from a common prefix (beams, the
    ``num_return_sequences`` copies of a prompt) point at the same physical blocks; a shared block is copied only
    when a row writes into it (copy-on-write), so reordering beams never copies keys or values.

    Sizing rule:
        * ``num_blocks=n``: a fixed pool of ``n`` blocks.
        * ``max_memory=bytes``: a fixed pool of as many blocks as fit in ``bytes`` (keys and values, all layers).
        * neither: the pool grows on demand (to at least 1.5x its size each time), so it holds about what the rows
          use; ``generate()`` sizes it at its first write for the whole call (`KVPool.forecast_blocks`). A fixed
          pool that cannot hold a step raises `OutOfBlocksError` before anything is written.

    Args:
        config: the model's config (``num_hidden_layers`` is read from its text config).
        block_size: tokens per block (a positive int).
        num_blocks: fixed pool size in blocks.
        max_memory: fixed pool size in bytes (an int, or a string such as ``"512MiB"`` / ``"2GB"``).
        device, dtype: where and how to store keys and values; by default those of the first keys written.
        pool: a `KVPool` to share with other caches (what `enable_prefix_caching` sets up); the sizing arguments
            must then be left unset.
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
        pool: KVPool | None = None,
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
        attn = getattr(config, "_attn_implementation", None)
        if attn is not None and attn != "hf_paged":
            raise ValueError(
                f"hf_paged: this config uses attn_implementation={attn!r}; a PagedCache only works with models loaded "
                'with attn_implementation="hf_paged" (its attention reads the block tables).'
            )
        if pool is None:
            pool = KVPool(num_layers, block_size, num_blocks, max_memory,
                          torch.device(device) if device is not None else None, dtype)
        elif (num_blocks, max_memory, device, dtype) != (None, None, None, None) or pool.num_layers != num_layers:
            raise ValueError("hf_paged: a PagedCache given a shared pool takes its size, device and dtype from it.")
        self._init_state(num_layers, pool)

    def _init_state(self, num_layers: int, pool: KVPool) -> None:
        super().__init__(layers=[PagedLayer(self, i) for i in range(num_layers)])
        self.block_size = pool.block_size
        self.pool = pool
        self.manager = BlockManager(block_size=pool.block_size, pool=pool.blocks)
        if pool.shared:
            # A shared pool outlives this cache: give the rows' blocks back when the cache is collected.
            weakref.finalize(self, _release_rows, self.manager)
        self.peak_used_blocks = 0
        self.prefix_hit_tokens = 0
        self._step: StepMetadata | None = None
        self._step_layers: set[int] = set()
        self._pending_layer: int | None = None

    # ---------------------------------------------------------------------------------------- the pool
    @property
    def kv_pool(self) -> torch.Tensor | None:
        """The pool tensor ``[L, 2, N, bs, Hkv, D]`` (None before the first write)."""
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
        return self.pool.bytes_per_block

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
        pool = self.pool
        if pool.tensor is None:
            pool.allocate(key_states)
        if not pool.matches(key_states) or value_states.shape != key_states.shape:
            raise ValueError(
                f"hf_paged: layer {layer_idx} gives keys {tuple(key_states.shape)} and values "
                f"{tuple(value_states.shape)}, but the pool holds {pool.tensor.shape[4]} heads of dim "
                f"{pool.tensor.shape[5]}; PagedCache needs every layer to have the same number of KV heads and "
                "head_dim."
            )
        if self._step is None or layer_idx in self._step_layers:
            self._begin_step(key_states.shape[0], key_states.shape[2])
        self._step_layers.add(layer_idx)
        batch, heads, q_len, dim = key_states.shape
        keys = key_states.transpose(1, 2).reshape(batch * q_len, heads, dim)
        values = value_states.transpose(1, 2).reshape(batch * q_len, heads, dim)
        key_pool, value_pool = pool.plain[layer_idx]
        if self._step.triton:
            backend.kernels().reshape_and_cache(keys, values, key_pool, value_pool, self._step.slot_mapping)
        else:
            ops.reshape_and_cache(keys, values, key_pool, value_pool, self._step.slot_mapping, skip_negative=False)
        self._pending_layer = layer_idx
        pool.active = weakref.ref(self)
        return pool.guarded[layer_idx]

    def _begin_step(self, batch: int, q_len: int) -> None:
        """Reserve slots for ``q_len`` new tokens in every row and build this step's metadata."""
        manager = self.manager
        new_rows = manager.num_rows == 0
        if not new_rows and manager.num_rows != batch:
            raise ValueError(
                f"hf_paged: the cache holds {manager.num_rows} sequences but the model was called with a batch of "
                f"{batch}. Pass a batch of the same size, or reset the cache (cache.reset()) to start over."
            )
        if new_rows:
            manager.add_rows(batch)
        try:
            self.pool.ensure_free(manager.blocks_needed(q_len))
            lengths_before = list(manager.lengths)
            copies = manager.append(q_len)
        except BaseException:
            if new_rows:
                manager.reset()
            raise
        device = self.pool.tensor.device
        if copies:
            src, dst = zip(*copies, strict=True)
            backend.copy_blocks(
                self.pool.tensor,
                torch.tensor(src, dtype=torch.int32, device=device),
                torch.tensor(dst, dtype=torch.int32, device=device),
            )
        self.peak_used_blocks = max(self.peak_used_blocks, manager.num_used)
        self._step = _build_step(manager, lengths_before, q_len, device)
        self._step_layers = set()

    def attention_inputs(self, layer_idx: int) -> tuple[StepMetadata, torch.Tensor, torch.Tensor]:
        """This step's metadata and the key and value pools of `layer_idx`, for its attention function.

        Marks the layer's new keys as read.
        """
        if self._pending_layer != layer_idx:
            raise RuntimeError(
                f"hf_paged: attention of layer {layer_idx} ran without storing its keys in this step first."
            )
        self._pending_layer = None
        return (self._step, *self.pool.plain[layer_idx])

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
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``. Remaps block tables; copies no keys or values."""
        self._select(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row `repeats` times (each copy shares the original's blocks)."""
        self._select([row for row in range(self.manager.num_rows) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the rows `indices` (in that order)."""
        self._select(torch.as_tensor(indices).tolist())

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens of every row (``tokens_to_remove`` <= 0, as `DynamicCache`)."""
        if tokens_to_remove > 0 and compat.CROP_TAKES_LENGTH:  # the length to keep, as older releases pass it
            tokens_to_remove = min(tokens_to_remove - self.get_seq_length(), 0)
        if tokens_to_remove > 0:
            raise ValueError(
                f"Calling `crop` with a positive value (`{tokens_to_remove}`) is not supported. "
                "Please use a negative integer to remove that number of tokens from the cache instead."
            )
        if tokens_to_remove == 0:
            return
        self.manager.truncate(max(self.get_seq_length() + tokens_to_remove, 0))
        self._step = None

    def reset(self) -> None:
        """Forget every sequence; the pool is kept for reuse."""
        self.manager.reset()
        self._step, self._step_layers, self._pending_layer = None, set(), None

    def _select(self, indices: list[int]) -> None:
        self.manager.select(indices)
        self._step = None

    # ------------------------------------------------------------------------------------------- stats
    def stats(self) -> CacheStats:
        """A snapshot of the pool's use (see `CacheStats`)."""
        manager, per_block = self.manager, self.bytes_per_block
        per_token = per_block // self.block_size
        logical_tokens = sum(manager.lengths)
        # A fixed pool of num_blocks is allocated at the first write: report its configured size before that.
        unallocated = self.pool.tensor is None and self.pool.requested_blocks is not None
        num_blocks = self.pool.requested_blocks if unallocated else manager.num_blocks
        return CacheStats(
            block_size=self.block_size,
            num_blocks=num_blocks,
            used_blocks=manager.num_used,
            free_blocks=num_blocks - manager.num_used if unallocated else manager.num_free,
            shared_blocks=manager.num_shared,
            logical_tokens=logical_tokens,
            used_bytes=manager.num_used * per_block,
            logical_bytes=logical_tokens * per_token,
            pool_bytes=manager.num_blocks * per_block,
            peak_used_blocks=self.peak_used_blocks,
            peak_used_bytes=self.peak_used_blocks * per_block,
            cow_copies=manager.cow_copies,
            num_rows=manager.num_rows,
            prefix_hit_tokens=self.prefix_hit_tokens,
            cached_blocks=self.pool.blocks.num_cached,
        )

    def __deepcopy__(self, memo: dict) -> PagedCache:
        """An independent copy with a pool of its own holding just this cache's blocks (Transformers' prompt-reuse
        recipe: ``copy.deepcopy(prompt_cache)``). Sharing between rows is kept."""
        used = sorted({block for table in self.manager.tables for block in table})
        renumber = {block: new for new, block in enumerate(used)}
        old = self.pool
        pool = KVPool(old.num_layers, old.block_size, device=old.device, dtype=old.dtype)
        if old.tensor is not None:
            tensor = pool_tensor(old.num_layers, len(used), *old.tensor.shape[3:], old.device, old.dtype)
            tensor.copy_(old.tensor[:, :, used])
            pool._bind(tensor)
            pool.blocks.grow(len(used))
            pool.blocks.free_blocks.clear()
        clone = PagedCache.__new__(PagedCache)
        memo[id(self)] = clone
        clone._init_state(len(self.layers), pool)
        manager = clone.manager
        manager.tables = [[renumber[block] for block in table] for table in self.manager.tables]
        manager.lengths = list(self.manager.lengths)
        manager.cow_copies = self.manager.cow_copies
        for table in manager.tables:
            for block in table:
                pool.blocks.ref_counts[block] += 1
        clone.peak_used_blocks, clone.prefix_hit_tokens = self.peak_used_blocks, self.prefix_hit_tokens
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


def _release_rows(manager: BlockManager) -> None:
    with manager.pool.lock:
        manager.reset()


def _build_step(manager: BlockManager, lengths_before: list[int], q_len: int, device: torch.device) -> StepMetadata:
    width = max(len(table) for table in manager.tables)
    block_tables = torch.tensor(
        [table + [0] * (width - len(table)) for table in manager.tables], dtype=torch.int32
    ).to(device)
    seq_lens = torch.tensor(manager.lengths, dtype=torch.int32).to(device)
    bs = manager.block_size
    positions = torch.tensor(lengths_before, dtype=torch.long, device=device)[:, None] + torch.arange(
        q_len, device=device
    )
    slots = block_tables.to(torch.long).gather(1, positions // bs) * bs + positions % bs
    max_seq_len = max(manager.lengths)
    triton = backend.use_triton(device)
    window = None
    if not triton and manager.num_rows > 1 and q_len <= _WINDOW_MAX_QUERIES:
        window = _window(manager.tables, max_seq_len, bs)
    return StepMetadata(
        block_tables=block_tables,
        seq_lens=seq_lens,
        slot_mapping=slots.reshape(-1),
        q_len=q_len,
        max_seq_len=max_seq_len,
        block_size=bs,
        triton=triton,
        shared=_shared_prefix(manager, q_len, device) if not triton and window is None else None,
        first_block=_consecutive_start(manager.tables[0]) if manager.num_rows == 1 else None,
        window=window,
    )


def _window(tables: list[list[int]], max_seq_len: int, block_size: int) -> tuple[int, int] | None:
    """``(first, count)``: the range of blocks from the lowest to the highest any row uses, if it is compact."""
    first = min(min(table) for table in tables)
    count = max(max(table) for table in tables) + 1 - first
    extra = count * block_size - max_seq_len
    return (first, count) if extra <= max(_WINDOW_EXTRA_KEYS, max_seq_len // 4) else None


def _consecutive_start(blocks: list[int]) -> int | None:
    """``blocks[0]`` if the blocks are ``b, b + 1, b + 2, ...``, else None."""
    start = blocks[0]
    return start if blocks == list(range(start, start + len(blocks))) else None


def _shared_prefix(manager: BlockManager, q_len: int, device: torch.device) -> SharedPrefix | None:
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
        prefix_blocks=torch.tensor(prefixes, dtype=torch.int32).to(device),
        prefix_start=_consecutive_start(prefixes[0]) if len(prefixes) == 1 else None,
        tail_tables=torch.tensor(tails, dtype=torch.int32).to(device),
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
