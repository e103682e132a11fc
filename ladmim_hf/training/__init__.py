"""Training with Accelerate: tokenizer (stage 1), per-category predictors (stage 2), calibration (stage 3).

Run as `python scripts/train.py --config configs/synthloco-cpu.yaml` or
`accelerate launch scripts/train.py --config ...` (or `python -m ladmim_hf.training`). Every stage
checkpoints with `Accelerator.save_state` into `OUTPUT_DIR/checkpoints/<stage>/step_XXXXXXX` (written
to a temporary folder and renamed, so a killed run never leaves a half-written checkpoint) and
`--resume` continues from the latest complete one with the same data order and masks, hence the same
loss curve; it refuses a run folder whose `train_settings.json` holds other settings
(`RESUME_MAY_DIFFER` lists what may change). Unusable settings or data folders end in one `error:`
line and exit code 2 (`run_from_args`).

Where things are:

- `settings`: `TrainSettings`/`StageSettings`, YAML loading (`load_settings`, built-in configs),
  `SettingsError`, and what `--resume` may change (`RESUME_MAY_DIFFER`, `resume_differences`);
- `loop`: one stage's training loop (`run_stage`), learning-rate schedule, checkpoints, `progress.json`,
  signal handling and the per-step masks;
- `pipeline`: `train()`, one function per stage (features, tokenizer, predictors, calibration, save);
- `cli`: the `ladmim train` arguments, `main` and the exit codes.

The names below are re-exported, so `from ladmim_hf.training import train, load_settings` works.
"""

from .cli import add_train_arguments, build_parser, configure_logging, main, run_from_args, settings_from_args
from .loop import (
    Progress,
    TrainingDivergedError,
    TrainingInterrupted,
    forward_backward,
    latest_checkpoint,
    lr_lambda_for,
    run_stage,
)
from .pipeline import STAGE_TOKENIZER, build_model, data_layout, model_config, train
from .settings import (
    BUILTIN_CONFIGS,
    RESUME_MAY_DIFFER,
    SettingsError,
    StageSettings,
    TrainSettings,
    load_settings,
    resolve_config_path,
    resume_differences,
)

__all__ = [
    "BUILTIN_CONFIGS",
    "RESUME_MAY_DIFFER",
    "STAGE_TOKENIZER",
    "Progress",
    "SettingsError",
    "StageSettings",
    "TrainSettings",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "add_train_arguments",
    "build_model",
    "build_parser",
    "configure_logging",
    "data_layout",
    "forward_backward",
    "latest_checkpoint",
    "load_settings",
    "lr_lambda_for",
    "main",
    "model_config",
    "resolve_config_path",
    "resume_differences",
    "run_from_args",
    "run_stage",
    "settings_from_args",
    "train",
]
