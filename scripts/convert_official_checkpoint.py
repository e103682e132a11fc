#!/usr/bin/env python
"""Convert official checkpoints (LADMIM predictor, HVQ-Trans tokenizer) to ladmim_hf models:
`python scripts/convert_official_checkpoint.py --hvq hvq.pth.tar --predictor breakfast_box=ckpt.pt ... --output DIR`
(same flags as `ladmim convert`). See `ladmim_hf/convert.py` for the key map and what differs."""

import sys

from ladmim_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
