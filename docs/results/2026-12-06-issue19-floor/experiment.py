"""The floor of the PyTorch path at batch 1: how fast can *any* cache that reads its keys in place be, next to
Transformers' DynamicCache (which concatenates every layer's keys and values at every step) under ``sdpa``?

`InPlaceCache` is the least work such a cache can do: per layer and step, the new keys and values are copied into
preallocated ``[B, Hkv, capacity, D]`` tensors and a view of the filled part goes to the same ``sdpa`` attention. No
blocks, no tables, no checks: a paged cache does at least this. The model is the bench's ``host`` scenario's
(`hf_paged.bench.scenarios.HOST_MODEL`, 30 layers, fp32): greedy, P=512, 64 new tokens, batch 1 and 8 distinct
prompts. hf_paged's PyTorch path (``HF_PAGED_BACKEND=torch``) runs beside them. Whole ``generate`` calls are timed
(prefill included), alternating, the median of `REPEATS` per implementation. Run from the repository root:
``python docs/results/2026-12-06-issue19-floor/experiment.py``.
"""

import os
import pathlib
import statistics
import sys
import time

import torch

os.environ["HF_PAGED_BACKEND"] = "torch"
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))  # the repository
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import hf_paged  # noqa: E402, F401  (registers "hf_paged")
from hf_paged.bench.scenarios import HOST_LAYERS, HOST_MODEL  # noqa: E402
from hf_paged.compat import cache_kwargs  # noqa: E402

PROMPT, NEW_TOKENS, REPEATS = 512, 64, 7


class InPlaceCache(DynamicCache):
    """Keys and values appended in place to preallocated tensors; attention gets views of them."""

    def __init__(self, capacity: int, **kwargs):
        super().__init__(**kwargs)
        self.capacity, self.buffers, self.lengths = capacity, {}, {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx not in self.buffers:
            batch, heads, _, dim = key_states.shape
            self.buffers[layer_idx] = (key_states.new_empty(batch, heads, self.capacity, dim),
                                       value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1]))
            self.lengths[layer_idx] = 0
        keys, values = self.buffers[layer_idx]
        start = self.lengths[layer_idx]
        end = self.lengths[layer_idx] = start + key_states.shape[2]
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        return keys[:, :, :end], values[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths.get(layer_idx, 0)

    def get_mask_sizes(self, query_length, layer_idx: int = 0):
        length = query_length if isinstance(query_length, int) else query_length.shape[0]
        return self.get_seq_length() + length, 0


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(**HOST_MODEL, num_hidden_layers=HOST_LAYERS, max_position_embeddings=PROMPT + NEW_TOKENS)
    model = LlamaForCausalLM(config).eval()
    settings = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    for batch in (1, 8):
        ids = torch.randint(3, HOST_MODEL["vocab_size"], (batch, PROMPT), generator=torch.Generator().manual_seed(1))
        impls = {
            "sdpa + DynamicCache": ("sdpa", lambda: {}),
            "sdpa + InPlaceCache": ("sdpa", lambda: cache_kwargs(InPlaceCache(PROMPT + NEW_TOKENS))),
            "hf_paged (PyTorch path)": ("hf_paged", lambda: {}),
        }
        times, outputs = {name: [] for name in impls}, {}
        for repeat in range(REPEATS + 1):
            for name, (attention, cache) in impls.items():
                model.set_attn_implementation(attention)
                begin = time.perf_counter()
                outputs[name] = model.generate(ids, **settings, **cache())
                if repeat:  # the first round warms up
                    times[name].append(time.perf_counter() - begin)
        reference = statistics.median(times["sdpa + DynamicCache"])
        for name, runs in times.items():
            same = torch.equal(outputs[name], outputs["sdpa + DynamicCache"])
            print(f"batch {batch}  {name:24s} median {statistics.median(runs):.3f} s  "
                  f"x {statistics.median(runs) / reference:.3f}  same tokens: {same}", flush=True)


if __name__ == "__main__":
    main()
