"""The hooks that fit hf_paged into ``generate()`` for models loaded with ``attn_implementation="hf_paged"``.

Transformers has no registry for new cache implementations, so ``import hf_paged`` wraps, once:

* ``GenerationMixin._prepare_cache_for_generation`` (it writes the cache into ``model_kwargs``): build a
  `PagedCache` (on the model's prefix-cache pool, if any; sized by ``cache_config``, `hf_paged.options`); refuse a
  `PagedCache` given to another attention;
* ``GenerationMixin._prefill`` (the first forward): run each distinct prompt row once and fork it k ways; map
  prefix-cache hits before it and index the prompt's full blocks after it; tell the cache the call's
  ``max_length`` (`PagedCache.expect_length`: the pool reserves no slack past it);
* ``GenerationMixin._sample`` (greedy and sampling): in a cache the call built and does not return, rows the
  stopping criteria have ended are marked (`PagedCache.end_rows`): the padding ``generate`` feeds them takes no
  new blocks, and a row holding only blocks of its own gives them back;
* ``GenerationMixin.generate``: calls on a model with prefix caching run one at a time; a call that fails
  releases at once the rows of the caches it built (and of an empty cache it was given); inside
  `recorded_stats`, the stats of the caches a call built are kept when it returns;
* ``PreTrainedModel._check_and_adjust_attn_implementation``: families outside the attention interface, and those
  `hf_paged.support` finds it cannot serve, fail at load with a clear error.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.utils import GenerationMixin

from . import compat, prefix, support
from . import options as cache_options
from .cache import PagedCache
from .devices import layer_placements
from .stats import CacheStats
from .support import ATTN_IMPLEMENTATION, uses_hf_paged

__all__ = ["ATTN_IMPLEMENTATION", "install_generate_hook", "recorded_stats", "uses_hf_paged"]

# The caches the current ``generate`` call built (released at once if the call fails).
_CALL_CACHES: contextvars.ContextVar[list[PagedCache] | None] = contextvars.ContextVar("hf_paged_call_caches",
                                                                                        default=None)
# Where `recorded_stats` collects the stats of the caches each call built (None: outside it).
_RECORDED: contextvars.ContextVar[list[CacheStats] | None] = contextvars.ContextVar("hf_paged_recorded_stats",
                                                                                    default=None)


@contextlib.contextmanager
def recorded_stats() -> Iterator[list[CacheStats]]:
    """Collect the `CacheStats` of the caches ``generate()`` builds, without keeping the caches.

    Inside the ``with`` block, every successful ``generate()`` call made in this thread (or asyncio task: the
    collector is a context variable) on a model loaded with ``attn_implementation="hf_paged"`` appends, when it
    returns, the stats of each `PagedCache` it built (one per call; none for a cache passed in). That is how to
    see what a call allocated without ``return_dict_in_generate=True``, which returns the cache and so keeps every
    row of it exact (see `PagedCache.end_rows`)::

        with hf_paged.recorded_stats() as stats:
            model.generate(**inputs, max_new_tokens=200)
        print(stats[-1].peak_pool_bytes)
    """
    recorded: list[CacheStats] = []
    token = _RECORDED.set(recorded)
    try:
        yield recorded
    finally:
        _RECORDED.reset(token)


def check_attention_interface(model_class: type) -> None:
    """Raise a clear error for model families whose attention ignores Transformers' attention interface."""
    if not model_class._can_set_attn_implementation():
        raise NotImplementedError(
            f'hf_paged: {model_class.__name__} does not support attn_implementation="hf_paged": its attention does '
            "not go through Transformers' attention interface, so it would ignore the paged cache. "
            f"{support.fallback_advice(model_class)}"
        )


def check_supported(model) -> None:
    """Raise a clear error for models hf_paged cannot serve (see `check_attention_interface`; encoder-decoders)."""
    if model.config.is_encoder_decoder:
        raise NotImplementedError(
            f"hf_paged: {type(model).__name__} is an encoder-decoder model; hf_paged supports decoder-only models. "
            f"{support.fallback_advice(type(model))}"
        )
    check_attention_interface(type(model))


def _prepare_cache_for_generation(original, self, generation_config, model_kwargs, generation_mode, batch_size,
                                  max_cache_length):
    user_cache = compat.get_cache(model_kwargs)
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
        shared = prefix.prefix_cache_of(self)
        options = cache_options.from_generation_config(generation_config, shared is not None)
        cache = shared.new_cache(self.config) if shared is not None else _new_cache(self, **options)
        created = _CALL_CACHES.get()
        if created is not None:
            created.append(cache)
        compat.set_cache(model_kwargs, cache)
        _record_past_if_assisted(cache, generation_config, generation_mode)
        return None
    result = original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
    _record_past_if_assisted(compat.get_cache(model_kwargs), generation_config, generation_mode)
    return result


def _record_past_if_assisted(cache, generation_config, generation_mode) -> None:
    """Assisted decoding rolls the cache back: a `PagedCache` then keeps sliding-window keys until each `crop`
    (newer releases ask for this themselves through ``activate_past_recording``)."""
    assisted = "assisted" in str(getattr(generation_mode, "value", generation_mode)).lower()
    if isinstance(cache, PagedCache) and (assisted or getattr(generation_config, "is_assistant", False)):
        cache.activate_past_recording()


def _new_cache(model, **options) -> PagedCache:
    """The cache ``generate()`` builds (`options`: `hf_paged.options.from_generation_config`): one pool on the
    model's device, or one per device-map entry of its layers."""
    placements = layer_placements(model)
    if placements is None:
        return PagedCache(model.config, device=model.device, **options)
    return PagedCache(model.config, layer_devices=placements, **options)


_PLAIN_KWARG_TYPES = (bool, int, float, str, type(None), Cache)


def _prefill(original, self, input_ids, generation_config, model_kwargs, *args, **kwargs):
    """The prompt's forward pass, computed once per distinct prompt row and, with prefix caching, only past the
    blocks an earlier call already holds.

    ``generate()`` has already repeated every prompt row k = max(num_beams, num_return_sequences) times. When the
    cache is a `PagedCache` and the k copies are identical, the forward pass sees only every k-th row; the cache
    then forks each row k ways (ref counts only, no copy) and the outputs are repeated to the k rows, so the
    decoding loop sees exactly what it would have seen. Anything this cannot reproduce falls back to the ordinary
    prefill.
    """
    cache = compat.get_cache(model_kwargs)
    if not isinstance(cache, PagedCache):
        return original(self, input_ids, generation_config, model_kwargs, *args, **kwargs)
    _check_continues(cache, input_ids, model_kwargs)
    k = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
    reduced = _reduce(input_ids, model_kwargs, k) if k > 1 and cache.manager.num_rows in (0, len(input_ids) // k) \
        else None
    if reduced is None:
        k = 1
        reduced = (input_ids, model_kwargs)
    reduced_ids, reduced_kwargs = reduced
    starts = None
    if cache.manager.num_rows == 0:  # left padding takes no block
        starts = _row_starts(reduced_kwargs.get("attention_mask"), _input_length(reduced_ids, reduced_kwargs))
        cache.set_row_starts(starts)
        # generate() extends the mask by ones: every step's padding is the rows' live starts (until the call ends)
        cache.expect_left_padding(starts is not None)
    shared = prefix.prefix_cache_of(self)
    hashes = None
    # Prompts given as inputs_embeds have no token ids to hash: they are computed whole.
    if (shared is not None and cache.pool is shared.pool and cache.manager.num_rows == 0
            and _input_length(reduced_ids, reduced_kwargs) == reduced_ids.shape[1]):
        hashes = prefix.block_hashes(reduced_ids, reduced_kwargs.get("attention_mask"), cache.block_size,
                                     salt=shared.salt_for(self), starts=starts,
                                     position_ids=compat.prompt_position_ids(self, reduced_kwargs))
        with cache.locked():
            prefix.map_cached_prefix(cache, hashes, reduced_ids.shape[1])
    cache.expect_forks(k)  # the k rows share the prompt's blocks: the pool's slack is sized for k growing rows
    cache.expect_length(generation_config.max_length)  # no row grows past it in this call (reset when it returns)
    try:
        outputs = original(self, reduced_ids, generation_config, reduced_kwargs, *args, **kwargs)
    finally:
        cache.set_row_starts(None)
        cache.expect_forks(1)
    for key in reduced_kwargs.keys() - model_kwargs.keys():
        model_kwargs[key] = reduced_kwargs[key]  # what the prefill adds for the decoding loop (5.0: cache_position)
    if _outlives_call(cache, generation_config):  # only a cache that can be continued needs its tokens checked
        cache.note_tokens(reduced_ids)
    if hashes is not None:
        with cache.locked():
            prefix.index_prompt_blocks(cache, hashes)
    if k > 1:
        cache.batch_repeat_interleave(k)
        for key, value in outputs.items():
            if isinstance(value, torch.Tensor):
                outputs[key] = value.repeat_interleave(k, dim=0)
            elif isinstance(value, tuple) and all(isinstance(item, torch.Tensor) for item in value):
                outputs[key] = tuple(item.repeat_interleave(k, dim=0) for item in value)
    return outputs


def _input_length(input_ids: torch.Tensor, model_kwargs: dict) -> int:
    """Tokens per row of a call's input: ``input_ids``, or the ``inputs_embeds`` it starts from (``input_ids`` is then
    empty, as ``generate`` passes it)."""
    embeds = model_kwargs.get("inputs_embeds")
    return max(input_ids.shape[1], embeds.shape[1] if isinstance(embeds, torch.Tensor) else 0)


def _check_continues(cache: PagedCache, input_ids: torch.Tensor, model_kwargs: dict) -> None:
    """Refuse input that cannot continue what `cache` holds: not longer than it, or (where the cache knows its
    tokens, `PagedCache.note_tokens`) with other token ids."""
    held = cache.get_seq_length()
    if not held:
        return
    length = _input_length(input_ids, model_kwargs)
    restart = ("Call cache.reset() to start over (a call that failed, e.g. with OutOfBlocksError, leaves the tokens "
               "it had stored in a cache that was not empty).")
    if held >= length:
        given = "inputs_embeds has" if length > input_ids.shape[1] else "input_ids has"
        raise ValueError(
            f"hf_paged: the PagedCache passed to generate already holds {held} tokens per row, but {given} only "
            f"{length}: a cache can only be continued by input that extends what it holds. {restart}"
        )
    difference = cache.first_difference(input_ids)
    if difference is not None:
        row, position = difference
        raise ValueError(
            f"hf_paged: the PagedCache passed to generate holds other tokens than input_ids: row {row} differs at "
            f"position {position} (of the {held} tokens the cache holds). A cache can only be continued by input_ids "
            f"that start with the tokens it holds (the previous call's sequences). {restart}"
        )


def _row_starts(attention_mask: torch.Tensor | None, length: int) -> list[int] | None:
    """Each row's first real token when `attention_mask` (``[B, >= length]``) is pure left padding, else None."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[1] < length:
        return None
    mask = attention_mask[:, :length].to(torch.bool)
    starts = (~mask).to(torch.long).cumprod(dim=1).sum(dim=1)
    if not bool((mask == (torch.arange(length, device=mask.device)[None, :] >= starts[:, None])).all()):
        return None
    return starts.tolist()


def _reduce(input_ids: torch.Tensor, model_kwargs: dict, k: int) -> tuple[torch.Tensor, dict] | None:
    """``input_ids`` and the per-row model kwargs without their k repeats, or None if they cannot be undone."""
    rows = input_ids.shape[0]
    if rows % k:
        return None
    reduced_ids = _every_kth_row(input_ids, k, dim=0)
    reduced_kwargs = {}
    for key, value in model_kwargs.items():
        if isinstance(value, torch.Tensor):
            dim = 1 if key == "position_ids" and value.ndim == 3 else 0
            value = _every_kth_row(value, k, dim) if value.shape[dim] == rows else None
        elif not isinstance(value, _PLAIN_KWARG_TYPES):
            value = None  # a structure we do not know how to reduce (multimodal features, ...)
        if value is None and model_kwargs[key] is not None:
            return None
        reduced_kwargs[key] = value
    return None if reduced_ids is None else (reduced_ids, reduced_kwargs)


def _every_kth_row(tensor: torch.Tensor, k: int, dim: int) -> torch.Tensor | None:
    """``tensor`` without its repeats along `dim` (rows ``0, k, 2k, ...``), or None if the k copies differ."""
    reduced = tensor.unflatten(dim, (-1, k)).select(dim + 1, 0)
    return reduced if torch.equal(reduced.repeat_interleave(k, dim=dim), tensor) else None


class _EndedRowsCriteria(StoppingCriteriaList):
    """The stopping criteria of one ``_sample`` call, also telling `cache` which rows they have ended."""

    def __init__(self, criteria: StoppingCriteriaList, cache: PagedCache):
        super().__init__(criteria)
        self.cache = cache

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = super().__call__(input_ids, scores, **kwargs)
        self.cache.end_rows(done)
        return done


def _outlives_call(cache: PagedCache, generation_config) -> bool:
    """Whether `cache` outlives the ``generate`` call: passed in, or returned (``return_dict_in_generate``)."""
    built = any(cache is created for created in _CALL_CACHES.get() or ())
    return not built or bool(getattr(generation_config, "return_dict_in_generate", False))


def _sample(original, self, *args, **kwargs):
    """Greedy and sampling: once a row has ended, ``_sample`` feeds it padding and returns nothing computed from
    it, so a cache that dies with the call need not keep it: its padding takes no new block and, where the row
    holds only blocks of its own, it gives them back (`PagedCache.end_rows`). That holds only when an EOS criterion
    is among the stopping criteria (Transformers' own test for feeding padding), the cache is one this call built,
    and the call does not return it (``return_dict_in_generate``: it also returns scores and logits, computed from
    the padding too); a cache that outlives the call stores every row exactly as a `DynamicCache` would, so that it
    can be continued."""
    cache = next((value for value in kwargs.values() if isinstance(value, PagedCache)), None)
    criteria = kwargs.get("stopping_criteria", args[2] if len(args) > 2 else None)
    config = kwargs.get("generation_config", args[3] if len(args) > 3 else None)
    if (cache is None or _outlives_call(cache, config)
            or not isinstance(criteria, StoppingCriteriaList)
            or not any(hasattr(item, "eos_token_id") for item in criteria)):
        result = original(self, *args, **kwargs)
    else:
        recording = _EndedRowsCriteria(criteria, cache)
        if "stopping_criteria" in kwargs:
            kwargs["stopping_criteria"] = recording
        else:
            args = (*args[:2], recording, *args[3:])
        cache.end_rows(None)
        try:
            result = original(self, *args, **kwargs)
        finally:
            cache.end_rows(None)
    if cache is not None and _outlives_call(cache, config):  # greedy and sampled rows: the sequences, row for row
        cache.note_tokens(result if isinstance(result, torch.Tensor) else getattr(result, "sequences", None))
    return result


def _release_failed(caches: list[PagedCache]) -> None:
    """Give back the rows of `caches` now, not when the failed call's traceback is collected."""
    for cache in caches:
        with cache.locked():
            cache.reset()


def _wrap(owner: type, name: str, body) -> None:
    """Replace ``owner.name`` by a wrapper that calls ``body(original, self, *args, **kwargs)``; errors passing
    through it say when the installed Transformers is newer than hf_paged was tested with (`compat.note_untested`)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def hooked(self, *args, **kwargs):
        try:
            return body(original, self, *args, **kwargs)
        except Exception as error:
            compat.note_untested(error)
            raise

    hooked._hf_paged_hook = True
    setattr(owner, name, hooked)


def _generate(original, self, *args, **kwargs):
    """Calls on a model with prefix caching run one at a time; a failed call releases the rows of the caches it built
    (and of an empty cache it was given) at once; `recorded_stats` collects the stats of the caches a call built."""
    created: list[PagedCache] = []
    given_empty = [v for v in kwargs.values() if isinstance(v, PagedCache) and v.manager.num_rows == 0]
    token = _CALL_CACHES.set(created)
    try:
        shared = prefix.prefix_cache_of(self)
        if shared is None:
            result = original(self, *args, **kwargs)
        else:
            with shared.lock:  # calls sharing one pool run one at a time
                result = original(self, *args, **kwargs)
    except BaseException:
        _release_failed(created + given_empty)
        raise
    finally:
        _CALL_CACHES.reset(token)
        for cache in created + [v for v in kwargs.values() if isinstance(v, PagedCache)]:
            cache.expect_length(None)
            cache.expect_left_padding(False)
    recorded = _RECORDED.get()
    if recorded is not None:
        recorded.extend(cache.stats() for cache in created)
    return result


def _check_attn_implementation(original, self, attn_implementation, *args, **kwargs):
    """Families with their own attention classes look "hf_paged" up in their own dicts while being built and fail
    with a bare KeyError; Transformers checks the requested implementation first, so fail clearly there."""
    if attn_implementation == ATTN_IMPLEMENTATION:
        check_attention_interface(type(self))
        support.check_model_class(type(self), self.config)
    return original(self, attn_implementation, *args, **kwargs)


def install_generate_hook() -> None:
    """Install the wrappers listed in the module docstring (idempotent)."""
    if getattr(GenerationMixin._prepare_cache_for_generation, "_hf_paged_hook", False):
        return
    _wrap(GenerationMixin, "_prepare_cache_for_generation", _prepare_cache_for_generation)
    _wrap(GenerationMixin, "_prefill", _prefill)
    if hasattr(GenerationMixin, "_sample"):
        _wrap(GenerationMixin, "_sample", _sample)
    _wrap(GenerationMixin, "generate", _generate)
    _wrap(PreTrainedModel, "_check_and_adjust_attn_implementation", _check_attn_implementation)
