"""The `ladmim` command: `ladmim train|evaluate|predict|calibrate|synth|push|export|convert ...`, and the one
home of its argparse set-up.

- `SUBCOMMANDS` is the table of subcommands: name, help, and where its options and its run function
  live. A module is imported only when its subcommand is used: `ladmim train ...` parses with the
  train options alone and imports the training code only (`build_parser`, `ladmim --help`: all).
- Options that several subcommands take are defined once here (`add_model_option`, `add_data_options`,
  `add_scoring_options`, `add_processor_option`, `add_batch_size_option`, `add_holdout_option`, and the
  argparse types `positive_int`, `non_negative_int`, `finite_float`); each module adds its own options
  with them (`add_train_arguments`, `add_evaluate_arguments`, ...). `predict` lives here.
- `main` is the entry point of `ladmim`, of `scripts/*.py` (`main(["train", *sys.argv[1:]])`: the same
  flags as `ladmim train`) and of `python -m ladmim_hf.training` / `ladmim_hf.data.synthetic`
  (`run_subcommand`); it sets up logging once (`configure_logging`).
"""

from __future__ import annotations

import argparse
import importlib
import io
import logging
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence


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

RESULT_FORMATS = (".jsonl", ".csv")


def results_file(text: str) -> Path:
    """argparse type of `predict --output`: a path whose extension picks the format (.jsonl or .csv).
    Checked at parse time, so a typo fails before the model is loaded and images are scored."""
    path = Path(text)
    if path.suffix.lower() not in RESULT_FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r} must end in {' or '.join(RESULT_FORMATS)} (the format is "
                                         "chosen by the extension)")
    return path


# --------------------------------------------------------------------------------------------------
# Options shared by several subcommands (each defined once, here)
# --------------------------------------------------------------------------------------------------


def add_model_option(parser: argparse.ArgumentParser, local_only: bool = False, note: str = "") -> None:
    """`--model`: the trained detector; a Hub id too unless `local_only` (`note` ends the help)."""
    where = "trained model folder (OUTPUT_DIR/model)" + ("" if local_only else " or Hub id")
    parser.add_argument("--model", required=True, help=where + note)


def add_data_options(parser: argparse.ArgumentParser, data_root_help: str, from_config: bool = False) -> None:
    """`--data_root`, `--categories`, `--dataset_format`. With `from_config` (training) none is required
    and each defaults to None (the config's value); otherwise `--data_root` is required, all categories
    and `auto` are the defaults."""
    from .data.layout import DATASET_FORMATS

    parser.add_argument("--data_root", required=not from_config, default=None, help=data_root_help)
    parser.add_argument("--categories", nargs="+", default=None if from_config else ["all"],
                        help="category names or 'all' (default: " + ("the config's)" if from_config else "all)"))
    parser.add_argument("--dataset_format", choices=DATASET_FORMATS, default=None if from_config else "auto",
                        help="auto (default): LOCO-style category folders as MVTec LOCO AD, anything else as plain folders")


def add_scoring_options(parser: argparse.ArgumentParser, predictor_dtype: bool = True) -> None:
    """`--num_masks`, `--seed` (the mask set every image is scored with) and, unless told not to, `--predictor_dtype`."""
    parser.add_argument("--num_masks", type=positive_int, default=None, help="masks per image (default: the model's)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the mask set every image is scored with (default: 0)")
    if predictor_dtype:
        parser.add_argument("--predictor_dtype", choices=["bf16", "fp16"], default=None,
                            help="run the predictor under autocast (bf16: 1.6x faster on AVX512-BF16 CPUs; float32 if unset)")


def add_processor_option(parser: argparse.ArgumentParser) -> None:
    """`--allow_default_processor`: score a model folder that lacks its image processor config."""
    parser.add_argument("--allow_default_processor", action="store_true",
                        help="score a model folder without preprocessor_config.json with ImageNet defaults (warned)")


def add_batch_size_option(parser: argparse.ArgumentParser, default: int) -> None:
    """`--batch_size`: images per forward pass when scoring."""
    parser.add_argument("--batch_size", type=positive_int, default=default,
                        help=f"images per forward pass (default: {default})")


def add_holdout_option(parser: argparse.ArgumentParser, default: str) -> None:
    """`--holdout_fraction` (None when not given); `default` says what None means."""
    parser.add_argument("--holdout_fraction", type=finite_float, default=None,
                        help="share of each category's training images held out to calibrate when it has no "
                             f"validation/good folder (default: {default})")


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    add_model_option(parser)
    parser.add_argument("--category", default=None, help="category the images belong to")
    add_scoring_options(parser)
    parser.set_defaults(seed=None)  # None: 0 for pytorch, the export's own seed for onnx / openvino
    parser.add_argument("--threshold", type=finite_float, default=None, help="override the calibrated threshold")
    parser.add_argument("--output_dir", default="ladmim-predictions", help="where heatmaps are written")
    parser.add_argument("--output", type=results_file, default=None,
                        help="also write one record per input to this .jsonl or .csv file (format from the extension)")
    parser.add_argument("--backend", choices=PREDICT_BACKENDS, default="pytorch",
                        help="pytorch (default; --model is a model folder or Hub id), or onnx / openvino (--model is "
                             "a `ladmim export` folder, scored without torch)")
    add_processor_option(parser)


PREDICT_BACKENDS = ("pytorch", "onnx", "openvino")


class _TorchScorer:
    """`predict`'s view of a PyTorch detector and its image processor."""

    def __init__(self, args: argparse.Namespace):
        from .evaluation import load_detector

        try:
            self.detector, self.processor = load_detector(args.model, args.allow_default_processor)
        except (OSError, ValueError) as error:  # a missing, corrupt or foreign model folder: one line, no traceback
            raise SystemExit(f"error: cannot load the model {args.model}: {error}") from None
        self.args = args
        self.categories = list(self.detector.categories)
        self.branches = list(self.detector.config.enabled_branches)

    def is_calibrated(self, category: str) -> bool:
        return category in self.detector.config.calibration

    def threshold(self, category: str) -> float:
        return float(self.detector.calibration_for(category)["threshold"])

    def score(self, image, category: str):
        """`(raw branch scores, fused score, anomalous?, fused map at the image's size)` of a PIL image."""
        args = self.args
        seed = 0 if args.seed is None else args.seed
        out = self.detector(**self.processor(image), category=category, num_masks=args.num_masks, seed=seed,
                            threshold=args.threshold, predictor_dtype=args.predictor_dtype)
        anomaly_map = self.processor.postprocess_anomaly_map(out.anomaly_map, image.size[::-1])[0].numpy()
        return ({b: float(v[0]) for b, v in out.branch_scores().items()}, float(out.pred_score[0]),
                bool(out.pred_label[0]), anomaly_map)


class _ExportScorer:
    """`predict`'s view of a `ladmim export` folder (ONNX Runtime or OpenVINO)."""

    def __init__(self, args: argparse.Namespace):
        from .deploy.inference_ladmim import ExportFolderError, LadmimInferencer

        try:
            self.inferencer = LadmimInferencer(args.model, args.backend)
        except ExportFolderError as error:
            raise SystemExit(f"error: {error}") from None
        metadata = self.inferencer.metadata
        fixed = {"--num_masks": (args.num_masks, metadata["num_masks"]), "--seed": (args.seed, metadata["seed"])}
        for flag, (asked, exported) in fixed.items():
            if asked is not None and asked != exported:
                raise SystemExit(f"error: {flag} {asked}: the export's graphs hold {metadata['num_masks']} masks from seed "
                                 f"{metadata['seed']}; export again with `ladmim export {flag} {asked}`")
        if args.predictor_dtype is not None:
            raise SystemExit("error: --predictor_dtype applies to --backend pytorch only; exported graphs are float32")
        self.args = args
        self.categories = self.inferencer.categories
        self.branches = list(metadata["branches"])

    def is_calibrated(self, category: str) -> bool:
        return bool(self.inferencer.metadata["categories"][category]["calibrated"])

    def threshold(self, category: str) -> float:
        return self.inferencer.threshold(category)

    def score(self, image, category: str):
        from .deploy.inference_ladmim import resize_map

        result = self.inferencer([image], category=category, threshold=self.args.threshold)
        return ({b: float(v[0]) for b, v in result.branch_scores().items()}, float(result.pred_score[0]),
                bool(result.pred_label[0]), resize_map(result.anomaly_map[0], image.size[::-1]))


def run_predict(args: argparse.Namespace) -> int:
    from .visualization import FUSED_MAP_LABEL, heatmap_scale

    scorer = _TorchScorer(args) if args.backend == "pytorch" else _ExportScorer(args)
    category = args.category or (scorer.categories[0] if len(scorer.categories) == 1 else None)
    if category is None:
        raise SystemExit(f"error: pass --category (one of {', '.join(scorer.categories)})")
    if category not in scorer.categories:
        raise SystemExit(f"error: --category {category!r} is not one this model was trained on "
                         f"({', '.join(scorer.categories)})")
    calibrated = scorer.is_calibrated(category)
    calibrated_threshold = scorer.threshold(category)
    threshold = calibrated_threshold if args.threshold is None else args.threshold
    source = ("--threshold" if args.threshold is not None
              else "calibrated" if calibrated else "model default: not calibrated")
    # The colour scale follows the calibrated threshold, not an override, so a category's heat maps
    # stay comparable across runs; the threshold actually used is what the colour bar marks.
    heatmap_style = dict(scale=heatmap_scale(calibrated_threshold), threshold=threshold,
                         label=FUSED_MAP_LABEL if calibrated else "fused anomaly score (raw: model not calibrated)")
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = _expand_image_arguments(args.images)
    files = [path for path, problem in entries if problem is None]
    heatmap_names = iter(_heatmap_names(files))
    branches = scorer.branches
    for _, problem in entries:
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
    records = []
    for path, problem in entries:
        record = _empty_record(path, category, branches, threshold)
        if problem is None:
            heatmap = out_dir / next(heatmap_names)
            problem = _score_file(scorer, path, category, heatmap, heatmap_style, record)
        record["error"] = problem
        records.append(record)
    print(f"category {category}: threshold {threshold:.3f} ({source}); anomalous when fused_score > threshold")
    _print_table([r for r in records if r["error"] is None], branches)
    scored = sum(r["error"] is None for r in records)
    vmin, vmax = heatmap_style["scale"]
    print(f"heat maps: {scored} written to {out_dir} (fused score on a fixed colour scale {vmin:.2f} to {vmax:.2f}, "
          "threshold marked on the colour bar)")
    if args.output is not None:
        _write_results(args.output, records, _record_fields(branches))
        print(f"results: {len(records)} record(s) written to {args.output}")
    failures = len(records) - scored
    if failures:
        print(f"error: {failures} input(s) could not be scored (listed above); {scored} of {len(files)} image(s) "
              "scored", file=sys.stderr)
    return 1 if failures else 0


def _record_fields(branches: list[str]) -> list[str]:
    """Columns of a `predict --output` record, in order."""
    return ["path", "category", *(f"{b}_score" for b in branches), "fused_score", "threshold", "verdict", "heatmap",
            "error"]


def _empty_record(path: str, category: str, branches: list[str], threshold: float) -> dict:
    """A record with no scores yet (what an input that cannot be scored keeps, besides its `error`)."""
    record = dict.fromkeys(_record_fields(branches))
    record.update(path=str(path), category=category, threshold=threshold)
    return record


def _score_file(scorer, path: str, category: str, heatmap: Path, style: dict, record: dict) -> str | None:
    """Score one file, write its heat map and fill `record`; returns the error message (also printed)
    if the file cannot be scored, else None."""
    from .models.image_processing_ladmim import ImageDecodeError, load_image
    from .io_utils import atomic_write_bytes
    from .visualization import heatmap_with_colorbar

    try:
        image = load_image(path)
        branch_scores, fused, anomalous, anomaly_map = scorer.score(image, category)
    except (ImageDecodeError, ValueError) as error:
        # unreadable images, and scores that are not finite (never a verdict from a NaN): named, then skipped
        message = str(error) if isinstance(error, ImageDecodeError) else f"{path}: {error}"
        print(f"error: {message}", file=sys.stderr)
        return message
    buffer = io.BytesIO()
    heatmap_with_colorbar(image, anomaly_map, *style["scale"], threshold=style["threshold"],
                          label=style["label"]).save(buffer, format="PNG")
    atomic_write_bytes(heatmap, buffer.getvalue())  # a kill never leaves a truncated PNG under the final name
    record.update({f"{b}_score": v for b, v in branch_scores.items()})
    record.update(fused_score=fused, verdict="anomalous" if anomalous else "good", heatmap=str(heatmap))
    return None


def _print_table(records: list[dict], branches: list[str]) -> None:
    """The aligned table of scored records: fused score, verdict, each branch's raw score, heat map."""
    if not records:
        return
    width = max(len(r["path"]) for r in records)
    widths = [max(len(b), 8) for b in branches]
    print(f"{'image':<{width}}  {'fused_score':>11}  {'verdict':<9}  "
          + "".join(f"{b:>{w}}  " for b, w in zip(branches, widths)) + "heatmap")
    for r in records:
        print(f"{r['path']:<{width}}  {r['fused_score']:11.3f}  {r['verdict']:<9}  "
              + "".join(f"{r[f'{b}_score']:{w}.4f}  " for b, w in zip(branches, widths)) + r["heatmap"])


def _write_results(path: Path, records: list[dict], fields: list[str]) -> None:
    """Write `records` as JSON lines or CSV (by `path`'s extension) in one atomic step, so a consumer
    never reads a half-written file. Missing values are JSON null / an empty CSV cell."""
    import json

    from .io_utils import atomic_write_csv, atomic_write_text

    if path.suffix.lower() == ".csv":
        atomic_write_csv(path, records, fields, lineterminator="\n")
    else:
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


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


def _expand_image_arguments(items: list[str]) -> list[tuple[str, str | None]]:
    """`[(path, problem)]` in input order: files as given; a folder stands for its non-hidden regular
    files (sorted, not recursive), so a file there that is not an image is reported like any other
    unreadable input. `problem` (None for a file to score) names what cannot be scored: an empty or
    unreadable folder (its path is the folder's), and entries that are not regular files (FIFOs,
    sockets, devices, broken or looping links), which would block or fail if opened."""
    out: list[tuple[str, str | None]] = []
    for item in items:
        folder = Path(item)
        if not folder.is_dir():
            out.append((item, None))
            continue
        try:
            entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
        except OSError as error:
            out.append((item, f"cannot list folder {item}: {error.strerror or error}"))
            continue
        listed = []
        for entry in entries:
            if entry.is_file():
                listed.append((str(entry), None))
            elif not entry.is_dir():  # sub-folders are not inputs (not recursive); anything else is named
                listed.append((str(entry), f"{entry}: not a regular file (a FIFO, socket, device, or a broken or "
                                           "looping link); skipped"))
        out.extend(listed or [(item, f"no files in folder {item}")])
    return out


# --------------------------------------------------------------------------------------------------
# The subcommands, the parser and the entry points
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subcommand:
    """One `ladmim` subcommand: `module` (relative to `ladmim_hf`, imported only when the subcommand is used)
    holds the functions named `add_arguments` (`f(parser)` adds its options) and `run` (`f(args)` runs it
    and returns the exit code)."""

    name: str
    help: str
    module: str
    add_arguments: str
    run: str

    def load(self, function_name: str) -> Callable:
        return getattr(importlib.import_module(self.module, "ladmim_hf"), function_name)


SUBCOMMANDS = (
    Subcommand("train", "train tokenizer, predictors and calibration", ".training.cli", "add_train_arguments",
               "run_from_args"),
    Subcommand("evaluate", "score a test split and write metrics and a report", ".evaluation",
               "add_evaluate_arguments", "run_from_args"),
    Subcommand("predict", "score images, print a table and write heatmaps", ".cli", "add_predict_arguments",
               "run_predict"),
    Subcommand("calibrate", "re-fit thresholds and z statistics of a trained model (no retraining)", ".calibration",
               "add_calibrate_arguments", "run_from_args"),
    Subcommand("synth", "generate the synthloco benchmark (MVTec LOCO AD layout)", ".data.synthetic.cli",
               "add_synth_arguments", "run_from_args"),
    Subcommand("push", "upload a trained detector (weights, code, pipeline, model card) to the Hub", ".hub.push",
               "add_push_arguments", "run_push_from_args"),
    Subcommand("export", "export a trained detector to ONNX / OpenVINO graphs (scored without torch)",
               ".deploy.export", "add_export_arguments", "run_from_args"),
    Subcommand("convert", "convert official LADMIM / HVQ-Trans checkpoints to ladmim_hf models", ".convert",
               "add_convert_arguments", "run_from_args"),
)
_BY_NAME = {command.name: command for command in SUBCOMMANDS}


def build_parser() -> argparse.ArgumentParser:
    """The `ladmim` parser, every subcommand registered (so every subcommand's module imported)."""
    parser = argparse.ArgumentParser(prog="ladmim", description="LADMIM logical anomaly detection.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        subparser = sub.add_parser(command.name, help=command.help, description=command.help)
        command.load(command.add_arguments)(subparser)
        subparser.set_defaults(func=command.load(command.run))
    return parser


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """One subcommand's parser alone (its options, no `command`/`func`): the same options and help as
    `ladmim NAME`, e.g. `ladmim_hf.training.build_parser()`."""
    command = _BY_NAME[name]
    parser = argparse.ArgumentParser(prog=f"ladmim {name}", description=command.help)
    command.load(command.add_arguments)(parser)
    return parser


def configure_logging() -> None:
    """The logging set-up of every entry point: INFO and up to stderr with time and logger name."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # accelerate logs every file of every checkpoint at INFO; keep the console to what users need.
    for name in ("accelerate.accelerator", "accelerate.checkpointing", "accelerate.utils.other"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """`ladmim ARGV`; returns the exit code. A named subcommand is parsed by its own parser, so only its
    module is imported (`ladmim synth` does not load the training code)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging()
    if argv and argv[0] in _BY_NAME:
        command = _BY_NAME[argv[0]]
        args = subcommand_parser(command.name).parse_args(argv[1:])
        return int(command.load(command.run)(args) or 0)
    args = build_parser().parse_args(argv)  # no subcommand named: --help, or an error listing them
    return int(args.func(args) or 0)


def run_subcommand(name: str, argv: Sequence[str] | None = None) -> int:
    """`ladmim NAME ARGV` (ARGV defaults to the command line's): the `main` of a module that is also a subcommand."""
    return main([name, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
