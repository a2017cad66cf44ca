"""The benchmark command (`python -m hf_paged.bench`) on a tiny random-weight Llama: outputs and bad input.

Never checks timings: only exit codes, the keys of results.json, that the plots exist and the one-line errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_paged.bench import main
from hf_paged.bench.prompts import TEXT, left_pad, token_stream
from hf_paged.bench.runner import paged_attention_registered, prefix_caching_available
from hf_paged.bench.scenarios import SCENARIOS, SLIDING_MODEL

ROW_KEYS = {
    "scenario", "prompt_length", "impl", "status", "reason", "seconds", "seconds_median", "tokens", "tokens_per_s",
    "time_ratio", "kv_bytes", "peak_kv_bytes", "kv_ratio", "used_bytes", "peak_used_bytes", "prefix_hit_tokens",
    "prompt_tokens", "peak_rss_bytes", "tokens_match", "real_tokens", "cache_tokens", "ideal_bytes", "ideal_ratio",
}
SWEEP_KEYS = {"kind", "k", "prompt_length", "impl", "kv_bytes", "peak_kv_bytes", "used_bytes", "seconds"}
QUICK = ["--prompt-lengths", "16", "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads) with a 384-token byte-level BPE tokenizer, saved to disk."""
    path = tmp_path_factory.mktemp("tiny-llama")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator([TEXT], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")
    config = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_prompts_have_exact_lengths_and_left_padding(tiny_model):
    from transformers import AutoTokenizer

    stream = token_stream(AutoTokenizer.from_pretrained(tiny_model), 64)
    (batch,) = SCENARIOS["batch8"].prompts(stream, 64)
    assert [len(p) for p in batch] == [64, 60, 56, 52, 48, 44, 40, 36]
    assert len({tuple(p[:30]) for p in batch}) == 8  # different texts, not prefixes of one another
    inputs = left_pad(batch, pad_token_id=1, device=torch.device("cpu"))
    assert inputs["input_ids"].shape == (8, 64)
    assert inputs["attention_mask"].sum(dim=1).tolist() == [len(p) for p in batch]
    assert inputs["attention_mask"][:, -1].all() and inputs["input_ids"][-1, :28].eq(1).all()
    prefix_calls = SCENARIOS["prefix"].prompts(stream, 64)
    assert all(len(call) == 1 and call[0][:64] == prefix_calls[0][0][:64] for call in prefix_calls)
    assert len({tuple(call[0][64:]) for call in prefix_calls}) == len(prefix_calls)  # distinct suffixes


def test_console_script_points_at_main():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "hf-paged-bench"]
    assert script.value == "hf_paged.bench:main"
    assert script.load() is main


def test_python_dash_m_reports_bad_input_in_one_line(tmp_path):
    """The module entry point in a real subprocess: exit code 2 and a single line on stderr, no traceback."""
    command = [sys.executable, "-m", "hf_paged.bench", "--model", str(tmp_path / "missing")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"hf-paged-bench: error: --model {tmp_path / 'missing'}: not a Transformers checkpoint (no config.json there)"
    ]


def test_command_writes_results_and_plots(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_model), *QUICK, "--sweep-k", "1,2", "--scenarios",
            "greedy,batch8,sample8,beams8_ret4,prefix", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    stdout = capsys.readouterr().out
    assert "scenario" in stdout and "x sdpa" in stdout  # the terminal table

    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"meta", "results", "sweep"}
    assert {"model", "dtype", "prompt_lengths", "new_tokens", "repeats", "notes", "rss_note"} <= set(data["meta"])
    rows = data["results"]
    assert all(set(row) == ROW_KEYS for row in rows)
    by_case = {(row["scenario"], row["impl"]): row for row in rows}
    assert {s for s, _ in by_case} == {"greedy", "batch8", "sample8", "beams8_ret4", "prefix"}
    for scenario in ("greedy", "batch8", "sample8", "beams8_ret4"):
        reference = by_case[scenario, "sdpa"]
        assert reference["status"] == "ok" and reference["kv_bytes"] > 0 and reference["tokens"] > 0
        paged = by_case[scenario, "hf_paged"]
        if paged_attention_registered():
            assert paged["status"] == "ok" and paged["kv_bytes"] > 0 and isinstance(paged["tokens_match"], bool)
    assert by_case["beams8_ret4", "generate_batch"]["status"] == "n/a"
    assert by_case["prefix", "sdpa"]["status"] in ("ok", "skipped")
    if prefix_caching_available() and paged_attention_registered():
        assert by_case["prefix", "hf_paged"]["prefix_hit_tokens"] > 0  # later calls reuse the system prompt
        assert by_case["prefix", "hf_paged"]["tokens_match"] is True
    assert by_case["beams8_ret4", "sdpa"]["tokens"] == 4 * 4  # 4 returned sequences x 4 new tokens

    assert all(set(point) == SWEEP_KEYS for point in data["sweep"])
    assert {(p["kind"], p["k"]) for p in data["sweep"]} == {("beams", 1), ("beams", 2), ("sample", 1), ("sample", 2)}

    for name in ("time_vs_prompt_length.png", "kv_vs_k.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| scenario |" in (out / "results.md").read_text()


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-paged-bench: error:")]
    assert len(lines) == 1
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--scenarios", "greedy,nope"], "unknown scenario 'nope'"),
        (["--model", "/definitely/not/here"], "no config.json"),
        (["--prompt-lengths", "16,x"], "comma-separated integers"),
        (["--repeats", "0"], "positive integer"),
        (["--max-memory", "lots"], "byte size"),
        (["--impls", "sdpa,vllm"], "unknown implementation 'vllm'"),
        (["--device", "nonsense"], "--device nonsense"),
        (["--out", "/proc/version/results"], "--out /proc/version/results"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    assert expected in _error_line(capsys)


def test_missing_model_folder(tmp_path, capsys):
    assert main(["--model", str(tmp_path)]) == 2
    assert "no config.json" in _error_line(capsys)


@pytest.mark.skipif(not paged_attention_registered(), reason="needs the hf_paged attention")
@pytest.mark.parametrize("pool", [["--num-blocks", "1"], ["--max-memory", "1KB"]])
def test_pool_too_small_is_a_one_line_error(tiny_model, pool, capsys):
    argv = ["--model", str(tiny_model), *QUICK, "--prompt-lengths", "32", *pool, "--scenarios", "greedy",
            "--impls", "hf_paged,sdpa", "--sweep-k", "none"]
    assert main(argv) == 2
    assert "block" in _error_line(capsys)


@pytest.mark.skipif(not paged_attention_registered(), reason="needs the hf_paged attention")
def test_prefix_scenario_brackets_hf_paged_runs_with_prefix_caching(tiny_model, tmp_path, monkeypatch, capsys):
    """With a stand-in for ``enable_prefix_caching`` the prefix scenario runs, and turns caching on and off again."""
    import hf_paged

    calls = []
    monkeypatch.setattr(hf_paged, "enable_prefix_caching", lambda model, **kw: calls.append(("on", kw)), raising=False)
    monkeypatch.setattr(hf_paged, "disable_prefix_caching", lambda model: calls.append(("off", {})), raising=False)
    argv = ["--model", str(tiny_model), *QUICK, "--scenarios", "prefix", "--prefix-calls", "3", "--impls",
            "hf_paged,sdpa", "--sweep-k", "none", "--out", str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert calls == [("on", {}), ("off", {})]
    rows = {row["impl"]: row for row in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert rows["hf_paged"]["status"] == rows["sdpa"]["status"] == "ok"
    assert rows["hf_paged"]["tokens"] == rows["sdpa"]["tokens"] == 3 * 4  # 3 calls x 4 new tokens
    assert set(rows) == {"hf_paged", "sdpa"}  # generate_batch was not selected
    assert not (tmp_path / "kv_vs_k.png").exists()  # no sweep, no plot


def test_chat_prompts_wrap_the_text_in_the_template(tiny_model):
    from transformers import AutoTokenizer

    from hf_paged.bench.prompts import chat_wrap

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    assert chat_wrap(tokenizer) is None  # no template: the scenario's prompts are plain text
    tokenizer.chat_template = "{% for m in messages %}<pad>{{ m['content'] }}<eos>{% endfor %}<pad>"
    before, after = chat_wrap(tokenizer)
    assert before[0] == tokenizer.pad_token_id and after[-1] == tokenizer.pad_token_id and len(after) >= 2
    stream = token_stream(tokenizer, 64)
    (batch,) = SCENARIOS["batch8_eos"].prompts(stream, 64, (before, after))
    assert [len(p) for p in batch] == [64, 60, 56, 52, 48, 44, 40, 36]
    assert all(p[: len(before)] == before and p[-len(after):] == after for p in batch)
    assert "summarise" in tokenizer.decode(before).lower()


@pytest.mark.skipif(not paged_attention_registered(), reason="needs the hf_paged attention")
def test_memory_scenarios_sliding_window_and_eos(tiny_model, tmp_path, capsys):
    """The sliding-window model and the left-padded batch stopping at EOS run, match sdpa and report allocated KV."""
    argv = ["--model", str(tiny_model), *QUICK, "--prompt-lengths", "80", "--new-tokens", "8", "--scenarios",
            "batch8_eos,sliding,sliding_beams4", "--impls", "hf_paged,sdpa", "--sweep-k", "none", "--out",
            str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    rows = {(row["scenario"], row["impl"]): row for row in json.loads((tmp_path / "results.json").read_text())["results"]}
    for scenario in ("batch8_eos", "sliding", "sliding_beams4"):
        paged, reference = rows[scenario, "hf_paged"], rows[scenario, "sdpa"]
        assert paged["status"] == reference["status"] == "ok"
        assert paged["tokens_match"] is True
        assert paged["peak_kv_bytes"] >= paged["peak_used_bytes"] >= paged["used_bytes"] > 0  # allocated >= referenced
        assert paged["kv_ratio"] == pytest.approx(paged["peak_kv_bytes"] / reference["peak_kv_bytes"])
    # The sliding model really has sliding windows: its DynamicCache holds less than all 88 tokens in every layer.
    spec = SLIDING_MODEL
    full = spec["num_hidden_layers"] * 88 * 2 * spec["num_key_value_heads"] * spec["head_dim"] * 4  # float32
    assert rows["sliding", "sdpa"]["peak_kv_bytes"] < full
    assert "| batch8_eos |" in (tmp_path / "results.md").read_text()


def test_real_cache_tokens_counts_up_to_eos_of_what_was_fed():
    from hf_paged.bench.runner import real_cache_tokens

    eos, pad = 7, 0
    rows = [[5, 6, 5, 6], [5, eos, pad, pad], [eos, pad, pad, pad], [5, 5, 5, eos]]
    # 4 steps: the last step's token is never fed back, so a row holds at most 3 new tokens.
    assert real_cache_tokens([10, 3, 1, 2], rows, {eos}) == (10 + 3) + (3 + 2) + (1 + 1) + (2 + 3)
    assert real_cache_tokens([10, 3, 1, 2], rows, {eos, 6}) == (10 + 2) + (3 + 2) + (1 + 1) + (2 + 3)
    assert real_cache_tokens([4], [[eos]], {eos}) == 4  # one step: nothing fed back
    with pytest.raises(ValueError, match="hf_paged bench: 1 prompts for 2 generated rows"):
        real_cache_tokens([4], [[1], [2]], {eos})


def test_chat_requests_are_the_requests_in_the_template(tiny_model):
    from transformers import AutoTokenizer

    from hf_paged.bench.prompts import CHAT_REQUESTS, chat_requests

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    plain = chat_requests(tokenizer)  # no template: each request's own tokens
    assert [tokenizer.decode(ids) for ids in plain] == list(CHAT_REQUESTS)
    tokenizer.chat_template = "{% for m in messages %}<pad>{{ m['content'] }}<eos>{% endfor %}<pad>"
    wrapped = chat_requests(tokenizer)
    assert [ids[1:-2] for ids in wrapped] == plain
    assert all(ids[0] == ids[-1] == tokenizer.pad_token_id and ids[-2] == tokenizer.eos_token_id for ids in wrapped)
    assert len(CHAT_REQUESTS) == 8 and len({len(ids) for ids in wrapped}) >= 6  # different lengths
    scenario = SCENARIOS["chat8_eos"]
    assert scenario.prompts([1, 2, 3], 512, None, wrapped) == [wrapped]  # the prompt length does not apply
    with pytest.raises(ValueError, match="chat8_eos"):
        scenario.prompts([1, 2, 3], 512)


@pytest.mark.skipif(not paged_attention_registered(), reason="needs the hf_paged attention")
def test_chat_scenario_reports_allocated_referenced_and_ideal(tiny_model, tmp_path, capsys):
    """`chat8_eos` runs once whatever the prompt lengths, at its longest request, and reports the ideal."""
    from transformers import AutoTokenizer

    from hf_paged.bench.prompts import chat_requests

    lengths = [len(ids) for ids in chat_requests(AutoTokenizer.from_pretrained(tiny_model))]
    argv = ["--model", str(tiny_model), *QUICK, "--prompt-lengths", "16,32", "--new-tokens", "6", "--scenarios",
            "chat8_eos", "--impls", "hf_paged,sdpa", "--sweep-k", "none", "--out", str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    stdout = capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {row["impl"]: row for row in data["results"]}
    assert [row["prompt_length"] for row in data["results"]] == [max(lengths)] * 2
    paged, reference = rows["hf_paged"], rows["sdpa"]
    assert paged["status"] == reference["status"] == "ok" and paged["tokens_match"] is True
    # sdpa's DynamicCache: 8 rows x (longest prompt + 5 fed new tokens); the real tokens exclude the padding.
    assert reference["cache_tokens"] == 8 * (max(lengths) + 5)
    assert sum(lengths) + 8 <= reference["real_tokens"] <= sum(lengths) + 8 * 5
    assert paged["real_tokens"] == reference["real_tokens"] and paged["ideal_bytes"] == reference["ideal_bytes"]
    slots = 8 * (max(lengths) + 5)
    assert reference["ideal_bytes"] == reference["peak_kv_bytes"] * reference["real_tokens"] // slots
    assert paged["peak_kv_bytes"] >= paged["peak_used_bytes"] >= reference["ideal_bytes"]  # allocated, used, ideal
    assert "KV x ideal" in stdout and "KV memory vs the ideal" in (tmp_path / "results.md").read_text()
    line = next(line for line in stdout.split("KV x ideal")[1].splitlines() if line.startswith("chat8_eos"))
    assert f"{paged['peak_kv_bytes'] / reference['ideal_bytes']:.2f}" == line.split()[-1]


# The quality scenario (hf_paged.bench.quality) and the KV implementations it compares (hf_paged.bench.impls).


def _quanto_installed() -> bool:
    from transformers.utils import is_optimum_quanto_available

    return is_optimum_quanto_available()


@pytest.fixture(scope="module")
def llama64():
    """A tiny sdpa Llama of head_dim 64 (quanto's group size divides its keys), the quality functions switch it."""
    from tiny_models import model_pair

    model, _ = model_pair("llama", head_dim=64)
    return model


def _full_segments_nll(model, ids: list[int], segment: int, chunk: int | None = None) -> float:
    """Summed NLL of every token but each segment's first, each segment in one forward without a cache (or, with
    `chunk`, each chunk alone: what a loop that does not read the cache would compute)."""
    model.set_attn_implementation("sdpa")
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), segment):
            piece = torch.tensor([ids[start:start + segment]])
            step = chunk or piece.shape[1]
            logits = torch.cat([model(input_ids=piece[:, s:s + step], use_cache=False).logits[0]
                                for s in range(0, piece.shape[1], step)])
            total -= torch.log_softmax(logits[:-1], -1).gather(1, piece[0, 1:, None]).double().sum().item()
    return total


def test_perplexity_chunks_read_the_cache(llama64):
    """Chunks fed through a cache score the tokens as one forward over the whole segment does, for hf_paged and
    sdpa alike; chunks that did not read the cache would score them differently."""
    from tiny_models import random_ids

    from hf_paged.bench.impls import IMPLS
    from hf_paged.bench.quality import perplexity

    ids = random_ids(1, 200, seed=0)[0].tolist()
    passes = perplexity(llama64, [IMPLS["hf_paged"], IMPLS["sdpa"]], ids, segment=100, chunk=16)
    whole = _full_segments_nll(llama64, ids, 100)
    assert abs(whole - _full_segments_nll(llama64, ids, 100, chunk=16)) > 1.0  # the test can tell the difference
    for name in ("hf_paged", "sdpa"):
        assert passes[name].scored == 2 * 99
        assert passes[name].nll == pytest.approx(whole, rel=1e-5)
    assert torch.equal(torch.cat(passes["hf_paged"].argmax), torch.cat(passes["sdpa"].argmax))
    # sdpa's DynamicCache held the whole first segment: 2 layers x keys and values x 2 KV heads x 100 x 64 x fp32.
    assert passes["sdpa"].segment_kv_bytes == 2 * 2 * 2 * 100 * 64 * 4


def test_quantized_caches_in_the_perplexity_loop(llama64):
    """The 8-bit and quanto caches change the scores a little (their keys and values are read back quantized), and
    an 8-bit pool's bytes are float32's times (D + 2) / 4D: the inline scales are counted."""
    from tiny_models import random_ids

    from hf_paged.bench.impls import IMPLS, kv_dtype_available
    from hf_paged.bench.quality import perplexity

    names = ["hf_paged"] + (["hf_paged-int8", "hf_paged-fp8"] if kv_dtype_available() else [])
    names += ["quanto-int4"] if _quanto_installed() else []
    if len(names) == 1:
        pytest.skip("neither 8-bit hf_paged nor optimum-quanto is available")
    ids = random_ids(1, 300, seed=1)[0].tolist()
    passes = perplexity(llama64, [IMPLS[name] for name in names], ids, segment=300, chunk=32)
    reference = passes["hf_paged"]
    for name in names[1:]:
        assert passes[name].nll != reference.nll  # really quantized
        assert passes[name].nll == pytest.approx(reference.nll, rel=0.02)
    for name in ("hf_paged-int8", "hf_paged-fp8"):
        if name in passes:
            assert passes[name].segment_kv_bytes * 4 * 64 == reference.segment_kv_bytes * (64 + 2)


@pytest.mark.skipif(not _quanto_installed(), reason="needs optimum-quanto")
def test_cache_bytes_count_quantos_payload_scales_and_residual(llama64):
    """A QuantizedCache's bytes: 4-bit codes packed two a byte, a float32 scale and shift per group of 64, and the
    full-precision residual keys and values."""
    from hf_paged.bench.impls import IMPLS, cache_bytes, new_cache

    cache = new_cache(IMPLS["quanto-int4"], llama64)
    states = torch.randn(1, 2, 192, 64)
    for layer in range(2):
        cache.update(states, states, layer)  # the first update quantizes all 192 tokens
    packed = 2 * 192 * 64 // 2 + 2 * 192 * 64 // 64 * 4 * 2  # per tensor: codes, scales and shifts
    assert cache_bytes(cache) == 2 * 2 * packed
    for layer in range(2):
        cache.update(states[:, :, :5], states[:, :, :5], layer)  # 5 tokens wait in the residual, in float32
    assert cache_bytes(cache) == 2 * 2 * (packed + 2 * 5 * 64 * 4)


@pytest.mark.skipif(not _quanto_installed(), reason="needs optimum-quanto")
def test_quanto_refusals_are_transformers_own(llama64):
    from hf_paged.bench.impls import IMPLS, unavailable

    assert unavailable(IMPLS["quanto-int4"], llama64) is None
    assert "has to be one of [`2`, `4`] but got 8" in unavailable(IMPLS["quanto-int8"], llama64)


def test_corpus_is_fixed_and_described(tiny_model):
    import hashlib

    from transformers import AutoTokenizer

    from hf_paged.bench.quality import corpus, corpus_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    first, again = corpus(tokenizer, 20480), corpus(tokenizer, 20480)
    assert first == again and len(first.ids) == 20480
    assert first.ids == tokenizer(corpus_text(), add_special_tokens=False)["input_ids"][:20480]
    assert first.sha256 == hashlib.sha256(",".join(map(str, first.ids)).encode()).hexdigest()
    assert corpus(tokenizer, 100).sha256 != first.sha256
    assert set(first.describe()) == {"tokens", "source", "python", "characters", "sha256"}
    with pytest.raises(ValueError, match="fewer than the 10000000 asked for"):
        corpus(tokenizer, 10_000_000)


QUALITY_ROW_KEYS = {
    "impl", "status", "reason", "perplexity", "perplexity_ratio", "scored_tokens", "top1_agreement", "requests",
    "identical", "identical_fraction", "mean_agreeing_tokens", "mean_tokens", "seconds", "time_ratio",
    "segment_kv_bytes", "kv_ratio",
}


def test_quality_scenario_command(tiny_model, tmp_path, capsys):
    """``--scenarios quality`` (not in the default set) runs every quality impl against unquantized hf_paged and
    writes its rows, its corpus and the 8-bit targets."""
    from hf_paged.bench.impls import kv_dtype_available
    from hf_paged.bench.scenarios import DEFAULT_SCENARIOS

    assert "quality" not in DEFAULT_SCENARIOS
    argv = ["--model", str(tiny_model), "--threads", "1", "--scenarios", "quality", "--quality-tokens", "130",
            "--quality-segment", "65", "--quality-chunk", "16", "--new-tokens", "3", "--out", str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert "top-1 agree" in capsys.readouterr().out
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["results"] == [] and data["quality"]["corpus"]["tokens"] == 130
    rows = {row["impl"]: row for row in data["quality"]["rows"]}
    assert list(rows) == ["hf_paged", "hf_paged-int8", "hf_paged-fp8", "sdpa", "quanto-int4", "quanto-int2",
                          "quanto-int8"]
    assert all(set(row) == QUALITY_ROW_KEYS for row in rows.values())
    reference, sdpa = rows["hf_paged"], rows["sdpa"]
    assert reference["perplexity_ratio"] == 1.0 and reference["top1_agreement"] == 1.0
    assert reference["scored_tokens"] == 2 * 64 and reference["requests"] == reference["identical"] == 8
    assert sdpa["perplexity_ratio"] == pytest.approx(1.0, rel=1e-5) and sdpa["top1_agreement"] >= 0.99
    assert rows["quanto-int8"]["status"] == "n/a"
    if kv_dtype_available():
        assert rows["hf_paged-int8"]["status"] == "ok" and rows["hf_paged-int8"]["kv_ratio"] < 0.5
        assert {line["impl"] for line in data["targets"]} == {"hf_paged-int8", "hf_paged-fp8"}
    assert "## Quality of quantized KV caches" in (tmp_path / "results.md").read_text()


@pytest.mark.skipif(not paged_attention_registered(), reason="needs the hf_paged attention")
def test_generate_scenarios_with_quantized_kv(tiny_model, tmp_path, capsys):
    """hf_paged-int8 / -fp8 and quanto-int4 run the generate() scenarios beside hf_paged and sdpa; an 8-bit pool
    allocates float32's bytes times (D + 2) / 4D (its scales inline), quanto-int4 less than sdpa."""
    from hf_paged.bench.impls import kv_dtype_available

    impls = ["hf_paged", "sdpa"] + (["hf_paged-int8", "hf_paged-fp8"] if kv_dtype_available() else [])
    impls += ["quanto-int4"] if _quanto_installed() else []
    argv = ["--model", str(tiny_model), *QUICK, "--prompt-lengths", "32", "--scenarios", "greedy,beams8",
            "--impls", ",".join(impls), "--out", str(tmp_path)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    rows = {(row["scenario"], row["impl"]): row for row in data["results"]}
    head_dim = 64 // 4
    for scenario in ("greedy", "beams8"):
        assert {impl for s, impl in rows if s == scenario} == set(impls)
        assert all(rows[scenario, impl]["status"] == "ok" for impl in impls)
        for impl in ("hf_paged-int8", "hf_paged-fp8"):
            if impl in impls:
                assert rows[scenario, impl]["peak_kv_bytes"] * 4 * head_dim == (
                    rows[scenario, "hf_paged"]["peak_kv_bytes"] * (head_dim + 2))
        if "quanto-int4" in impls:
            assert 0 < rows[scenario, "quanto-int4"]["peak_kv_bytes"] < rows[scenario, "sdpa"]["peak_kv_bytes"]
    if kv_dtype_available():
        assert any(line["target"].startswith("greedy P=32: KV") for line in data["targets"])
