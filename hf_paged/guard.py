"""The guard on a layer's pools: what `PagedCache.update` hands the model, and the way back to the cache.

`update` returns a layer's key and value pools as `PagedPool` tensors. Each carries a weak reference to its
`hf_paged.kv_pool.KVPool` and the layer's index there, so the ``"hf_paged"`` attention finds the cache that wrote
it just before (`owner_of`) without any global state: concurrent ``generate`` calls never see each other's steps.
Any other attention implementation that got such a tensor would read a block pool as contiguous keys; every
operation on it raises instead.
"""

from __future__ import annotations

import weakref

import torch

__all__ = ["PagedPool", "guarded", "owner_of", "place_of"]

_OWNER_ATTR = "_hf_paged_owner"
_LAYER_ATTR = "_hf_paged_layer"


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


def guarded(tensor: torch.Tensor, pool, layer: int) -> PagedPool:
    """`tensor` (a view of `pool`'s storage for `layer`) as a `PagedPool` that leads back to `pool`."""
    out = tensor.as_subclass(PagedPool)
    setattr(out, _OWNER_ATTR, weakref.ref(pool))
    setattr(out, _LAYER_ATTR, layer)
    return out


def place_of(tensor: torch.Tensor) -> tuple:
    """``(pool, layer index there)`` of a guarded tensor (``(None, None)`` for any other tensor or a dead pool)."""
    pool_ref = getattr(tensor, _OWNER_ATTR, None)
    return (pool_ref() if pool_ref is not None else None), getattr(tensor, _LAYER_ATTR, None)


def owner_of(tensor: torch.Tensor):
    """The `PagedCache` that just wrote into the pool `tensor` belongs to, or None for ordinary key/value tensors."""
    pool = place_of(tensor)[0]
    return pool.active() if pool is not None and pool.active is not None else None
