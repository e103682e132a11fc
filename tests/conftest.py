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


@pytest.fixture
def tiny_model():
    from ladmim_hf import LadmimForAnomalyDetection

    torch.manual_seed(0)
    return LadmimForAnomalyDetection(tiny_config()).eval()


@pytest.fixture
def pixel_values():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(3, 3, 64, 64, generator=generator)
