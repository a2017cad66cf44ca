"""The benchmark's outputs: a terminal table, ``results.json``, ``results.md`` and PNG plots."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .suite import SWEEP_KINDS, Row, SweepPoint

__all__ = ["HOST_NOTES", "IDEAL_NOTE", "PLOT_FILES", "QUALITY_NOTES", "notes", "render_markdown", "render_table",
           "targets", "write_outputs"]

PLOT_FILES = ("time_vs_prompt_length.png", "kv_vs_k.png")
_MIB = 2**20
_HEADERS = (
    "scenario",
    "P",
    "impl",
    "median s",
    "tok/s",
    "x sdpa",
    "KV MiB",
    "KV x sdpa",
    "used MiB",
    "used peak MiB",
    "peak RSS MiB",
    "match",
    "note",
)


def notes(rss_note: str) -> list[str]:
    """What the columns mean, for the terminal, the Markdown and the JSON."""
    return [
        "tok/s: new tokens of all returned sequences of one run (calls x rows x G) over the median wall time.",
        "x sdpa: median time over the sdpa (DynamicCache) median for the same case; below 1 is faster.",
        "KV: the most bytes of keys and values allocated during the run; hf_paged: stats().peak_pool_bytes "
        "(its block pool, referenced or not); sdpa: the DynamicCache's tensors when generate() returned (it only "
        "grows; sliding-window layers keep their window; beam search's reorder copies are transient and not "
        "counted); hf_paged-int8 / -fp8: the same pool of 8-bit codes, each row's scale inline; quanto-<n> "
        "(Transformers' QuantizedCache): its tensors when generate() returned (packed codes, scales, zero-points, "
        "the full-precision residual), not the full-precision copy of a layer it dequantizes at every step "
        "(transient). KV x sdpa: that over sdpa's.",
        "used, used peak: hf_paged's referenced bytes (stats().used_bytes when generate() returned, "
        "stats().peak_used_bytes): the blocks its rows point at, a part of what it allocated.",
        "generate_batch (Transformers continuous batching, sdpa): KV not measured (its pool is preallocated); "
        "it stops only at max_new_tokens (eos disabled), which may differ from min_new_tokens' EOS suppression; "
        "its time includes starting and stopping its manager thread on every call.",
        f"peak RSS: {rss_note}.",
        "match: the new tokens equal sdpa's exactly (greedy and beams; sampling with the same seed).",
    ]


def _mib(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / _MIB:.3f}" if value < _MIB else f"{value / _MIB:.1f}"


def _cells(row: Row) -> list[str]:
    base = [row.scenario, str(row.prompt_length), row.impl]
    if row.status != "ok":
        return base + ["-"] * 9 + [f"{row.status}: {row.reason}"]
    match = {True: "yes", False: "NO", None: "-"}[row.tokens_match]
    return base + [
        f"{row.seconds_median:.3f}",
        "-" if row.tokens_per_s is None else f"{row.tokens_per_s:.1f}",
        "-" if row.time_ratio is None else f"{row.time_ratio:.2f}",
        _mib(row.peak_kv_bytes),
        "-" if row.kv_ratio is None else f"{row.kv_ratio:.2f}",
        _mib(row.used_bytes),
        _mib(row.peak_used_bytes),
        _mib(row.peak_rss_bytes),
        match,
        row.reason or "",
    ]


def _sweep_cells(point: SweepPoint) -> list[str]:
    return [
        point.kind,
        str(point.k),
        str(point.prompt_length),
        point.impl,
        _mib(point.peak_kv_bytes),
        _mib(point.kv_bytes),
        _mib(point.used_bytes),
    ]


_SWEEP_HEADERS = ("sweep", "k", "P", "impl", "KV MiB", "KV end MiB", "used end MiB")
_IDEAL_HEADERS = ("scenario", "P", "real tokens", "sdpa tokens", "sdpa KV MiB", "ideal MiB", "ideal x sdpa",
                  "hf_paged KV MiB", "KV x sdpa", "used peak MiB", "used x sdpa", "KV x ideal")
IDEAL_NOTE = (
    "KV vs ideal (scenarios whose rows stop at EOS): real tokens: the tokens sdpa's caches hold that a row needs "
    "(its prompt without padding, its new tokens up to and including its EOS, of those fed back to the model); "
    "sdpa tokens: the token slots of its DynamicCache (rows x its sequence length: padding and tokens after EOS "
    "included). ideal: sdpa's KV bytes x real / sdpa tokens: every row's real tokens held to the end (hf_paged "
    "can go below it: a row that has ended gives its blocks back to the rows still running). hf_paged KV: peak "
    "allocated bytes "
    "(stats().peak_pool_bytes); used peak: peak referenced bytes (stats().peak_used_bytes); x sdpa: over sdpa's "
    "KV bytes; KV x ideal: allocated over ideal."
)


_HOST_HEADERS = ("P", "batch", "impl", "step ms", "x sdpa", "fwd ms", "D2H/step", "hf_paged D2H", "H2D/step",
                 "hf_paged H2D", "launches/step", "compiles", "note")
_SOURCE_HEADERS = ("P", "batch", "impl", "kind", "per step", "source (function: torch calls)", "hf_paged")
#: Sources shown per row and kind in the tables (results.json keeps more).
_SOURCES_SHOWN = 3
HOST_NOTES = [
    "host scenario (hf_paged.bench.host): a random-weight Llama of hidden 64 (4 heads, 2 KV heads, fp32), batch "
    "distinct prompts of P tokens, greedy, exactly the bench's G new tokens; hf_paged-torch: its PyTorch path; "
    "hf_paged-triton-stub: its Triton path with the kernels compiled for sm_90 and every launch a counted no-op "
    "(hf_paged.bench.stub_device), so its time is the host's alone, while sdpa's and hf_paged-torch's also hold "
    "their attention arithmetic on the CPU (growing with batch x P). All three run in one process of their own.",
    "step ms: median over the decode steps of the timed runs of one iteration of generate's loop (from a forward's "
    "start to the next's); x sdpa: that over sdpa's; fwd ms: the median of the forward alone.",
    "D2H/step: reads of device values by the host (each a synchronisation on a GPU: .item(), .tolist(), bool(), "
    ".cpu(), nonzero, ...); H2D/step: host-to-device copies (tensors made from Python data on the device, host "
    "tensors moved there); on the CPU the counter follows where each tensor would live (hf_paged.bench.transfers). "
    "hf_paged D2H / H2D: those whose innermost frame outside PyTorch is hf_paged's code. Means per decode step of "
    "one more, untimed run; launches/step: Triton launches likewise; compiles: Triton compiles in the timed runs "
    "(0: every kernel variant was compiled in the warm-up).",
]


def _count(value: float | None) -> str:
    return "-" if value is None else f"{value:g}" if value == int(value) else f"{value:.2f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _host_cells(row) -> list[str]:
    base = [str(row.prompt_length), str(row.batch), row.impl]
    if row.status != "ok":
        return base + ["-"] * 9 + [f"{row.status}: {row.reason}"]
    return base + [
        _ms(row.step_ms), "-" if row.time_ratio is None else f"{row.time_ratio:.2f}", _ms(row.forward_ms),
        _count(row.d2h), _count(row.d2h_hf_paged), _count(row.h2d), _count(row.h2d_hf_paged), _count(row.launches),
        str(row.compiles), row.reason or "",
    ]


def _source_lines(host) -> list[list[str]]:
    lines = []
    for row in host:
        for kind in ("D2H", "H2D"):
            mine = [source for source in row.sources if source["kind"] == kind][:_SOURCES_SHOWN]
            lines += [[str(row.prompt_length), str(row.batch), row.impl, kind, _count(source["per_step"]),
                       f"{source['site']} ({source['function']}: {', '.join(source['ops'])})",
                       "yes" if source["hf_paged"] else "no"]
                      for source in mine]
    return lines


def _ratio(value: int | None, over: int | None) -> str:
    return "-" if value is None or not over else f"{value / over:.2f}"


def _ideal_lines(rows: list[Row]) -> list[list[str]]:
    """One line per case whose sdpa row carries the ideal (``ideal_bytes``), beside hf_paged's bytes."""
    by_case = {(r.scenario, r.prompt_length, r.impl): r for r in rows if r.status == "ok"}
    lines = []
    for (scenario, length, impl), ref in by_case.items():
        if impl != "sdpa" or ref.ideal_bytes is None:
            continue
        paged = by_case.get((scenario, length, "hf_paged"))
        allocated = paged.peak_kv_bytes if paged else None
        used = paged.peak_used_bytes if paged else None
        lines.append([scenario, str(length), str(ref.real_tokens), str(ref.cache_tokens), _mib(ref.peak_kv_bytes),
                      _mib(ref.ideal_bytes), f"{ref.ideal_ratio:.2f}", _mib(allocated),
                      _ratio(allocated, ref.peak_kv_bytes), _mib(used), _ratio(used, ref.peak_kv_bytes),
                      _ratio(allocated, ref.ideal_bytes)])
    return lines


_QUALITY_HEADERS = ("impl", "perplexity", "x hf_paged", "top-1 agree", "identical", "agreeing tokens", "tokens",
                    "ppl s", "s x hf_paged", "KV/segment MiB", "KV x sdpa", "note")
QUALITY_NOTES = [
    "quality scenario (hf_paged.bench.quality): perplexity: teacher-forced, exp of the mean negative log-likelihood "
    "of every corpus token but each segment's first; each segment gets a new cache and is fed through model(...) a "
    "chunk at a time, so every chunk's queries read the earlier chunks' keys and values from the cache (quantized "
    "where it quantizes); segments alternate between the implementations. x hf_paged: over unquantized hf_paged's "
    "(the reference).",
    "top-1 agree: the fraction of scored positions whose most likely next token equals unquantized hf_paged's.",
    "identical: greedy continuations of the chat requests (one left-padded batch in the chat template, to EOS or "
    "the bench's new tokens) equal to unquantized hf_paged's; agreeing tokens: their leading tokens equal to its, "
    "averaged over the requests; tokens: their lengths, averaged.",
    "ppl s: wall time of the perplexity pass's forward calls (scoring excluded); s x hf_paged: over unquantized "
    "hf_paged's. KV/segment: the cache's bytes after one full segment (hf_paged: the pool allocated, 8-bit codes "
    "with their inline scales; DynamicCache / QuantizedCache: their tensors, quantized payload, scales, "
    "zero-points and residual full-precision keys and values); KV x sdpa: over sdpa's DynamicCache's.",
    "quanto-int<n>: Transformers' QuantizedCache(backend=\"quanto\", nbits=n), as generate(cache_implementation="
    "\"quantized\", cache_config={\"backend\": \"quanto\", \"nbits\": n}) builds it, every other option at its "
    "default (see the settings line).",
]


def _fraction(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _quality_cells(row) -> list[str]:
    if row.status != "ok":
        return [row.impl] + ["-"] * 10 + [f"{row.status}: {row.reason}"]
    return [row.impl, f"{row.perplexity:.4f}", f"{row.perplexity_ratio:.4f}", _fraction(row.top1_agreement),
            f"{row.identical}/{row.requests}", f"{row.mean_agreeing_tokens:.1f}", f"{row.mean_tokens:.1f}",
            f"{row.seconds:.2f}", f"{row.time_ratio:.2f}", _mib(row.segment_kv_bytes),
            "-" if row.kv_ratio is None else f"{row.kv_ratio:.3f}", row.reason or ""]


def _quality_settings(quality) -> str:
    corpus, settings = quality.corpus, quality.settings
    return (f"corpus: {corpus['tokens']} tokens of {corpus['source']} (Python {corpus['python']}, "
            f"{corpus['characters']} characters), sha256 of the ids {corpus['sha256']}; segments of "
            f"{settings['segment']} tokens fed {settings['chunk']} at a time; continuations: {settings['requests']} "
            f"requests, at most {settings['new_tokens']} new tokens; reference: {settings['reference']}; "
            f"QuantizedCache defaults: {settings['quanto_defaults']}")


#: The 8-bit KV storage's targets (issue 21), checked on whatever rows a run has.
TARGET_PERPLEXITY, TARGET_TOP1 = 1.01, 0.99
TARGET_KV = {"greedy": 0.27, "sample8": 0.045}
TARGET_TIME = 1.15
_EIGHT_BIT = ("hf_paged-int8", "hf_paged-fp8")
_TARGET_HEADERS = ("target (issue 21)", "impl", "measured", "met")


def targets(rows: list[Row], quality=None) -> list[list[str]]:
    """One line per 8-bit KV target the results can answer: ``[target, impl, measured, met]``. From `quality`:
    perplexity within +1% of unquantized hf_paged, top-1 agreement >= 99%, faster than each QuantizedCache row at
    equal or better perplexity; from the generate() rows: allocated KV over sdpa's fp32 DynamicCache (greedy
    <= 0.27x, sample8 <= 0.045x) and greedy time within 1.15x of unquantized hf_paged's."""
    lines = []
    yes = {True: "yes", False: "NO"}
    if quality is not None:
        by_impl = {row.impl: row for row in quality.rows if row.status == "ok"}
        quanto = [row for row in by_impl.values() if row.impl.startswith("quanto-")]
        for name in _EIGHT_BIT:
            row = by_impl.get(name)
            if row is None:
                continue
            lines.append([f"perplexity <= {TARGET_PERPLEXITY:.2f}x unquantized", name, f"{row.perplexity_ratio:.4f}x",
                          yes[row.perplexity_ratio <= TARGET_PERPLEXITY]])
            lines.append([f"top-1 agreement >= {100 * TARGET_TOP1:.0f}%", name, _fraction(row.top1_agreement),
                          yes[row.top1_agreement >= TARGET_TOP1]])
            for other in quanto:
                met = row.seconds < other.seconds and row.perplexity <= other.perplexity
                lines.append([f"faster than {other.impl} at equal or better perplexity", name,
                              f"{row.seconds:.1f} s vs {other.seconds:.1f} s, perplexity {row.perplexity:.4f} vs "
                              f"{other.perplexity:.4f}", yes[met]])
    by_case = {(r.scenario, r.prompt_length, r.impl): r for r in rows if r.status == "ok"}
    for (scenario, length, impl), row in by_case.items():
        if impl not in _EIGHT_BIT:
            continue
        if scenario in TARGET_KV and row.kv_ratio is not None:
            lines.append([f"{scenario} P={length}: KV <= {TARGET_KV[scenario]}x sdpa (fp32 DynamicCache)", impl,
                          f"{row.kv_ratio:.4f}x", yes[row.kv_ratio <= TARGET_KV[scenario]]])
        unquantized = by_case.get((scenario, length, "hf_paged"))
        if scenario == "greedy" and unquantized is not None and unquantized.seconds_median:
            ratio = row.seconds_median / unquantized.seconds_median
            lines.append([f"greedy P={length}: time <= {TARGET_TIME}x unquantized hf_paged", impl, f"{ratio:.3f}x",
                          yes[ratio <= TARGET_TIME]])
    return lines


def _aligned(headers, lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines]
    return "\n".join(out)


def _markdown_table(headers, lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def render_table(rows: list[Row], sweep: list[SweepPoint], rss_note: str, host: list = (), quality=None) -> str:
    """The results as aligned plain-text tables followed by the notes; `host`: the `host` scenario's rows
    (`hf_paged.bench.host.HostRow`), in tables of their own; `quality`: the `quality` scenario's results
    (`hf_paged.bench.quality.QualityResults`), likewise."""
    parts = []
    if rows:
        parts.append(_aligned(_HEADERS, [_cells(r) for r in rows]))
    if sweep:
        parts.append(_aligned(_SWEEP_HEADERS, [_sweep_cells(p) for p in sweep]))
    ideal = _ideal_lines(rows)
    if ideal:
        parts.append(_aligned(_IDEAL_HEADERS, ideal))
    if rows or sweep:
        parts.append("\n".join("* " + n for n in notes(rss_note) + ([IDEAL_NOTE] if ideal else [])))
    if host:
        parts += [_aligned(_HOST_HEADERS, [_host_cells(r) for r in host]),
                  _aligned(_SOURCE_HEADERS, _source_lines(host)), "\n".join("* " + n for n in HOST_NOTES)]
    if quality is not None:
        parts += [_aligned(_QUALITY_HEADERS, [_quality_cells(r) for r in quality.rows]), _quality_settings(quality),
                  "\n".join("* " + n for n in QUALITY_NOTES)]
    goals = targets(rows, quality)
    if goals:
        parts.append(_aligned(_TARGET_HEADERS, goals))
    return "\n\n".join(parts)


def render_markdown(meta: dict, rows: list[Row], sweep: list[SweepPoint], plots: list[str], host: list = (),
                    quality=None) -> str:
    """``results.md``: the settings, the tables, the notes and the plots."""
    settings = "\n".join(f"* {k}: {v}" for k, v in meta.items() if k not in ("notes", "rss_note"))
    parts = ["# hf_paged benchmark", settings]
    if rows:
        parts.append(_markdown_table(_HEADERS, [_cells(r) for r in rows]))
    if sweep:
        parts += ["## KV memory vs k", _markdown_table(_SWEEP_HEADERS, [_sweep_cells(p) for p in sweep])]
    ideal = _ideal_lines(rows)
    if ideal:
        parts += ["## KV memory vs the ideal", _markdown_table(_IDEAL_HEADERS, ideal)]
    if rows or sweep:
        parts += ["## Notes", "\n".join("* " + n for n in meta["notes"] + ([IDEAL_NOTE] if ideal else []))]
    if host:
        parts += ["## Host cost of a decode step", _markdown_table(_HOST_HEADERS, [_host_cells(r) for r in host]),
                  f"### Where the decode steps' D2H reads and H2D copies come from (top {_SOURCES_SHOWN} per kind)",
                  _markdown_table(_SOURCE_HEADERS, _source_lines(host)),
                  "\n".join("* " + n for n in HOST_NOTES)]
    if quality is not None:
        parts += ["## Quality of quantized KV caches against unquantized hf_paged",
                  _markdown_table(_QUALITY_HEADERS, [_quality_cells(r) for r in quality.rows]),
                  _quality_settings(quality), "\n".join("* " + n for n in QUALITY_NOTES)]
    goals = targets(rows, quality)
    if goals:
        parts += ["## 8-bit KV targets (issue 21)", _markdown_table(_TARGET_HEADERS, goals)]
    parts += [f"![{name}]({name})" for name in plots]
    return "\n\n".join(parts) + "\n"


def _plot_times(rows: list[Row], path: Path) -> bool:
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.status == "ok"]
    scenarios = list(dict.fromkeys(r.scenario for r in ok))
    if not scenarios:
        return False
    impls = list(dict.fromkeys(r.impl for r in rows))
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
    cols = min(3, len(scenarios))
    nrows = -(-len(scenarios) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(scenarios) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, scenarios, strict=False):
        mine = [r for r in ok if r.scenario == name]
        for impl in impls:
            points = sorted((r.prompt_length, r.seconds_median) for r in mine if r.impl == impl)
            if points:
                ax.plot([p for p, _ in points], [t for _, t in points], marker="o", color=colors[impl], label=impl)
        ax.set_title(name)
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("median time (s)")
        ax.set_xticks(sorted({r.prompt_length for r in mine}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_kv(sweep: list[SweepPoint], path: Path) -> bool:
    import matplotlib.pyplot as plt

    if not sweep:
        return False
    titles = {"beams": "beam search (num_beams = k)", "sample": "sampling (num_return_sequences = k)"}
    fig, axes = plt.subplots(1, len(SWEEP_KINDS), figsize=(10, 3.8), squeeze=False)
    for ax, kind in zip(axes[0], SWEEP_KINDS, strict=True):
        mine = [p for p in sweep if p.kind == kind]
        for impl in dict.fromkeys(p.impl for p in mine):
            points = sorted((p.k, p.peak_kv_bytes, p.used_bytes) for p in mine if p.impl == impl)
            ks = [k for k, _, _ in points]
            ax.plot(ks, [(a or 0) / _MIB for _, a, _ in points], marker="o", label=f"{impl} allocated")
            if impl != "sdpa":
                ax.plot(ks, [(u or 0) / _MIB for _, _, u in points], marker="x", linestyle="--",
                        label=f"{impl} referenced")
        ax.set_title(f"{titles[kind]}, P={mine[0].prompt_length}" if mine else titles[kind])
        ax.set_xlabel("k")
        ax.set_ylabel("KV cache (MiB)")
        ax.set_xticks(sorted({p.k for p in mine}))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(out_dir: Path, meta: dict, rows: list[Row], sweep: list[SweepPoint], host: list = (),
                  quality=None) -> list[Path]:
    """Write ``results.json``, the plots and ``results.md`` into `out_dir` (created); returns the paths written.
    The `host` scenario's rows, when there are any, go under ``"host"`` in the JSON; the `quality` scenario's
    results under ``"quality"`` (``rows``, ``corpus``, ``settings``), and the 8-bit targets met or not under
    ``"targets"``."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir.mkdir(parents=True, exist_ok=True)
    plotted = []
    if _plot_times(rows, out_dir / PLOT_FILES[0]):
        plotted.append(PLOT_FILES[0])
    if _plot_kv(sweep, out_dir / PLOT_FILES[1]):
        plotted.append(PLOT_FILES[1])
    data = {"meta": meta, "results": [asdict(r) for r in rows], "sweep": [asdict(p) for p in sweep]}
    if host:
        data["host"] = [asdict(r) for r in host]
    if quality is not None:
        data["quality"] = asdict(quality)
    goals = targets(rows, quality)
    if goals:
        data["targets"] = [dict(zip(("target", "impl", "measured", "met"), line, strict=True)) for line in goals]
    (out_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    (out_dir / "results.md").write_text(render_markdown(meta, rows, sweep, plotted, host, quality))
    return [out_dir / "results.json", out_dir / "results.md"] + [out_dir / name for name in plotted]
