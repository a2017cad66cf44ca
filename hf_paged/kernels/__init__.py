"""Triton kernels that read block tables (installed as ``hf_paged.kernels``).

Four launchers with the same signatures and results as their PyTorch references in `hf_paged.ops`, so callers can
dispatch between the two:

* `reshape_and_cache` -- scatter this step's keys and values into their cache slots;
* `paged_attention` -- attention over paged keys and values (decode and multi-token queries, GQA, left padding,
  sliding window, softcap, split-KV for long contexts);
* `copy_blocks` -- copy-on-write of whole blocks in every layer at once;
* `shared_prefix_paged_attention` -- paged attention for rows that share leading blocks (beams, samples of one
  prompt): the shared blocks are read once per group and merged with each row's tail by log-sum-exp.

Each also takes optional int64 per-block offset tables (``block_offsets``; ``key_offsets`` / ``value_offsets``) that
address a pool made of several separate tensors (slabs) through the lowest-addressed one (docs/KERNELS.md).
They run compiled on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before this package was
imported (Triton decides at decoration time). Compiled use needs Triton >= 3.4, the interpreter Triton >= 3.8.
Without a usable Triton (macOS, Windows, an older release) the package still imports:
`HAS_TRITON` is False, `TRITON_PROBLEM` says why, and the launchers raise `RuntimeError`.
``python -m hf_paged.kernels`` compiles every kernel ahead of time for sm_80 and sm_90 and prints their resource
usage (no GPU needed).
"""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["HAS_TRITON", "TRITON_PROBLEM", "copy_blocks", "paged_attention", "reshape_and_cache",
           "shared_prefix_paged_attention"]

#: Oldest Triton that compiles the kernels for the GPU (checked with ``python -m hf_paged.kernels``).
MIN_TRITON = (3, 4)
#: Oldest Triton whose interpreter (``TRITON_INTERPRET=1``, CPU tensors) runs them: it needs numpy 2.
MIN_TRITON_INTERPRETER = (3, 8)

def _triton_problem() -> str | None:
    """Why the kernels cannot run here, or None if Triton is usable."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    need = ".".join(map(str, MIN_TRITON_INTERPRETER if interpreting else MIN_TRITON))
    try:
        import triton
    except ImportError:
        return f"needs Triton, which is not installed (it ships for Linux only: pip install 'triton>={need}')"
    found = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
    if found < (MIN_TRITON_INTERPRETER if interpreting else MIN_TRITON):
        under = " under TRITON_INTERPRET=1 (its interpreter)" if interpreting else ""
        return f"needs Triton >= {need}{under}, found {triton.__version__}"
    return None

TRITON_PROBLEM = _triton_problem()
HAS_TRITON = TRITON_PROBLEM is None

if HAS_TRITON:
    from .copy_blocks import copy_blocks
    from .paged_attention import paged_attention
    from .reshape_and_cache import reshape_and_cache
    from .shared_prefix_attention import shared_prefix_paged_attention
else:

    def _missing(name: str):
        def launcher(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(
                f"hf_paged.kernels.{name} {TRITON_PROBLEM}; use hf_paged.ops.{name}, the PyTorch implementation"
            )

        launcher.__name__ = launcher.__qualname__ = name
        return launcher

    copy_blocks = _missing("copy_blocks")
    paged_attention = _missing("paged_attention")
    reshape_and_cache = _missing("reshape_and_cache")
    shared_prefix_paged_attention = _missing("shared_prefix_paged_attention")
