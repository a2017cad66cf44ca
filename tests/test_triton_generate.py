"""A whole ``model.generate()`` through the Triton kernels, on CPU, under Triton's interpreter.

``HF_PAGED_BACKEND=triton`` sends every paged op of ``"hf_paged"`` to ``hf_paged.kernels`` and ``TRITON_INTERPRET=1``
lets those kernels run on CPU tensors. Both must be set before ``hf_paged.kernels`` is imported, and must not leak
into this process, so the models run in a subprocess. That script counts the calls of each launcher
(``reshape_and_cache``, ``paged_attention``, ``shared_prefix_paged_attention``, ``copy_blocks``) and of the PyTorch
fallbacks, and compares tokens and logits with Transformers' own attention (``sdpa``; ``eager`` for Gemma2's softcap)
on tiny random-weight models with left-padded prompts, for greedy search, beam search and seeded sampling with
``num_return_sequences``. In the last two the rows of a prompt share its blocks, and decoding must read them once
per prompt through ``shared_prefix_paged_attention``. With prefix caching, a second call maps the first call's
system-prompt blocks in every layer group and its prefill reads them through the paged kernel; a third maps them
into rows with different numbers of whole pad blocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import needs_triton_interpreter

pytestmark = needs_triton_interpreter

SCRIPT = r'''
import copy
import json
import os
import sys
from pathlib import Path

assert os.environ["TRITON_INTERPRET"] == "1" and os.environ["HF_PAGED_BACKEND"] == "triton"

import torch
from transformers import AutoModelForCausalLM, Gemma2Config, GptOssConfig, Llama4TextConfig, LlamaConfig

import hf_paged
from hf_paged import PagedCache, backend, ops
from hf_paged.compat import cache_kwargs

kernels = backend.kernels()
assert kernels is not None and kernels.__name__ == "hf_paged.kernels", kernels
calls = {}


def count(module, name, key):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[key] = calls.get(key, 0) + 1
        return original(*args, **kwargs)

    setattr(module, name, counted)


# The launchers backend.py dispatches to, and every PyTorch path the attention function could fall back to.
for name in ("reshape_and_cache", "paged_attention", "shared_prefix_paged_attention", "copy_blocks"):
    count(kernels, name, name)
for name in ("reshape_and_cache", "paged_attention", "copy_blocks", "gather_kv", "shared_prefix_attention",
             "shared_prefix_paged_attention", "window_attention"):
    count(ops, name, "ops." + name)

VOCAB = 96
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": (LlamaConfig(**COMMON, initializer_range=0.1), "sdpa"),
    "gemma2": (Gemma2Config(**COMMON, head_dim=16, sliding_window=6, attn_logit_softcapping=5.0,
                            final_logit_softcapping=3.0, query_pre_attn_scalar=24), "eager"),
    # attention sinks on a sliding layer and a full one; chunked attention (chunks of 4) on layer 0
    "gpt_oss": (GptOssConfig(**COMMON, head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=6,
                             layer_types=["sliding_attention", "full_attention"]), "eager"),
    "llama4_text": (Llama4TextConfig(**COMMON, head_dim=16, intermediate_size_mlp=64, num_local_experts=2,
                                     attention_chunk_size=4, no_rope_layers=[1, 0]), "eager"),
}
try:  # Gemma 4 (5.17+) with KV sharing: layers 2-3 read layers 0-1's pools, and a prefill gives them one query
    from transformers.models.gemma4 import Gemma4TextConfig

    CONFIGS["gemma4_shared"] = (Gemma4TextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=16, global_head_dim=32,
                                                 hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB,
                                                 sliding_window=6, num_kv_shared_layers=2,
                                                 layer_types=["sliding_attention", "full_attention"] * 2), "eager")
except ImportError:
    pass
MODES = {
    "greedy": dict(do_sample=False),
    "beams": dict(num_beams=3, num_return_sequences=2, length_penalty=0.7, early_stopping=True),
    "sampling": dict(do_sample=True, num_return_sequences=3, top_k=20),
}
NEW_TOKENS = int(sys.argv[3])


def pair(family):
    config, reference_attention = CONFIGS[family]
    torch.manual_seed(0)
    # Each model gets its own config: from_config writes the attention implementation into it.
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference_attention)
    paged = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="hf_paged")
    assert reference.config._attn_implementation == reference_attention
    assert paged.config._attn_implementation == "hf_paged"
    state = reference.state_dict()
    for name in state:
        if name.endswith("sinks"):  # initialised near 0: make them matter
            state[name].copy_(torch.randn_like(state[name]))
    reference.load_state_dict(state)
    paged.load_state_dict(state)
    for model in (reference, paged):
        model.eval()
        model.generation_config.pad_token_id = 0
    return reference, paged


def prompts(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        input_ids[row, width - length:] = torch.randint(3, VOCAB, (length,), generator=generator)
        attention_mask[row, width - length:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def generate(model, inputs, **kwargs):
    torch.manual_seed(0)  # the same draws for both models when sampling
    kwargs.setdefault("min_new_tokens", NEW_TOKENS)
    kwargs.setdefault("output_logits", True)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True, **kwargs)


results = {}
for family in sys.argv[2].split(","):
    reference, paged = pair(family)
    # Unequal left-padded rows; 11 tokens fill 2 blocks of 5 and start a third, so beams share a partial block.
    inputs = prompts([11, 4, 8], seed=1)
    # Greedy with EOS: the token row 1 generates second ends it there; in a cache the call drops, its padding then
    # goes to the scratch block and its blocks go back to the pool (a cache that outlives the call keeps them).
    eos = int(generate(reference, inputs, do_sample=False).sequences[1, 12])
    modes = {**MODES, "greedy_eos": dict(do_sample=False, min_new_tokens=0, eos_token_id=eos, output_logits=False)}
    if "prefix" in sys.argv[4].split(","):
        # Calls sharing a 15-token system prompt (3 blocks of 5), with prefix caching: the second maps them. The
        # third batches a longer new prompt with the first one left-padded by a whole block: the new row maps the
        # system prompt's 3 blocks, the padded row its own first 2 after a null entry.
        hf_paged.enable_prefix_caching(paged, block_size=5)
        generator = torch.Generator().manual_seed(2)
        system = torch.randint(3, VOCAB, (1, 15), generator=generator)
        first, second, longer = (torch.cat([system, torch.randint(3, VOCAB, (1, suffix), generator=generator)], dim=1)
                                 for suffix in (3, 4, 8))
        padded = torch.nn.functional.pad(first, (longer.shape[1] - first.shape[1], 0))
        batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)} for ids in (first, second)]
        batches.append({"input_ids": torch.cat([longer, padded]), "attention_mask": torch.cat([torch.ones_like(longer),
                                                                                               (padded != 0).long()])})
        for call, prefix_inputs in enumerate(batches):
            expected = generate(reference, prefix_inputs, do_sample=False)
            calls.clear()
            got = generate(paged, prefix_inputs, do_sample=False)
            got.past_key_values.manager.check()
            results[f"{family}-prefix{call}"] = {
                "calls": dict(calls),
                "same_tokens": torch.equal(got.sequences, expected.sequences),
                "hit": got.past_key_values.stats().prefix_hit_tokens,
                "max_logit_diff": (torch.stack(got.logits) - torch.stack(expected.logits)).abs().max().item(),
            }
            del got
        hf_paged.disable_prefix_caching(paged)
    for mode in sys.argv[4].split(","):
        if mode == "prefix":
            continue
        kwargs = modes[mode]
        expected = generate(reference, inputs, **kwargs)
        calls.clear()
        if mode.endswith("eos"):
            # The cache generate builds and drops: the ended row gives its blocks back (see recorded_stats).
            hf_paged.generation._new_cache = lambda model: PagedCache(model.config, block_size=5)
            torch.manual_seed(0)
            with torch.no_grad(), hf_paged.recorded_stats() as recorded:
                got = paged.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=0, do_sample=False,
                                     eos_token_id=eos)
            kept = generate(paged, inputs, **cache_kwargs(PagedCache(paged.config, block_size=5)), **kwargs)
            kept.past_key_values.manager.check()
            results[f"{family}-{mode}"] = {
                "calls": dict(calls),
                "same_tokens": torch.equal(got, expected.sequences) and torch.equal(kept.sequences, got),
                "shape": list(got.shape),
                "max_logit_diff": 0.0,
                "released": recorded[0].peak_used_blocks < kept.past_key_values.stats().peak_used_blocks,
            }
            continue
        cache = PagedCache(paged.config, block_size=5)
        got = generate(paged, inputs, **cache_kwargs(cache), **kwargs)
        assert got.past_key_values is cache
        cache.manager.check()
        results[f"{family}-{mode}"] = {
            "calls": dict(calls),
            "same_tokens": torch.equal(got.sequences, expected.sequences),
            "shape": list(got.sequences.shape),
            "max_logit_diff": 0.0 if expected.logits is None else
            (torch.stack(got.logits) - torch.stack(expected.logits)).abs().max().item(),
        }
print(json.dumps(results))
'''

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW_TOKENS = 6


def run_script(tmp_path, families: list[str], modes: list[str]) -> dict:
    pytest.importorskip("triton")
    script = tmp_path / "triton_generate.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # This checkout first (not another one an editable install may point to), and no rehearsal sitecustomize.
    env.update(TRITON_INTERPRET="1", HF_PAGED_BACKEND="triton", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, str(script), ROOT, ",".join(families), str(NEW_TOKENS), ",".join(modes)],
                         cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_generate_runs_through_the_triton_kernels(tmp_path):
    modes = ["greedy", "beams", "sampling", "greedy_eos"]
    results = run_script(tmp_path, ["llama", "gemma2"], modes)
    assert set(results) == {f"{family}-{mode}" for family in ("llama", "gemma2") for mode in modes}
    for case, result in results.items():
        calls = result["calls"]
        attention = calls.get("paged_attention", 0) + calls.get("shared_prefix_paged_attention", 0)
        # Gemma2's sliding-window layer (window 6) stores only the last 5 tokens of the 11-token prompt: its prefill
        # attends over the prompt's keys as computed (Transformers' sliding-window cache does the same), not paged.
        sliding_prefill = 1 if case.startswith("gemma2") else 0
        # 2 layers x (1 prefill + NEW_TOKENS - 1 decode steps), at least; never a PyTorch fallback.
        assert calls.get("reshape_and_cache", 0) >= 12 and attention >= 12 - sliding_prefill, (case, calls)
        assert not any(key.startswith("ops.") for key in calls), (case, calls)
        if case.endswith("eos"):
            assert result["released"] and result["shape"][0] == 3, result  # row 1 ended and gave its blocks back
        elif case.endswith("greedy"):
            assert result["shape"] == [3, 11 + 6], result
            assert "shared_prefix_paged_attention" not in calls, (case, calls)  # three prompts share no block
        else:
            assert calls.get("copy_blocks", 0) >= 1, (case, calls)  # rows forked inside a partial block
            assert result["shape"] == [6 if case.endswith("beams") else 9, 11 + 6], result
            # Every decode step reads the shared prompt blocks once per prompt in the full-attention layer, and so
            # does Gemma2's sliding-window layer while its window still holds shared blocks (they are released
            # as the window moves past the prompt); only the prefill runs the plain kernel otherwise.
            shared, plain = calls.get("shared_prefix_paged_attention", 0), calls.get("paged_attention", 0)
            assert shared + plain == 2 * NEW_TOKENS - sliding_prefill, (case, calls)
            assert shared >= (NEW_TOKENS - 1) * (2 - sliding_prefill), (case, calls)
            if not sliding_prefill:
                assert plain == 2, (case, calls)
        assert result["same_tokens"], (case, result)
        assert result["max_logit_diff"] < 2e-4, (case, result)


def test_sinks_and_chunks_run_through_the_triton_kernels(tmp_path):
    """gpt-oss's attention sinks and Llama 4's chunked layers reach the kernel (no PyTorch fallback) and give
    eager's tokens."""
    results = run_script(tmp_path, ["gpt_oss", "llama4_text"], ["greedy", "beams"])
    assert set(results) == {f"{family}-{mode}" for family in ("gpt_oss", "llama4_text") for mode in ("greedy", "beams")}
    for case, result in results.items():
        calls = result["calls"]
        attention = calls.get("paged_attention", 0) + calls.get("shared_prefix_paged_attention", 0)
        # gpt-oss's sliding-window layer stores only its window of the prompt: that prefill is not paged.
        assert attention >= 12 - case.startswith("gpt_oss"), (case, calls)
        if case.startswith("gpt_oss"):  # sinks on every layer: the shared-prefix kernel has none
            assert "shared_prefix_paged_attention" not in calls, (case, calls)
        elif case.endswith("beams"):  # Llama 4's full-attention layer reads the shared prompt once
            assert calls.get("shared_prefix_paged_attention", 0) >= 1, (case, calls)
        assert not any(key.startswith("ops.") for key in calls), (case, calls)
        assert result["same_tokens"], (case, result)
        assert result["max_logit_diff"] < 2e-4, (case, result)


def test_prefix_caching_runs_through_the_triton_kernels(tmp_path):
    """A prefix-cache hit in every layer group (Gemma2: a sliding-window group and a full one): the second call's
    prefill attends over the mapped blocks with the paged kernel and gives eager's tokens."""
    results = run_script(tmp_path, ["llama", "gemma2"], ["prefix"])
    assert set(results) == {f"{family}-prefix{call}" for family in ("llama", "gemma2") for call in (0, 1, 2)}
    for case, result in results.items():
        calls = result["calls"]
        # The third call: 15 system tokens for the new row, 10 for the row padded by a block (the hit is 3 blocks).
        assert result["hit"] == {"0": 0, "1": 15, "2": 15 + 10}[case[-1]], (case, result)
        assert not any(key.startswith("ops.") for key in calls), (case, calls)
        assert result["same_tokens"], (case, result)
        assert result["max_logit_diff"] < 2e-4, (case, result)


def test_kv_shared_layers_run_through_the_triton_kernels(tmp_path):
    """Gemma 4's KV-shared layers read the pools of the layers they share through the kernels (the prefill's one
    query too) and give eager's tokens."""
    pytest.importorskip("transformers.models.gemma4")
    modes = ["greedy", "sampling"]  # beams run the same kernels as samples (tests/test_layer_groups.py has all three)
    results = run_script(tmp_path, ["gemma4_shared"], modes)
    assert set(results) == {f"gemma4_shared-{mode}" for mode in modes}
    for case, result in results.items():
        calls = result["calls"]
        attention = calls.get("paged_attention", 0) + calls.get("shared_prefix_paged_attention", 0)
        # 4 layers x NEW_TOKENS steps, less the sliding layer's prefill over the prompt as computed (layer 0 and the
        # layer reading it, 2); 2 layers store.
        assert attention == 4 * NEW_TOKENS - 2 and calls.get("reshape_and_cache", 0) == 2 * NEW_TOKENS, (case, calls)
        assert not any(key.startswith("ops.") for key in calls), (case, calls)
        assert result["same_tokens"], (case, result)
        assert result["max_logit_diff"] < 2e-4, (case, result)
