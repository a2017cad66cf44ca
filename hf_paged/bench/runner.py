"""One timed run of one implementation on one scenario, with its KV-cache bytes and peak RSS."""

from __future__ import annotations

import copy
import inspect
import re
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import hf_paged

from .. import compat
from .impls import IMPLS, cache_bytes, set_attention
from .impls import unavailable as impl_unavailable
from .prompts import left_pad
from .scenarios import SLIDING_MODEL, Scenario

__all__ = [
    "IMPLEMENTATIONS",
    "LIBRARY_BLOCK_SIZE",
    "REFERENCE",
    "Run",
    "Runner",
    "paged_attention_registered",
    "prefix_caching_available",
    "real_cache_tokens",
]

REFERENCE = "sdpa"
LIBRARY_BLOCK_SIZE: int = inspect.signature(hf_paged.PagedCache).parameters["block_size"].default
#: `impls.IMPLS` (hf_paged, 8-bit hf_paged, sdpa, quanto QuantizedCache) and Transformers' continuous batching.
IMPLEMENTATIONS = (*IMPLS, "generate_batch")

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Run:
    """What one run (all the calls of a scenario at one prompt length) produced.

    Attributes:
        seconds: wall time of the ``generate`` calls.
        sequences: the new token ids of every returned sequence, call after call.
        kv_bytes: KV-cache bytes allocated when the last call returned (hf_paged: ``stats().pool_bytes``, the
            block pool, referenced or not, 8-bit codes and their scales alike; sdpa: the `DynamicCache`'s tensors;
            quanto: the `QuantizedCache`'s tensors, `impls.cache_bytes`). None: not measured.
        peak_kv_bytes: the most KV-cache bytes allocated during the run (hf_paged: ``stats().peak_pool_bytes``;
            sdpa, quanto: the end value, as their caches only grow). None: not measured.
        used_bytes: hf_paged only: bytes of the blocks the rows reference at the end (``stats().used_bytes``).
        peak_used_bytes: hf_paged only: the most referenced bytes during the run (``stats().peak_used_bytes``).
        prefix_hit_tokens: hf_paged only: prompt tokens taken from the prefix cache instead of computed, all calls.
        peak_rss_bytes: the process's peak resident set size during the run (see `Runner.rss_note`).
        real_tokens: sdpa, scenarios with ``eos`` only: the real tokens the calls' caches hold (`real_cache_tokens`:
            no padding, nothing after a row's EOS), summed over the calls.
        cache_tokens: sdpa, scenarios with ``eos`` only: the token slots its `DynamicCache`s hold (rows x
            ``get_seq_length()``, padding and tokens after EOS included), summed over the calls.
    """

    seconds: float
    sequences: list[list[int]]
    kv_bytes: int | None = None
    peak_kv_bytes: int | None = None
    used_bytes: int | None = None
    peak_used_bytes: int | None = None
    prefix_hit_tokens: int | None = None
    peak_rss_bytes: int | None = None
    real_tokens: int | None = None
    cache_tokens: int | None = None


class NotApplicable(Exception):
    """An implementation cannot run a scenario; the message says why."""


def paged_attention_registered() -> bool:
    """Whether ``import hf_paged`` registered the ``"hf_paged"`` attention implementation."""
    from transformers import AttentionInterface

    return "hf_paged" in AttentionInterface._global_mapping


def prefix_caching_available() -> bool:
    """Whether this hf_paged has ``enable_prefix_caching`` (the `prefix` scenario needs it)."""
    return callable(getattr(hf_paged, "enable_prefix_caching", None))


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where that is impossible."""
    try:
        _PROC_CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes."""
    try:
        match = re.search(r"^VmHWM:\s+(\d+) kB", _PROC_STATUS.read_text(), re.MULTILINE)
    except OSError:
        match = None
    if match:
        return int(match.group(1)) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def sliding_window_model(vocab_size: int, max_positions: int, pad_token_id: int, dtype, device):
    """The `sliding` scenarios' model (`scenarios.SLIDING_MODEL`): random weights (seed 0), sdpa attention."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(**SLIDING_MODEL, vocab_size=vocab_size, max_position_embeddings=max_positions,
                              pad_token_id=pad_token_id, bos_token_id=None, eos_token_id=None)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    finally:
        torch.random.set_rng_state(state)
    return model.to(device).eval()


def real_cache_tokens(prompt_lengths: list[int], new_tokens: list[list[int]], eos_token_ids: set[int]) -> int:
    """The real tokens a cache holds after one greedy / sampling ``generate()`` call: per row, its prompt tokens (no
    padding) and its new tokens up to and including its first EOS, of which only those fed back to the model.

    ``generate`` feeds every new token but the last step's, so with ``steps`` = the new tokens per returned row
    (``len(new_tokens[row])``, all equal) a row ending with EOS at new token ``g`` (1-based) holds
    ``min(g, steps - 1)`` of them, a row that never produced EOS ``steps - 1``.

    Args:
        prompt_lengths: per row, its prompt's real tokens (``[rows]``).
        new_tokens: per row, the new token ids ``generate`` returned (``[rows][steps]``, padded after EOS).
        eos_token_ids: the ids that end a row.
    """
    if len(prompt_lengths) != len(new_tokens):
        raise ValueError(f"hf_paged bench: {len(prompt_lengths)} prompts for {len(new_tokens)} generated rows")
    total = 0
    for length, row in zip(prompt_lengths, new_tokens, strict=True):
        ended = next((i + 1 for i, token in enumerate(row) if token in eos_token_ids), len(row))
        total += length + min(ended, max(len(row) - 1, 0))
    return total


def _eos_ids(model) -> set[int]:
    """The ids `model`'s generation config stops at (its ``eos_token_id``: one id, a list, or None)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(token) for token in eos}


class Runner:
    """Runs scenarios on one loaded model, switching its attention implementation between runs.

    Args:
        model: a causal LM loaded with ``attn_implementation="sdpa"`` (switched with ``set_attn_implementation``).
        pad_token_id: the id used for left padding.
        block_size, num_blocks, max_memory: hf_paged pool options; when all are None, ``generate()`` builds its
            own `hf_paged.PagedCache` with the library's defaults, as it would for a user.
        seed: seed set before every ``generate`` call (sampling must draw the same numbers on every side).
    """

    def __init__(
        self,
        model,
        pad_token_id: int,
        *,
        block_size: int | None = None,
        num_blocks: int | None = None,
        max_memory: str | None = None,
        seed: int = 0,
    ):
        self.model = model
        self.pad_token_id = pad_token_id
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_memory = max_memory
        self.seed = seed
        self.per_run_rss = _reset_peak_rss()
        self._sliding = None

    @property
    def rss_note(self) -> str:
        """How peak RSS was measured (it is per process: weights, activations and caches together)."""
        if self.per_run_rss:
            return (
                "peak RSS of the whole process during each run (model weights included), reset before every run "
                "through /proc/self/clear_refs; the row shows the largest over the timed repeats"
            )
        return (
            "peak RSS of the whole process since it started (model weights included); it is monotone, so a row "
            "shows the peak of everything run before it too"
        )

    def unavailable(self, impl: str, scenario: Scenario) -> str | None:
        """Why `impl` cannot run `scenario`, or None when it can."""
        paged = impl in IMPLS and IMPLS[impl].paged
        if paged and not paged_attention_registered():
            return 'attn_implementation "hf_paged" is not registered by this hf_paged'
        if paged and not type(self.model)._can_set_attn_implementation():
            return f"{type(self.model).__name__}'s attention does not go through Transformers' attention interface"
        if impl in IMPLS:
            return impl_unavailable(IMPLS[impl], self.model_for(scenario))
        if impl == "generate_batch":
            if not hasattr(self.model, "generate_batch"):
                return "this Transformers has no model.generate_batch"
            if scenario.num_beams > 1:
                return "continuous batching has no beam search"
            if scenario.prefix_cache:
                return "prefix reuse across separate calls needs a persistent manager; not the same workload"
            if scenario.eos or scenario.model is not None:
                return "compared here only on the loaded model without EOS"
        return None

    def model_for(self, scenario: Scenario):
        """The model `scenario` runs on: the loaded one, or the `sliding` scenarios' tiny model (built once)."""
        if scenario.model is None:
            return self.model
        if scenario.model != "sliding":
            raise ValueError(f"unknown scenario model {scenario.model!r}")
        if self._sliding is None:
            config = self.model.config.get_text_config()
            self._sliding = sliding_window_model(config.vocab_size, 32768, self.pad_token_id, self.model.dtype,
                                                 self.model.device)
        return self._sliding

    def run(self, impl: str, scenario: Scenario, calls: list[list[list[int]]], new_tokens: int) -> Run:
        """Run every call of `calls` (see `Scenario.prompts`) with `impl` and measure it."""
        reset = _reset_peak_rss()
        if impl == "generate_batch":
            run = self._run_generate_batch(scenario, calls, new_tokens)
        else:
            run = self._run_generate(impl, scenario, calls, new_tokens)
        run.peak_rss_bytes = _peak_rss_bytes() if reset or not self.per_run_rss else None
        return run

    def _pool_options(self) -> dict:
        """The hf_paged pool options the user gave (``block_size``, ``num_blocks``, ``max_memory``)."""
        options = {"block_size": self.block_size, "num_blocks": self.num_blocks, "max_memory": self.max_memory}
        return {name: value for name, value in options.items() if value is not None}

    def _paged_cache(self, model, kv_dtype: str | None):
        """An explicit `hf_paged.PagedCache` (8-bit with `kv_dtype`) when the user gave pool options, else None
        (generate() builds one, from ``cache_config`` for 8-bit storage)."""
        options = self._pool_options()
        if not options:
            return None
        return hf_paged.PagedCache(model.config, **options, **({} if kv_dtype is None else {"kv_dtype": kv_dtype}))

    def _run_generate(self, impl: str, scenario: Scenario, calls, new_tokens: int) -> Run:
        spec = IMPLS[impl]
        paged = spec.paged
        model = self.model_for(scenario)
        set_attention(model, spec.attention)
        kwargs = {**scenario.generate_kwargs(new_tokens), **spec.generate_kwargs()}
        sequences: list[list[int]] = []
        kv_bytes = peak_kv = used = peak_used = prefix_hits = real = slots = None
        if paged and scenario.prefix_cache:
            kv_dtype = {} if spec.kv_dtype is None else {"kv_dtype": spec.kv_dtype}
            hf_paged.enable_prefix_caching(model, **self._pool_options(), **kv_dtype)
        try:
            elapsed = 0.0
            for prompts in calls:
                inputs = left_pad(prompts, self.pad_token_id, model.device)
                call_kwargs, given = dict(kwargs), None
                if paged and not scenario.prefix_cache:
                    given = self._paged_cache(model, spec.kv_dtype)
                    if given is not None:  # built with the kv_dtype that cache_config would have given
                        call_kwargs.pop("cache_config", None)
                        call_kwargs.update(compat.cache_kwargs(given))
                torch.manual_seed(self.seed)
                # hf_paged's stats come from `recorded_stats`, not from a returned cache: a cache the call
                # returns keeps the rows that ended exactly (it may be continued), one it drops gives them back.
                # A cache the user passed (pool options) outlives the call either way.
                with hf_paged.recorded_stats() as recorded:
                    start = time.perf_counter()
                    out = model.generate(
                        **inputs, **call_kwargs, pad_token_id=self.pad_token_id, return_dict_in_generate=not paged
                    )
                    elapsed += time.perf_counter() - start
                out_ids = out if paged else out.sequences
                new = out_ids[:, inputs["input_ids"].shape[1] :].tolist()
                sequences += new
                if paged:
                    stats = given.stats() if given is not None else recorded[-1]
                    kv_bytes, call_peak, used = stats.pool_bytes, stats.peak_pool_bytes, stats.used_bytes
                    peak_used = max(peak_used or 0, stats.peak_used_bytes)
                    prefix_hits = (prefix_hits or 0) + stats.prefix_hit_tokens
                else:
                    dynamic = compat.output_cache(out)
                    kv_bytes = call_peak = cache_bytes(dynamic)
                    if scenario.eos and scenario.k == 1:
                        real = (real or 0) + real_cache_tokens([len(p) for p in prompts], new, _eos_ids(model))
                        slots = (slots or 0) + len(new) * dynamic.get_seq_length()
                peak_kv = max(peak_kv or 0, call_peak)
                del out
        finally:
            if paged and scenario.prefix_cache:
                hf_paged.disable_prefix_caching(model)
        return Run(elapsed, sequences, kv_bytes, peak_kv, used, peak_used, prefix_hits, real_tokens=real,
                   cache_tokens=slots)

    def _run_generate_batch(self, scenario: Scenario, calls, new_tokens: int) -> Run:
        from transformers import ContinuousBatchingConfig

        set_attention(self.model, REFERENCE)
        block_size = self.block_size or LIBRARY_BLOCK_SIZE
        config = copy.deepcopy(self.model.generation_config)
        config.update(
            max_new_tokens=new_tokens,
            do_sample=scenario.do_sample,
            num_beams=1,
            num_return_sequences=scenario.num_return_sequences,
            eos_token_id=-1,  # no early stop: every sequence gets exactly `new_tokens` tokens, as with min_new_tokens
            pad_token_id=self.pad_token_id,
        )
        sequences: list[list[int]] = []
        elapsed = 0.0
        for prompts in calls:
            rows = len(prompts) * scenario.num_return_sequences
            blocks = sum(-(-(len(p) + new_tokens) // block_size) for p in prompts) * scenario.num_return_sequences
            cb_config = ContinuousBatchingConfig(
                page_size=block_size,
                num_blocks=blocks + rows,
                max_batch_tokens=sum(len(p) for p in prompts) + rows,
                seed=self.seed,
                auto_switch_to_flash=False,
            )
            torch.manual_seed(self.seed)
            start = time.perf_counter()
            results = self.model.generate_batch(
                prompts, generation_config=config, continuous_batching_config=cb_config, warmup=False
            )
            elapsed += time.perf_counter() - start
            failed = [r.error for r in results.values() if r.error is not None]
            if len(results) != rows or failed:
                reason = failed[0] if failed else f"returned {len(results)} of {rows} sequences"
                raise NotApplicable(f"generate_batch failed: {reason}")
            sequences += [list(r.generated_tokens) for r in results.values()]
        return Run(elapsed, sequences)
