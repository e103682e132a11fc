"""The `ladmim` command: `ladmim train|evaluate|predict|synth ...`.

Each subcommand reuses the argument definitions and entry points of its module, so options are
defined once (`scripts/train.py` and `ladmim train` accept exactly the same flags).
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import sys
from collections import Counter
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse turns the ValueError into a one-line usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (not nan or inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


positive_int.__name__, non_negative_int.__name__, finite_float.__name__ = (
    "whole number >= 1", "whole number >= 0", "finite number")  # what argparse names in its message


def _predict(args: argparse.Namespace) -> int:
    from .evaluation import load_detector
    from .image_processing_ladmim import ImageDecodeError, load_image
    from .io_utils import atomic_write_bytes
    from .visualization import heatmap_overlay

    try:
        detector, processor = load_detector(args.model, args.allow_default_processor)
    except (OSError, ValueError) as error:  # a missing, corrupt or foreign model folder: one line, no traceback
        raise SystemExit(f"error: cannot load the model {args.model}: {error}") from None
    category = args.category or (detector.categories[0] if len(detector.categories) == 1 else None)
    if category is None:
        raise SystemExit(f"error: pass --category (one of {', '.join(detector.categories)})")
    if category not in detector.categories:
        raise SystemExit(f"error: --category {category!r} is not one this model was trained on "
                         f"({', '.join(detector.categories)})")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, input_problems = _expand_image_arguments(args.images)
    heatmap_names = _heatmap_names(paths)
    # One raw-score column per optional branch the model computes (logical and structural always print).
    extra = [b for b in detector.config.enabled_branches if b not in ("logical", "structural")]
    rows, failures = [], len(input_problems)
    for problem in input_problems:
        print(f"error: {problem}", file=sys.stderr)
    for index, path in enumerate(paths):
        try:
            image = load_image(path)
            out = detector(**processor(image), category=category, num_masks=args.num_masks, seed=args.seed,
                           threshold=args.threshold, predictor_dtype=args.predictor_dtype)
        except (ImageDecodeError, ValueError) as error:
            # unreadable images, and scores that are not finite (never a verdict from a NaN): named, then skipped
            print(f"error: {path}: {error}" if not isinstance(error, ImageDecodeError) else f"error: {error}",
                  file=sys.stderr)
            failures += 1
            continue
        anomaly_map = processor.postprocess_anomaly_map(out.anomaly_map, image.size[::-1])[0].numpy()
        heatmap = out_dir / heatmap_names[index]
        buffer = io.BytesIO()
        heatmap_overlay(image, anomaly_map).save(buffer, format="PNG")
        atomic_write_bytes(heatmap, buffer.getvalue())  # a kill never leaves a truncated PNG under the final name
        branch_scores = out.branch_scores()
        rows.append((path, float(out.pred_score[0]), "anomalous" if bool(out.pred_label[0]) else "good",
                     float(out.logical_score[0]), float(out.structural_score[0]),
                     [float(branch_scores[b][0]) for b in extra], heatmap))
    if rows:
        width = max(len(str(r[0])) for r in rows)
        widths = [max(len(b), 8) for b in extra]
        print(f"{'image':<{width}}  {'score':>8}  {'verdict':<9}  {'logical':>8}  {'structural':>10}  "
              + "".join(f"{b:>{w}}  " for b, w in zip(extra, widths)) + "heatmap")
        for path, score, verdict, logical, structural, others, heatmap in rows:
            print(f"{str(path):<{width}}  {score:8.3f}  {verdict:<9}  {logical:8.4f}  {structural:10.4f}  "
                  + "".join(f"{v:{w}.4f}  " for v, w in zip(others, widths)) + str(heatmap))
    if failures:
        print(f"error: {failures} input(s) could not be scored (listed above); {len(rows)} of {len(paths)} image(s) "
              "scored", file=sys.stderr)
    return 1 if failures else 0


def _heatmap_names(paths: list[str]) -> list[str]:
    """One distinct file name per input: `{stem}_heatmap.png`, or, where stems collide (`a/x.png` and
    `b/x.png`, `x.png` and `x.jpg`), the path relative to the inputs' common folder with separators
    and dots as `__` / `_` (`a__x_png_heatmap.png`); a file given twice gets `_2`, `_3`, ..."""
    stems = Counter(Path(p).stem for p in paths)
    absolute = [os.path.abspath(p) for p in paths]
    common = os.path.commonpath([os.path.dirname(p) for p in absolute]) if absolute else ""
    names, seen = [], Counter()
    for path, full in zip(paths, absolute):
        if stems[Path(path).stem] == 1:
            base = Path(path).stem
        else:
            base = os.path.relpath(full, common).replace(os.sep, "__").replace(".", "_")
        seen[base] += 1
        names.append(f"{base}_heatmap.png" if seen[base] == 1 else f"{base}_{seen[base]}_heatmap.png")
    return names


def _expand_image_arguments(items: list[str]) -> tuple[list[str], list[str]]:
    """`(files, problems)`: files as given; a folder stands for its non-hidden regular files (sorted, not
    recursive), so a file there that is not an image is reported like any other unreadable input.
    `problems` names what cannot be scored: an empty or unreadable folder, and entries that are not
    regular files (FIFOs, sockets, devices, broken or looping links), which would block or fail if opened."""
    paths, problems = [], []
    for item in items:
        folder = Path(item)
        if not folder.is_dir():
            paths.append(item)
            continue
        try:
            entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        except OSError as error:
            problems.append(f"cannot list folder {item}: {error.strerror or error}")
            continue
        found, odd = [], []
        for entry in entries:
            if entry.is_file():
                found.append(str(entry))
            elif not entry.is_dir():  # sub-folders are not inputs (not recursive); anything else is named
                odd.append(f"{entry}: not a regular file (a FIFO, socket, device, or a broken or looping link); skipped")
        if not found and not odd:
            problems.append(f"no files in folder {item}")
        problems.extend(odd)
        paths.extend(found)
    return paths, problems


def build_parser() -> argparse.ArgumentParser:
    from . import evaluation, training

    parser = argparse.ArgumentParser(prog="ladmim", description="LADMIM logical anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train tokenizer, predictors and calibration")
    training.add_train_arguments(train)
    train.set_defaults(func=training.run_from_args)

    evaluate = sub.add_parser("evaluate", help="score a test split and write metrics and a report")
    evaluation.add_evaluate_arguments(evaluate)
    evaluate.set_defaults(func=evaluation.run_from_args)

    predict = sub.add_parser("predict", help="score images, print a table and write heatmaps")
    predict.add_argument("images", nargs="+", help="image files or folders of images")
    predict.add_argument("--model", required=True, help="model folder or Hub id")
    predict.add_argument("--category", default=None, help="category the images belong to")
    predict.add_argument("--num_masks", type=positive_int, default=None, help="masks per image (default: the model's)")
    predict.add_argument("--seed", type=non_negative_int, default=0, help="seed of the mask set every image is scored with")
    predict.add_argument("--threshold", type=finite_float, default=None, help="override the calibrated threshold")
    predict.add_argument("--predictor_dtype", choices=["bf16", "fp16"], default=None,
                         help="run the predictor under autocast (float32 if unset)")
    predict.add_argument("--output_dir", default="ladmim-predictions", help="where heatmaps are written")
    predict.add_argument("--allow_default_processor", action="store_true",
                         help="score with a model folder that lacks preprocessor_config.json, using ImageNet defaults (warned)")
    predict.set_defaults(func=_predict)

    from .data import synthetic

    synth = sub.add_parser("synth", help="generate the synthloco benchmark")
    synthetic.add_synth_arguments(synth)
    synth.set_defaults(func=synthetic.run_from_args)

    from . import convert, hub

    push = sub.add_parser("push", help="upload a trained detector (weights, code, pipeline, model card) to the Hub")
    hub.add_push_arguments(push)
    push.set_defaults(func=hub.run_push_from_args)

    convert_parser = sub.add_parser("convert", help="convert official LADMIM / HVQ-Trans checkpoints")
    convert.add_convert_arguments(convert_parser)
    convert_parser.set_defaults(func=convert.run_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .training import configure_logging

    configure_logging()
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
