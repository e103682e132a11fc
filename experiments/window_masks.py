"""Scoring masks that tile the grid: one square window per position, each standardised where it lies.

The package scores the logical branch as the mean over 10 random block masks of 44 cells. A defect a
few cells wide is hidden by few of them and, inside a 44-cell mask, moves the code histogram little
(docs/experiments.md, "A finer grid for the logical branch"). This probe rescores a trained model with
masks that tile the grid instead: a `size x size` window at every `stride` cells (the last window
flush with the edge), so every cell is hidden, by small masks. Each window's discrepancy is
standardised with its own mean and std over the validation images (a window over an edge is harder
to predict than one over the floor), and the image score aggregates the windows:

- `mean`: the mean of the raw discrepancies (the package's rule, other masks);
- `z_mean`, `z_max`, `z_top3`: the mean, the largest, and the mean of the 3 largest standardised ones.

Each aggregation is reported alone and fused in place of the logical branch with the model's other
fused branches (their z-scores from the model's own calibration; its `fusion_rule`), every
aggregation standardised on the validation images first. A first row rescores with the package's
own shared random masks (`seed`) as the paired reference.

    python experiments/window_masks.py --model outputs/synthloco/model --data_root data/synthloco \
        --feature_cache outputs/synthloco/cache/features.pt --windows 4x2 3x2

Last stdout line: JSON with one entry per mask scheme and aggregation.
"""

from __future__ import annotations

import numpy as np
import torch

import _shared as S
from mask_coverage import rescoring_inputs, rescoring_parser, scores_with_masks

AGGREGATIONS = ("mean", "z_mean", "z_max", "z_top3")


def window_masks(grid: int, size: int, stride: int) -> torch.Tensor:
    """`(M, grid * grid)` bool: a `size x size` window every `stride` cells, the last one flush with the edge."""
    if not 1 <= size <= grid or stride < 1:
        raise SystemExit(f"bad window {size}x{stride}: the size must be 1..{grid} and the stride >= 1")
    starts = list(range(0, grid - size + 1, stride))
    if starts[-1] != grid - size:
        starts.append(grid - size)
    masks = []
    for row in starts:
        for column in starts:
            mask = torch.zeros(grid, grid, dtype=torch.bool)
            mask[row:row + size, column:column + size] = True
            masks.append(mask.flatten())
    return torch.stack(masks)


def aggregate(mask_scores: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> dict[str, torch.Tensor]:
    """Image scores `{aggregation: (B,)}` of per-mask discrepancies `(B, M)` and their validation mean and std `(M,)`."""
    z = (mask_scores - mean) / std.clamp_min(1e-9)
    return {"mean": mask_scores.mean(1), "z_mean": z.mean(1), "z_max": z.amax(1),
            "z_top3": z.topk(min(3, z.shape[1]), dim=1).values.mean(1)}


def parse_window(text: str) -> tuple[int, int]:
    size, _, stride = text.partition("x")
    try:
        return int(size), int(stride)
    except ValueError:
        raise SystemExit(f"bad window {text!r}: write SIZExSTRIDE, e.g. 4x2") from None


def main(argv=None) -> dict:
    parser = rescoring_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--windows", nargs="+", default=["4x2", "3x2"], help="SIZExSTRIDE in cells")
    parser.add_argument("--num_masks", type=int, default=None, help="random masks of the reference row (default: the model's)")
    args = parser.parse_args(argv)
    S.use_threads(args.threads)

    from ladmim_hf.metrics import loco_image_aurocs
    from ladmim_hf.models.branches_ladmim import fuse

    model, categories, validation, test = rescoring_inputs(args)
    grid = model.config.tokenizer_config.grid_size
    num_masks = args.num_masks or model.config.num_masks
    schemes = {f"random{num_masks}_seed{args.seed}": model.mask_generator()(1, num_masks, [args.seed])[0]}
    for text in args.windows:
        size, stride = parse_window(text)
        schemes[f"window{size}x{stride}"] = window_masks(grid, size, stride)
    others = [b for b in model.config.fused_branches if b != "logical"]

    def aurocs(scores: torch.Tensor, types: list[str]) -> dict:
        values = loco_image_aurocs(scores.double().numpy(), types)
        return {k: round(values[k], 4) for k in ("auroc_logical", "auroc_structural", "auroc_mean")}

    results = {}
    for name, masks in schemes.items():
        per_category: dict[str, dict] = {}
        for category in categories:
            S.progress(f"[window_masks] {name}: {category}")
            features, types = test[category]
            val_raw = scores_with_masks(model, validation[f"validation/{category}"], category,
                                        masks.expand(len(validation[f"validation/{category}"]), -1, -1), with_mask_scores=True)
            test_raw = scores_with_masks(model, features, category, masks.expand(len(features), -1, -1),
                                         with_mask_scores=True)
            val_masks, test_masks = val_raw.pop("mask_scores"), test_raw.pop("mask_scores")
            mean, std = val_masks.mean(0), val_masks.std(0)
            val_scores, test_scores = aggregate(val_masks, mean, std), aggregate(test_masks, mean, std)
            z_others = model.standardized_scores({b: test_raw[b] for b in others}, category)
            entry = {}
            for key in AGGREGATIONS:
                logical_z = (test_scores[key] - val_scores[key].mean()) / val_scores[key].std().clamp_min(1e-9)
                parts = [logical_z if b == "logical" else z_others[b] for b in model.config.fused_branches]
                entry[key] = {"alone": aurocs(test_scores[key], types),
                              "fused": aurocs(fuse(torch.stack(parts, -1), model.config.fusion_rule), types)}
            per_category[category] = entry
        results[name] = {"num_masks": len(masks), "per_category": per_category, **{
            key: {part: {metric: round(float(np.mean([per_category[c][key][part][metric] for c in categories])), 4)
                         for metric in ("auroc_logical", "auroc_structural", "auroc_mean")}
                  for part in ("alone", "fused")} for key in AGGREGATIONS}}

    print(f"fused branches of the model: {' + '.join(model.config.fused_branches)} ({model.config.fusion_rule}); "
          "the logical branch scored with each scheme and aggregation")
    print("| masks | aggregation | logical branch alone (logical AUROC) | fused: logical / structural / mean |")
    print("|---|---|---|---|")
    for name, entry in results.items():
        for key in AGGREGATIONS:
            alone, fused = entry[key]["alone"], entry[key]["fused"]
            print(f"| {name} ({entry['num_masks']}) | {key} | {alone['auroc_logical']:.3f} | {fused['auroc_logical']:.3f} / "
                  f"{fused['auroc_structural']:.3f} / {fused['auroc_mean']:.3f} |")
    summary = "; ".join(f"{name} z_top3 {entry['z_top3']['fused']['auroc_mean']:.3f}" for name, entry in results.items())
    S.report(f"window masks: {summary} (fused mean AUROC)",
             {"experiment": "window_masks", "model": args.model, "fused_branches": model.config.fused_branches,
              "fusion_rule": model.config.fusion_rule, "schemes": results})
    return results


if __name__ == "__main__":
    main()
