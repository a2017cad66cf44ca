"""The benchmark command: ``python -m hf_paged.bench`` (console script ``hf-paged-bench``).

It runs ``generate()`` scenarios (greedy, a left-padded batch, ``num_return_sequences`` sampling, beam search, a
shared system prompt reused across calls) with ``attn_implementation="hf_paged"`` and with the references
(``sdpa`` + ``DynamicCache``, and Transformers' continuous batching ``model.generate_batch`` where it applies), in
one process, alternating between implementations, and reports time, KV-cache bytes, peak RSS and whether the
generated tokens match. ``--out DIR`` writes ``results.json``, ``results.md`` and PNG plots.

Modules: `prompts` (deterministic token prompts), `scenarios` (what each scenario asks of ``generate``),
`runner` (one timed run of one implementation), `suite` (warm-up, repeats, summaries, the k sweep),
`report` (terminal table, JSON, Markdown, plots), `cli` (arguments, errors, progress bar).
"""

from .cli import main

__all__ = ["main"]
