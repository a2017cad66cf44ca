"""The tests' one helper for tiny random-weight models: configs of many families, a model pair (Transformers'
reference attention and ``"hf_paged"``, the same weights), prompts, and ways to watch a model run (which forward
steps stored tokens in a `PagedCache`, which ops a step called, how many positions a prefill computed), and
`RoundedCache`, the reference for 8-bit pools.

A plain module, not a conftest: the Triton tests' subprocess scripts import it too. Every config is built on demand
through `AutoConfig.for_model`, so a family the installed Transformers lacks costs nothing until it is asked for
(`available`). The families are hand-written and small enough for the CPU; ``tests/families.py`` instead derives a
tiny config for every causal-LM type of the installed Transformers, for the family walk.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import hf_paged  # noqa: F401  (registers "hf_paged")
from hf_paged import PagedCache, kinds, quant

VOCAB = 96
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, **SPECIAL)
_MIXED = dict(sliding_window=6, layer_types=["sliding_attention", "full_attention"])  # a sliding layer, a full one
_MOE = dict(num_local_experts=4, num_experts_per_tok=2)
_KV_SHARED = dict(COMMON, vocab_size_per_layer_input=VOCAB, intermediate_size=64, num_hidden_layers=6, head_dim=16,
                  hidden_size_per_layer_input=16, sliding_window=8, num_kv_shared_layers=3,
                  layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)  # 3-5 read 1 and 2
# Multi-head latent attention and hybrids: smaller still (hidden 32). `BASE` and `MLA` also serve the tests of
# families refused at load.
BASE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, **SPECIAL)
_MLA_MOE = dict(moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                n_shared_experts=1)
MLA = dict(kv_lora_rank=12, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
            num_key_value_heads=4)
_GATED_DELTA = dict(linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                    linear_num_value_heads=4, head_dim=8, num_hidden_layers=4,
                    layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])

# family: (model_type, config arguments, Transformers' reference attention for it)
_FAMILIES: dict[str, tuple[str, dict, str]] = {
    # The parity families: plain attention, against sdpa (Gemma 2's softcap is not in sdpa: eager).
    "llama": ("llama", COMMON, "sdpa"),
    "qwen2": ("qwen2", COMMON, "sdpa"),
    "qwen3": ("qwen3", dict(COMMON, head_dim=16), "sdpa"),
    "mistral": ("mistral", dict(COMMON, sliding_window=None), "sdpa"),
    "mistral_window": ("mistral", dict(COMMON, sliding_window=7), "sdpa"),
    "gemma": ("gemma", dict(COMMON, num_key_value_heads=1, head_dim=16), "sdpa"),
    "gemma2": ("gemma2", dict(COMMON, head_dim=16, sliding_window=6, attn_logit_softcapping=5.0,
                              final_logit_softcapping=3.0, query_pre_attn_scalar=24), "eager"),
    "phi3": ("phi3", dict(COMMON, sliding_window=None), "sdpa"),
    "gpt2": ("gpt2", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, **SPECIAL), "sdpa"),
    "opt": ("opt", dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=512, word_embed_proj_dim=64, **SPECIAL), "sdpa"),
    "gpt_neox": ("gpt_neox", dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=512, **SPECIAL), "sdpa"),
    # The ecosystem's Llama: the 128-token vocabulary of test_ecosystem's BPE tokenizer (ids 0-3 special: pad 0,
    # eos 1, bos 2, unk 3); initializer_range 0.1 keeps greedy outputs from looping at once.
    "llama128": ("llama", dict(COMMON, vocab_size=128, eos_token_id=1, bos_token_id=2, initializer_range=0.1),
                 "sdpa"),
    # Attention features reaching hf_paged through the interface's kwargs or the mask functions: attention sinks
    # (gpt-oss, Flint, Granite SWA), Llama 4's chunks (layer 0 chunked: no_rope_layers[0] == 1; layer 1 full),
    # windows given only by the mask function (PhiMoE) or by config.layer_types (Gemma 3, gpt-oss, Granite SWA).
    "gpt_oss": ("gpt_oss", dict(COMMON, **_MIXED, **_MOE, head_dim=16), "eager"),
    "flint": ("flint", dict(COMMON, **_MIXED, head_dim=16), "eager"),
    "llama4_text": ("llama4_text", dict(COMMON, head_dim=16, intermediate_size_mlp=128, num_local_experts=4,
                                        attention_chunk_size=8, no_rope_layers=[1, 0]), "eager"),
    "phimoe": ("phimoe", dict(COMMON, **_MOE, sliding_window=7), "eager"),
    "granite_swa": ("granite_swa", dict(COMMON, **_MIXED), "eager"),
    "granitemoe_swa": ("granitemoe_swa", dict(COMMON, **_MIXED, **_MOE), "eager"),
    "gemma3": ("gemma3_text", dict(COMMON, **_MIXED, head_dim=16), "eager"),
    # Layer groups: 3 sliding-window layers (window 8) to 1 full one; every layer sliding (window 8).
    "gemma3_groups": ("gemma3_text", dict(COMMON, num_hidden_layers=4, num_key_value_heads=1, head_dim=16,
                                          sliding_window=8, layer_types=["sliding_attention"] * 3 + ["full_attention"]),
                      "sdpa"),
    "mistral_window8": ("mistral", dict(COMMON, sliding_window=8), "sdpa"),
    # KV sharing: the last num_kv_shared_layers layers store nothing and read the last earlier layer of their kind.
    "gemma3n_kv_shared": ("gemma3n_text", dict(_KV_SHARED, laurel_rank=8, altup_num_inputs=2,
                                               activation_sparsity_pattern=[0.0] * 6), "eager"),
    "gemma4_kv_shared": ("gemma4_text", dict(_KV_SHARED, global_head_dim=32), "eager"),
    # Multi-head latent attention: the latents (kv_lora_rank wide keys, qk_rope_head_dim wide values) are paged.
    "deepseek_v3": ("deepseek_v3", dict(BASE, num_hidden_layers=2, first_k_dense_replace=1, **_MLA_MOE, **MLA),
                    "eager"),
    "deepseek_v2": ("deepseek_v2", dict(BASE, num_hidden_layers=2, first_k_dense_replace=1, **_MLA_MOE, **MLA),
                    "eager"),
    # Keys of head_dim, values of v_head_dim, read straight from the blocks by the paged attention.
    "mimo_v2_flash": ("mimo_v2_flash", dict(BASE, num_hidden_layers=2, head_dim=16, v_head_dim=8, sliding_window=64,
                                            layer_types=["full_attention", "full_attention"],
                                            mlp_layer_types=["dense", "sparse"], **_MLA_MOE), "eager"),
    # Hybrids: linear-attention (gated delta net, KDA) or Mamba-2 layers beside paged attention layers.
    "qwen3_next": ("qwen3_next", dict(BASE, **_GATED_DELTA, moe_intermediate_size=16,
                                      shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2),
                   "eager"),
    "qwen3_5_text": ("qwen3_5_text", dict(BASE, **_GATED_DELTA), "eager"),
    "kimi_linear": ("kimi_linear", dict(BASE, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                                        mlp_layer_types=["dense", "dense"], linear_head_dim=8, linear_num_heads=2,
                                        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_token=2,
                                        num_shared_experts=1, moe_intermediate_size=16, kv_lora_rank=12,
                                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, num_key_value_heads=4,
                                        q_lora_rank=None), "eager"),
    "nemotron_h": ("nemotron_h", dict(BASE, layers_block_type=["linear_attention", "full_attention", "mlp"],
                                      head_dim=8, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8, n_groups=1,
                                      conv_kernel=4, chunk_size=8, num_hidden_layers=3), "eager"),
    "qwen3_5_moe_text": ("qwen3_5_moe_text", dict(BASE, **_GATED_DELTA, moe_intermediate_size=16,
                                                  shared_expert_intermediate_size=16, num_experts=4,
                                                  num_experts_per_tok=2), "eager"),
    "olmo_hybrid": ("olmo_hybrid", dict(BASE, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                                        linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                                        linear_value_head_dim=16, linear_conv_kernel_dim=4), "eager"),
    "lfm3": ("lfm3", dict(BASE, num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], head_dim=8,
                          conv_L_cache=3), "eager"),
    "zaya": ("zaya", dict(BASE, num_hidden_layers=2, layer_types=["hybrid", "hybrid"], head_dim=8,
                          moe_intermediate_size=16, num_experts=2, num_experts_per_tok=1, router_hidden_size=16),
             "eager"),
    "bailing_hybrid": ("bailing_hybrid", dict(BASE, num_hidden_layers=2, layer_types=["linear_attention",
                                                                                        "full_attention"],
                                              mlp_layer_types=["dense", "dense"], first_k_dense_replace=2,
                                              linear_head_dim=8, linear_num_heads=2, linear_conv_kernel_dim=4,
                                              num_experts=4, num_experts_per_token=2, num_shared_experts=1,
                                              num_expert_group=1, topk_group=1, moe_intermediate_size=16,
                                              kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
                                              num_key_value_heads=4, q_lora_rank=None, head_dim=8,
                                              num_nextn_predict_layers=0), "eager"),
    "axk1": ("axk1", dict(BASE, num_hidden_layers=2, mlp_layer_types=["dense", "sparse"], **_MLA_MOE,
                          **{**MLA, "q_lora_rank": 16}), "eager"),
    "falcon_h1": ("falcon_h1", dict(BASE, num_hidden_layers=2, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4,
                                    mamba_d_head=8, mamba_n_groups=1, mamba_d_state=8, mamba_d_conv=4,
                                    mamba_chunk_size=8), "eager"),
}

# Families of each kind, in the order their tests parametrise them (those the installed Transformers has).
PARITY_FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "mistral_window", "gemma", "gemma2", "phi3", "gpt2", "opt",
                   "gpt_neox"]
FEATURE_FAMILIES = ["gpt_oss", "flint", "llama4_text", "phimoe", "granite_swa", "granitemoe_swa", "gemma3",
                    "mistral_window"]
SINK_FAMILIES = ["gpt_oss", "flint", "granite_swa", "granitemoe_swa"]
MLA_HYBRID_FAMILIES = ["deepseek_v3", "deepseek_v2", "mimo_v2_flash", "qwen3_next", "qwen3_5_text", "kimi_linear",
                       "nemotron_h", "qwen3_5_moe_text", "olmo_hybrid", "lfm3", "zaya", "bailing_hybrid", "axk1",
                       "falcon_h1"]


# Decoding modes: greedy, beam search, seeded sampling; beams and samples fork each prompt's rows, sharing its blocks.
MODES = {
    "greedy": dict(do_sample=False),
    "beams": dict(num_beams=3, num_return_sequences=2),
    "sample": dict(do_sample=True, num_return_sequences=3, top_k=0),
}


def available(family: str) -> bool:
    """Whether the installed Transformers has `family`'s model type."""
    return _FAMILIES[family][0] in CONFIG_MAPPING_NAMES


def config(family: str, **overrides):
    """A new config of `family` (a new object each call: a model keeps its config, attention included)."""
    model_type, arguments, _ = _FAMILIES[family]
    return AutoConfig.for_model(model_type, **{**arguments, **overrides})


def reference_attention(family: str) -> str:
    """Transformers' own attention `family`'s hf_paged output is compared with."""
    return _FAMILIES[family][2]


def model_pair(family: str, *, reference: str | None = None, seed: int = 0, dtype: torch.dtype | None = None,
         **overrides) -> tuple:
    """``(reference, paged)``: `family`'s tiny model (its config changed by `overrides`) under Transformers'
    `reference` attention (default: `reference_attention`) and under ``"hf_paged"``, with the same random weights
    from `seed`, in eval mode, cast to `dtype` after initialisation. Attention sinks get random values (families
    initialise them at zero, which would hide a sink applied with the wrong sign or scale)."""
    torch.manual_seed(seed)
    reference_model = AutoModelForCausalLM.from_config(
        config(family, **overrides), attn_implementation=reference or reference_attention(family)).eval()
    state = reference_model.state_dict()
    sinks = [name for name in state if name.endswith("sinks")]
    assert bool(sinks) == (family in SINK_FAMILIES), f"{family}: sinks {sinks}: update SINK_FAMILIES"
    for name in sinks:
        state[name].copy_(torch.randn_like(state[name]))  # in place: the reference has them too
    paged = AutoModelForCausalLM.from_config(config(family, **overrides), attn_implementation="hf_paged").eval()
    paged.load_state_dict(state)
    assert reference_model.config._attn_implementation != paged.config._attn_implementation == "hf_paged"
    for model in (reference_model, paged):
        model.generation_config.pad_token_id = 0
        if dtype is not None:
            model.to(dtype)
    return reference_model, paged


def random_ids(batch: int, length: int, seed: int, vocab: int = VOCAB) -> torch.Tensor:
    """``[batch, length]`` random token ids, none of them special (0-2: pad, bos, eos)."""
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def left_padded_batch(lengths: list[int], seed: int = 0, vocab: int = VOCAB) -> dict:
    """Random prompts of the given lengths, left-padded with 0 to the longest: ``input_ids`` and
    ``attention_mask``."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length:] = torch.randint(3, vocab, (length,), generator=generator)
        attention_mask[row, width - length:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@dataclass
class Draw:
    """One seeded random ``generate()`` call (`random_draw`)."""

    seed: int
    family: str
    inputs: dict  # input_ids and attention_mask, left-padded
    generate: dict  # generate()'s keyword arguments besides the inputs and the cache
    block_size: int

    def run(self, model, **cache) -> torch.Tensor:
        """The call's sequences from `model`, its sampling seeded, given `cache` (``cache_config=...`` or a cache)."""
        torch.manual_seed(self.seed)
        return model.generate(**self.inputs, **self.generate, **cache)

    def reference_run(self, model, cache=dict) -> torch.Tensor:
        """`run` on Transformers' reference `model`, given the cache arguments ``cache()`` returns. Where its own
        cache refuses to crop what greedy prompt lookup rejected (Transformers 5.0.0 does not crop a sliding-window
        layer past its window), the tokens of greedy decoding without prompt lookup, which must be the same."""
        try:
            return self.run(model, **cache())
        except ValueError as error:
            if "crop" not in str(error) or "prompt_lookup_num_tokens" not in self.generate or self.generate["do_sample"]:
                raise
        greedy = {key: value for key, value in self.generate.items() if key != "prompt_lookup_num_tokens"}
        return dataclasses.replace(self, generate=greedy).run(model, **cache())


def random_draw(seed: int, families: Sequence[str]) -> Draw:
    """A random ``generate()`` call, the same for the same `seed`, over one of `families` that the installed
    Transformers has: 1 to 4 left-padded prompts of 1 to 40 tokens; greedy, beams or sampling, of random widths;
    random EOS tokens, so that rows end at different steps; logits processors (repetition penalty, no repeated
    n-grams); prompt-lookup decoding (candidate tokens checked in one step, the rejected ones cropped); and a block
    size that may or may not divide anything. Settings the parity tests fix one at a time meet here in combinations."""
    rng = random.Random(seed)
    family = rng.choice([name for name in families if available(name)])
    batch = rng.choice([1, 1, 2, 3, 4])
    inputs = left_padded_batch([rng.randint(1, 40) for _ in range(batch)], seed=seed)
    new_tokens = rng.randint(1, 16)
    generate = dict(max_new_tokens=new_tokens, min_new_tokens=rng.choice([0, new_tokens]))
    mode = rng.choice(["greedy", "beams", "sample"])
    if mode == "beams":
        beams = rng.randint(2, 4)
        generate.update(do_sample=False, num_beams=beams, num_return_sequences=rng.randint(1, beams),
                        length_penalty=rng.choice([0.0, 1.0, 2.0]), early_stopping=rng.choice([True, False]))
    elif mode == "sample":
        generate.update(do_sample=True, num_return_sequences=rng.randint(1, 4), top_k=rng.choice([0, 5]),
                        temperature=rng.choice([0.7, 1.0]))
    else:
        generate.update(do_sample=False)
    if rng.random() < 0.5:
        generate["eos_token_id"] = rng.sample(range(3, VOCAB), rng.choice([1, 3, 8]))
    if rng.random() < 0.3:
        generate["repetition_penalty"] = rng.choice([0.8, 1.3])
    if rng.random() < 0.2:
        generate["no_repeat_ngram_size"] = rng.choice([2, 3])
    if mode != "beams" and batch == 1 and generate.get("num_return_sequences", 1) == 1 and rng.random() < 0.3:
        generate["prompt_lookup_num_tokens"] = rng.choice([2, 4])
    return Draw(seed, family, inputs, generate, rng.choice([1, 2, 3, 5, 8, 16]))


def system_prompt(system_len: int, suffix_len: int, seed: int, system_seed: int = 0) -> torch.Tensor:
    """``[1, system_len + suffix_len]`` ids: a system prompt fixed by `system_seed`, then a suffix of its own."""
    return torch.cat([random_ids(1, system_len, system_seed), random_ids(1, suffix_len, seed)], dim=1)


def assert_stats_consistent(cache: PagedCache) -> None:
    """`cache.stats()` agrees with itself and with the cache's rows, and the first group's invariants hold."""
    stats = cache.stats()
    assert stats.used_blocks + stats.free_blocks == stats.num_blocks
    assert stats.used_bytes == stats.used_blocks * cache.bytes_per_block
    assert stats.pool_bytes == stats.num_blocks * cache.bytes_per_block
    assert stats.peak_used_bytes == stats.peak_used_blocks * cache.bytes_per_block
    assert stats.used_bytes <= stats.pool_bytes <= stats.peak_pool_bytes  # referenced <= allocated <= its peak
    assert stats.logical_bytes == stats.logical_tokens * cache.bytes_per_block // cache.block_size
    assert stats.logical_tokens == sum(cache.manager.lengths)
    assert stats.num_rows == cache.manager.num_rows
    assert stats.block_size == cache.block_size
    assert 0 <= stats.shared_blocks <= stats.used_blocks <= stats.peak_used_blocks <= stats.num_blocks
    assert stats.cow_copies >= 0
    cache.manager.check()


@dataclass
class Steps:
    """What `watch_steps` saw."""

    tokens: list[int] = field(default_factory=list)  # per step that stored tokens in a PagedCache: how many per row
    rollbacks: list[int] = field(default_factory=list)  # per crop seen between two steps of a cache: -tokens removed


@contextlib.contextmanager
def watch_steps(*models, check: bool = False) -> Iterator[Steps]:
    """Watch the forward steps of `models` that store tokens in a `PagedCache` (the cache among the forward's
    keyword arguments, through the public module hooks, so the caches ``generate`` builds and drops are seen too):
    how many tokens each stored, and how far a cache was rolled back (`PagedCache.crop`) before its next step. With
    `check`, every layer group's block-manager invariants are checked after each such step."""
    steps = Steps()
    lengths: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # a cache -> its length after its last step

    def cache_of(kwargs: dict) -> PagedCache | None:
        return next((value for value in kwargs.values() if isinstance(value, PagedCache)), None)

    def before(module, args, kwargs):
        cache = cache_of(kwargs)
        if cache is not None:
            length = cache.get_seq_length()
            if length < lengths.get(cache, 0):
                steps.rollbacks.append(length - lengths[cache])
            lengths[cache] = length

    def after(module, args, kwargs, output):
        cache = cache_of(kwargs)
        if cache is None:
            return
        length = cache.get_seq_length()
        if length > lengths.get(cache, 0):
            steps.tokens.append(length - lengths.get(cache, 0))
        lengths[cache] = length
        if check:
            for group in cache.groups:
                group.manager.check()

    handles = [handle for model in models for handle in (
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True))]
    try:
        yield steps
    finally:
        for handle in handles:
            handle.remove()


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


def count_prefill_positions(model, run):
    """Run `run()` and return how many positions the input embeddings saw in the first forward pass, and what
    `run()` returned."""
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(out.shape[:2]))
    try:
        result = run()
    finally:
        handle.remove()
    batch, length = seen[0]
    return batch * length, result


class RoundedCache(DynamicCache):
    """Transformers' `DynamicCache`, keeping every key and value as an 8-bit pool of `name` would give it back:
    rotated (`hf_paged.quant.rotated`, unless `rotate` is False: multi-head latent attention's latents), rounded,
    and rotated back. Written from `hf_paged.quant`'s definition, independently of how a `PagedCache` applies it."""

    def __init__(self, name: str, rotate: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.storage, self.rotate = quant.kv_format(name).dtype, rotate

    def _round(self, states):
        if not self.rotate:
            return quant.decode(quant.encode(states, self.storage), states.dtype)
        rotation = quant.rotation(states.shape[-1], states.device)
        stored = quant.encode(states.float() @ rotation, self.storage)
        return (quant.decode(stored) @ rotation).to(states.dtype)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(self._round(key_states), self._round(value_states), layer_idx, *args, **kwargs)


def rounded_cache(name: str, model) -> RoundedCache:
    """The `RoundedCache` that rounds as an 8-bit `PagedCache` of `model` does (latents unrotated)."""
    latent = any(isinstance(kind.attention, kinds.LatentAttention) for kind in kinds.plan_layers(model.config))
    return RoundedCache(name, rotate=not latent, config=model.config)
