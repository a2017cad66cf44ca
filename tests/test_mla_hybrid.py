"""Models whose keys and values differ in width (multi-head latent attention) and hybrid models (attention layers
plus linear-attention / Mamba layers) give Transformers' own tokens and logits through a `PagedCache`."""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch
from tiny_models import BASE, MLA, MLA_HYBRID_FAMILIES, VOCAB, available, left_padded_batch, model_pair
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.cache_utils import LinearAttentionCacheLayerMixin
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import hf_paged
from hf_paged import PagedCache
from hf_paged.layers import PagedLayer

FAMILIES = [family for family in MLA_HYBRID_FAMILIES if available(family)]
MODES = {**tiny_models.MODES, "sample": dict(tiny_models.MODES["sample"], num_return_sequences=2)}  # 2 samples
NEW_TOKENS = 5


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    return request.param, *model_pair(request.param)


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


@pytest.mark.parametrize("family", [name for name in ("deepseek_v32", "axk2") if name in CONFIG_MAPPING_NAMES])
def test_dynamic_sparse_attention_is_refused_at_load(family):
    """DeepSeek-V3.2-style indexer layers (top-k keys per query) are refused when the model is loaded."""
    config = AutoConfig.for_model(family, **{**BASE, "num_hidden_layers": 1, **MLA, "q_lora_rank": 16})
    with pytest.raises(NotImplementedError, match=r"hf_paged: .*'indexed_attention' layers"):
        AutoModelForCausalLM.from_config(config, attn_implementation="hf_paged")
    with pytest.raises(NotImplementedError, match="hf_paged"):
        PagedCache(config)


@pytest.mark.parametrize("family", [name for name in ("inkling_text", "inkling2_text") if name in CONFIG_MAPPING_NAMES])
def test_inkling_is_refused_at_load(family):
    """Inkling's attention takes a `position_bias` hf_paged does not apply: refused at load, not silently wrong."""
    config = AutoConfig.for_model(family, **{**BASE, "num_hidden_layers": 1, "layer_types": ["hybrid"]})
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
