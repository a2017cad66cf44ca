"""The prepared device check (``scripts/gpu_check.sh`` runs ``python -m hf_paged.bench.gpu_check``).

A GPU is lent only at times and for minutes, in practice for one run of this check, so one command does
everything, each phase within a budget of its own, the most valuable results first, and writes what it saw as it
goes (``results.json`` and ``results.md`` after every phase; ``partial.json``, the running phase's results so far,
after every case or row) under ``--out``. On a GPU each phase runs in a process of its own (its output appended to
``phases.log``), so a CUDA fault or a hang costs only that phase:

1. ``bandwidth``: device copy bandwidth (bytes read plus bytes written per second), what the bench's bytes are
   measured against.
2. ``kernels``: ``tests/kernel_*cases.py`` (the interpreter cases and the device grid of
   ``tests/kernel_device_cases.py``) on CUDA against the PyTorch references, in a pytest subprocess (with
   pytest-xdist's workers where it is installed: most of the time is Triton compiling).
3. ``parity``: ``generate`` with ``"hf_paged"`` against ``sdpa`` + ``DynamicCache`` on a random-weight Llama-like
   model (~0.67B parameters) in **fp32**: greedy, left-padded greedy, beams with ``num_return_sequences``, seeded
   sampling, EOS; tokens must be equal. (In bf16 a random model has many near-ties: sdpa and eager themselves
   part within 1-30 tokens, so token equality there tells nothing about the kernels.)
4. ``bench``: hf_paged (Triton) against sdpa + DynamicCache in bf16 in one process: P in {512, 2048}, G=128;
   greedy batch 1, a batch of 32 different (left-padded) prompts, n=8 sampling, num_beams=8: time, tokens/s, peak
   ``torch.cuda.max_memory_allocated`` above the weights, KV bytes allocated, tokens matched. Each side runs the
   row's whole call once untimed first, so every kernel variant the timed run uses is compiled before it; per row
   the timed run records its Triton compiles (0 expected), and per decode step the median host time, device time
   (CUDA events), Triton launches, and the bytes the step must read against the measured copy bandwidth.
5. ``logits``: bf16 with teacher forcing: sdpa's tokens are forced on every side (a logits processor), so the
   runs see the same inputs at every step, and hf_paged's raw logits are compared with sdpa's, within a tolerance
   set by eager's own distance to sdpa (`LOGIT_TOLERANCE`).
6. ``split``: a small model whose layers run on CUDA and on the CPU (accelerate's ``dispatch_model``): one pool per
   device, tokens against sdpa on the same split.
7. ``decode_bytes``: decode attention's kernel time (profiled; prefill-only run subtracted) times the copy
   bandwidth, against the KV bytes the decode steps must read: the ``moved / must read`` ratio.

``--dry`` runs all of it on the CPU, tiny and quick (the kernels under ``TRITON_INTERPRET=1``, skipped with the
reason where this Triton's interpreter cannot run them; generate on the PyTorch path; the split as in-memory and
disk-offloaded layers); ``tests/test_gpu_check.py`` runs it so, and rehearses the GPU run on the CPU.
Written for Transformers 5.17 and later: generate is called without passing caches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, replace
from pathlib import Path

import torch

from hf_paged.bench.gpu_plan import (
    Clock,
    Plan,
    build_model,
    compare,
    make_plan,
    no_report,
    prompt_ids,
)
from hf_paged.bench.gpu_report import markdown, targets, versions
from hf_paged.bench.gpu_timing import phase_bandwidth, phase_bench, phase_decode_bytes
from hf_paged.bench.impls import set_attention

__all__ = ["LOGIT_TOLERANCE", "PHASES", "main"]

#: The phases in the order they run: the most valuable results first.
PHASES = ("bandwidth", "kernels", "parity", "bench", "logits", "split", "decode_bytes")
#: Teacher-forced bf16 logits pass when hf_paged's largest distance to sdpa's is at most this many times eager's
#: (two correct implementations that round differently), or at most `LOGIT_FLOOR` of the logits' spread.
LOGIT_TOLERANCE = 3.0
LOGIT_FLOOR = 1e-3


# ----------------------------------------------------------------------------------------------------- phases
def _interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run the kernel cases (the dry run's kernels phase), or None."""
    from hf_paged import kernels

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return kernels._triton_problem()
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _xdist_workers() -> int:
    """pytest-xdist workers for the kernel cases on a GPU (0: not installed): Triton's compiles dominate, and they
    run one per process."""
    try:
        import xdist  # noqa: F401
    except ImportError:
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 2))


def phase_kernels(plan: Plan, clock: Clock, repo: Path, out: Path, dry: bool) -> dict:
    tests = repo / "tests"
    files = [str(tests / "kernel_device_cases.py")] if dry else sorted(str(p) for p in tests.glob("kernel_*cases.py"))
    env = dict(os.environ)
    if clock.left < 40:
        return {"ok": False, "skipped": "out of time"}
    if dry:
        problem = _interpreter_problem()
        if problem is not None:  # e.g. the device image's Triton 3.6: its interpreter cannot run the kernels
            return {"ok": None, "skipped": f"the dry run's kernels run under Triton's interpreter, which {problem}"}
        env |= {"TRITON_INTERPRET": "1", "HF_PAGED_DEVICE_GRID": "tiny"}
    else:
        env.pop("TRITON_INTERPRET", None)
    report = out / "kernels.xml"
    timeout = max(clock.left - 5, 10)
    workers = 0 if dry else _xdist_workers()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *files]
    command += ["-n", str(workers)] if workers else []
    try:  # tests/ as working directory: the repository root on sys.path would shadow the installed hf_paged
        run = subprocess.run(command, cwd=tests, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "tail": str(error.stdout or "")[-2000:]}
    result = {"ok": run.returncode == 0, "returncode": run.returncode, "files": [Path(f).name for f in files],
              "workers": workers, "tail": (run.stdout + run.stderr)[-3000:]}
    if report.exists():
        suite = ET.parse(report).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        result |= {name: int(suite.get(name, 0)) for name in ("tests", "failures", "errors", "skipped")}
        result["failed"] = [case.get("name") for case in suite.iter("testcase")
                            if case.find("failure") is not None or case.find("error") is not None][:30]
        result["ok"] = result["ok"] and result["tests"] > result["skipped"]
    return result


def phase_parity(plan: Plan, clock: Clock, model, report=no_report) -> dict:
    """Token equality with sdpa on `model` (fp32 on the GPU: see the module's docstring)."""
    import hf_paged
    from hf_paged.bench.prompts import left_pad

    vocab, prompt, new = model.config.vocab_size, plan.parity_prompt, plan.parity_tokens
    lengths = [prompt, prompt * 3 // 4 + 1, prompt // 2, prompt // 3]  # left-padded: odd, different lengths
    cases = {
        "greedy": ([prompt_ids(vocab, prompt, 1)], {}),
        "greedy_left_padded": ([prompt_ids(vocab, n, 10 + i) for i, n in enumerate(lengths)], {}),
        "beams4_return2_left_padded": ([prompt_ids(vocab, n, 20 + i) for i, n in enumerate(lengths[:2])],
                                       {"num_beams": 4, "num_return_sequences": 2}),
        "sample4_seeded": ([prompt_ids(vocab, prompt, 3)], {"do_sample": True, "num_return_sequences": 4, "top_k": 0}),
    }
    results = {}
    for name, (prompts, extra) in cases.items():
        if clock.left < 30:
            results[name] = {"skipped": "out of time"}
            continue
        inputs = left_pad(prompts, 0, torch.device(plan.device))
        outputs = {}
        for impl in ("sdpa", "hf_paged"):
            set_attention(model, impl)
            torch.manual_seed(0)
            outputs[impl] = model.generate(
                **inputs, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, return_dict_in_generate=True,
                output_logits=not extra, **extra,
            )
        result = compare(outputs["sdpa"].sequences, outputs["hf_paged"].sequences, inputs["input_ids"].shape[1])
        if not extra:  # greedy: logits of the steps before the first difference
            steps = result["first_difference"] if result["first_difference"] is not None else new
            diffs = [(a.float() - b.float()).abs().max().item()
                     for a, b in zip(outputs["sdpa"].logits[: max(steps, 1)], outputs["hf_paged"].logits, strict=False)]
            spread = outputs["sdpa"].logits[0].float().std().item()
            result |= {"max_logit_difference": max(diffs), "logit_std": spread}
        results[name] = result
        report(results)
    # Greedy with an EOS that ends row 1 at its second token (sdpa's), as users call it (no return_dict): in the
    # cache generate builds and drops, that row gives its blocks back and its padding reads garbage keys.
    if clock.left < 30:
        results["greedy_eos_left_padded"] = {"skipped": "out of time"}
    else:
        inputs = left_pad([prompt_ids(vocab, n, 10 + i) for i, n in enumerate(lengths)], 0, torch.device(plan.device))
        width = inputs["input_ids"].shape[1]
        set_attention(model, "sdpa")
        first = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        eos = int(first[1, width + 1])
        ended = {}
        for impl in ("sdpa", "hf_paged"):
            set_attention(model, impl)
            with hf_paged.recorded_stats() as recorded:  # hf_paged's run records its cache's stats
                ended[impl] = model.generate(**inputs, max_new_tokens=new, pad_token_id=0, eos_token_id=eos)
        result = compare(ended["sdpa"], ended["hf_paged"], width)
        result["eos"], result["peak_used_blocks"] = eos, recorded[-1].peak_used_blocks if recorded else None
        results["greedy_eos_left_padded"] = result
    results["ok"] = all(r.get("match", False) for r in results.values() if isinstance(r, dict))
    results["dtype"] = str(plan.parity_dtype).removeprefix("torch.")
    return results


class ForcedTokens:
    """A logits processor that forces ``tokens[:, step]`` at each step (teacher forcing): every other score becomes
    -inf, so greedy search and sampling alike pick it. ``tokens``: ``[rows, steps]``; ``width``: the prompt's
    (padded) length, to tell the step from ``input_ids``."""

    def __init__(self, tokens: torch.Tensor, width: int):
        self.tokens, self.width = tokens, width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.width
        if input_ids.shape[0] != self.tokens.shape[0] or step >= self.tokens.shape[1]:
            raise ValueError(f"ForcedTokens: {input_ids.shape[0]} rows at step {step}, but tokens for "
                             f"{self.tokens.shape[0]} rows and {self.tokens.shape[1]} steps")
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, self.tokens[:, step : step + 1].to(scores.device), 0.0)


def phase_logits(plan: Plan, clock: Clock, model, report=no_report) -> dict:
    """bf16 with teacher forcing: sdpa's tokens forced on sdpa, eager and hf_paged; hf_paged's raw logits against
    sdpa's, within `LOGIT_TOLERANCE` times eager's distance to sdpa (or `LOGIT_FLOOR` of the logits' spread)."""
    from transformers import LogitsProcessorList

    from hf_paged.bench.prompts import left_pad

    vocab, prompt, new = model.config.vocab_size, plan.parity_prompt, plan.parity_tokens
    lengths = [prompt, prompt * 3 // 4 + 1, prompt // 2, prompt // 3]
    cases = {
        "greedy": ([prompt_ids(vocab, prompt, 1)], {}),
        "greedy_left_padded": ([prompt_ids(vocab, n, 10 + i) for i, n in enumerate(lengths)], {}),
        # the rows of one prompt share its blocks: the shared-prefix kernel on the Triton path
        "sample4_seeded": ([prompt_ids(vocab, prompt, 3)], {"do_sample": True, "num_return_sequences": 4, "top_k": 0}),
    }
    results: dict = {"dtype": str(plan.dtype).removeprefix("torch."), "tolerance": LOGIT_TOLERANCE,
                     "floor": LOGIT_FLOOR}
    for name, (prompts, extra) in cases.items():
        if clock.left < 20:
            results[name] = {"skipped": "out of time"}
            continue
        inputs = left_pad(prompts, 0, torch.device(plan.device))
        width = inputs["input_ids"].shape[1]
        common = dict(max_new_tokens=new, min_new_tokens=new, pad_token_id=0, return_dict_in_generate=True, **extra)
        set_attention(model, "sdpa")
        torch.manual_seed(0)
        tokens = model.generate(**inputs, **common).sequences[:, width:]
        logits, forced_ok = {}, True
        for impl in ("sdpa", "eager", "hf_paged"):
            set_attention(model, impl)
            torch.manual_seed(0)
            out = model.generate(**inputs, **common, output_logits=True,
                                 logits_processor=LogitsProcessorList([ForcedTokens(tokens, width)]))
            forced_ok &= bool(torch.equal(out.sequences[:, width:], tokens))
            logits[impl] = torch.stack([step.float() for step in out.logits])  # [steps, rows, vocab]
        spread = logits["sdpa"].std().item()
        eager = (logits["eager"] - logits["sdpa"]).abs().max().item()
        paged = (logits["hf_paged"] - logits["sdpa"]).abs().max().item()
        allowed = max(LOGIT_TOLERANCE * eager, LOGIT_FLOOR * spread)
        top1 = (logits["hf_paged"].argmax(-1) == logits["sdpa"].argmax(-1)).float().mean().item()
        results[name] = {"match": forced_ok and paged <= allowed, "forced": forced_ok,
                         "max_logit_difference": paged, "eager_max_logit_difference": eager, "allowed": allowed,
                         "logit_std": spread, "top1_agreement": top1, "steps": new, "rows": int(tokens.shape[0])}
        report(results)
    results["ok"] = all(r.get("match", False) for r in results.values() if isinstance(r, dict))
    return results


def phase_split(plan: Plan, clock: Clock) -> dict:
    from accelerate import dispatch_model

    import hf_paged
    from hf_paged.bench.prompts import left_pad

    if clock.left < 30:
        return {"ok": False, "skipped": "out of time"}
    # Built on the CPU in fp32 (CPU layers in bf16 would be slow), then half of the layers go to CUDA.
    model = build_model(plan.split_model, replace(plan, device="cpu", dtype=torch.float32))
    layers = model.config.num_hidden_layers
    first, second = (0, "cpu") if plan.device == "cuda" else ("cpu", "disk")
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": first, "lm_head": first}
    device_map |= {f"model.layers.{i}": first if i < layers // 2 else second for i in range(layers)}
    offload = tempfile.TemporaryDirectory()  # disk-offloaded weights (dry run); removed with the model
    model = dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=offload.name)
    prompts = [prompt_ids(model.config.vocab_size, n, 30 + i) for i, n in enumerate((plan.parity_prompt, 17))]
    inputs = left_pad(prompts, 0, model.device)
    results: dict = {"device_map": {k: str(v) for k, v in device_map.items()}}
    for name, extra in {"greedy": {}, "beams3_return2": {"num_beams": 3, "num_return_sequences": 2}}.items():
        outputs = {}
        for impl in ("sdpa", "hf_paged"):
            set_attention(model, impl)
            outputs[impl] = model.generate(**inputs, max_new_tokens=plan.parity_tokens,
                                           min_new_tokens=plan.parity_tokens, pad_token_id=0,
                                           return_dict_in_generate=True, **extra)
        result = compare(outputs["sdpa"].sequences, outputs["hf_paged"].sequences, inputs["input_ids"].shape[1])
        cache = hf_paged.compat.output_cache(outputs["hf_paged"])
        if isinstance(cache, hf_paged.PagedCache):
            result["pools"] = [str(pool.tensor.device) for pool in cache.pools]
        results[name] = result
    results["ok"] = all(r.get("match") and len(r.get("pools", [])) == 2
                        for r in results.values() if isinstance(r, dict) and "match" in r)
    return results


def _device_name(plan: Plan) -> str:
    if plan.device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, dry run)"


def run_phase(name: str, plan: Plan, clock: Clock, args: argparse.Namespace, report=no_report) -> dict:
    """Run one phase in this process and return its result (a failure is recorded, not raised). `report` gets the
    phase's results so far after each case or row."""
    started = time.perf_counter()
    try:
        if name == "kernels":
            result = phase_kernels(plan, clock, args.repo.resolve(), args.out.resolve(), args.dry)
        elif name == "split":
            result = phase_split(plan, clock)
        elif name == "bandwidth":
            result = phase_bandwidth(plan)
        elif name in ("parity", "bench", "logits", "decode_bytes"):
            dtype = plan.parity_dtype if name == "parity" else plan.dtype
            model = build_model(plan.model, replace(plan, dtype=dtype))
            parameters = sum(p.numel() for p in model.parameters())
            if name == "parity":
                result = phase_parity(plan, clock, model, report)
            elif name == "logits":
                result = phase_logits(plan, clock, model, report)
            elif name == "bench":
                result = phase_bench(plan, clock, model, args.bandwidth, report)
            else:
                bandwidth = args.bandwidth or phase_bandwidth(plan)["bytes_per_second"]
                result = phase_decode_bytes(plan, clock, model, bandwidth, report)
            result["parameters"] = parameters
        else:
            raise ValueError(f"unknown phase {name!r}")
    except Exception as error:  # a failed phase is recorded and the next one still runs
        result = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    result["seconds"] = time.perf_counter() - started
    return result


def _write_json(path: Path, value: dict) -> None:
    """Write `value` as JSON through a temporary file, so a kill mid-write never leaves half a file."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=1, default=str))
    temporary.replace(path)


def _run_phase_process(name: str, seconds: float, args: argparse.Namespace, bandwidth: float | None,
                       workdir: Path) -> dict:
    """Run one phase in a process of its own, so that a crash or a hang (a CUDA fault) costs only that phase. Its
    output is appended to ``phases.log``; its results so far are in ``partial.json`` while it runs."""
    result_file = workdir / f"{name}.json"
    result_file.unlink(missing_ok=True)
    partial = args.out / "partial.json"
    command = [sys.executable, "-m", "hf_paged.bench.gpu_check", "--child", str(result_file), "--phases", name,
               "--out", str(args.out), "--repo", str(args.repo), "--budget", f"{seconds:.0f}"]
    command += ["--dry"] if args.dry else []
    command += ["--bandwidth", str(bandwidth)] if bandwidth else []
    started = time.perf_counter()
    with open(args.out / "phases.log", "a") as log:
        log.write(f"\n===== {name} ({seconds:.0f} s) =====\n")
        log.flush()
        try:
            code = subprocess.run(command, cwd=args.out, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(seconds, 5) + 10).returncode
        except subprocess.TimeoutExpired:
            code = "killed: out of time"
    if result_file.exists():
        return json.loads(result_file.read_text())
    result = {"ok": False, "error": f"the phase's process ended ({code}) without a result",
              "tail": (args.out / "phases.log").read_text()[-3000:], "seconds": time.perf_counter() - started}
    if partial.exists():  # what it finished before it was killed
        saved = json.loads(partial.read_text())
        if saved.get("phase") == name:
            result |= {key: value for key, value in saved["results"].items() if key not in result}
    return result


def _phase_seconds(name: str, names: list[str], plan: Plan, clock: Clock) -> float:
    """A phase's time: until its deadline in the plan's schedule (the phases' own budgets, added up in order, so a
    phase that ends early leaves its time to the later ones), and never past the whole budget."""
    done = names[: names.index(name) + 1]
    deadline = sum(plan.phase_seconds.get(n, 30) for n in done)
    spent = clock.budget - clock.left
    return max(0.0, min(deadline - spent, clock.left))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_paged.bench.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--dry", action="store_true", help="tiny, on the CPU (the suite's check of this script)")
    parser.add_argument("--out", type=Path, default=Path("gpu_results"), help="where results.json/.md go")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for all phases together")
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2],
                        help="the checkout (its tests/ hold the kernel cases)")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="one process per phase, so a crash or hang costs only that phase (default: on a GPU)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # run one phase, write its result there
    parser.add_argument("--bandwidth", type=float, help=argparse.SUPPRESS)  # bytes/s measured by an earlier phase
    args = parser.parse_args(argv)
    plan = make_plan(args.dry)
    if plan.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry for the CPU check")
    if args.dry:
        torch.set_num_threads(1)
    import hf_paged  # noqa: F401  (registers "hf_paged")
    from hf_paged import backend

    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(args.budget)
    if args.child is not None:
        partial = args.out / "partial.json"

        def report(results: dict) -> None:
            _write_json(partial, {"phase": args.phases, "results": results})

        _write_json(args.child, run_phase(args.phases, plan, clock, args, report))
        return 0
    record = {"device": _device_name(plan), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "dry": args.dry, "versions": versions(), "plan": {k: str(v) for k, v in asdict(plan).items()},
              "hf_paged_backend": "triton" if backend.use_triton(torch.device(plan.device)) else "torch",
              "phases": {}}
    names = args.phases.split(",")
    with tempfile.TemporaryDirectory() as workdir:
        for name in names:
            bandwidth = record["phases"].get("bandwidth", {}).get("bytes_per_second")
            seconds = _phase_seconds(name, names, plan, clock)
            if args.isolate if args.isolate is not None else not args.dry:
                result = _run_phase_process(name, seconds, args, bandwidth, Path(workdir))
            else:
                args.bandwidth = bandwidth
                result = run_phase(name, plan, Clock(seconds), args)
            record["phases"][name] = result
            print(f"[gpu_check] {name}: ok={result.get('ok')} in {result.get('seconds', 0):.1f} s "
                  f"(of {seconds:.0f}), {clock.left:.0f} s left", flush=True)
            record["targets"] = targets(record, plan)
            _write_json(args.out / "results.json", record)
            (args.out / "results.md").write_text(markdown(record))
    print(markdown(record))
    # A phase this Triton cannot run (ok None, skipped with the reason) does not fail the check.
    return 0 if all(phase.get("ok") is not False for phase in record["phases"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
