"""``python -m tgvkv.bench`` = ``tgvkv-bench``."""

import sys

from .cli import main

sys.exit(main())
