"""Everything in hf_paged that depends on the installed Transformers release (5.0 and later), in one place.

What differs between the 5.x releases hf_paged supports:

* **the cache keyword.** Up to 5.23, ``generate()``, ``forward()``, ``model_kwargs`` and the outputs call the KV
  cache ``past_key_values``; from 5.24 they call it ``cache`` (the old name is still accepted from callers, with a
  deprecation warning, but ``generate()``'s internals only look at ``model_kwargs["cache"]``). `CACHE_KWARG` is
  the name the installed release uses, read from Transformers itself (the first entry of
  ``transformers.generation.utils.ALL_CACHE_NAMES``), not guessed from the version number.
* **the hooks.** `GenerationMixin` methods hf_paged wraps (`HOOKS`); every 5.x release has them with the
  signatures hf_paged calls them with, and `missing_hooks` names any that a future release drops, so that
  feature falls back to Transformers' own path instead of breaking.
"""

from __future__ import annotations

from typing import Any

import transformers
from transformers.generation import utils as _generation_utils

__all__ = ["CACHE_KWARG", "HOOKS", "TRANSFORMERS_VERSION", "cache_kwargs", "get_cache", "missing_hooks",
           "output_cache", "set_cache"]

TRANSFORMERS_VERSION: tuple[int, ...] = tuple(
    int(part) for part in transformers.__version__.split(".")[:2] if part.isdigit()
)


def _cache_kwarg() -> str:
    names = getattr(_generation_utils, "ALL_CACHE_NAMES", None)
    if names and names[0] in ("past_key_values", "cache"):
        return names[0]
    return "cache" if TRANSFORMERS_VERSION >= (5, 24) else "past_key_values"


CACHE_KWARG: str = _cache_kwarg()
"""The keyword ``generate()``/``forward()`` take the KV cache by, and the key it has in ``model_kwargs``."""

# GenerationMixin / PreTrainedModel methods hf_paged wraps or calls, by the feature that needs them.
HOOKS: dict[str, tuple[str, str]] = {
    "paged cache for generate()": ("GenerationMixin", "_prepare_cache_for_generation"),
    "prefill once per distinct prompt / prefix caching": ("GenerationMixin", "_prefill"),
    "one call at a time on a prefix-cache pool": ("GenerationMixin", "generate"),
    "clear load-time error for unsupported families": ("PreTrainedModel", "_check_and_adjust_attn_implementation"),
}


def missing_hooks() -> list[str]:
    """The features of `HOOKS` whose method the installed Transformers lacks (empty on every 5.x release)."""
    owners = {"GenerationMixin": _generation_utils.GenerationMixin, "PreTrainedModel": transformers.PreTrainedModel}
    return [feature for feature, (owner, name) in HOOKS.items() if not hasattr(owners[owner], name)]


def get_cache(model_kwargs: dict) -> Any:
    """The cache ``generate()`` holds in `model_kwargs` (None if there is none yet)."""
    return model_kwargs.get(CACHE_KWARG)


def set_cache(model_kwargs: dict, cache: Any) -> None:
    """Put `cache` where ``generate()`` looks for it in `model_kwargs`."""
    model_kwargs[CACHE_KWARG] = cache


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` to pass a cache to ``generate()`` or ``forward()`` under the installed release's name."""
    return {CACHE_KWARG: cache}


def output_cache(output: Any) -> Any:
    """The cache of a ``generate(..., return_dict_in_generate=True)`` or ``forward()`` output, without the
    deprecation warning the old attribute name gives from 5.24 on."""
    return getattr(output, CACHE_KWARG)
