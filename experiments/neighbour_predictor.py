"""A training-free masked predictor: the training images whose visible cells look most alike say what the hidden cells should hold.

The logical branch asks a trained transformer what lies under each mask. This probe asks the
training images instead, to tell how much of the branch's limit is the predictor and how much is
what the visible cells can say at all. Every cell is described by its soft assignment to K part
clusters (`LadmimGlobalBranch.part_assignments`: the model's own global part histogram, or a k-means
of the category's training cells fitted here). For each scoring mask and image:

- the histogram of the *visible* cells picks the `k` training images whose visible cells are closest;
- `rule=predict`: the score is the distance from the image's *hidden*-cell histogram to the mean of
  those neighbours' hidden-cell histograms under the same mask (a prediction, like the transformer's);
- `rule=nearest`: the smallest distance to any one neighbour's hidden-cell histogram.

`k=all` drops the conditioning: the hidden cells are then compared with every training image's
cells at the same place, whatever the context. The gap between `k=all` and a small `k` is what the
visible cells tell about the hidden ones. The image score is the mean over masks. Distances are
the kernel distance (an RBF over the part centres, bandwidth the median squared distance between
centres, as `histogram_distance: codebook_mmd` does over codes) or L1.

Variants are comma-separated settings: `k` (a number or `all`), `rule` (`predict` / `nearest`),
`masks` (per image, one shared set drawn from `--seed`), `cells` and `block` (masked cells and the
smallest block, as `score_num_masked` / `score_min_block`), `parts` (K), `soft` (1: soft assignments,
0: the nearest part only), `distance` (`kernel` / `l1`), `rank` (0: the exact kernel distance; r: each cell's assignment mapped
through the kernel's top-r eigenvectors, so the Euclidean distance of mean embeddings approximates it
with r numbers per cell), and `combine`, how the variant meets the trained
predictor in the fusion: `replace` (in place of the model's logical branch), `mean` or `max` (the logical
branch becomes the mean or the larger of the two z-scores; "alone" is then its AUROC) or `join` (one more
fused branch beside the model's own). Unset settings take `DEFAULTS`.

    python experiments/fusion_sweep.py --model M --data_root data/synthloco --feature_cache C \
        --variants logical+memory_bank+global:max_mean --no_spro --save_scores z.pt
    python experiments/neighbour_predictor.py --model M --data_root data/synthloco --feature_cache C \
        --scores z.pt --test_features test.pt

`--pose_step N` scores the neighbours at the image's own pose and moved N px right, left, down and
up (as `logical_pose_step` does for the trained predictor) and keeps the lowest score; the validation
images' moved features come from the feature cache (training keeps them under
`validation_moved_{N}px/`), the test images' are extracted once and kept in `--test_moved_features`.

Each variant is reported alone and, with `--scores` (`fusion_sweep.py --save_scores`), fused as its
`combine` says (standardised on `validation/good`, the model's `fusion_rule`; `mean` and `join` need
`--scores`; so do `max` and `join`). The
first row is the model's own logical branch. A second table gives each logical defect type's AUROC
against the good images: the model's fused score, its logical branch and each variant alone. Last
stdout line: JSON.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import _shared as S
from mask_coverage import rescoring_inputs, rescoring_parser
from ladmim_hf.models.branches_ladmim import LadmimGlobalBranch, fuse, kernel_embedding
from ladmim_hf.models.masking import BlockMaskGenerator

DEFAULTS = {"k": "5", "rule": "predict", "masks": "40", "cells": "20", "block": "8", "parts": "128", "soft": "1",
            "distance": "kernel", "combine": "replace", "rank": "0"}
COMBINE = ("replace", "mean", "max", "join")
DEFAULT_VARIANTS = ("k=all", "k=5", "k=all,rule=nearest", "k=15,rule=nearest", "k=5,soft=0",
                    "k=5,masks=10,cells=44,block=16", "k=15,rule=nearest,distance=l1")


def parse_variant(text: str) -> dict:
    """`"k=15,rule=nearest"` -> every setting, the unset ones from `DEFAULTS`; a bad one exits naming it."""
    settings = dict(DEFAULTS)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in DEFAULTS or not value:
            raise SystemExit(f"bad variant {text!r}: settings are {', '.join(f'{k}=...' for k in DEFAULTS)}")
        settings[key] = value
    ok = (settings["rule"] in ("predict", "nearest") and settings["distance"] in ("kernel", "l1")
          and settings["combine"] in COMBINE
          and settings["soft"] in ("0", "1") and (settings["k"] == "all" or settings["k"].isdigit())
          and all(settings[key].isdigit() and int(settings[key]) > 0 for key in ("masks", "cells", "block", "parts"))
          and settings["rank"].isdigit())
    if not ok:
        raise SystemExit(f"bad variant {text!r}: rule=predict|nearest, distance=kernel|l1, soft=0|1, k=N|all, "
                         f"combine={'|'.join(COMBINE)}, masks/cells/block/parts positive whole numbers, rank=R (0: exact)")
    return settings


def fused_with_variant(z: dict, variant_z: torch.Tensor, fused_branches: list[str], rule: str,
                       combine: str) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The fused score `(N,)` when a variant's standardised score `variant_z (N,)` meets the model's z-scores
    `z` (`{branch: (N,)}`) as `combine` says, and the logical branch it makes (None unless `mean`)."""
    if combine == "join":
        return None, fuse(torch.stack([z[b] for b in fused_branches] + [variant_z], -1), rule)
    logical = {"mean": (variant_z + z["logical"]) / 2, "max": torch.maximum(variant_z, z["logical"])}.get(combine, variant_z)
    fused = fuse(torch.stack([logical if b == "logical" else z[b] for b in fused_branches], -1), rule)
    return (None if combine == "replace" else logical), fused


def masked_histograms(assignments: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean part assignment over each mask's cells: `(B, N, P)` and `(M, N)` bool -> `(B, M, P)`."""
    weights = masks.to(assignments.dtype)
    return torch.einsum("bnp,mn->bmp", assignments, weights) / weights.sum(1).clamp_min(1)[None, :, None]


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, kernel: torch.Tensor | None) -> torch.Tensor:
    """Distances between histograms `(A, P)` and `(T, P)` -> `(A, T)`: the kernel distance
    `sqrt((a - b)^T G (a - b))` with `kernel` G `(P, P)`, or L1 when it is None."""
    if kernel is None:
        return torch.cdist(a, b, p=1)
    ka, kb = a @ kernel, b @ kernel
    squared = (ka * a).sum(1)[:, None] + (kb * b).sum(1)[None] - 2.0 * ka @ b.T
    return squared.clamp_min(0.0).sqrt()


def neighbour_scores(assignments: torch.Tensor, train_assignments: torch.Tensor, masks: torch.Tensor,
                     k: int | None, rule: str, kernel: torch.Tensor | None) -> torch.Tensor:
    """Per-mask scores `(B, M)` of images against the training images, for hidden cells `masks (M, N)`.

    Args:
        assignments: `(B, N, P)` part assignments of the scored images' cells; train_assignments: `(T, N, P)`.
        k: neighbours chosen by the visible cells' histogram (None: all T training images).
        rule: `"predict"` (distance to the neighbours' mean hidden histogram) or `"nearest"` (to the
            closest neighbour's hidden histogram).
        kernel: `(P, P)` similarity of the parts for the kernel distance; None: L1.
    """
    hidden = masked_histograms(assignments, masks)
    visible = masked_histograms(assignments, ~masks)
    train_hidden = masked_histograms(train_assignments, masks)
    train_visible = masked_histograms(train_assignments, ~masks)
    count = train_assignments.shape[0] if k is None else min(k, train_assignments.shape[0])
    scores = torch.empty(assignments.shape[0], masks.shape[0])
    for m in range(masks.shape[0]):
        neighbours = pairwise_distances(visible[:, m], train_visible[:, m], kernel).topk(count, 1, largest=False).indices
        if rule == "predict":
            predicted = train_hidden[neighbours, m].mean(1)  # (B, P)
            difference = hidden[:, m] - predicted
            scores[:, m] = (pairwise_distances(difference, torch.zeros_like(difference[:1]), kernel)[:, 0])
        else:
            distances = pairwise_distances(hidden[:, m], train_hidden[:, m], kernel)
            scores[:, m] = distances.gather(1, neighbours).amin(1)
    return scores


def pose_scores(scorer, features: torch.Tensor, moved: torch.Tensor | None) -> torch.Tensor:
    """`scorer((n, C, g, g)) -> (n,)` at the image as it is and, with `moved (n, 4, C, g, g)`, at every
    moved pose: the lowest score per image `(n,)`."""
    scores = scorer(features)
    if moved is None:
        return scores
    per_pose = [scorer(moved[:, i]) for i in range(moved.shape[1])]
    return torch.stack([scores, *per_pose], 1).amin(1)


def moved_test_features(model, processor, layout, categories: list[str], step: int, path: str | None) -> dict:
    """`{category: (num_test, 4, C, g, g)}`: the test images moved by `step` px, kept in `path` when given."""
    from ladmim_hf.data import evaluation_rows
    from ladmim_hf.scoring import extract_moved_features

    if path and Path(path).is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("step") == step and all(c in saved for c in categories):
            return saved
    previous, model.config.logical_pose_step = model.config.logical_pose_step, step
    try:
        out = {category: extract_moved_features(model, processor, [r["path"] for r in evaluation_rows(layout, category)],
                                                16, f"features test/{category}") for category in categories}
    finally:
        model.config.logical_pose_step = previous
    out["step"] = step
    if path:
        torch.save(out, path)
    return out


def part_model(model, train: torch.Tensor, category: str, parts: int, seed: int) -> tuple[LadmimGlobalBranch, int]:
    """The model's parts of the tokenizer's cells (the retrieval's own, or the global part histogram's when it
    reads the tokenizer's features) when they number `parts`, else parts fitted on `train` here; returns the
    branch and the category's row in it."""
    branch = model.retrieval_parts if model.config.global_image_size is not None else model.global_branch
    if branch is not None and branch.descriptor_kind == "part_histogram" and branch.part_centres.shape[1] == parts:
        return branch, int(model.tokenizer.category_ids(category, 1)[0])
    fitted = LadmimGlobalBranch(1, train.shape[1], "part_histogram", parts)
    fitted.fit(train, 0, seed=seed)
    return fitted, 0


def main(argv=None) -> dict:
    parser = rescoring_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--scores", default=None, help="the model's test z-scores (fusion_sweep.py --save_scores FILE)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--pose_step", type=int, default=0,
                        help="also score each image moved this many px (4 moves) and keep the lowest score")
    parser.add_argument("--test_moved_features", default=None, help="file that keeps the moved test features")
    args = parser.parse_args(argv)
    S.use_threads(args.threads)
    variants = {text: parse_variant(text) for text in args.variants}

    from ladmim_hf.data import evaluation_rows, find_layout
    from ladmim_hf.evaluation import per_defect_aurocs

    model, categories, cache, test = rescoring_inputs(args)
    moved_test = {}
    if args.pose_step:
        from ladmim_hf.evaluation import load_detector
        from ladmim_hf.training.pipeline import moved_cache_key

        missing = [c for c in categories if moved_cache_key(c, args.pose_step) not in cache]
        if missing:
            raise SystemExit(f"{args.feature_cache} holds no validation features moved by {args.pose_step} px for "
                             f"{missing}: train with model.logical_pose_step={args.pose_step}, or run "
                             f"`ladmim calibrate --logical_pose_step {args.pose_step}` on a copy")
        processor = load_detector(args.model)[1]
        moved_test = moved_test_features(model, processor, find_layout(args.data_root), categories, args.pose_step,
                                         args.test_moved_features)
    saved = torch.load(args.scores, weights_only=False) if args.scores else None
    if saved is None and any(v["combine"] != "replace" for v in variants.values()):
        raise SystemExit("combine=mean, max and join need the model's z-scores: pass --scores (fusion_sweep.py --save_scores)")
    fused_branches, rule = list(model.config.fused_branches), model.config.fusion_rule
    grid = model.config.tokenizer_config.grid_size

    aurocs = S.image_aurocs

    layout = find_layout(args.data_root)
    results: dict[str, dict] = {"model": {}, **{text: {} for text in variants}}
    per_defect: dict[str, dict] = {}
    for category in categories:
        features, types = test[category]
        defects = [row["defect_type"] for row in evaluation_rows(layout, category)]
        alone_scores: dict[str, np.ndarray] = {}
        train, validation = cache[f"train/{category}"], cache[f"validation/{category}"]
        z = None
        if saved is not None:
            if category not in saved or len(saved[category]["types"]) != len(types):
                raise SystemExit(f"{args.scores} holds no scores for the {len(types)} test images of {category}: "
                                 "run fusion_sweep.py --save_scores on this model and data root")
            z = saved[category]["z"]
            own_fused = fuse(torch.stack([z[b] for b in fused_branches], -1), rule)
            results["model"][category] = {"alone": aurocs(z["logical"], types), "fused": aurocs(own_fused, types)}
            alone_scores.update({"model fused": own_fused.numpy(), "model": z["logical"].numpy()})
        part_models = {}  # parts -> (part model, its row): one k-means per part count
        moved_validation = cache[moved_cache_key(category, args.pose_step)] if args.pose_step else None
        for text, settings in variants.items():
            S.progress(f"{category}: {text}")
            parts, soft = int(settings["parts"]), settings["soft"] == "1"
            if parts not in part_models:
                part_models[parts] = part_model(model, train, category, parts, args.seed)
            branch, row = part_models[parts]
            distance_kernel = branch.part_kernel(row) if settings["distance"] == "kernel" else None
            rank = int(settings["rank"])
            embedding = None
            if rank and distance_kernel is not None:  # kernel distances as Euclidean ones of rank-r cell embeddings
                embedding = kernel_embedding(distance_kernel, rank)  # (P, r)
                distance_kernel = torch.eye(rank)

            def cell_values(features_: torch.Tensor) -> torch.Tensor:
                """Each cell's part assignment (the nearest part's one-hot when not soft), embedded at `rank`."""
                with torch.no_grad():
                    values_ = branch.part_assignments(features_, torch.full((len(features_),), row))
                if not soft:
                    values_ = F.one_hot(values_.argmax(-1), parts).float()
                return values_ if embedding is None else values_ @ embedding

            train_values = cell_values(train)
            masks = BlockMaskGenerator(grid, int(settings["cells"]), int(settings["block"]), model.config.min_aspect)(
                1, int(settings["masks"]), [args.seed])[0]
            k = None if settings["k"] == "all" else int(settings["k"])

            def scorer(features_: torch.Tensor) -> torch.Tensor:
                return neighbour_scores(cell_values(features_), train_values, masks, k, settings["rule"], distance_kernel).mean(1)

            validation_scores = pose_scores(scorer, validation, moved_validation)
            test_scores = pose_scores(scorer, features, moved_test.get(category))
            alone = test_scores
            entry = {}
            if z is not None:
                # a constant validation score (a tiny grid, hard assignments) must not divide by zero
                standardized = (test_scores - validation_scores.mean()) / validation_scores.std().clamp_min(1e-12)
                logical, fused = fused_with_variant(z, standardized, fused_branches, rule, settings["combine"])
                alone = alone if logical is None else logical
                entry["fused"] = aurocs(fused, types)
            entry = {"alone": aurocs(alone, types), **entry}
            alone_scores[text] = alone.numpy()
            results[text][category] = entry
        per_defect[category] = {name: {key: value for key, value in values.items() if key not in ("anomaly_type", "count")}
                                for name, values in per_defect_aurocs(alone_scores, types, defects).items()
                                if values["anomaly_type"] == "logical"}

    mean = S.category_mean

    if saved is None:
        results.pop("model")
    lines = [f"each variant in place of the logical branch; fused: {' + '.join(fused_branches)} ({rule})",
             "| logical branch | alone: logical / structural | alone, logical per category | fused: logical / structural |",
             "|---|---|---|---|"]
    for name, per in results.items():
        fused_text = (f"{mean(per, 'fused', 'auroc_logical'):.3f} / {mean(per, 'fused', 'auroc_structural'):.3f}"
                      if saved is not None else "-")
        lines.append(f"| {'the model (trained predictor)' if name == 'model' else name} | "
                     f"{mean(per, 'alone', 'auroc_logical'):.3f} / {mean(per, 'alone', 'auroc_structural'):.3f} | "
                     + " / ".join(f"{per[c]['alone']['auroc_logical']:.2f}" for c in categories)
                     + f" | {fused_text} |")
    columns = list(next(iter(next(iter(per_defect.values())).values()), {}))
    lines += ["", "AUROC per logical defect type (alone; `model fused`: the model's fused score)",
              "| category | defect | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for category, defects_of in per_defect.items():
        for defect, values in defects_of.items():
            lines.append(f"| {category} | {defect} | " + " | ".join(f"{values[c]:.2f}" for c in columns) + " |")
    payload = {"experiment": "neighbour_predictor", "model": args.model, "categories": categories, "per_defect": per_defect,
               "fusion": [fused_branches, rule], "variants": {name: {"settings": variants.get(name, {}), "per_category": per}
                                                              for name, per in results.items()}}
    S.report("\n".join(lines), payload)
    return payload


if __name__ == "__main__":
    main()
