"""The training job: `train()` runs the stages in order and saves the detector to `OUTPUT_DIR/model`.

0. `cache_features`: frozen backbone features of every image, once (`OUTPUT_DIR/cache/features.pt`);
1. `train_tokenizer`: the class-switched tokenizer on every category's features;
2. `train_predictors`: one predictor per category (or one shared), on the frozen tokenizer's codes;
3. `calibrate`: the feature branches, then score statistics on normal validation images;
4. `save_detector`: model, image processor, pipeline code and `training_summary.json`.

Stages 1 and 2 run through `loop.run_stage` (checkpoints, `--resume`); a finished stage is recorded
in `progress.json` and its module saved under `OUTPUT_DIR/stages/`, so a resumed run loads it instead
of training it again. `open_run` checks settings, data folders and (with `resume`) the run folder
before anything is loaded or written.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from ..calibration import calibrate_category, calibration_size_warning
from ..models.configuration_ladmim import LadmimConfig
from ..data.layout import DataLayout, find_layout, normal_split, select_categories
from ..hub import add_pipeline_to_folder
from ..models.image_processing_ladmim import LadmimImageProcessor
from ..io_utils import atomic_save_directory, atomic_write_json, recover_interrupted_saves
from ..models.modeling_ladmim import LadmimForAnomalyDetection
from ..models.modeling_ladmim_predictor import LadmimPredictorModel
from ..models.modeling_ladmim_tokenizer import LadmimTokenizerModel
from ..scoring import ScoringFeatures, features_of_files
from .loop import Progress, _masks_for_step, _StopFlag, run_stage
from .settings import SettingsError, TrainSettings, _check_resume

logger = logging.getLogger("ladmim_hf.training")

STAGE_TOKENIZER = "tokenizer"


# --------------------------------------------------------------------------------------------------
# What the settings build: data layout and model
# --------------------------------------------------------------------------------------------------


def data_layout(settings: TrainSettings) -> tuple[DataLayout, list[str]]:
    """The data root's layout and the categories to train (one `DataLayoutError` line if either is wrong)."""
    layout = find_layout(settings.data_root, settings.dataset_format)
    return layout, select_categories(layout, settings.categories)


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


# --------------------------------------------------------------------------------------------------
# The run and its stages, in the order `train` calls them
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """What every stage of one run shares (built by `open_run`)."""

    settings: TrainSettings
    resume: bool
    accelerator: Accelerator
    layout: DataLayout
    categories: list[str]
    progress: Progress
    # The settings as written to `train_settings.json` (categories resolved).
    saved_settings: dict
    # Per stage: steps, final loss and seconds; ends up in `training_summary.json`.
    summary: dict[str, Any] = field(default_factory=dict)
    stop: _StopFlag = field(default_factory=_StopFlag)

    @property
    def output_dir(self) -> Path:
        return Path(self.settings.output_dir)

    @property
    def disable_bars(self) -> bool:
        return not self.accelerator.is_local_main_process


def open_run(settings: TrainSettings, resume: bool) -> TrainingRun:
    """Check settings, data folders and (with `resume`) the run folder's `train_settings.json`, then
    start Accelerate; nothing is loaded or written before the checks pass."""
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
    return TrainingRun(settings, resume, accelerator, layout, categories, progress, saved_settings)


def moved_cache_key(category: str, step: int) -> str:
    """The feature cache's key for a category's validation images moved by `step` pixels (each step its own)."""
    return f"validation_moved_{step}px/{category}"


def global_cache_key(split: str, category: str, image_size: int) -> str:
    """The feature cache's key for a split's images at `global_image_size` (each size its own)."""
    return f"{split}_{image_size}px/{category}"


def split_cache_keys(model: LadmimForAnomalyDetection, split: str, category: str) -> dict[str, str]:
    """The feature cache's keys of everything the model reads of a split's images, by `ScoringFeatures` field:
    the tokenizer's `features`, with `logical_pose_step` the validation images `moved` (calibration scores
    every pose), with `global_image_size` the larger image's `global_features` (the global branch fits and
    scores on them)."""
    keys = {"features": f"{split}/{category}"}
    if split == "validation" and model.config.logical_pose_moves:
        keys["moved"] = moved_cache_key(category, model.config.logical_pose_step)
    if model.config.global_image_size is not None:
        keys["global_features"] = global_cache_key(split, category, model.config.global_image_size)
    return keys


def split_extracts(model: LadmimForAnomalyDetection, split: str, category: str) -> dict[str, Callable]:
    """`{feature cache key: extract}` of `split_cache_keys`: what computes each from the images' pixels."""
    extracts = {"features": model.tokenizer.extract_features, "moved": model.extract_moved_features,
                "global_features": model.extract_global_features}
    return {key: extracts[field] for field, key in split_cache_keys(model, split, category).items()}


def cached_split_features(model: LadmimForAnomalyDetection, cache: dict[str, torch.Tensor], split: str,
                          category: str) -> ScoringFeatures:
    """What the model scores a split's images from, out of the feature cache (`split_cache_keys`)."""
    keys = split_cache_keys(model, split, category)
    return ScoringFeatures(*(cache[keys[field]] if field in keys else None for field in ScoringFeatures._fields))


def cache_features(
    run: TrainingRun,
) -> tuple[LadmimForAnomalyDetection, LadmimImageProcessor, dict[str, torch.Tensor], dict]:
    """Stage 0: frozen backbone features, once per image (no augmentation, so they never change).

    Every split is listed (and its images checked) before the model is built or anything written.
    Returns the freshly built model (its tokenizer on the accelerator's device), the image processor,
    the feature cache (`"train/<category>"`, `"validation/<category>"` and the other keys of `split_extracts`)
    and each category's split.
    """
    settings, accelerator, categories, output_dir = run.settings, run.accelerator, run.categories, run.output_dir
    cache_path = output_dir / "cache" / "features.pt"
    cache: dict[str, torch.Tensor] = {}
    if cache_path.exists():
        cache = torch.load(cache_path, weights_only=True)
    splits = {c: normal_split(run.layout, c, settings.holdout_fraction, settings.seed, settings.skip_bad_files)
              for c in categories}

    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        atomic_write_json(output_dir / "train_settings.json", run.saved_settings)
    if settings.log_with:
        flat = {k: v for k, v in settings.to_dict().items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("ladmim", config=flat)
    accelerator.print(f"categories: {', '.join(categories)} ({run.layout.dataset_format} layout)")
    for category, split in splits.items():
        accelerator.print(f"{category}: {len(split.train)} training images; calibration on {split.source}")
    torch.manual_seed(settings.seed)
    model = build_model(settings, categories)
    processor = LadmimImageProcessor(size=model.config.tokenizer_config.image_size)
    model.tokenizer.to(accelerator.device)  # the backbone is all that runs
    for category in categories:
        for split in ("train", "validation"):  # each image read once for every feature missing from the cache
            missing = {key: extract for key, extract in split_extracts(model, split, category).items() if key not in cache}
            if missing:
                cache.update(features_of_files(missing, accelerator.device, processor, getattr(splits[category], split),
                                               settings.feature_batch_size, f"features {split}/{category}",
                                               run.disable_bars))
    if accelerator.is_main_process:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_suffix(".tmp")
        torch.save(cache, tmp)
        os.replace(tmp, cache_path)
    return model, processor, cache, splits


def train_tokenizer(run: TrainingRun, model: LadmimForAnomalyDetection, cache: dict[str, torch.Tensor]) -> None:
    """Stage 1: the class-switched tokenizer on every category's train/good features (loaded from
    `stages/tokenizer` when an earlier run finished it); leaves `model.tokenizer` trained, in eval mode."""
    settings, accelerator, categories = run.settings, run.accelerator, run.categories
    tokenizer = model.tokenizer
    stage_dir = run.output_dir / "stages" / STAGE_TOKENIZER
    if run.progress.done(STAGE_TOKENIZER):
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

        run.summary[STAGE_TOKENIZER] = run_stage(
            accelerator, settings, STAGE_TOKENIZER, settings.tokenizer, tokenizer,
            TensorDataset(features, class_ids), tokenizer_loss,
            "learning rate too high for the encoder, or collapsed codebooks (check tokenizer/perplexity_mean)",
            run.stop, run.resume, "tokenizer",
        )
        tokenizer = accelerator.unwrap_model(tokenizer)
        if accelerator.is_main_process:
            atomic_save_directory(stage_dir, lambda tmp: tokenizer.save_pretrained(tmp), True)
        run.progress.mark(STAGE_TOKENIZER, run.summary[STAGE_TOKENIZER], accelerator.is_main_process)
        accelerator.print(f"[tokenizer] {run.summary[STAGE_TOKENIZER]}")
    tokenizer.eval()
    model.tokenizer = tokenizer


def train_predictors(run: TrainingRun, model: LadmimForAnomalyDetection, cache: dict[str, torch.Tensor]) -> None:
    """Stage 2: predictors, trained from the frozen tokenizer's cached features and codes (each one
    loaded from `stages/predictor-<name>` when an earlier run finished it)."""
    settings, accelerator, categories = run.settings, run.accelerator, run.categories
    tokenizer = model.tokenizer
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
        stage_dir = run.output_dir / "stages" / f"predictor-{name}"
        if run.progress.done(stage_name):
            model.predictors[name].load_state_dict(LadmimPredictorModel.from_pretrained(stage_dir).state_dict())
            accelerator.print(f"[{stage_name}] done earlier, loaded {stage_dir}")
            continue
        members = categories if name == "shared" else [name]
        # The predictor reads what the tokenizer reconstructs (standardised features, if enabled), from
        # the taps `config.predictor_taps` names.
        features = model.predictor_inputs(tokenizer.standardize(
            torch.cat([cache[f"train/{c}"] for c in members]).to(accelerator.device))).cpu()
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

        run.summary[stage_name] = run_stage(
            accelerator, settings, stage_name, settings.predictor, model.predictors[name],
            TensorDataset(features, labels, member_ids), predictor_loss,
            "learning rate too high, an empty mask, or collapsed tokenizer codebooks",
            run.stop, run.resume, stage_name, loss_reduction=model.predictors[name].config.loss_reduction,
        )
        predictor = accelerator.unwrap_model(model.predictors[name])
        model.predictors[name] = predictor
        if accelerator.is_main_process:
            atomic_save_directory(stage_dir, lambda tmp: predictor.save_pretrained(tmp), True)
        run.progress.mark(stage_name, run.summary[stage_name], accelerator.is_main_process)
        accelerator.print(f"[{stage_name}] {run.summary[stage_name]}")


def calibrate(run: TrainingRun, model: LadmimForAnomalyDetection, cache: dict[str, torch.Tensor]) -> dict:
    """Stage 3: calibration on normal validation images (never on test images). The structural map's
    residual statistics, the memory bank and the global branch are fitted on the training images,
    so validation stays unseen. Sets and returns `model.config.calibration` (per category)."""
    settings, categories = run.settings, run.categories
    model.eval()
    for category in tqdm(categories, desc="feature branches", disable=run.disable_bars):
        if model.config.tokenizer_config.residual_normalization == "cell_channel":
            model.tokenizer.fit_residual_statistics(cache[f"train/{category}"], category)
        train = cached_split_features(model, cache, "train", category)
        model.fit_feature_branches(train.features, category, seed=settings.seed, global_features=train.global_features)
    model._warned_uncalibrated.update(categories)  # raw scores are exactly what calibration needs
    calibration = {}
    num_masks = settings.calibration_num_masks  # None: the model's num_masks
    for category in tqdm(categories, desc="calibration", disable=run.disable_bars):
        features, moved, global_features = cached_split_features(model, cache, "validation", category)
        warning = calibration_size_warning(len(features), settings.calibration_fpr)
        if warning:
            logger.warning("%s: %s", category, warning)
        calibration[category] = calibrate_category(model, features.to(run.accelerator.device), category, num_masks,
                                                   settings.seed, settings.calibration_fpr, moved, global_features)
    model.config.calibration = calibration
    return calibration


def save_detector(run: TrainingRun, model: LadmimForAnomalyDetection, processor: LadmimImageProcessor,
                  splits: dict, calibration: dict) -> Path:
    """Write the detector to `OUTPUT_DIR/model` (atomically) and end the run; returns that folder."""
    settings, accelerator = run.settings, run.accelerator
    model_dir = run.output_dir / "model"
    if accelerator.is_main_process:
        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            add_pipeline_to_folder(tmp)  # pipeline("image-anomaly-detection", model=DIR, trust_remote_code=True)
            (tmp / "training_summary.json").write_text(json.dumps({
                "stages": run.summary, "calibration": calibration,
                "validation": {c: split.source for c, split in splits.items()},
                "holdout": {"fraction": settings.holdout_fraction, "seed": settings.seed}}, indent=2))
        atomic_save_directory(model_dir, write, True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(f"done: model saved to {model_dir} ({len(run.categories)} categories, "
                      f"{sum(v.get('steps', 0) for v in run.summary.values())} steps this run)")
    return model_dir


def train(settings: TrainSettings, resume: bool = False) -> Path:
    """Run all stages and save the detector to `OUTPUT_DIR/model`. Returns that folder.

    Settings, data folders and (with `resume`) the run folder's `train_settings.json` are checked
    before anything is loaded or written; see `RESUME_MAY_DIFFER` for what may change on resume.
    """
    run = open_run(settings, resume)
    model, processor, cache, splits = cache_features(run)
    with run.stop:  # SIGINT/SIGTERM end a training stage after a checkpoint
        train_tokenizer(run, model, cache)
        train_predictors(run, model, cache)
    calibration = calibrate(run, model, cache)
    return save_detector(run, model, processor, splits, calibration)
