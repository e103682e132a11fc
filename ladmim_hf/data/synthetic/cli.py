"""Command line: ``ladmim synth`` and ``python -m ladmim_hf.data.synthetic`` (the parser and logging set-up
are ``ladmim_hf.cli``'s)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from ...cli import run_subcommand
from .defects import CATEGORIES
from .writer import generate_synthloco


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    """The generator's options (`ladmim synth`, `python -m ladmim_hf.data.synthetic`)."""
    parser.add_argument("--out", default="data/synthloco", help="output root (default: data/synthloco)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images (default: 0)")
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
    """`ladmim synth ARGV` (ARGV defaults to the command line's)."""
    return run_subcommand("synth", argv)
