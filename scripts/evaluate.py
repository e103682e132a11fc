#!/usr/bin/env python
"""Evaluate a trained LADMIM detector: `python scripts/evaluate.py --model OUT/model --data_root ROOT --output_dir EVAL`.
Same flags as `ladmim evaluate`; see `ladmim_hf/evaluation.py`."""

import sys

from ladmim_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
