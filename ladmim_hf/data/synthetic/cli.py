"""Command line: ``python -m ladmim_hf.data.synthetic`` and ``ladmim synth``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from .defects import CATEGORIES
from .writer import generate_synthloco


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """The generator's options, shared by `python -m ladmim_hf.data.synthetic` and `ladmim synth`."""
    parser.add_argument("--out", default="data/synthloco", help="output root (default: data/synthloco)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny sizes for tests (8/4/3+3+3 per category)")
    parser.add_argument("--categories", nargs="+", default=None, help=f"subset of {' '.join(CATEGORIES)} (default: all)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPU count, max 8)")
    parser.add_argument("--no-progress", action="store_true")


def run_from_args(args: argparse.Namespace) -> int:
    categories = args.categories
    if categories:
        categories = [c for item in categories for c in item.split(",") if c]
        if categories == ["all"]:
            categories = None
    start = time.perf_counter()
    try:
        out = generate_synthloco(args.out, seed=args.seed, small=args.small, categories=categories,
                                 image_size=args.image_size, workers=args.workers, progress=not args.no_progress)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Generate the synthloco benchmark (MVTec LOCO AD layout).")
    add_synth_arguments(parser)
    return run_from_args(parser.parse_args(argv))
