#!/usr/bin/env python
"""Evaluate a trained LADMIM detector: `python scripts/evaluate.py --model OUT/model --data_root ROOT --output_dir EVAL`.
See `ladmim_hf/evaluation.py`."""

import sys

from ladmim_hf.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
