"""The prepared device check (`scripts/gpu_check.sh`, `hf_paged.bench.gpu_check`) in its dry mode on the CPU.

The dry run goes through everything the GPU run does (install without network, kernels under the interpreter,
parity, the split model, bandwidth, bench, decode bytes) on a tiny model; what it checks is that each phase ran and
reported what the GPU run reports, never the timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_paged.bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_dry_run_of_the_device_check(tmp_path):
    out = tmp_path / "results"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "GPU_CHECK_SECONDS": "420",
           "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    record = json.loads((out / "results.json").read_text())
    phases = record["phases"]
    assert list(phases) == ["kernels", "parity", "split", "bandwidth", "bench", "decode_bytes"]
    assert all(phase["ok"] for phase in phases.values()), {k: v.get("error") for k, v in phases.items()}
    kernels = phases["kernels"]
    assert kernels["tests"] >= 4 and kernels["failures"] == kernels["errors"] == kernels["skipped"] == 0
    parity = phases["parity"]
    assert {"greedy", "greedy_left_padded", "beams4_return2_left_padded", "sample4_seeded",
            "greedy_eos_left_padded"} <= set(parity)
    assert parity["greedy_eos_left_padded"]["match"] and parity["greedy_eos_left_padded"]["peak_used_blocks"] > 0
    assert parity["greedy"]["match"] and parity["greedy"]["max_logit_difference"] < 1e-3
    for case in ("greedy", "beams3_return2"):  # layers in memory and offloaded to disk: a pool for each
        assert phases["split"][case]["match"] and phases["split"][case]["pools"] == ["cpu", "cpu"]
    rows = phases["bench"]["rows"]
    assert [(r["prompt"], r["scenario"]) for r in rows] == [
        (p, s) for p in (16, 40) for s in ("greedy", "batch4", "sample4", "beams4")]
    for row in rows:
        assert row["tokens_match"] and row["rows_equal"] == row["rows"] > 0
        for impl in ("hf_paged", "sdpa"):
            assert row[impl]["seconds"] > 0 and row[impl]["kv_bytes"] > 0
    assert phases["bandwidth"]["bytes_per_second"] > 0
    decode = phases["decode_bytes"]
    assert all(decode[name]["must_read_bytes"] > 0 for name in ("greedy", "batch4", "sample4"))
    assert len(record["targets"]) == 6 and record["targets"]["kernels exact within tolerance"] is True
    markdown = (out / "results.md").read_text()
    assert "| P | scenario |" in markdown and "Parity with sdpa" in markdown and "Copy bandwidth" in markdown


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
    assert (tmp_path / "logs" / "bandwidth.log").exists() and (tmp_path / "logs" / "bandwidth.json").exists()
