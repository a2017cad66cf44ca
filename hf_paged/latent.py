"""Multi-head latent attention (DeepSeek-V2/V3's ``kv_lora_rank`` layers) attended straight from the cached latents.

Such a layer caches per token one compressed latent ``c`` (``kv_lora_rank`` wide) and one rotary key ``k_rot``
(``qk_rope_head_dim`` wide) shared by all heads: the model calls ``cache.update(c, k_rot)`` (``[B, 1, q, r]`` and
``[B, 1, q, dr]``), a `PagedCache` stores them as one KV head of keys and values of two widths, and the module's
``expand_kv`` turns the returned latents into full keys ``[c W_UK_h^T | k_rot]`` and values ``c W_UV_h^T`` per head
``h`` (``W_UK`` / ``W_UV``: the key and value rows of ``kv_b_proj``) before its attention function. Fed gathered
latents, that expansion runs over the whole context at every step. With the weights absorbed into the query and the
output (as vLLM's MLA backends do), the same attention is

    scores_h = (q_nope_h W_UK_h) . c + q_rot_h . k_rot,      out_h = (softmax(scores_h) . c) W_UV_h^T

multi-query attention with one KV head whose keys are ``[c | k_rot]`` and whose values are ``c``: the paged
attention reads the latent blocks in place through the block tables (the Triton kernel's latent mode,
``hf_paged.kernels.paged_attention(..., latent=True)``; on the PyTorch path the block range of `StepPlan.block_range`
/ ``block_ranges``, or the row's own consecutive blocks, read in place, else a gather of the latents only).

How a layer gets there, without touching the model's code:

1. `prepare_family` (at load, from `hf_paged.support.check_model_class`) and `prepare` (the attention function, for
   modules whose classes live elsewhere) wrap the ``expand_kv`` of the family's attention classes once
   (`_pass_pools`): pools returned by a `PagedCache` pass through unchanged, anything else goes to the original.
2. Until a cache knows that a layer's ``expand_kv`` lets its pools through, its ``update`` returns each row's
   latents gathered, as before, marked with the cache and layer (`gathered_latents`); the wrapped ``expand_kv``
   seeing such latents, on a module whose weights absorb (`absorbable`: the ``expand_kv`` it runs is a wrapped
   one, its class's forward takes the latents from the cache to ``expand_kv`` and hands what that returns to the
   attention function and nothing else, ``kv_b_proj`` is a plain bias-free linear layer, and the module's
   ``expand_kv`` matches the absorbed form on a probe), tells the cache so. From the next step on (decode, in
   ``generate``) that layer's ``update`` returns its guarded pools like any other layer's. A module that does not
   absorb is never given pools: its latents are gathered and expanded at every step, as before.
3. The ``"hf_paged"`` attention function gives such pools to `attention`, which absorbs the weights, or, where that
   does not fit (a 4-D mask, a sliding window, softcap, sinks, another head count than ``kv_b_proj``'s, a step of so
   many queries that expanding the context is cheaper: `_absorbing_pays`), gathers the latents and expands them
   with the module's own ``expand_kv`` (`_expanded_attention`): the pools never reach the model's code.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
import weakref

import torch

from . import backend, masks, ops
from .guard import PagedPool

__all__ = ["absorbable", "attention", "gathered_latents", "prepare", "prepare_family"]

_MARK = "_hf_paged_latents"  # on latents a PagedCache gathered: (weak reference to the cache, layer index)
_SERVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> layers whose pools the model lets through
_ABSORBABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # attention module -> bool (`absorbable`)
_PREPARED: set[type] = set()  # module classes `prepare` has looked at


# ------------------------------------------------------------------------------------------ wrapping expand_kv
def prepare_family(model_class: type) -> None:
    """Wrap ``expand_kv`` of every attention class defined beside `model_class` (its modeling module)."""
    family = sys.modules.get(model_class.__module__)
    for value in vars(family).values() if family is not None else ():
        if isinstance(value, type) and issubclass(value, torch.nn.Module) and "expand_kv" in value.__dict__:
            _wrap_expand_kv(value)


def prepare(module: torch.nn.Module) -> None:
    """Wrap ``expand_kv`` of `module`'s class (where its MRO defines it), once per class; cheap for other modules."""
    cls = type(module)
    if cls in _PREPARED:
        return
    _PREPARED.add(cls)
    owner = next((klass for klass in cls.__mro__ if "expand_kv" in klass.__dict__), None)
    if owner is not None and hasattr(module, "kv_b_proj"):
        _wrap_expand_kv(owner)


def _wrap_expand_kv(cls: type) -> None:
    original = cls.__dict__["expand_kv"]
    if getattr(original, "_hf_paged_latent", False) or not callable(original):
        return
    cls.expand_kv = _pass_pools(original)


def _pass_pools(original):
    """``expand_kv`` that hands a `PagedCache`'s pools on unexpanded (the attention absorbs the weights) and marks
    the layer of gathered latents as ready for that when the module absorbs (module docstring, step 2)."""

    @functools.wraps(original)
    def expand_kv(self, kv_nope: torch.Tensor, k_rot: torch.Tensor):
        if isinstance(kv_nope, PagedPool) and isinstance(k_rot, PagedPool):
            return kv_nope, k_rot
        mark = getattr(kv_nope, _MARK, None)
        if mark is not None:
            cache = mark[0]()
            if cache is not None and absorbable(self):
                _SERVED.setdefault(cache, set()).add(mark[1])
        return original(self, kv_nope, k_rot)

    expand_kv._hf_paged_latent = True
    return expand_kv


# ------------------------------------------------------------------------------------------------- the cache
def gathered_latents(cache, layer_idx: int, pools: tuple, step, key_states: torch.Tensor,
                     value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What `PagedCache.update` returns for a latent layer: None once the layer's ``expand_kv`` lets the pools
    through (the cache then returns its guarded pools, as for any layer), else each row's latents and rotary keys
    gathered out of the blocks, ``[B, 1, kv, r]`` and ``[B, 1, kv, dr]``, the latents marked with the cache and
    layer."""
    if layer_idx in _SERVED.get(cache, ()):
        return None
    latents, rotary = (ops.gather_kv(pool, step.block_tables, step.max_seq_len, step.first_block).to(states.dtype)
                       for pool, states in zip(pools, (key_states, value_states), strict=True))
    setattr(latents, _MARK, (weakref.ref(cache), layer_idx))
    return latents, rotary


# ------------------------------------------------------------------------------------ which modules absorb
def absorbable(module: torch.nn.Module) -> bool:
    """Whether `module`'s attention may run with absorbed weights: the ``expand_kv`` the module runs is its class's,
    wrapped (so a `PagedCache`'s pools pass it, whatever the classes below it do), and, memoised per module, its
    class's forward takes the latents straight from the cache to ``expand_kv`` and hands what that returns to the
    attention function alone, `_absorbed_weights` finds a plain linear ``kv_b_proj``, and that ``expand_kv`` gives
    the keys and values the absorbed form assumes on random latents (`_probe`)."""
    cls = type(module)
    if "expand_kv" in vars(module) or not getattr(getattr(cls, "expand_kv", None), "_hf_paged_latent", False):
        return False
    known = _ABSORBABLE.get(module)
    if known is None:
        known = _ABSORBABLE[module] = _expands_to_attention(cls) and _probe(module)
    return known


def _absorbed_weights(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(W_UK [H, dn, r], W_UV [H, dv, r])``, views of ``kv_b_proj``'s weight, or None when it is not a plain
    bias-free ``nn.Linear`` of a float weight (quantised, offloaded, sharded as a DTensor, ...) of the module's
    latent sizes."""
    proj = getattr(module, "kv_b_proj", None)
    if type(proj) is not torch.nn.Linear or proj.bias is not None:
        return None
    weight = proj.weight
    if type(weight.data) is not torch.Tensor or not weight.is_floating_point() or weight.device.type == "meta":
        return None
    try:
        nope, value, rank = int(module.qk_nope_head_dim), int(module.v_head_dim), int(module.kv_lora_rank)
    except (AttributeError, TypeError, ValueError):
        return None
    if weight.dim() != 2 or weight.shape[1] != rank or weight.shape[0] % (nope + value):
        return None
    per_head = weight.view(-1, nope + value, rank)
    return per_head[:, :nope], per_head[:, nope:]


def _probe(module: torch.nn.Module) -> bool:
    """Whether the module's ``expand_kv`` computes ``[c W_UK^T | k_rot]`` and ``c W_UV^T`` (within a few roundings
    of its dtype) on three random latents."""
    weights = _absorbed_weights(module)
    rope = getattr(module, "qk_rope_head_dim", None)
    if weights is None or not isinstance(rope, int):
        return False
    w_uk, w_uv = weights
    generator = torch.Generator().manual_seed(0)  # not the global generator: sampling stays reproducible
    like = {"device": w_uk.device, "dtype": w_uk.dtype}
    latents = torch.randn(1, 1, 3, w_uk.shape[2], generator=generator).to(**like)
    rotary = torch.randn(1, 1, 3, rope, generator=generator).to(**like)
    try:
        with torch.no_grad():
            keys, values = module.expand_kv(latents, rotary)  # plain tensors: every wrapper expands them
            expected_keys = torch.cat([torch.matmul(latents, w_uk.transpose(1, 2)),
                                       rotary.expand(-1, w_uk.shape[0], -1, -1)], dim=-1)
            expected_values = torch.matmul(latents, w_uv.transpose(1, 2))
    except Exception:  # noqa: BLE001 - any failure means the expansion is not the one absorbed here
        return False
    tolerance = 1e-3 if w_uk.dtype == torch.float32 else 3e-2
    return all(got.shape == want.shape and bool(((got - want).abs() <= tolerance * (1 + want.abs())).all())
               for got, want in ((keys, expected_keys), (values, expected_values)))


@functools.cache
def _expands_to_attention(cls: type) -> bool:
    """Whether ``cls.forward`` passes what ``cache.update`` returned only to ``self.expand_kv``, and what that
    returned only to the attention function (as arguments: no ``.shape``, no other use)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    stored = _assigned_from(tree, "update")
    expanded = _assigned_from(tree, "expand_kv")
    if len(stored) != 1 or len(expanded) != 1:
        return False
    (update, cached), (expand, keys) = stored[0], expanded[0]
    for use in _uses(tree, cached, after=update.end_lineno):
        parent = parents.get(use)
        if not (isinstance(parent, ast.Call) and parent is expand.value and use in parent.args):
            return False
    for use in _uses(tree, keys, after=expand.end_lineno):
        parent = parents.get(use)
        parent = parents.get(parent) if isinstance(parent, ast.keyword) else parent
        called = parent.func if isinstance(parent, ast.Call) else None
        name = called.id if isinstance(called, ast.Name) else called.attr if isinstance(called, ast.Attribute) else ""
        if "attention" not in name and "attn" not in name:
            return False
    return True


def _assigned_from(tree: ast.AST, method: str) -> list[tuple[ast.Assign, set[str]]]:
    """The assignments ``a, b = <...>.method(...)`` in `tree`, with their target names."""
    return [(node, {target.id for target in node.targets[0].elts if isinstance(target, ast.Name)})
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == method
            and isinstance(node.targets[0], ast.Tuple)]


def _uses(tree: ast.AST, names: set[str], after: int) -> list[ast.Name]:
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Name) and node.id in names and isinstance(node.ctx, ast.Load) and node.lineno > after]


# --------------------------------------------------------------------------------------------- the attention
def attention(module: torch.nn.Module, step, query: torch.Tensor, key, value, attention_mask: torch.Tensor | None,
              key_start: torch.Tensor | None, *, scale: float, sliding_window: int | None = None,
              softcap: float | None = None, chunk_size: int | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of a latent layer over its pools (what the ``"hf_paged"`` attention function runs for them).

    Args:
        module: the attention module (``kv_b_proj``, ``expand_kv``).
        step: the layer group's `StepPlan`.
        query: ``[B, H, q, dn + dr]`` (``[q_nope | q_rot]``, rotary embedding applied).
        key, value: the layer's latent pool ``[N, bs, 1, r]`` and rotary-key pool ``[N, bs, 1, dr]`` (tensors or
            `hf_paged.storage.LayerStore`s).
        attention_mask: the 2-D padding mask, a 4-D boolean mask, or None.
        key_start: ``[B]`` int32 first real key of each row when `attention_mask` is pure left padding (the
            Triton path needs it), else None.
        scale, sliding_window, softcap, chunk_size, sinks: as the attention function got them.

    Returns:
        ``[B, q, H, dv]`` contiguous.
    """
    weights = _absorbed_weights(module)
    plain = (sliding_window is None and softcap is None and chunk_size is None and sinks is None
             and (attention_mask is None or attention_mask.dim() == 2) and step.fresh is None and not step.key_offset)
    if weights is not None and plain and _fits(weights, query, key, value) and _absorbing_pays(weights, step.q_len):
        w_uk, w_uv = weights
        nope = w_uk.shape[1]
        q_latent = torch.matmul(query[..., :nope], w_uk)  # [B, H, q, r]
        out = _latent_attention(step, q_latent, query[..., nope:], key, value, attention_mask, key_start, scale)
        if out is not None:  # [B, q, H, r] -> [B, q, H, dv]
            return torch.matmul(out.transpose(1, 2), w_uv.transpose(1, 2)).transpose(1, 2).contiguous()
    return _expanded_attention(module, step, query, key, value, attention_mask, scale, sliding_window, softcap,
                               chunk_size, sinks)


def _fits(weights, query: torch.Tensor, key, value) -> bool:
    """Whether the query's heads and widths and the pools' are those of ``kv_b_proj`` (tensor parallelism shards
    the heads; a pool of another width is not this module's)."""
    w_uk, _ = weights
    heads, nope, rank = w_uk.shape
    return (query.shape[1] == heads and query.shape[-1] == nope + ops.head_dim(value) and ops.head_dim(key) == rank
            and key.shape[2] == 1 and query.device == w_uk.device and query.dtype == w_uk.dtype)


def _absorbing_pays(weights, q_len: int) -> bool:
    """Whether absorbing costs fewer multiply-adds than expanding the context, per key and head: scores and output
    over ``r`` (plus ``dr``) wide latents, ``q (2r + dr)``, against expanding each key, ``r (dn + dv)``, then
    attending over ``dn + dr`` wide keys and ``dv`` wide values, ``q (dn + dr + dv)``. Decode always absorbs;
    DeepSeek-V3 (r 512, dn 128, dv 128) up to 170 queries per row, so a long prompt is expanded."""
    w_uk, w_uv = weights
    rank, nope, value = w_uk.shape[2], w_uk.shape[1], w_uv.shape[1]
    return q_len * (2 * rank - nope - value) < rank * (nope + value)


def _latent_attention(step, q_latent: torch.Tensor, q_rot: torch.Tensor, key, value,
                      attention_mask: torch.Tensor | None, key_start: torch.Tensor | None,
                      scale: float) -> torch.Tensor | None:
    """Attention of ``[q_latent | q_rot]`` (``[B, H, q, r]`` and ``[B, H, q, dr]``) over keys ``[c | k_rot]`` and
    values ``c`` read from the pools: ``[B, q, H, r]``, or None where the Triton kernel cannot express the mask."""
    batch, heads, q_len, rank = q_latent.shape
    if step.triton:
        if attention_mask is not None and key_start is None:
            return None  # not pure left padding
        return backend.paged_attention(torch.cat([q_latent, q_rot.to(q_latent.dtype)], dim=-1), key, value,
                                       step.block_tables, step.seq_lens, key_start, scale=scale,
                                       max_seq_len=step.max_seq_len, latent=True, workspace=step.workspace)
    if step.block_range is not None or step.block_ranges is not None:
        # One row per (row, head, query), as `ops.range_attention` packs them, against each block range in place.
        packed = (q_latent.reshape(1, 1, -1, rank), q_rot.reshape(1, 1, batch * heads * q_len, -1))
        if step.block_range is not None:
            ranges = [step.block_range]
            range_masks = [(masks.range_mask(step, attention_mask, None, heads, q_latent.dtype), None)]
        else:
            ranges = step.block_ranges
            range_masks = masks.ranges_masks(step, attention_mask, None, heads, q_latent.dtype)
        out = lse = None
        for (first, count), (mask, _) in zip(ranges, range_masks, strict=True):
            part, part_lse = _attend(*packed, ops.read_blocks(key, first, count),
                                     ops.read_blocks(value, first, count), mask, scale)
            out, lse = (part, part_lse) if out is None else (ops.merge_attention(out, lse, part, part_lse),
                                                             torch.logaddexp(lse, part_lse))
        return out.view(batch, heads, q_len, rank).transpose(1, 2).to(q_latent.dtype)
    # Each row's latents: read in place when the single row's blocks are consecutive (`first_block`), else gathered.
    latents = ops.gather_kv(key, step.block_tables, step.max_seq_len, step.first_block)
    rotary = ops.gather_kv(value, step.block_tables, step.max_seq_len, step.first_block)
    mask = masks.step_mask(step, attention_mask, None)
    if mask is None and 1 < step.q_len == step.max_seq_len:  # the rows hold only this step's tokens: causal
        mask = torch.ones(q_len, q_len, dtype=torch.bool, device=q_latent.device).tril()
    out, _ = _attend(q_latent, q_rot, latents, rotary, mask, scale)
    return out.transpose(1, 2).to(q_latent.dtype)


def _attend(q_latent: torch.Tensor, q_rot: torch.Tensor, latents: torch.Tensor, rotary: torch.Tensor,
            mask: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores ``q_latent . c + q_rot . k_rot`` (products in the query's dtype, softmax in fp32), values ``c``.

    Args:
        q_latent, q_rot: ``[X, Y, M, r]`` and ``[X, Y, M, dr]``.
        latents, rotary: ``[X, 1, K, r]`` and ``[X, 1, K, dr]``.
        mask: broadcastable to ``[X, Y, M, K]``: boolean (True = attend) or additive, or None.

    Returns:
        ``(out [X, Y, M, r], lse [X, Y, M])`` in fp32; a query that sees no key gets 0 and ``-inf``.
    """
    dtype = q_latent.dtype
    scores = (torch.matmul(q_latent, latents.to(dtype).transpose(-1, -2)).float()
              + torch.matmul(q_rot.to(dtype), rotary.to(dtype).transpose(-1, -2)).float()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - finite[..., None])
    return torch.matmul(probs.to(dtype), latents.to(dtype)).float(), lse


def _expanded_attention(module, step, query, key, value, attention_mask, scale, sliding_window, softcap, chunk_size,
                        sinks) -> torch.Tensor:
    """Attention over the rows' latents gathered and expanded by the module's own ``expand_kv`` (what the model
    does with gathered latents), for what `attention` does not absorb."""
    latents = ops.gather_kv(key, step.block_tables, step.max_seq_len, step.first_block).to(query.dtype)
    rotary = ops.gather_kv(value, step.block_tables, step.max_seq_len, step.first_block).to(query.dtype)
    keys, values = module.expand_kv(latents, rotary)  # plain tensors: the wrapped expand_kv expands them
    mask = masks.step_mask(step, attention_mask, sliding_window, chunk_size)
    is_causal = mask is None and 1 < step.q_len == step.max_seq_len
    return ops.attend(query, keys, values, mask, scale=scale, softcap=softcap, is_causal=is_causal, sinks=sinks)
