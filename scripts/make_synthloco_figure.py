"""Draw ``docs/images/synthloco_examples.png``: one row per synthloco category, columns normal /
logical anomaly / structural anomaly, with the ground-truth mask contour on the anomalies.

    python scripts/make_synthloco_figure.py [--out docs/images/synthloco_examples.png] [--seed 0]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ladmim_hf.data.synthetic import CATEGORIES, make_scene, render_scene  # noqa: E402

# (logical, structural) defect type shown for each category
EXAMPLES = {
    "breakfast_box": ("extra_fruit", "damaged_fruit"),
    "juice_bottle": ("wrong_fruit_icon", "contamination"),
    "pushpins": ("missing_pushpin", "broken_pushpin"),
    "screw_bag": ("wrong_screw_length", "broken_screw"),
    "splicing_connectors": ("wrong_cable_color", "broken_cable"),
}
RULES = {
    "breakfast_box": "2 tangerines + 1 nectarine; cereal : toppings = 1 : 1",
    "juice_bottle": "fill level, labels present and centred, icon = juice",
    "pushpins": "exactly one pin per compartment",
    "screw_bag": "2 washers, 2 nuts, 1 long + 2 short screws",
    "splicing_connectors": "equal slot counts, same slot, colour = slot count",
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "images" / "synthloco_examples.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", type=int, default=0, help="image index inside each test folder")
    parser.add_argument("--dpi", type=int, default=110)
    args = parser.parse_args(argv)

    fig, axes = plt.subplots(len(CATEGORIES), 3, figsize=(7.2, 2.55 * len(CATEGORIES)))
    for row, category in enumerate(CATEGORIES):
        logical, structural = EXAMPLES[category]
        panels = [
            ("good", None, "normal"),
            ("logical", logical, f"logical: {logical}"),
            ("structural", structural, f"structural: {structural}"),
        ]
        for col, (split, defect, title) in enumerate(panels):
            scene = make_scene(category, split, args.index, seed=args.seed, defect=defect)
            image, masks = render_scene(scene)
            ax = axes[row, col]
            ax.imshow(image, interpolation="nearest")
            if masks:
                union = np.any(np.stack(masks), axis=0).astype(float)
                ax.contour(union, levels=[0.5], colors=["#00ff40"], linewidths=1.3)
            ax.set_title(title.replace("_", " "), fontsize=8.5, pad=3)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(category, fontsize=9, fontweight="bold")
        axes[row, 1].text(0.5, -0.06, "rule: " + RULES[category], transform=axes[row, 1].transAxes,
                          ha="center", va="top", fontsize=7.5, color="#333333")
    fig.suptitle("synthloco: normal, logical and structural examples (green: ground-truth mask)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985), h_pad=1.6)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=args.dpi, format="png")
    plt.close(fig)
    # a 256-colour palette keeps the README light (the photos' sensor noise does not compress)
    with Image.open(buffer) as rendered:
        rendered.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(args.out, optimize=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
