"""Walk every causal-LM type of the installed Transformers with a tiny random-weight model and compare hf_paged with
eager attention.

For each ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` a tiny config is derived from the family's own
config class (`tiny_config`: small widths, two layers (twice as many, half of them KV-shared, where the default
config shares keys and values between layers: Gemma 3n), few heads, a small vocabulary; `OVERRIDES` for the few
families that need more), and `check_family` returns one `Outcome`:

* ``match``: on a left-padded batch whose prompts are longer than a block, greedy search gives eager's tokens and
  logits (within `LOGITS_TOLERANCE`) and beam search gives eager's tokens, with a `PagedCache` really used; and
  greedy search with an EOS that ends one row early (the row then gives its blocks back) gives eager's tokens; and
  with 8-bit keys and values (``kv_dtype="int8"``) greedy search gives the tokens of eager over a
  `DynamicCache` that rounds keys and values the same way (`tiny_models.RoundedCache`), and its logits within
  `INT8_LOGITS_TOLERANCE`, where eager takes such a cache;
* ``refused``: loading with ``attn_implementation="hf_paged"`` raises an error naming hf_paged;
* ``reference``: eager itself cannot be built or run on a tiny config (the reason is kept);
* ``mismatch`` / ``error``: hf_paged runs and gives other tokens, or fails with an error (the walk's failures).

``python -m tests.families --markdown`` (from the repository root) prints the README's "What is supported" table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import traceback
import warnings

import torch
import transformers
from tiny_models import rounded_cache
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import hf_paged
from hf_paged import PagedCache
from hf_paged.compat import cache_kwargs

__all__ = ["Outcome", "check_family", "families", "markdown_table", "tiny_config"]

VOCAB = 128
BLOCK_SIZE = 16  # the block size of the PagedCache that generate() builds
PROMPT_LENGTHS = (BLOCK_SIZE + 5, BLOCK_SIZE - 6)  # left-padded; the longer one spans two blocks
NEW_TOKENS = 4
NUM_BEAMS = 2
# Largest difference of generate's logits allowed, relative to the spread of eager's logits (float32).
LOGITS_TOLERANCE = 1e-4
# The same on an int8 pool against eager over `RoundedCache`: keys that differ in their last float32 bit (hf_paged's
# and eager's arithmetic) can round to codes one step apart, 1/127 of a row's largest magnitude; measured up to
# 8e-4 of the spread (Transformers 5.25), where the tokens still agree exactly.
INT8_LOGITS_TOLERANCE = 1e-2


# Families whose eager reference cannot be built or run on a tiny config, because of Transformers itself or of
# what the family needs (keep this short: a tiny config in OVERRIDES is the better fix).
REFERENCE_BROKEN: dict[str, str] = {
    "blt": "byte-level model of four sub-models; no tiny config yet (193M parameters)",
    "cohere_compass_text": "the default config has empty rope_parameters (KeyError 'full_attention')",
    "dbrx": "the default attention config has no rope_theta",
    "gemma3n": "its vision tower needs timm",
    "gemma4_assistant": "the config validator rejects its own default hidden_size_per_layer_input",
    "gemma4_unified_assistant": "its layers use KV of layer types the tiny config does not produce",
    "musicgen": "the decoder needs audio-codebook inputs (fails on text ids)",
    "musicgen_melody": "the decoder needs audio-codebook inputs (fails on text ids)",
    "qwen4_exp": "the default config leaves the indexer's token budget and compress ratio unset",
    "qwen4_exp_text": "the default config leaves the indexer's token budget and compress ratio unset",
    "zamba": "its shared-transformer weight tying fails with two layers",
    "dory": "its first forward on a tiny config (5.24) compares a mask of 28 keys with 21 scores",
    "inkling2_loop_text": "its first forward on a tiny config (5.24) indexes an embedding out of range",
}

# Generic small sizes, applied to every attribute of these names that the config (or a sub-config) has.
_SMALL = {
    "vocab_size": VOCAB,
    "decoder_layers": 2,
    "encoder_layers": 2,
    "decoder_attention_heads": 4,
    "encoder_attention_heads": 4,
    "decoder_ffn_dim": 64,
    "encoder_ffn_dim": 64,
    "hidden_size": 64,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "d_head": 16,
    "global_head_dim": 32,  # Gemma 4's full-attention layers: wider than the others, as in the real models
    "ffn_hidden_size": 64,
    "expert_ffn_hidden_size": 32,
    "mamba_d_ssm": 128,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 16,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_d_state": 16,
    "mamba_dt_rank": 8,
    "n_group": 1,
    "topk_group": 1,
    "kv_lora_rank": 16,
    "q_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": None,
}
# Attributes made smaller only if the default is larger (a window shorter than the prompt is what is tested).
_AT_MOST = {"sliding_window": 8, "rotary_dim": 8, "attention_chunk_size": 8, "first_k_dense_replace": 1}

# Families whose generic tiny config needs something more (each entry says why).
OVERRIDES: dict[str, dict] = {
    "mamba2": {"num_heads": 8},  # num_heads * head_dim must be expand * hidden_size
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1]},  # one Mamba layer, one attention layer
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},  # the default has none
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},  # the default has no attention layer
    "zamba2": {"mamba_headdim": 16, "n_mamba_heads": 8, "attention_head_dim": 32,
               "layers_block_type": ["mamba", "hybrid"]},
    "reformer": {"is_decoder": True, "axial_pos_embds": False},
    "longcat_flash": {"moe_topk": 2, "zero_expert_num": 2},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"], "lru_width": 64, "attention_window_size": 8},
    "zamba": {"layers_block_type": ["linear_attention", "hybrid"], "attention_hidden_size": 128,
              "attention_head_dim": 32, "mamba_dt_rank": 8},
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},
    "xmod": {"default_language": "en_XX"},
    # windows off by default, common in checkpoints: a window shorter than the prompt is what is worth testing
    "phimoe": {"sliding_window": 8},
    "mixtral": {"sliding_window": 8},
    "starcoder2": {"sliding_window": 8},
    "musicgen_decoder": {"num_codebooks": 1},  # one row of input ids per sequence
    "musicgen_melody_decoder": {"num_codebooks": 1},
}
# A tiny config must give a tiny model (this many parameters at most), or the walk takes minutes.
MAX_PARAMETERS = 20_000_000


@dataclasses.dataclass
class Outcome:
    """The walk's verdict on one model type (see the module docstring for `status`)."""

    model_type: str
    status: str  # match | refused | reference | mismatch | error
    detail: str = ""
    architecture: str = ""
    seconds: float = 0.0


def families() -> list[str]:
    """Every causal-LM model type of the installed Transformers, sorted."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _small(config):
    """A config of the same class as `config`, rebuilt with the `_SMALL` / `_AT_MOST` sizes (sub-configs too)."""
    kwargs = {}
    for name, value in _sizes(config).items():
        if not isinstance(getattr(type(config), name, None), property):
            kwargs[name] = value
    for sub_name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, sub_name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[sub_name] = _small(sub)
    return type(config)(**kwargs)


def _patch(config):
    """`config` (and its sub-configs) with the `_SMALL` / `_AT_MOST` sizes set on it in place."""
    for sub_name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, sub_name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _patch(sub)
    for name, value in _sizes(config).items():
        try:
            setattr(config, name, value)
        except AttributeError:  # a derived property
            pass
    return config


def _sizes(config) -> dict:
    """The attributes `config` has among `_SMALL` / `_AT_MOST`, with their tiny values, then `OVERRIDES`."""
    # Only stored attributes (and their aliases): a property may raise for a per-layer attribute.
    names = set(vars(config)) | set(getattr(config, "attribute_map", {}))
    stored = vars(config)
    sizes = {name: value for name, value in _SMALL.items() if name in names}
    if "kv_lora_rank" in names:  # MLA: as many key/value heads as query heads, head_dim is the rope width
        sizes["num_key_value_heads"] = sizes["num_attention_heads"]
        sizes["head_dim"] = sizes["qk_rope_head_dim"]
    if "qk_head_dim" in names:
        sizes["qk_head_dim"] = sizes["qk_rope_head_dim"] + sizes["qk_nope_head_dim"]
    for name, value in _AT_MOST.items():
        current = stored.get(name)
        if isinstance(current, int) and not isinstance(current, bool) and current > value:
            sizes[name] = value
    layer_types = stored.get("layer_types")
    if isinstance(layer_types, list | tuple) and layer_types:
        kinds = list(dict.fromkeys(layer_types))  # one layer of each kind, in order of first appearance
        layers = max(_SMALL["num_hidden_layers"], len(kinds))
        shared = stored.get("num_kv_shared_layers")
        if isinstance(shared, int) and 0 < shared < len(layer_types):
            # KV sharing on, as in the default config (Gemma 3n): one layer of each kind stores its keys, then one
            # of each kind reads them.
            sizes["num_kv_shared_layers"] = layers
            layers *= 2
        sizes["layer_types"] = (kinds * layers)[:layers]
        sizes["num_hidden_layers"] = layers
    sizes.update(OVERRIDES.get(getattr(config, "model_type", ""), {}))
    return sizes


# Two ways to make a config tiny: rebuild it from the small sizes (derived fields follow them), or set the sizes
# on the default config (for classes whose constructor derives something the sizes contradict). The walk uses the
# first under which eager runs.
STRATEGIES = {"rebuild": _small, "patch": _patch}


def tiny_config(model_type: str, strategy: str = "rebuild"):
    """A tiny config of `model_type`: the family's defaults with the `_SMALL` / `_AT_MOST` sizes and `OVERRIDES`."""
    return _for_architecture(model_type, STRATEGIES[strategy](AutoConfig.for_model(model_type)))


def _batch(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    width = max(PROMPT_LENGTHS)
    input_ids = torch.zeros(len(PROMPT_LENGTHS), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, length in enumerate(PROMPT_LENGTHS):
        input_ids[row, width - length:] = torch.randint(3, VOCAB, (length,), generator=generator)
        attention_mask[row, width - length:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _architecture(model_type: str):
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def _for_architecture(model_type: str, config):
    """`config`, or its sub-config of the class the causal-LM architecture takes (MusicGen's decoder)."""
    wanted = _architecture(model_type).config_class
    if isinstance(config, wanted):
        return config
    for sub_name in getattr(config, "sub_configs", {}) or {}:
        if isinstance(getattr(config, sub_name, None), wanted):
            return getattr(config, sub_name)
    return config


def _load(model_type: str, config, attn_implementation: str):
    architecture = _architecture(model_type)
    with torch.device("meta"):
        size = sum(p.numel() for p in architecture._from_config(copy.deepcopy(config)).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"the tiny config still has {size / 1e6:.0f}M parameters (add an entry to OVERRIDES)")
    model = architecture._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def _generate(model, batch: dict, **kwargs):
    with torch.no_grad():
        return model.generate(**batch, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              return_dict_in_generate=True, output_logits=True, **kwargs)


def _reason(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) < 300 else text[:297] + "..."


def check_family(model_type: str) -> Outcome:
    """Compare hf_paged with eager on `model_type` (see the module docstring)."""
    start = time.perf_counter()
    outcome = _check(model_type)
    outcome.seconds = time.perf_counter() - start
    outcome.architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    return outcome


def _is_refusal(error: BaseException) -> bool:
    return isinstance(error, NotImplementedError) and str(error).startswith("hf_paged: ")


def _check(model_type: str) -> Outcome:
    batch = _batch()
    failures = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for strategy in STRATEGIES:
            paged = paged_error = None
            try:
                paged = _load(model_type, tiny_config(model_type, strategy), hf_paged.ATTN_IMPLEMENTATION)
            except Exception as error:
                if _is_refusal(error):
                    return Outcome(model_type, "refused", str(error))
                paged_error = error
            try:
                torch.manual_seed(0)
                reference = _load(model_type, tiny_config(model_type, strategy), "eager")
                expected_greedy = _generate(reference, batch)
                expected_beams = _generate(reference, batch, num_beams=NUM_BEAMS)
            except Exception as error:  # the reference itself cannot be built or run on this config
                failures.append(f"{strategy}: {_reason(error)}")
                continue
            if paged_error is not None:
                return Outcome(model_type, "error", f"at load: {_reason(paged_error)}")
            break
        else:
            return Outcome(model_type, "reference", failures[0])
        try:
            paged.load_state_dict(reference.state_dict())
            greedy = _generate(paged, batch)
            beams = _generate(paged, batch, num_beams=NUM_BEAMS)
            # An EOS ending row 1 at its second token while row 0 goes on: in the cache generate builds and drops,
            # row 1 then gives its blocks back and reads garbage keys, which must change no returned token.
            eos = dict(eos_token_id=int(expected_greedy.sequences[1, -NEW_TOKENS + 1]), max_new_tokens=NEW_TOKENS,
                       do_sample=False)
            with torch.no_grad():
                expected_eos, ended = reference.generate(**batch, **eos), paged.generate(**batch, **eos)
        except Exception as error:
            return Outcome(model_type, "error", _reason(error) + " | " + traceback.format_exc(limit=-2)
                           .replace("\n", " ")[-300:])
    for name, out in (("greedy", greedy), ("beams", beams)):
        cache = out.past_key_values
        if not isinstance(cache, PagedCache) or cache.stats().logical_tokens == 0:
            return Outcome(model_type, "error", f"{name}: generate did not use a PagedCache (got {type(cache).__name__})")
    if not torch.equal(greedy.sequences, expected_greedy.sequences):
        return Outcome(model_type, "mismatch", f"greedy tokens differ: {greedy.sequences[:, -NEW_TOKENS:].tolist()} "
                                               f"vs eager {expected_greedy.sequences[:, -NEW_TOKENS:].tolist()}")
    got, want = torch.stack(greedy.logits), torch.stack(expected_greedy.logits)
    spread = float(want.std()) or 1.0
    difference = float((got - want).abs().max()) / spread
    if difference > LOGITS_TOLERANCE:
        return Outcome(model_type, "mismatch", f"greedy logits differ by {difference:.2e} of their spread")
    if not torch.equal(beams.sequences, expected_beams.sequences):
        return Outcome(model_type, "mismatch", "beam search tokens differ")
    if not torch.equal(ended, expected_eos):
        return Outcome(model_type, "mismatch", f"greedy tokens with an EOS differ: {ended[:, -NEW_TOKENS:].tolist()} "
                                               f"vs eager {expected_eos[:, -NEW_TOKENS:].tolist()}")
    eight_bit = _eight_bit(reference, paged, batch)
    if eight_bit.startswith("mismatch"):
        return Outcome(model_type, "mismatch", eight_bit)
    return Outcome(model_type, "match", f"logits within {difference:.1e}; {eight_bit}")


def _eight_bit(reference, paged, batch) -> str:
    """Greedy search on an int8 pool against eager over `RoundedCache`: a line for the outcome's detail, starting
    with "mismatch" when they differ."""
    try:
        expected = _generate(reference, batch, **cache_kwargs(rounded_cache("int8", reference)))
    except Exception as error:  # a family whose eager attention cannot run on a DynamicCache (its own cache class)
        return f"int8 not compared: eager cannot take a DynamicCache ({_reason(error)[:120]})"
    try:
        got = _generate(paged, batch, cache_config={"kv_dtype": "int8"})
    except ValueError as error:
        if "8-bit keys and values need an even head_dim" in str(error):
            return "int8 refused: an odd head_dim"
        return f"mismatch: int8 failed: {_reason(error)}"
    except Exception as error:
        return f"mismatch: int8 failed: {_reason(error)}"
    if not torch.equal(got.sequences, expected.sequences):
        return (f"mismatch: int8 tokens differ: {got.sequences[:, -NEW_TOKENS:].tolist()} vs eager over rounded keys "
                f"{expected.sequences[:, -NEW_TOKENS:].tolist()}")
    want = torch.stack(expected.logits)
    difference = float((torch.stack(got.logits) - want).abs().max()) / (float(want.std()) or 1.0)
    if difference > INT8_LOGITS_TOLERANCE:
        return f"mismatch: int8 logits differ by {difference:.2e} of their spread"
    return f"int8 within {difference:.1e}"


def walk(model_types: list[str] | None = None, verbose: bool = False) -> list[Outcome]:
    outcomes = []
    for model_type in model_types or families():
        outcome = check_family(model_type)
        if verbose:
            print(f"{outcome.model_type:28s} {outcome.status:9s} {outcome.seconds:5.1f}s {outcome.detail}",
                  file=sys.stderr, flush=True)
        outcomes.append(outcome)
    return outcomes


_STATUS_TEXT = {
    "match": "same tokens (greedy, beams, greedy with EOS) and logits as eager",
    "refused": "refused at load with the reason",
    "reference": "not checked: eager fails on a tiny config",
    "mismatch": "runs, but gives other output than eager",
    "error": "fails during generate",
}


def _refusal_reason(detail: str) -> str:
    """The reason part of a refusal (between 'attn_implementation="hf_paged": ' and '. Load it')."""
    reason = detail.split('attn_implementation="hf_paged": ', 1)[-1]
    return reason.split(". Load it", 1)[0]


def markdown_table(outcomes: list[Outcome]) -> str:
    """The README's "What is supported" tables, from the walk's outcomes."""
    names = lambda group: ", ".join(f"`{o.model_type}`" for o in group)  # noqa: E731
    lines = [
        f"`tests/test_families.py` walks all {len(outcomes)} causal-LM types of the installed Transformers "
        f"{transformers.__version__} (tiny random-weight models, a left-padded batch, greedy, beam search, and greedy "
        "with an EOS that ends one row early, against `eager`). Regenerate these tables with "
        "`python -m tests.families --markdown`.",
        "",
        "| hf_paged | count | model types |",
        "|---|---|---|",
    ]
    for status, text in _STATUS_TEXT.items():
        group = [o for o in outcomes if o.status == status]
        if group:
            lines.append(f"| {text} | {len(group)} | {names(group)} |")
    refused = [o for o in outcomes if o.status == "refused"]
    if refused:
        lines += ["", "| refused at load | why |", "|---|---|"]
        lines += [f"| `{o.model_type}` | {_refusal_reason(o.detail)} |" for o in refused]
    others = [o for o in outcomes if o.status not in ("match", "refused")]
    if others:
        lines += ["", "| not supported yet | why |", "|---|---|"]
        for o in others:
            why = (f"eager fails: {REFERENCE_BROKEN.get(o.model_type, o.detail)}" if o.status == "reference"
                   else f"{o.status}: {o.detail}")
            lines.append(f"| `{o.model_type}` | {why.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_types", nargs="*", help="model types to walk (default: all)")
    parser.add_argument("--markdown", action="store_true", help="print the README table")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    outcomes = walk(args.model_types, verbose=True)
    if args.markdown:
        print(markdown_table(outcomes))


if __name__ == "__main__":
    main()
