"""`ladmim train` / `scripts/train.py` / `python -m ladmim_hf.training`: the training options, settings
from them, and exit codes (the parser and logging set-up are `ladmim_hf.cli`'s).

Unusable settings or data folders end in one `error:` line and exit code 2 (`run_from_args`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

# configure_logging is re-exported by ladmim_hf.training
from ..cli import add_data_options, add_holdout_option, configure_logging, run_subcommand, subcommand_parser  # noqa: F401
from ..data.loaders import DataLayoutError
from ..models.image_processing_ladmim import ImageDecodeError
from .loop import TrainingDivergedError, TrainingInterrupted
from .pipeline import train
from .settings import SettingsError, TrainSettings, _yaml_load, load_settings

logger = logging.getLogger("ladmim_hf.training")


def build_parser() -> argparse.ArgumentParser:
    """The `ladmim train` options alone (no subcommand)."""
    return subcommand_parser("train")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML file, or a built-in config name: synthloco-cpu (CPU default), loco-paper (the paper)")
    add_data_options(parser, "one category's folder of normal images (DIR/good, DIR/train/good, or images directly in "
                             "DIR) or a root holding one folder per category (DIR/<category>/train/good)",
                     from_config=True)
    add_holdout_option(parser, "the config's, else 0.1")
    parser.add_argument("--output_dir", default=None, help="run folder (checkpoints, logs, model)")
    parser.add_argument("--max_steps", type=int, default=None, help="steps per stage (both stages)")
    parser.add_argument("--epochs", type=float, default=None, help="epochs per stage (both stages)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the run (default: the config's)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest complete checkpoint (same settings; stage lengths may grow)")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    parser.add_argument("--skip_bad_files", action="store_true", default=None, help="skip unreadable images (listed in the log)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override any setting, e.g. predictor.batch_size=16 model.num_masks=20")


def settings_from_args(args: argparse.Namespace) -> TrainSettings:
    overrides: dict[str, Any] = {
        "data_root": args.data_root, "output_dir": args.output_dir, "seed": args.seed,
        "mixed_precision": args.mixed_precision, "skip_bad_files": args.skip_bad_files,
        "dataset_format": args.dataset_format, "holdout_fraction": args.holdout_fraction,
    }
    if args.categories is not None:
        overrides["categories"] = "all" if args.categories == ["all"] else args.categories
    for stage in ("tokenizer", "predictor"):
        if args.max_steps is not None:
            overrides[f"{stage}.max_steps"] = args.max_steps
        if args.epochs is not None:
            overrides[f"{stage}.epochs"] = args.epochs
            overrides[f"{stage}.max_steps"] = None
    for item in args.set or []:
        if "=" not in item:
            raise SettingsError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = _yaml_load(value, f"--set {item}")
    settings = load_settings(args.config, {k: v for k, v in overrides.items() if not k.endswith(".max_steps") or v is not None})
    if args.epochs is not None and args.max_steps is None:
        settings.tokenizer.max_steps = settings.predictor.max_steps = None
    return settings


def main(argv: list[str] | None = None) -> int:
    """`ladmim train ARGV` (ARGV defaults to the command line's)."""
    return run_subcommand("train", argv)


def run_from_args(args: argparse.Namespace) -> int:
    """Train from parsed arguments; returns the exit code: 2 for unusable settings, data folders or
    run folder (one `error:` line on stderr naming the field or path and the fix), 3 for a diverged
    loss, 4 for unreadable images, 130 when interrupted."""
    try:
        train(settings_from_args(args), resume=args.resume)
    except (SettingsError, DataLayoutError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingInterrupted as error:
        logger.warning("%s", error)
        return 130
    except TrainingDivergedError as error:
        logger.error("%s", error)
        return 3
    except FileExistsError as error:
        logger.error("%s", error)
        return 2
    except ImageDecodeError as error:  # unreadable images in the data (the message names each file)
        logger.error("%s", error)
        if getattr(error, "bad_files", None):
            logger.error("rerun with --skip_bad_files to train without them (each skipped file is listed in the log)")
        return 4
    return 0
