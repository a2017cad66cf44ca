"""What the device check (`hf_paged.bench.gpu_check`) runs: its sizes (`Plan`: the full check on a GPU, the dry
run on the CPU), its time budget (`Clock`), and the pieces its phases share (the random-weight Llama, prompts,
comparing tokens)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["Clock", "Plan", "build_model", "compare", "make_plan", "no_report", "prompt_ids", "sync"]


@dataclass(frozen=True)
class Plan:
    """Sizes of one check: the full one on a GPU, or the dry run on the CPU."""

    device: str
    dtype: torch.dtype  # the bench's, the teacher-forced logits' and decode_bytes' model
    parity_dtype: torch.dtype  # the token-equality parity's model
    model: dict  # LlamaConfig keyword arguments
    split_model: dict
    prompt_lens: tuple[int, ...]
    new_tokens: int
    batch: int  # different prompts in the batch scenario
    k: int  # num_return_sequences of the sampling scenario, num_beams of the beam scenario
    parity_prompt: int
    parity_tokens: int
    copy_bytes: int
    phase_seconds: dict  # each phase's own budget (it also gets no more than what is left of the whole)


def make_plan(dry: bool) -> Plan:
    if dry:
        tiny = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256)
        seconds = dict(bandwidth=20, kernels=150, parity=60, bench=120, logits=40, split=60, decode_bytes=40)
        return Plan("cpu", torch.float32, torch.float32, tiny, {**tiny, "num_hidden_layers": 4}, (16, 40), 6, 4, 4,
                    21, 6, 16 * 2**20, seconds)
    model = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=12,
                 num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                 initializer_range=0.04)  # peakier logits than 0.02: fewer near-ties
    split = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.04)
    # 470 s in all, in the order the phases run; a phase that ends early leaves its time to the next ones.
    seconds = dict(bandwidth=15, kernels=130, parity=60, bench=150, logits=45, split=30, decode_bytes=40)
    return Plan("cuda", torch.bfloat16, torch.float32, model, split, (512, 2048), 128, 32, 8, 200, 48, 2**31,
                seconds)


class Clock:
    """The time budget: every phase asks how much is left before it starts, and caps what it runs by it."""

    def __init__(self, budget: float):
        self.start = time.perf_counter()
        self.budget = budget

    @property
    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def prompt_ids(vocab: int, length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def build_model(config: dict, plan: Plan, attn: str = "sdpa"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**config, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(plan.device):
        model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=plan.dtype)
    model.generation_config.pad_token_id = 0
    return model.eval()


def compare(expected: torch.Tensor, got: torch.Tensor, prompt_len: int) -> dict:
    """How far two ``[rows, prompt + new]`` token tensors agree past the prompt."""
    new_expected, new_got = expected[:, prompt_len:], got[:, prompt_len:]
    if new_expected.shape != new_got.shape:
        return {"match": False, "rows_equal": 0, "rows": len(new_expected), "first_difference": 0}
    differs = (new_expected != new_got).any(dim=0).nonzero()
    return {
        "match": bool(torch.equal(new_expected, new_got)),
        "rows_equal": int((new_expected == new_got).all(dim=1).sum()),
        "rows": len(new_expected),
        "first_difference": int(differs[0]) if len(differs) else None,
    }


def no_report(partial: dict) -> None:
    """Where a phase run in the main process sends its partial results: nowhere (the record follows the phase)."""
