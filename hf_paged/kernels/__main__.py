"""``python -m hf_paged.kernels``: compile every kernel ahead of time for sm_80 and sm_90 and print its resources."""

import sys

from .aot import main

sys.exit(main())
