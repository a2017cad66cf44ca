"""The benchmark scenarios: what each one asks of ``generate()`` and which prompts it sends."""

from __future__ import annotations

from dataclasses import dataclass

from .prompts import CHAT_REQUESTS, batch_lengths, make_prompt

__all__ = ["DEFAULT_SCENARIOS", "HOST_BATCHES", "HOST_LAYERS", "HOST_MODEL", "PREFIX_SUFFIX_TOKENS", "SCENARIOS",
           "SLIDING_MODEL", "Scenario", "sweep_scenario"]

# Tokens of the distinct "user question" appended to the shared system prompt in each call of `prefix`.
PREFIX_SUFFIX_TOKENS = 16
# The `sliding` scenarios' model: Gemma3TextConfig arguments besides the vocabulary and the positions.
SLIDING_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=32, sliding_window=64,
                     layer_types=["sliding_attention"] * 5 + ["full_attention"])
# The `host` scenario's model (`hf_paged.bench.host`): LlamaConfig arguments besides its layers and positions, fp32.
HOST_MODEL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512)
HOST_LAYERS = 30
HOST_BATCHES = (1, 8)


@dataclass(frozen=True)
class Scenario:
    """One ``generate()`` workload.

    Attributes:
        name: the name used on the command line and in the results.
        description: one line for the report.
        batch: different prompts per call (left-padded to the longest).
        num_beams: beam search width (1: no beam search).
        num_return_sequences: sequences returned per prompt.
        do_sample: multinomial sampling (seeded) instead of greedy / beam search.
        calls: sequential ``generate()`` calls (more than one only for `prefix`).
        prefix_cache: the calls share a system prompt, and hf_paged runs them with ``enable_prefix_caching``.
        eos: rows stop at EOS (no ``min_new_tokens``), so they end at different steps.
        chat: each prompt is wrapped in the tokenizer's chat template (when it has one) as a request to summarise.
        requests: the prompts are `prompts.CHAT_REQUESTS`, one per row, each in the chat template
            (`prompts.chat_requests`); they have their own lengths, so the scenario runs once, whatever the prompt
            lengths asked for (its rows show the longest request's length).
        model: ``None`` for the loaded model, or ``"sliding"``: a tiny random-weight Gemma-3-like model with the
            loaded model's vocabulary (`SLIDING_MODEL`: 5 sliding-window layers to 1 full, window 64); its tokens
            mean nothing, its KV bytes are what the scenario measures; or ``"host"``: the `host` scenario's own
            30-layer tiny Llama, run apart (`hf_paged.bench.host`: per decode step time, host syncs, copies and
            kernel launches, in a process of its own; the other attributes do not apply).
        quality: the ``quality`` scenario (`hf_paged.bench.quality`): perplexity, top-1 agreement and greedy
            continuations of quantized KV caches against unquantized hf_paged, on the loaded model; the other
            attributes do not apply.
    """

    name: str
    description: str
    batch: int = 1
    num_beams: int = 1
    num_return_sequences: int = 1
    do_sample: bool = False
    calls: int = 1
    prefix_cache: bool = False
    eos: bool = False
    chat: bool = False
    model: str | None = None
    requests: bool = False
    quality: bool = False

    @property
    def k(self) -> int:
        """Rows per prompt that ``generate()`` keeps: ``max(num_beams, num_return_sequences)``."""
        return max(self.num_beams, self.num_return_sequences)

    @property
    def workload_key(self) -> tuple:
        """Identifies the work done, whatever the name: equal keys (and prompt length) give equal runs."""
        return (self.batch, self.num_beams, self.num_return_sequences, self.do_sample, self.calls, self.prefix_cache,
                self.eos, self.chat, self.model, self.requests, self.quality)

    def generate_kwargs(self, new_tokens: int) -> dict:
        """Keyword arguments for ``generate()``: exactly `new_tokens` new tokens per sequence (at most, with `eos`)."""
        kwargs = {
            "max_new_tokens": new_tokens,
            "min_new_tokens": new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "num_return_sequences": self.num_return_sequences,
        }
        if self.eos:
            del kwargs["min_new_tokens"]
        return kwargs

    def prompts(self, stream: list[int], length: int, chat: tuple[list[int], list[int]] | None = None,
                requests: list[list[int]] | None = None) -> list[list[list[int]]]:
        """The prompts of each call: ``calls`` lists of ``batch`` token-id lists.

        The batch's prompts start at different places of the text and have different lengths (<= `length`);
        `prefix` calls share a `length`-token system prompt followed by a distinct `PREFIX_SUFFIX_TOKENS` suffix.
        With `chat` (`prompts.chat_wrap`: the template's tokens before and after the message) and ``self.chat``,
        each prompt is those tokens around a piece of the text, `length` tokens in all where it can be.
        With ``self.requests``, the one call's prompts are `requests` (`prompts.chat_requests`), whatever `length`.
        """
        if self.requests:
            if not requests:
                raise ValueError(f"hf_paged bench: scenario {self.name!r} needs the tokenized chat requests "
                                 "(prompts.chat_requests(tokenizer))")
            return [[list(request) for request in requests]]
        if self.prefix_cache:
            system = make_prompt(stream, length)
            return [
                [system + make_prompt(stream, PREFIX_SUFFIX_TOKENS, offset=53 * (call + 1))]
                for call in range(self.calls)
            ]
        lengths = batch_lengths(length, self.batch) if self.batch > 1 else [length]
        if self.chat and chat is not None:
            before, after = chat
            return [[before + make_prompt(stream, max(n - len(before) - len(after), 1), offset=37 * row) + after
                     for row, n in enumerate(lengths)]]
        return [[make_prompt(stream, n, offset=37 * row) for row, n in enumerate(lengths)]]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("greedy", "greedy decoding, batch 1"),
        Scenario("batch8", "greedy, 8 different left-padded prompts", batch=8),
        Scenario("sample8", "sampling, num_return_sequences=8 (seeded)", num_return_sequences=8, do_sample=True),
        Scenario("beams8", "beam search, num_beams=8", num_beams=8),
        Scenario(
            "beams8_ret4", "beam search, num_beams=8, num_return_sequences=4", num_beams=8, num_return_sequences=4
        ),
        Scenario("prefix", "greedy calls sharing a long system prompt (prefix cache)", calls=4, prefix_cache=True),
        Scenario("batch8_eos", "greedy, 8 different left-padded chat prompts, each stopping at EOS", batch=8,
                 eos=True, chat=True),
        Scenario("chat8_eos", "greedy, 8 different left-padded chat requests (short and long answers), each "
                 "stopping at EOS", batch=len(CHAT_REQUESTS), eos=True, chat=True, requests=True),
        Scenario("sliding", "greedy, tiny random Gemma-3-like model (5 sliding layers : 1 full, window 64)",
                 model="sliding"),
        Scenario("sliding_beams4", "beam search, num_beams=4, the same sliding-window model", num_beams=4,
                 model="sliding"),
        Scenario("host", "host cost of a decode step: 30-layer tiny random Llama, batch 1 and 8, sdpa vs hf_paged "
                 "(PyTorch path, Triton path with launches stubbed)", model="host"),
        Scenario("quality", "perplexity, top-1 agreement and greedy continuations of 8-bit hf_paged and Transformers' "
                 "QuantizedCache against unquantized hf_paged", quality=True),
    )
}
#: Every scenario but `host`, which measures something else (the host side of a step) on a model of its own, and
#: `quality` (accuracy, not time or memory: minutes of teacher-forced passes).
DEFAULT_SCENARIOS = tuple(name for name, s in SCENARIOS.items() if s.model != "host" and not s.quality)


def sweep_scenario(kind: str, k: int) -> Scenario:
    """The scenario for one point of the k sweep: ``kind`` is ``"beams"`` (num_beams=k) or ``"sample"``."""
    if kind == "beams":
        return Scenario(f"beams{k}", f"beam search, num_beams={k}", num_beams=k)
    if kind == "sample":
        return Scenario(f"sample{k}", f"sampling, num_return_sequences={k}", num_return_sequences=k, do_sample=True)
    raise ValueError(f"unknown sweep kind {kind!r}")
