"""Evaluation: score every test image, compute LOCO metrics, and write metrics.json, scores.csv and
a report with pictures.

`python scripts/evaluate.py --model DIR_OR_HUB_ID --data_root ROOT --categories all --output_dir OUT`
"""

from __future__ import annotations

import argparse
import csv
import io
import json
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
from .branches_ladmim import LadmimGlobalBranch
from .configuration_ladmim import BRANCHES
from .image_processing_ladmim import LadmimImageProcessor, load_image
from .io_utils import atomic_write_json, atomic_write_text
from .metrics import image_auroc, loco_au_spro, loco_image_aurocs, roc_curve_points
from .modeling_ladmim import LadmimForAnomalyDetection

logger = logging.getLogger("ladmim_hf.evaluation")

ANOMALY_TYPE_NAMES = ["good", "logical", "structural"]


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


def _test_rows(data_root: str, category: str, dataset_format: str) -> list[dict]:
    from .data import load_loco, load_mvtec_ad

    if dataset_format == "loco":
        dataset = load_loco(data_root, category, "test")
    elif dataset_format == "mvtec_ad":
        dataset = load_mvtec_ad(data_root, category, "test")
    else:
        raise ValueError(f"dataset_format must be 'loco' or 'mvtec_ad', got {dataset_format!r}")
    names = dataset.features["anomaly_type"].names
    rows = []
    for row in dataset:
        regions = [np.asarray(mask) for mask in (row.get("masks") or [])]
        rows.append({"path": row["path"], "anomaly_type": names[row["anomaly_type"]], "regions": regions,
                     "defect_type": ",".join(row.get("defect_type") or [])})
    return rows


def _train_paths(data_root: str, category: str, dataset_format: str) -> list[str]:
    from .data import load_loco, load_mvtec_ad

    loader = load_loco if dataset_format == "loco" else load_mvtec_ad
    return list(loader(data_root, category, "train").select_columns(["path"])["path"])


@torch.no_grad()
def _features(model: LadmimForAnomalyDetection, processor: LadmimImageProcessor, paths: list[str], batch_size: int,
              description: str) -> torch.Tensor:
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc=description, unit="batch", leave=False):
        pixel_values = processor(paths[start:start + batch_size])["pixel_values"]
        chunks.append(model.tokenizer.extract_features(pixel_values))
    return torch.cat(chunks)


def _resize_map(anomaly_map: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    return F.interpolate(anomaly_map[None, None].float(), size=shape, mode="bilinear", align_corners=False)[0, 0].numpy()


def _defects_config(data_root: str, category: str):
    path = Path(data_root) / category / "defects_config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _auroc_or_nan(scores, labels) -> float:
    try:
        return image_auroc(scores, labels)
    except ValueError:
        return float("nan")


def _branch_aurocs(scores: np.ndarray, types: list[str]) -> dict[str, float]:
    out = loco_image_aurocs(scores, types)
    return {"auroc_logical": out["auroc_logical"], "auroc_structural": out["auroc_structural"]}


def evaluate(model: str, data_root: str, categories: Any = "all", output_dir: str = "outputs/eval", num_masks: int | None = None,
             seed: int = 0, batch_size: int = 8, knn_baseline: bool = True, dataset_format: str = "loco",
             feature_cache: str | None = None, report_images: int = 3, predictor_dtype: str | None = None,
             allow_default_processor: bool = False) -> dict:
    """Score the test split of every category and write the results to `output_dir`.

    `predictor_dtype` ("bf16"/"fp16") runs the predictor under autocast (see
    `LadmimForAnomalyDetection.forward`); it is recorded in `metrics.json`.

    Returns the `metrics.json` content.
    """
    from .data import resolve_categories

    started = time.time()
    out_dir = Path(output_dir)
    detector, processor = load_detector(model, allow_default_processor)
    trained = detector.categories
    wanted = resolve_categories(data_root, categories)
    missing = [c for c in wanted if c not in trained]
    if missing:
        from .hub import ModelFolderError

        raise ModelFolderError(f"the model {model} was not trained on {missing}; it knows {trained}")
    num_masks = num_masks or detector.config.num_masks
    cache = torch.load(feature_cache, weights_only=True) if feature_cache and Path(feature_cache).is_file() else {}

    metrics: dict[str, Any] = {"categories": {}, "mean": {}, "baselines": {"knn": {}, "global": {}}, "num_masks": num_masks,
                               "seed": seed, "per_defect": {}, "fused_branches": detector.config.fused_branches,
                               "fusion_rule": detector.config.fusion_rule}
    if predictor_dtype:
        metrics["predictor_dtype"] = predictor_dtype
    score_rows: list[dict] = []
    roc_curves: dict[str, dict] = {}
    heatmap_items: list[dict] = []
    for category in wanted:
        rows = _test_rows(data_root, category, dataset_format)
        if not rows:
            raise FileNotFoundError(f"no test images for category {category!r} under {data_root}")
        paths = [r["path"] for r in rows]
        types = [r["anomaly_type"] for r in rows]
        features = _features(detector, processor, paths, batch_size, f"features {category}")
        outputs: dict[str, list[torch.Tensor]] = {}
        for start in tqdm(range(0, len(paths), batch_size), desc=f"scoring {category}", unit="batch"):
            chunk = features[start:start + batch_size]
            out = detector(features=chunk, category=category, num_masks=num_masks, seed=seed, predictor_dtype=predictor_dtype)
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
            maps.append(_resize_map(result["anomaly_map"][i], shape))
            regions.append(row["regions"])
            spro_types.append(row["anomaly_type"])
        defects = _defects_config(data_root, category)
        entry["spro_0.05"] = float("nan")
        if defects is not None and any(regions):
            entry["spro_0.05"] = loco_au_spro(maps, regions, spro_types, defects, max_fpr=0.05)["au_spro_mean"]
        entry["branches"] = {b: _branch_aurocs(v, types) for b, v in branch_scores.items()}
        metrics["categories"][category] = entry
        metrics["per_defect"][category] = per_defect_aurocs(
            {"fused": fused, **{f"{b}_branch": v for b, v in branch_scores.items()}}, types, [r["defect_type"] for r in rows])

        if knn_baseline:
            train_features = cache.get(f"train/{category}")
            if train_features is None:
                train_features = _features(detector, processor, _train_paths(data_root, category, dataset_format), batch_size, f"baselines {category}")
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
        picks = list(order[::-1][:report_images]) + list(order[:max(1, report_images // 2)])
        for i in picks:
            image = load_image(paths[i]).resize((detector.config.tokenizer_config.image_size,) * 2)
            heatmap_items.append({"image": image, "title": f"{category} {types[i]} score {fused[i]:.2f}",
                                  "maps": {b.replace("_", " "): result[f"{b}_map"][i].numpy()
                                           for b in detector.config.enabled_branches if f"{b}_map" in result}})
        for i, row in enumerate(rows):
            score_rows.append({"path": row["path"], "category": category, "anomaly_type": types[i],
                               "defect_type": row["defect_type"], "pred_score": fused[i],
                               **{f"{b}_score": v[i] for b, v in branch_scores.items()},
                               "pred_label": bool(result["pred_score"][i] > detector.calibration_for(category)["threshold"])})

    keys = ("auroc_logical", "auroc_structural", "auroc_mean", "spro_0.05")
    for key in keys:
        values = [v[key] for v in metrics["categories"].values() if not math.isnan(v[key])]
        metrics["mean"][key] = float(np.mean(values)) if values else float("nan")
    if knn_baseline:
        for per in metrics["baselines"].values():
            per["mean"] = {k: float(np.nanmean([per[c][k] for c in wanted])) for k in ("auroc_logical", "auroc_structural")}
    else:
        del metrics["baselines"]
    metrics["branches_mean"] = {
        branch: {k: float(np.nanmean([metrics["categories"][c]["branches"][branch][k] for c in wanted])) for k in ("auroc_logical", "auroc_structural")}
        for branch in detector.config.enabled_branches
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


def _write_outputs(out_dir: Path, metrics: dict, score_rows: list[dict], roc_curves: dict, heatmap_items: list[dict], model: str) -> None:
    from .visualization import heatmap_grid, plot_roc_curves, plot_score_histograms

    atomic_write_json(out_dir / "metrics.json", metrics)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(score_rows[0]))
    writer.writeheader()
    writer.writerows(score_rows)
    atomic_write_text(out_dir / "scores.csv", buffer.getvalue())
    figures = []
    for category, curves in roc_curves.items():
        if curves:
            plot_roc_curves(curves, out_dir / "figures" / f"roc_{category}.png", title=f"ROC: {category}")
            figures.append((f"ROC curves: {category}", f"figures/roc_{category}.png"))
        rows = [r for r in score_rows if r["category"] == category]
        plot_score_histograms([r["pred_score"] for r in rows], [r["anomaly_type"] for r in rows],
                              out_dir / "figures" / f"scores_{category}.png", title=f"Fused scores: {category}")
        figures.append((f"Score histogram: {category}", f"figures/scores_{category}.png"))
    if heatmap_items:
        heatmap_grid(heatmap_items, out_dir / "figures" / "heatmaps.png")
        figures.append(("Most and least anomalous test images (each branch's map)", "figures/heatmaps.png"))
    report = [f"# LADMIM evaluation report", "", f"Model: `{model}`; {metrics['num_masks']} masks per image, seed {metrics['seed']}.", "",
              results_table(metrics), "",
              f"Fused: {' + '.join(metrics['fused_branches'])}, each standardised on validation/good, combined by "
              f"{metrics['fusion_rule']!r}. AUROCs are image-level (good vs logical, good vs structural). Branch columns "
              "score with one branch alone. Baselines need no training: kNN is a PatchCore-style nearest-neighbour score "
              "with every training patch in its bank, global the Mahalanobis distance of pooled features; both on the "
              "same backbone features.", ""]
    if any(metrics.get("per_defect", {}).values()):
        report += ["## Per defect type", "", "Image AUROC of good images vs the images showing each defect type.", "",
                   per_defect_table(metrics), ""]
    for title, path in figures:
        report += [f"## {title}", "", f"![{title}]({path})", ""]
    atomic_write_text(out_dir / "report.md", "\n".join(report))


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder (OUTPUT_DIR/model) or Hub id")
    parser.add_argument("--data_root", required=True, help="dataset root with one folder per category")
    parser.add_argument("--categories", nargs="+", default=["all"], help="category names or 'all'")
    parser.add_argument("--output_dir", required=True, help="where metrics.json, scores.csv and report.md go")
    from .cli import non_negative_int, positive_int

    parser.add_argument("--num_masks", type=positive_int, default=None, help="test-time masks per image (default: the model's)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--batch_size", type=positive_int, default=8)
    parser.add_argument("--dataset_format", choices=["loco", "mvtec_ad"], default="loco")
    parser.add_argument("--no_knn", action="store_true", help="skip the kNN baseline")
    parser.add_argument("--feature_cache", default=None, help="training feature cache (OUTPUT_DIR/cache/features.pt) to reuse for the kNN bank")
    parser.add_argument("--predictor_dtype", choices=["bf16", "fp16"], default=None,
                        help="run the predictor under autocast (bf16: 1.6x faster on AVX512-BF16 CPUs; float32 if unset)")
    parser.add_argument("--allow_default_processor", action="store_true",
                        help="score a model folder without preprocessor_config.json with ImageNet defaults (warned)")


def run_from_args(args: argparse.Namespace) -> int:
    """Evaluate from parsed arguments; a missing or empty data folder is one `error:` line and exit 2."""
    from .data import DataLayoutError, load_loco, load_mvtec_ad, resolve_categories

    categories = "all" if args.categories == ["all"] else args.categories
    try:
        # Check every category's test split before the model is loaded (a Hub download can take
        # minutes) or anything is written; evaluate() then reads the cached walk.
        loader = load_loco if args.dataset_format == "loco" else load_mvtec_ad
        for category in resolve_categories(args.data_root, categories):
            loader(args.data_root, category, "test")
    except DataLayoutError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from .hub import ModelFolderError

    try:
        metrics = evaluate(args.model, args.data_root, categories, args.output_dir, args.num_masks, args.seed,
                           args.batch_size, not args.no_knn, args.dataset_format, args.feature_cache,
                           predictor_dtype=args.predictor_dtype, allow_default_processor=args.allow_default_processor)
    except ModelFolderError as error:  # a missing, corrupt or foreign model, or one trained on other categories
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(results_table(metrics))
    print(f"metrics: {Path(args.output_dir) / 'metrics.json'}  report: {Path(args.output_dir) / 'report.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="ladmim evaluate", description="Evaluate a trained LADMIM detector on a test split.")
    add_evaluate_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
