"""Run by `test_tensor_parallel.py` under ``torchrun --nproc_per_node 2`` (CPU, gloo): load a saved tiny Llama with
tensor parallelism under "hf_paged" and under "sdpa", generate greedy and with beams + num_return_sequences, and
write each rank's tokens and pool shape to ``<out>/rank<r>.json``.

    torchrun --nproc_per_node 2 tests/tp_worker.py MODEL_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

import hf_paged
from hf_paged.compat import output_cache, tensor_parallel_kwargs

torch.set_num_threads(1)


def main(model_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 90, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    modes = {"greedy": dict(do_sample=False), "beams": dict(num_beams=3, num_return_sequences=2, do_sample=False)}
    result: dict = {"rank": rank, "world": dist.get_world_size()}
    for attn in ("sdpa", "hf_paged"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32,
                                                     **tensor_parallel_kwargs("auto")).eval()
        for name, mode in modes.items():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0,
                                 return_dict_in_generate=True, **mode)
            result[f"{attn}/{name}"] = out.sequences.tolist()
            if attn == "hf_paged":
                cache = output_cache(out)
                assert isinstance(cache, hf_paged.PagedCache), type(cache)
                result[f"pool/{name}"] = list(cache.kv_pool.shape)
        del model
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    # No barrier or destroy_process_group here: with gloo on CPU they can hang after a TP model was used, and the
    # interpreter's own shutdown can abort in gloo's threads ("terminate called without an active exception", seen
    # with Transformers 5.17): the results are written, so leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:3])
