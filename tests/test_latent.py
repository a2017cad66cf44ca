"""Multi-head latent attention with absorbed weights (`hf_paged.latent`): every latent family of the installed
Transformers gives eager's tokens and logits, and after the prompt its layers read the cached latents in place:
no decode step gathers (or expands) the whole context.

Logits are compared with ``atol=2e-4, rtol=1e-4`` (fp32), the suite's bound for paged attention: absorbing
``kv_b_proj`` into the query and the output changes the order of the float operations (``(q W_UK) . c`` instead of
``q . (W_UK c)``), which moves fp32 logits of these tiny models by about 1e-7 (measured: at most 1.2e-6 of the
logits' spread in the family walk), three orders of magnitude inside the bound.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import _architecture, _load, families, tiny_config
from tiny_models import left_padded_batch
from transformers import DynamicCache

from hf_paged import PagedCache, latent, ops
from hf_paged.layers import PagedLayer

# Causal-LM types of Transformers 5.25 with kv_lora_rank latents that hf_paged serves, and those it refuses at load
# (DeepSeek-V3.2-style indexer layers); `test_every_latent_family_is_listed` keeps the lists complete.
LATENT_FAMILIES = [name for name in ("axk1", "bailing_hybrid", "deepseek_v2", "deepseek_v3", "glm4_moe_lite",
                                     "kimi_linear", "longcat_flash", "minicpm3", "sarvam_mla", "youtu")
                   if name in families()]
REFUSED_LATENT_FAMILIES = ("axk2", "deepseek_v32", "dots3_note_text", "glm_moe_dsa", "hy_v4")
NEW_TOKENS = 6
MODES = {  # (generate's settings, the PagedCache's block size: None lets generate build it)
    "greedy": (dict(do_sample=False), None),
    "beams": (dict(num_beams=3, num_return_sequences=2), 4),
    "sample": (dict(do_sample=True, num_return_sequences=3, top_k=0), 5),
}


def _pair(family: str):
    torch.manual_seed(0)
    reference = _load(family, tiny_config(family), "eager")
    paged = _load(family, tiny_config(family), "hf_paged")
    paged.load_state_dict(reference.state_dict())
    return reference, paged


@pytest.fixture(scope="module", params=LATENT_FAMILIES)
def pair(request):
    return request.param, *_pair(request.param)


def count_copies(monkeypatch) -> dict:
    """Count `ops.gather_kv` calls that copy (a gather; not a single row's consecutive blocks read in place)."""
    counts = {"copies": 0}
    original = ops.gather_kv

    def counted(cache, block_tables, kv_len, first_block=None):
        counts["copies"] += first_block is None
        return original(cache, block_tables, kv_len, first_block)

    monkeypatch.setattr(ops, "gather_kv", counted)
    return counts


def _generate(model, inputs, settings: dict, **kwargs):
    torch.manual_seed(0)
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          return_dict_in_generate=True, output_logits=True, **settings, **kwargs)


def _attention_layers(cache: PagedCache) -> int:
    return sum(isinstance(layer, PagedLayer) for layer in cache.layers)


def _assert_same(got, expected, label: str) -> None:
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=2e-4, rtol=1e-4)
    assert torch.equal(got.sequences, expected.sequences), f"{label}: tokens differ"


@pytest.mark.parametrize("mode", list(MODES))
def test_latent_family_matches_eager_without_gathering_the_context(pair, mode, monkeypatch):
    """Left-padded prompts of 12, 5 and 9 tokens: eager's tokens and logits (greedy, beams with
    num_return_sequences, seeded sampling of 3 sequences per prompt). The prompt's step gathers each layer's latents
    once (the cache learns there that the layer's ``expand_kv`` lets its pools through); no decode step gathers."""
    family, reference, paged = pair
    settings, block_size = MODES[mode]
    inputs = left_padded_batch([12, 5, 9], seed=1)
    expected = _generate(reference, inputs, settings)
    counts = count_copies(monkeypatch)
    cache = {} if block_size is None else {"past_key_values": PagedCache(paged.config, block_size=block_size)}
    got = _generate(paged, inputs, settings, **cache)
    _assert_same(got, expected, f"{family}/{mode}")
    layers = _attention_layers(got.past_key_values)
    assert counts["copies"] == 2 * layers, f"{family}/{mode}: {counts['copies']} gathers for {layers} layers"
    assert all(latent.absorbable(module) for module in paged.modules() if hasattr(module, "kv_b_proj"))
    got.past_key_values.manager.check()


@pytest.mark.parametrize("path", ["window", "slabs", "single row", "gathered"])
def test_every_pytorch_path(path, monkeypatch):
    """DeepSeek-V3 through each way the PyTorch path reads latents: one block range holding every row's blocks
    (`StepPlan.block_range`), one range per slab of a grown pool merged by log-sum-exp (``windows``), a single row's
    blocks (in place), and each row's latents gathered (rows whose blocks are not compact)."""
    reference, paged = _pair("deepseek_v3")
    new_tokens = 40 if path in ("slabs", "single row") else NEW_TOKENS
    inputs = left_padded_batch([7] if path == "single row" else [12, 5, 9], seed=3)
    settings = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    return_dict_in_generate=True, output_logits=True)
    expected = reference.generate(**inputs, **settings)
    if path == "gathered":
        monkeypatch.setenv("HF_PAGED_READ_PLAN", "shared_prefix")  # no block range: each row gathered
    counts = count_copies(monkeypatch)
    cache = PagedCache(paged.config, block_size=4)
    got = paged.generate(**inputs, **settings, past_key_values=cache)
    _assert_same(got, expected, path)
    prompt_gathers = 0 if path == "single row" else 2 * _attention_layers(cache)  # one row's blocks: in place
    if path == "gathered":
        assert counts["copies"] == prompt_gathers + 2 * _attention_layers(cache) * (new_tokens - 1)
    else:
        assert counts["copies"] == prompt_gathers
    if path in ("slabs", "single row"):
        assert len(cache.pool.slabs) > 1


def test_layer_keys_are_still_the_latents():
    """``cache.layers[i].keys`` / ``.values`` stay each row's latents and rotary keys, as a DynamicCache holds them
    (where the rows have tokens: left padding has no block)."""
    reference, paged = _pair("deepseek_v3")
    inputs = left_padded_batch([12, 5, 9], seed=4)
    settings = dict(do_sample=False, max_new_tokens=NEW_TOKENS, return_dict_in_generate=True)
    expected = reference.generate(**inputs, **settings).past_key_values
    got = paged.generate(**inputs, **settings).past_key_values
    assert isinstance(got, PagedCache)
    real = torch.cat([inputs["attention_mask"], torch.ones(3, NEW_TOKENS - 1, dtype=torch.long)], dim=1).bool()
    for mine, theirs in zip(got.layers, expected.layers, strict=True):
        for name in ("keys", "values"):
            ours, eager = getattr(mine, name), getattr(theirs, name)
            assert ours.shape == eager.shape  # [B, 1, kv, r] and [B, 1, kv, dr]
            torch.testing.assert_close(ours[:, 0][real], eager[:, 0][real], atol=1e-5, rtol=1e-5)


def test_multi_token_steps_absorb_or_expand():
    """Steps of several tokens over cached latents (a continued cache, prompt lookup, assisted decoding): a short
    one absorbs, with its causal mask inside the step; a long one (where expanding the context costs less,
    `latent._absorbing_pays`) expands the gathered latents with the module's own ``expand_kv``. Both give the
    logits of eager with a DynamicCache."""
    reference, paged = _pair("deepseek_v3")
    inputs = left_padded_batch([12, 5], seed=5)
    chunks = [torch.randint(3, 96, (2, length), generator=torch.Generator().manual_seed(length)) for length in (3, 70, 1)]
    weights = latent._absorbed_weights(next(m for m in paged.modules() if hasattr(m, "kv_b_proj")))
    assert latent._absorbing_pays(weights, 3) and not latent._absorbing_pays(weights, 70)
    results = []
    for model, cache in ((reference, DynamicCache(config=reference.config)), (paged, PagedCache(paged.config, block_size=4))):
        mask, logits = inputs["attention_mask"], []
        with torch.no_grad():
            logits.append(model(**inputs, past_key_values=cache, use_cache=True).logits)
            for chunk in chunks:
                mask = torch.cat([mask, torch.ones_like(chunk)], dim=1)
                logits.append(model(input_ids=chunk, attention_mask=mask, past_key_values=cache, use_cache=True).logits)
        results.append(logits)
    prompt, *steps = zip(results[1], results[0], strict=True)
    torch.testing.assert_close(prompt[0][:, -1], prompt[1][:, -1], atol=2e-4, rtol=1e-4)  # padding positions aside
    for got, want in steps:
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def _doubled_values(model) -> None:
    """Make `model`'s latent attention modules expand values twice as large (a family whose ``expand_kv`` is not
    the absorbed form)."""
    for module in model.modules():
        if hasattr(module, "kv_b_proj"):
            base = type(module)

            class Doubled(base):
                def expand_kv(self, kv_nope, k_rot):
                    keys, values = super().expand_kv(kv_nope, k_rot)
                    return keys, 2 * values

            module.__class__ = Doubled


def _biased_projection(model) -> None:
    """Give `model`'s ``kv_b_proj`` a bias (of the same seed in every model)."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if hasattr(module, "kv_b_proj"):
            proj = module.kv_b_proj
            biased = torch.nn.Linear(proj.in_features, proj.out_features, bias=True)
            biased.weight.data.copy_(proj.weight.data)
            biased.bias.data.copy_(torch.randn(proj.out_features, generator=generator))
            module.kv_b_proj = biased


@pytest.mark.parametrize("change", [_doubled_values, _biased_projection], ids=["own expand_kv", "biased kv_b_proj"])
def test_modules_that_do_not_absorb_keep_the_gather(change, monkeypatch):
    """A module whose expansion is not the absorbed form (its own ``expand_kv``, a ``kv_b_proj`` with a bias) is
    never given pools: its latents are gathered and expanded at every step, and the tokens are eager's."""
    reference, paged = _pair("deepseek_v3")
    for model in (reference, paged):
        change(model)
    inputs = left_padded_batch([12, 5, 9], seed=6)
    settings, _ = MODES["beams"]
    expected = _generate(reference, inputs, settings)
    counts = count_copies(monkeypatch)
    got = _generate(paged, inputs, settings, past_key_values=PagedCache(paged.config, block_size=4))
    _assert_same(got, expected, change.__name__)
    assert counts["copies"] == 2 * _attention_layers(got.past_key_values) * NEW_TOKENS  # every step gathers
    assert not any(latent.absorbable(module) for module in paged.modules() if hasattr(module, "kv_b_proj"))


def test_a_deepcopied_model_absorbs(monkeypatch):
    """A copy of a model (its modules are new objects) decides for itself and absorbs like the original."""
    reference, paged = _pair("deepseek_v3")
    clone = copy.deepcopy(paged)
    inputs = left_padded_batch([12, 5, 9], seed=7)
    expected = _generate(reference, inputs, MODES["greedy"][0])
    counts = count_copies(monkeypatch)
    got = _generate(clone, inputs, MODES["greedy"][0])
    _assert_same(got, expected, "deepcopy")
    assert counts["copies"] == 2 * _attention_layers(got.past_key_values)


def test_every_latent_family_is_listed():
    """Every causal-LM type whose config has ``kv_lora_rank`` is tested above or refused at load."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    with_latents = {name for name in families()
                    if any("kv_lora_rank" in getattr(klass, "__annotations__", {})
                           for klass in CONFIG_MAPPING[name].__mro__)}
    assert with_latents <= set(LATENT_FAMILIES) | set(REFUSED_LATENT_FAMILIES), with_latents - set(LATENT_FAMILIES)
    for name in sorted(with_latents & set(REFUSED_LATENT_FAMILIES)):
        with pytest.raises(NotImplementedError, match="hf_paged"):
            _architecture(name)._from_config(tiny_config(name), attn_implementation="hf_paged")
