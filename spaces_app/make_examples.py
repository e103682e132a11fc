"""Regenerate the bundled example images of the Space: ``examples/<category>_{good,logical,structural}.png``.

The images come from the synthloco generator (``ladmim_hf.data.synthetic``), the benchmark that
``make demo`` trains on: a small copy is written to a temporary folder and the first test image of
each type is copied here as a 256 px PNG. Deterministic for a seed.

Run from the repository root (needs ``ladmim_hf`` installed; the Space itself does not)::

    python spaces_app/make_examples.py [--seed 0] [--size 256]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent
TYPES = {"good": "test/good", "logical": "test/logical_anomalies", "structural": "test/structural_anomalies"}


def make_examples(out_dir: Path = HERE / "examples", seed: int = 0, size: int = 256,
                  categories: list[str] | None = None) -> list[Path]:
    from ladmim_hf.data.synthetic import CATEGORIES, generate_synthloco

    categories = list(categories or CATEGORIES)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="synthloco-examples-") as tmp:
        root = generate_synthloco(Path(tmp) / "synthloco", seed=seed, small=True, categories=categories, workers=1)
        for category in categories:
            for kind, folder in TYPES.items():
                images = sorted((Path(root) / category / folder).glob("*.png"))
                if not images:
                    raise FileNotFoundError(f"synthloco wrote no images to {category}/{folder}")
                with Image.open(images[0]) as image:
                    image = image.convert("RGB")
                    if image.size != (size, size):
                        image = image.resize((size, size), Image.BICUBIC)
                    target = out_dir / f"{category}_{kind}.png"
                    image.save(target, format="PNG", optimize=True)
                written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "examples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--categories", nargs="*", default=None, help="default: all synthloco categories")
    args = parser.parse_args(argv)
    for path in make_examples(args.out, args.seed, args.size, args.categories):
        print(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
