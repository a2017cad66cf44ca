"""Deterministic prompts of an exact token length, cut from real text tokenized by the model's own tokenizer."""

from __future__ import annotations

import torch

__all__ = ["TEXT", "batch_lengths", "chat_wrap", "left_pad", "make_prompt", "token_stream"]

# Plain English prose (written for this benchmark), repeated as needed to reach any prompt length.
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small can of oil and a "
    "notebook in which she wrote down the weather, the ships she had seen and anything unusual about the sea. "
    "Over thirty years the notebooks filled two shelves in the kitchen below. Visitors sometimes asked whether "
    "the work was lonely, and she would answer that the sea was never the same twice, that the gulls had "
    "personalities, and that a storm seen from the lamp room was worth a hundred quiet nights. When the light was "
    "finally automated, engineers from the mainland came to install the new equipment. They were polite and "
    "efficient, and they left her the notebooks, which the harbour museum later copied page by page. Historians "
    "found in them a precise record of fog, of migrating birds, of fishing boats that went out in the morning "
    "and of the few that did not come back. "
)


def token_stream(tokenizer, min_tokens: int) -> list[int]:
    """Token ids of `TEXT` repeated until there are at least `min_tokens` of them (no special tokens)."""
    paragraph = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    if not paragraph:
        raise ValueError("the tokenizer turned the benchmark text into no tokens")
    repeats = -(-min_tokens // len(paragraph))
    return paragraph * max(repeats, 1)


def chat_wrap(tokenizer) -> tuple[list[int], list[int]] | None:
    """The token ids the tokenizer's chat template puts before and after a user's request to summarise a text,
    or None when it has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "\x00TEXT\x00"
    messages = [{"role": "user", "content": f"Summarise this text in one sentence.\n\n{marker}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    before, after = text.split(marker)
    return (tokenizer(before, add_special_tokens=False)["input_ids"],
            tokenizer(after, add_special_tokens=False)["input_ids"])


def make_prompt(stream: list[int], length: int, offset: int = 0) -> list[int]:
    """Exactly `length` token ids, read from the (cyclic) `stream` starting at `offset`."""
    return [stream[(offset + i) % len(stream)] for i in range(length)]


def batch_lengths(length: int, batch: int) -> list[int]:
    """`batch` distinct lengths in ``[1, length]``, the first equal to `length`, so the batch needs left padding.

    Lengths step down by ``length // (2 * batch)`` (at least 1), e.g. 512 -> 512, 480, 448, ..., 288.
    """
    step = max(length // (2 * batch), 1)
    return [max(length - i * step, 1) for i in range(batch)]


def left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Left-pad `prompts` into ``input_ids`` and ``attention_mask`` tensors of shape ``[len(prompts), max_len]``."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
