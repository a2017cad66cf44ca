"""`hf_paged.support`: the load-time checks, on small hand-written attention modules and configs, and the advice every
refusal gives, on real model classes; families whose attention bypasses Transformers' attention interface, and
encoder-decoders, fail clearly (at load or at the first generate) or, once Transformers ports them, give eager's
tokens."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from families import _architecture, tiny_config
from tiny_models import VOCAB, random_ids
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BloomConfig,
    CodeGenConfig,
    FalconConfig,
    GPTJConfig,
    LlamaConfig,
    MptConfig,
    T5Config,
)

from hf_paged import PagedCache, compat, support
from hf_paged.compat import output_cache

PAD, EOS = 0, 2


class M(torch.nn.Module):
    """The model class named in the refusals below."""


class _PassesThrough(torch.nn.Module):
    def forward(self, query, key_states, value_states, past_key_values, attention_interface):
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        if key_states.shape[-2] == 0 or key_states is None:  # metadata and comparisons are harmless
            return None
        shared = (key_states, value_states)  # kept for layers that reuse this layer's keys
        out, _ = attention_interface(self, query, key_states, value=value_states, attention_mask=None)
        return out, shared


class _Repeats(torch.nn.Module):
    def forward(self, query, key_states, value_states, past_key_values, attention_interface):
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        key_states = key_states.repeat(1, 2, 1, 1)
        return attention_interface(self, query, key_states, value_states, None)


class _OwnAttention(torch.nn.Module):
    def forward(self, query, key_states, value_states, past_key_values):
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        return torch.matmul(torch.softmax(query @ key_states.transpose(-1, -2), -1), value_states)


def test_modules_passing_cached_keys_to_the_attention_function_are_accepted():
    support.check_cached_kv_use(M, [_PassesThrough])


@pytest.mark.parametrize(("module_class", "use"), [(_Repeats, "key_states.repeat"),
                                                   (_OwnAttention, "key_states.transpose")])
def test_modules_transforming_cached_keys_are_refused(module_class, use):
    with pytest.raises(NotImplementedError, match=rf"^hf_paged: M does not support .*{module_class.__name__}.*{use}"):
        support.check_cached_kv_use(M, [module_class])


def _config(layer_types):
    return SimpleNamespace(layer_types=layer_types)  # any kind name: Transformers' configs validate theirs


def test_layer_kinds():
    support.check_layer_kinds(M, LlamaConfig(num_hidden_layers=2))  # no layer_types at all
    support.check_layer_kinds(M, _config(["full_attention", "sliding_attention"]))
    support.check_layer_kinds(M, _config(["linear_attention", "full_attention"]))  # hybrids: decided elsewhere
    with pytest.raises(NotImplementedError, match="no attention layer"):
        support.check_layer_kinds(M, _config(["linear_attention", "linear_attention"]))
    with pytest.raises(NotImplementedError, match="'compressed_attention'"):
        support.check_layer_kinds(M, _config(["full_attention", "compressed_attention"]))


# Refused families, one per check, each with what Transformers says its class accepts besides hf_paged. Bloom and
# RWKV (attention outside the interface), Mamba (no attention layer), HY-V4 (indexed attention) refuse "sdpa";
# DiffLlama (a Llama whose attention transforms the cached values) takes it.
ADVICE = {"bloom": ["eager"], "rwkv": ["eager"], "mamba": ["eager"], "hy_v4": ["eager"], "diffllama": ["sdpa", "eager"]}


@pytest.mark.skipif(compat.TRANSFORMERS_VERSION < (5, 17), reason="the tiny configs need Transformers 5.17 or later")
@pytest.mark.parametrize("model_type", list(ADVICE))
def test_refusal_advises_an_attention_the_model_accepts(model_type):
    """The refusal names an ``attn_implementation`` (and its alternatives) that Transformers then really loads the
    same model class with; a family without sdpa support is never told to use "sdpa"."""
    model_class = _architecture(model_type)
    config = tiny_config(model_type)
    with pytest.raises(NotImplementedError, match=r"^hf_paged: ") as info:
        model_class._from_config(copy.deepcopy(config), attn_implementation="hf_paged")
    advice = re.search(r'Load it with attn_implementation="(\w+)"((?: \(or "\w+"\))*) instead', str(info.value))
    assert advice is not None, str(info.value)
    advised = [advice.group(1), *re.findall(r'"(\w+)"', advice.group(2))]
    assert advised == support.accepted_attention(model_class) == ADVICE[model_type], str(info.value)
    for name in advised:
        model = model_class._from_config(copy.deepcopy(config), attn_implementation=name)
        assert model.config._attn_implementation == name
    if "sdpa" not in advised:  # what the advice avoids: Transformers itself refuses sdpa for this class
        with pytest.raises(ValueError, match="does not support"):
            model_class._from_config(copy.deepcopy(config), attn_implementation="sdpa")


def test_advice_without_a_model_class_leaves_the_choice_to_transformers():
    """A `PagedCache` built from a config alone cannot know the class: it says to load without hf_paged, which
    Transformers' default (sdpa, else eager) always accepts."""
    assert "without" in support.fallback_advice(None) and "sdpa" not in support.fallback_advice(None)
    model = AutoModelForCausalLM.from_config(tiny_config("bloom"))  # no attn_implementation: Transformers chooses
    assert model.config._attn_implementation == "eager"


# ---------------------------------------------------------------------------------- unsupported model families
UNSUPPORTED = {
    "gptj": GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128),
    "falcon": FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "bloom": BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4),
    "mpt": MptConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
    "codegen": CodeGenConfig(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128),
}



@pytest.mark.parametrize(
    "family",
    ["gptj", "falcon", "bloom", "mpt", "codegen"],
)
def test_unsupported_family_fails_clearly(family):
    """Load with hf_paged and generate: a clear error naming hf_paged, at load or at the first generate.

    Transformers ports families to its attention interface over time (GPT-J and CodeGen in 5.24): on a release
    where this family goes through the interface, hf_paged must instead give eager's tokens."""
    config = copy.deepcopy(UNSUPPORTED[family])
    if AutoModelForCausalLM._model_mapping[type(config)]._can_set_attn_implementation():
        torch.manual_seed(0)
        ref = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
        paged = AutoModelForCausalLM.from_config(config, attn_implementation="hf_paged").eval()
        paged.load_state_dict(ref.state_dict())
        ids = random_ids(2, 7, seed=81)
        expected = ref.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD)
        got = paged.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
        assert isinstance(output_cache(got), PagedCache)
        assert torch.equal(got.sequences, expected)
        return
    with pytest.raises((NotImplementedError, ValueError)) as info:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="hf_paged").eval()
        model.generate(random_ids(1, 5, seed=81), max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    message = str(info.value)
    assert "hf_paged" in message
    assert "not support" in message
    assert type(info.value).__name__ in ("NotImplementedError", "ValueError")



def test_unsupported_family_from_pretrained(tmp_path):
    AutoModelForCausalLM.from_config(copy.deepcopy(UNSUPPORTED["bloom"])).save_pretrained(tmp_path)
    with pytest.raises(NotImplementedError, match="hf_paged.*not support"):
        AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="hf_paged")



@pytest.mark.parametrize("family", ["bloom", "mpt"])
def test_unsupported_family_is_never_switched_to_hf_paged(family):
    """``set_attn_implementation("hf_paged")`` on such a model only warns (Transformers' rule): the model keeps its
    own attention and cache, and never claims to run hf_paged."""
    model = AutoModelForCausalLM.from_config(copy.deepcopy(UNSUPPORTED[family])).eval()
    before = model.config._attn_implementation
    ids = random_ids(1, 5, seed=85)
    expected = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    model.set_attn_implementation("hf_paged")
    assert model.config._attn_implementation == before != "hf_paged"
    out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=PAD, return_dict_in_generate=True)
    assert torch.equal(out.sequences, expected)
    assert not isinstance(out.past_key_values, PagedCache)



def test_encoder_decoder_model_fails_clearly():
    config = T5Config(vocab_size=VOCAB, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
                      decoder_start_token_id=PAD, pad_token_id=PAD, eos_token_id=EOS)
    if not AutoModelForSeq2SeqLM._model_mapping[T5Config]._can_set_attn_implementation():  # 5.0: refused at load
        with pytest.raises(NotImplementedError, match="hf_paged.*not support"):
            AutoModelForSeq2SeqLM.from_config(config, attn_implementation="hf_paged")
        return
    model = AutoModelForSeq2SeqLM.from_config(config, attn_implementation="hf_paged").eval()
    with pytest.raises(NotImplementedError, match="hf_paged.*encoder-decoder"):
        model.generate(random_ids(1, 6, seed=91), max_new_tokens=3)
