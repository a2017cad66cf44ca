"""Paged attention's launcher: checks the inputs, settles the tiles, strides and splits once per kind of call, and
launches `hf_paged.kernels.paged_attention_kernel`'s kernels (that module's docstring says what they compute and
how the work is laid out); `paged_attention` is the drop-in for `hf_paged.ops.paged_attention`.

Split-KV (flash-decoding): with few programs and long contexts, the key range of each tile is cut into
``num_splits`` pieces handled by separate programs, whose partial results a second kernel merges;
`choose_num_splits` decides, and `launch_paged_attention` lets tests force either path.
"""

from __future__ import annotations

import functools

import torch

from hf_paged import ops
from hf_paged.ops import paged_attention as paged_attention_reference

from ._launch import (
    FLOAT_DTYPES,
    Launch,
    check_caches,
    check_device,
    check_dtype,
    check_shape,
    interpreting,
    resolve_offsets,
    settled,
    split_buffers,
    tensor_key,
)
from ._quant import codes_of, raw
from .paged_attention_kernel import (
    paged_attention_kernel,
    paged_attention_meta,
    reduce_splits_kernel,
    reduce_splits_meta,
    tile_config,
)

__all__ = [
    "choose_num_splits",
    "launch_paged_attention",
    "paged_attention",
    "paged_attention_reference",
]

#: Fewest key tiles worth giving to one split; below this the merge costs more than the extra parallelism.
_MIN_TILES_PER_SPLIT = 4
#: Most splits per query tile (the merge kernel holds all of them in registers).
_MAX_SPLITS = 16
#: Streaming multiprocessors assumed when there is no CUDA device to ask (H100 SXM).
_DEFAULT_SM_COUNT = 132
#: Most query heads in one tile in latent mode (its 512-wide latents leave registers for 16 rows).
_LATENT_GROUP = 16



@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count

def choose_num_splits(programs: int, max_seq_len: int, block_n: int, device: torch.device) -> int:
    """Flash-decoding heuristic: how many pieces to cut each program's key range into.

    Split only when the grid without splits (`programs` = rows x query tiles x KV heads) cannot fill the GPU,
    and only as far as every split keeps at least ``_MIN_TILES_PER_SPLIT`` key tiles; a power of two, at most
    ``_MAX_SPLITS``.
    """
    sm_count = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else _DEFAULT_SM_COUNT
    if programs >= sm_count:
        return 1
    by_occupancy = -(-2 * sm_count // programs)  # ceiling divisions in Python (triton.cdiv is a JIT function)
    by_length = -(-max_seq_len // block_n) // _MIN_TILES_PER_SPLIT
    splits = min(by_occupancy, by_length, _MAX_SPLITS)
    return 1 << (splits.bit_length() - 1) if splits >= 2 else 1


def _check_inputs(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    key_start: torch.Tensor | None,
    sliding_window: int | None,
    chunk_size: int | None = None,
    sinks: torch.Tensor | None = None,
    has_offsets: bool = False,
    latent: bool = False,
) -> None:
    check_device(query=query, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables,
                 seq_lens=seq_lens, key_start=key_start)
    check_dtype("query", query, FLOAT_DTYPES)
    check_caches(key_cache, value_cache)
    check_dtype("block_tables", block_tables, (torch.int32,))
    check_dtype("seq_lens", seq_lens, (torch.int32,))
    check_shape("query", query, (None, None, None, None), "[B, H, q, D]")
    batch, heads, _, head_dim = query.shape
    # With offset tables the caches are views of their base slabs, whose block counts may differ.
    value_blocks = None if has_offsets else key_cache.shape[0]
    stored = key_cache.shape[-1] - ops.head_dim(key_cache)  # 8-bit rows: 2 more elements than values
    if latent:
        check_shape("value_cache", value_cache, (value_blocks, *key_cache.shape[1:3], None),
                    "[N, bs, Hkv, Dr] like key_cache (latent mode: the rotary keys)")
        rope_dim = ops.head_dim(value_cache)
        check_shape("key_cache", key_cache, (None, None, None, head_dim - rope_dim + stored),
                    f"[N, bs, Hkv, Dc] with Dc + Dr ({rope_dim}) the query's D (latent mode: the latents)")
    else:
        check_shape("key_cache", key_cache, (None, None, None, head_dim + stored),
                    "[N, bs, Hkv, D] with the query's D")
        check_shape("value_cache", value_cache, (value_blocks, *key_cache.shape[1:3], None),
                    "[N, bs, Hkv, Dv] like key_cache")
    kv_heads = key_cache.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of the cache's KV heads ({kv_heads})")
    check_shape("block_tables", block_tables, (batch, None), "[B, nb]")
    check_shape("seq_lens", seq_lens, (batch,), "[B]")
    if key_start is not None:
        check_dtype("key_start", key_start, (torch.int32,))
        check_shape("key_start", key_start, (batch,), "[B]")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive number of tokens or None, got {sliding_window}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size}")
    if sinks is not None:
        check_device(query=query, sinks=sinks)
        check_dtype("sinks", sinks, FLOAT_DTYPES)
        check_shape("sinks", sinks, (heads,), "[H], one logit per query head")


class _Settled:
    """What a call of `launch_paged_attention` settles once per key (`hf_paged.kernels._launch.settled`): its checks
    passed, the sizes, the tiles, the strides, and one `Launch` per number of splits."""

    def __init__(self, query, key_cache, value_cache, block_tables, seq_lens, key_start, sliding_window, chunk_size,
                 sinks, softcap, has_offsets, latent):
        self.batch, self.heads, self.q_len, _ = query.shape
        _, self.block_size, self.kv_heads, _ = key_cache.shape
        self.head_dim = ops.head_dim(key_cache)
        rope_dim = ops.head_dim(value_cache) if latent else 0
        self.expand = None  # latent mode: the one KV head seen as this many (expanded with head stride 0)
        if latent and self.kv_heads == 1 and self.heads > _LATENT_GROUP:
            # A tile holds at most _LATENT_GROUP query heads.
            group = max(g for g in range(1, _LATENT_GROUP + 1) if self.heads % g == 0)
            self.expand = self.kv_heads = self.heads // group
            key_cache = key_cache.expand(-1, -1, self.kv_heads, -1)
            value_cache = value_cache.expand(-1, -1, self.kv_heads, -1)
        self.value_dim = self.head_dim if latent else ops.head_dim(value_cache)
        self.max_keys = block_tables.shape[1] * self.block_size
        self.group = self.heads // self.kv_heads
        codes = codes_of(key_cache.dtype)
        # Products in float32: float32 storage, or 8-bit codes and a float32 query (they run in the query's dtype).
        self.fp32_storage = (query.dtype if codes else key_cache.dtype) == torch.float32
        self.tiles = tile_config(self.q_len, self.group, max(self.head_dim, self.value_dim), self.fp32_storage,
                                 self.value_dim if self.value_dim != self.head_dim else None, latent=latent)
        self.num_q_tiles = -(-self.q_len // self.tiles["BLOCK_Q"])
        self.programs = self.batch * self.num_q_tiles * self.kv_heads
        self.flags = dict(has_key_start=key_start is not None, has_window=sliding_window is not None,
                          has_softcap=softcap is not None, fp32_storage=self.fp32_storage,
                          upcast=self.fp32_storage or interpreting(), has_sinks=sinks is not None,
                          has_chunk=chunk_size is not None, value_dim=None if latent else self.value_dim,
                          has_offsets=has_offsets, rope_dim=rope_dim, codes=codes)
        self.strides = (*query.stride(), *key_cache.stride(), *value_cache.stride(), *block_tables.stride())
        self.contiguous = seq_lens.is_contiguous() and (key_start is None or key_start.is_contiguous())
        self.launches: dict[int, tuple[Launch, Launch | None]] = {}
        self.splits: dict[int, int] = {}  # `choose_num_splits` by max_seq_len (on this key's device)

    def launches_for(self, num_splits: int) -> tuple[Launch, Launch | None]:
        """The attention kernel's launch and, with splits, the merge's."""
        found = self.launches.get(num_splits)
        if found is None:
            meta = paged_attention_meta(self.q_len, self.group, self.head_dim, self.block_size, num_splits,
                                        **self.flags)
            grid = (self.batch * -(-self.q_len // meta["BLOCK_Q"]), self.kv_heads, num_splits)
            q_len, heads, dim = self.q_len, self.heads, self.value_dim
            if num_splits > 1:  # strides of the contiguous partials [B, q, H, S, Dv] and stats [B, q, H, S]
                targets = (q_len * heads * num_splits * dim, heads * num_splits * dim, num_splits * dim, dim,
                           q_len * heads * num_splits, heads * num_splits, num_splits)
                reduce = Launch(reduce_splits_kernel, (self.batch * q_len * heads,),
                                reduce_splits_meta(dim, num_splits))
            else:  # the output [B, q, H, Dv]; no partials
                targets, reduce = (q_len * heads * dim, heads * dim, dim, 0, 0, 0, 0), None
            fixed = (q_len, self.num_q_tiles, *self.strides, *targets)
            found = self.launches[num_splits] = (Launch(paged_attention_kernel, grid, meta, fixed), reduce)
        return found


def _settle(query, key_cache, value_cache, block_tables, seq_lens, key_start, sliding_window, chunk_size, sinks,
            softcap, key_offsets, value_offsets, latent) -> _Settled:
    has_offsets = key_offsets is not None or value_offsets is not None
    _check_inputs(query, key_cache, value_cache, block_tables, seq_lens, key_start, sliding_window, chunk_size, sinks,
                  has_offsets=has_offsets, latent=latent)
    resolve_offsets(key_cache, value_cache, key_offsets, value_offsets)
    return _Settled(query, key_cache, value_cache, block_tables, seq_lens, key_start, sliding_window, chunk_size,
                    sinks, softcap, has_offsets, latent)


def launch_paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    key_start: torch.Tensor | None = None,
    *,
    scale: float,
    max_seq_len: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
    num_splits: int | None = None,
    chunk_size: int | None = None,
    sinks: torch.Tensor | None = None,
    key_offsets: torch.Tensor | None = None,
    value_offsets: torch.Tensor | None = None,
    latent: bool = False,
    workspace: dict | None = None,
) -> torch.Tensor:
    """`paged_attention` with the split-KV choice exposed: ``num_splits=None`` asks `choose_num_splits`,
    1 forces the single-pass kernel, more forces split-KV with that many splits.

    The checks and launch settings are settled once per kind of call (`hf_paged.kernels._launch.settled`): a
    decode step's layers share them."""
    tensors = tensor_key(query, key_cache, value_cache, block_tables, seq_lens, key_start, sinks, key_offsets,
                         value_offsets, fresh=1)
    setup = settled(
        None if tensors is None else ("paged_attention", tensors, sliding_window, chunk_size, softcap is None,
                                      bool(latent)),
        lambda: _settle(query, key_cache, value_cache, block_tables, seq_lens, key_start, sliding_window, chunk_size,
                        sinks, softcap, key_offsets, value_offsets, latent))
    offsets = resolve_offsets(key_cache, value_cache, key_offsets, value_offsets, settled=True)
    if max_seq_len > setup.max_keys:
        raise ValueError(
            f"max_seq_len ({max_seq_len}) exceeds what block_tables can address "
            f"({block_tables.shape[1]} blocks x {setup.block_size} tokens)"
        )
    if num_splits is None:
        num_splits = setup.splits.get(max_seq_len)
        if num_splits is None:
            num_splits = setup.splits[max_seq_len] = choose_num_splits(setup.programs, max_seq_len,
                                                                       setup.tiles["BLOCK_N"], query.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    batch, heads, q_len, value_dim = setup.batch, setup.heads, setup.q_len, setup.value_dim

    out = torch.empty(batch, q_len, heads, value_dim, dtype=query.dtype, device=query.device)
    if out.numel() == 0:
        return out
    if num_splits > 1:
        partial, running_max, running_sum = split_buffers(workspace, batch, q_len, heads, num_splits, value_dim,
                                                          query.device)
        target = partial
    else:
        target = running_max = running_sum = out  # the stats are never read or written by the single-pass kernel
    if not setup.contiguous:
        seq_lens = seq_lens.contiguous()
        key_start = key_start.contiguous() if key_start is not None else None

    if setup.expand is not None:
        key_cache = key_cache.expand(-1, -1, setup.expand, -1)
        value_cache = value_cache.expand(-1, -1, setup.expand, -1)
    attend, reduce = setup.launches_for(num_splits)
    attend(
        target, running_max, running_sum,
        query, raw(key_cache), raw(value_cache), *(offsets if offsets is not None else (block_tables, block_tables)),
        block_tables, seq_lens, key_start if key_start is not None else seq_lens,
        float(scale), float(softcap) if softcap is not None else 1.0,
        int(sliding_window) if sliding_window is not None else 0,
        sinks.float().contiguous() if sinks is not None else seq_lens,
        int(chunk_size) if chunk_size is not None else 0,
    )
    if reduce is not None:
        reduce(out, partial, running_max, running_sum)
    return out


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    key_start: torch.Tensor | None = None,
    *,
    scale: float,
    max_seq_len: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    sinks: torch.Tensor | None = None,
    key_offsets: torch.Tensor | None = None,
    value_offsets: torch.Tensor | None = None,
    latent: bool = False,
    workspace: dict | None = None,
) -> torch.Tensor:
    """Attention of `query` against the paged keys and values (Triton; same contract as `hf_paged.ops`).

    Args:
        query: ``[B, H, q, D]``, any strides (Transformers passes a transposed view).
        key_cache, value_cache: ``[N, bs, Hkv, D]`` and ``[N, bs, Hkv, Dv]`` pools, any strides (``Dv`` may differ
            from ``D``: multi-head latent attention); or 8-bit pools of one dtype (``int8``, ``float8_e4m3fn``:
            `hf_paged.quant`) ``[N, bs, Hkv, D + 2]`` and ``[N, bs, Hkv, Dv + 2]`` with even strides and a unit last
            stride, dequantized as they are read.
        block_tables: ``[B, nb]`` int32 block ids.
        seq_lens: ``[B]`` int32, tokens of each row including this step's ``q``.
        key_start: ``[B]`` int32 first attended key (left padding), or None for 0.
        scale: multiplies ``q @ k^T``.
        max_seq_len: ``max(seq_lens)`` as a Python int (sizes the split-KV choice; no device sync).
        sliding_window: attend only to the last `sliding_window` positions (the query's own included), or None.
        softcap: if set, scores become ``softcap * tanh(scores / softcap)`` after scaling.
        chunk_size: chunked attention (chunks start at ``key_start``), or None.
        sinks: ``[H]`` attention-sink logits joining each softmax denominator, or None.
        key_offsets: ``[N]`` int64, or None. A pool of several tensors (slabs): ``key_cache`` is the layer's view
            of the lowest-addressed slab, and block ``b`` (in whichever slab) starts ``key_offsets[b]`` elements
            after ``key_cache.data_ptr()`` (so >= 0; multiples of 16). ``key_cache``'s strides inside a block
            apply; its block stride and ``N`` are unused. The caller keeps every slab alive. None: block ``b`` at
            ``b * key_cache.stride(0)``, as with one tensor. See docs/KERNELS.md, "Pools of several slabs".
        value_offsets: the same for ``value_cache``; None uses `key_offsets` (K and V views of one slab tensor).
        latent: multi-head latent attention (module docstring): ``key_cache`` holds latents ``[N, bs, Hkv, Dc]``,
            ``value_cache`` rotary keys ``[N, bs, Hkv, Dr]``, the query is ``[B, H, q, Dc + Dr]``, the keys are both
            caches' dims together and the values are ``key_cache``'s.
        workspace: a dict the caller keeps for calls on one stream (every layer of a forward step), where split-KV
            calls keep their scratch tensors to use again (`_launch.kept`); None: new ones per call.

    Returns:
        ``[B, q, H, Dv]`` contiguous, in the query's dtype (``Dv = Dc`` in latent mode); query rows with no visible
        key are zero.
    """
    return launch_paged_attention(
        query, key_cache, value_cache, block_tables, seq_lens, key_start,
        scale=scale, max_seq_len=max_seq_len, sliding_window=sliding_window, softcap=softcap,
        chunk_size=chunk_size, sinks=sinks, key_offsets=key_offsets, value_offsets=value_offsets, latent=latent,
        workspace=workspace,
    )
