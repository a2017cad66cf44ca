"""Everything in hf_paged that depends on the installed Transformers release (5.0 and later), in one place.

What differs between the 5.x releases hf_paged supports:

* **the cache keyword.** Up to 5.23, ``generate()``, ``forward()``, ``model_kwargs`` and the outputs call the KV
  cache ``past_key_values``; from 5.24 they call it ``cache`` (the old name is still accepted from callers, with a
  deprecation warning, but ``generate()``'s internals only look at ``model_kwargs["cache"]``). `CACHE_KWARG` is
  the name the installed release uses, read from Transformers itself (the first entry of
  ``transformers.generation.utils.ALL_CACHE_NAMES``), not guessed from the version number.
* **the mask interface and cache sizes.** Up to some 5.x release (5.0 has it, 5.17 no longer), mask functions
  are called with ``cache_position`` (a ``[q]`` tensor of positions) and ``Cache.get_mask_sizes`` takes that
  tensor; later releases pass ``q_length``/``q_offset`` and the query length. hf_paged's mask function and cache
  are written for the later form; `mask_function`, `sdpa_mask` and `query_length` translate for the earlier one
  (detected from the signature of ``masking_utils.sdpa_mask``).
* **additive masks.** In 5.0 many families (OPT, GPT-J, ...) still build their own 4-D float mask (0 where a key
  is seen, the dtype's minimum where not) instead of calling the mask interface; `bool_mask` turns that into the
  boolean mask hf_paged's attention takes.
* **crop.** In 5.0 ``Cache.crop`` takes the length to keep (or, negative, the tokens to remove), and assisted
  and prompt-lookup decoding pass the length; later releases take only the negative form. `CROP_TAKES_LENGTH`.
* **tensor parallelism.** ``from_pretrained(tp_plan="auto")`` in 5.0; ``distributed_config=DistributedConfig(
  tp_plan="auto")`` once `DistributedConfig` takes ``tp_plan`` (the bare keyword is deprecated there).
  `tensor_parallel_kwargs`.
* **position ids.** From 5.17 ``generate()`` puts the prompt's ``position_ids`` (``cumsum(attention_mask) - 1``)
  into ``model_kwargs`` before the prefill; 5.0 derives the same in ``prepare_inputs_for_generation``, for models
  whose ``forward`` takes ``position_ids``. `prompt_position_ids` returns them either way (the prefix cache hashes
  them).
* **the hooks.** `GenerationMixin` methods hf_paged wraps (`HOOKS`, with the parameters hf_paged reads and where);
  every 5.x release has them with those signatures (``tests/test_conformance.py`` checks the installed release),
  and `missing_hooks` names any that a future release drops, so that feature falls back to Transformers' own
  path instead of breaking.
* **past recording.** From 5.25 ``Cache.activate_past_recording`` passes keyword arguments
  (``recurrent_states_to_keep``) on to its layers, whose own method takes them; earlier layers take none.
  `call_accepting` passes a method only the keywords it accepts. Some class attributes (``is_croppable``) are
  properties in one release and plain values in another: `class_attribute` reads either.
* **the release tested last.** `LAST_TESTED_TRANSFORMERS` is the newest release the whole suite passed on; on a
  newer one nothing behaves differently, but errors passing through hf_paged's hooks say so (`note_untested`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import masking_utils as _masking_utils
from transformers.cache_utils import DynamicLayer as _DynamicLayer
from transformers.generation import utils as _generation_utils

__all__ = ["CACHE_KWARG", "CROP_TAKES_LENGTH", "HOOKS", "LAST_TESTED_TRANSFORMERS", "MASK_TAKES_CACHE_POSITION",
           "TRANSFORMERS_VERSION", "bool_mask", "builds_own_mask", "cache_kwargs", "call_accepting", "class_attribute",
           "get_cache", "mask_function", "missing_hooks", "note_untested", "output_cache", "prompt_position_ids",
           "query_length", "sdpa_mask", "set_cache", "tensor_parallel_kwargs", "text_config"]

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

LAST_TESTED_TRANSFORMERS: tuple[int, int] = (5, 25)
"""The newest Transformers release (major, minor) the whole suite has passed on. CI installs the newest 5.x there is
on the day it runs, and ``tests/test_conformance.py`` fails on a newer one until this is raised (after the suite
passed there): a new release makes CI red before it reaches users."""

# GenerationMixin / PreTrainedModel methods hf_paged wraps or calls, by the feature that needs them: (owner, name,
# the leading parameters after ``self`` that hf_paged reads by position, in order).
HOOKS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "paged cache for generate()": ("GenerationMixin", "_prepare_cache_for_generation",
                                   ("generation_config", "model_kwargs", "generation_mode", "batch_size",
                                    "max_cache_length")),
    "prefill once per distinct prompt / prefix caching": ("GenerationMixin", "_prefill",
                                                          ("input_ids", "generation_config", "model_kwargs")),
    "ended rows give their blocks back": ("GenerationMixin", "_sample",
                                          ("input_ids", "logits_processor", "stopping_criteria", "generation_config")),
    "one call at a time on a prefix-cache pool": ("GenerationMixin", "generate", ()),
    "clear load-time error for unsupported families": ("PreTrainedModel", "_check_and_adjust_attn_implementation",
                                                       ("attn_implementation",)),
}


def missing_hooks() -> list[str]:
    """The features of `HOOKS` whose method the installed Transformers lacks (empty on every 5.x release)."""
    return [feature for feature, (owner, name, _) in HOOKS.items() if not hasattr(hook_owner(owner), name)]


def hook_owner(owner: str) -> type:
    """The Transformers class a `HOOKS` entry names."""
    return {"GenerationMixin": _generation_utils.GenerationMixin, "PreTrainedModel": transformers.PreTrainedModel}[owner]


def note_untested(error: BaseException) -> None:
    """Add to `error` (once) that the installed Transformers is newer than `LAST_TESTED_TRANSFORMERS`, if it is: what
    a user reporting an error from inside hf_paged's hooks on a new release needs to know first."""
    if TRANSFORMERS_VERSION <= LAST_TESTED_TRANSFORMERS or getattr(error, "_hf_paged_noted", False):
        return
    tested = ".".join(map(str, LAST_TESTED_TRANSFORMERS))
    note = (f"hf_paged: this is Transformers {transformers.__version__}, newer than {tested}, the last release "
            "hf_paged was tested with; if this error comes from that difference, please report it (and install "
            f"transformers=={tested}.* meanwhile).")
    try:
        error._hf_paged_noted = True
    except AttributeError:  # an exception type without a __dict__
        return
    if hasattr(error, "add_note"):  # Python 3.11+
        error.add_note(note)


def call_accepting(method: Callable, **kwargs: Any) -> Any:
    """Call `method` with those of `kwargs` it accepts (all of them if it takes ``**kwargs``)."""
    parameters = inspect.signature(method).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        kwargs = {name: value for name, value in kwargs.items() if name in parameters}
    return method(**kwargs)


def class_attribute(cls: type, name: str, instance: Any) -> Any:
    """``cls.name`` as `instance` would read it when `cls` defines it as a property (some releases) or as a plain
    class attribute (others), bypassing any override in `instance`'s own class."""
    attribute = inspect.getattr_static(cls, name)
    return attribute.fget(instance) if isinstance(attribute, property) else attribute


def text_config(config: Any) -> Any:
    """The decoder's config of a (possibly multimodal) model config, or the config itself."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


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


MASK_TAKES_CACHE_POSITION: bool = "cache_position" in inspect.signature(_masking_utils.sdpa_mask).parameters
"""Whether this release calls mask functions with ``cache_position`` instead of ``q_length``/``q_offset``."""


def mask_function(function: Callable) -> Callable:
    """`function` (written for ``q_length``/``q_offset``) in the form this release's `AttentionMaskInterface`
    calls. On releases that pass ``cache_position``, the wrapper derives ``q_length`` and ``q_offset`` from it and
    keeps it in the keyword arguments, for `sdpa_mask` to hand back to Transformers."""
    if not MASK_TAKES_CACHE_POSITION:
        return function

    @functools.wraps(function)
    def wrapper(batch_size: int, cache_position: torch.Tensor, kv_length: int, kv_offset: int = 0, **kwargs):
        q_offset = int(cache_position[0]) if cache_position.numel() else 0
        return function(batch_size, cache_position.shape[0], kv_length, q_offset, kv_offset,
                        cache_position=cache_position, **kwargs)

    return wrapper


def sdpa_mask(*, batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
              **kwargs) -> torch.Tensor | None:
    """Transformers' ``sdpa_mask`` with the ``q_length``/``q_offset`` arguments, on any release."""
    if not MASK_TAKES_CACHE_POSITION:
        return _masking_utils.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                                        q_offset=q_offset, kv_offset=kv_offset, **kwargs)
    cache_position = kwargs.pop("cache_position", None)
    if cache_position is None:
        cache_position = torch.arange(int(q_offset), int(q_offset) + q_length)
    return _masking_utils.sdpa_mask(batch_size=batch_size, cache_position=cache_position, kv_length=kv_length,
                                    kv_offset=kv_offset, **kwargs)


def query_length(query: int | torch.Tensor) -> int:
    """The query length ``Cache.get_mask_sizes`` is given: an int, or (older releases) the ``[q]`` cache positions."""
    return query.shape[0] if isinstance(query, torch.Tensor) else int(query)


def bool_mask(additive: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True = attend) from an additive float mask (0 = attend, a large negative value = do not)."""
    return additive > torch.finfo(additive.dtype).min / 2


def builds_own_mask(model: torch.nn.Module) -> bool:
    """Whether `model` builds its own 4-D mask (``_update_causal_mask``, many families in 5.0) instead of calling
    the mask interface: hf_paged's attention then takes the general path over that mask (same tokens, slower)."""
    return any(hasattr(module, "_update_causal_mask") for module in model.modules())


CROP_TAKES_LENGTH: bool = list(inspect.signature(_DynamicLayer.crop).parameters)[1:2] == ["max_length"]
"""Whether this release's ``Cache.crop`` takes a positive length to keep (5.0) besides negative token counts."""


def prompt_position_ids(model: torch.nn.Module, model_kwargs: dict) -> torch.Tensor | None:
    """The position ids ``generate()`` gives `model`'s prompt forward (``[B, L]``, or ``[3, B, L]`` for multimodal
    RoPE): ``model_kwargs["position_ids"]`` when set (by the caller, or by ``generate()`` itself from 5.17 on); else,
    when the model's ``forward`` takes ``position_ids`` and an attention mask is given, what 5.0's
    ``prepare_inputs_for_generation`` derives from the mask (``cumsum - 1``; padded positions hold 1); else None (the
    model computes its own positions)."""
    position_ids = model_kwargs.get("position_ids")
    if position_ids is not None:
        return position_ids
    mask = model_kwargs.get("attention_mask")
    if mask is None or mask.dim() != 2 or "position_ids" not in inspect.signature(model.forward).parameters:
        return None
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def tensor_parallel_kwargs(tp_plan: str | dict = "auto") -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for tensor parallelism under ``torchrun`` on this release."""
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return {"tp_plan": tp_plan}
    if "tp_plan" not in inspect.signature(DistributedConfig).parameters:
        return {"tp_plan": tp_plan}
    return {"distributed_config": DistributedConfig(tp_plan=tp_plan)}


# Hybrid models' per-layer states (linear attention, Mamba) inside the default cache: releases before these names
# existed (5.0) keep such states in model-specific cache classes, which hf_paged refuses at load (`hf_paged.support`:
# the family keeps its own cache), so a `PagedCache` there pages every layer and never builds a state layer.
try:
    from transformers.cache_utils import (
        DYNAMIC_LAYER_TYPE_MAPPING,
        LinearAttentionCacheLayerMixin,
        LinearAttentionLayer,
        get_layer_types_and_kwargs,
    )

    HAS_STATE_LAYERS = True
except ImportError:
    HAS_STATE_LAYERS = False
    DYNAMIC_LAYER_TYPE_MAPPING: dict = {}

    class LinearAttentionCacheLayerMixin:  # noqa: D101 -- absent from this release: nothing is an instance of it
        pass

    class LinearAttentionLayer(LinearAttentionCacheLayerMixin):  # noqa: D101 -- never built on this release
        def __init__(self, *args: Any, **kwargs: Any):
            raise NotImplementedError("hf_paged: this Transformers release has no LinearAttentionLayer (hybrid "
                                      "models keep their own caches there).")

    def get_layer_types_and_kwargs(config) -> tuple[list, list]:
        """This release reads no per-layer cache kinds: every layer is plain attention."""
        return [], []


def transformers_version_text() -> str:
    """The installed Transformers release, for messages."""
    return transformers.__version__
