"""The device check's report (`hf_paged.bench.gpu_check`): which of the issue's GPU targets a record meets, and the
short Markdown summary written beside ``results.json`` after every phase."""

from __future__ import annotations

import platform

import torch

__all__ = ["markdown", "targets", "versions"]


def targets(record: dict, plan) -> dict:
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


def versions() -> dict:
    """The versions a record was measured with."""
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
