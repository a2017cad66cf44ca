"""The benchmark loop: warm-up, alternating timed repeats, per-case summaries and the k sweep."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .impls import IMPLS
from .runner import REFERENCE, NotApplicable, Run, Runner, prefix_caching_available
from .scenarios import Scenario, sweep_scenario

__all__ = ["SWEEP_KINDS", "Row", "Settings", "Suite", "SweepPoint"]

SWEEP_KINDS = ("beams", "sample")
SWEEP_IMPLS = ("hf_paged", REFERENCE)


@dataclass(frozen=True)
class Settings:
    """What to run. ``impls`` always contains the reference ``"sdpa"``; the sweep runs at the longest prompt."""

    scenarios: tuple[Scenario, ...]
    prompt_lengths: tuple[int, ...]
    new_tokens: int
    repeats: int = 3
    warmup: int = 1
    sweep_k: tuple[int, ...] = (1, 2, 4, 8)
    impls: tuple[str, ...] = ("hf_paged", REFERENCE, "generate_batch")


@dataclass
class Row:
    """The summary of one implementation on one scenario at one prompt length.

    ``status`` is ``"ok"``, ``"n/a"`` (this implementation cannot run it; ``reason`` says why) or ``"skipped"``
    (the scenario needs something this hf_paged lacks). Times are seconds; bytes are bytes; ``tokens`` counts the
    new tokens of every returned sequence in one run; ``time_ratio`` is this median over the sdpa median;
    ``prompt_tokens`` counts the distinct prompts' tokens of one run (no padding, no k-fold repeats) and
    ``prefix_hit_tokens`` (hf_paged) how many prompt tokens its caches took from the prefix cache. KV bytes are
    allocated bytes (see `runner.Run`); ``kv_ratio`` is this peak over the sdpa peak; ``used_bytes`` and
    ``peak_used_bytes`` are hf_paged's referenced bytes.

    Scenarios with ``eos`` (greedy or sampling, one row per prompt) also carry the ideal, from sdpa's run, on every
    implementation's row: ``real_tokens``, the real tokens its caches hold (`runner.real_cache_tokens`: no padding,
    nothing after a row's EOS); ``cache_tokens``, the token slots of its `DynamicCache`s; ``ideal_bytes``, sdpa's
    peak KV bytes times ``real_tokens / cache_tokens`` (what a cache holding just the real tokens would need);
    ``ideal_ratio``, that over sdpa's peak.
    """

    scenario: str
    prompt_length: int
    impl: str
    status: str = "ok"
    reason: str | None = None
    seconds: list[float] = field(default_factory=list)
    seconds_median: float | None = None
    tokens: int | None = None
    tokens_per_s: float | None = None
    time_ratio: float | None = None
    kv_bytes: int | None = None
    peak_kv_bytes: int | None = None
    kv_ratio: float | None = None
    used_bytes: int | None = None
    peak_used_bytes: int | None = None
    prefix_hit_tokens: int | None = None
    prompt_tokens: int | None = None
    peak_rss_bytes: int | None = None
    tokens_match: bool | None = None
    real_tokens: int | None = None
    cache_tokens: int | None = None
    ideal_bytes: int | None = None
    ideal_ratio: float | None = None


@dataclass
class SweepPoint:
    """KV-cache bytes for one k of the sweep (``kind`` ``"beams"``: num_beams=k; ``"sample"``: k samples)."""

    kind: str
    k: int
    prompt_length: int
    impl: str
    kv_bytes: int | None
    peak_kv_bytes: int | None
    used_bytes: int | None
    seconds: float


class Suite:
    """Runs `Settings` with a `Runner`; `progress` is a tqdm bar (``update`` and ``set_postfix_str`` are used);
    `chat` is `prompts.chat_wrap` of the tokenizer, for the scenarios with ``chat``; `requests` is
    `prompts.chat_requests` of the tokenizer, for the scenarios with ``requests`` (run once each, see `lengths`)."""

    def __init__(self, runner: Runner, stream: list[int], settings: Settings, progress,
                 chat: tuple[list[int], list[int]] | None = None, requests: list[list[int]] | None = None):
        self.runner = runner
        self.stream = stream
        self.chat = chat
        self.requests = requests
        self.settings = settings
        self.progress = progress
        self._first_runs: dict[tuple, Run] = {}  # the first timed run of each workload, reused by the sweep

    def skipped(self, scenario: Scenario) -> str | None:
        """Why the whole `scenario` is skipped, or None."""
        if scenario.prefix_cache and not prefix_caching_available():
            return "hf_paged.enable_prefix_caching is not available in this hf_paged"
        return None

    def lengths(self, scenario: Scenario) -> tuple[int, ...]:
        """The prompt lengths `scenario` runs at: the settings' ones, or for a scenario with ``requests`` (prompts
        of their own lengths) just the longest request's length, once."""
        if scenario.requests:
            return (max((len(r) for r in self.requests or ()), default=0),)
        return self.settings.prompt_lengths

    def planned_runs(self) -> int:
        """How many runs `run` will make (the progress bar's total)."""
        s = self.settings
        per_case = s.warmup + s.repeats
        total = 0
        for scenario in s.scenarios:
            if self.skipped(scenario) is None:
                impls = [i for i in s.impls if self.runner.unavailable(i, scenario) is None]
                total += len(self.lengths(scenario)) * len(impls) * per_case
        return total + sum(len(self._sweep_impls(sweep_scenario(kind, k))) for kind in SWEEP_KINDS for k in s.sweep_k)

    def run(self) -> tuple[list[Row], list[SweepPoint]]:
        """Every scenario at every prompt length, then the sweep."""
        rows = [
            row
            for scenario in self.settings.scenarios
            for length in self.lengths(scenario)
            for row in self._case(scenario, length)
        ]
        return rows, self._sweep()

    def _sweep_impls(self, scenario: Scenario) -> list[str]:
        """The implementations whose KV bytes the sweep compares (generate_batch's pool is preallocated)."""
        return [i for i in self.settings.impls if i in SWEEP_IMPLS and self.runner.unavailable(i, scenario) is None]

    def _one(self, impl: str, scenario: Scenario, calls, length: int, label: str) -> Run:
        self.progress.set_postfix_str(f"{scenario.name} P={length} {impl} {label}")
        try:
            run = self.runner.run(impl, scenario, calls, self.settings.new_tokens)
        finally:
            self.progress.update(1)
        return run

    def _case(self, scenario: Scenario, length: int) -> list[Row]:
        s = self.settings
        reason = self.skipped(scenario)
        if reason is not None:
            return [Row(scenario.name, length, impl, status="skipped", reason=reason) for impl in s.impls]
        calls = scenario.prompts(self.stream, length, self.chat, self.requests)
        impls = [i for i in s.impls if self.runner.unavailable(i, scenario) is None]
        runs: dict[str, list[Run]] = {impl: [] for impl in impls}
        failures: dict[str, str] = {}
        for repeat in range(-s.warmup, s.repeats):
            shift = repeat % len(impls)
            for impl in impls[shift:] + impls[:shift]:
                if impl in failures:
                    self.progress.update(1)
                    continue
                try:
                    run = self._one(
                        impl, scenario, calls, length, "warm-up" if repeat < 0 else f"{repeat + 1}/{s.repeats}"
                    )
                except Exception as error:  # only the optional Transformers baselines may fail softly
                    if not _transformers_baseline(impl):
                        raise
                    failures[impl] = _one_line(error)
                    continue
                if repeat >= 0:
                    runs[impl].append(run)
                    self._first_runs.setdefault((impl, scenario.workload_key, length), run)
        return [self._summary(scenario, length, calls, impl, runs, failures) for impl in s.impls]

    def _summary(
        self, scenario: Scenario, length: int, calls, impl: str, runs: dict[str, list[Run]], failures: dict[str, str]
    ) -> Row:
        row = Row(scenario.name, length, impl)
        reason = self.runner.unavailable(impl, scenario) or failures.get(impl)
        if reason is not None or impl not in runs:
            row.status, row.reason = "n/a", reason or "not selected"
            return row
        mine, reference = runs[impl], runs[REFERENCE]
        row.seconds = [r.seconds for r in mine]
        row.seconds_median = statistics.median(row.seconds)
        row.tokens = sum(len(seq) for seq in mine[0].sequences)
        row.tokens_per_s = row.tokens / row.seconds_median if row.seconds_median > 0 else None
        reference_median = statistics.median(r.seconds for r in reference)
        row.time_ratio = row.seconds_median / reference_median if reference_median > 0 else None
        last = mine[-1]
        row.kv_bytes, row.used_bytes, row.prefix_hit_tokens = last.kv_bytes, last.used_bytes, last.prefix_hit_tokens
        row.prompt_tokens = sum(len(prompt) for call in calls for prompt in call)
        row.peak_kv_bytes = _largest(r.peak_kv_bytes for r in mine)
        row.peak_used_bytes = _largest(r.peak_used_bytes for r in mine)
        reference_peak = _largest(r.peak_kv_bytes for r in reference)
        if row.peak_kv_bytes is not None and reference_peak:
            row.kv_ratio = row.peak_kv_bytes / reference_peak
        first = reference[0]
        if first.real_tokens is not None and first.cache_tokens and reference_peak:
            row.real_tokens, row.cache_tokens = first.real_tokens, first.cache_tokens
            row.ideal_bytes = reference_peak * first.real_tokens // first.cache_tokens
            row.ideal_ratio = first.real_tokens / first.cache_tokens
        rss = [r.peak_rss_bytes for r in mine if r.peak_rss_bytes is not None]
        row.peak_rss_bytes = max(rss) if rss else None
        if impl == REFERENCE:
            row.reason = "reference"
        elif impl == "generate_batch" and scenario.do_sample:
            row.reason = "own sampler: tokens not comparable"
        else:
            expected = reference[0].sequences
            row.tokens_match = all(r.sequences == expected for r in mine)
            if impl in IMPLS and (IMPLS[impl].kv_dtype or IMPLS[impl].nbits):
                row.reason = "quantized KV: its tokens may part from sdpa's"
        if scenario.prefix_cache and row.prefix_hit_tokens is not None:
            row.reason = f"prefix cache: {row.prefix_hit_tokens} of {row.prompt_tokens} prompt tokens reused"
        return row

    def _sweep(self) -> list[SweepPoint]:
        s = self.settings
        if not s.sweep_k:
            return []
        length = max(s.prompt_lengths)
        points = []
        for kind in SWEEP_KINDS:
            for k in s.sweep_k:
                scenario = sweep_scenario(kind, k)
                for impl in self._sweep_impls(scenario):
                    run = self._first_runs.get((impl, scenario.workload_key, length))
                    if run is None:
                        run = self._one(impl, scenario, scenario.prompts(self.stream, length), length, "sweep")
                    else:
                        self.progress.update(1)
                    points.append(
                        SweepPoint(kind, k, length, impl, run.kv_bytes, run.peak_kv_bytes, run.used_bytes, run.seconds)
                    )
        return points


def _transformers_baseline(impl: str) -> bool:
    """Whether `impl` is one of Transformers' optional baselines (continuous batching, a `QuantizedCache`), whose
    failure makes its row n/a instead of ending the run."""
    return impl == "generate_batch" or (impl in IMPLS and IMPLS[impl].nbits is not None)


def _largest(values) -> int | None:
    present = [value for value in values if value is not None]
    return max(present) if present else None


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    if isinstance(error, NotApplicable) and text:
        return text[0]
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
