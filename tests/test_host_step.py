"""The host cost of a decode step: the transfer counter (`hf_paged.bench.transfers`), the launch-stub device
(`hf_paged.bench.stub_device`) and the bench's ``host`` scenario at a tiny size. Never checks timings."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os

import torch
from conftest import make_pair

from hf_paged.bench import main, stub_device
from hf_paged.bench.host import HOST_IMPLS, HostRow
from hf_paged.bench.transfers import D2H, H2D, TransferCounter

HOST_ROW_KEYS = {field.name for field in dataclasses.fields(HostRow)}
SOURCE_KEYS = {"kind", "site", "function", "hf_paged", "per_step", "ops"}


class _Step(torch.nn.Module):
    """A forward whose host traffic is known: one line per event, tagged by a comment."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(4))

    def forward(self, input_ids):
        x = self.weight * 2
        host = torch.tensor([1, 2, 3])  # a host tensor: no event
        host.tolist()  # reading a host tensor: no event
        lengths = host.to(x.device)  # EVENT H2D to
        ids = torch.tensor([4, 5], device=x.device)  # EVENT H2D tensor
        torch.tensor([], device=x.device)  # empty: nothing crosses, no event
        x.tolist()  # EVENT D2H tolist
        if bool(x.sum() > 0):  # EVENT D2H __bool__
            pass
        x.cpu().tolist()  # EVENT D2H cpu (then a host read: no event)
        return x + lengths.sum() + ids.sum()


def _tagged_lines() -> dict[str, int]:
    lines, first = inspect.getsourcelines(_Step.forward)
    return {line.split("# EVENT ")[1].strip(): first + offset for offset, line in enumerate(lines)
            if "# EVENT " in line}


def test_counter_counts_and_places_known_events():
    model = _Step()
    with TransferCounter(model) as counter:
        for tokens in (5, 1, 1, 1, 1):  # a prefill, then four one-token steps: three whole decode steps
            model(torch.zeros(1, tokens, dtype=torch.long))
    summary = counter.summary()
    assert counter.emulate and summary.decode_steps == 3
    assert (summary.d2h, summary.h2d) == (3, 2)
    assert summary.d2h_hf_paged == summary.h2d_hf_paged == 0  # this file is not hf_paged's code
    assert (summary.prefill_d2h, summary.prefill_h2d) == (3, 2) and summary.setup_d2h == summary.setup_h2d == 0
    here = os.path.basename(__file__)
    found = {(s.kind, s.site.rsplit("/", 1)[-1], tuple(s.ops)): s.per_step for s in summary.sources}
    expected = {(kind, f"{here}:{line}", (op,)): 1.0 for tag, line in _tagged_lines().items()
                for kind, op in [tag.split()[:2]]}
    assert found == expected
    assert all(s.function == "forward" and not s.hf_paged for s in summary.sources)


def test_counter_without_emulation_sees_cpu_tensors_as_host():
    model = _Step()
    with TransferCounter(model, emulate=False) as counter:
        for tokens in (5, 1, 1):
            model(torch.zeros(1, tokens, dtype=torch.long))
    summary = counter.summary()
    assert summary.decode_steps == 1 and summary.d2h == summary.h2d == 0 and not summary.sources


def test_counter_keeps_hf_paged_events_apart_in_generate():
    reference, paged = make_pair("llama")
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    summaries = {}
    for name, model in (("sdpa", reference), ("hf_paged", paged)):
        with TransferCounter(model) as counter:
            model.generate(ids, **kwargs)
        summaries[name] = counter.summary()
    sdpa, ours = summaries["sdpa"], summaries["hf_paged"]
    assert sdpa.decode_steps == ours.decode_steps == 3
    assert sdpa.d2h >= 1  # generate's stopping criteria read the unfinished rows every step
    assert sdpa.d2h_hf_paged == sdpa.h2d_hf_paged == 0
    assert ours.h2d_hf_paged > 0 and ours.d2h >= ours.d2h_hf_paged and ours.h2d >= ours.h2d_hf_paged
    mine = [s for s in ours.sources if s.hf_paged]
    assert mine and all(s.site.startswith("hf_paged/") and not s.site.startswith("hf_paged/bench/") for s in mine)
    assert all(s.site.split(":")[-1].isdigit() for s in ours.sources)
    assert {s.kind for s in ours.sources} <= {D2H, H2D}


def test_stub_device_accepts_cpu_tensors_only_where_all_are():
    checked = stub_device.accept_cpu(lambda **tensors: "original")
    assert checked(a=torch.zeros(1), b=None) == torch.device("cpu")
    assert checked(a=torch.zeros(1, device="meta")) == "original"
    assert stub_device.accept_cpu(checked) is checked
    assert stub_device.problem() is None or isinstance(stub_device.problem(), str)


def test_host_scenario_end_to_end(tmp_path, capsys):
    """The real scenario's path (its own process, the launch-stub device) at a tiny size: every field reported."""
    argv = ["--scenarios", "host", "--prompt-lengths", "16", "--new-tokens", "5", "--repeats", "1", "--warmup", "0",
            "--host-layers", "2", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    stdout = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"] == [] and data["sweep"] == [] and data["meta"]["host_model"]["num_hidden_layers"] == 2
    rows = data["host"]
    assert [(r["batch"], r["impl"]) for r in rows] == [(b, impl) for b in (1, 8) for impl in HOST_IMPLS]
    stub = stub_device.problem() is None
    for row in rows:
        assert set(row) == HOST_ROW_KEYS and row["prompt_length"] == 16 and row["new_tokens"] == 5
        if row["impl"] == "hf_paged-triton-stub" and not stub:
            assert row["status"] == "n/a" and "launch-stub" in row["reason"]
            continue
        assert row["status"] == "ok", row
        assert row["decode_steps"] == 3 and row["step_ms"] > 0 and row["forward_ms"] > 0
        assert len(row["step_ms_runs"]) == 1 and row["time_ratio"] > 0 and row["compiles"] == 0
        assert row["d2h"] >= 1 and row["h2d"] >= row["h2d_hf_paged"] >= 0 and row["d2h"] >= row["d2h_hf_paged"]
        assert None not in (row["setup_d2h"], row["setup_h2d"], row["prefill_d2h"], row["prefill_h2d"])
        assert row["sources"] and all(set(source) == SOURCE_KEYS for source in row["sources"])
        if row["impl"] == "sdpa":
            assert row["time_ratio"] == 1 and row["d2h_hf_paged"] == row["h2d_hf_paged"] == 0
        else:
            assert row["h2d_hf_paged"] > 0 and any(source["hf_paged"] for source in row["sources"])
        if row["impl"] == "hf_paged-triton-stub":
            assert row["launches"] > 0  # the kernels were launched (stubbed) in every decode step
        elif row["launches"] is not None:
            assert row["launches"] == 0
    markdown = (tmp_path / "results.md").read_text()
    assert "## Host cost of a decode step" in markdown and "| 16 | 8 | hf_paged-torch |" in markdown
    assert "hf_paged/" in stdout and "step ms" in stdout  # the sources name the files of hf_paged


def test_host_scenario_runs_on_the_cpu_only(capsys):
    assert main(["--scenarios", "host", "--device", "meta"]) == 2
    assert "host scenario runs on the CPU" in capsys.readouterr().err
