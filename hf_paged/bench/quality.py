"""The ``quality`` scenario: what quantized keys and values cost in accuracy, against unquantized hf_paged.

On the loaded model, for every implementation of `hf_paged.bench.impls` asked for, in one run:

* **perplexity**, teacher-forced, over a fixed corpus (`corpus`: the text of CPython's ``pydoc_data.topics``,
  ``QualitySettings.tokens`` tokens of the model's tokenizer). The tokens are cut into segments of ``segment``
  tokens, each fed through ``model(...)`` in chunks of ``chunk`` tokens with one cache per segment, so every
  chunk's queries read the earlier chunks' keys and values **from the cache** (quantized where the cache
  quantizes); every token of a segment but its first is scored. Segments alternate between the implementations,
  so a load change on a shared machine touches them all alike; only the forward calls are timed.
* **top-1 agreement**: the fraction of scored positions whose most likely next token equals unquantized
  hf_paged's there.
* **greedy continuations** of `prompts.CHAT_REQUESTS` (one left-padded batch in the chat template, as
  ``chat8_eos``, stopping at EOS, at most ``new_tokens``): per implementation, the fraction of requests whose
  continuation is identical to unquantized hf_paged's and the mean number of leading tokens that agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import platform
import time
from dataclasses import dataclass, field

import torch

from .. import compat
from .impls import IMPLS, QUANTO_DEFAULTS, Impl, cache_bytes, new_cache, set_attention, unavailable
from .prompts import left_pad

__all__ = ["QUALITY_IMPLS", "QUALITY_REFERENCE", "Corpus", "QualityResults", "QualityRow", "QualitySettings",
           "continuations", "corpus", "corpus_text", "perplexity", "planned_steps", "quality_impls", "run_quality"]

#: The implementation every other is compared with.
QUALITY_REFERENCE = "hf_paged"
#: What the scenario runs unless ``--impls`` names others (the reference and sdpa always run).
QUALITY_IMPLS = ("hf_paged", "hf_paged-int8", "hf_paged-fp8", "sdpa", "quanto-int4", "quanto-int2", "quanto-int8")


@dataclass(frozen=True)
class QualitySettings:
    """``tokens`` of the corpus, cut into segments of ``segment`` tokens fed in chunks of ``chunk``; greedy
    continuations of at most ``new_tokens``."""

    tokens: int = 20480
    segment: int = 1024
    chunk: int = 64
    new_tokens: int = 64


@dataclass(frozen=True)
class Corpus:
    """The perplexity corpus: ``ids`` (the first ``len(ids)`` tokens of `corpus_text`), where they come from, and
    ``sha256``, the hex digest of the ids written as comma-separated decimals (``"12,345,6"``), so that runs on
    different machines can tell whether they scored the same tokens."""

    ids: list[int]
    source: str
    python: str
    characters: int
    sha256: str

    def describe(self) -> dict:
        """The corpus without its ids, for the results."""
        return {"tokens": len(self.ids), "source": self.source, "python": self.python,
                "characters": self.characters, "sha256": self.sha256}


def corpus_text() -> str:
    """The text of CPython's ``pydoc_data.topics`` (the help topics Python ships): ``topics[k]`` for the keys in
    sorted order, joined by blank lines. It is the same for every install of one Python version."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def corpus(tokenizer, tokens: int) -> Corpus:
    """The first `tokens` token ids of `corpus_text` (no special tokens); raises ValueError when it has fewer."""
    text = corpus_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"hf_paged bench: the corpus (pydoc_data.topics) has {len(ids)} tokens of this tokenizer, "
                         f"fewer than the {tokens} asked for")
    ids = list(ids[:tokens])
    digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
    return Corpus(ids, "pydoc_data.topics.topics, keys sorted, joined by blank lines; the first tokens",
                  platform.python_version(), len(text), digest)


@dataclass
class _Pass:
    """One implementation's perplexity pass: summed negative log-likelihood, scored positions, the argmax at each
    (in order), seconds of forward calls, and the cache's bytes after the first full segment."""

    nll: float = 0.0
    scored: int = 0
    argmax: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0
    segment_kv_bytes: int | None = None


def _kv_bytes(impl: Impl, cache) -> int:
    return cache.stats().pool_bytes if impl.paged else cache_bytes(cache)


def _segment(model, impl: Impl, ids: torch.Tensor, chunk: int, result: _Pass) -> None:
    """Feed `ids` (``[1, S]``) in chunks of `chunk` through a new cache of `impl`, scoring tokens 1..S-1."""
    set_attention(model, impl.attention)
    cache = new_cache(impl, model)
    length = ids.shape[1]
    for start in range(0, length, chunk):
        begin = time.perf_counter()
        logits = model(input_ids=ids[:, start:start + chunk], use_cache=True, **compat.cache_kwargs(cache)).logits
        result.seconds += time.perf_counter() - begin
        logits = logits[0, : max(min(chunk, length - 1 - start), 0)].float()  # the last position predicts nothing
        targets = ids[0, start + 1 : start + 1 + logits.shape[0]]
        log_probs = torch.log_softmax(logits, dim=-1)
        result.nll -= log_probs.gather(1, targets[:, None]).double().sum().item()
        result.scored += targets.numel()
        result.argmax.append(logits.argmax(dim=-1))
    if result.segment_kv_bytes is None and length > chunk:
        result.segment_kv_bytes = _kv_bytes(impl, cache)


def perplexity(model, impls: list[Impl], ids: list[int], segment: int, chunk: int, progress=None,
               failures: dict[str, str] | None = None) -> dict[str, _Pass]:
    """Teacher-forced passes of every impl over `ids` (see the module docstring); segments alternate between the
    impls, each impl warmed first, untimed, by a chunk and one token read through the cache. A `QuantizedCache`
    impl that fails its warm-up is left out, its error in `failures` (if given; else it is raised), as are
    everyone's later errors. `progress`: a tqdm bar, updated once per impl and segment."""
    tokens = torch.tensor([ids], dtype=torch.long, device=model.device)
    runnable = []
    with torch.no_grad():
        for impl in impls:
            try:
                _segment(model, impl, tokens[:, : min(chunk, segment) + 1], chunk, _Pass())
            except Exception as error:
                if failures is None or not _fails_softly(impl):
                    raise
                failures[impl.name] = _failure(error)
                continue
            runnable.append(impl)
        impls, results = runnable, {impl.name: _Pass() for impl in runnable}
        for number, start in enumerate(range(0, tokens.shape[1], segment)):
            shift = number % len(impls)
            for impl in impls[shift:] + impls[:shift]:
                if progress is not None:
                    progress.set_postfix_str(f"quality perplexity segment {number + 1} {impl.name}")
                _segment(model, impl, tokens[:, start : start + segment], chunk, results[impl.name])
                if progress is not None:
                    progress.update(1)
    return results


def _fails_softly(impl: Impl) -> bool:
    """Only Transformers' `QuantizedCache` baselines may fail without ending the scenario (their row says why)."""
    return impl.nbits is not None


def _failure(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"failed: {type(error).__name__}: {text[0] if text else ''}"


def _until_eos(row: list[int], eos: set[int]) -> list[int]:
    """`row` up to and including its first EOS token."""
    end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
    return row[:end]


def continuations(model, impl: Impl, requests: list[list[int]], new_tokens: int, pad_token_id: int) -> list[list[int]]:
    """Greedy continuations of `requests` (one left-padded batch), each up to and including its first EOS."""
    set_attention(model, impl.attention)
    inputs = left_pad(requests, pad_token_id, model.device)
    out = model.generate(**inputs, **impl.generate_kwargs(), max_new_tokens=new_tokens, do_sample=False, num_beams=1,
                         pad_token_id=pad_token_id)
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(token) for token in eos}
    return [_until_eos(row, eos) for row in out[:, inputs["input_ids"].shape[1]:].tolist()]


def _leading_agreement(row: list[int], reference: list[int]) -> int:
    """How many leading tokens `row` shares with `reference`."""
    shared = min(len(row), len(reference))
    return next((i for i in range(shared) if row[i] != reference[i]), shared)


@dataclass
class QualityRow:
    """One implementation's results in the ``quality`` scenario.

    ``status`` is ``"ok"`` or ``"n/a"`` (``reason`` says why). ``perplexity`` is exp(mean negative log-likelihood)
    over ``scored_tokens``; ``perplexity_ratio`` that over the reference's (unquantized hf_paged);
    ``top1_agreement`` the fraction of scored positions whose argmax equals the reference's. ``identical`` of
    ``requests`` greedy continuations equal the reference's (``identical_fraction``); ``mean_agreeing_tokens``:
    their leading tokens equal to the reference's, averaged; ``mean_tokens``: their lengths (new tokens up to and
    including EOS), averaged. ``seconds``: the forward calls of the perplexity pass; ``time_ratio``: that over the
    reference's. ``segment_kv_bytes``: the cache's bytes after the first full segment (hf_paged: the pool
    allocated, ``stats().pool_bytes``; the others: their tensors); ``kv_ratio``: that over sdpa's DynamicCache's.
    """

    impl: str
    status: str = "ok"
    reason: str | None = None
    perplexity: float | None = None
    perplexity_ratio: float | None = None
    scored_tokens: int | None = None
    top1_agreement: float | None = None
    requests: int | None = None
    identical: int | None = None
    identical_fraction: float | None = None
    mean_agreeing_tokens: float | None = None
    mean_tokens: float | None = None
    seconds: float | None = None
    time_ratio: float | None = None
    segment_kv_bytes: int | None = None
    kv_ratio: float | None = None


def _ratio(value: float | None, over: float | None) -> float | None:
    return None if value is None or not over else value / over


def quality_impls(model, names: tuple[str, ...] = QUALITY_IMPLS) -> dict[str, str | None]:
    """The impls the ``quality`` scenario runs for `names` (the reference first, ``sdpa`` added when missing), each
    with why it cannot run on `model` here (`impls.unavailable`) or None."""
    names = tuple(dict.fromkeys((QUALITY_REFERENCE, *names, "sdpa")))
    return {name: unavailable(IMPLS[name], model) for name in names}


def planned_steps(reasons: dict[str, str | None], settings: QualitySettings) -> int:
    """Progress-bar steps of `run_quality` (`reasons`: `quality_impls`): one per impl that runs and segment, and
    one per impl's continuations."""
    return sum(reason is None for reason in reasons.values()) * (-(-settings.tokens // settings.segment) + 1)


@dataclass
class QualityResults:
    """The ``quality`` scenario's results: one row per impl, the corpus scored (`Corpus.describe`) and the
    settings (`QualitySettings`, the reference, the `QuantizedCache` options left at their defaults)."""

    rows: list[QualityRow]
    corpus: dict
    settings: dict


def run_quality(model, tokenizer, requests: list[list[int]], pad_token_id: int, settings: QualitySettings,
                names: tuple[str, ...] = QUALITY_IMPLS, progress=None) -> QualityResults:
    """The ``quality`` scenario on `model` for the impls `names` (see `quality_impls`)."""
    reasons = quality_impls(model, names)
    if reasons[QUALITY_REFERENCE] is not None:
        raise RuntimeError(f"hf_paged bench: the quality scenario's reference cannot run: {reasons[QUALITY_REFERENCE]}")
    text = corpus(tokenizer, settings.tokens)
    impls = [IMPLS[name] for name in reasons]
    runnable = [impl for impl in impls if reasons[impl.name] is None]
    failures: dict[str, str] = {}
    passes = perplexity(model, runnable, text.ids, settings.segment, settings.chunk, progress, failures)
    reasons.update(failures)
    generated = {}
    with torch.no_grad():
        for impl in (impl for impl in runnable if impl.name in passes):
            if progress is not None:
                progress.set_postfix_str(f"quality continuations {impl.name}")
            try:
                generated[impl.name] = continuations(model, impl, requests, settings.new_tokens, pad_token_id)
            except Exception as error:
                if not _fails_softly(impl):
                    raise
                reasons[impl.name] = _failure(error)
            if progress is not None:
                progress.update(1)
    reference, reference_rows = passes[QUALITY_REFERENCE], generated[QUALITY_REFERENCE]
    reference_argmax = torch.cat(reference.argmax)
    reference_ppl = math.exp(reference.nll / reference.scored)
    sdpa_bytes = passes["sdpa"].segment_kv_bytes if "sdpa" in passes else None
    rows = []
    for impl in impls:
        if reasons[impl.name] is not None:
            rows.append(QualityRow(impl.name, status="n/a", reason=reasons[impl.name]))
            continue
        mine, rows_generated = passes[impl.name], generated[impl.name]
        ppl = math.exp(mine.nll / mine.scored)
        identical = sum(row == ref for row, ref in zip(rows_generated, reference_rows, strict=True))
        rows.append(QualityRow(
            impl.name,
            reason="reference" if impl.name == QUALITY_REFERENCE else None,
            perplexity=ppl,
            perplexity_ratio=ppl / reference_ppl,
            scored_tokens=mine.scored,
            top1_agreement=(torch.cat(mine.argmax) == reference_argmax).double().mean().item(),
            requests=len(rows_generated),
            identical=identical,
            identical_fraction=identical / len(rows_generated),
            mean_agreeing_tokens=sum(_leading_agreement(row, ref) for row, ref in
                                     zip(rows_generated, reference_rows, strict=True)) / len(rows_generated),
            mean_tokens=sum(len(row) for row in rows_generated) / len(rows_generated),
            seconds=mine.seconds,
            time_ratio=_ratio(mine.seconds, reference.seconds),
            segment_kv_bytes=mine.segment_kv_bytes,
            kv_ratio=_ratio(mine.segment_kv_bytes, sdpa_bytes),
        ))
    described = {**dataclasses.asdict(settings), "reference": QUALITY_REFERENCE, "quanto_defaults": QUANTO_DEFAULTS,
                 "requests": len(requests)}
    return QualityResults(rows, text.describe(), described)

