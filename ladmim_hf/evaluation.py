"""Evaluation: score every test image, compute LOCO metrics, and write metrics.json, scores.csv and
a report with pictures.

`python scripts/evaluate.py --model DIR_OR_HUB_ID --data_root ROOT --categories all --output_dir OUT`
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .baselines import KNNPatchBaseline
from .calibration import DEFAULT_HOLDOUT_FRACTION
from .models.branches_ladmim import LadmimGlobalBranch
from .models.configuration_ladmim import BRANCHES
from .models.image_processing_ladmim import LadmimImageProcessor, load_image
from .io_utils import atomic_write_csv, atomic_write_json, atomic_write_text
from .metrics import f1_optimal_threshold, image_auroc, loco_au_spro, loco_image_aurocs, operating_point, roc_curve_points
from .models.modeling_ladmim import LadmimForAnomalyDetection
from .scoring import extract_features, extract_scoring_features

logger = logging.getLogger("ladmim_hf.evaluation")


def load_detector(model: str, allow_default_processor: bool = False) -> tuple[LadmimForAnomalyDetection, LadmimImageProcessor]:
    """A trained detector and its image processor from a folder or Hub id (errors name the problem:
    missing config, truncated weights, unknown fields, a missing or unreadable preprocessor config).

    The processor's normalisation decides the scores, so a folder without `preprocessor_config.json`
    is refused unless `allow_default_processor` (then ImageNet defaults at the model's input size are
    used, with a warning); an unreadable one is always refused."""
    from .hub import PROCESSOR_NAME, ModelFolderError, load_model, resolve_model_folder

    folder = resolve_model_folder(model)
    detector = load_model(folder, check_code=False)
    processor_file = folder / PROCESSOR_NAME
    if not processor_file.is_file():
        if not allow_default_processor:
            raise ModelFolderError(f"{model} has no {PROCESSOR_NAME}: its resize and normalisation decide the scores. "
                                   "Copy it from the training output (OUTPUT_DIR/model), or pass "
                                   "--allow_default_processor to use ImageNet defaults")
        logger.warning("%s has no %s: using ImageNet normalisation at %d px (--allow_default_processor)", model,
                       PROCESSOR_NAME, detector.config.tokenizer_config.image_size)
        return detector, LadmimImageProcessor(size=detector.config.tokenizer_config.image_size)
    try:
        processor = LadmimImageProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:  # not JSON, wrong types, ...
        raise ModelFolderError(f"cannot read {processor_file}: {error}; fix or replace the file") from error
    return detector, processor


def resize_map(anomaly_map: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """An anomaly map `(h, w)` resized bilinearly to `shape` (the ground truth's, or the image's), as
    float32 numpy: what the evaluation's AU-sPRO is computed on."""
    return F.interpolate(anomaly_map[None, None].float(), size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def _nanmean(values: list[float]) -> float:
    """Mean of the defined values; NaN (without numpy's warning) when none is, e.g. a data set without
    logical anomalies."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def _branch_aurocs(scores: np.ndarray, types: list[str]) -> dict[str, float]:
    out = loco_image_aurocs(scores, types)
    return {"auroc_logical": out["auroc_logical"], "auroc_structural": out["auroc_structural"]}


def fused_without_each_branch(detector: LadmimForAnomalyDetection, branch_scores: dict[str, np.ndarray], category: str,
                              types: list[str]) -> dict[str, dict[str, float]]:
    """What each fused branch adds: `{branch: image AUROCs}` of the fused score with that branch left out,
    the others standardised and combined as the model does (`standardized_scores`, `fuse_branches`).
    Empty when fewer than two branches are fused. `branch_scores`: raw scores `(N,)` per branch."""
    fused = detector.config.fused_branches
    if len(fused) < 2:
        return {}
    z_scores = detector.standardized_scores({b: torch.from_numpy(np.asarray(branch_scores[b], dtype=np.float64)) for b in fused},
                                            category)
    return {left_out: _branch_aurocs(detector.fuse_branches({b: z for b, z in z_scores.items() if b != left_out}).numpy(), types)
            for left_out in fused}


def evaluate(model: str, data_root: str, categories: Any = "all", output_dir: str = "outputs/eval", num_masks: int | None = None,
             seed: int = 0, batch_size: int = 8, knn_baseline: bool = True, dataset_format: str = "auto",
             feature_cache: str | None = None, report_images: int = 3, predictor_dtype: str | None = None,
             allow_default_processor: bool = False) -> dict:
    """Score the test split of every category and write the results to `output_dir`.

    `data_root` is any layout `ladmim_hf.data.find_layout` reads: test images in
    ``<category>/test/<type>/``, or, for one category, ``DIR/test/`` or ``DIR/good`` next to defect
    folders (a one-category folder is scored as the model's category, see `pair_categories`).

    `predictor_dtype` ("bf16"/"fp16") runs the predictor under autocast (see
    `LadmimForAnomalyDetection.forward`); it is recorded in `metrics.json`.

    Returns the `metrics.json` content.
    """
    from .data import evaluation_rows, find_layout, load_defects_config, normal_split
    from .data.layout import pair_categories

    started = time.time()
    out_dir = Path(output_dir)
    detector, processor = load_detector(model, allow_default_processor)
    layout = find_layout(data_root, dataset_format)
    pairs = pair_categories(layout, categories, detector.categories)  # {data category: model category}
    wanted = list(pairs.values())
    num_masks = detector.resolve_num_masks(num_masks)
    cache = torch.load(feature_cache, weights_only=True) if feature_cache and Path(feature_cache).is_file() else {}

    metrics: dict[str, Any] = {"categories": {}, "mean": {}, "baselines": {"knn": {}, "global": {}}, "num_masks": num_masks,
                               "seed": seed, "per_defect": {}, "fused_branches": detector.config.fused_branches,
                               "fusion_rule": detector.config.fusion_rule,
                               "logical_retrieval_neighbours": getattr(detector.config, "logical_retrieval_neighbours", 0)}
    if predictor_dtype:
        metrics["predictor_dtype"] = predictor_dtype
    score_rows: list[dict] = []
    roc_curves: dict[str, dict] = {}
    heatmap_items: list[dict] = []
    for data_category, category in pairs.items():
        rows = evaluation_rows(layout, data_category)
        if not rows:
            raise FileNotFoundError(f"no test images for category {category!r} under {data_root}")
        paths = [r["path"] for r in rows]
        types = [r["anomaly_type"] for r in rows]
        scoring = extract_scoring_features(detector, processor, paths, batch_size, f"features {category}")
        features = scoring.features
        outputs: dict[str, list[torch.Tensor]] = {}
        for start in tqdm(range(0, len(paths), batch_size), desc=f"scoring {category}", unit="batch"):
            out = detector(**scoring.model_inputs(start, start + batch_size), category=category, num_masks=num_masks,
                           seed=seed, predictor_dtype=predictor_dtype)
            named = {"pred_score": out.pred_score, "anomaly_map": out.anomaly_map,
                     **{f"{b}_score": v for b, v in out.branch_scores().items()},
                     **{f"{b}_map": v for b, v in out.branch_maps().items()}}
            for key, value in named.items():
                outputs.setdefault(key, []).append(value.cpu())
        result = {key: torch.cat(value) for key, value in outputs.items()}
        fused = result["pred_score"].numpy().astype(np.float64)
        branch_scores = {b: result[f"{b}_score"].numpy().astype(np.float64) for b in detector.config.enabled_branches}
        entry = dict(loco_image_aurocs(fused, types))
        maps, regions, spro_types = [], [], []
        for i, row in enumerate(rows):
            shape = row["regions"][0].shape if row["regions"] else Image.open(row["path"]).size[::-1]
            maps.append(resize_map(result["anomaly_map"][i], shape))
            regions.append(row["regions"])
            spro_types.append(row["anomaly_type"])
        defects = list(load_defects_config(layout.category_root(data_category)).values()) or None
        entry["spro_0.05"] = float("nan")
        if defects is not None and any(regions):
            entry["spro_0.05"] = loco_au_spro(maps, regions, spro_types, defects, max_fpr=0.05)["au_spro_mean"]
        entry["branches"] = {b: _branch_aurocs(v, types) for b, v in branch_scores.items()}
        entry["without"] = fused_without_each_branch(detector, branch_scores, category, types)
        metrics["categories"][category] = entry
        metrics["per_defect"][category] = per_defect_aurocs(
            {"fused": fused, **{f"{b}_branch": v for b, v in branch_scores.items()}}, types, [r["defect_type"] for r in rows])
        calibration = detector.config.calibration.get(category, {})
        points = category_operating_points(fused, types, _applied_threshold(detector, category, result["pred_score"].dtype),
                                           calibration.get("num_images"))
        # how the threshold was set: a false-positive rate on normal images, or best F1 on labelled ones
        points["calibrated"].update({f"calibration_{k}": calibration[k] for k in ("fpr", "num_anomalous") if k in calibration})
        metrics.setdefault("operating_points", {})[category] = points

        if knn_baseline:
            train_features = cache.get(f"train/{category}")
            if train_features is None:
                train_paths = normal_split(layout, data_category, DEFAULT_HOLDOUT_FRACTION, seed).train
                train_features = extract_features(detector.tokenizer, processor, train_paths, batch_size, f"baselines {category}")
            knn_scores, _ = KNNPatchBaseline().fit(train_features).score(features)
            metrics["baselines"]["knn"][category] = _branch_aurocs(np.asarray(knn_scores, dtype=np.float64), types)
            global_baseline = LadmimGlobalBranch(1, train_features.shape[1])
            global_baseline.fit(train_features, 0)
            global_scores = global_baseline(features, torch.zeros(len(features), dtype=torch.long), [category])
            metrics["baselines"]["global"][category] = _branch_aurocs(global_scores.numpy().astype(np.float64), types)

        labels = np.array([t != "good" for t in types])
        roc_curves[category] = {}
        for name, scores in (("fused", fused), *((f"{b.replace('_', ' ')} branch", v) for b, v in branch_scores.items())):
            for kind in ("logical", "structural"):
                keep = np.array([t in ("good", kind) for t in types])
                if keep.sum() and labels[keep].any() and (~labels[keep]).any():
                    fpr, tpr, _ = roc_curve_points(scores[keep], labels[keep])
                    roc_curves[category][f"{name}, {kind}"] = (fpr, tpr, image_auroc(scores[keep], labels[keep]))
        order = np.argsort(fused)
        picks = [int(i) for i in list(order[::-1][:report_images]) + list(order[:max(1, report_images // 2)])]
        # Maps in z units (each branch's calibration), so rows and categories share one colour scale.
        z_maps = detector.standardized_maps({b: result[f"{b}_map"][picks] for b in detector.config.enabled_branches
                                               if f"{b}_map" in result}, [category] * len(picks))
        for row, i in enumerate(picks):
            image = load_image(paths[i]).resize((detector.config.tokenizer_config.image_size,) * 2)
            heatmap_items.append({"image": image, "title": f"{category} {types[i]} score {fused[i]:.2f}",
                                  "maps": {f"{b.replace('_', ' ')} (z)": m[row].numpy() for b, m in z_maps.items()}})
        for i, row in enumerate(rows):
            score_rows.append({"path": row["path"], "category": category, "anomaly_type": types[i],
                               "defect_type": row["defect_type"], "pred_score": fused[i],
                               **{f"{b}_score": v[i] for b, v in branch_scores.items()},
                               "pred_label": bool(result["pred_score"][i] > detector.calibration_for(category)["threshold"])})

    keys = ("auroc_logical", "auroc_structural", "auroc_mean", "spro_0.05")
    for key in keys:
        values = [v[key] for v in metrics["categories"].values() if not math.isnan(v[key])]
        metrics["mean"][key] = float(np.mean(values)) if values else float("nan")
    metrics["operating_points_total"] = total_operating_points(score_rows, metrics["operating_points"])
    if knn_baseline:
        for per in metrics["baselines"].values():
            per["mean"] = {k: _nanmean([per[c][k] for c in wanted]) for k in ("auroc_logical", "auroc_structural")}
    else:
        del metrics["baselines"]
    metrics["branches_mean"] = {
        branch: {k: _nanmean([metrics["categories"][c]["branches"][branch][k] for c in wanted]) for k in ("auroc_logical", "auroc_structural")}
        for branch in detector.config.enabled_branches
    }
    metrics["without_mean"] = {
        branch: {k: _nanmean([metrics["categories"][c]["without"][branch][k] for c in wanted]) for k in ("auroc_logical", "auroc_structural")}
        for branch in (detector.config.fused_branches if len(detector.config.fused_branches) > 1 else [])
    }
    metrics["seconds"] = round(time.time() - started, 1)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no empty folder
    _write_outputs(out_dir, metrics, score_rows, roc_curves, heatmap_items, model)
    return metrics


def per_defect_aurocs(scores: dict[str, np.ndarray], types: list[str], defect_types: list[str]) -> dict[str, dict]:
    """Image AUROC of good images vs each defect type, for every named score (e.g. the fused score and
    each branch alone).

    Args:
        scores: `{name: (N,) scores}`; types: N anomaly types ("good", ...); defect_types: N
            comma-separated defect names ("" for good images).

    Returns:
        `{defect: {"anomaly_type", "count", <name>: auroc, ...}}`; an image showing several defect
        types counts for each of them.
    """
    types_array = np.asarray(types)
    good = types_array == "good"
    shown = [set(filter(None, names.split(","))) for names in defect_types]
    result = {}
    for name in sorted(set().union(*shown) if shown else set()):
        has = np.array([name in names for names in shown])
        if not good.any() or not has.any():
            continue
        keep = good | has
        labels = has[keep].astype(int)
        result[name] = {"anomaly_type": str(types_array[has][0]), "count": int(has.sum()),
                        **{key: float(image_auroc(np.asarray(values)[keep], labels)) for key, values in scores.items()}}
    return result


def _applied_threshold(detector: LadmimForAnomalyDetection, category: str, dtype: torch.dtype) -> float:
    """The category's calibrated threshold as `pred_label` applies it. The model compares `dtype`
    (float32) scores with the threshold cast to that dtype; the cast value, compared with the float64
    copies of the scores, gives exactly the model's labels (the stored float64 may not, by one ulp)."""
    return float(torch.tensor(detector.calibration_for(category)["threshold"], dtype=dtype))


def category_operating_points(scores: np.ndarray, types: list[str], threshold: float,
                              num_validation_images: int | None = None) -> dict:
    """One category's operating points of the fused score, good vs every anomaly.

    Returns:
        `{"calibrated": point, "best_f1": point}` (points as `metrics.operating_point`): `calibrated`
        at the model's threshold, plus the number of normal validation images it was set on (None:
        the category was never calibrated and the default threshold applies); `best_f1` at the
        threshold maximising F1 on these test labels, None without both good and anomalous images.
    """
    labels = np.array([t != "good" for t in types])
    calibrated = {**operating_point(scores, labels, threshold, types), "num_validation_images": num_validation_images}
    best = None
    if labels.any() and not labels.all():
        best = operating_point(scores, labels, f1_optimal_threshold(scores, labels)[0], types)
    return {"calibrated": calibrated, "best_f1": best}


def total_operating_points(score_rows: list[dict], per_category: dict) -> dict:
    """Both operating points over all categories: each image is judged at its own category's threshold,
    so the confusion matrix is the sum of the categories' and the rates follow from the summed counts
    (categories without a `best_f1` point are left out of that one; `num_categories` says how many count)."""
    total: dict[str, dict | None] = {}
    for name in ("calibrated", "best_f1"):
        rows = [r for r in score_rows if (per_category.get(r["category"]) or {}).get(name)]
        if not rows:
            total[name] = None
            continue
        types = [r["anomaly_type"] for r in rows]
        thresholds = [per_category[r["category"]][name]["threshold"] for r in rows]
        point = operating_point([r["pred_score"] for r in rows], [t != "good" for t in types], thresholds, types)
        total[name] = {**point, "num_categories": len({r["category"] for r in rows})}
    return total


# Column titles, in the detector's branch order (`configuration_ladmim.BRANCHES`).
BRANCH_TITLES = dict(zip(BRANCHES, ("logical branch", "structural branch", "memory bank", "global")))


def _branch_names(metrics: dict) -> list[str]:
    """The branches a metrics dict reports per category, in the detector's order."""
    first = next(iter(metrics["categories"].values()), {})
    return [b for b in BRANCH_TITLES if b in first.get("branches", {})]


def per_defect_table(metrics: dict) -> str:
    """Markdown table of `metrics["per_defect"]`: which rules and damages each branch catches."""
    entries = [entry for defects in metrics.get("per_defect", {}).values() for entry in defects.values()]
    branches = [b for b in BRANCH_TITLES if any(f"{b}_branch" in entry for entry in entries)]
    lines = ["| category | defect type | kind | images | fused | " + " | ".join(BRANCH_TITLES[b] for b in branches) + " |",
             "|---|---|---|---|---|" + "---|" * len(branches)]
    for category, defects in metrics.get("per_defect", {}).items():
        for name, entry in defects.items():
            cells = " | ".join(_fmt(entry.get(f"{b}_branch")) for b in branches)
            lines.append(f"| {category} | {name} | {entry['anomaly_type']} | {entry['count']} | {_fmt(entry['fused'])} | {cells} |")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _pair(entry: dict | None) -> str:
    return f"{_fmt(entry.get('auroc_logical'))} / {_fmt(entry.get('auroc_structural'))}" if entry else "n/a"


def results_table(metrics: dict) -> str:
    """Markdown table: per category the fused AUROCs, AU-sPRO, each branch alone, and the baselines."""
    branches = _branch_names(metrics)
    baselines = {name: per for name, per in metrics.get("baselines", {}).items() if per}
    header = (["category", "logical", "structural", "mean", "AU-sPRO@0.05"]
              + [f"{BRANCH_TITLES[b]} (log/str)" for b in branches]
              + [f"{'kNN' if name == 'knn' else name} baseline (log/str)" for name in baselines])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in list(metrics["categories"].items()) + [("**mean**", None)]:
        key = name
        if entry is None:
            entry = dict(metrics["mean"])
            entry["branches"] = metrics.get("branches_mean", {})
            key = "mean"
        cells = [name, _fmt(entry["auroc_logical"]), _fmt(entry["auroc_structural"]), _fmt(entry["auroc_mean"]),
                 _fmt(entry["spro_0.05"])]
        cells += [_pair(entry.get("branches", {}).get(b)) for b in branches]
        cells += [_pair(per.get(key)) for per in baselines.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def branch_ablation_section(metrics: dict) -> list[str]:
    """Report lines: per category, the fused AUROCs and those with each fused branch left out in turn
    (empty when fewer than two branches are fused)."""
    left_out = list(metrics.get("without_mean") or {})
    if not left_out:
        return []
    titles = {**BRANCH_TITLES, "global": "global branch"}
    header = ["category", "fused (log/str)"] + [f"without the {titles[b]} (log/str)" for b in left_out]
    lines = ["## What each fused branch adds", "",
             "The fused score's image AUROCs with each branch left out in turn (the others standardised and combined "
             "by the same rule). Where leaving a branch out does not lower them, it does not earn its scoring cost "
             "on these images.", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in list(metrics["categories"].items()) + [("**mean**", None)]:
        fused = metrics["mean"] if entry is None else entry
        without = metrics["without_mean"] if entry is None else entry.get("without", {})
        lines.append("| " + " | ".join([name, _pair(fused)] + [_pair(without.get(b)) for b in left_out]) + " |")
    return lines + [""]


OPERATING_POINTS_INTRO = (
    "An image is predicted anomalous when its fused score is above the threshold (the model's `pred_label`); "
    "positives are all anomalous test images, logical and structural. **calibrated** is the threshold stored in "
    "the model (`config.calibration[category][\"threshold\"]`), set on the category's normal validation images "
    "(mean + z * std of their fused scores) at the false-positive rate configured for training "
    "(`calibration_fpr`); no anomalous image is used, so its recall is what a deployment can expect. "
    "**best F1** is the threshold that maximises F1 on these test labels: an optimistic upper bound, not a "
    "threshold one could deploy. FPR is the share of good test images flagged; n/a means undefined (e.g. no "
    "images of that kind, or nothing flagged for precision).")
OPERATING_POINTS_TOTAL = (
    "All categories together, every image judged at its own category's threshold: the confusion matrix is the "
    "sum of the categories' matrices and the rates are computed from those sums (so larger categories weigh more).")
_POINT_NAMES = {"calibrated": "calibrated", "best_f1": "best F1 (test labels)"}


def _point_row(name: str, point: dict | None) -> str:
    if point is None:
        return f"| {name} |" + " n/a |" * 9
    recall = " / ".join(_fmt(point.get(key)) for key in ("recall", "recall_logical", "recall_structural"))
    counts = " | ".join(str(point[key]) for key in ("tp", "fp", "tn", "fn"))
    return (f"| {name} | {_fmt(point['threshold'])} | {_fmt(point['precision'])} | {recall} | {_fmt(point['f1'])} "
            f"| {_fmt(point['fpr'])} | {counts} |")


def operating_points_section(metrics: dict) -> list[str]:
    """Report lines: per category, and in total, the fused score's precision, recall, F1, FPR and
    confusion matrix at the calibrated and at the F1-best threshold (empty without operating points)."""
    per_category = metrics.get("operating_points") or {}
    if not per_category:
        return []
    header = ["| threshold | value | precision | recall (all / logical / structural) | F1 | FPR | TP | FP | TN | FN |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines = ["## Operating points", "", OPERATING_POINTS_INTRO, ""]
    tables = list(per_category.items())
    if metrics.get("operating_points_total"):
        tables.append(("total", metrics["operating_points_total"]))
    for i, (category, points) in enumerate(tables):
        if i == len(per_category):
            note = OPERATING_POINTS_TOTAL
        elif points["calibrated"].get("calibration_num_anomalous") is not None:
            note = (f"Calibrated with `ladmim calibrate --labelled` (best F1) on {points['calibrated']['num_validation_images']} "
                    f"good and {points['calibrated']['calibration_num_anomalous']} anomalous images.")
        elif points["calibrated"].get("num_validation_images") is not None:
            note = f"Calibrated on {points['calibrated']['num_validation_images']} normal validation images"
            fpr = points["calibrated"].get("calibration_fpr")
            note += f" at a false-positive rate of {fpr:g}." if fpr is not None else "."
        else:
            note = "The model has no calibration for this category: its default threshold applies."
        lines += [f"### {category}", "", note, "", *header,
                  *(_point_row(title, points.get(key)) for key, title in _POINT_NAMES.items()), ""]
    return lines


def _histogram_thresholds(metrics: dict, category: str) -> dict[str, float]:
    """The category's operating-point thresholds, labelled for the score histogram."""
    points = (metrics.get("operating_points") or {}).get(category) or {}
    return {title: points[key]["threshold"] for key, title in _POINT_NAMES.items() if points.get(key)}


def _write_outputs(out_dir: Path, metrics: dict, score_rows: list[dict], roc_curves: dict, heatmap_items: list[dict], model: str) -> None:
    from .visualization import heatmap_grid, plot_roc_curves, plot_score_histograms

    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_csv(out_dir / "scores.csv", score_rows, list(score_rows[0]))
    figures = []
    for category, curves in roc_curves.items():
        if curves:
            plot_roc_curves(curves, out_dir / "figures" / f"roc_{category}.png", title=f"ROC: {category}")
            figures.append((f"ROC curves: {category}", f"figures/roc_{category}.png"))
        rows = [r for r in score_rows if r["category"] == category]
        plot_score_histograms([r["pred_score"] for r in rows], [r["anomaly_type"] for r in rows],
                              out_dir / "figures" / f"scores_{category}.png", title=f"Fused scores: {category}",
                              thresholds=_histogram_thresholds(metrics, category))
        figures.append((f"Score histogram: {category} (calibrated and best-F1 thresholds)", f"figures/scores_{category}.png"))
    if heatmap_items:
        heatmap_grid(heatmap_items, out_dir / "figures" / "heatmaps.png", shared_scale=True)
        figures.append(("Most and least anomalous test images (each branch's map in z units, one colour range "
                        "per column)", "figures/heatmaps.png"))
    report = ["# LADMIM evaluation report", "", f"Model: `{model}`; {metrics['num_masks']} masks per image, seed {metrics['seed']}.", "",
              results_table(metrics), "",
              f"Fused: {' + '.join(metrics['fused_branches'])}, each standardised on validation/good, combined by "
              f"{metrics['fusion_rule']!r}. AUROCs are image-level (good vs logical, good vs structural). Branch columns "
              "score with one branch alone. Baselines need no training: kNN is a PatchCore-style nearest-neighbour score "
              "with every training patch in its bank, global the Mahalanobis distance of mean- and std-pooled features; both on the "
              "same backbone features."
              + (" The logical branch is the larger z-score of the trained predictor and the retrieval of the "
                 f"{metrics['logical_retrieval_neighbours']} training images whose visible parts look most alike."
                 if metrics.get("logical_retrieval_neighbours") else ""), ""]
    if any(metrics.get("per_defect", {}).values()):
        report += ["## Per defect type", "", "Image AUROC of good images vs the images showing each defect type.", "",
                   per_defect_table(metrics), ""]
    report += branch_ablation_section(metrics)
    report += operating_points_section(metrics)
    for title, path in figures:
        report += [f"## {title}", "", f"![{title}]({path})", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(report))


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import add_batch_size_option, add_data_options, add_model_option, add_processor_option, add_scoring_options

    add_model_option(parser)
    add_data_options(parser, "a root with one folder per category, or one category's folder (DIR/test/<type>/ or "
                             "DIR/good next to DIR/<defect>/)")
    parser.add_argument("--output_dir", required=True, help="where metrics.json, scores.csv and report.md go")
    add_scoring_options(parser)
    add_batch_size_option(parser, 8)
    parser.add_argument("--no_knn", action="store_true", help="skip the kNN baseline")
    parser.add_argument("--feature_cache", default=None, help="training feature cache (OUTPUT_DIR/cache/features.pt) to reuse for the kNN bank")
    add_processor_option(parser)


def run_from_args(args: argparse.Namespace) -> int:
    """Evaluate from parsed arguments; a missing or empty data folder is one `error:` line and exit 2."""
    from .data import DataLayoutError, find_layout, select_categories
    from .models.image_processing_ladmim import ImageDecodeError

    categories = "all" if args.categories == ["all"] else args.categories
    try:
        # Check every category's test split before the model is loaded (a Hub download can take
        # minutes) or anything is written; evaluate() then reads the cached walk.
        layout = find_layout(args.data_root, args.dataset_format)
        for category in layout.categories if layout.single_category else select_categories(layout, categories):
            layout.load(category, "test")
    except (DataLayoutError, ImageDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from .hub import ModelFolderError

    try:
        metrics = evaluate(args.model, args.data_root, categories, args.output_dir, args.num_masks, args.seed,
                           args.batch_size, not args.no_knn, args.dataset_format, args.feature_cache,
                           predictor_dtype=args.predictor_dtype, allow_default_processor=args.allow_default_processor)
    except (ModelFolderError, DataLayoutError) as error:  # a missing, corrupt or foreign model, or other categories
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(results_table(metrics))
    print(f"metrics: {Path(args.output_dir) / 'metrics.json'}  report: {Path(args.output_dir) / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`ladmim evaluate ARGV` (ARGV defaults to the command line's)."""
    from .cli import run_subcommand

    return run_subcommand("evaluate", argv)


if __name__ == "__main__":
    sys.exit(main())
