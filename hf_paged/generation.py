"""The hook that makes ``generate()`` build a `PagedCache` for models loaded with ``attn_implementation="hf_paged"``.

Transformers has no registry for new cache implementations, so ``GenerationMixin._prepare_cache_for_generation``
(which sees the unexpanded batch size and writes the cache into ``model_kwargs``) is wrapped once, at import.
"""

from __future__ import annotations

import functools

from transformers import PreTrainedModel
from transformers.generation.utils import GenerationMixin

from .cache import PagedCache

__all__ = ["ATTN_IMPLEMENTATION", "install_generate_hook", "uses_hf_paged"]

ATTN_IMPLEMENTATION = "hf_paged"


def uses_hf_paged(model) -> bool:
    """Whether `model` was loaded (or switched) with ``attn_implementation="hf_paged"``."""
    return getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


def check_attention_interface(model_class: type) -> None:
    """Raise a clear error for model families whose attention ignores Transformers' attention interface."""
    if not model_class._can_set_attn_implementation():
        raise NotImplementedError(
            f'hf_paged: {model_class.__name__} does not support attn_implementation="hf_paged": its attention does '
            "not go through Transformers' attention interface, so it would ignore the paged cache. Load it with "
            'attn_implementation="sdpa" (or "eager") instead.'
        )


def check_supported(model) -> None:
    """Raise a clear error for models hf_paged cannot serve (see `check_attention_interface`; encoder-decoders)."""
    if model.config.is_encoder_decoder:
        raise NotImplementedError(
            f"hf_paged: {type(model).__name__} is an encoder-decoder model; hf_paged supports decoder-only models. "
            'Load it with attn_implementation="sdpa" instead.'
        )
    check_attention_interface(type(model))


def _prepare_cache_for_generation(original, self, generation_config, model_kwargs, generation_mode, batch_size,
                                  max_cache_length):
    user_cache = model_kwargs.get("past_key_values")
    if not uses_hf_paged(self):
        if isinstance(user_cache, PagedCache):
            raise ValueError(
                f"hf_paged: a PagedCache was passed to {type(self).__name__}, whose attn_implementation is "
                f"{self.config._attn_implementation!r}. Load the model with attn_implementation=\"hf_paged\" (or call "
                'model.set_attn_implementation("hf_paged")) to use a PagedCache.'
            )
        return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
    check_supported(self)
    if (
        user_cache is None
        and generation_config.use_cache is not False
        and generation_config.cache_implementation is None
        and self._supports_default_dynamic_cache()
    ):
        model_kwargs["past_key_values"] = PagedCache(self.config, device=self.device)
        return None
    return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)


def install_generate_hook() -> None:
    """Wrap ``GenerationMixin._prepare_cache_for_generation`` and the load-time attention check (idempotent)."""
    original = GenerationMixin._prepare_cache_for_generation
    if getattr(original, "_hf_paged_hook", False):
        return

    @functools.wraps(original)
    def hooked(self, *args, **kwargs):
        return _prepare_cache_for_generation(original, self, *args, **kwargs)

    hooked._hf_paged_hook = True
    GenerationMixin._prepare_cache_for_generation = hooked

    # Families with their own attention classes look "hf_paged" up in their own dicts while being built and fail
    # with a bare KeyError; Transformers checks the requested implementation first, so fail clearly there.
    original_check = PreTrainedModel._check_and_adjust_attn_implementation

    @functools.wraps(original_check)
    def checked(self, attn_implementation, *args, **kwargs):
        if attn_implementation == ATTN_IMPLEMENTATION:
            check_attention_interface(type(self))
        return original_check(self, attn_implementation, *args, **kwargs)

    PreTrainedModel._check_and_adjust_attn_implementation = checked
