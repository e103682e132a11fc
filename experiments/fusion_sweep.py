"""Which branches to fuse, and how: every fusion variant of one trained model, scored once.

Loads a trained detector, switches on the memory-bank and global branches if it lacks them (fitted
on each category's training images, as training stage 3 does), measures every branch's mean/std on
`validation/good` with the training calibration's mask seeds, and scores the test images once with
the evaluation's mask seeds. Each variant is then a set of branches and a fusion rule applied to
those same standardised scores and maps, so the comparison is paired: image AUROCs (good vs
logical, good vs structural) and AU-sPRO@0.05 of the fused map, per category and on average.

    python experiments/fusion_sweep.py --model outputs/synthloco/model --data_root data/synthloco \
        --feature_cache outputs/synthloco/cache/features.pt \
        --variants logical+structural:sum memory_bank+logical+global:max

A variant is `branch+branch+...:rule`. Maps are standardised as the package does, with the mean and
std of each branch's validation map pixels; `--map_statistics score` uses the branch's image-score
statistics instead (what the package did before 12-06: a memory-bank map lies far below its image
score, the map's maximum, and a logical map does not, which hands max-type fused maps to the logical
map). Last stdout line: JSON with one entry per variant and the branches alone.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import _shared as S

DEFAULT_VARIANTS = (
    "logical+structural:sum", "memory_bank:sum", "global:sum", "logical+memory_bank:sum",
    "logical+memory_bank+global:sum", "logical+structural+memory_bank+global:sum",
    "logical+memory_bank+global:max", "logical+structural+memory_bank+global:max", "logical+memory_bank:max",
)


def parse_variant(text: str) -> tuple[list[str], str]:
    from ladmim_hf.models.configuration_ladmim import BRANCHES, FUSION_RULES

    branches, sep, rule = text.partition(":")
    names = [b for b in branches.split("+") if b]
    if not sep or rule not in FUSION_RULES or not names or any(b not in BRANCHES for b in names):
        raise SystemExit(f"bad variant {text!r}: use branch+branch:rule with branches from {BRANCHES} and a rule from {FUSION_RULES}")
    return names, rule


def with_all_branches(model, train_features: dict, seed: int, memory_bank_size: int | None = None,
                      memory_bank_neighbourhood: int | None = None):
    """A copy of `model` with the memory-bank and global branches on: fitted here where the model lacks
    them, and the bank refitted when its size or neighbourhood is given."""
    from ladmim_hf import LadmimConfig, LadmimForAnomalyDetection

    config = model.config.to_dict()
    refit_bank = (config.get("memory_bank_size", 0) == 0 or memory_bank_size is not None
                  or memory_bank_neighbourhood is not None)
    refit_global = not config.get("global_branch", False)
    if refit_bank:
        config["memory_bank_size"] = memory_bank_size or config.get("memory_bank_size") or 2048
        config["memory_bank_neighbourhood"] = memory_bank_neighbourhood or config.get("memory_bank_neighbourhood", 1)
    config["global_branch"] = True
    config["fused_branches"] = None
    config["calibration"] = {}  # the sweep calibrates on validation itself, as training stage 3 does
    full = LadmimForAnomalyDetection(LadmimConfig.from_dict(config))
    weights = {k: v for k, v in model.state_dict().items() if not (refit_bank and k.startswith("memory_bank."))}
    missing, unexpected = full.load_state_dict(weights, strict=False)
    if unexpected:
        raise SystemExit(f"unexpected weights {unexpected}")
    for category in model.categories:
        if refit_bank or refit_global:
            features = train_features[category]
            class_id = int(full.tokenizer.category_ids(category, 1)[0])
            if refit_bank:
                full.memory_bank.fit(features, class_id, seed=seed)
            if refit_global:
                full.global_branch.fit(features, class_id)
    full._warned_uncalibrated.update(full.categories)
    return full.eval()


def score(model, inputs, category: str, num_masks: int, seed: int, batch_size: int = 16):
    """Raw branch scores `{branch: (N,)}` and maps `{branch: (N, S, S)}` of `inputs` (`scoring.ScoringFeatures`),
    every image with the mask set of `seed` (as training's calibration and `evaluate` score)."""
    scores, maps = {}, {}
    for start in range(0, len(inputs.features), batch_size):
        out = model(**inputs.model_inputs(start, start + batch_size), category=category, num_masks=num_masks, seed=seed)
        for name, value in out.branch_scores().items():
            scores.setdefault(name, []).append(value)
        for name, value in out.branch_maps().items():
            maps.setdefault(name, []).append(value)
    return {k: torch.cat(v) for k, v in scores.items()}, {k: torch.cat(v) for k, v in maps.items()}


def main(argv=None) -> None:
    parser = S.parser(__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--feature_cache", default=None, help="training feature cache (OUTPUT_DIR/cache/features.pt)")
    parser.add_argument("--categories", nargs="+", default=["all"])
    parser.add_argument("--memory_bank_size", type=int, default=None,
                        help="refit the memory bank with this many patches (default: the model's, or 2048 if it has none)")
    parser.add_argument("--memory_bank_neighbourhood", type=int, default=None,
                        help="refit the memory bank with this neighbourhood (default: the model's)")
    parser.add_argument("--eval_seed", type=int, default=0, help="the evaluation seed (test masks)")
    parser.add_argument("--num_masks", type=int, default=None, help="test masks per image (default: the model's; "
                        "validation always uses the model's, as training calibrates)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--no_spro", action="store_true", help="skip AU-sPRO (the slow part)")
    parser.add_argument("--map_statistics", choices=("pixel", "score"), default="pixel",
                        help="standardise maps with the mean and std of the branch's validation map pixels (the "
                        "package) or with its image-score statistics (the package before 12-06)")
    parser.add_argument("--save_scores", default=None, help="also save every branch's test z-scores and the anomaly "
                        "types per category to this file (torch.save), for other fusion rules offline")
    args = parser.parse_args(argv)
    S.use_threads(args.threads)
    variants = [parse_variant(v) for v in args.variants]

    from ladmim_hf.models.branches_ladmim import fuse
    from ladmim_hf.calibration import calibrate_category
    from ladmim_hf.data import evaluation_rows, find_layout, load_defects_config, select_categories
    from ladmim_hf.evaluation import load_detector, resize_map
    from ladmim_hf.scoring import ScoringFeatures, extract_features, extract_scoring_features, features_of_files
    from ladmim_hf.training.pipeline import cached_split_features, split_extracts
    from ladmim_hf.metrics import loco_au_spro, loco_image_aurocs

    model, processor = load_detector(args.model)
    layout = find_layout(args.data_root)
    categories = select_categories(layout, "all" if args.categories == ["all"] else args.categories)
    cache = torch.load(args.feature_cache, weights_only=True) if args.feature_cache else {}

    def cached(split: str, category: str) -> torch.Tensor:
        key = f"{split}/{category}"
        if key not in cache:
            paths = layout.paths(category, split)
            cache[key] = extract_features(model.tokenizer, processor, paths, 16, f"features {key}")
        return cache[key]

    def validation_features(category: str) -> ScoringFeatures:
        """What the model scores the validation images from (moved poses and global_image_size features
        included), from the cache where training keeps it; the missing ones extracted, each image read once."""
        missing = {key: extract for key, extract in split_extracts(model, "validation", category).items()
                   if key not in cache}
        if missing:
            cache.update(features_of_files(missing, model.tokenizer.device, processor, layout.paths(category, "validation"),
                                           16, f"features validation/{category}"))
        return cached_split_features(model, cache, "validation", category)

    model = with_all_branches(model, {c: cached("train", c) for c in categories}, args.seed, args.memory_bank_size,
                              args.memory_bank_neighbourhood)
    num_masks = model.config.num_masks
    test_masks = args.num_masks or num_masks
    results = {" + ".join(b) + f" ({r})": {} for b, r in variants}
    alone, saved = {}, {}
    for category in categories:
        S.progress(f"{category}: scoring")
        # Training's own calibration (the threshold is not used here), then the model's own
        # standardisation of scores and maps.
        features, moved, global_features = validation_features(category)
        stats = calibrate_category(model, features, category, num_masks, args.seed, 0.01, moved, global_features)
        if args.map_statistics == "score":  # without map statistics, maps fall back to the score's
            stats = {key: value for key, value in stats.items() if "_map_" not in key}
        model.config.calibration[category] = stats
        rows = evaluation_rows(layout, category)
        types = [r["anomaly_type"] for r in rows]
        # each test image read once for its plain, moved (with poses) and global_image_size features
        test = extract_scoring_features(model, processor, [r["path"] for r in rows], 16, f"features {category}")
        test_scores, test_maps = score(model, test, category, test_masks, args.eval_seed, batch_size=8)
        z = model.standardized_scores(test_scores, [category] * len(types))
        z_maps = model.standardized_maps(test_maps, [category] * len(types))
        saved[category] = {"z": z, "types": types}
        alone[category] = {b: loco_image_aurocs(v.numpy().astype(np.float64), types) for b, v in test_scores.items()}
        defects = list(load_defects_config(layout.category_root(category)).values()) or None
        for (branches, rule), name in zip(variants, results):
            fused = fuse(torch.stack([z[b] for b in branches], -1), rule).numpy().astype(np.float64)
            entry = loco_image_aurocs(fused, types)
            with_maps = [b for b in branches if b in z_maps]
            entry["spro_0.05"] = float("nan")
            if with_maps and defects is not None and not args.no_spro:
                fused_maps = fuse(torch.stack([z_maps[b] for b in with_maps], -1), rule)
                # at the ground truth's resolution (the image's for good images), as the evaluation does
                maps = [resize_map(fused_maps[i], r["regions"][0].shape if r["regions"] else Image.open(r["path"]).size[::-1])
                        for i, r in enumerate(rows)]
                entry["spro_0.05"] = loco_au_spro(maps, [r["regions"] for r in rows], types, defects, max_fpr=0.05)["au_spro_mean"]
            results[name][category] = entry

    if args.save_scores:
        torch.save(saved, args.save_scores)

    def mean(per: dict, key: str) -> float:
        values = [v[key] for v in per.values() if not np.isnan(v[key])]
        return float(np.mean(values)) if values else float("nan")

    print("| fused | logical | structural | mean | AU-sPRO@0.05 | worst category (log / str) |")
    print("|---|---|---|---|---|---|")
    for name, per in results.items():
        worst = min(per, key=lambda c: per[c]["auroc_mean"])
        print(f"| {name} | {mean(per, 'auroc_logical'):.3f} | {mean(per, 'auroc_structural'):.3f} | "
              f"{mean(per, 'auroc_mean'):.3f} | {mean(per, 'spro_0.05'):.3f} | {worst} "
              f"{per[worst]['auroc_logical']:.3f} / {per[worst]['auroc_structural']:.3f} |")
    print("\nbranches alone (log / str): " + "; ".join(
        f"{b} {np.mean([alone[c][b]['auroc_logical'] for c in categories]):.3f} / "
        f"{np.mean([alone[c][b]['auroc_structural'] for c in categories]):.3f}" for b in alone[categories[0]]))
    S.report("fusion sweep", {"variants": results, "branches_alone": alone, "memory_bank_size": model.config.memory_bank_size,
                            "memory_bank_neighbourhood": model.config.memory_bank_neighbourhood})


if __name__ == "__main__":
    main()
