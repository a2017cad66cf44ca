"""A whole ``model.generate()`` through the Triton kernels, on CPU, under Triton's interpreter (the kernels' end to end
test; the kernels against their references are ``tests/test_kernels.py``'s).

``HF_PAGED_BACKEND=triton`` sends every paged op of ``"hf_paged"`` to ``hf_paged.kernels`` and ``TRITON_INTERPRET=1``
lets those kernels run on CPU tensors. Both must be set before ``hf_paged.kernels`` is imported, and must not leak
into this process, so the models run in a subprocess. That script counts the calls of each launcher
(``reshape_and_cache``, ``paged_attention``, ``shared_prefix_paged_attention``, ``copy_blocks``) and of the PyTorch
fallbacks, and compares tokens and logits with Transformers' own attention (``sdpa``; ``eager`` for Gemma2's softcap)
on tiny random-weight models with left-padded prompts, for greedy search, beam search and seeded sampling with
``num_return_sequences``. In the last two the rows of a prompt share its blocks, and decoding must read them once
per prompt through ``shared_prefix_paged_attention``. With prefix caching, a second call maps the first call's
system-prompt blocks in every layer group and its prefill reads them through the paged kernel; a third maps them
into rows with different numbers of whole pad blocks. Two smaller scripts run a growable pool of several block-major
slabs (addressed through the kernels' offset tables) and models whose values are narrower than their keys, MLA
latents and a hybrid.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import needs_triton_interpreter
from tiny_models import available

pytestmark = needs_triton_interpreter

# The scripts' call counter (pasted into each): the launchers backend.py dispatches to, and every PyTorch path the
# attention function could fall back to, counted in `calls`.
COUNT_CALLS = r"""
calls = {}


def count(module, name, key):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[key] = calls.get(key, 0) + 1
        return original(*args, **kwargs)

    setattr(module, name, counted)


for name in ("reshape_and_cache", "paged_attention", "shared_prefix_paged_attention", "copy_blocks"):
    count(kernels, name, name)
for name in ("reshape_and_cache", "paged_attention", "copy_blocks", "gather_kv", "shared_prefix_attention",
             "shared_prefix_paged_attention", "range_attention", "ranges_attention", "read_blocks"):
    count(ops, name, "ops." + name)
"""

SCRIPT = r'''
import json
import os
import sys

assert os.environ["TRITON_INTERPRET"] == "1" and os.environ["HF_PAGED_BACKEND"] == "triton"

import torch

sys.path.insert(0, sys.argv[1])
from tiny_models import VOCAB, left_padded_batch, model_pair

import hf_paged
from hf_paged import PagedCache, backend, ops
from hf_paged.compat import cache_kwargs

kernels = backend.kernels()
assert kernels is not None and kernels.__name__ == "hf_paged.kernels", kernels
''' + COUNT_CALLS + r'''

# The suite's tiny models, smaller still for the interpreter: (family, config changes, reference attention).
SMALL = dict(intermediate_size=64, max_position_embeddings=128)
CONFIGS = {
    "llama": ("llama", dict(SMALL, initializer_range=0.1), "sdpa"),
    "gemma2": ("gemma2", SMALL, "eager"),
    # attention sinks on a sliding layer and a full one; chunked attention (chunks of 4) on layer 0
    "gpt_oss": ("gpt_oss", dict(SMALL, num_local_experts=2, num_experts_per_tok=1), "eager"),
    "llama4_text": ("llama4_text", dict(SMALL, intermediate_size_mlp=64, num_local_experts=2, attention_chunk_size=4),
                    "eager"),
    # Gemma 4 (5.17+) with KV sharing: layers 2-3 read layers 0-1's pools, and a prefill gives them one query
    "gemma4_shared": ("gemma4_kv_shared", dict(SMALL, num_hidden_layers=4, sliding_window=6, num_kv_shared_layers=2,
                                               layer_types=["sliding_attention", "full_attention"] * 2), "eager"),
}
MODES = {
    "greedy": dict(do_sample=False),
    "beams": dict(num_beams=3, num_return_sequences=2, length_penalty=0.7, early_stopping=True),
    "sampling": dict(do_sample=True, num_return_sequences=3, top_k=20),
}
NEW_TOKENS = int(sys.argv[3])


def pair(family):
    name, changes, reference_attention = CONFIGS[family]
    return model_pair(name, reference=reference_attention, **changes)


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
    inputs = left_padded_batch([11, 4, 8], seed=1)
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
            torch.manual_seed(0)
            with torch.no_grad(), hf_paged.recorded_stats() as recorded:
                got = paged.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=0, do_sample=False,
                                     eos_token_id=eos, cache_config={"block_size": 5})
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

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
NEW_TOKENS = 6


def _run(tmp_path, script: str, *args: str, timeout: float = 300) -> dict:
    """Run `script` (its arguments: this folder, then `args`) in a subprocess under Triton's interpreter with
    ``HF_PAGED_BACKEND=triton``, importing this checkout's hf_paged (not an installed one), and return what its last
    line printed as JSON."""
    pytest.importorskip("triton")
    path = tmp_path / "script.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "1", "HF_PAGED_BACKEND": "triton",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(path), TESTS, *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def run_script(tmp_path, families: list[str], modes: list[str]) -> dict:
    return _run(tmp_path, SCRIPT, ",".join(families), str(NEW_TOKENS), ",".join(modes))


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


SLABS_SCRIPT = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from tiny_models import left_padded_batch, model_pair
from hf_paged import PagedCache
results = {}
# DeepSeek-V3's latents at block size 5: blocks of 2 x 5 x 12 elements, padded to a multiple of 16 in block-major
# slabs so that the offset tables stay aligned.
for family, block_size in (("llama", 4), ("deepseek_v3", 5)):
    reference, paged = model_pair(family)
    for mode, kwargs in {"greedy": dict(do_sample=False), "beams": dict(num_beams=3, num_return_sequences=2)}.items():
        inputs = left_padded_batch([13, 6], seed=7)
        expected = reference.generate(**inputs, max_new_tokens=20, min_new_tokens=20, **kwargs)
        cache = PagedCache(paged.config, block_size=block_size)
        got = paged.generate(**inputs, max_new_tokens=20, min_new_tokens=20, past_key_values=cache, **kwargs)
        results[f"{family} {mode}"] = {"same": bool(torch.equal(got, expected)), "slabs": len(cache.pool.slabs),
                                       "block_major": cache.pool.block_major}
print(json.dumps(results))
'''


def test_a_pool_of_slabs_runs_through_the_triton_kernels(tmp_path):
    """``generate`` through the Triton kernels with a growable pool: it grows by block-major slabs, which the kernels
    address through their offset tables, and gives sdpa's tokens."""
    for case, result in _run(tmp_path, SLABS_SCRIPT, timeout=900).items():
        assert result["same"] and result["block_major"] and result["slabs"] > 1, (case, result)


WIDTHS_SCRIPT = r'''
import json
import sys

import torch

sys.path.insert(0, sys.argv[1])
from tiny_models import left_padded_batch, model_pair  # noqa: E402

from hf_paged import PagedCache, backend  # noqa: E402

MODES = {"greedy": dict(do_sample=False), "beams": dict(num_beams=3, num_return_sequences=2)}


def generate(model, inputs, mode, **kwargs):
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, return_dict_in_generate=True,
                          output_logits=True, **MODES[mode], **kwargs)



kernels = backend.kernels()
calls = {}
for name in ("reshape_and_cache", "paged_attention", "copy_blocks"):
    original = getattr(kernels, name)

    def counted(*args, _name=name, _original=original, **kwargs):
        calls[_name] = calls.get(_name, 0) + 1
        if kwargs.get("latent"):
            calls["latent"] = calls.get("latent", 0) + 1
        return _original(*args, **kwargs)

    setattr(kernels, name, counted)
results = {}
for family in sys.argv[2:]:
    reference, paged = model_pair(family)
    inputs = left_padded_batch([9, 4], seed=1)
    for mode in ("greedy", "beams"):
        calls.clear()
        expected = generate(reference, inputs, mode)
        got = generate(paged, inputs, mode, past_key_values=PagedCache(paged.config, block_size=4))
        diff = (torch.stack(got.logits) - torch.stack(expected.logits)).abs().max().item()
        results[f"{family}/{mode}"] = {"same": bool(torch.equal(got.sequences, expected.sequences)), "diff": diff,
                                       "calls": dict(calls)}
print(json.dumps(results))
'''


def test_values_of_another_width_and_hybrids_run_through_the_triton_kernels(tmp_path):
    """Values narrower than keys read by the paged-attention kernel (MiMo-V2-Flash), latents of two widths written by
    reshape_and_cache, copied by copy_blocks and read in place by the kernel's latent mode at every decode step
    (DeepSeek-V3: 2 layers x 4 steps), a hybrid (Qwen3-Next): eager's tokens."""
    families = [name for name in ("mimo_v2_flash", "deepseek_v3", "qwen3_next") if available(name)]
    results = _run(tmp_path, WIDTHS_SCRIPT, *families, timeout=900)
    for label, result in results.items():
        assert result["same"] and result["diff"] < 2e-4, (label, result)
        assert result["calls"].get("reshape_and_cache", 0) > 0, (label, result)
        if label.endswith("/beams"):
            assert result["calls"].get("copy_blocks", 0) > 0, (label, result)  # copy-on-write of shared blocks
    for mode in ("greedy", "beams"):
        if "mimo_v2_flash" in families:
            assert results[f"mimo_v2_flash/{mode}"]["calls"].get("paged_attention", 0) > 0
        if "deepseek_v3" in families:  # 5 new tokens: 4 decode steps of 2 latent layers, none gathered
            assert results[f"deepseek_v3/{mode}"]["calls"].get("latent", 0) == 2 * 4, results


QUANTIZED_SCRIPT = r"""
import json
import os
import sys

import torch

sys.path.insert(0, sys.argv[1])
from tiny_models import left_padded_batch, model_pair  # noqa: E402

from hf_paged import PagedCache, backend, ops  # noqa: E402

kernels = backend.kernels()
""" + COUNT_CALLS + r"""
MODES = {"greedy": dict(do_sample=False), "beams": dict(num_beams=3, num_return_sequences=2)}
NEW_TOKENS = 8


def generate(model, inputs, mode, path, kv_dtype):
    os.environ["HF_PAGED_BACKEND"] = path  # read at every step
    cache = PagedCache(model.config, block_size=4, kv_dtype=kv_dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, past_key_values=cache,
                             return_dict_in_generate=True, output_logits=True, **MODES[mode])
    cache.manager.check()
    return out, cache


results = {}
for family, kv_dtype, mode in (case.split("/") for case in sys.argv[2:]):
    _, paged = model_pair(family)
    inputs = left_padded_batch([11, 4, 8], seed=1)
    expected, _ = generate(paged, inputs, mode, "torch", kv_dtype)
    calls.clear()
    got, cache = generate(paged, inputs, mode, "triton", kv_dtype)
    results[f"{family}/{kv_dtype}/{mode}"] = {
        "calls": dict(calls),
        "same_tokens": bool(torch.equal(got.sequences, expected.sequences)),
        "max_logit_diff": (torch.stack(got.logits) - torch.stack(expected.logits)).abs().max().item(),
        "storage": str(cache.pool.dtype), "block_major": cache.pool.block_major, "slabs": len(cache.pool.slabs),
    }
print(json.dumps(results))
"""


def test_8bit_pools_run_through_the_triton_kernels(tmp_path):
    """``generate`` on 8-bit pools (``kv_dtype``) through the kernels gives the PyTorch path's tokens, and its logits
    within float32 rounding: both store the same codes (the write kernel encodes as `hf_paged.quant.encode`) and
    attend over the same decoded keys. Greedy and beam search (shared-prefix kernel, copy-on-write of 8-bit blocks),
    a GQA Llama and DeepSeek-V3's latents (the kernel's latent mode), int8 and float8, a pool that grows by
    block-major slabs (offset tables); no PyTorch op runs on the Triton path."""
    cases = ["llama/int8/greedy", "llama/float8_e4m3fn/beams"]
    if available("deepseek_v3"):
        cases += ["deepseek_v3/float8_e4m3fn/greedy", "deepseek_v3/int8/beams"]
    results = _run(tmp_path, QUANTIZED_SCRIPT, *cases, timeout=900)
    assert set(results) == set(cases)
    for case, result in results.items():
        calls = result["calls"]
        assert result["storage"] == "torch." + case.split("/")[1] and result["block_major"], (case, result)
        assert calls.get("reshape_and_cache", 0) == 2 * 8 and calls.get("paged_attention", 0) >= 2, (case, calls)
        # DeepSeek-V3's prefill: its layers return their latents gathered until the model shows it lets pools
        # through (hf_paged.latent); 2 layers x (latents, rotary keys), decoded out of the 8-bit pool.
        prefill_gathers = 4 if case.startswith("deepseek") else 0
        assert calls.pop("ops.gather_kv", 0) == prefill_gathers, (case, calls)
        assert not any(key.startswith("ops.") for key in calls), (case, calls)
        if case.endswith("beams"):  # rows forked inside a partial 8-bit block, then the prompt read once per group
            assert calls.get("copy_blocks", 0) >= 1, (case, calls)
            if case.startswith("llama"):
                assert calls.get("shared_prefix_paged_attention", 0) == 2 * 7, (case, calls)
        assert result["same_tokens"] and result["max_logit_diff"] < 1e-4, (case, result)
    assert max(result["slabs"] for result in results.values()) >= 2, results
