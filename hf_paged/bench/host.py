"""The bench's ``host`` scenario: what one decode step costs the host, on a model whose arithmetic costs nothing.

A 30-layer random-weight Llama as small as a Llama gets (hidden 64, 4 heads, 2 KV heads, fp32, a 512-token
vocabulary; `HOST_MODEL`) decodes greedily, `HOST_BATCHES` distinct prompts of P tokens, exactly G new tokens
(``min_new_tokens = max_new_tokens``), with

* ``sdpa``: ``attn_implementation="sdpa"`` and Transformers' ``DynamicCache`` (the reference);
* ``hf_paged-torch``: hf_paged on its PyTorch path (``HF_PAGED_BACKEND=torch``);
* ``hf_paged-triton-stub``: hf_paged on its Triton path (``HF_PAGED_BACKEND=triton``), the kernels compiled for
  sm_90 by the launch-stub device (`hf_paged.bench.stub_device`) and every launch a counted no-op, so the step's
  time is its host side: Python, PyTorch's small ops, the launchers and the JIT's argument binding.

The first two compute attention on the CPU, so their time also holds that arithmetic (it grows with batch x P); the
third's holds none of it. Compare the stub's time with a GPU's host time per step, not with sdpa's CPU time alone.

Per implementation it reports the time of a decode step (one iteration of generate's loop, from a forward's start
to the next's: `steps.StepRecorder.decode_periods`), the median over the decode steps of the timed runs (and each
run's median), the forward's share of it, its ratio to sdpa's, and from one more untimed run under
`transfers.TransferCounter` the D2H reads, H2D copies (hf_paged's own and in all) and Triton launches per decode
step, with the file:line of their main sources. Every implementation is warmed up at least once before timing (every
kernel variant compiled; the timed runs' Triton compiles are reported, 0 expected) and the timed runs alternate.

It runs in a process of its own (`run_host` starts ``python -m hf_paged.bench.host``), because the launch-stub
device replaces Triton's driver for the rest of the process. The process sets ``torch.set_flush_denormal(True)``
for every implementation alike: the stubbed kernels leave their outputs unwritten, and denormal garbage would slow
the CPU's arithmetic on that path only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .scenarios import HOST_BATCHES, HOST_LAYERS, HOST_MODEL

__all__ = ["HOST_BATCHES", "HOST_IMPLS", "HOST_LAYERS", "HOST_MODEL", "HostRow", "HostSettings", "main", "measure",
           "run_host"]

#: The reference, hf_paged's PyTorch path, hf_paged's Triton path on the launch-stub device.
HOST_IMPLS = ("sdpa", "hf_paged-torch", "hf_paged-triton-stub")
_BACKEND = {"hf_paged-torch": "torch", "hf_paged-triton-stub": "triton"}


@dataclass(frozen=True)
class HostSettings:
    """What the host scenario runs: `layers` of `HOST_MODEL`, each prompt length x `HOST_BATCHES`, `new_tokens` per
    row, `warmup` untimed runs (at least one) and `repeats` timed runs per implementation, on `threads` CPU threads;
    `seed` draws the weights and the prompts."""

    prompt_lengths: tuple[int, ...]
    new_tokens: int
    repeats: int = 3
    warmup: int = 1
    layers: int = HOST_LAYERS
    threads: int = 1
    seed: int = 0


@dataclass
class HostRow:
    """One implementation at one prompt length and batch (times in milliseconds, counts per decode step).

    ``status`` is ``"ok"`` or ``"n/a"`` (``reason`` says why). ``step_ms``: median time of a decode step over every
    decode step of the timed runs (``step_ms_runs``: each run's median); ``forward_ms``: the median of the forward
    alone; ``time_ratio``: ``step_ms`` over sdpa's. ``decode_steps``: decode steps per timed run (G - 2: the last
    forward's interval runs into generate's epilogue). ``compiles``: Triton compiles during the timed runs.
    ``d2h``, ``h2d``, ``launches`` and their ``_hf_paged`` parts: mean per decode step of the counting run;
    ``setup_*`` / ``prefill_*``: the same events before the first forward and in the prefill step, per call.
    ``sources``: the decode steps' main sources (`transfers.Source` as dicts).
    """

    scenario: str
    prompt_length: int
    batch: int
    impl: str
    status: str = "ok"
    reason: str | None = None
    new_tokens: int | None = None
    decode_steps: int | None = None
    step_ms: float | None = None
    step_ms_runs: list[float] = field(default_factory=list)
    forward_ms: float | None = None
    time_ratio: float | None = None
    compiles: int | None = None
    d2h: float | None = None
    d2h_hf_paged: float | None = None
    h2d: float | None = None
    h2d_hf_paged: float | None = None
    launches: float | None = None
    setup_d2h: int | None = None
    setup_h2d: int | None = None
    prefill_d2h: int | None = None
    prefill_h2d: int | None = None
    sources: list[dict] = field(default_factory=list)


def host_model(layers: int, max_positions: int, seed: int):
    """The scenario's model (`HOST_MODEL` with `layers` layers): random weights drawn with `seed`, sdpa attention."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**HOST_MODEL, num_hidden_layers=layers, max_position_embeddings=max_positions,
                         pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def _select(model, impl: str) -> None:
    """Switch `model` to `impl`'s attention and hf_paged backend (read by hf_paged at every step)."""
    attention = "sdpa" if impl == "sdpa" else "hf_paged"
    if model.config._attn_implementation != attention:
        model.set_attn_implementation(attention)
    if model.config._attn_implementation != attention:
        raise RuntimeError(f"{type(model).__name__} did not switch to attn_implementation={attention!r}")
    if impl in _BACKEND:
        os.environ["HF_PAGED_BACKEND"] = _BACKEND[impl]
    else:
        os.environ.pop("HF_PAGED_BACKEND", None)


def _case(model, length: int, batch: int, settings: HostSettings, stub_problem: str | None) -> list[HostRow]:
    import torch

    from .steps import StepRecorder
    from .transfers import TransferCounter

    generator = torch.Generator().manual_seed(settings.seed + 1000 * batch + length)
    ids = torch.randint(1, HOST_MODEL["vocab_size"], (batch, length), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    kwargs = dict(max_new_tokens=settings.new_tokens, min_new_tokens=settings.new_tokens, do_sample=False,
                  pad_token_id=0)
    impls = [impl for impl in HOST_IMPLS if impl != "hf_paged-triton-stub" or stub_problem is None]

    def generate(impl: str) -> None:
        _select(model, impl)
        with torch.no_grad():
            model.generate(**inputs, **kwargs)

    def say(text: str) -> None:
        print(f"host: P={length} batch={batch} {text}", file=sys.stderr, flush=True)

    for _ in range(max(1, settings.warmup)):
        for impl in impls:
            say(f"{impl} warm-up")
            generate(impl)
    periods = {impl: [] for impl in impls}
    forwards = {impl: [] for impl in impls}
    compiles = dict.fromkeys(impls, 0)
    for repeat in range(settings.repeats):
        shift = repeat % len(impls)
        for impl in impls[shift:] + impls[:shift]:
            say(f"{impl} {repeat + 1}/{settings.repeats}")
            _select(model, impl)
            with StepRecorder(model, device_events=False) as recorder, torch.no_grad():
                model.generate(**inputs, **kwargs)
            periods[impl].append([seconds * 1e3 for seconds in recorder.decode_periods()])
            forwards[impl] += [s["host_s"] * 1e3 for s in recorder.steps if s["tokens"] == 1 and "host_s" in s]
            compiles[impl] += recorder.compiles
    rows = []
    for impl in HOST_IMPLS:
        row = HostRow("host", length, batch, impl, new_tokens=settings.new_tokens)
        rows.append(row)
        if impl not in impls:
            row.status, row.reason = "n/a", f"launch-stub device: {stub_problem}"
            continue
        say(f"{impl} counting")
        _select(model, impl)
        with TransferCounter(model) as counter, torch.no_grad():
            model.generate(**inputs, **kwargs)
        counted = counter.summary(top=6)
        pooled = [ms for run in periods[impl] for ms in run]
        row.decode_steps = len(periods[impl][0]) if periods[impl] else 0
        row.step_ms = statistics.median(pooled) if pooled else None
        row.step_ms_runs = [statistics.median(run) for run in periods[impl] if run]
        row.forward_ms = statistics.median(forwards[impl]) if forwards[impl] else None
        row.compiles = compiles[impl]
        row.d2h, row.d2h_hf_paged, row.h2d, row.h2d_hf_paged = (counted.d2h, counted.d2h_hf_paged, counted.h2d,
                                                                counted.h2d_hf_paged)
        row.launches = counted.launches
        row.setup_d2h, row.setup_h2d = counted.setup_d2h, counted.setup_h2d
        row.prefill_d2h, row.prefill_h2d = counted.prefill_d2h, counted.prefill_h2d
        row.sources = [asdict(source) for source in counted.sources]
    _select(model, "sdpa")
    reference = rows[0].step_ms
    for row in rows:
        if row.step_ms is not None and reference:
            row.time_ratio = row.step_ms / reference
    return rows


def measure(settings: HostSettings) -> list[HostRow]:
    """Run the scenario in this process (it installs the launch-stub device where it can; see the module docstring)."""
    import torch

    from . import stub_device

    torch.set_num_threads(settings.threads)
    torch.set_flush_denormal(True)
    problem = stub_device.problem()
    if problem is None:
        stub_device.install()
    model = host_model(settings.layers, max(settings.prompt_lengths) + settings.new_tokens, settings.seed)
    return [row for length in settings.prompt_lengths for batch in HOST_BATCHES
            for row in _case(model, length, batch, settings, problem)]


def run_host(settings: HostSettings, timeout: float | None = None) -> list[HostRow]:
    """`measure` in a new Python process (this package first on its path); its progress goes to stderr.

    Raises RuntimeError when the process fails (its traceback is on stderr)."""
    import hf_paged

    root = str(Path(hf_paged.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(settings.threads)}
    env.pop("HF_PAGED_BACKEND", None)
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory(prefix="hf_paged_host_") as folder:
        out = Path(folder) / "host.json"
        command = [sys.executable, "-m", "hf_paged.bench.host", "--settings", json.dumps(asdict(settings)),
                   "--out", str(out)]
        started = time.perf_counter()
        done = subprocess.run(command, env=env, timeout=timeout)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"hf_paged bench: the host scenario's process failed (exit code {done.returncode} "
                               f"after {time.perf_counter() - started:.0f} s; its error is above)")
        return [HostRow(**row) for row in json.loads(out.read_text())]


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_paged.bench.host --settings JSON --out FILE``: `measure`, rows written to FILE as JSON."""
    parser = argparse.ArgumentParser(prog="python -m hf_paged.bench.host", description=__doc__.splitlines()[0])
    parser.add_argument("--settings", required=True, help="HostSettings as JSON")
    parser.add_argument("--out", required=True, type=Path, help="where to write the rows (JSON)")
    args = parser.parse_args(argv)
    given = json.loads(args.settings)
    given["prompt_lengths"] = tuple(given["prompt_lengths"])
    rows = measure(HostSettings(**given))
    args.out.write_text(json.dumps([asdict(row) for row in rows], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
