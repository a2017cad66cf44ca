"""The prepared device check (`scripts/gpu_check.sh`, `hf_paged.bench.gpu_check`) in its dry mode on the CPU.

The dry run goes through everything the GPU run does (install without network, kernels under the interpreter,
fp32 parity, teacher-forced logits, the split model, bandwidth, bench, decode bytes) on a tiny model; what it
checks is that each phase ran and reported what the GPU run reports, never the timings. The rehearsal runs the
same with hf_paged on its Triton path, the kernels compiled for sm_90 and their launches stubbed
(``tests/rehearsal/fake_cuda.py``); run under the device image's Triton 3.6 and Transformers 5.17 (a venv), it is
the GPU run's dress rehearsal.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_paged.bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def _interpreter_runs_kernels() -> bool:
    """Whether this Triton's interpreter can run the kernels (3.8+); the device image's 3.6 cannot."""
    return gpu_check._interpreter_problem() is None


def _run_check(tmp_path, extra_env: dict | None = None) -> tuple[dict, str, Path]:
    out = tmp_path / "results"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_SECONDS": "480",
           "OMP_NUM_THREADS": "1", **(extra_env or {})}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=700)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text(), out


def _check_record(record: dict, markdown: str) -> None:
    phases = record["phases"]
    assert list(phases) == list(gpu_check.PHASES)
    assert all(phase["ok"] is not False for phase in phases.values()), {k: v.get("error") for k, v in phases.items()}
    kernels = phases["kernels"]
    if _interpreter_runs_kernels():
        assert kernels["ok"] and kernels["tests"] >= 4
        assert kernels["failures"] == kernels["errors"] == kernels["skipped"] == 0
    else:  # Triton 3.6 (the device image's): its interpreter cannot run the kernels, and the check says so
        assert kernels["ok"] is None and "interpreter" in kernels["skipped"]
    parity = phases["parity"]
    assert {"greedy", "greedy_left_padded", "beams4_return2_left_padded", "sample4_seeded",
            "greedy_eos_left_padded"} <= set(parity)
    assert parity["greedy_eos_left_padded"]["match"] and parity["greedy_eos_left_padded"]["peak_used_blocks"] > 0
    assert parity["greedy"]["match"] and parity["greedy"]["max_logit_difference"] < 1e-3
    logits = phases["logits"]
    for case in ("greedy", "greedy_left_padded", "sample4_seeded"):
        assert logits[case]["forced"] and logits[case]["match"], logits[case]
        assert logits[case]["max_logit_difference"] <= logits[case]["allowed"]
    for case in ("greedy", "beams3_return2"):  # layers in memory and offloaded to disk: a pool for each
        assert phases["split"][case]["match"] and phases["split"][case]["pools"] == ["cpu", "cpu"]
    rows = phases["bench"]["rows"]
    assert [(r["prompt"], r["scenario"]) for r in rows] == [
        (p, s) for p in (16, 40) for s in ("greedy", "batch4", "sample4", "beams4")]
    for row in rows:
        assert row["tokens_match"] and row["rows_equal"] == row["rows"] > 0
        for impl in ("hf_paged", "sdpa"):
            measured = row[impl]
            assert measured["seconds"] > 0 and measured["kv_bytes"] > 0
            assert measured["compiles"] == 0 and measured["decode_steps"] > 0 and measured["host_ms_per_step"] > 0
            assert measured["step_must_read_bytes"] > 0 and measured["bandwidth_fraction"] > 0
    assert phases["bench"]["compiles_in_timed_runs"] == 0
    assert phases["bandwidth"]["bytes_per_second"] > 0
    decode = phases["decode_bytes"]
    assert all(decode[name]["must_read_bytes"] > 0 for name in ("greedy", "batch4", "sample4"))
    targets = record["targets"]
    assert len(targets) == 8 and targets["no Triton compile inside a timed run"] is True
    assert targets["generate tokens equal to sdpa (float32)"] is True
    assert targets["kernels exact within tolerance"] is (True if _interpreter_runs_kernels() else None)
    for heading in ("| P | scenario |", "Parity with sdpa", "Teacher-forced", "Per decode step", "Copy bandwidth"):
        assert heading in markdown


@pytest.mark.slow
def test_dry_run_of_the_device_check(tmp_path):
    record, markdown, out = _run_check(tmp_path, {"HF_PAGED_BACKEND": "torch"})
    _check_record(record, markdown)
    assert record["hf_paged_backend"] == "torch"
    assert all(row[impl]["triton_launches_per_step"] in (0, None) for row in record["phases"]["bench"]["rows"]
               for impl in ("hf_paged", "sdpa"))
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8  # what the device tool brings back


@pytest.mark.slow
def test_rehearsal_of_the_gpu_run(tmp_path):
    """The GPU run rehearsed on the CPU: hf_paged on its Triton path with the real kernels compiled for sm_90 and
    launches stubbed (tests/rehearsal/fake_cuda.py), through the whole check as the device runs it. Every kernel
    variant a timed bench row uses must be compiled during its warm-up, and the fake driver's counters must show
    the kernels compiled and launched in the phases' processes."""
    pytest.importorskip("triton.backends.nvidia")
    counts = tmp_path / "counts"
    counts.mkdir()
    rehearsal = str(ROOT / "tests" / "rehearsal")
    path = os.pathsep.join(filter(None, [rehearsal, os.environ.get("PYTHONPATH")]))
    record, markdown, _ = _run_check(tmp_path, {"PYTHONPATH": path, "HF_PAGED_REHEARSAL_COUNTS": str(counts),
                                                "HF_PAGED_BACKEND": "triton"})
    _check_record(record, markdown)
    assert record["hf_paged_backend"] == "triton"
    for row in record["phases"]["bench"]["rows"]:
        assert row["hf_paged"]["triton_launches_per_step"] > 0, row
        assert row["hf_paged"]["prefill_triton_launches"] > 0 and row["sdpa"]["triton_launches_per_step"] == 0
    processes = [json.loads(p.read_text()) for p in counts.glob("*.json")]
    by_phase = {" ".join(p["argv"]): p for p in processes if p.get("patched")}
    launched = collections.Counter()
    for counted in by_phase.values():
        launched.update({key: value for key, value in counted.items() if key.startswith("launches ")})
    for kernel in ("reshape_and_cache_kernel", "paged_attention_kernel", "shared_prefix_kernel",
                   "reduce_splits_kernel", "copy_blocks_kernel"):
        assert launched[f"launches {kernel}"] > 0, launched
    assert sum(p.get("loads", 0) for p in by_phase.values()) > 0


def test_phases_out_of_time_are_skipped_not_run(tmp_path):
    code = gpu_check.main(["--dry", "--out", str(tmp_path), "--budget", "1", "--phases", "kernels,bench"])
    record = json.loads((tmp_path / "results.json").read_text())
    assert code == 1
    assert record["phases"]["kernels"]["skipped"] == "out of time"
    rows = record["phases"]["bench"]["rows"]
    assert len(rows) == 8 and all(row.get("skipped") == "out of time" for row in rows)


def test_isolated_phases_run_in_processes_of_their_own(tmp_path):
    code = gpu_check.main(["--dry", "--isolate", "--out", str(tmp_path), "--phases", "bandwidth,nonsense"])
    record = json.loads((tmp_path / "results.json").read_text())
    assert code == 1
    assert record["phases"]["bandwidth"]["ok"] and record["phases"]["bandwidth"]["bytes_per_second"] > 0
    assert record["phases"]["nonsense"]["error"] == "ValueError: unknown phase 'nonsense'"
    assert "===== bandwidth" in (tmp_path / "phases.log").read_text()
    assert not (tmp_path / "partial.json").exists()  # bandwidth reports no partial results
