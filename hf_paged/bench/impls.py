"""The KV-cache implementations the bench compares: the attention each runs, the cache it uses, how ``generate()``
is asked for that cache, and how many bytes the cache's tensors hold.

* ``hf_paged``: ``attn_implementation="hf_paged"`` and the `hf_paged.PagedCache` ``generate()`` builds (unquantized).
* ``hf_paged-int8`` / ``hf_paged-fp8``: the same with 8-bit storage (issue 21), ``generate(cache_config={"kv_dtype":
  "int8" | "float8_e4m3fn"})`` or ``PagedCache(config, kv_dtype=...)``.
* ``sdpa``: ``attn_implementation="sdpa"`` and Transformers' `DynamicCache` (the reference).
* ``quanto-int2`` / ``quanto-int4`` / ``quanto-int8``: sdpa with Transformers' `QuantizedCache` on the optimum-quanto
  backend, built as ``generate(cache_implementation="quantized", cache_config={"backend": "quanto", "nbits": n})``
  builds it, every other option at Transformers' default (`QUANTO_DEFAULTS`). Transformers refuses ``nbits=8`` on
  this backend; the bench reports its reason (`unavailable`).

``generate_batch`` (Transformers' continuous batching) is not a cache of its own here: `runner.Runner` runs it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

import hf_paged

__all__ = ["IMPLS", "QUANTO_DEFAULTS", "Impl", "cache_bytes", "kv_dtype_available", "new_cache", "set_attention",
           "unavailable"]

#: The `QuantizedCache` options the quanto rows leave at Transformers' defaults (`QuantizedLayer`), for the report.
QUANTO_DEFAULTS = {"axis_key": 0, "axis_value": 0, "q_group_size": 64, "residual_length": 128}


@dataclass(frozen=True)
class Impl:
    """One implementation: its `attention` (``"hf_paged"`` or ``"sdpa"``), and at most one of `kv_dtype` (hf_paged's
    8-bit storage) and `nbits` (a quanto `QuantizedCache` of that many bits)."""

    name: str
    attention: str
    kv_dtype: str | None = None
    nbits: int | None = None

    @property
    def paged(self) -> bool:
        """Whether it runs hf_paged (its KV bytes come from the cache's stats)."""
        return self.attention == "hf_paged"

    @property
    def quantized_cache(self) -> dict | None:
        """``generate(cache_config=...)`` for a `QuantizedCache`, or None."""
        return None if self.nbits is None else {"backend": "quanto", "nbits": self.nbits}

    def generate_kwargs(self) -> dict:
        """What ``generate()`` is given so that it builds this implementation's cache (besides the attention)."""
        if self.kv_dtype is not None:
            return {"cache_config": {"kv_dtype": self.kv_dtype}}
        if self.nbits is not None:
            return {"cache_implementation": "quantized", "cache_config": self.quantized_cache}
        return {}


IMPLS: dict[str, Impl] = {
    impl.name: impl
    for impl in (
        Impl("hf_paged", "hf_paged"),
        Impl("hf_paged-int8", "hf_paged", kv_dtype="int8"),
        Impl("hf_paged-fp8", "hf_paged", kv_dtype="float8_e4m3fn"),
        Impl("sdpa", "sdpa"),
        Impl("quanto-int2", "sdpa", nbits=2),
        Impl("quanto-int4", "sdpa", nbits=4),
        Impl("quanto-int8", "sdpa", nbits=8),
    )
}


def set_attention(model, name: str) -> None:
    """Switch `model` to ``attn_implementation=name`` (an `Impl`'s ``attention``); raises RuntimeError if it did not
    switch (Transformers only logs when it cannot)."""
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} did not switch to attn_implementation={name!r}")


def kv_dtype_available() -> bool:
    """Whether this hf_paged stores 8-bit keys and values (``PagedCache(config, kv_dtype=...)``, issue 21)."""
    return "kv_dtype" in inspect.signature(hf_paged.PagedCache).parameters


def _quantized_cache(impl: Impl, config):
    from transformers import QuantizedCache

    return QuantizedCache(config=config.get_text_config(decoder=True), **impl.quantized_cache)


def unavailable(impl: Impl, model) -> str | None:
    """Why `impl` cannot run on `model` in this environment, or None. A `QuantizedCache` is built once to ask
    Transformers itself (optimum-quanto missing, bits the backend refuses, layers that are not full attention)."""
    if impl.kv_dtype is not None and not kv_dtype_available():
        return "8-bit KV storage (PagedCache(kv_dtype=...), issue 21) is not available in this checkout of hf_paged"
    if impl.nbits is not None:
        try:
            _quantized_cache(impl, model.config)
        except (ImportError, ValueError) as error:
            return f"QuantizedCache refused: {str(error).strip().splitlines()[0]}"
    return None


def new_cache(impl: Impl, model):
    """A new empty cache of `impl` for `model`, as ``generate()`` would build it, to pass to ``model(...)``."""
    from transformers import DynamicCache

    if impl.paged:
        options = {} if impl.kv_dtype is None else {"kv_dtype": impl.kv_dtype}
        return hf_paged.PagedCache(model.config, device=model.device, **options)
    if impl.nbits is not None:
        return _quantized_cache(impl, model.config)
    return DynamicCache(config=model.config)


def _tensor_bytes(value) -> int:
    """Bytes of the plain tensors in `value`: a tensor, a tensor subclass made of inner tensors (optimum-quanto's
    packed data, scales and shifts: ``__tensor_flatten__``), or a tuple / list of those (HQQ, fp8)."""
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if not isinstance(value, torch.Tensor):
        return 0
    if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
        names, _ = value.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(value, name)) for name in names)
    return value.numel() * value.element_size()


def cache_bytes(cache) -> int:
    """Bytes of the key and value tensors a Transformers cache holds, over all layers: a `DynamicCache`'s keys and
    values; a `QuantizedCache`'s quantized keys and values (payload, scales, zero-points) and its residual
    full-precision keys and values."""
    names = ("keys", "values", "_quantized_keys", "_quantized_values")
    return sum(_tensor_bytes(getattr(layer, name, None)) for layer in cache.layers for name in names)
