"""`python -m ladmim_hf.training --config ...`: the same as `scripts/train.py`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
