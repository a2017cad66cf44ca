"""The benchmark command: ``python -m hf_paged.bench`` (console script ``hf-paged-bench``).

It runs ``generate()`` scenarios (greedy, a left-padded batch, ``num_return_sequences`` sampling, beam search, a
shared system prompt reused across calls) with ``attn_implementation="hf_paged"`` and with the references
(``sdpa`` + ``DynamicCache``, and Transformers' continuous batching ``model.generate_batch`` where it applies), in
one process, alternating between implementations, and reports time, KV-cache bytes, peak RSS and whether the
generated tokens match. ``--out DIR`` writes ``results.json``, ``results.md`` and PNG plots.

Modules: `prompts` (deterministic token prompts), `scenarios` (what each scenario asks of ``generate``),
`impls` (the KV implementations: hf_paged, 8-bit hf_paged, sdpa, Transformers' ``QuantizedCache``), `runner` (one
timed run of one implementation), `suite` (warm-up, repeats, summaries, the k sweep), `quality` (the ``quality``
scenario: perplexity, top-1 agreement and greedy continuations of quantized caches against unquantized hf_paged),
`report` (terminal table, JSON, Markdown, plots, the 8-bit targets), `cli` (arguments, errors, progress bar). The ``host`` scenario
(`host`: the host's cost of a decode step, in a process of its own) uses `steps` (per-step times and Triton
launches), `transfers` (D2H reads and H2D copies per step, by file:line) and `stub_device` (the kernels compiled for
sm_90 on a machine without a GPU, launches stubbed), which `gpu_check`'s rehearsal in the tests uses too.
"""

from .cli import main

__all__ = ["main"]
