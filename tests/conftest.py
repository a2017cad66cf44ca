"""Shared helpers: tiny random-weight models of many families, paired with a Transformers reference model."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

import hf_paged  # noqa: F401  (registers "hf_paged")

# Tiny models gain nothing from a second thread, and OpenMP's spinning threads make them up to 100x slower when
# anything else runs on this 2-core machine: run the suite single-threaded.
torch.set_num_threads(1)

def _triton_interprets() -> bool:
    """Whether Triton's interpreter can run the kernels here (Triton >= 3.8 with numpy 2, as hf_paged.kernels says)."""
    try:
        import triton
    except ImportError:
        return False
    from hf_paged.kernels import MIN_TRITON_INTERPRETER

    found = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    return found >= MIN_TRITON_INTERPRETER


# Tests that run the kernels under TRITON_INTERPRET=1 (the device image's Triton 3.6 compiles them, but cannot).
needs_triton_interpreter = pytest.mark.skipif(not _triton_interprets(),
                                              reason="Triton's interpreter needs Triton >= 3.8")

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _family_configs():
    return {
        "llama": LlamaConfig(**_COMMON),
        "qwen2": Qwen2Config(**_COMMON),
        "qwen3": Qwen3Config(**_COMMON, head_dim=16),
        "mistral": MistralConfig(**_COMMON, sliding_window=None),
        "mistral_window": MistralConfig(**_COMMON, sliding_window=7),
        "gemma": GemmaConfig(**{**_COMMON, "num_key_value_heads": 1}, head_dim=16),
        "gemma2": Gemma2Config(**_COMMON, head_dim=16, sliding_window=6, attn_logit_softcapping=5.0,
                               final_logit_softcapping=3.0, query_pre_attn_scalar=24),
        "phi3": Phi3Config(**_COMMON, sliding_window=None),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "opt": OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2),
        "gpt_neox": GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=512, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2),
    }


FAMILIES = list(_family_configs())

# Gemma2's softcap is not available in sdpa: Transformers' own reference for it is eager.
REFERENCE_ATTENTION = {"gemma2": "eager"}


def make_pair(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``(reference, paged)``: the same random weights under the reference attention and under "hf_paged"."""
    torch.manual_seed(seed)
    # Each model gets its own config object: a model keeps its config, attention implementation included.
    reference = AutoModelForCausalLM.from_config(
        _family_configs()[family], attn_implementation=REFERENCE_ATTENTION.get(family, "sdpa"), dtype=dtype
    ).eval()
    paged = AutoModelForCausalLM.from_config(_family_configs()[family], attn_implementation="hf_paged",
                                             dtype=dtype).eval()
    assert reference.config._attn_implementation != paged.config._attn_implementation
    paged.load_state_dict(reference.state_dict())
    for model in (reference, paged):
        model.generation_config.pad_token_id = 0
    return reference, paged


def pair_from_config(config_fn, reference_attention: str = "sdpa"):
    """``(reference, paged)`` built from ``config_fn()`` (called once per model: a model keeps its config) with the
    same random weights."""
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(config_fn(), attn_implementation=reference_attention).eval()
    paged = AutoModelForCausalLM.from_config(config_fn(), attn_implementation="hf_paged").eval()
    paged.load_state_dict(reference.state_dict())
    for model in (reference, paged):
        model.generation_config.pad_token_id = 0
    return reference, paged


def left_padded_batch(lengths: list[int], seed: int = 0) -> dict:
    """Random prompts of the given lengths, left-padded with 0 to the longest."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length:] = torch.randint(3, VOCAB, (length,), generator=generator)
        attention_mask[row, width - length:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def count_calls(monkeypatch, module, names) -> collections.Counter:
    """Count the calls of ``module.<name>`` for each of `names` (patched with `monkeypatch`, so undone after the
    test): which attention path a step took."""
    calls = collections.Counter()
    for name in names:
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def system_prompt(system_len: int, suffix_len: int, seed: int, system_seed: int = 0) -> torch.Tensor:
    """``[1, system_len + suffix_len]`` ids: a system prompt fixed by `system_seed`, then a suffix of its own."""
    system = torch.randint(3, VOCAB, (1, system_len), generator=torch.Generator().manual_seed(system_seed))
    suffix = torch.randint(3, VOCAB, (1, suffix_len), generator=torch.Generator().manual_seed(seed))
    return torch.cat([system, suffix], dim=1)


@pytest.fixture
def prefix_pair():
    """``(sdpa, hf_paged)`` tiny Llamas; prefix caching is turned off again after the test."""

    reference, paged = make_pair("llama")
    yield reference, paged
    hf_paged.disable_prefix_caching(paged)


def count_prefill_positions(model, run):
    """Run `run()` and return how many positions the input embeddings saw in the first forward pass."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(out.shape[:2]))
    try:
        result = run()
    finally:
        handle.remove()
    batch, length = seen[0]
    return batch * length, result


@pytest.fixture(scope="session")
def llama_pair():
    return make_pair("llama")
