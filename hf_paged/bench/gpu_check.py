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
import re
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from hf_paged.bench.steps import StepRecorder

__all__ = ["LOGIT_TOLERANCE", "PHASES", "main"]

#: The phases in the order they run: the most valuable results first.
PHASES = ("bandwidth", "kernels", "parity", "bench", "logits", "split", "decode_bytes")
#: Teacher-forced bf16 logits pass when hf_paged's largest distance to sdpa's is at most this many times eager's
#: (two correct implementations that round differently), or at most `LOGIT_FLOOR` of the logits' spread.
LOGIT_TOLERANCE = 3.0
LOGIT_FLOOR = 1e-3

# Decode-attention kernels, as the profiler names them (Triton kernels by function name; the CPU path's fused op).
ATTENTION_KERNELS = re.compile(r"attention|cascade|prefix|reduce_splits|merge", re.IGNORECASE)
NOT_ATTENTION = re.compile(r"reshape_and_cache|copy_blocks", re.IGNORECASE)


@dataclass(frozen=True)
class Plan:
    """Sizes of one check: the full one on a GPU, or the dry run on the CPU."""

    device: str
    dtype: torch.dtype  # the bench's, the teacher-forced logits' and decode_bytes' model
    parity_dtype: torch.dtype  # the token-equality parity's model
    model: dict  # LlamaConfig keyword arguments
    split_model: dict
    prompt_lens: tuple[int, ...]
    new_tokens: int
    batch: int  # different prompts in the batch scenario
    k: int  # num_return_sequences of the sampling scenario, num_beams of the beam scenario
    parity_prompt: int
    parity_tokens: int
    copy_bytes: int
    phase_seconds: dict  # each phase's own budget (it also gets no more than what is left of the whole)


def make_plan(dry: bool) -> Plan:
    if dry:
        tiny = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256)
        seconds = dict(bandwidth=20, kernels=150, parity=60, bench=120, logits=40, split=60, decode_bytes=40)
        return Plan("cpu", torch.float32, torch.float32, tiny, {**tiny, "num_hidden_layers": 4}, (16, 40), 6, 4, 4,
                    21, 6, 16 * 2**20, seconds)
    model = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                 initializer_range=0.04)  # peakier logits than 0.02: fewer near-ties
    split = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.04)
    # 470 s in all, in the order the phases run; a phase that ends early leaves its time to the next ones.
    seconds = dict(bandwidth=15, kernels=130, parity=60, bench=150, logits=45, split=30, decode_bytes=40)
    return Plan("cuda", torch.bfloat16, torch.float32, model, split, (512, 2048), 128, 32, 8, 200, 48, 2**31,
                seconds)


class Clock:
    """The time budget: every phase asks how much is left before it starts, and caps what it runs by it."""

    def __init__(self, budget: float):
        self.start = time.perf_counter()
        self.budget = budget

    @property
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _prompt(vocab: int, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def _build_model(config: dict, plan: Plan, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**config, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(plan.device):
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=plan.dtype)
    model.generation_config.pad_token_id = 0
    return model.eval()


def _set_attention(model, name: str) -> None:
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise RuntimeError(f"{type(model).__name__} did not switch to attn_implementation={name!r}")


def _compare(expected: torch.Tensor, got: torch.Tensor, prompt_len: int) -> dict:
    """How far two ``[rows, prompt + new]`` token tensors agree past the prompt."""
    new_expected, new_got = expected[:, prompt_len:], got[:, prompt_len:]
    if new_expected.shape != new_got.shape:
        return {"match": False, "rows_equal": 0, "rows": len(new_expected), "first_difference": 0}
    differs = (new_expected != new_got).any(dim=0).nonzero()
    return {
        "match": bool(torch.equal(new_expected, new_got)),
        "rows_equal": int((new_expected == new_got).all(dim=1).sum()),
        "rows": len(new_expected),
        "first_difference": int(differs[0]) if len(differs) else None,
    }


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


def _no_report(partial: dict) -> None:
    """Where a phase run in the main process sends its partial results: nowhere (the record follows the phase)."""


def phase_parity(plan: Plan, clock: Clock, model, report=_no_report) -> dict:
    """Token equality with sdpa on `model` (fp32 on the GPU: see the module's docstring)."""
    import hf_paged
    from hf_paged.bench.prompts import left_pad

    vocab, prompt, new = model.config.vocab_size, plan.parity_prompt, plan.parity_tokens
    lengths = [prompt, prompt * 3 // 4 + 1, prompt // 2, prompt // 3]  # left-padded: odd, different lengths
    cases = {
        "greedy": ([_prompt(vocab, prompt, 1)], {}),
        "greedy_left_padded": ([_prompt(vocab, n, 10 + i) for i, n in enumerate(lengths)], {}),
        "beams4_return2_left_padded": ([_prompt(vocab, n, 20 + i) for i, n in enumerate(lengths[:2])],
                                       {"num_beams": 4, "num_return_sequences": 2}),
        "sample4_seeded": ([_prompt(vocab, prompt, 3)], {"do_sample": True, "num_return_sequences": 4, "top_k": 0}),
    }
    results = {}
    for name, (prompts, extra) in cases.items():
        if clock.left < 30:
            results[name] = {"skipped": "out of time"}
            continue
        inputs = left_pad(prompts, 0, torch.device(plan.device))
        outputs = {}
        for impl in ("sdpa", "hf_paged"):
            _set_attention(model, impl)
            torch.manual_seed(0)
            outputs[impl] = model.generate(
                **inputs, max_new_tokens=new, min_new_tokens=new, pad_token_id=0, return_dict_in_generate=True,
                output_logits=not extra, **extra,
            )
        result = _compare(outputs["sdpa"].sequences, outputs["hf_paged"].sequences, inputs["input_ids"].shape[1])
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
        inputs = left_pad([_prompt(vocab, n, 10 + i) for i, n in enumerate(lengths)], 0, torch.device(plan.device))
        width = inputs["input_ids"].shape[1]
        _set_attention(model, "sdpa")
        first = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        eos = int(first[1, width + 1])
        ended = {}
        for impl in ("sdpa", "hf_paged"):
            _set_attention(model, impl)
            with hf_paged.recorded_stats() as recorded:  # hf_paged's run records its cache's stats
                ended[impl] = model.generate(**inputs, max_new_tokens=new, pad_token_id=0, eos_token_id=eos)
        result = _compare(ended["sdpa"], ended["hf_paged"], width)
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


def phase_logits(plan: Plan, clock: Clock, model, report=_no_report) -> dict:
    """bf16 with teacher forcing: sdpa's tokens forced on sdpa, eager and hf_paged; hf_paged's raw logits against
    sdpa's, within `LOGIT_TOLERANCE` times eager's distance to sdpa (or `LOGIT_FLOOR` of the logits' spread)."""
    from transformers import LogitsProcessorList

    from hf_paged.bench.prompts import left_pad

    vocab, prompt, new = model.config.vocab_size, plan.parity_prompt, plan.parity_tokens
    lengths = [prompt, prompt * 3 // 4 + 1, prompt // 2, prompt // 3]
    cases = {
        "greedy": ([_prompt(vocab, prompt, 1)], {}),
        "greedy_left_padded": ([_prompt(vocab, n, 10 + i) for i, n in enumerate(lengths)], {}),
        # the rows of one prompt share its blocks: the shared-prefix kernel on the Triton path
        "sample4_seeded": ([_prompt(vocab, prompt, 3)], {"do_sample": True, "num_return_sequences": 4, "top_k": 0}),
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
        _set_attention(model, "sdpa")
        torch.manual_seed(0)
        tokens = model.generate(**inputs, **common).sequences[:, width:]
        logits, forced_ok = {}, True
        for impl in ("sdpa", "eager", "hf_paged"):
            _set_attention(model, impl)
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
    model = _build_model(plan.split_model, replace(plan, device="cpu", dtype=torch.float32))
    layers = model.config.num_hidden_layers
    first, second = (0, "cpu") if plan.device == "cuda" else ("cpu", "disk")
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": first, "lm_head": first}
    device_map |= {f"model.layers.{i}": first if i < layers // 2 else second for i in range(layers)}
    offload = tempfile.TemporaryDirectory()  # disk-offloaded weights (dry run); removed with the model
    model = dispatch_model(model, device_map=device_map, main_device="cpu", offload_dir=offload.name)
    prompts = [_prompt(model.config.vocab_size, n, 30 + i) for i, n in enumerate((plan.parity_prompt, 17))]
    inputs = left_pad(prompts, 0, model.device)
    results: dict = {"device_map": {k: str(v) for k, v in device_map.items()}}
    for name, extra in {"greedy": {}, "beams3_return2": {"num_beams": 3, "num_return_sequences": 2}}.items():
        outputs = {}
        for impl in ("sdpa", "hf_paged"):
            _set_attention(model, impl)
            outputs[impl] = model.generate(**inputs, max_new_tokens=plan.parity_tokens,
                                           min_new_tokens=plan.parity_tokens, pad_token_id=0,
                                           return_dict_in_generate=True, **extra)
        result = _compare(outputs["sdpa"].sequences, outputs["hf_paged"].sequences, inputs["input_ids"].shape[1])
        cache = hf_paged.compat.output_cache(outputs["hf_paged"])
        if isinstance(cache, hf_paged.PagedCache):
            result["pools"] = [str(pool.tensor.device) for pool in cache.pools]
        results[name] = result
    results["ok"] = all(r.get("match") and len(r.get("pools", [])) == 2
                        for r in results.values() if isinstance(r, dict) and "match" in r)
    return results


def phase_bandwidth(plan: Plan) -> dict:
    source = torch.empty(plan.copy_bytes, dtype=torch.uint8, device=plan.device)
    target = torch.empty_like(source)
    target.copy_(source)
    _sync(plan.device)
    repeats = 10
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    _sync(plan.device)
    seconds = (time.perf_counter() - start) / repeats
    del source, target
    return {"ok": True, "bytes": plan.copy_bytes, "seconds_per_copy": seconds,
            "bytes_per_second": 2 * plan.copy_bytes / seconds}  # each byte read once and written once


def _scenarios(plan: Plan):
    from hf_paged.bench.scenarios import Scenario

    k = plan.k
    return [
        Scenario("greedy", "greedy decoding, batch 1"),
        Scenario(f"batch{plan.batch}", f"greedy, {plan.batch} different left-padded prompts", batch=plan.batch),
        Scenario(f"sample{k}", f"sampling, num_return_sequences={k} (seeded)", num_return_sequences=k, do_sample=True),
        Scenario(f"beams{k}", f"beam search, num_beams={k}", num_beams=k),
    ]


def _memory_baseline(device: str) -> int:
    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _bytes_per_key(config, dtype: torch.dtype) -> int:
    """K+V bytes of one token over all layers."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * torch.finfo(dtype).bits // 8 * config.num_hidden_layers


def _step_bytes(model, plan: Plan, scenario, length: int, sequences: int) -> int:
    """Bytes a decode step must read at the run's middle step: every weight but the embedding table (a gather of a
    few rows), and the distinct keys and values of the context (a prompt shared by the k rows of one call once)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= model.get_input_embeddings().weight.numel() * model.get_input_embeddings().weight.element_size()
    middle = plan.new_tokens // 2
    shared = scenario.batch == 1 and sequences > 1
    keys = length + sequences * middle if shared else sequences * (length + middle)
    return weights + keys * _bytes_per_key(model.config, plan.dtype)


def phase_bench(plan: Plan, clock: Clock, model, bandwidth: float | None = None, report=_no_report) -> dict:
    from hf_paged.bench.runner import Runner

    runner = Runner(model, pad_token_id=0, seed=0)
    stream = _prompt(model.config.vocab_size, 4096, 99)
    rows, run_seconds = [], 0.0
    events = plan.device == "cuda"
    for length in plan.prompt_lens:
        for scenario in _scenarios(plan):
            calls = scenario.prompts(stream, length)
            if clock.left < 4 * run_seconds + 20:  # a row: a warm-up and a timed run of each side
                rows.append({"prompt": length, "scenario": scenario.name, "skipped": "out of time"})
                continue
            row = {"prompt": length, "scenario": scenario.name, "new_tokens": plan.new_tokens}
            try:
                sequences = {}
                for impl in ("hf_paged", "sdpa"):
                    # Warm-up: the same calls at full length, so every kernel variant the timed run needs (block
                    # table widths, a second slab, copy-on-write) is compiled before it, and the allocator primed.
                    runner.run(impl, scenario, calls, plan.new_tokens)
                    baseline = _memory_baseline(plan.device)
                    _sync(plan.device)
                    with StepRecorder(model, device_events=events) as steps:
                        run = runner.run(impl, scenario, calls, plan.new_tokens)
                    _sync(plan.device)
                    run_seconds = max(run_seconds, run.seconds)
                    tokens = sum(len(s) for s in run.sequences)
                    step = steps.summary()
                    must_read = _step_bytes(model, plan, scenario, length, len(run.sequences))
                    timed_ms = step.device_ms if step.device_ms is not None else step.host_ms
                    row[impl] = {
                        "seconds": run.seconds,
                        "tokens_per_second": tokens / run.seconds,
                        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if plan.device == "cuda" else None,
                        "peak_above_weights_bytes": torch.cuda.max_memory_allocated() - baseline
                        if plan.device == "cuda" else None,
                        # the most KV bytes allocated (hf_paged: the pool, referenced or not; sdpa: DynamicCache)
                        "kv_bytes": run.peak_kv_bytes if run.peak_kv_bytes is not None else run.kv_bytes,
                        "compiles": step.compiles,  # Triton JIT compiles inside the timed run: 0 when warm
                        "decode_steps": step.decode_steps,
                        "host_ms_per_step": step.host_ms,
                        "device_ms_per_step": step.device_ms,
                        "triton_launches_per_step": step.launches,
                        "prefill_triton_launches": step.prefill_launches,
                        "step_must_read_bytes": must_read,
                        # what the step's bytes would take at the measured copy bandwidth, over its time
                        "bandwidth_fraction": must_read / bandwidth / (timed_ms * 1e-3)
                        if bandwidth and timed_ms else None,
                    }
                    sequences[impl] = run.sequences
                row["tokens_match"] = sequences["hf_paged"] == sequences["sdpa"]
                row["rows_equal"] = sum(a == b for a, b in zip(sequences["hf_paged"], sequences["sdpa"], strict=True))
                row["rows"] = len(sequences["sdpa"])
                row["time_ratio"] = row["hf_paged"]["seconds"] / row["sdpa"]["seconds"]
                if plan.device == "cuda":
                    row["peak_ratio"] = row["hf_paged"]["peak_above_weights_bytes"] / row["sdpa"]["peak_above_weights_bytes"]
                row["kv_ratio"] = row["hf_paged"]["kv_bytes"] / row["sdpa"]["kv_bytes"]
            except Exception as error:  # one failed run (out of memory, ...) is recorded; the rest run
                row["error"] = f"{type(error).__name__}: {error}"
            rows.append(row)
            report({"rows": rows})
    # Tokens may differ in bf16 (near-ties on a random model, see the module docstring): the bench's result is its
    # table; it fails on a failed run or a compile inside a timed run.
    ran = [r for r in rows if "time_ratio" in r]
    compiles = sum(r[impl]["compiles"] for r in ran for impl in ("hf_paged", "sdpa"))
    return {"ok": bool(ran) and len(ran) == len([r for r in rows if "skipped" not in r]) and compiles == 0,
            "rows": rows, "compiles_in_timed_runs": compiles}


def _attention_seconds(model, plan: Plan, inputs: dict, kwargs: dict) -> float:
    """Self time of the attention kernels (or the CPU path's attention ops) in one ``generate`` call."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if plan.device == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        torch.manual_seed(0)
        model.generate(**inputs, **kwargs, pad_token_id=0)
        _sync(plan.device)
    total_us = 0.0
    for event in prof.key_averages():
        if ATTENTION_KERNELS.search(event.key) and not NOT_ATTENTION.search(event.key):
            if plan.device == "cuda":
                total_us += getattr(event, "self_device_time_total", None) or event.self_cuda_time_total
            else:
                total_us += event.self_cpu_time_total
    return total_us * 1e-6


def phase_decode_bytes(plan: Plan, clock: Clock, model, bandwidth: float, report=_no_report) -> dict:
    from hf_paged.bench.prompts import left_pad
    from hf_paged.bench.runner import LIBRARY_BLOCK_SIZE

    _set_attention(model, "hf_paged")
    config = model.config
    bytes_per_key = _bytes_per_key(config, plan.dtype)
    length, new, k = plan.prompt_lens[-1], plan.new_tokens, plan.k
    vocab = config.vocab_size
    shared = length // LIBRARY_BLOCK_SIZE * LIBRARY_BLOCK_SIZE  # the prompt's full blocks, read once for all k rows
    cases = {
        "greedy": ([_prompt(vocab, length, 5)], {}, lambda j: length + j),
        f"batch{plan.batch}": ([_prompt(vocab, length, 50 + i) for i in range(plan.batch)], {},
                               lambda j: plan.batch * (length + j)),
        f"sample{k}": ([_prompt(vocab, length, 6)], {"do_sample": True, "num_return_sequences": k},
                       lambda j: shared + k * (length - shared + j)),
    }
    results = {}
    for name, (prompts, extra, keys_at_step) in cases.items():
        if clock.left < 20:
            results[name] = {"skipped": "out of time"}
            continue
        inputs = left_pad(prompts, 0, torch.device(plan.device))
        full = _attention_seconds(model, plan, inputs, {"max_new_tokens": new, "min_new_tokens": new, **extra})
        prefill = _attention_seconds(model, plan, inputs, {"max_new_tokens": 1, "min_new_tokens": 1, **extra})
        # decode forward j (1 .. new-1) attends to `keys_at_step(j)` distinct keys over all rows
        must_read = bytes_per_key * sum(keys_at_step(j) for j in range(1, new))
        seconds = max(full - prefill, 0.0)
        results[name] = {"decode_attention_seconds": seconds, "must_read_bytes": must_read,
                         "moved_bytes_estimate": seconds * bandwidth,
                         "moved_over_must_read": seconds * bandwidth / must_read}
        report(results)
    results["ok"] = True
    return results


# ----------------------------------------------------------------------------------------------------- report
def targets(record: dict, plan: Plan) -> dict:
    """The issue's GPU targets, each True / False, or None when what it needs was not measured."""
    phases = record["phases"]
    rows = {(r["prompt"], r["scenario"]): r for r in phases.get("bench", {}).get("rows", []) if "time_ratio" in r}
    longest, k = plan.prompt_lens[-1], plan.k

    def check(keys, test):
        found = [rows[key] for key in keys if key in rows]
        return all(test(row) for row in found) if len(found) == len(keys) else None

    shared = [(longest, f"sample{k}"), (longest, f"beams{k}")]
    decode = [r["moved_over_must_read"] for r in phases.get("decode_bytes", {}).values()
              if isinstance(r, dict) and "moved_over_must_read" in r]
    parity, logits, bench = phases.get("parity", {}), phases.get("logits", {}), phases.get("bench", {})
    return {
        "kernels exact within tolerance": phases.get("kernels", {}).get("ok"),
        f"generate tokens equal to sdpa ({parity.get('dtype', 'fp32')})": parity.get("ok"),
        f"teacher-forced {logits.get('dtype', 'bf16')} logits within tolerance of sdpa": logits.get("ok"),
        "no Triton compile inside a timed run": bench["compiles_in_timed_runs"] == 0
        if "compiles_in_timed_runs" in bench else None,
        f"n={k} sampling and num_beams={k} at P={longest}: time <= 0.5x": check(shared, lambda r: r["time_ratio"] <= 0.5),
        f"n={k} sampling and num_beams={k} at P={longest}: KV bytes <= 0.2x": check(shared, lambda r: r["kv_ratio"] <= 0.2),
        "greedy batch 1: time <= 1.05x": check([(p, "greedy") for p in plan.prompt_lens],
                                               lambda r: r["time_ratio"] <= 1.05),
        "decode attention moves <= 1.2x what it must read": all(x <= 1.2 for x in decode) if decode else None,
    }


def _versions() -> dict:
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    return versions


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def markdown(record: dict) -> str:
    """A short summary of `record`: phase status, the bench table, bandwidth and the decode bytes ratio."""
    lines = [f"# hf_paged device check: {record['device']} ({record['date']})", "",
             ", ".join(f"{k} {v}" for k, v in record["versions"].items())
             + f"; hf_paged's {record['hf_paged_backend']} path", "", "| phase | ok | seconds | note |",
             "|---|---|---|---|"]
    for name, phase in record["phases"].items():
        note = phase.get("error") or phase.get("skipped") or ""
        if name == "kernels" and "tests" in phase:
            note = f"{phase['tests']} tests, {phase['failures']} failed, {phase['errors']} errors, " \
                   f"{phase['skipped']} skipped"
        lines.append(f"| {name} | {phase.get('ok')} | {phase.get('seconds', 0):.1f} | {note.splitlines()[0] if note else ''} |")
    parity = record["phases"].get("parity", {})
    cases = [f"{name}: {'match' if r.get('match') else 'DIFFER at ' + str(r.get('first_difference'))}"
             for name, r in parity.items() if isinstance(r, dict) and "match" in r]
    if cases:
        lines += ["", f"Parity with sdpa ({parity.get('dtype', 'fp32')} tokens): " + "; ".join(cases)]
    logits = record["phases"].get("logits", {})
    cases = [f"{name}: max |dlogit| {r['max_logit_difference']:.3g} (eager {r['eager_max_logit_difference']:.3g}, "
             f"allowed {r['allowed']:.3g}, logit std {r['logit_std']:.3g}, top-1 agreement {r['top1_agreement']:.3f})"
             for name, r in logits.items() if isinstance(r, dict) and "max_logit_difference" in r]
    if cases:
        lines += ["", f"Teacher-forced {logits.get('dtype')} logits against sdpa (sdpa's tokens forced on every "
                      "side): " + "; ".join(cases)]
    bench = record["phases"].get("bench", {}).get("rows", [])
    if bench:
        lines += ["", "| P | scenario | hf_paged s | sdpa s | time ratio | tok/s hf_paged | tok/s sdpa | "
                      "peak MiB hf_paged | peak MiB sdpa | KV MiB hf_paged | KV MiB sdpa | tokens |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in bench:
            if "time_ratio" not in row:
                lines.append(f"| {row['prompt']} | {row['scenario']} | {row.get('skipped') or row.get('error')} |")
                continue
            a, b = row["hf_paged"], row["sdpa"]
            tokens = "match" if row["tokens_match"] else f"{row['rows_equal']}/{row['rows']} rows equal"
            lines.append(
                f"| {row['prompt']} | {row['scenario']} | {a['seconds']:.3f} | {b['seconds']:.3f} | "
                f"{row['time_ratio']:.2f}x | {a['tokens_per_second']:.0f} | {b['tokens_per_second']:.0f} | "
                f"{_mib(a['peak_above_weights_bytes'])} | {_mib(b['peak_above_weights_bytes'])} | "
                f"{_mib(a['kv_bytes'])} | {_mib(b['kv_bytes'])} | "
                f"{tokens} |"
            )
    steps = [row for row in bench if "time_ratio" in row]
    if steps:
        lines += ["", "Per decode step (medians of the timed run; device time from CUDA events, launches: Triton "
                      "kernels; bandwidth: the bytes the step must read, weights and KV, at the measured copy "
                      "bandwidth, over the step's time):", "",
                  "| P | scenario | impl | host ms | device ms | launches | prefill launches | compiles | "
                  "MiB must read | of copy bandwidth |", "|---|---|---|---|---|---|---|---|---|---|"]

        def cell(value, spec):
            return "-" if value is None else format(value, spec)

        for row in steps:
            for impl in ("hf_paged", "sdpa"):
                r = row[impl]
                lines.append(
                    f"| {row['prompt']} | {row['scenario']} | {impl} | {cell(r['host_ms_per_step'], '.2f')} | "
                    f"{cell(r['device_ms_per_step'], '.2f')} | {cell(r['triton_launches_per_step'], 'g')} | "
                    f"{cell(r['prefill_triton_launches'], 'g')} | {r['compiles']} | "
                    f"{_mib(r['step_must_read_bytes'])} | {cell(r['bandwidth_fraction'], '.0%')} |")
    if record.get("targets"):
        lines += ["", "| target | met |", "|---|---|"]
        lines += [f"| {name} | {'-' if met is None else met} |" for name, met in record["targets"].items()]
    bandwidth = record["phases"].get("bandwidth", {})
    if "bytes_per_second" in bandwidth:
        lines += ["", f"Copy bandwidth: {bandwidth['bytes_per_second'] / 1e9:.0f} GB/s (read + write)."]
    decode = record["phases"].get("decode_bytes", {})
    ratios = [f"{name} {r['moved_over_must_read']:.2f}x" for name, r in decode.items()
              if isinstance(r, dict) and "moved_over_must_read" in r]
    if ratios:
        lines += ["", "Decode attention bytes moved / must read (kernel time x copy bandwidth): " + ", ".join(ratios)]
    return "\n".join(lines) + "\n"


def _device_name(plan: Plan) -> str:
    if plan.device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, dry run)"


def run_phase(name: str, plan: Plan, clock: Clock, args: argparse.Namespace, report=_no_report) -> dict:
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
            model = _build_model(plan.model, replace(plan, dtype=dtype))
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
              "dry": args.dry, "versions": _versions(), "plan": {k: str(v) for k, v in asdict(plan).items()},
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
