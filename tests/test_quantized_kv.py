"""8-bit keys and values (``kv_dtype``, `hf_paged.quant`): the format's rounding, the options and their errors, the
bytes a pool takes, and generate() on an 8-bit pool.

Tokens from an 8-bit pool may differ from sdpa's, so generate() is checked three ways:

* exactly, against Transformers' own attention over a `DynamicCache` that rounds every key and value it is given
  the way an 8-bit pool stores them (`tiny_models.RoundedCache`): the same function, computed independently;
* exactly where rounding cannot matter: every row's keys are rounded alone, token by token and head by head, so
  sharing a prompt's blocks, copying them on write, the block size and prefix-cache hits change no token of an
  8-bit run;
* within a bound on the logits of the unquantized hf_paged (quality), on families without a mixture-of-experts
  router, whose top-k choice a rounded key can flip (a step of the logits, not a drift).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    FEATURE_FAMILIES,
    PARITY_FAMILIES,
    available,
    left_padded_batch,
    model_pair,
    random_draw,
    random_ids,
    rounded_cache,
)

import hf_paged
from hf_paged import PagedCache, quant
from hf_paged.compat import cache_kwargs, output_cache

FORMATS = ("int8", "float8_e4m3fn")
# The largest logit difference from the unquantized pool, over the logits' spread, at the steps before the first
# differing token (a random tiny model's logits move with every key, so this is a loose bound on the rounding).
QUALITY_BOUND = {"int8": 0.05, "float8_e4m3fn": 0.25}


@pytest.fixture(autouse=True)
def _pytorch_path(monkeypatch):
    monkeypatch.setenv("HF_PAGED_BACKEND", "torch")


# ------------------------------------------------------------------------------------------------- the format
@pytest.mark.parametrize("name", FORMATS)
def test_rounding_error_is_bounded_by_the_scale(name):
    fmt = quant.kv_format(name)
    generator = torch.Generator().manual_seed(0)
    states = torch.randn(64, 3, 32, generator=generator) * torch.logspace(-3, 3, 64)[:, None, None]
    stored = quant.encode(states, fmt.dtype)
    assert stored.shape == (64, 3, 34) and stored.dtype == fmt.dtype
    decoded = quant.decode(stored)
    magnitude = stored[..., -2:].view(torch.float16).float()
    assert torch.equal(magnitude, states.abs().amax(-1, keepdim=True).half().float())
    scale = magnitude / fmt.qmax
    error = (decoded - states).abs()
    if name == "int8":  # half a step of the scale, plus the scale's own rounding to float16
        assert bool((error <= scale * 0.5 + states.abs() * 2 ** -10).all())
    else:  # 3 mantissa bits: half an ulp is 1/16 of the value, or of the smallest normal (2**-6) times the scale
        assert bool((error <= torch.maximum(states.abs() / 16, scale * 2 ** -9) + states.abs() * 2 ** -10).all())
    # The largest magnitude of each row is represented to within its rounding to float16, however small the row.
    top = states.abs().amax(-1)
    assert torch.allclose(decoded.abs().amax(-1), top, rtol=2 ** -10, atol=0)


@pytest.mark.parametrize("name", FORMATS)
def test_zero_rows_strided_reads_and_other_dtypes(name):
    dtype = quant.kv_format(name).dtype
    zeros = quant.decode(quant.encode(torch.zeros(2, 4, 8), dtype))
    assert torch.equal(zeros, torch.zeros(2, 4, 8))
    states = torch.randn(3, 5, 2, 16, dtype=torch.bfloat16)
    stored = quant.encode(states, dtype)
    assert torch.equal(quant.decode(stored.transpose(0, 2)), quant.decode(stored).transpose(0, 2))
    assert quant.decode(stored, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("name", FORMATS)
def test_keys_and_values_encoded_together_are_encoded_as_each_alone(name):
    """A write encodes a layer's keys and values in one call where they are few (`quant.encode_pair`, a decode
    step) and each alone where they are many or differ in shape or dtype: the same stored bytes either way, and
    rows already stored are left as they are."""
    dtype = quant.kv_format(name).dtype
    generator = torch.Generator().manual_seed(1)
    for keys_shape, values_shape, values_dtype in [((4, 3, 16), (4, 3, 16), torch.float32),  # stacked
                                                   ((1024, 3, 64), (1024, 3, 64), torch.float32),  # one by one
                                                   ((4, 3, 16), (4, 2, 16), torch.float32),
                                                   ((4, 3, 16), (4, 3, 16), torch.bfloat16)]:
        keys = torch.randn(keys_shape, generator=generator) * 5
        values = torch.randn(values_shape, generator=generator).to(values_dtype)
        stored_keys, stored_values = quant.encode_pair(keys, values, dtype)
        assert torch.equal(stored_keys.view(torch.uint8), quant.encode(keys, dtype).view(torch.uint8))
        assert torch.equal(stored_values.view(torch.uint8), quant.encode(values, dtype).view(torch.uint8))
    already = quant.encode(keys, dtype)
    kept_keys, kept_values = quant.to_storage_pair(already, already, dtype, dtype)
    assert kept_keys is already and kept_values is already


def test_every_float8_code_decodes_as_pytorch_converts_it():
    """`quant.decode` reads float8 codes through their bits (PyTorch's conversion is slow on the CPU): every code but
    NaN, which `encode` never writes, gives what PyTorch's float8 -> float32 conversion gives."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    stored = torch.zeros(256, 4, dtype=torch.float8_e4m3fn)  # rows of two codes (head_dim 2), then the magnitude
    stored[:, 0] = codes
    stored.view(torch.uint8)[:, 2:] = torch.tensor([448.0], dtype=torch.float16).view(torch.uint8)  # scale 1
    expected = codes.float()
    assert torch.equal(quant.decode(stored)[:, 0][~expected.isnan()], expected[~expected.isnan()])
    # The decode's scale is 2**120 times the row's: it stays finite (and the products exact) at both ends of the
    # magnitude's range.
    for magnitude in (quant.MAGNITUDE_MIN, quant.MAGNITUDE_MAX):
        stored.view(torch.uint8)[:, 2:] = torch.tensor([magnitude], dtype=torch.float16).view(torch.uint8)
        scaled = expected * (torch.tensor(magnitude) / 448.0)
        assert torch.equal(quant.decode(stored)[:, 0][~expected.isnan()], scaled[~expected.isnan()])


def test_kv_dtype_names_and_refusals():
    assert quant.kv_format("fp8") is quant.kv_format(torch.float8_e4m3fn) is quant.KV_FORMATS["float8_e4m3fn"]
    assert quant.kv_format(torch.int8).name == "int8" and quant.kv_format(None) is None
    assert quant.kv_format("auto") is None
    with pytest.raises(ValueError, match="kv_dtype='int4' is not a KV storage format; use 'int8' or 'float8_e4m3fn'"):
        quant.kv_format("int4")
    with pytest.raises(ValueError, match="kv_dtype=torch.float16 is not a KV storage format"):
        quant.kv_format(torch.float16)
    _, paged = model_pair("llama")
    with pytest.raises(ValueError, match="pass dtype=torch.float16 or kv_dtype='int8' to PagedCache, not both"):
        PagedCache(paged.config, dtype=torch.float16, kv_dtype="int8")
    assert PagedCache(paged.config, kv_dtype="int8").pool.dtype == torch.int8


def test_an_odd_head_dim_is_refused_before_anything_is_written():
    _, paged = model_pair("llama")
    cache = PagedCache(paged.config, kv_dtype="int8")
    keys = torch.randn(1, 2, 3, 15)
    with pytest.raises(ValueError, match="8-bit keys and values need an even head_dim.*this model's is 15"):
        cache.update(keys, keys, 0)
    assert cache.pool.tensor is None and cache.manager.num_rows == 0
    with pytest.raises(ValueError, match="need an even head_dim"):  # and by the format itself
        quant.encode(keys, torch.int8)


# -------------------------------------------------------------------------------------------- generate()
def _greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kwargs)


def _within_quality_bound(quantized, reference, bound):
    """The logits of `quantized` differ from `reference`'s by at most `bound` of their spread, at every step up to
    and including the first whose chosen token differs in some row."""
    got, want = torch.stack(quantized.logits), torch.stack(reference.logits)  # [steps, B, V]
    new = quantized.sequences[:, -len(quantized.logits):] != reference.sequences[:, -len(reference.logits):]
    differing = new.any(dim=0).nonzero()
    steps = int(differing[0]) + 1 if len(differing) else got.shape[0]
    spread = float(want.std())
    difference = float((got[:steps] - want[:steps]).abs().max()) / spread
    assert difference <= bound, f"logits differ by {difference:.3g} of their spread (bound {bound})"
    return difference


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss", "deepseek_v3", "llama4_text", "qwen3_next"])
def test_same_tokens_as_transformers_attention_over_rounded_keys(family, name):
    """Left-padded rows on families with each attention feature (GQA, sliding window and softcap, sinks, multi-head
    latent attention, chunked attention, a hybrid with linear-attention layers), a block size that divides no
    prompt, prompts spanning several blocks: the reference attention over a cache that rounds as the pool does
    gives the same tokens, and logits within float32 rounding."""
    if not available(family):
        pytest.skip(f"{family}: not in this Transformers")
    try:
        reference, paged = model_pair(family)
    except NotImplementedError as error:  # refused at load here (before 5.x's Cache classes: qwen3_next on 5.0)
        assert "hf_paged" in str(error)
        pytest.skip(str(error))
    inputs = left_padded_batch([21, 13, 30])
    expected = _greedy(reference, inputs, **cache_kwargs(rounded_cache(name, reference)))
    got = _greedy(paged, inputs, cache_config={"block_size": 4, "kv_dtype": name})
    assert output_cache(got).pool.dtype == quant.kv_format(name).dtype
    assert torch.equal(got.sequences, expected.sequences)
    assert torch.allclose(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seed", range(24))
def test_random_settings_give_the_tokens_of_transformers_attention_over_rounded_keys(pairs, seed):
    """A seeded random `generate()` call (`tiny_models.random_draw`: batch and padding, decoding mode and widths,
    early EOS, logits processors, prompt lookup, block size) on an 8-bit pool, int8 and float8 in turn."""
    name = FORMATS[seed % 2]
    draw = random_draw(1000 + seed, PARITY_FAMILIES + FEATURE_FAMILIES)
    reference, paged = pairs(draw.family)
    expected = draw.reference_run(reference, lambda: cache_kwargs(rounded_cache(name, reference)))
    got = draw.run(paged, cache_config={"block_size": draw.block_size, "kv_dtype": name})
    assert torch.equal(got, expected), f"{name}: tokens differ: {draw}"


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("family", ["llama", "gemma2", "deepseek_v3", "llama4_text"])
def test_generate_stays_within_a_quality_bound_of_the_unquantized_pool(family, name):
    """The same batch, 8 bits against the unquantized pool: logits within `QUALITY_BOUND` of their spread."""
    _, paged = model_pair(family)
    inputs = left_padded_batch([21, 13, 30])
    reference = _greedy(paged, inputs, cache_config={"block_size": 4})
    quantized = _greedy(paged, inputs, cache_config={"block_size": 4, "kv_dtype": name})
    cache = output_cache(quantized)
    assert cache.pool.dtype == quant.kv_format(name).dtype
    for group in cache.groups:
        group.manager.check()
    _within_quality_bound(quantized, reference, QUALITY_BOUND[name])


@pytest.mark.parametrize("name", FORMATS)
def test_sharing_copy_on_write_and_block_size_change_no_token(name):
    """Beams and samples share the prompt's blocks and copy partial blocks on write; with 8-bit rows rounded one by
    one, neither that nor the block size changes a token: beams of block size 16 and 5, and seeded samples sharing
    one prompt or computing 4 copies of it, agree exactly."""
    _, paged = model_pair("llama")
    ids = random_ids(1, 23, seed=3)
    kwargs = dict(max_new_tokens=10, num_beams=4, num_return_sequences=2, do_sample=False)
    beams = [paged.generate(ids, cache_config={"block_size": size, "kv_dtype": name}, **kwargs) for size in (16, 5)]
    assert torch.equal(beams[0], beams[1])
    torch.manual_seed(7)
    shared = paged.generate(ids, do_sample=True, num_return_sequences=4, max_new_tokens=10,
                            cache_config={"kv_dtype": name}, return_dict_in_generate=True)
    torch.manual_seed(7)
    copies = paged.generate(ids.repeat(4, 1), do_sample=True, max_new_tokens=10, cache_config={"kv_dtype": name})
    assert torch.equal(shared.sequences, copies)
    stats = output_cache(shared).stats()
    assert stats.cow_copies >= 1  # the prompt's last, partial block was shared and then copied on write


def test_pool_bytes_are_the_stored_rows():
    """An 8-bit pool allocates ``(D + 2)`` bytes per head and token where float32 allocates ``4 D``: the
    scales are in the bytes a user is told about."""
    _, paged = model_pair("llama", head_dim=32)
    ids = random_ids(2, 40, seed=1)
    stats = {}
    for name in (None, "int8", "float8_e4m3fn"):
        out = paged.generate(ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                             cache_config={"kv_dtype": name} if name else None)
        stats[name] = output_cache(out).stats()
    for name in FORMATS:
        assert stats[name].num_blocks == stats[None].num_blocks
        assert stats[name].pool_bytes * 4 * 32 == stats[None].pool_bytes * (32 + 2)


@pytest.mark.parametrize("name", FORMATS)
def test_prefix_cache_hits_change_no_token(name):
    """A prefix-cache hit reads the stored 8-bit blocks where a miss writes and reads them: the same tokens as
    without prefix caching, and the model's pools hold only that format."""
    _, paged = model_pair("llama")
    system = random_ids(1, 40, seed=5)
    prompts = [torch.cat([system, random_ids(1, 6, seed=10 + i)], dim=1) for i in range(2)]
    expected = [paged.generate(p, max_new_tokens=8, do_sample=False, cache_config={"kv_dtype": name})
                for p in prompts]
    state = hf_paged.enable_prefix_caching(paged, kv_dtype=name)
    try:
        got = []
        for p in prompts:
            out = paged.generate(p, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
            got.append(out.sequences)
        assert output_cache(out).prefix_hit_tokens >= 32
        assert all(pool.dtype == quant.kv_format(name).dtype for pool in state.pools.values())
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)
        with pytest.raises(ValueError, match="does not apply to a model with prefix caching"):
            paged.generate(prompts[0], max_new_tokens=2, cache_config={"kv_dtype": "int8"})
    finally:
        hf_paged.disable_prefix_caching(paged)


def test_layer_keys_read_back_decoded():
    """``layers[i].keys`` are the decoded keys, within the format's rounding of what the model computed."""
    _, paged = model_pair("llama")
    ids = random_ids(1, 9, seed=2)
    cache = PagedCache(paged.config, kv_dtype="int8")
    plain = PagedCache(paged.config)
    with torch.no_grad():
        paged(ids, past_key_values=cache)
        paged(ids, past_key_values=plain)
    keys, reference = cache.layers[0].keys, plain.layers[0].keys
    assert keys.dtype == torch.float32 and keys.shape == reference.shape
    assert torch.allclose(keys, reference, atol=float(reference.abs().max()) / 127)
    assert cache.layers[0].key_pool.shape[-1] == reference.shape[-1] + 2
    # What the pool holds is the keys rotated (`quant.rotated`), then rounded.
    stored = quant.from_storage(cache.layers[0].key_pool[0, :9])  # the row's one block: [9, Hkv, D]
    rotated = quant.rotated(reference[0].transpose(0, 1))
    assert torch.allclose(stored, rotated, atol=float(rotated.abs().max()) / 127)
    assert not torch.allclose(stored, reference[0].transpose(0, 1), atol=float(reference.abs().max()) / 16)
