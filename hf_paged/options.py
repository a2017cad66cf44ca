"""What a `PagedCache` may be asked for: its arguments checked, those ``generate(cache_config=...)`` gives the cache
``generate()`` builds (Transformers' place for "arguments used in the key-value cache class"), and what a layer may
write (`write_place`, `check_write`: refused before anything is stored)."""

from __future__ import annotations

import torch

from . import quant
from .kv_pool import KVPool, parse_bytes

__all__ = ["CACHE_CONFIG_KEYS", "check_placement", "check_write", "from_generation_config", "sizes", "storage_dtype",
           "write_place"]

#: The `PagedCache` arguments ``generate(cache_config={...})`` may set for the cache it builds.
CACHE_CONFIG_KEYS = ("block_size", "num_blocks", "max_memory", "kv_dtype")


def sizes(block_size, num_blocks, max_memory, dtype, kv_dtype) -> tuple[int | None, torch.dtype | None]:
    """``(max_memory in bytes, the pools' storage dtype)`` from `PagedCache`'s sizing and storage arguments, or a
    ValueError naming the one that is wrong."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"hf_paged: block_size must be a positive int, got {block_size!r}.")
    if num_blocks is not None and max_memory is not None:
        raise ValueError("hf_paged: pass either num_blocks or max_memory to PagedCache, not both.")
    if num_blocks is not None and (isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0):
        raise ValueError(f"hf_paged: num_blocks must be a positive int, got {num_blocks!r}.")
    return (parse_bytes(max_memory) if max_memory is not None else None), storage_dtype(dtype, kv_dtype)


def storage_dtype(dtype: torch.dtype | None, kv_dtype) -> torch.dtype | None:
    """The pools' storage dtype from `PagedCache`'s ``dtype`` and ``kv_dtype`` (at most one of them)."""
    fmt = quant.kv_format(kv_dtype)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"hf_paged: dtype must be a torch.dtype, got {dtype!r}; for 8-bit keys and values pass "
                         "kv_dtype='int8' or 'float8_e4m3fn'.")
    if fmt is None:
        return dtype
    if dtype is not None and dtype != fmt.dtype:
        raise ValueError(f"hf_paged: pass dtype={dtype} or kv_dtype={kv_dtype!r} to PagedCache, not both: kv_dtype "
                         "sets how keys and values are stored.")
    return fmt.dtype


def check_placement(num_layers: int, attention_layers: int, pool, layer_devices, num_blocks, max_memory, device,
                    dtype) -> None:
    """Refuse placement arguments that contradict each other: ``layer_devices`` with a pool, a device or a byte
    budget, or of the wrong length; a shared ``pool`` with sizing or storage arguments, or of another model."""
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
                               or (isinstance(pool, KVPool) and pool.num_layers != attention_layers)):
        raise ValueError("hf_paged: a PagedCache given a shared pool takes its size, device and dtype (kv_dtype "
                         "included) from it.")


def from_generation_config(generation_config, prefix_caching: bool) -> dict:
    """The `PagedCache` arguments in ``generation_config.cache_config``: `CACHE_CONFIG_KEYS`. Unlike a cache passed
    in, the cache they configure is still the call's own, so rows that end still give their blocks back
    (`PagedCache.end_rows`)."""
    options = getattr(generation_config, "cache_config", None) or {}
    if not isinstance(options, dict) or set(options) - set(CACHE_CONFIG_KEYS):
        unknown = sorted(set(options) - set(CACHE_CONFIG_KEYS)) if isinstance(options, dict) else options
        raise ValueError(
            f"hf_paged: generate(cache_config=...) configures the PagedCache generate() builds and takes a dict of "
            f"{', '.join(CACHE_CONFIG_KEYS)}; got {unknown!r}. For any other cache argument pass a cache yourself "
            "(**hf_paged.compat.cache_kwargs(PagedCache(model.config, ...)))."
        )
    if options and prefix_caching:
        raise ValueError(
            "hf_paged: generate(cache_config=...) does not apply to a model with prefix caching: its caches share "
            "the model's pools, sized by enable_prefix_caching(model, block_size=..., num_blocks=..., max_memory=..., "
            "kv_dtype=...)."
        )
    return dict(options)


def write_place(layer_idx, key_states: torch.Tensor, value_states: torch.Tensor, layer_pools: list,
                kv_sources: dict[int, int]) -> tuple[KVPool, int]:
    """``(pool, index there)`` of the layer `layer_idx` writing to a `PagedCache` whose layers have `layer_pools`
    (None: no pool) and read other layers' keys by `kv_sources`, or an error: the index is not one of the config's
    layers, the keys require grad, or the config gives the layer no pool (KV-shared, linear attention)."""
    layers = len(layer_pools)
    if not isinstance(layer_idx, int) or not 0 <= layer_idx < layers:
        raise ValueError(
            f"hf_paged: layer {layer_idx!r} wrote to a PagedCache built for {layers} layer(s) (layers "
            f"0..{layers - 1}, from the num_hidden_layers of the config it was given). Build the cache from the config "
            "of the model that uses it: PagedCache(model.config)."
        )
    if key_states.requires_grad or value_states.requires_grad:
        raise RuntimeError(
            f"hf_paged: layer {layer_idx} stored keys that require grad in a PagedCache. Its blocks are written in "
            "place and its attention reads them back, so no gradient could flow through them: run the forward "
            "pass under torch.no_grad() or torch.inference_mode() (generate() does), or, to train, call the "
            "model without a PagedCache (use_cache=False or a DynamicCache)."
        )
    place = layer_pools[layer_idx]
    if place is None:
        source = kv_sources.get(layer_idx)
        if source is not None:
            raise ValueError(
                f"hf_paged: layer {layer_idx} stored keys and values in a PagedCache, but the model config makes "
                f"it a KV-shared layer (it reads layer {source}'s keys and values and keeps none). The cache must be "
                "built from this model's config."
            )
        raise ValueError(
            f"hf_paged: layer {layer_idx} stored keys and values in a PagedCache, but the model config makes it a "
            "linear-attention / state-space layer. The cache must be built from this model's config."
        )
    return place


def check_write(layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor, pool: KVPool) -> None:
    """Refuse keys computed on another device than the layer's pool, or keys and values of different batch sizes
    or token counts."""
    if key_states.device != pool.device:
        raise ValueError(
            f"hf_paged: layer {layer_idx} computes its keys on {key_states.device}, but its PagedCache pool is on "
            f"{pool.device}. For a model split across devices (device_map), let generate() build the cache "
            "or pass PagedCache(config, layer_devices=hf_paged.devices.layer_placements(model)); prefix caching "
            "(enable_prefix_caching) keeps one pool on one device and does not support such models yet."
        )
    key_shape, value_shape = key_states.shape, value_states.shape
    if value_shape[0] != key_shape[0] or value_shape[2] != key_shape[2]:
        raise ValueError(
            f"hf_paged: layer {layer_idx} gives keys {tuple(key_shape)} and values "
            f"{tuple(value_shape)}: a PagedCache needs keys and values of the same batch size and number "
            "of tokens."
        )
