"""Calibration: the statistics that standardise each branch and the threshold on the fused score.

Training's last stage calls :func:`calibrate_category`; ``ladmim calibrate`` re-fits a trained model's
calibration (thresholds and z statistics) on normal images, or on labelled ones with ``--labelled``,
without retraining, and saves it into the model folder atomically::

    ladmim calibrate --model outputs/widget/model --data_root my_images/widget --fpr 0.01
    ladmim calibrate --model outputs/widget/model --data_root my_labelled_images --labelled

``--fused_branches`` / ``--fusion_rule`` refit it for another fusion, e.g. without a branch that the
evaluation report's "What each fused branch adds" shows does not help on your images::

    ladmim calibrate --model outputs/widget/model --data_root my_images/widget --fused_branches memory_bank global
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from .models.branches_ladmim import FUSION_RULES, fuse
from .models.configuration_ladmim import BRANCHES, check_calibration
from .metrics import f1_optimal_threshold
from .models.modeling_ladmim import LOGICAL_COMPONENTS, LadmimForAnomalyDetection
from .scoring import branch_scores_and_map_statistics, extract_scoring_features

logger = logging.getLogger("ladmim_hf.calibration")

DEFAULT_HOLDOUT_FRACTION = 0.1  # training's default; the model folder's training_summary.json says what was used


def calibration_statistics(scores: dict[str, torch.Tensor], fused_branches: list[str], fusion_rule: str,
                           fpr: float) -> dict[str, float]:
    """Per-branch mean/std of raw scores `{branch: (num_images,)}` on normal images and the threshold
    on the fused score (`fused_branches` combined by `fusion_rule`) at the target false-positive rate.

    The threshold is mean + z * std of the fused validation scores (normal approximation, since
    validation sets are small), with z the standard-normal quantile of `1 - fpr`.
    """
    scores = with_logical_recombined(scores)
    stats = _branch_statistics(scores)
    fused = _fused(scores, stats, fused_branches, fusion_rule)
    z = statistics.NormalDist().inv_cdf(1.0 - fpr)
    stats["threshold"] = float(fused.mean() + z * fused.std(unbiased=False))
    stats["num_images"] = int(next(iter(scores.values())).numel())
    stats["fpr"] = float(fpr)
    return stats


def labelled_statistics(scores: dict[str, torch.Tensor], labels: torch.Tensor, fused_branches: list[str],
                        fusion_rule: str) -> dict[str, float]:
    """Branch statistics from the normal images (`labels == 0`) of a labelled set and the threshold
    with the best F1 on all of it (`metrics.f1_optimal_threshold`, rule `score > threshold`)."""
    labels = torch.as_tensor(labels, dtype=torch.bool)
    scores = with_logical_recombined(scores, ~labels)
    stats = _branch_statistics({b: v[~labels] for b, v in scores.items()})
    fused = _fused(scores, stats, fused_branches, fusion_rule)
    stats["threshold"], _ = f1_optimal_threshold(fused.numpy(), labels.numpy())
    stats["num_images"] = int((~labels).sum())
    stats["num_anomalous"] = int(labels.sum())
    return stats


def with_logical_recombined(scores: dict[str, torch.Tensor], normal: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """`scores` with the logical score recombined from its components (`LOGICAL_COMPONENTS`, present when the
    detector retrieves): the larger of their z-scores under these images' statistics (`normal`: the normal
    ones), as the detector combines them once calibrated; the scores came with the old calibration's."""
    if not all(name in scores for name in LOGICAL_COMPONENTS):
        return scores
    reference = _branch_statistics({name: scores[name] if normal is None else scores[name][normal]
                                    for name in LOGICAL_COMPONENTS})
    predictor, retrieval = ((scores[name] - reference[f"{name}_mean"]) / reference[f"{name}_std"] for name in LOGICAL_COMPONENTS)
    return {**scores, "logical": torch.maximum(predictor, retrieval)}


def _branch_statistics(scores: dict[str, torch.Tensor]) -> dict[str, float]:
    stats: dict[str, float] = {}
    for branch, values in scores.items():
        stats[f"{branch}_mean"] = float(values.mean())
        stats[f"{branch}_std"] = float(values.std(unbiased=False).clamp(min=1e-6))
    return stats


def _fused(scores: dict[str, torch.Tensor], stats: dict, fused_branches: list[str], rule: str) -> torch.Tensor:
    return fuse(torch.stack([(scores[b] - stats[f"{b}_mean"]) / stats[f"{b}_std"] for b in fused_branches], -1), rule)


def calibration_size_warning(num_images: int, fpr: float) -> str | None:
    """A sentence for the log when `num_images` normal images cannot measure a false-positive rate of
    `fpr` (fewer than one false positive expected), else `None`."""
    needed = math.ceil(1.0 / fpr - 1e-9)
    if num_images >= needed:
        return None
    return (f"{num_images} normal images cannot measure a false-positive rate of {fpr:g} (that needs at least "
            f"{needed}); the threshold extrapolates a normal fit of their scores, so the real rate may differ")


def calibrate_category(model: LadmimForAnomalyDetection, features: torch.Tensor, category: str, num_masks: int | None,
                       seed: int, fpr: float, moved_features: torch.Tensor | None = None,
                       global_features: torch.Tensor | None = None) -> dict[str, float]:
    """Calibration statistics of `category` from the features `(N, C, g, g)` of its normal images (and
    their `moved_features` `(N, 4, C, g, g)` when the model scores moved poses, their `global_features`
    `(N, C, g', g')` with `config.global_image_size`)."""
    scores, map_statistics = branch_scores_and_map_statistics(model, features, category, num_masks, seed,
                                                              moved_features=moved_features,
                                                              global_features=global_features)
    return {**calibration_statistics(scores, model.config.fused_branches, model.config.fusion_rule, fpr), **map_statistics}


# ----------------------------------------------------------------------------------------- ladmim calibrate


def set_scoring(detector: LadmimForAnomalyDetection, calibrating: list[str], fused_branches: list[str] | None = None,
                fusion_rule: str | None = None, logical_pose_step: int | None = None) -> None:
    """Give `detector` another fusion (`fused_branches`, `fusion_rule`) or `logical_pose_step` (None keeps
    the current one), checked as the config checks them. Neither needs retraining, but every category's
    statistics were measured with the old setting, so all of them must be recalibrated (`calibrating`):
    otherwise a ValueError naming the ones left out."""
    changes = {name: value for name, value in (("fused_branches", fused_branches), ("fusion_rule", fusion_rule),
                                               ("logical_pose_step", logical_pose_step)) if value is not None}
    if not changes:
        return
    left_out = [c for c in detector.categories if c not in calibrating]
    if left_out:
        raise ValueError(f"a new {' and '.join(changes)} changes every category's statistics, but {left_out} would keep "
                         "the old ones: calibrate all of the model's categories (--categories all)")
    config = detector.config
    checked = type(config).from_dict({**config.to_dict(), **changes})
    for name in changes:
        setattr(config, name, getattr(checked, name))


def calibrate(model: str, data_root: str, categories: Any = "all", fpr: float = 0.01, labelled: bool = False,
              num_masks: int | None = None, seed: int = 0, holdout_fraction: float | None = None,
              dataset_format: str = "auto", batch_size: int = 16, fused_branches: list[str] | None = None,
              fusion_rule: str | None = None, logical_pose_step: int | None = None) -> dict[str, dict]:
    """Re-fit the calibration of a local model folder and save it there; returns `{category: stats}`.

    Normal images (default): each category's ``validation/good``, else the hold-out of its training
    images that training used (fraction and seed from the folder's ``training_summary.json``, or
    `holdout_fraction` / `seed`), so training images never set a threshold. `labelled`: the category's
    test images (``test/`` or ``good/`` next to defect folders); z statistics from its good images, the
    threshold with the best F1. `fused_branches` / `fusion_rule` / `logical_pose_step` change the model's
    fusion or poses first (every category must then be calibrated, see `set_scoring`).
    """
    from .data import find_layout, normal_split, evaluation_rows
    from .data.layout import pair_categories
    from .evaluation import load_detector
    from .hub import ModelFolderError

    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"{model} is not a local model folder (no config.json): calibrate writes into the "
                               "folder, so pass the training output's model folder (OUTPUT_DIR/model)")
    detector, processor = load_detector(str(folder))
    layout = find_layout(data_root, dataset_format)
    pairs = pair_categories(layout, categories, detector.categories)
    set_scoring(detector, list(pairs.values()), fused_branches, fusion_rule, logical_pose_step)
    summary_path = folder / "training_summary.json"
    summary = _read_json(summary_path)
    holdout = summary.get("holdout", {})
    fraction = holdout_fraction if holdout_fraction is not None else holdout.get("fraction", DEFAULT_HOLDOUT_FRACTION)
    holdout_seed = holdout.get("seed", seed) if holdout_fraction is None else seed
    results, sources = {}, {}
    for data_category, category in pairs.items():
        if labelled:
            rows = evaluation_rows(layout, data_category)
            paths = [r["path"] for r in rows]
            labels = torch.tensor([r["anomaly_type"] != "good" for r in rows])
            if labels.all() or not labels.any():
                raise ValueError(f"--labelled needs good and anomalous images of {data_category!r}; "
                                 f"{layout.category_root(data_category)} has {int((~labels).sum())} good and "
                                 f"{int(labels.sum())} anomalous")
            source = f"labelled: {len(paths)} images of {layout.category_root(data_category)} (best F1)"
        else:
            split = normal_split(layout, data_category, fraction, holdout_seed)
            paths, labels, source = split.validation, None, split.source
            warning = calibration_size_warning(len(paths), fpr)
            if warning:
                logger.warning("%s: %s", category, warning)
        features, moved, global_features = extract_scoring_features(detector, processor, paths, batch_size,
                                                                    f"features {data_category}")
        if labelled:
            scores, map_statistics = branch_scores_and_map_statistics(detector, features, category, num_masks, seed,
                                                                      normal=~labels, moved_features=moved,
                                                                      global_features=global_features)
            stats = {**labelled_statistics(scores, labels, detector.config.fused_branches, detector.config.fusion_rule),
                     **map_statistics}
            if stats["num_images"] < 10:
                logger.warning("%s: only %d good images set the z statistics", category, stats["num_images"])
        else:
            stats = calibrate_category(detector, features, category, num_masks, seed, fpr, moved, global_features)
        check_calibration(category, stats)
        results[category], sources[category] = stats, source
        logger.info("%s: threshold %.3f from %s", category, stats["threshold"], source)
    _save(folder, detector, results, sources, summary, fpr if not labelled else None)
    return results


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}  # an unreadable summary only loses the record of earlier calibrations


def _save(folder: Path, detector: LadmimForAnomalyDetection, results: dict, sources: dict, summary: dict,
          fpr: float | None) -> None:
    """config.json with the new calibration, then training_summary.json's record of it; each atomically."""
    from .io_utils import atomic_write_json, atomic_write_text

    detector.config.calibration = {**detector.config.calibration, **results}
    atomic_write_text(folder / "config.json", detector.config.to_json_string())
    summary.setdefault("calibration", {}).update(results)
    summary.setdefault("validation", {}).update(sources)
    summary["recalibrated"] = {"categories": sorted(results), "fpr": fpr, "labelled": fpr is None,
                               "fused_branches": detector.config.fused_branches, "fusion_rule": detector.config.fusion_rule,
                               "logical_pose_step": detector.config.logical_pose_step}
    atomic_write_json(folder / "training_summary.json", summary)


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import (add_batch_size_option, add_data_options, add_holdout_option, add_model_option,
                      add_scoring_options, finite_float)

    add_model_option(parser, local_only=True, note="; rewritten in place")
    add_data_options(parser, "images of the model's categories (the training folder, or a folder with validation/good)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--fpr", type=finite_float, default=0.01,
                     help="target false-positive rate on normal images (default 0.01)")
    how.add_argument("--labelled", action="store_true",
                     help="set the threshold with the best F1 on labelled test images (good/ and defect folders)")
    add_scoring_options(parser, predictor_dtype=False)
    parser.add_argument("--fused_branches", nargs="+", choices=BRANCHES, default=None,
                        help="fuse these branches from now on (default: as trained); all categories are recalibrated")
    parser.add_argument("--fusion_rule", choices=FUSION_RULES, default=None,
                        help="combine them by this rule from now on (default: as trained)")
    parser.add_argument("--logical_pose_step", type=int, default=None, metavar="PIXELS",
                        help="score the logical branch at the best-fitting of five poses moved by this many pixels "
                        "from now on (0: the image as it is; default: as trained); all categories are recalibrated")
    add_holdout_option(parser, "as trained")
    add_batch_size_option(parser, 16)


def run_from_args(args: argparse.Namespace) -> int:
    """`ladmim calibrate`: one `error:` line and exit 2 for a wrong folder, category or setting."""
    from .data import DataLayoutError
    from .hub import ModelFolderError
    from .models.image_processing_ladmim import ImageDecodeError

    if not 0 < args.fpr < 1:
        print(f"error: --fpr must be between 0 and 1 (a false-positive rate), got {args.fpr}", file=sys.stderr)
        return 2
    if args.holdout_fraction is not None and not 0 < args.holdout_fraction < 1:
        print(f"error: --holdout_fraction must be between 0 and 1, got {args.holdout_fraction}", file=sys.stderr)
        return 2
    categories = "all" if args.categories == ["all"] else args.categories
    try:
        results = calibrate(args.model, args.data_root, categories, args.fpr, args.labelled, args.num_masks,
                            args.seed, args.holdout_fraction, args.dataset_format, args.batch_size,
                            args.fused_branches, args.fusion_rule, args.logical_pose_step)
    except (DataLayoutError, ModelFolderError, ImageDecodeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for category, stats in results.items():
        print(f"{category}: threshold {stats['threshold']:.3f} ({stats['num_images']} normal images)")
    if args.fused_branches or args.fusion_rule or args.logical_pose_step is not None:
        config = json.loads((Path(args.model) / "config.json").read_text())
        print(f"fused: {' + '.join(config['fused_branches'])} ({config['fusion_rule']}); "
              f"logical poses: {config.get('logical_pose_step', 0)} px")
    print(f"saved: {Path(args.model) / 'config.json'}")
    return 0


__all__ = ["calibrate", "calibrate_category", "set_scoring", "calibration_size_warning", "calibration_statistics",
           "labelled_statistics"]
