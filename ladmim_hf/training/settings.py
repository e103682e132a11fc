"""Training settings: the YAML config and command-line overrides, checked field by field.

`load_settings` reads a config file (a path, or a built-in name from `ladmim_hf/configs`) as YAML 1.2
and applies dotted overrides; `TrainSettings`/`StageSettings` check every value. Unusable settings raise
`SettingsError`, one line naming the file or field and the fix (`ladmim train` prints it and exits 2).
`--resume` refuses a run folder whose `train_settings.json` holds other settings (`RESUME_MAY_DIFFER`
lists what may change; `resume_differences` lists what did).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.layout import DATASET_FORMATS, find_layout, select_categories
from ..data.loaders import DataLayoutError


class SettingsError(ValueError):
    """A setting (config file, `--set`, or `--resume` against the run folder) is unusable; the message
    is one line naming the file or field and the fix. `ladmim train` prints it and exits 2."""


class _ConfigNotFoundError(SettingsError, FileNotFoundError):
    """The `--config` file does not exist."""


# --------------------------------------------------------------------------------------------------
# Reading and checking settings
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


# Shipped in the package (the repository's configs/ links here): ladmim_hf/configs, next to this package.
BUILTIN_CONFIGS = Path(__file__).parent.parent / "configs"


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
# What --resume may change
# --------------------------------------------------------------------------------------------------


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

