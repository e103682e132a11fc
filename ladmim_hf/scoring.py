"""Scoring many image files with a detector: backbone features once, then every branch's raw scores.

Training's calibration, `ladmim calibrate` and `ladmim evaluate` all go through these two functions,
so a threshold is always set on scores computed the way they are used.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .models.image_processing_ladmim import LadmimImageProcessor
from .models.modeling_ladmim import LadmimForAnomalyDetection
from .models.modeling_ladmim_tokenizer import LadmimTokenizerModel


@torch.no_grad()
def extract_features(tokenizer: LadmimTokenizerModel, processor: LadmimImageProcessor, paths: list[str],
                     batch_size: int, description: str, disable: bool = False) -> torch.Tensor:
    """Frozen backbone features `(num_images, C, g, g)` (float32, CPU) of image files, with a progress bar."""
    chunks = []
    device = tokenizer.device
    for start in tqdm(range(0, len(paths), batch_size), desc=description, unit="batch", disable=disable, leave=False):
        pixel_values = processor(paths[start:start + batch_size])["pixel_values"].to(device)
        chunks.append(tokenizer.extract_features(pixel_values).float().cpu())
    return torch.cat(chunks) if chunks else torch.empty(0)


def branch_scores(model: LadmimForAnomalyDetection, features: torch.Tensor, category: str, num_masks: int | None,
                  seed: int, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Raw score of every enabled branch, `{branch: (num_images,)}` on the CPU, every image scored with
    the mask set of `seed` (so the result does not depend on `batch_size`)."""
    device = next(model.parameters()).device
    scores: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(features), batch_size):
        out = model(features=features[start:start + batch_size].to(device), category=category, num_masks=num_masks,
                    seed=seed)
        for branch, values in out.branch_scores().items():
            scores.setdefault(branch, []).append(values.cpu())
    return {branch: torch.cat(values) for branch, values in scores.items()}


__all__ = ["branch_scores", "extract_features"]
