"""The suite's settings and shared fixtures. Helpers (tiny models, prompts, watching a model run) are in
``tests/tiny_models.py``, which tests import."""

from __future__ import annotations

import functools

import pytest
import torch
from tiny_models import model_pair

import hf_paged

# Tiny models gain nothing from a second thread, and OpenMP's spinning threads make them up to 100x slower when
# anything else runs on this 2-core machine: run the suite single-threaded.
torch.set_num_threads(1)


def _triton_interprets() -> bool:
    """Whether Triton's interpreter can run the kernels here (Triton >= 3.8 with numpy 2, as hf_paged.kernels says)."""
    try:
        import triton
    except ImportError:
        return False
    from hf_paged.kernels import MIN_TRITON_INTERPRETER

    found = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    return found >= MIN_TRITON_INTERPRETER


# Tests that run the kernels under TRITON_INTERPRET=1 (the device image's Triton 3.6 compiles them, but cannot).
needs_triton_interpreter = pytest.mark.skipif(not _triton_interprets(),
                                              reason="Triton's interpreter needs Triton >= 3.8")


@pytest.fixture
def prefix_pair():
    """``(sdpa, hf_paged)`` tiny Llamas; prefix caching is turned off again after the test."""
    reference, paged = model_pair("llama")
    yield reference, paged
    hf_paged.disable_prefix_caching(paged)


@pytest.fixture(scope="session")
def llama_pair():
    """``(sdpa, hf_paged)`` tiny Llamas shared by the whole session: for tests that change nothing in them."""
    return model_pair("llama")


@pytest.fixture(scope="module")
def pairs():
    """``pairs(family)``: `tiny_models.model_pair(family)`, built once per test module (a model may serve many
    ``generate()`` calls, as a user's does)."""
    return functools.cache(model_pair)
