"""A decode step a GPU can afford: on the Triton path, hf_paged's own code reads nothing back from the device and
sends at most one host-to-device copy per decode step (the step's tables, lengths, slots, key starts and copies in
one flat buffer, `hf_paged.step.build_step`).

The models run in a subprocess on the launch-stub device (`hf_paged.bench.stub_device`: the kernels compiled for
sm_90, every launch a no-op, because it replaces Triton's driver for the whole process), under the bench's transfer
counter (`hf_paged.bench.transfers.TransferCounter`, which emulates a device on the CPU and attributes each event to
its file:line). The stubbed attention leaves its output unwritten: the script zeroes it, so that sampling and beam
search see finite logits. Never checks timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import json
import os
import sys

import torch

sys.path.insert(0, sys.argv[1])  # the tests folder: conftest's tiny models
from hf_paged.bench import stub_device

reason = stub_device.problem()
if reason is not None:
    print(json.dumps({"skip": reason}))
    sys.exit(0)
stub_device.install()
os.environ["HF_PAGED_BACKEND"] = "triton"

from tiny_models import left_padded_batch, model_pair

from hf_paged import PagedCache, backend
from hf_paged.bench.transfers import TransferCounter
from hf_paged.compat import cache_kwargs

kernels = backend.kernels()
for name in ("paged_attention", "shared_prefix_paged_attention"):
    def zeroed(*args, _launch=getattr(kernels, name), **kwargs):  # the stub computes nothing: no NaN garbage
        return _launch(*args, **kwargs).zero_()
    setattr(kernels, name, zeroed)

CASES = {
    "llama-greedy-1": ("llama", [9], dict(do_sample=False)),
    "llama-greedy-padded": ("llama", [13, 6, 9, 11], dict(do_sample=False)),
    "llama-sampling": ("llama", [7, 10], dict(do_sample=True, num_return_sequences=3, top_k=20)),
    "llama-beams": ("llama", [7, 10], dict(num_beams=3, num_return_sequences=2)),
    "gemma2-greedy-padded": ("gemma2", [13, 6], dict(do_sample=False)),
}
results = {}
torch.manual_seed(0)
for case, (family, lengths, kwargs) in CASES.items():
    _, paged = model_pair(family)
    inputs = left_padded_batch(lengths, seed=3)
    cache = PagedCache(paged.config, block_size=4)  # small blocks: the pool grows (new slabs) while decoding
    with TransferCounter(paged) as counter, torch.no_grad():
        paged.generate(**inputs, **cache_kwargs(cache), max_new_tokens=12, min_new_tokens=12, **kwargs)
    summary = counter.summary(top=20)
    results[case] = {
        "decode_steps": summary.decode_steps, "d2h_hf_paged": summary.d2h_hf_paged,
        "h2d_hf_paged": summary.h2d_hf_paged, "launches": summary.launches,
        "sources": [{"kind": s.kind, "site": s.site, "function": s.function, "per_step": s.per_step}
                    for s in summary.sources if s.hf_paged],
        "slabs": len(cache.pool.slabs),
    }
print(json.dumps(results))
'''

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    script = tmp_path_factory.mktemp("transfers") / "decode_transfers.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "HF_PAGED_BACKEND")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(script), TESTS], cwd=script.parent, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    if "skip" in results:
        pytest.skip(f"the launch-stub device cannot run here: {results['skip']}")
    return results


@pytest.mark.parametrize("case", ["llama-greedy-1", "llama-greedy-padded", "llama-sampling", "gemma2-greedy-padded"])
def test_decode_step_reads_nothing_back_and_copies_once(counted, case):
    """Greedy and sampled decoding, one row or left-padded rows, shared prompts (the shared-prefix kernel), a
    sliding window with softcap: no D2H read in hf_paged's code, at most one H2D copy per decode step."""
    result = counted[case]
    assert result["decode_steps"] >= 8 and result["launches"] > 0 and result["slabs"] >= 2
    assert result["d2h_hf_paged"] == 0, result["sources"]
    assert result["h2d_hf_paged"] <= 1, result["sources"]
    assert all(source["site"].startswith("hf_paged/step.py:") for source in result["sources"]), result["sources"]


def test_beam_search_reads_only_the_beam_indices(counted):
    """Beam search remaps the rows' block tables on the host, so it reads generate's beam indices once per step
    (`PagedCache.reorder_cache`); the copy-on-write copies of shared blocks travel in the step's one copy."""
    result = counted["llama-beams"]
    assert result["decode_steps"] >= 8
    reads = [source for source in result["sources"] if source["kind"] == "D2H"]
    assert result["d2h_hf_paged"] <= 1 and all(source["function"] == "reorder_cache" for source in reads), reads
    assert result["h2d_hf_paged"] <= 1, result["sources"]
