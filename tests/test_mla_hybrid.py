"""Models whose keys and values differ in width (multi-head latent attention) and hybrid models (attention layers
plus linear-attention / Mamba layers) give Transformers' own tokens and logits through a `PagedCache`."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, count_calls, left_padded_batch, needs_triton_interpreter
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import LinearAttentionCacheLayerMixin
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import hf_paged
from hf_paged import PagedCache
from hf_paged.layers import PagedLayer

_BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_MOE = dict(moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            n_shared_experts=1)
_MLA = dict(kv_lora_rank=12, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
            num_key_value_heads=4)
_GATED_DELTA = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                    linear_num_value_heads=4, head_dim=8, num_hidden_layers=4,
                    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])

# Tiny random-weight configs, per family (those this Transformers has).
CONFIGS = {
    # MLA: the latents (kv_lora_rank wide keys, qk_rope_head_dim wide values) are paged, expanded by the model.
    "deepseek_v3": dict(num_hidden_layers=2, first_k_dense_replace=1, **_MOE, **_MLA),
    "deepseek_v2": dict(num_hidden_layers=2, first_k_dense_replace=1, **_MOE, **_MLA),
    # Keys of head_dim, values of v_head_dim, read straight from the blocks by the paged attention.
    "mimo_v2_flash": dict(num_hidden_layers=2, head_dim=16, v_head_dim=8, sliding_window=64,
                          layer_types=["full_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
                          **_MOE),
    # Hybrids: linear-attention (gated delta net, KDA) or Mamba-2 layers with paged attention layers.
    "qwen3_next": dict(**_GATED_DELTA, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                       num_experts=4, num_experts_per_tok=2),
    "qwen3_5_text": dict(**_GATED_DELTA),
    "kimi_linear": dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                        mlp_layer_types=["dense", "dense"], linear_head_dim=8, linear_num_heads=2,
                        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_token=2, num_shared_experts=1,
                        moe_intermediate_size=16, kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=12, num_key_value_heads=4, q_lora_rank=None),
    "nemotron_h": dict(layers_block_type=["linear_attention", "full_attention", "mlp"], head_dim=8,
                       ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=1, conv_kernel=4,
                       chunk_size=8, num_hidden_layers=3),
    "qwen3_5_moe_text": dict(**_GATED_DELTA, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                             num_experts=4, num_experts_per_tok=2),
    "olmo_hybrid": dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                        linear_value_head_dim=16, linear_conv_kernel_dim=4),
    "lfm3": dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], head_dim=8, conv_L_cache=3),
    "zaya": dict(num_hidden_layers=2, layer_types=["hybrid", "hybrid"], head_dim=8, moe_intermediate_size=16,
                 num_experts=2, num_experts_per_tok=1, router_hidden_size=16),
    "bailing_hybrid": dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                           mlp_layer_types=["dense", "dense"], first_k_dense_replace=2, linear_head_dim=8,
                           linear_num_heads=2, linear_conv_kernel_dim=4, num_experts=4, num_experts_per_token=2,
                           num_shared_experts=1, num_expert_group=1, topk_group=1, moe_intermediate_size=16,
                           kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                           num_key_value_heads=4, q_lora_rank=None, head_dim=8, num_nextn_predict_layers=0),
    "axk1": dict(num_hidden_layers=2, mlp_layer_types=["dense", "sparse"], **_MOE, **{**_MLA, "q_lora_rank": 16}),
    "falcon_h1": dict(num_hidden_layers=2, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                      mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8),
}
FAMILIES = [name for name in CONFIGS if name in CONFIG_MAPPING_NAMES]
MODES = {
    "greedy": dict(do_sample=False),
    "beams": dict(num_beams=3, num_return_sequences=2),
    "sample": dict(do_sample=True, num_return_sequences=2, top_k=0),
}
NEW_TOKENS = 5


def _config(family: str):
    return AutoConfig.for_model(family, **{**_BASE, **CONFIGS[family]})


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    family = request.param
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager").eval()
    paged = AutoModelForCausalLM.from_config(_config(family), attn_implementation="hf_paged").eval()
    paged.load_state_dict(reference.state_dict())
    for model in (reference, paged):
        model.generation_config.pad_token_id = 0
    return family, reference, paged


def _generate(model, inputs, mode, **kwargs):
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          return_dict_in_generate=True, output_logits=True, **MODES[mode], **kwargs)


def _assert_same(got, expected, label):
    assert isinstance(got.past_key_values, PagedCache), label
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences), f"{label}: tokens differ"
    got.past_key_values.manager.check()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("block_size", [4, 5])  # the 12-token prompt: 3 full blocks of 4; 5 does not divide it
def test_same_tokens_as_eager(pair, mode, block_size):
    family, reference, paged = pair
    inputs = left_padded_batch([12, 5, 9], seed=1)
    expected = _generate(reference, inputs, mode)
    got = _generate(paged, inputs, mode, past_key_values=PagedCache(paged.config, block_size=block_size))
    _assert_same(got, expected, f"{family}/{mode}/bs={block_size}")


def test_generate_builds_paged_cache_and_forks_once(pair):
    """Without a cache given, ``generate`` builds the `PagedCache` and runs the prompt once for its k copies: the
    per-row linear-attention states are forked with the blocks."""
    family, reference, paged = pair
    inputs = left_padded_batch([12, 7], seed=2)
    expected = _generate(reference, inputs, "beams")
    got = _generate(paged, inputs, "beams")
    _assert_same(got, expected, f"{family}/beams")
    cache = got.past_key_values
    for layer in cache.state_layers:
        states = [s for s in (*layer.conv_states.values(), *layer.recurrent_states.values()) if s is not None]
        assert states and all(s.shape[0] == 6 for s in states)  # 2 prompts x 3 beams
    stats = cache.stats()
    assert stats.shared_blocks > 0 or cache.block_size > 12
    assert stats.pool_bytes == stats.num_blocks * cache.bytes_per_block


def test_pool_stores_each_width(pair):
    """Keys and values of different widths are stored as such: no padding in the pool."""
    family, _, paged = pair
    cache = PagedCache(paged.config, block_size=4)
    with torch.no_grad():
        paged(**left_padded_batch([6, 3], seed=3), past_key_values=cache, use_cache=True)
    text = paged.config.get_text_config(decoder=True)
    assert cache.pool.num_layers == sum(isinstance(layer, PagedLayer) for layer in cache.layers)  # attention only
    if getattr(text, "kv_lora_rank", None) is not None:
        keys, values = cache.pool.tensors
        assert keys.shape[1:] == (1, cache.pool.blocks.num_blocks, 4, 1, text.kv_lora_rank)
        assert values.shape[1:] == (1, cache.pool.blocks.num_blocks, 4, 1, text.qk_rope_head_dim)
    elif family == "mimo_v2_flash":
        keys, values = cache.pool.tensors
        assert keys.shape[-1] == text.head_dim and values.shape[-1] == text.v_head_dim
    element = cache.pool.tensor.element_size()
    expected = sum(t[:, :, 0].numel() for t in cache.pool.tensors) * element
    assert cache.bytes_per_block == expected


def test_deepcopy_continues_like_the_original(pair):
    """``copy.deepcopy`` of a cache (Transformers' prompt-reuse recipe) copies blocks and per-row states."""
    family, _, paged = pair
    inputs = left_padded_batch([8, 6], seed=4)
    cache = PagedCache(paged.config, block_size=4)
    with torch.no_grad():
        paged(**inputs, past_key_values=cache, use_cache=True)
        clone = copy.deepcopy(cache)
        more = torch.tensor([[5], [6]])
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], dim=1)
        a = paged(input_ids=more, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        b = paged(input_ids=more, attention_mask=mask, past_key_values=clone, use_cache=True).logits
    torch.testing.assert_close(a, b)
    for mine, theirs in zip(cache.layers, clone.layers, strict=True):
        assert isinstance(mine, LinearAttentionCacheLayerMixin) == isinstance(theirs, LinearAttentionCacheLayerMixin)


def test_prefix_caching(pair):
    """With a model-wide pool, a second call reuses the first's prompt blocks (MLA), or computes the whole prompt
    again where linear-attention states need every token (hybrids); both give eager's tokens."""
    family, reference, paged = pair
    inputs = left_padded_batch([12, 12], seed=5)
    expected = _generate(reference, inputs, "greedy")
    hf_paged.enable_prefix_caching(paged, block_size=4)
    try:
        _generate(paged, inputs, "greedy")
        got = _generate(paged, inputs, "greedy")
    finally:
        hf_paged.disable_prefix_caching(paged)
    _assert_same(got, expected, f"{family}/prefix")
    hybrid = bool(got.past_key_values.state_layers)
    assert (got.past_key_values.prefix_hit_tokens == 0) == hybrid


@pytest.mark.skipif("mimo_v2_flash" not in FAMILIES, reason="this Transformers has no MiMo-V2-Flash")
@pytest.mark.parametrize("path", ["window", "split", "gathered"])
def test_every_attention_path_with_narrower_values(path, monkeypatch):
    """Values narrower than keys (MiMo-V2-Flash) through each PyTorch attention path: one block range for all rows
    (`ops.window_attention`), shared prefix plus tails (`ops.shared_prefix_attention`), per-row gathers."""

    import hf_paged.step
    from hf_paged import ops

    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(_config("mimo_v2_flash"), attn_implementation="eager").eval()
    paged = AutoModelForCausalLM.from_config(_config("mimo_v2_flash"), attn_implementation="hf_paged").eval()
    paged.load_state_dict(reference.state_dict())
    calls = count_calls(monkeypatch, ops, ("window_attention", "windows_attention", "shared_prefix_attention", "gather_kv"))
    if path != "window":
        monkeypatch.setattr(hf_paged.step, "_window", lambda *args: None)
    if path == "gathered":
        monkeypatch.setattr(hf_paged.step, "_shared_prefix", lambda *args: None)
    inputs = left_padded_batch([12, 5, 9], seed=1)
    expected = _generate(reference, inputs, "beams")
    got = _generate(paged, inputs, "beams", past_key_values=PagedCache(paged.config, block_size=4))
    _assert_same(got, expected, f"mimo_v2_flash/{path}")
    assert (calls["window_attention"] + calls["windows_attention"] > 0) == (path == "window")  # one slab, several
    assert (calls["shared_prefix_attention"] > 0) == (path == "split")


_TRITON_SCRIPT = r'''
import json
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, sys.argv[1])
from test_mla_hybrid import _config, _generate, left_padded_batch  # noqa: E402

from hf_paged import PagedCache, backend  # noqa: E402

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
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager").eval()
    paged = AutoModelForCausalLM.from_config(_config(family), attn_implementation="hf_paged").eval()
    paged.load_state_dict(reference.state_dict())
    inputs = left_padded_batch([9, 4], seed=1)
    for mode in ("greedy", "beams"):
        calls.clear()
        expected = _generate(reference, inputs, mode)
        got = _generate(paged, inputs, mode, past_key_values=PagedCache(paged.config, block_size=4))
        diff = (torch.stack(got.logits) - torch.stack(expected.logits)).abs().max().item()
        results[f"{family}/{mode}"] = {"same": bool(torch.equal(got.sequences, expected.sequences)), "diff": diff,
                                       "calls": dict(calls)}
print(json.dumps(results))
'''


@needs_triton_interpreter
def test_triton_kernels_under_the_interpreter(tmp_path):
    """``generate`` through the Triton kernels (``HF_PAGED_BACKEND=triton``, interpreter on CPU): values narrower
    than keys read by the paged-attention kernel (MiMo-V2-Flash), latents of two widths written by
    reshape_and_cache, copied by copy_blocks and read in place by the kernel's latent mode at every decode step
    (DeepSeek-V3: 2 layers x 4 steps), a hybrid (Qwen3-Next)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    families = [name for name in ("mimo_v2_flash", "deepseek_v3", "qwen3_next") if name in FAMILIES]
    script = tmp_path / "run.py"
    script.write_text(_TRITON_SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_PAGED_BACKEND": "triton", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), *families], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for label, result in results.items():
        assert result["same"] and result["diff"] < 2e-4, (label, result)
        assert result["calls"].get("reshape_and_cache", 0) > 0, (label, result)
        if label.endswith("/beams"):
            assert result["calls"].get("copy_blocks", 0) > 0, (label, result)  # copy-on-write of shared blocks
    for mode in ("greedy", "beams"):
        if "mimo_v2_flash" in families:
            assert results[f"mimo_v2_flash/{mode}"]["calls"].get("paged_attention", 0) > 0
        if "deepseek_v3" in families:
            assert results[f"deepseek_v3/{mode}"]["calls"].get("latent", 0) == 2 * (NEW_TOKENS - 1)


@pytest.mark.parametrize("family", [name for name in ("deepseek_v32", "axk2") if name in CONFIG_MAPPING_NAMES])
def test_dynamic_sparse_attention_is_refused_at_load(family):
    """DeepSeek-V3.2-style indexer layers (top-k keys per query) are refused when the model is loaded."""
    config = AutoConfig.for_model(family, **{**_BASE, "num_hidden_layers": 1, **_MLA, "q_lora_rank": 16})
    with pytest.raises(NotImplementedError, match=r"hf_paged: .*'indexed_attention' layers"):
        AutoModelForCausalLM.from_config(config, attn_implementation="hf_paged")
    with pytest.raises(NotImplementedError, match="hf_paged"):
        PagedCache(config)


@pytest.mark.parametrize("family", [name for name in ("inkling_text", "inkling2_text") if name in CONFIG_MAPPING_NAMES])
def test_inkling_is_refused_at_load(family):
    """Inkling's attention takes a `position_bias` hf_paged does not apply: refused at load, not silently wrong."""
    config = AutoConfig.for_model(family, **{**_BASE, "num_hidden_layers": 1, "layer_types": ["hybrid"]})
    with pytest.raises(NotImplementedError, match="hf_paged: .*position_bias"):
        AutoModelForCausalLM.from_config(config, attn_implementation="hf_paged")


@pytest.mark.parametrize("family", ["falcon_h1", "zamba2", "qwen3_next"])
def test_prompt_lookup_on_hybrid_models(family):
    """Prompt-lookup decoding rolls hybrid models' states back as well (5.25 passes ``recurrent_states_to_keep`` and
    keeps a history of recurrent states in each state layer, hybrid layers included): eager's tokens."""
    families = pytest.importorskip("families")
    if family not in families.families() or hf_paged.compat.TRANSFORMERS_VERSION < (5, 17):
        pytest.skip(f"{family}: not in this Transformers, or its tiny config needs 5.17+")
    models = []
    for attention in ("eager", "hf_paged"):
        torch.manual_seed(0)
        models.append(families._load(family, families.tiny_config(family), attention))
    reference, paged = models
    paged.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(1)
    pattern = torch.randint(3, VOCAB, (1, 6), generator=generator)
    ids = torch.cat([pattern, torch.randint(3, VOCAB, (1, 3), generator=generator), pattern, pattern[:, :3]], dim=1)
    settings = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=3)
    try:
        expected = reference.generate(ids, **settings)
    except ValueError as refusal:  # older releases refuse assisted decoding on stateful models
        with pytest.raises(ValueError, match="not supported with stateful models"):
            paged.generate(ids, **settings)
        pytest.skip(f"Transformers {hf_paged.compat.transformers_version_text()} refuses it too: {refusal}")
    got = paged.generate(ids, **settings, return_dict_in_generate=True)
    assert isinstance(hf_paged.compat.output_cache(got), PagedCache)
    assert torch.equal(got.sequences, expected)
