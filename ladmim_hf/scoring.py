"""Scoring many image files with a detector: backbone features once (and, for a detector that scores
moved poses, the moved images' features; for one whose global branch reads a larger image, that image's
features), then every branch's raw scores.

Training's calibration, `ladmim calibrate` and `ladmim evaluate` all go through these two functions,
so a threshold is always set on scores computed the way they are used.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from .models.image_processing_ladmim import LadmimImageProcessor
from .models.modeling_ladmim import LadmimForAnomalyDetection
from .models.modeling_ladmim_tokenizer import LadmimTokenizerModel


def _features_of_files(extracts: list[Callable[[torch.Tensor], torch.Tensor]], device, processor: LadmimImageProcessor,
                       paths: list[str], batch_size: int, description: str, disable: bool) -> list[torch.Tensor]:
    """Each of `extracts` applied to the files' pixels, every file read once: one float32 CPU tensor per extract."""
    chunks: list[list[torch.Tensor]] = [[] for _ in extracts]
    for start in tqdm(range(0, len(paths), batch_size), desc=description, unit="batch", disable=disable, leave=False):
        pixel_values = processor(paths[start:start + batch_size])["pixel_values"].to(device)
        for chunk, extract in zip(chunks, extracts):
            chunk.append(extract(pixel_values).float().cpu())
    return [torch.cat(chunk) if chunk else torch.empty(0) for chunk in chunks]


@torch.no_grad()
def features_of_files(extracts: dict[str, Callable[[torch.Tensor], torch.Tensor]], device,
                      processor: LadmimImageProcessor, paths: list[str], batch_size: int, description: str,
                      disable: bool = False) -> dict[str, torch.Tensor]:
    """`{name: extract}` applied to the files' pixels, every file read once: `{name: float32 CPU tensor}`."""
    values = _features_of_files(list(extracts.values()), device, processor, paths, batch_size, description, disable)
    return dict(zip(extracts, values))


@torch.no_grad()
def extract_features(tokenizer: LadmimTokenizerModel, processor: LadmimImageProcessor, paths: list[str],
                     batch_size: int, description: str, disable: bool = False) -> torch.Tensor:
    """Frozen backbone features `(num_images, C, g, g)` (float32, CPU) of image files, with a progress bar."""
    return _features_of_files([tokenizer.extract_features], tokenizer.device, processor, paths, batch_size, description,
                              disable)[0]


@torch.no_grad()
def extract_moved_features(detector: LadmimForAnomalyDetection, processor: LadmimImageProcessor, paths: list[str],
                           batch_size: int, description: str, disable: bool = False) -> torch.Tensor | None:
    """Features of image files moved by each of the detector's `config.logical_pose_moves`
    `(num_images, 4, C, g, g)` (float32, CPU; `detector.extract_moved_features`), or None when the
    detector scores only the image as it is."""
    if not detector.config.logical_pose_moves:
        return None
    return _features_of_files([detector.extract_moved_features], detector.tokenizer.device, processor, paths, batch_size,
                              f"{description} (moved)", disable)[0]


@torch.no_grad()
def extract_global_features(detector: LadmimForAnomalyDetection, processor: LadmimImageProcessor, paths: list[str],
                            batch_size: int, description: str, disable: bool = False) -> torch.Tensor | None:
    """Features of image files at the detector's `config.global_image_size` `(num_images, C, g', g')` (float32,
    CPU; `detector.extract_global_features`), or None when its global branch reads the tokenizer's features."""
    if detector.config.global_image_size is None:
        return None
    return _features_of_files([detector.extract_global_features], detector.tokenizer.device, processor, paths, batch_size,
                              f"{description} ({detector.config.global_image_size} px)", disable)[0]


class ScoringFeatures(NamedTuple):
    """What a detector scores image files from (float32, CPU): backbone `features` `(N, C, g, g)`, the moved
    poses' `moved` `(N, 4, C, g, g)` (None without poses) and the global branch's `global_features`
    `(N, C, g', g')` at `config.global_image_size` (None when it reads `features`)."""

    features: torch.Tensor
    moved: torch.Tensor | None
    global_features: torch.Tensor | None

    def model_inputs(self, start: int, stop: int, device=None) -> dict[str, torch.Tensor | None]:
        """Rows `start:stop` as the detector's keywords `features`, `moved_features` and `global_features`
        (moved to `device` when given)."""
        def rows(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[start:stop].to(device)
        return {"features": rows(self.features), "moved_features": rows(self.moved),
                "global_features": rows(self.global_features)}


@torch.no_grad()
def extract_scoring_features(detector: LadmimForAnomalyDetection, processor: LadmimImageProcessor, paths: list[str],
                             batch_size: int, description: str, disable: bool = False) -> ScoringFeatures:
    """Everything the detector scores image files from, each file read once (`ScoringFeatures`)."""
    extracts = {"features": detector.tokenizer.extract_features}
    if detector.config.logical_pose_moves:
        extracts["moved"] = detector.extract_moved_features
    if detector.config.global_image_size is not None:
        extracts["global_features"] = detector.extract_global_features
    found = features_of_files(extracts, detector.tokenizer.device, processor, paths, batch_size, description, disable)
    return ScoringFeatures(found["features"], found.get("moved"), found.get("global_features"))


def branch_scores(model: LadmimForAnomalyDetection, features: torch.Tensor, category: str, num_masks: int | None,
                  seed: int, batch_size: int = 16, moved_features: torch.Tensor | None = None,
                  global_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Raw score of every enabled branch, `{branch: (num_images,)}` on the CPU (with retrieval also the
    logical score's two components, `LadmimAnomalyOutput.logical_components`), every image scored with
    the mask set of `seed` (so the result does not depend on `batch_size`). `moved_features`: the images'
    `extract_moved_features`, needed when the model scores moved poses; `global_features`: their
    `extract_global_features`, needed with `config.global_image_size`."""
    return branch_scores_and_map_statistics(model, features, category, num_masks, seed, batch_size,
                                            moved_features=moved_features, global_features=global_features)[0]


def branch_scores_and_map_statistics(model: LadmimForAnomalyDetection, features: torch.Tensor, category: str,
                                     num_masks: int | None, seed: int, batch_size: int = 16,
                                     normal: torch.Tensor | None = None, moved_features: torch.Tensor | None = None,
                                     global_features: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`branch_scores`, and `{branch}_map_mean` / `{branch}_map_std`: the mean and std over every pixel of
    the maps, for each branch with a map (what the maps are standardised with before fusion). `normal`
    `(num_images,)` bool: only those images' maps count (default: every image)."""
    device = next(model.parameters()).device
    scores: dict[str, list[torch.Tensor]] = {}
    moments: dict[str, list[float]] = {}  # pixel count, sum, sum of squares (float64)
    inputs = ScoringFeatures(features, moved_features, global_features)
    for start in range(0, len(features), batch_size):
        out = model(**inputs.model_inputs(start, start + batch_size, device), category=category, num_masks=num_masks,
                    seed=seed)
        for branch, values in {**out.branch_scores(), **out.logical_components()}.items():
            scores.setdefault(branch, []).append(values.cpu())
        counted = None if normal is None else torch.as_tensor(normal[start:start + batch_size], dtype=torch.bool)
        for branch, values in out.branch_maps().items():
            values = values.double().cpu()
            if counted is not None:
                values = values[counted]
            total = moments.setdefault(branch, [0.0, 0.0, 0.0])
            total[0] += values.numel()
            total[1] += float(values.sum())
            total[2] += float((values * values).sum())
    statistics = {}
    for branch, (count, total, squares) in moments.items():
        mean = total / count
        statistics[f"{branch}_map_mean"] = mean
        statistics[f"{branch}_map_std"] = max(squares / count - mean * mean, 0.0) ** 0.5
    return {branch: torch.cat(values) for branch, values in scores.items()}, statistics


__all__ = ["ScoringFeatures", "branch_scores", "branch_scores_and_map_statistics", "extract_features",
           "extract_global_features", "extract_moved_features", "extract_scoring_features", "features_of_files"]
