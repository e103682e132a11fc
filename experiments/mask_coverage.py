"""Does the choice of test-time masks matter? A trained model rescored with other mask schemes, no retraining.

The package scores every image of a category with the same mask set, drawn from one seed
(`model(..., seed=0)`). This probe rescores a trained model's validation and test images with:

- `shared_seed<s>`: that shared set, for each of `--shared_seeds` (`ladmim_hf.scoring.branch_scores`);
- `per_image`: one seed per image (image i gets `--seed` + i), what the package did before;
- `balanced<m>_seed<s>`: one set of m masks (each of `--balanced`) chosen greedily from
  `--candidates` masks drawn from seed s (each of `--balanced_seeds`) so that every cell is hidden
  about equally often: each step adds the candidate that keeps the per-cell counts flattest (the
  smallest sum of squared counts); the JSON records the smallest and largest count.

The logical branch scores the image as it is (a model's `logical_pose_step` is set to 0). Each
scheme is recalibrated on the validation features (training's feature cache) with
`ladmim_hf.calibration.calibration_statistics`, as training stage 3 does, then the test images are
scored with the same scheme. Reported per scheme, as a mean over categories: the logical branch's
AUROC on logical anomalies, and the fused score's (the model's branches and fusion rule) on logical
anomalies and its mean over logical and structural.

    python experiments/mask_coverage.py --model outputs/synthloco/model --data_root data/synthloco \
        --feature_cache outputs/synthloco/cache/features.pt

`--test_features FILE` keeps the test images' backbone features (most of the run time) for the next
run. Last stdout line: JSON with one entry per scheme.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ladmim_hf.calibration import calibration_statistics
from ladmim_hf.data import evaluation_rows, find_layout, select_categories
from ladmim_hf.evaluation import load_detector
from ladmim_hf.metrics import loco_image_aurocs
from ladmim_hf.scoring import branch_scores, extract_features

import _shared as S


def balanced_masks(model, num_masks: int, seed: int, candidates: int) -> torch.Tensor:
    """`(num_masks, N)` bool: a mask set that hides every cell about equally often, chosen greedily from
    `candidates` scoring masks drawn from `seed`."""
    pool = model.mask_generator()(1, candidates, seed)[0].float()  # (candidates, N)
    cover = torch.zeros(pool.shape[1])
    chosen: list[int] = []
    for _ in range(num_masks):
        cost = ((cover + pool) ** 2).sum(1)
        cost[chosen] = float("inf")
        best = int(cost.argmin())
        chosen.append(best)
        cover += pool[best]
    return pool[chosen].bool()


def scores_with_masks(model, features: torch.Tensor, category: str, masks: torch.Tensor,
                      batch_size: int = 16, with_mask_scores: bool = False) -> dict[str, torch.Tensor]:
    """Raw branch scores `{branch: (num_images,)}` with explicit masks `(num_images, M, N)`, and each
    mask's discrepancy `"mask_scores" (num_images, M)` if `with_mask_scores`."""
    out: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(features), batch_size):
        result = model(features=features[start:start + batch_size], category=category,
                       bool_masked_pos=masks[start:start + batch_size])
        scores = result.branch_scores()
        if with_mask_scores:
            scores["mask_scores"] = result.mask_scores
        for branch, values in scores.items():
            out.setdefault(branch, []).append(values)
    return {branch: torch.cat(values) for branch, values in out.items()}


def scheme_scores(model, features: torch.Tensor, category: str, scheme: dict) -> dict[str, torch.Tensor]:
    """Raw branch scores of `features` under one scheme: `{"seed": s}` (the package's shared mask set),
    `{"first_seed": s}` (image i gets seed s + i) or `{"masks": (M, N)}` (one explicit set for all)."""
    if "seed" in scheme:
        return branch_scores(model, features, category, scheme["num_masks"], scheme["seed"])
    if "first_seed" in scheme:
        masks = model.mask_generator()(len(features), scheme["num_masks"],
                                       [scheme["first_seed"] + i for i in range(len(features))])
    else:
        masks = scheme["masks"].expand(len(features), -1, -1)
    return scores_with_masks(model, features, category, masks)


def load_test_features(model, processor, layout, categories: list[str], path: str | None) -> dict:
    """`{category: (features, anomaly types)}` of the test images, kept in `path` when given."""
    if path and Path(path).is_file():
        saved = torch.load(path, weights_only=True)
        if all(c in saved for c in categories):
            return saved
    out = {}
    for category in categories:
        rows = evaluation_rows(layout, category)
        out[category] = (extract_features(model.tokenizer, processor, [r["path"] for r in rows], 16,
                                          f"features test/{category}"), [r["anomaly_type"] for r in rows])
    if path:
        torch.save(out, path)
    return out


def rescoring_parser(description: str):
    """The probe options plus what `rescoring_inputs` reads: `--model`, `--data_root`, `--feature_cache`,
    `--categories` and `--test_features`."""
    parser = S.parser(description)
    parser.add_argument("--model", required=True, help="trained model folder (OUTPUT_DIR/model)")
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--feature_cache", required=True,
                        help="training's feature cache with the validation features (OUTPUT_DIR/cache/features.pt)")
    parser.add_argument("--categories", nargs="+", default=["all"])
    parser.add_argument("--test_features", default=None, help="file that keeps the test features between runs")
    return parser


def rescoring_inputs(args) -> tuple:
    """`(model, categories, validation cache, {category: (test features, anomaly types)})` for a probe that
    rescores `args.model` on `args.categories` of `args.data_root` (validation features from
    `args.feature_cache`, test features kept in `args.test_features`)."""
    model, processor = load_detector(args.model)
    model.config.logical_pose_step = 0  # cached features: the logical branch scores the image as it is
    model.config.logical_retrieval_neighbours = 0  # with the trained predictor alone
    if model.config.global_image_size is not None:
        raise SystemExit(f"{args.model} fuses branches that read features at global_image_size, which this probe does "
                         "not extract: rescore a model trained without it")
    layout = find_layout(args.data_root)
    categories = select_categories(layout, "all" if args.categories == ["all"] else args.categories)
    validation = torch.load(args.feature_cache, weights_only=True)
    return model, categories, validation, load_test_features(model, processor, layout, categories, args.test_features)


def main(argv=None) -> dict:
    parser = rescoring_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--num_masks", type=int, default=None, help="masks of the seeded schemes (default: the model's)")
    parser.add_argument("--shared_seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--balanced", type=int, nargs="*", default=[10, 20], help="sizes of the balanced mask sets")
    parser.add_argument("--balanced_seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--candidates", type=int, default=1000, help="masks the balanced sets are chosen from")
    args = parser.parse_args(argv)
    S.use_threads(args.threads)

    model, categories, validation, test = rescoring_inputs(args)
    num_masks = args.num_masks or model.config.num_masks
    schemes = {f"shared_seed{s}": {"seed": s, "num_masks": num_masks} for s in args.shared_seeds}
    schemes["per_image"] = {"first_seed": args.seed, "num_masks": num_masks}
    for size in args.balanced:
        for seed in args.balanced_seeds:
            masks = balanced_masks(model, size, seed, args.candidates)
            cover = masks.sum(0)
            schemes[f"balanced{size}_seed{seed}"] = {"masks": masks, "num_masks": size,
                                                     "coverage": [int(cover.min()), int(cover.max())]}

    results = {}
    for name, scheme in schemes.items():
        per_category = {}
        for category in categories:
            val = scheme_scores(model, validation[f"validation/{category}"], category, scheme)
            model.config.calibration[category] = calibration_statistics(
                val, model.config.fused_branches, model.config.fusion_rule, 0.01)
            features, types = test[category]
            raw = scheme_scores(model, features, category, scheme)
            fused = model.fuse_branches(model.standardized_scores(raw, [category] * len(types)))
            branch = loco_image_aurocs(raw["logical"].numpy().astype(np.float64), types)
            combined = loco_image_aurocs(fused.numpy().astype(np.float64), types)
            per_category[category] = {"logical_branch": round(branch["auroc_logical"], 4),
                                      "fused_logical": round(combined["auroc_logical"], 4),
                                      "fused_mean": round(combined["auroc_mean"], 4)}
        mean = {key: round(float(np.mean([v[key] for v in per_category.values()])), 4)
                for key in ("logical_branch", "fused_logical", "fused_mean")}
        results[name] = {**mean, "num_masks": scheme["num_masks"], "per_category": per_category}
        if "coverage" in scheme:
            results[name]["coverage"] = scheme["coverage"]
        S.progress(f"[mask_coverage] {name}: logical branch {mean['logical_branch']:.3f}, fused logical "
                   f"{mean['fused_logical']:.3f}, fused mean {mean['fused_mean']:.3f}")

    print("| scheme | masks | logical branch | fused logical | fused mean |")
    print("|---|---|---|---|---|")
    for name, entry in results.items():
        print(f"| {name} | {entry['num_masks']} | {entry['logical_branch']:.3f} | {entry['fused_logical']:.3f} | "
              f"{entry['fused_mean']:.3f} |")
    S.report("mask coverage: " + "; ".join(f"{name} {entry['fused_mean']:.3f}" for name, entry in results.items())
             + " (fused mean AUROC)",
             {"experiment": "mask_coverage", "model": args.model, "fusion": [model.config.fused_branches,
                                                                             model.config.fusion_rule],
              "schemes": results})
    return results


if __name__ == "__main__":
    main()
