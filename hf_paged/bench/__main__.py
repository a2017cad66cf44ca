"""``python -m hf_paged.bench``."""

import sys

from .cli import main

sys.exit(main())
