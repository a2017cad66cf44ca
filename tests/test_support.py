"""`hf_paged.support`: the load-time checks, on small hand-written attention modules and configs, and the advice every
refusal gives, on real model classes."""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from families import _architecture, tiny_config
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_paged import compat, support


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
