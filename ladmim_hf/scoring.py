"""Scoring many image files with a detector: backbone features once (and, for a detector that scores
moved poses, the moved images' features), then every branch's raw scores.

Training's calibration, `ladmim calibrate` and `ladmim evaluate` all go through these two functions,
so a threshold is always set on scores computed the way they are used.
"""

from __future__ import annotations

from typing import Callable

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
def extract_scoring_features(detector: LadmimForAnomalyDetection, processor: LadmimImageProcessor, paths: list[str],
                             batch_size: int, description: str, disable: bool = False
                             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the detector scores image files from, each file read once: backbone features `(num_images, C, g, g)`
    and `extract_moved_features` `(num_images, 4, C, g, g)` (None without poses); float32, CPU."""
    tokenizer = detector.tokenizer
    if not detector.config.logical_pose_moves:
        return extract_features(tokenizer, processor, paths, batch_size, description, disable), None
    features, moved = _features_of_files([tokenizer.extract_features, detector.extract_moved_features], tokenizer.device,
                                         processor, paths, batch_size, description, disable)
    return features, moved


def branch_scores(model: LadmimForAnomalyDetection, features: torch.Tensor, category: str, num_masks: int | None,
                  seed: int, batch_size: int = 16, moved_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Raw score of every enabled branch, `{branch: (num_images,)}` on the CPU (with retrieval also the
    logical score's two components, `LadmimAnomalyOutput.logical_components`), every image scored with
    the mask set of `seed` (so the result does not depend on `batch_size`). `moved_features`: the images'
    `extract_moved_features`, needed when the model scores moved poses."""
    return branch_scores_and_map_statistics(model, features, category, num_masks, seed, batch_size,
                                            moved_features=moved_features)[0]


def branch_scores_and_map_statistics(model: LadmimForAnomalyDetection, features: torch.Tensor, category: str,
                                     num_masks: int | None, seed: int, batch_size: int = 16,
                                     normal: torch.Tensor | None = None, moved_features: torch.Tensor | None = None
                                     ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`branch_scores`, and `{branch}_map_mean` / `{branch}_map_std`: the mean and std over every pixel of
    the maps, for each branch with a map (what the maps are standardised with before fusion). `normal`
    `(num_images,)` bool: only those images' maps count (default: every image)."""
    device = next(model.parameters()).device
    scores: dict[str, list[torch.Tensor]] = {}
    moments: dict[str, list[float]] = {}  # pixel count, sum, sum of squares (float64)
    for start in range(0, len(features), batch_size):
        moved = None if moved_features is None else moved_features[start:start + batch_size].to(device)
        out = model(features=features[start:start + batch_size].to(device), moved_features=moved, category=category,
                    num_masks=num_masks, seed=seed)
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


__all__ = ["branch_scores", "branch_scores_and_map_statistics", "extract_features", "extract_moved_features",
           "extract_scoring_features"]
