"""`hf_paged.support`: the load-time checks, on small hand-written attention modules and configs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig

from hf_paged import support


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
    support.check_cached_kv_use("M", [_PassesThrough])


@pytest.mark.parametrize(("module_class", "use"), [(_Repeats, "key_states.repeat"),
                                                   (_OwnAttention, "key_states.transpose")])
def test_modules_transforming_cached_keys_are_refused(module_class, use):
    with pytest.raises(NotImplementedError, match=rf"^hf_paged: M does not support .*{module_class.__name__}.*{use}"):
        support.check_cached_kv_use("M", [module_class])


def _config(layer_types):
    return SimpleNamespace(layer_types=layer_types)  # any kind name: Transformers' configs validate theirs


def test_layer_kinds():
    support.check_layer_kinds("M", LlamaConfig(num_hidden_layers=2))  # no layer_types at all
    support.check_layer_kinds("M", _config(["full_attention", "sliding_attention"]))
    support.check_layer_kinds("M", _config(["linear_attention", "full_attention"]))  # hybrids: decided elsewhere
    with pytest.raises(NotImplementedError, match="no attention layer"):
        support.check_layer_kinds("M", _config(["linear_attention", "linear_attention"]))
    with pytest.raises(NotImplementedError, match="'compressed_attention'"):
        support.check_layer_kinds("M", _config(["full_attention", "compressed_attention"]))
