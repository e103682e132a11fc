"""The LADMIM anomaly detector: tokenizer, per-category predictors, optional memory-bank and global
branches, calibration and fusion, in one `PreTrainedModel`.

Shipped to the Hub next to the weights (``ladmim_hf/models/``); imports only torch, transformers and
its flat siblings, relatively. The tokenizer and predictor live in ``modeling_ladmim_tokenizer`` and
``modeling_ladmim_predictor``; what they share in ``modeling_ladmim_utils``.

Shapes use B = batch, M = masks per image, N = grid cells (grid_size ** 2), L = codebook levels,
K = codebook size, C = feature channels.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .branches_ladmim import LadmimGlobalBranch, LadmimMemoryBank, LadmimRetrieval, fuse
from .configuration_ladmim import BRANCHES, LadmimConfig, check_calibration
from .masking import BlockMaskGenerator
from .modeling_ladmim_predictor import LadmimPredictorModel
from .modeling_ladmim_tokenizer import LadmimTokenizerModel
from .modeling_ladmim_utils import (LadmimPreTrainedModel, _autocast_dtype, _eval_mode, code_histograms,
                                    kernel_histogram_distance, translate)

logger = logging.getLogger(__name__)

# The two raw scores the logical score combines when the detector retrieves (their calibration keys too).
LOGICAL_COMPONENTS = ("logical_predictor", "logical_retrieval")


@dataclass
class LadmimAnomalyOutput(ModelOutput):
    """Output of [`LadmimForAnomalyDetection.forward`] (names follow anomalib where they overlap).

    Every branch score is raw (unstandardised); `pred_score` and `anomaly_map` combine the branches
    named in `config.fused_branches`, each standardised on normal validation images, by
    `config.fusion_rule`. Branches that are switched off leave their fields `None`.

    Args:
        pred_score: fused score `(B,)`.
        pred_label: `pred_score > threshold` `(B,)` bool.
        logical_score: mean over masks of the per-mask histogram distance (`config.histogram_distance`) `(B,)`;
            with `config.logical_pose_step`, the lowest over the image's poses. With
            `config.logical_retrieval_neighbours`, the larger of `logical_predictor_score` and
            `logical_retrieval_score` standardised with the category's calibration.
        structural_score: HVQ-Trans image score `(B,)`.
        memory_bank_score: largest nearest-neighbour patch distance to the category's memory bank `(B,)`.
        global_score: Mahalanobis distance of the image's descriptor (`config.global_descriptor`) `(B,)`.
        anomaly_map: fused map of the fused branches that have one `(B, S, S)`.
        logical_map: each mask's discrepancy spread over the cells it hid `(B, S, S)` (at the best-fitting
            pose, moved back onto the image).
        structural_map: HVQ-Trans reconstruction map `(B, S, S)`.
        memory_bank_map: nearest-neighbour distances, upsampled and smoothed `(B, S, S)`.
        mask_scores: per-mask histogram distance `(B, M)` (at the best-fitting pose).
        masks: the masks used `(B, M, N)`.
        logical_pose_scores: the predictor's logical score at every pose `(B, 1 + 4)`, the image as it is first, then
            `config.logical_pose_moves`; None when `config.logical_pose_step` is 0.
        logical_predictor_score: the trained predictor's score `(B,)` (mean over masks, best pose), raw;
            None without retrieval.
        logical_retrieval_score: the retrieval's score `(B,)` (mean over its masks of the distance to the
            closest retrieved training image's hidden cells, best pose), raw; None without retrieval.
        predicted_histograms: `softmax` of the hist logits `(B, M, L, K)` (if requested).
        target_histograms: true code histograms of the masked cells `(B, M, L, K)` (if requested).
    """

    pred_score: torch.FloatTensor | None = None
    pred_label: torch.BoolTensor | None = None
    logical_score: torch.FloatTensor | None = None
    structural_score: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None
    logical_map: torch.FloatTensor | None = None
    structural_map: torch.FloatTensor | None = None
    mask_scores: torch.FloatTensor | None = None
    masks: torch.BoolTensor | None = None
    predicted_histograms: torch.FloatTensor | None = None
    target_histograms: torch.FloatTensor | None = None
    memory_bank_score: torch.FloatTensor | None = None
    memory_bank_map: torch.FloatTensor | None = None
    global_score: torch.FloatTensor | None = None
    logical_pose_scores: torch.FloatTensor | None = None
    logical_predictor_score: torch.FloatTensor | None = None
    logical_retrieval_score: torch.FloatTensor | None = None

    def branch_scores(self) -> dict[str, torch.Tensor]:
        """`{branch: raw score (B,)}` for every branch the detector computed."""
        return {name: getattr(self, f"{name}_score") for name in BRANCHES if getattr(self, f"{name}_score") is not None}

    def logical_components(self) -> dict[str, torch.Tensor]:
        """`{"logical_predictor": (B,), "logical_retrieval": (B,)}`, the raw scores the logical score combines
        when the detector retrieves (`config.logical_retrieval_neighbours`); empty otherwise."""
        return {name: getattr(self, f"{name}_score") for name in LOGICAL_COMPONENTS
                if getattr(self, f"{name}_score", None) is not None}

    def branch_maps(self) -> dict[str, torch.Tensor]:
        """`{branch: raw map (B, S, S)}` for every computed branch that has a map (the global one has none)."""
        return {name: getattr(self, f"{name}_map", None) for name in BRANCHES
                if getattr(self, f"{name}_map", None) is not None}


class LadmimBranchOutputs(NamedTuple):
    """What [`LadmimForAnomalyDetection.branch_outputs`] returns: raw (unstandardised) values.

    Args:
        scores: `{branch: (B,)}`; maps: `{branch: (B, S, S)}` (the global branch has none).
        mask_scores: per-mask histogram distance `(B, M)`.
        predicted_histograms, target_histograms: `(B, M, L, K)` when requested, else None.
        logical_pose_scores: the logical score at every pose `(B, P)` when `config.logical_pose_step` > 0.
        logical_components: `{"logical_predictor": (B,), "logical_retrieval": (B,)}` raw, with retrieval.
    """

    scores: dict[str, torch.Tensor]
    maps: dict[str, torch.Tensor]
    mask_scores: torch.Tensor
    predicted_histograms: torch.Tensor | None
    target_histograms: torch.Tensor | None
    logical_pose_scores: torch.Tensor | None = None
    logical_components: dict[str, torch.Tensor] | None = None


def _check_extra_input(name: str, value: torch.Tensor | None, expected: tuple | None, layout: str, unused: str,
                       needed: str) -> None:
    """Check an input that only some configs read (`moved_features`, `global_features`): refused when the config
    does not read it (`expected` None; `unused` says why), required when it does (`needed` says how), and of
    shape `expected` (`layout` names the axes)."""
    if expected is None:
        if value is not None:
            raise ValueError(f"{name} were given, but {unused}")
        return
    if value is None:
        raise ValueError(needed)
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} {layout}, got {tuple(value.shape)}")


class LadmimForAnomalyDetection(LadmimPreTrainedModel):
    """LADMIM: a class-switched tokenizer, one predictor per category, optional training-free
    branches, and calibrated fusion.

    `forward` scores images: the backbone and tokenizer run once per image (codes and structural
    map), all masks of all images go through the predictor in one batched forward, and the logical
    score is the mean over masks of the distance between predicted and true code histograms. With
    `config.memory_bank_size > 0` a PatchCore memory bank scores the same backbone features, and with
    `config.global_branch` a Mahalanobis distance of an image descriptor (`config.global_descriptor`);
    both are fitted on the training images (`fit_feature_branches`). With `config.logical_retrieval_neighbours`
    the logical branch also retrieves training images by their visible parts (`LadmimRetrieval`), and its score
    is the larger of the predictor's and the retrieval's z-scores. Each branch is standardised with the category's
    calibration statistics (normal validation images) and the branches in `config.fused_branches`
    are combined by `config.fusion_rule`.

    Example:
        ```python
        >>> from transformers import AutoModel, AutoImageProcessor
        >>> model = AutoModel.from_pretrained("org/ladmim-loco", trust_remote_code=True)
        >>> processor = AutoImageProcessor.from_pretrained("org/ladmim-loco", trust_remote_code=True)
        >>> out = model(**processor(images), category="breakfast_box", num_masks=10, seed=0)
        >>> out.pred_score, out.pred_label, out.anomaly_map.shape
        ```
    """

    config_class = LadmimConfig
    base_model_prefix = "ladmim"

    def __init__(self, config: LadmimConfig):
        super().__init__(config)
        self.tokenizer = LadmimTokenizerModel(config.tokenizer_config)
        names = ["shared"] if config.shared_predictor else config.categories
        self.predictors = nn.ModuleDict({name: LadmimPredictorModel(config.predictor_config) for name in names})
        cats, channels = len(config.categories), config.tokenizer_config.feature_channels
        self.memory_bank = None
        if config.memory_bank_size > 0:
            self.memory_bank = LadmimMemoryBank(cats, channels, config.memory_bank_size, config.memory_bank_neighbourhood,
                                                config.memory_bank_smoothing_sigma)
        self.global_branch = None
        if config.global_branch:
            self.global_branch = LadmimGlobalBranch(cats, channels, config.global_descriptor, config.global_parts)
        self.retrieval = None
        self.retrieval_parts = None  # the retrieval's own parts, when the global branch reads other features
        if config.logical_retrieval_neighbours:
            grid = config.tokenizer_config.grid_size
            self.retrieval = LadmimRetrieval(cats, grid * grid, config.global_parts, config.logical_retrieval_images,
                                             config.logical_retrieval_rank)
            if config.global_image_size is not None:
                self.retrieval_parts = LadmimGlobalBranch(cats, channels, "part_histogram", config.global_parts)
        # (start, stop) channel ranges of `config.predictor_taps` in the feature grid; None = every channel.
        # Plain numbers rather than a buffer: they follow from the config, and an exported graph slices.
        self.predictor_channel_ranges: list[tuple[int, int]] | None = None
        if config.predictor_taps is not None:
            backbone = self.tokenizer.backbone
            starts = [sum(backbone.tap_channels[:i]) for i in range(len(backbone.taps))]
            self.predictor_channel_ranges = [(start, start + width) for tap, start, width
                                             in zip(backbone.taps, starts, backbone.tap_channels)
                                             if tap in config.predictor_taps]
        self._warned_uncalibrated: set[str] = set()
        self.post_init()

    @property
    def categories(self) -> list[str]:
        return self.config.categories

    def predictor_for(self, category: str) -> LadmimPredictorModel:
        if category not in self.categories:
            raise ValueError(f"unknown category {category!r}; this model was trained on {self.categories}")
        return self.predictors["shared" if self.config.shared_predictor else category]

    def mask_generator(self, training: bool = False) -> BlockMaskGenerator:
        config = self.config
        return BlockMaskGenerator(
            config.tokenizer_config.grid_size,
            config.train_num_masked if training else config.score_num_masked,
            config.train_min_block if training else config.score_min_block,
            config.min_aspect,
            patch_size=config.predictor_config.patch_size,
        )

    def calibration_for(self, category: str) -> dict:
        """Calibration statistics of a category: `{branch}_mean` and `{branch}_std` of every enabled
        branch and the fused `threshold` (identity statistics if it was never calibrated)."""
        stats = self.config.calibration.get(category)
        if stats is None:
            if category not in self._warned_uncalibrated:
                logger.warning("category %r has no calibration statistics; scores are not standardised", category)
                self._warned_uncalibrated.add(category)
            stats = {"threshold": self.config.default_threshold}
            for branch in self.config.enabled_branches:
                stats.update({f"{branch}_mean": 0.0, f"{branch}_std": 1.0})
            return stats
        check_calibration(category, stats)  # also when it was set after loading
        missing = [b for b in self.config.fused_branches if f"{b}_mean" not in stats or f"{b}_std" not in stats]
        if missing:
            raise ValueError(f"config.calibration[{category!r}] has no statistics for the fused branches {missing}; "
                             "recalibrate the model (training stage 3) or remove them from config.fused_branches")
        return stats

    @property
    def retrieval_part_model(self) -> LadmimGlobalBranch | None:
        """Whose parts the retrieval assigns the tokenizer's cells to: the global branch's, or its own when
        the global branch reads features at `config.global_image_size`."""
        return self.retrieval_parts if self.retrieval_parts is not None else self.global_branch

    @torch.no_grad()
    def fit_feature_branches(self, features: torch.Tensor, category: str, seed: int = 0,
                             global_features: torch.Tensor | None = None) -> None:
        """Fit the memory-bank and global branches and the retrieval (those enabled) of one category from
        its training images' raw backbone features `(num_images, C, g, g)`; the global branch reads
        `global_features` (`extract_global_features`, `(num_images, C, g', g')`) instead, required with
        `config.global_image_size`."""
        class_id = int(self.tokenizer.category_ids(category, 1)[0])
        features = features.to(self.device)
        global_features = self.check_global_features(features, global_features).to(self.device)
        if self.memory_bank is not None:
            self.memory_bank.fit(features, class_id, seed=seed)
        if self.global_branch is not None:
            self.global_branch.fit(global_features, class_id, seed=seed)
        if self.retrieval is not None:
            parts = self.retrieval_part_model
            if self.retrieval_parts is not None:
                self.retrieval_parts.fit(features, class_id, seed=seed)
            ids = torch.full((len(features),), class_id, dtype=torch.long, device=features.device)
            self.retrieval.fit(parts.part_assignments(features, ids), parts.part_kernel(class_id), class_id)

    @torch.no_grad()
    def extract_global_features(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """Backbone features the global branch reads: `(B, 3, S, S)` resized to `config.global_image_size`
        -> `(B, C, g', g')` with `g' = config.global_grid_size`; None when it reads the tokenizer's features."""
        size = self.config.global_image_size
        if size is None:
            return None
        resized = F.interpolate(pixel_values, size=(size, size), mode="bilinear", align_corners=False,
                                antialias=size < pixel_values.shape[-1])
        return self.tokenizer.backbone(resized, grid_size=self.config.global_grid_size)

    def check_global_features(self, features: torch.Tensor, global_features: torch.Tensor | None) -> torch.Tensor:
        """The features the global branch reads: `global_features`, checked against
        `config.global_image_size`, or `features` when that is unset."""
        grid = self.config.global_grid_size
        _check_extra_input(
            "global_features", global_features,
            None if grid is None else (features.shape[0], features.shape[1], grid, grid), "(batch, C, g, g)",
            unused="config.global_image_size is unset: the global branch reads the tokenizer's features",
            needed=f"config.global_image_size is {self.config.global_image_size}, so the global branch reads its own "
                   "features: pass pixel_values, or global_features=model.extract_global_features(pixel_values) "
                   "beside features")
        return features if grid is None else global_features

    def predictor_inputs(self, features: torch.Tensor) -> torch.Tensor:
        """The feature channels the predictors read (`config.predictor_taps`): `(B, C, g, g)` -> `(B, C', g, g)`."""
        if self.predictor_channel_ranges is None:
            return features
        return torch.cat([features[:, start:stop] for start, stop in self.predictor_channel_ranges], dim=1)

    def extract_moved_features(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """Backbone features of the images moved by each of `config.logical_pose_moves` (the border
        repeated): `(B, 3, S, S)` -> `(B, 4, C, g, g)`; None when `config.logical_pose_step` is 0."""
        moves = self.config.logical_pose_moves
        if not moves:
            return None
        return torch.stack([self.tokenizer.extract_features(translate(pixel_values, dx, dy)) for dx, dy in moves], 1)

    def resolve_num_masks(self, num_masks: int | None) -> int:
        """The test-time masks per image: `num_masks`, or `config.num_masks` when it is None."""
        if num_masks is None:
            return self.config.num_masks
        if isinstance(num_masks, bool) or not isinstance(num_masks, numbers.Integral) or num_masks < 1:
            raise ValueError(f"num_masks must be a whole number >= 1 (None: config.num_masks), got {num_masks!r}")
        return int(num_masks)

    def branch_outputs(self, features: torch.Tensor, class_ids: torch.Tensor, masks: torch.Tensor,
                       groups: list[int] | None = None, return_histograms: bool = False,
                       max_sequences_per_chunk: int | None = None, predictor_dtype=None,
                       code_kernels: dict[int, torch.Tensor] | None = None,
                       moved_features: torch.Tensor | None = None,
                       global_features: torch.Tensor | None = None) -> "LadmimBranchOutputs":
        """Every enabled branch's raw score and map for raw backbone features, before standardisation.

        The one scoring path: `forward` calls it, and `ladmim export` traces it for one category
        (`groups=[id]`, precomputed `code_kernels`), so an exported graph computes what `forward` does.

        Args:
            features: raw backbone features `(B, C, g, g)`; class_ids: `(B,)`; masks: `(B, M, N)` bool.
            groups: the distinct values of `class_ids` (default: read from it).
            code_kernels: `{class id: tokenizer.code_kernel (L, K, K)}`, computed when missing.
            moved_features: `extract_moved_features` of the same images `(B, 4, C, g, g)`; required
                when `config.logical_pose_step` > 0 (the logical branch then scores every pose and
                keeps the lowest), refused otherwise.
            global_features: `extract_global_features` of the same images `(B, C, g', g')`; required when
                `config.global_image_size` is set (the global branch reads them), refused
                otherwise.
        """
        groups = class_ids.unique().tolist() if groups is None else list(groups)
        moves = self.check_moved_features(features, moved_features)
        global_features = self.check_global_features(features, global_features)
        poses = 1 + len(moves)
        batch = features.shape[0]
        tokens = self.tokenizer.tokenize(features=features, category=class_ids)
        pose_inputs, pose_codes, pose_class_ids, pose_masks = tokens["features"], tokens["codes"], class_ids, masks
        if moves:  # every pose of an image in consecutive rows, the image as it is first; codes only (no decoder)
            moved = moved_features.to(features).flatten(0, 1)
            moved_ids = class_ids.repeat_interleave(len(moves))
            standardized = self.tokenizer.standardize(moved)  # once: the predictor's input and the encoder's
            moved_inputs = standardized.view(batch, len(moves), *features.shape[1:])
            moved_codes = self.tokenizer.encode_standardized(standardized, moved_ids).view(batch, len(moves),
                                                                                              *pose_codes.shape[1:])
            pose_inputs = torch.cat([pose_inputs[:, None], moved_inputs], 1).flatten(0, 1)
            pose_codes = torch.cat([pose_codes[:, None], moved_codes], 1).flatten(0, 1)
            pose_class_ids, pose_masks = class_ids.repeat_interleave(poses), masks.repeat_interleave(poses, 0)
        code_kernels = code_kernels or {}

        def logical(cid: int, rows: torch.Tensor | None):
            def pick(t):
                return t if rows is None else t[rows]
            return self.logical_scores(pick(pose_inputs), pick(pose_codes), pick(pose_masks), self.categories[cid],
                                       return_histograms, max_sequences_per_chunk, predictor_dtype, code_kernels.get(cid))

        if len(groups) == 1:  # one category: no gather or scatter
            mask_scores, predicted_all, target_all = logical(groups[0], None)
        else:  # mixed-category batches: one predictor call per category present
            rows_total, num = pose_masks.shape[:2]
            mask_scores = torch.empty(rows_total, num, device=masks.device)
            levels, size = self.config.predictor_config.num_levels, self.config.predictor_config.codebook_size
            predicted_all = target_all = None
            if return_histograms:
                predicted_all = torch.empty(rows_total, num, levels, size, device=masks.device)
                target_all = torch.empty_like(predicted_all)
            for cid in groups:
                rows = torch.nonzero(pose_class_ids == cid).flatten()
                scores, predicted, target = logical(cid, rows)
                mask_scores[rows] = scores
                if return_histograms:
                    predicted_all[rows], target_all[rows] = predicted, target
        size_px = self.config.tokenizer_config.image_size
        logical_map = F.interpolate(self.logical_map(mask_scores, pose_masks)[:, None], size=(size_px, size_px),
                                    mode="bilinear", align_corners=True)[:, 0]
        pose_scores = None
        if moves:
            pose_scores = mask_scores.mean(1).view(batch, poses)
            best = pose_scores.argmin(1)  # the pose that fits the learned layout best

            def at_best(values: torch.Tensor) -> torch.Tensor:  # (B * P, ...) -> (B, ...) at each image's best pose
                values = values.view(batch, poses, *values.shape[1:])
                index = best.view(batch, 1, *(1,) * (values.dim() - 2)).expand(batch, 1, *values.shape[2:])
                return values.gather(1, index)[:, 0]

            # each pose's map moved back onto the image, so the map points at the image's own pixels
            pose_maps = logical_map.view(batch, poses, size_px, size_px)
            logical_map = at_best(torch.stack([pose_maps[:, 0]] + [translate(pose_maps[:, i + 1], -dx, -dy)
                                                                  for i, (dx, dy) in enumerate(moves)], 1).flatten(0, 1))
            mask_scores = at_best(mask_scores)
            if return_histograms:
                predicted_all, target_all = at_best(predicted_all), at_best(target_all)
        scores = {"logical": mask_scores.mean(1), "structural": tokens["structural_score"]}
        maps = {"logical": logical_map, "structural": tokens["structural_map"]}
        components = None
        if self.retrieval is not None and self.config.logical_retrieval_neighbours:  # 0 scores the predictor alone
            components = {"logical_predictor": scores["logical"],
                          "logical_retrieval": self.retrieval_scores(features, class_ids, groups, moved_features)}
            names = self.categories[groups[0]] if len(groups) == 1 else [self.categories[c] for c in class_ids.tolist()]
            z = self.standardized_scores(components, names)
            scores["logical"] = torch.maximum(z["logical_predictor"], z["logical_retrieval"])
        if self.memory_bank is not None:
            scores["memory_bank"], maps["memory_bank"] = self.memory_bank(features, class_ids, size_px, self.categories, groups)
        if self.global_branch is not None:
            scores["global"] = self.global_branch(global_features, class_ids, self.categories)
        return LadmimBranchOutputs(scores, maps, mask_scores, predicted_all, target_all, pose_scores, components)

    def retrieval_masks(self) -> torch.Tensor:
        """The retrieval's masks `(logical_retrieval_masks, N)` bool: one fixed set (seed 0), so every image
        and call is compared on the same regions; drawn from the config, not saved."""
        config = self.config
        grid = config.tokenizer_config.grid_size
        return BlockMaskGenerator(grid, config.logical_retrieval_num_masked, config.logical_retrieval_min_block,
                                  config.min_aspect)(1, config.logical_retrieval_masks, [0])[0]

    def retrieval_scores(self, features: torch.Tensor, class_ids: torch.Tensor, groups: list[int],
                         moved_features: torch.Tensor | None = None) -> torch.Tensor:
        """The retrieval's raw score `(B,)` of raw features `(B, C, g, g)`: the mean over
        `retrieval_masks` of `LadmimRetrieval`'s per-mask score, the lowest over the poses when
        `moved_features` `(B, 4, C, g, g)` are given (as the predictor's)."""
        batch, poses = features.shape[0], 1
        pose_features, pose_ids = features, class_ids
        if moved_features is not None:
            poses += moved_features.shape[1]
            pose_features = torch.cat([features[:, None], moved_features.to(features)], 1).flatten(0, 1)
            pose_ids = class_ids.repeat_interleave(poses)
        assignments = self.retrieval_part_model.part_assignments(pose_features, pose_ids)
        per_mask = self.retrieval(assignments, pose_ids, self.retrieval_masks().to(features.device),
                                  self.config.logical_retrieval_neighbours, self.categories, groups)
        return per_mask.mean(1).view(batch, poses).amin(1)

    def check_moved_features(self, features: torch.Tensor, moved_features: torch.Tensor | None) -> list[tuple[int, int]]:
        """`config.logical_pose_moves`, after checking that `moved_features` fits them and `features`."""
        moves = self.config.logical_pose_moves
        _check_extra_input(
            "moved_features", moved_features,
            (features.shape[0], len(moves), *features.shape[1:]) if moves else None, "(batch, moves, C, g, g)",
            unused="config.logical_pose_step is 0: the logical branch scores only the image as it is",
            needed=f"config.logical_pose_step is {self.config.logical_pose_step}, so the logical branch also scores each "
                   "image moved: pass pixel_values, or moved_features=model.extract_moved_features(pixel_values) "
                   "beside features")
        return moves

    def standardized_scores(self, scores: dict[str, torch.Tensor], categories: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """z-scores `{branch: (B,)}` of raw branch scores `{branch: (B,)}` with the calibration statistics
        (`{branch}_mean`, `{branch}_std`) of each image's category (`categories`: one name per image, or
        one name for the whole batch)."""
        return self._standardized(scores, categories, "")

    def standardized_maps(self, maps: dict[str, torch.Tensor], categories: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """z-maps `{branch: (B, S, S)}` of raw branch maps, standardised with the mean and std of the branch
        maps' pixels on the validation images (`{branch}_map_mean`, `{branch}_map_std`). A map lies on
        another scale than its image score (the memory bank's score is its map's maximum), so the score
        statistics would hand the fused map to whichever branch's map sits nearest its score; models
        calibrated before these statistics existed fall back to the score statistics."""
        return self._standardized(maps, categories, "_map")

    def _standardized(self, values_by_branch: dict[str, torch.Tensor], categories: str | Sequence[str],
                      kind: str) -> dict[str, torch.Tensor]:
        def statistic(stats: dict, branch: str, name: str, default: float) -> float:
            return float(stats.get(f"{branch}{kind}_{name}", stats.get(f"{branch}_{name}", default)))

        if isinstance(categories, str):  # plain numbers, so an exported graph holds them as constants
            stats = self.calibration_for(categories)
            return {branch: (values - statistic(stats, branch, "mean", 0.0)) / max(statistic(stats, branch, "std", 1.0), 1e-12)
                    for branch, values in values_by_branch.items()}
        by_category = {c: self.calibration_for(c) for c in dict.fromkeys(categories)}  # checked once per category
        stats = [by_category[c] for c in categories]
        out = {}
        for branch, values in values_by_branch.items():
            shape = (-1,) + (1,) * (values.dim() - 1)
            mean = torch.tensor([statistic(s, branch, "mean", 0.0) for s in stats], device=values.device).view(shape)
            std = torch.tensor([statistic(s, branch, "std", 1.0) for s in stats], device=values.device).view(shape)
            out[branch] = (values - mean) / std.clamp(min=1e-12)
        return out

    def fuse_branches(self, z_scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Combine standardised branches `{branch: (B, ...)}` that are in `config.fused_branches` by
        `config.fusion_rule` (branches absent from `z_scores`, e.g. the global one for maps, are skipped)."""
        present = [z_scores[b] for b in self.config.fused_branches if b in z_scores]
        if not present:
            raise ValueError(f"none of the fused branches {self.config.fused_branches} was given")
        return fuse(torch.stack(present, -1), self.config.fusion_rule)

    def logical_scores(self, features: torch.Tensor, codes: torch.Tensor, masks: torch.Tensor, category: str,
                       return_histograms: bool = False, max_sequences_per_chunk: int | None = None,
                       predictor_dtype=None, code_kernel: torch.Tensor | None = None):
        """Per-mask distances `(B, M)` between predicted and true histograms (`config.histogram_distance`), for one category.

        Args:
            features: `(B, C, g, g)`; codes: `(B, L, N)`; masks: `(B, M, N)` bool.
            predictor_dtype: run the predictor under `torch.autocast` with this dtype (see `forward`).
            code_kernel: the category's `tokenizer.code_kernel` `(L, K, K)` for `"codebook_mmd"`, if
                already computed (`ladmim export` holds it as a constant).
        """
        predictor = self.predictor_for(category)
        if max_sequences_per_chunk is None:  # memory follows the budget, not the number of masks
            max_sequences_per_chunk = max(1, self.config.scoring_memory_mb * 2**20 // predictor.inference_bytes_per_sequence())
        dtype = _autocast_dtype(predictor_dtype)
        with torch.autocast(features.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = predictor(self.predictor_inputs(features), masks, max_sequences_per_chunk=max_sequences_per_chunk).logits
        predicted = logits.float().softmax(-1)
        target = code_histograms(codes, masks, self.config.predictor_config.codebook_size)
        if self.config.histogram_distance == "codebook_mmd":
            kernel = self.tokenizer.code_kernel(category, self.config.kernel_bandwidth) if code_kernel is None else code_kernel
            kernel = kernel.to(predicted.device)
            mask_scores = kernel_histogram_distance(predicted - target, kernel)
        else:
            mask_scores = (predicted - target).abs().sum((-1, -2))
        if return_histograms:
            return mask_scores, predicted, target
        return mask_scores, None, None

    def logical_map(self, mask_scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Spread each mask's discrepancy over the cells it hid: the mean score of the masks covering
        each cell `(B, g, g)` (cells no mask covered get the image's mean score)."""
        weights = masks.to(mask_scores.dtype)
        covered = weights.sum(1)
        summed = torch.einsum("bm,bmn->bn", mask_scores, weights)
        mean = mask_scores.mean(1, keepdim=True).expand_as(summed)
        cell_map = torch.where(covered > 0, summed / covered.clamp(min=1), mean)
        g = self.config.tokenizer_config.grid_size
        return cell_map.view(-1, g, g)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor | None = None, category=None, num_masks: int | None = None,
                seed=0, bool_masked_pos: torch.Tensor | None = None, features: torch.Tensor | None = None,
                threshold: float | None = None, return_histograms: bool = False,
                max_sequences_per_chunk: int | None = None, predictor_dtype=None,
                moved_features: torch.Tensor | None = None,
                global_features: torch.Tensor | None = None) -> LadmimAnomalyOutput:
        """Score images.

        Args:
            pixel_values: `(B, 3, S, S)` from [`LadmimImageProcessor`] (or give `features`).
            category: a category name for the whole batch, or one name/id per image.
            num_masks: test-time masks per image (default `config.num_masks`).
            seed: an int (default 0) scores every image with the same mask set, drawn from that seed,
                so an image's score does not depend on the batch, its position in it or the entry
                point, and images of a category are scored alike; a list gives one seed per image;
                `None` draws fresh masks.
            bool_masked_pos: explicit masks `(B, M, N)`; overrides `num_masks` and `seed`.
            features: precomputed raw backbone features `(B, C, g, g)` (`tokenizer.extract_features`).
            threshold: decision threshold on the fused score (default: the category's calibrated one).
                Refused unless it is a finite number.
            return_histograms: also return predicted and true histograms `(B, M, L, K)`.
            max_sequences_per_chunk: (image, mask) sequences per predictor call (default: as many as
                `config.scoring_memory_mb` holds).
            predictor_dtype: `"bf16"`/`"fp16"` (or a torch dtype) runs the predictor, most of the cost,
                under `torch.autocast`; the tokenizer, its codes and the histograms stay float32. On a
                CPU with AVX512-BF16, bf16 scores 1.5x faster at paper size (`benchmarks/scoring.py
                --bf16`); on a trained synthloco model logical scores moved by at most 1e-3 and the
                AUROC did not change. `None`: float32.
            moved_features: with `features` and `config.logical_pose_step` > 0, the features of the
                moved images `(B, 4, C, g, g)` (`extract_moved_features`); computed from
                `pixel_values` when those are given instead.
            global_features: with `features` and `config.global_image_size` set, the global branch's
                features `(B, C, g', g')` (`extract_global_features`); computed from
                `pixel_values` when those are given instead.
        """
        with _eval_mode(self):
            if category is None:
                if len(self.categories) != 1:
                    raise ValueError(f"pass category= (one of {self.categories})")
                category = self.categories[0]
            num_masks = self.resolve_num_masks(num_masks)
            if features is None:
                if pixel_values is None:
                    raise ValueError("pass pixel_values or features")
                features = self.tokenizer.extract_features(pixel_values)
            if moved_features is None and pixel_values is not None:
                moved_features = self.extract_moved_features(pixel_values)
            if global_features is None and pixel_values is not None:
                global_features = self.extract_global_features(pixel_values)
            batch = features.shape[0]
            class_ids = self.tokenizer.category_ids(category, batch)
            if bool_masked_pos is None:
                if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
                    # one mask set, drawn once and shared by every image
                    masks = self.mask_generator()(1, num_masks, [int(seed)]).repeat(batch, 1, 1)
                else:
                    masks = self.mask_generator()(batch, num_masks, seed)
                masks = masks.to(features.device)
            else:
                masks = bool_masked_pos.to(device=features.device, dtype=torch.bool)
                if masks.dim() == 2:
                    masks = masks[:, None]
            raw = self.branch_outputs(features, class_ids, masks, None, return_histograms, max_sequences_per_chunk,
                                      predictor_dtype, moved_features=moved_features, global_features=global_features)
            scores, maps = raw.scores, raw.maps
            for branch, values in scores.items():
                bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
                if bad:  # never a verdict from a non-number
                    raise ValueError(f"the {branch} score is not finite (NaN or inf) for image(s) {bad} of the batch: "
                                     "the input or the model's weights hold non-finite values")
            names = [self.categories[c] for c in class_ids.tolist()]
            pred_score = self.fuse_branches(self.standardized_scores(scores, names))
            # Maps are standardised with their own pixel statistics (`standardized_maps`), so the branch
            # maps are on one scale before a max-type rule picks between them.
            anomaly_map = self.fuse_branches(self.standardized_maps(maps, names))
            if threshold is not None:
                threshold = float(threshold)
                if not math.isfinite(threshold):
                    raise ValueError(f"threshold must be a finite number, got {threshold}")
                thresholds = torch.full_like(pred_score, threshold)
            else:
                by_category = {c: float(self.calibration_for(c)["threshold"]) for c in dict.fromkeys(names)}
                thresholds = torch.tensor([by_category[c] for c in names], device=masks.device)
            return LadmimAnomalyOutput(
                pred_score=pred_score, pred_label=pred_score > thresholds, logical_score=scores["logical"],
                structural_score=scores["structural"], anomaly_map=anomaly_map, logical_map=maps["logical"],
                structural_map=maps["structural"], mask_scores=raw.mask_scores, masks=masks,
                predicted_histograms=raw.predicted_histograms, target_histograms=raw.target_histograms,
                memory_bank_score=scores.get("memory_bank"), memory_bank_map=maps.get("memory_bank"),
                global_score=scores.get("global"), logical_pose_scores=raw.logical_pose_scores,
                **{f"{name}_score": value for name, value in (raw.logical_components or {}).items()},
            )


__all__ = ["LadmimAnomalyOutput", "LadmimBranchOutputs", "LadmimForAnomalyDetection"]
