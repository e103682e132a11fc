"""Test-time translations for the logical branch: does it read an object's pose as a change of content?

On a fixed layout, a tray shifted by a few pixels moves its content across cell borders. On
synthloco's pushpins the logical score of good test images follows the photo's shift
(docs/experiments.md). This probe scores every image at its own pose and moved by `--step` pixels
right, left, down and up (5 poses; the pixels that enter repeat the border,
`modeling_ladmim_utils.translate`). With `--level features` the backbone's feature grid is moved
instead, by the same distance in cells (`step / (image_size / grid_size)`, bilinear, the border
repeated): a move that cached features allow, so calibration and export could use it.
The image's logical score is then the smallest of the five (`min`: the pose that fits the rules best,
what the package does with `logical_pose_step`) or their mean. The validation images get the same
treatment, so each variant is standardised on them. It is then fused in place of the model's logical branch with the model's other z-scores
(`fusion_sweep.py --save_scores`, the model's `fusion_rule`). The first row, `centre`, is the
unmoved image: the package's own logical branch, standardised by this probe.

    python experiments/fusion_sweep.py --model M --data_root data/synthloco --feature_cache C \
        --variants logical+memory_bank+global:max_mean --no_spro --save_scores z.pt
    python experiments/pose_shifts.py --model M --data_root data/synthloco --scores z.pt --step 6

Each pose runs the backbone and the predictor once more: the logical branch costs 5x. Last stdout
line: JSON.
"""

from __future__ import annotations

import torch

from ladmim_hf.models.configuration_ladmim import pose_moves as package_moves
from ladmim_hf.models.modeling_ladmim_utils import translate

import _shared as S
from neighbour_predictor import fused_with_variant

AGGREGATIONS = {"centre": lambda scores: scores[:, 0], "min": lambda scores: scores.amin(1),
                "mean": lambda scores: scores.mean(1)}


def pose_moves(step: int) -> list[tuple[int, int]]:
    """The unmoved pose first, then `step` pixels right, left, down and up: `[(dx, dy), ...]`."""
    return [(0, 0), *package_moves(step)]


def move_features(features: torch.Tensor, dx_cells: float, dy_cells: float) -> torch.Tensor:
    """Feature grids `(B, C, g, g)` moved `dx_cells` right and `dy_cells` down, by bilinear sampling
    (fractions of a cell allowed); the cells that enter repeat the border."""
    grid = features.shape[-1]
    theta = torch.tensor([[1.0, 0.0, -2.0 * dx_cells / grid], [0.0, 1.0, -2.0 * dy_cells / grid]],
                         dtype=features.dtype, device=features.device)
    sampling = torch.nn.functional.affine_grid(theta.expand(len(features), 2, 3), list(features.shape), align_corners=False)
    return torch.nn.functional.grid_sample(features, sampling, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def logical_at_poses(model, processor, paths: list[str], category: str, moves: list[tuple[int, int]], seed: int,
                     num_masks: int | None = None, level: str = "pixels", batch_size: int = 16) -> torch.Tensor:
    """Raw logical scores `(len(paths), len(moves))` of each image moved by each `(dx, dy)` pixels (`level`:
    the image's `"pixels"`, or its backbone `"features"` by the same distance in cells), every image scored
    with the shared mask set of `seed` (as the evaluation scores; `num_masks`: the model's when None)."""
    config = model.config.tokenizer_config
    stride = config.image_size / config.grid_size  # input pixels per cell
    rows = []
    for start in range(0, len(paths), batch_size):
        pixel_values = processor(paths[start:start + batch_size])["pixel_values"].to(model.device)
        if level == "pixels":
            moved = [model.tokenizer.extract_features(translate(pixel_values, dx, dy)) for dx, dy in moves]
        else:
            features = model.tokenizer.extract_features(pixel_values)
            moved = [move_features(features, dx / stride, dy / stride) for dx, dy in moves]
        per_move = [model(features=f, category=category, num_masks=num_masks, seed=seed).logical_score.float().cpu()
                    for f in moved]
        rows.append(torch.stack(per_move, 1))
    return torch.cat(rows)


def main(argv=None) -> dict:
    parser = S.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained model folder (OUTPUT_DIR/model)")
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--scores", required=True, help="the model's test z-scores (fusion_sweep.py --save_scores FILE)")
    parser.add_argument("--categories", nargs="+", default=["all"])
    parser.add_argument("--num_masks", type=int, default=None, help="test masks per image (default: the model's)")
    parser.add_argument("--level", choices=("pixels", "features"), default="pixels",
                        help="move the image's pixels, or its backbone feature grid by the same distance")
    parser.add_argument("--step", type=int, default=6, help="pixels each pose is moved by, at the model's input size")
    args = parser.parse_args(argv)
    if args.step < 1:
        parser.error("--step must be a whole number of pixels, 1 or more")
    S.use_threads(args.threads)

    from ladmim_hf.data import evaluation_rows, find_layout, select_categories
    from ladmim_hf.evaluation import load_detector

    model, processor = load_detector(args.model)
    model.config.logical_pose_step = 0  # each pose is scored alone; the probe aggregates them itself
    S.predictor_alone(model)  # the probe studies the trained predictor
    layout = find_layout(args.data_root)
    categories = select_categories(layout, "all" if args.categories == ["all"] else args.categories)
    saved = torch.load(args.scores, weights_only=False)
    fused_branches, rule = list(model.config.fused_branches), model.config.fusion_rule
    moves = pose_moves(args.step)

    aurocs = S.image_aurocs

    results: dict[str, dict] = {name: {} for name in AGGREGATIONS}
    for category in categories:
        rows = evaluation_rows(layout, category)
        types = [row["anomaly_type"] for row in rows]
        if category not in saved or len(saved[category]["types"]) != len(types):
            raise SystemExit(f"{args.scores} holds no scores for the {len(types)} test images of {category}: "
                             "run fusion_sweep.py --save_scores on this model and data root")
        z = saved[category]["z"]
        S.progress(f"{category}: {len(moves)} poses")
        validation = logical_at_poses(model, processor, layout.paths(category, "validation"), category, moves, args.seed,
                                      args.num_masks, args.level)
        test = logical_at_poses(model, processor, [row["path"] for row in rows], category, moves, args.seed, args.num_masks,
                                args.level)
        for name, aggregate in AGGREGATIONS.items():
            reference, scores = aggregate(validation), aggregate(test)
            standardized = (scores - reference.mean()) / reference.std().clamp_min(1e-12)
            _, fused = fused_with_variant(z, standardized, fused_branches, rule, "replace")
            results[name][category] = {"alone": aurocs(scores, types), "fused": aurocs(fused, types)}

    mean = S.category_mean

    lines = [f"logical branch at {len(moves)} poses ({args.step} px, moving the {args.level}); fused: {' + '.join(fused_branches)} ({rule})",
             "| logical score | alone: logical / structural | alone, logical per category | fused: logical / structural |",
             "|---|---|---|---|"]
    for name, per in results.items():
        lines.append(f"| {name} | {mean(per, 'alone', 'auroc_logical'):.3f} / {mean(per, 'alone', 'auroc_structural'):.3f} | "
                     + " / ".join(f"{per[c]['alone']['auroc_logical']:.2f}" for c in categories)
                     + f" | {mean(per, 'fused', 'auroc_logical'):.3f} / {mean(per, 'fused', 'auroc_structural'):.3f} |")
    payload = {"experiment": "pose_shifts", "model": args.model, "step": args.step, "level": args.level, "moves": moves,
               "categories": categories, "fusion": [fused_branches, rule],
               "variants": {name: {"per_category": per} for name, per in results.items()}}
    S.report("\n".join(lines), payload)
    return payload


if __name__ == "__main__":
    main()
