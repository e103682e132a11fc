#!/usr/bin/env python
"""Upload a trained LADMIM detector to the Hugging Face Hub:
`python scripts/push_to_hub.py --model OUTPUT_DIR/model --repo_id org/name [--private] [--revision REV]
[--metrics PATH] [--dry_run DIR]` (same flags as `ladmim push`). The token comes from `HF_TOKEN` or
`hf auth login`. See `ladmim_hf/hub/push.py`."""

import sys

from ladmim_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
