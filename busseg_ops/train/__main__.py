"""`python -m busseg_ops.train ...` (the same as the `busseg` command; works under torchrun)."""

import sys

from .cli import main

sys.exit(main())
