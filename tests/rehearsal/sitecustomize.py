"""On ``PYTHONPATH`` with ``HF_PAGED_REHEARSAL_COUNTS`` set, every Python process of the run installs the
rehearsal's fake CUDA driver (`fake_cuda`) at startup; see ``tests/test_gpu_check.py``."""

import os

if os.environ.get("HF_PAGED_REHEARSAL_COUNTS") and os.environ.get("TRITON_INTERPRET") != "1":
    import fake_cuda

    fake_cuda.install()
