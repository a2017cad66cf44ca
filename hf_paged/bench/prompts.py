"""Deterministic prompts of an exact token length, cut from real text tokenized by the model's own tokenizer."""

from __future__ import annotations

import torch

__all__ = ["CHAT_REQUESTS", "TEXT", "batch_lengths", "chat_requests", "chat_wrap", "left_pad", "make_prompt",
           "token_stream"]

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

# The `chat8_eos` scenario's batch: eight user requests of different kinds, written for this benchmark before it was
# ever run (not tuned to any figure). Some ask for a long answer, some for a word or a sentence.
CHAT_REQUESTS = (
    "What is the capital of France?",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Is 17 a prime number? Answer yes or no.",
    "Explain how photosynthesis works, step by step, for a high-school student.",
    'Translate into Spanish: "Good morning, where is the train station?"',
    "Give me ten practical tips for staying focused when working from home, with a sentence of explanation for each.",
    "My sourdough bread comes out flat and dense every time. I feed the starter once a day, let the dough rise "
    "overnight in the fridge and bake it at 230 degrees Celsius in a cast-iron pot. What am I probably doing wrong?",
    "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation, and "
    "explain how it works.",
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


def chat_requests(tokenizer) -> list[list[int]]:
    """The token ids of each of `CHAT_REQUESTS` as a user turn in the tokenizer's chat template, ending with the
    assistant's generation prompt; without a chat template, the request's own tokens (no special tokens)."""
    if not getattr(tokenizer, "chat_template", None):
        return [tokenizer(request, add_special_tokens=False)["input_ids"] for request in CHAT_REQUESTS]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": request}], tokenize=False,
                                           add_generation_prompt=True) for request in CHAT_REQUESTS]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


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
