"""The device check's timed phases (`hf_paged.bench.gpu_check`): the copy bandwidth, the bench table (time, memory,
per decode step host and device time, launches and bytes) and the bytes decode attention moves."""

from __future__ import annotations

import re
import time

import torch

from hf_paged.bench.gpu_plan import Clock, Plan, no_report, prompt_ids, sync
from hf_paged.bench.impls import set_attention
from hf_paged.bench.steps import StepRecorder

__all__ = ["phase_bandwidth", "phase_bench", "phase_decode_bytes"]


# Decode-attention kernels, as the profiler names them (Triton kernels by function name; the CPU path's fused op).
ATTENTION_KERNELS = re.compile(r"attention|cascade|prefix|reduce_splits|merge", re.IGNORECASE)


NOT_ATTENTION = re.compile(r"reshape_and_cache|copy_blocks", re.IGNORECASE)


def phase_bandwidth(plan: Plan) -> dict:
    source = torch.empty(plan.copy_bytes, dtype=torch.uint8, device=plan.device)
    target = torch.empty_like(source)
    target.copy_(source)
    sync(plan.device)
    repeats = 10
    start = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    sync(plan.device)
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


def phase_bench(plan: Plan, clock: Clock, model, bandwidth: float | None = None, report=no_report) -> dict:
    from hf_paged.bench.runner import Runner

    runner = Runner(model, pad_token_id=0, seed=0)
    stream = prompt_ids(model.config.vocab_size, 4096, 99)
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
                    sync(plan.device)
                    with StepRecorder(model, device_events=events) as steps:
                        run = runner.run(impl, scenario, calls, plan.new_tokens)
                    sync(plan.device)
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
        sync(plan.device)
    total_us = 0.0
    for event in prof.key_averages():
        if ATTENTION_KERNELS.search(event.key) and not NOT_ATTENTION.search(event.key):
            if plan.device == "cuda":
                total_us += getattr(event, "self_device_time_total", None) or event.self_cuda_time_total
            else:
                total_us += event.self_cpu_time_total
    return total_us * 1e-6


def phase_decode_bytes(plan: Plan, clock: Clock, model, bandwidth: float, report=no_report) -> dict:
    from hf_paged.bench.prompts import left_pad
    from hf_paged.bench.runner import LIBRARY_BLOCK_SIZE

    set_attention(model, "hf_paged")
    config = model.config
    bytes_per_key = _bytes_per_key(config, plan.dtype)
    length, new, k = plan.prompt_lens[-1], plan.new_tokens, plan.k
    vocab = config.vocab_size
    shared = length // LIBRARY_BLOCK_SIZE * LIBRARY_BLOCK_SIZE  # the prompt's full blocks, read once for all k rows
    cases = {
        "greedy": ([prompt_ids(vocab, length, 5)], {}, lambda j: length + j),
        f"batch{plan.batch}": ([prompt_ids(vocab, length, 50 + i) for i in range(plan.batch)], {},
                               lambda j: plan.batch * (length + j)),
        f"sample{k}": ([prompt_ids(vocab, length, 6)], {"do_sample": True, "num_return_sequences": k},
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
