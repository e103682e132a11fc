"""Training with Accelerate: tokenizer (stage 1), per-category predictors (stage 2), calibration (stage 3).

Run as `python scripts/train.py --config configs/synthloco-cpu.yaml` or
`accelerate launch scripts/train.py --config ...`. Every stage checkpoints with
`Accelerator.save_state` into `OUTPUT_DIR/checkpoints/<stage>/step_XXXXXXX` (written to a temporary
folder and renamed, so a killed run never leaves a half-written checkpoint) and `--resume` continues
from the latest complete one with the same data order and masks, hence the same loss curve; it refuses
a run folder whose `train_settings.json` holds other settings (`RESUME_MAY_DIFFER` lists what may change).
Unusable settings or data folders end in one `error:` line and exit code 2 (`run_from_args`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from .configuration_ladmim import LadmimConfig
from .calibration import calibrate_category, calibration_size_warning
from .data.layout import DATASET_FORMATS, DataLayout, find_layout, normal_split, select_categories
from .data.loaders import DataLayoutError
from .hub import add_pipeline_to_folder
from .image_processing_ladmim import ImageDecodeError, LadmimImageProcessor
from .io_utils import atomic_save_directory, atomic_write_json, recover_interrupted_saves
from .modeling_ladmim import LadmimForAnomalyDetection, LadmimPredictorModel, LadmimTokenizerModel
from .scoring import extract_features

logger = logging.getLogger("ladmim_hf.training")

STAGE_TOKENIZER = "tokenizer"


class TrainingDivergedError(RuntimeError):
    """A loss became NaN or infinite; the message names the stage, the step and likely causes."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: the run stopped after saving a checkpoint."""


class SettingsError(ValueError):
    """A setting (config file, `--set`, or `--resume` against the run folder) is unusable; the message
    is one line naming the file or field and the fix. `ladmim train` prints it and exits 2."""


class _ConfigNotFoundError(SettingsError, FileNotFoundError):
    """The `--config` file does not exist."""


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats: PyYAML follows YAML 1.1, where a float needs a dot
    and a signed exponent, so `1e-4` or `1.5e3` were strings (and reached AdamW as one)."""


# Appended after the YAML 1.1 resolvers, so it only sees scalars that are not already ints, floats or dates.
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."))


def _yaml_load(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise SettingsError(f"{where} is not valid YAML{at}: {getattr(error, 'problem', None) or error}") from None


def _check_number(name: str, value, whole: bool = False, minimum: float | None = None, optional: bool = False,
                  above: bool = False):
    """`value`, checked to be a finite number (an int if `whole`; `1e3` counts as whole) of at least
    `minimum` (above it if `above`); else a `SettingsError` naming the field."""
    if value is None and optional:
        return None
    if whole and isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = (isinstance(value, int if whole else (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (minimum is None or value > minimum or (value == minimum and not above)))
    if not ok:
        bound = "" if minimum is None else f" {'>' if above else '>='} {minimum:g}"
        raise SettingsError(f"{name} must be {'a whole number' if whole else 'a number'}{bound}"
                            f"{' or null' if optional else ''}, got {value!r}")
    return value


@dataclass
class StageSettings:
    """Optimisation settings of one stage (`tokenizer` or `predictor`)."""

    epochs: float | None = None
    max_steps: int | None = None
    batch_size: int = 32
    learning_rate: float = 1e-4
    min_learning_rate: float = 1e-6
    warmup_fraction: float = 0.04
    schedule: str = "cosine"  # "cosine" (LAViT) or "step" (HVQ-Trans: x gamma at step_fraction)
    step_fraction: float = 0.8
    step_gamma: float = 0.1
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    checkpoint_every: int = 200
    # Predictor stage only: run each batch as chunks of this many rows whose gradients add up to the
    # whole batch's, so one optimizer step still sees `batch_size` samples. On CPU, chunks of 8 make
    # a paper-size step 1.5x faster (activations stay in cache; benchmarks/train_step.py); on a GPU it
    # bounds activation memory. None: the whole batch at once.
    micro_batch_size: int | None = None

    def __post_init__(self):
        # Messages start with the field name; TrainSettings.from_dict prefixes the stage.
        check = _check_number
        self.epochs = check("epochs", self.epochs, minimum=0, above=True, optional=True)
        self.max_steps = check("max_steps", self.max_steps, whole=True, minimum=1, optional=True)
        self.batch_size = check("batch_size", self.batch_size, whole=True, minimum=1)
        for name in ("learning_rate", "min_learning_rate", "warmup_fraction", "step_fraction", "step_gamma",
                     "weight_decay"):
            check(name, getattr(self, name), minimum=0)
        check("max_grad_norm", self.max_grad_norm, minimum=0, optional=True)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise SettingsError(f"betas must be two numbers, e.g. [0.9, 0.999], got {self.betas!r}")
        self.betas = tuple(check("betas", beta, minimum=0) for beta in self.betas)
        self.checkpoint_every = check("checkpoint_every", self.checkpoint_every, whole=True, minimum=1)
        if self.schedule not in ("cosine", "step"):
            raise SettingsError(f"schedule must be 'cosine' or 'step', got {self.schedule!r}")
        micro = check("micro_batch_size", self.micro_batch_size, whole=True, optional=True)
        if micro is not None and micro < 1:
            raise SettingsError(f"micro_batch_size must be a positive number of rows or null, got {micro!r}")
        self.micro_batch_size = micro

    def total_steps(self, num_samples: int, num_processes: int = 1) -> int:
        per_epoch = max(1, num_samples // (self.batch_size * num_processes))
        if self.max_steps is not None:
            return int(self.max_steps)
        if self.epochs is None:
            raise SettingsError("set epochs or max_steps for every stage")
        return max(1, int(math.ceil(self.epochs * per_epoch)))


@dataclass
class TrainSettings:
    """Everything a training run reads; built from a YAML file plus command-line overrides."""

    data_root: str = "data/synthloco"
    categories: Any = "all"
    output_dir: str = "outputs/run"
    seed: int = 0
    dataset_format: str = "auto"  # "auto", "loco", "mvtec_ad" or "folder" (ladmim_hf.data.layout.find_layout)
    # Without a validation/good folder, this fraction of each category's training images (chosen by a
    # hash of seed and file name) is held out to calibrate; 0 requires validation/good.
    holdout_fraction: float = 0.1
    model: dict = field(default_factory=dict)  # LadmimConfig kwargs (tokenizer_config, predictor_config, ...)
    tokenizer: StageSettings = field(default_factory=lambda: StageSettings(schedule="step", max_grad_norm=0.1))
    predictor: StageSettings = field(default_factory=StageSettings)
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    feature_batch_size: int = 16
    calibration_fpr: float = 0.01
    calibration_num_masks: int | None = None
    skip_bad_files: bool = False
    load_imagenet_weights: bool = True
    backbone_weights: str | None = None
    log_with: str | None = "tensorboard"

    def __post_init__(self):
        self.seed = _check_number("seed", self.seed, whole=True, minimum=0)
        for name in ("gradient_accumulation_steps", "feature_batch_size"):
            setattr(self, name, _check_number(name, getattr(self, name), whole=True, minimum=1))
        self.calibration_num_masks = _check_number("calibration_num_masks", self.calibration_num_masks, whole=True,
                                                   minimum=1, optional=True)
        fpr = _check_number("calibration_fpr", self.calibration_fpr, minimum=0, above=True)
        if fpr >= 1:
            raise SettingsError(f"calibration_fpr must be below 1 (a false-positive rate), got {fpr!r}")
        fraction = _check_number("holdout_fraction", self.holdout_fraction, minimum=0)
        if fraction >= 1:
            raise SettingsError(f"holdout_fraction must be below 1 (a fraction of the training images), got {fraction!r}")
        for name, choices in (("dataset_format", DATASET_FORMATS),
                              ("mixed_precision", ("no", "fp16", "bf16"))):
            if getattr(self, name) not in choices:
                raise SettingsError(f"{name} must be one of {', '.join(map(repr, choices))}, got {getattr(self, name)!r}")
        if self.tokenizer.micro_batch_size is not None:
            raise SettingsError("tokenizer.micro_batch_size is not supported: the tokenizer's EMA codebook updates and "
                             "dead-code restarts must see whole batches; set predictor.micro_batch_size instead")

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainSettings":
        raw = dict(raw)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SettingsError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
        for stage in ("tokenizer", "predictor"):
            if stage in raw:
                if not isinstance(raw[stage] or {}, dict):
                    raise SettingsError(f"{stage} must be a mapping of settings, got {raw[stage]!r}")
                stage_raw = dict(raw[stage] or {})
                bad = sorted(set(stage_raw) - set(StageSettings.__dataclass_fields__))
                if bad:
                    raise SettingsError(f"unknown {stage} setting(s) {bad}; known: {sorted(StageSettings.__dataclass_fields__)}")
                base = cls().tokenizer if stage == "tokenizer" else StageSettings()
                try:
                    raw[stage] = StageSettings(**{**base.__dict__, **stage_raw})
                except SettingsError as error:
                    raise SettingsError(f"{stage}.{error}") from None
        if not isinstance(raw.get("model", {}), dict):
            raise SettingsError(f"model must be a mapping of LadmimConfig settings, got {raw['model']!r}")
        return cls(**raw)

    def to_dict(self) -> dict:
        out = dict(self.__dict__)
        out["tokenizer"] = dict(self.tokenizer.__dict__)
        out["predictor"] = dict(self.predictor.__dict__)
        return out


BUILTIN_CONFIGS = Path(__file__).parent / "configs"  # shipped in the package (the repository's configs/ links here)


def resolve_config_path(name: str) -> Path:
    """A YAML file path, or the name of a built-in config (`synthloco-cpu`, `loco-paper`, with or without
    `.yaml`), which works from any directory once the package is installed."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (BUILTIN_CONFIGS / name, BUILTIN_CONFIGS / f"{name}.yaml"):
        if path.name == name and candidate.is_file():
            return candidate
    builtin = ", ".join(sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml")))
    raise _ConfigNotFoundError(f"training config not found: {name}; pass a YAML file or a built-in config "
                               f"name ({builtin}) to --config")


def load_settings(config_path: str | None, overrides: dict[str, Any]) -> TrainSettings:
    """Read a YAML config and apply overrides; dotted keys (`predictor.max_steps`) reach nested fields."""
    raw: dict = {}
    if config_path:
        path = resolve_config_path(config_path)
        raw = _yaml_load(path.read_text(), str(path)) or {}
        if not isinstance(raw, dict):
            raise SettingsError(f"{path} must hold a mapping of settings, got {type(raw).__name__}")
    for key, value in overrides.items():
        if value is None:
            continue
        target = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise SettingsError(f"cannot set {key}: {'.'.join(parts[:depth + 1])} is not a mapping")
        target[parts[-1]] = value
    return TrainSettings.from_dict(raw)


# --------------------------------------------------------------------------------------------------
# Data and feature cache
# --------------------------------------------------------------------------------------------------


def data_layout(settings: TrainSettings) -> tuple[DataLayout, list[str]]:
    """The data root's layout and the categories to train (one `DataLayoutError` line if either is wrong)."""
    layout = find_layout(settings.data_root, settings.dataset_format)
    return layout, select_categories(layout, settings.categories)


# --------------------------------------------------------------------------------------------------
# Schedules and checkpoints
# --------------------------------------------------------------------------------------------------


def lr_lambda_for(stage: StageSettings, total_steps: int):
    """Multiplier of the base learning rate at each step: linear warm-up then cosine to the minimum
    (LAViT), or a step drop at `step_fraction` (HVQ-Trans)."""
    warmup = int(round(stage.warmup_fraction * total_steps))
    floor = stage.min_learning_rate / stage.learning_rate if stage.learning_rate > 0 else 0.0

    def multiplier(step: int) -> float:
        if step < warmup:
            return floor + (1.0 - floor) * (step + 1) / warmup
        if stage.schedule == "step":
            return stage.step_gamma if step >= stage.step_fraction * total_steps else 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def latest_checkpoint(stage_dir: Path) -> tuple[Path | None, int]:
    """The newest complete `step_XXXXXXX` folder of a stage (temporary folders are ignored)."""
    if not stage_dir.is_dir():
        return None, 0
    steps = sorted(
        (int(p.name.split("_")[1]), p) for p in stage_dir.iterdir()
        if p.is_dir() and p.name.startswith("step_") and p.name.split("_")[1].isdigit()
    )
    return (steps[-1][1], steps[-1][0]) if steps else (None, 0)


class Progress:
    """`progress.json`: the finished stages of a run, written atomically."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / "progress.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"completed": [], "history": {}}

    def done(self, stage: str) -> bool:
        return stage in self.data["completed"]

    def mark(self, stage: str, summary: dict, is_main: bool) -> None:
        if stage not in self.data["completed"]:
            self.data["completed"].append(stage)
        self.data["history"][stage] = summary
        if is_main:
            atomic_write_json(self.path, self.data)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so the run stops after a checkpoint."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("signal %s received: stopping after saving a checkpoint (press again to abort)", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_finite(loss: torch.Tensor, stage: str, step: int, hint: str) -> None:
    if not torch.isfinite(loss).all():
        raise TrainingDivergedError(
            f"{stage}: loss is {loss.item()} at step {step}. Likely causes: {hint}. The last good checkpoint "
            "is kept; lower the learning rate or check the data, then rerun with --resume."
        )


# --------------------------------------------------------------------------------------------------
# The stage loop
# --------------------------------------------------------------------------------------------------


def _stage_seed(seed: int, stage_name: str) -> int:
    """A 32-bit seed for one stage, stable across processes and Python runs (no `hash()`)."""
    return int(np.random.SeedSequence([seed, *stage_name.encode()]).generate_state(1)[0])


def forward_backward(accelerator: Accelerator, model: torch.nn.Module, batch, step: int, loss_fn,
                     micro_batch_size: int | None, loss_reduction: str, stage_name: str = "", hint: str = ""):
    """Loss of one step's `batch` and its gradient (accumulated into `.grad`), in row chunks of
    `micro_batch_size` when set.

    `loss_fn(model, rows, step, first_row) -> (loss, logs)` gets the tensors of rows
    `first_row .. first_row + len(rows)` of the batch (per-sample randomness such as masks must
    depend on the row index, not on the chunk). With `loss_reduction="sum"` the chunk losses add up
    to the batch loss; with `"mean"` each is weighted by its share of the rows. Gradients are
    synchronised across processes on the last chunk only. Returns `(loss, logs)` of the whole batch.
    """
    num_rows = batch[0].shape[0]
    size = micro_batch_size or num_rows
    starts = list(range(0, num_rows, size))
    total = None
    logs: dict = {}
    for index, start in enumerate(starts):
        rows = [tensor[start:start + size] for tensor in batch]
        last = index == len(starts) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss, logs = loss_fn(model, rows, step, start)
            if loss_reduction == "mean" and len(starts) > 1:
                loss = loss * (rows[0].shape[0] / num_rows)
            _check_finite(loss.detach(), stage_name, step, hint)
            accelerator.backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    return total, logs


def run_stage(accelerator: Accelerator, settings: TrainSettings, stage_name: str, stage: StageSettings,
              model: torch.nn.Module, dataset: TensorDataset, loss_fn, hint: str, stop: _StopFlag,
              resume: bool, log_prefix: str, loss_reduction: str = "mean") -> dict:
    """Train `model` on `dataset` with `loss_fn(model, batch, step, first_row) -> (loss, logs)` (see
    `forward_backward`; `first_row` is 0 unless `stage.micro_batch_size` splits the batch); returns
    a summary."""
    output_dir = Path(settings.output_dir)
    stage_dir = output_dir / "checkpoints" / stage_name.replace("/", "-")
    total = stage.total_steps(len(dataset), accelerator.num_processes)
    # Bit-exact resume across stage boundaries: start every stage from RNG streams derived from
    # (seed, stage name) alone. Without this a stage that starts fresh inherits the global RNG state
    # left by the stages before it, which differs between an uninterrupted run (they trained) and a
    # resumed one (they were loaded from `stages/`), so e.g. the predictors' dropout masks diverged.
    # Mid-stage, `load_state` below restores the checkpoint's RNG states over this seed.
    set_seed(_stage_seed(settings.seed, stage_name))
    accelerator.free_memory()
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel is several times faster than the per-tensor loop on CPU as well as on GPU.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, betas=stage.betas, weight_decay=stage.weight_decay,
                                  fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(stage, total))
    generator = torch.Generator().manual_seed(settings.seed)
    batch_size = min(stage.batch_size, len(dataset))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    step = 0
    if resume:
        checkpoint, step = latest_checkpoint(stage_dir)
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))
            accelerator.print(f"[{stage_name}] resumed from {checkpoint} (step {step}/{total})")
    per_epoch = len(loader)
    losses: list[float] = []
    bar = tqdm(total=total, initial=step, desc=f"{log_prefix}", unit="step", disable=not accelerator.is_local_main_process)
    model.train()

    def save(at_step: int) -> None:
        # Every process writes its part (e.g. its RNG state) into one temporary folder; the main
        # process then renames it, so `step_XXXXXXX` folders are always complete.
        target = stage_dir / f"step_{at_step:07d}"
        if target.exists():
            return
        tmp = stage_dir / f".step_{at_step:07d}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.replace(tmp, target)
        accelerator.wait_for_everyone()

    started = time.time()
    while step < total:
        epoch = step // per_epoch
        loader.set_epoch(epoch)
        skip = step - epoch * per_epoch
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                loss, logs = forward_backward(accelerator, model, batch, step, loss_fn, stage.micro_batch_size,
                                              loss_reduction, stage_name, hint)
                grad_norm = None
                if accelerator.sync_gradients and stage.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), stage.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step += 1
            loss_value = loss.detach().float().item()
            losses.append(loss_value)
            lr = scheduler.get_last_lr()[0]
            record = {f"{log_prefix}/loss": loss_value, f"{log_prefix}/lr": lr, **{f"{log_prefix}/{k}": v for k, v in logs.items()}}
            if grad_norm is not None:
                record[f"{log_prefix}/grad_norm"] = float(grad_norm)
            accelerator.log(record, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if step % stage.checkpoint_every == 0 or step == total or stop.requested:
                save(step)
            if stop.requested:
                bar.close()
                raise TrainingInterrupted(f"{stage_name}: stopped at step {step}/{total}; rerun with --resume to continue")
            if step >= total:
                break
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    return {"steps": total, "final_loss": float(np.mean(tail)), "seconds": round(time.time() - started, 1)}


# --------------------------------------------------------------------------------------------------
# Main job
# --------------------------------------------------------------------------------------------------


def model_config(settings: TrainSettings, categories: list[str]) -> LadmimConfig:
    """The `LadmimConfig` of `settings.model`; a bad value is a `SettingsError` naming `model.`."""
    model_kwargs = json.loads(json.dumps(settings.model))  # deep copy
    tokenizer_kwargs = dict(model_kwargs.pop("tokenizer_config", {}) or {})
    tokenizer_kwargs["categories"] = categories
    try:
        return LadmimConfig(tokenizer_config=tokenizer_kwargs, **model_kwargs)
    except (TypeError, ValueError) as error:  # the config's own checks name the field
        raise SettingsError(f"model settings: {error}") from None


def build_model(settings: TrainSettings, categories: list[str]) -> LadmimForAnomalyDetection:
    model = LadmimForAnomalyDetection(model_config(settings, categories))
    if settings.load_imagenet_weights:
        model.tokenizer.backbone.load_imagenet_weights(settings.backbone_weights)
    return model


def _masks_for_step(generator_factory, num_rows: int, step: int, seed: int, process: int, first_row: int = 0) -> torch.Tensor:
    """Training masks of rows `first_row ..` of a step's batch: each row's mask depends on (seed, step,
    process, row) only, so micro-batching does not change them."""
    rows = range(first_row, first_row + num_rows)
    seeds = [int(np.random.SeedSequence([seed, step, process, i]).generate_state(1)[0]) for i in rows]
    return generator_factory(num_rows, seed=seeds)


# Settings that may change on --resume: where the run folder is named from, how the run reports,
# checkpoints and batches frozen-feature extraction or predictor micro-batches (same gradients),
# whether unreadable files are skipped (a run that started had none, or skipped them), and each
# stage's length (a resumed stage then runs to the new total). Everything else shapes the model or
# its optimisation, so resuming with another value would mix two runs (or fail on tensor sizes).
RESUME_MAY_DIFFER = frozenset({
    "output_dir", "log_with", "feature_batch_size", "skip_bad_files",
    *(f"{stage}.{name}" for stage in ("tokenizer", "predictor")
      for name in ("max_steps", "epochs", "checkpoint_every", "micro_batch_size")),
})


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_differences(saved: dict, current: dict) -> list[str]:
    """`"field: saved -> current"` for every setting of `current` (a `train_settings.json` dict) that
    differs from the run's `saved` one, except `RESUME_MAY_DIFFER`. A field missing from an older
    file counts as its default; one no longer known is ignored."""
    missing = object()
    old = {**_flatten(TrainSettings().to_dict()), **_flatten(saved)}
    new = _flatten(json.loads(json.dumps(current)))  # tuples as JSON lists, like the saved file
    old = json.loads(json.dumps(old))
    for values in (old, new):
        if isinstance(values.get("data_root"), str):
            values["data_root"] = os.path.realpath(values["data_root"])
    out = []
    for key in sorted(set(old) | set(new)):
        if key in RESUME_MAY_DIFFER or key.split(".")[0] not in TrainSettings.__dataclass_fields__:
            continue
        before, after = old.get(key, missing), new.get(key, missing)
        if before != after:
            out.append(f"{key}: {'unset' if before is missing else repr(before)} -> "
                       f"{'unset' if after is missing else repr(after)}")
    return out


def _check_resume(output_dir: Path, current: dict, data_root: str) -> None:
    """Refuse `--resume` when `current` differs from the settings the run was started with."""
    path = output_dir / "train_settings.json"
    if not path.is_file():
        return  # nothing started here: --resume starts fresh
    try:
        saved = json.loads(path.read_text())
    except ValueError as error:
        raise SettingsError(f"{path} is not valid JSON ({error}); cannot check --resume against it") from None
    if isinstance(saved.get("categories"), str):  # files written before categories were stored resolved
        with contextlib.suppress(DataLayoutError):
            saved["categories"] = select_categories(find_layout(data_root, saved.get("dataset_format", "auto")),
                                                    saved["categories"])
    differences = resume_differences(saved, current)
    if differences:
        raise SettingsError(
            f"--resume: {output_dir} was trained with other settings ({'; '.join(differences)}); resume with the "
            f"run's own settings (--config {path} --resume) or train into a new --output_dir")


def train(settings: TrainSettings, resume: bool = False) -> Path:
    """Run all stages and save the detector to `OUTPUT_DIR/model`. Returns that folder.

    Settings, data folders and (with `resume`) the run folder's `train_settings.json` are checked
    before anything is loaded or written; see `RESUME_MAY_DIFFER` for what may change on resume.
    """
    output_dir = Path(settings.output_dir)
    for name in ("tokenizer", "predictor"):
        stage = getattr(settings, name)
        if stage.epochs is None and stage.max_steps is None:
            raise SettingsError(f"set {name}.epochs or {name}.max_steps (in the config file, or --epochs/--max_steps)")
    layout, categories = data_layout(settings)  # a wrong data_root or category fails before the run folder is made
    model_config(settings, categories)  # bad model settings fail now, not after feature extraction
    accelerator = Accelerator(
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        log_with=settings.log_with,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(settings.seed)
    disable_bars = not accelerator.is_local_main_process
    progress = Progress(output_dir)
    if not resume and (progress.data["completed"] or any((output_dir / "checkpoints").glob("*/step_*"))):
        raise FileExistsError(f"{output_dir} holds a previous run (checkpoints or {progress.path.name}); pass --resume "
                              "to continue it or choose another --output_dir")
    if resume and accelerator.is_main_process:
        # A run killed during a save leaves hidden temporaries (or, between two renames, only the
        # previous version under a hidden name); tidy them before anything reads these folders.
        # Only on --resume: a fresh run may be pointed at a folder holding other people's files.
        stage_checkpoints = sorted(p for p in (output_dir / "checkpoints").glob("*") if p.is_dir())
        for folder in [output_dir, output_dir / "stages", output_dir / "checkpoints", *stage_checkpoints]:
            for action in recover_interrupted_saves(folder):
                logger.info(action)
    accelerator.wait_for_everyone()
    # Categories are stored resolved, so a resume after a category folder was added to the data root
    # is refused rather than building a model with another number of classes.
    saved_settings = {**settings.to_dict(), "categories": categories}
    if resume:
        _check_resume(output_dir, saved_settings, settings.data_root)

    # Stage 0: frozen backbone features, once per image (no augmentation, so they never change).
    # Every split is listed (and its images checked) before the model is built or anything written.
    cache_path = output_dir / "cache" / "features.pt"
    cache: dict[str, torch.Tensor] = {}
    if cache_path.exists():
        cache = torch.load(cache_path, weights_only=True)
    splits = {c: normal_split(layout, c, settings.holdout_fraction, settings.seed, settings.skip_bad_files)
              for c in categories}
    to_extract = {f"{split}/{category}": getattr(splits[category], split)
                  for category in categories for split in ("train", "validation") if f"{split}/{category}" not in cache}

    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        atomic_write_json(output_dir / "train_settings.json", saved_settings)
    if settings.log_with:
        flat = {k: v for k, v in settings.to_dict().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("ladmim", config=flat)
    accelerator.print(f"categories: {', '.join(categories)} ({layout.dataset_format} layout)")
    for category, split in splits.items():
        accelerator.print(f"{category}: {len(split.train)} training images; calibration on {split.source}")
    torch.manual_seed(settings.seed)
    model = build_model(settings, categories)
    processor = LadmimImageProcessor(size=model.config.tokenizer_config.image_size)
    tokenizer = model.tokenizer.to(accelerator.device)
    for key, paths in to_extract.items():
        cache[key] = extract_features(tokenizer, processor, paths, settings.feature_batch_size, f"features {key}",
                                      disable_bars)
    if accelerator.is_main_process:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        torch.save(cache, tmp)
        os.replace(tmp, cache_path)

    summary: dict[str, Any] = {}
    stop = _StopFlag()
    with stop:
        # Stage 1: the class-switched tokenizer on every category's train/good features.
        stage_dir = output_dir / "stages" / STAGE_TOKENIZER
        if progress.done(STAGE_TOKENIZER):
            tokenizer.load_state_dict(LadmimTokenizerModel.from_pretrained(stage_dir).state_dict())
            accelerator.print(f"[tokenizer] done earlier, loaded {stage_dir}")
        else:
            features = torch.cat([cache[f"train/{c}"] for c in categories])
            if tokenizer.config.standardize_features:
                tokenizer.set_feature_statistics(features)
            class_ids = torch.cat([torch.full((len(cache[f"train/{c}"]),), i, dtype=torch.long) for i, c in enumerate(categories)])

            def tokenizer_loss(module, batch, step, first_row):
                batch_features, batch_ids = batch
                out = module(features=batch_features, category=batch_ids)
                perplexity = out.codebook_perplexity.float()
                return out.loss, {"reconstruction": out.reconstruction_loss.item(),
                                  "commitment": out.commitment_loss.item(),
                                  "perplexity_mean": perplexity[:-1].mean().item(),
                                  "usage_mean": out.codebook_usage[:-1].float().mean().item(),
                                  "dead_codes_restarted": float(out.dead_codes_restarted or 0)}

            summary[STAGE_TOKENIZER] = run_stage(
                accelerator, settings, STAGE_TOKENIZER, settings.tokenizer, tokenizer,
                TensorDataset(features, class_ids), tokenizer_loss,
                "learning rate too high for the encoder, or collapsed codebooks (check tokenizer/perplexity_mean)",
                stop, resume, "tokenizer",
            )
            tokenizer = accelerator.unwrap_model(tokenizer)
            if accelerator.is_main_process:
                atomic_save_directory(stage_dir, lambda tmp: tokenizer.save_pretrained(tmp), True)
            progress.mark(STAGE_TOKENIZER, summary[STAGE_TOKENIZER], accelerator.is_main_process)
            accelerator.print(f"[tokenizer] {summary[STAGE_TOKENIZER]}")
        tokenizer.eval()
        model.tokenizer = tokenizer

        # Stage 2: predictors, trained from the frozen tokenizer's cached features and codes.
        codes = {}
        for category in categories:
            for split in ("train", "validation"):
                key = f"{split}/{category}"
                codes[key] = torch.cat([
                    tokenizer.encode(features=chunk.to(accelerator.device), category=category).cpu()
                    for chunk in cache[key].split(64)
                ])
        mask_factory = model.mask_generator(training=True)
        predictor_names = ["shared"] if model.config.shared_predictor else categories
        for name in predictor_names:
            stage_name = f"predictor/{name}"
            stage_dir = output_dir / "stages" / f"predictor-{name}"
            if progress.done(stage_name):
                model.predictors[name].load_state_dict(LadmimPredictorModel.from_pretrained(stage_dir).state_dict())
                accelerator.print(f"[{stage_name}] done earlier, loaded {stage_dir}")
                continue
            members = categories if name == "shared" else [name]
            # The predictor reads what the tokenizer reconstructs (standardised features, if enabled).
            features = tokenizer.standardize(torch.cat([cache[f"train/{c}"] for c in members]).to(accelerator.device)).cpu()
            labels = torch.cat([codes[f"train/{c}"] for c in members])
            member_ids = torch.cat([torch.full((len(codes[f"train/{c}"]),), i, dtype=torch.long) for i, c in enumerate(members)])
            # The codebook_mmd loss compares histograms through each member category's code kernel.
            kernels = None
            if model.config.predictor_config.loss_type == "codebook_mmd":
                kernels = torch.stack([tokenizer.code_kernel(c, model.config.kernel_bandwidth) for c in members]).to(accelerator.device)
            process = accelerator.process_index

            def predictor_loss(module, batch, step, first_row, _factory=mask_factory, _process=process, _kernels=kernels):
                batch_features, batch_codes, batch_ids = batch
                masks = _masks_for_step(_factory, batch_features.shape[0], step, settings.seed, _process,
                                        first_row).to(batch_features.device)
                kernel = None
                if _kernels is not None:  # one kernel for a per-category predictor, one per row when shared
                    kernel = _kernels[0] if len(_kernels) == 1 else _kernels[batch_ids.to(_kernels.device)]
                out = module(batch_features, masks, labels=batch_codes, code_kernel=kernel)
                return out.loss, {}

            summary[stage_name] = run_stage(
                accelerator, settings, stage_name, settings.predictor, model.predictors[name],
                TensorDataset(features, labels, member_ids), predictor_loss,
                "learning rate too high, an empty mask, or collapsed tokenizer codebooks",
                stop, resume, stage_name, loss_reduction=model.predictors[name].config.loss_reduction,
            )
            predictor = accelerator.unwrap_model(model.predictors[name])
            model.predictors[name] = predictor
            if accelerator.is_main_process:
                atomic_save_directory(stage_dir, lambda tmp: predictor.save_pretrained(tmp), True)
            progress.mark(stage_name, summary[stage_name], accelerator.is_main_process)
            accelerator.print(f"[{stage_name}] {summary[stage_name]}")

    # Stage 3: calibration on normal validation images (never on test images). The structural map's
    # residual statistics, the memory bank and the global branch are fitted on the training images,
    # so validation stays unseen.
    model.eval()
    for category in tqdm(categories, desc="feature branches", disable=disable_bars):
        if model.config.tokenizer_config.residual_normalization == "cell_channel":
            model.tokenizer.fit_residual_statistics(cache[f"train/{category}"], category)
        model.fit_feature_branches(cache[f"train/{category}"], category, seed=settings.seed)
    model._warned_uncalibrated.update(categories)  # raw scores are exactly what calibration needs
    calibration = {}
    num_masks = settings.calibration_num_masks or model.config.num_masks
    for category in tqdm(categories, desc="calibration", disable=disable_bars):
        features = cache[f"validation/{category}"]
        warning = calibration_size_warning(len(features), settings.calibration_fpr)
        if warning:
            logger.warning("%s: %s", category, warning)
        calibration[category] = calibrate_category(model, features.to(accelerator.device), category, num_masks,
                                                   settings.seed, settings.calibration_fpr)
    model.config.calibration = calibration
    model_dir = output_dir / "model"
    if accelerator.is_main_process:
        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            add_pipeline_to_folder(tmp)  # pipeline("image-anomaly-detection", model=DIR, trust_remote_code=True)
            (tmp / "training_summary.json").write_text(json.dumps({
                "stages": summary, "calibration": calibration,
                "validation": {c: split.source for c, split in splits.items()},
                "holdout": {"fraction": settings.holdout_fraction, "seed": settings.seed}}, indent=2))
        atomic_save_directory(model_dir, write, True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"done: model saved to {model_dir} ({len(categories)} categories, "
                      f"{sum(v.get('steps', 0) for v in summary.values())} steps this run)")
    return model_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ladmim train", description="Train a LADMIM detector (tokenizer, predictors, calibration).")
    add_train_arguments(parser)
    return parser


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help="YAML file, or a built-in config name: synthloco-cpu (CPU default), loco-paper (the paper)")
    parser.add_argument("--data_root", default=None,
                        help="one category's folder of normal images (DIR/good, DIR/train/good, or images directly in "
                             "DIR) or a root holding one folder per category (DIR/<category>/train/good)")
    parser.add_argument("--categories", nargs="+", default=None, help="category names or 'all'")
    parser.add_argument("--dataset_format", choices=DATASET_FORMATS, default=None,
                        help="auto (default): LOCO-style category folders as MVTec LOCO AD, anything else as plain folders")
    parser.add_argument("--holdout_fraction", type=float, default=None,
                        help="share of each category's training images held out to calibrate when it has no "
                             "validation/good folder (default 0.1)")
    parser.add_argument("--output_dir", default=None, help="run folder (checkpoints, logs, model)")
    parser.add_argument("--max_steps", type=int, default=None, help="steps per stage (both stages)")
    parser.add_argument("--epochs", type=float, default=None, help="epochs per stage (both stages)")
    parser.add_argument("--seed", type=int, default=None)
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


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # accelerate logs every file of every checkpoint at INFO; keep the console to what users need.
    for name in ("accelerate.accelerator", "accelerate.checkpointing", "accelerate.utils.other"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    args = build_parser().parse_args(argv)
    return run_from_args(args)


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


if __name__ == "__main__":
    sys.exit(main())
