"""Tensor parallelism (``tp_plan="auto"`` / ``distributed_config``) under ``torchrun --nproc_per_node 2`` on CPU
with gloo: every rank gives sdpa's tokens, greedy and with beams + ``num_return_sequences``, and each rank's pool
holds only its own KV heads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import config
from transformers import AutoModelForCausalLM

TESTS = Path(__file__).resolve().parent
KV_HEADS = 2


def test_two_cpu_ranks_give_sdpa_tokens(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    torch.manual_seed(0)
    tiny = config("llama", num_key_value_heads=KV_HEADS, max_position_embeddings=128)
    AutoModelForCausalLM.from_config(tiny).save_pretrained(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(TESTS / "tp_worker.py"), str(tmp_path / "model"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in ranks:
        assert result["world"] == 2
        for mode in ("greedy", "beams"):
            assert result[f"hf_paged/{mode}"] == result[f"sdpa/{mode}"], (result["rank"], mode)
            # [L, 2, N, bs, Hkv, D]: this rank's half of the KV heads
            assert result[f"pool/{mode}"][4] == KV_HEADS // 2, result[f"pool/{mode}"]
        assert len(result["hf_paged/beams"]) == 2 * 2  # 2 prompts x num_return_sequences
    assert ranks[0]["hf_paged/greedy"] == ranks[1]["hf_paged/greedy"]
