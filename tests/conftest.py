"""Shared fixtures: tiny configs (CPU, seconds), fixed seeds, quiet third-party logging."""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

TINY_CATEGORIES = ["breakfast_box", "pushpins"]


def tiny_tokenizer_kwargs(**overrides) -> dict:
    """A tokenizer small enough for unit tests: 64 px input, 4x4 grid, width 32, 16 codes."""
    kwargs = dict(
        backbone="efficientnet_lite0", backbone_taps=[2, 4], feature_channels=64, image_size=64, grid_size=4,
        categories=list(TINY_CATEGORIES), hidden_size=32, num_encoder_layers=2, num_decoder_layers=2,
        num_attention_heads=4, intermediate_size=64, num_levels=2, codebook_size=16, score_filter_size=8,
    )
    kwargs.update(overrides)
    return kwargs


def tiny_predictor_kwargs(**overrides) -> dict:
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0)
    kwargs.update(overrides)
    return kwargs


def tiny_config(**overrides):
    from ladmim_hf import LadmimConfig

    return LadmimConfig(
        tokenizer_config=tiny_tokenizer_kwargs(**overrides.pop("tokenizer", {})),
        predictor_config=tiny_predictor_kwargs(**overrides.pop("predictor", {})),
        **overrides,
    )


# Calibration of every branch, for models with the optional branches (`fitted_branch_model`).
BRANCH_STATS = {"logical_mean": 0.1, "logical_std": 2.0, "structural_mean": 0.0, "structural_std": 1.0,
                "memory_bank_mean": 1.0, "memory_bank_std": 0.5, "global_mean": 3.0, "global_std": 4.0,
                "threshold": 1.0}


def fitted_branch_model(**overrides):
    """A tiny detector with every branch (memory bank of 8 patches, global branch; fusion "max" unless
    overridden), both fitted on 6 random images' features and calibrated with BRANCH_STATS for every category.

    The backbone gets its ImageNet weights: a randomly initialised one gives features of ~1e-9, which the
    fp16 memory bank stores as zeros, so every memory-bank score would be ~0 and prove nothing."""
    from ladmim_hf import LadmimForAnomalyDetection

    torch.manual_seed(0)
    kwargs = dict(memory_bank_size=8, global_branch=True, fusion_rule="max")
    model = LadmimForAnomalyDetection(tiny_config(**{**kwargs, **overrides})).eval()
    model.tokenizer.backbone.load_imagenet_weights()
    images = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        features = model.tokenizer.extract_features(images)
    for category in model.categories:
        model.fit_feature_branches(features, category, seed=0, global_features=model.extract_global_features(images))
    model.config.calibration = {c: dict(BRANCH_STATS) for c in model.categories}
    return model


@pytest.fixture
def tiny_model():
    from ladmim_hf import LadmimForAnomalyDetection

    torch.manual_seed(0)
    return LadmimForAnomalyDetection(tiny_config()).eval()


@pytest.fixture
def pixel_values():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 64, 64, generator=generator)
