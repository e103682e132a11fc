#!/usr/bin/env python
"""Train a LADMIM detector: `python scripts/train.py --config configs/synthloco-cpu.yaml`
(or `accelerate launch scripts/train.py ...`; same flags as `ladmim train`). See `ladmim_hf/training/`."""

import sys

from ladmim_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
