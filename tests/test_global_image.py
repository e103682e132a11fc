"""The global branch on a larger image (`config.global_image_size`): against a detector whose tokenizer
itself runs at that size, the other branches and the retrieval untouched, the inputs it refuses, a
save/load round trip and the scoring helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import fitted_branch_model, tiny_config

from ladmim_hf import LadmimForAnomalyDetection
from ladmim_hf.models.image_processing_ladmim import LadmimImageProcessor
from ladmim_hf.scoring import extract_scoring_features
from test_retrieval import RETRIEVAL

BRANCHES = dict(memory_bank_size=8, global_branch=True, global_descriptor="part_histogram", global_parts=8)


def _pixels(count: int, seed: int, size: int = 64) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_config_derives_the_grid_and_refuses_sizes_off_the_cell():
    config = tiny_config(global_branch=True, global_image_size=128)  # 64 px on a 4 x 4 grid: 16 px cells
    assert config.global_grid_size == 8 and tiny_config().global_grid_size is None
    for bad in (120, 16, True, 128.0):
        with pytest.raises(ValueError, match="global_image_size must be a whole multiple of the cell size"):
            tiny_config(global_branch=True, global_image_size=bad)
    with pytest.raises(ValueError, match="global_image_size sets the global branch's image: set global_branch: true"):
        tiny_config(global_image_size=128)


def test_global_branch_equals_a_detector_whose_tokenizer_reads_the_larger_image():
    model = fitted_branch_model(**BRANCHES, global_image_size=128)
    plain = fitted_branch_model(**BRANCHES)  # the memory bank reads the tokenizer's features, as without
    reference = fitted_branch_model(**BRANCHES, tokenizer={"image_size": 128, "grid_size": 8})
    train = F.interpolate(_pixels(6, 8), size=(128, 128), mode="bilinear", align_corners=False)
    for category in reference.categories:  # the fixture fitted it on 128 px noise; refit on the enlarged images
        reference.fit_feature_branches(reference.tokenizer.extract_features(train), category, seed=0)
    pixels = _pixels(3, 9)
    out = model(pixel_values=pixels, category="pushpins", num_masks=2)
    expected = reference(pixel_values=F.interpolate(pixels, size=(128, 128), mode="bilinear", align_corners=False),
                         category="pushpins", num_masks=2)
    torch.testing.assert_close(out.global_score, expected.global_score, atol=1e-4, rtol=1e-4)
    unchanged = plain(pixel_values=pixels, category="pushpins", num_masks=2)
    torch.testing.assert_close(out.memory_bank_score, unchanged.memory_bank_score)
    torch.testing.assert_close(out.memory_bank_map, unchanged.memory_bank_map)
    assert model.extract_global_features(pixels).shape == (3, 64, 8, 8)


def test_logical_branch_and_retrieval_do_not_change():
    plain = fitted_branch_model(**{**BRANCHES, **RETRIEVAL})
    larger = fitted_branch_model(**{**BRANCHES, **RETRIEVAL}, global_image_size=128)
    larger.load_state_dict(plain.state_dict(), strict=False)  # the same tokenizer, predictors and retrieval
    assert larger.retrieval_parts is not None and plain.retrieval_parts is None
    images = _pixels(6, 8)
    features = larger.tokenizer.extract_features(images)
    for category in larger.categories:  # the retrieval's own parts: as the plain global branch's, same features
        larger.fit_feature_branches(features, category, seed=0, global_features=larger.extract_global_features(images))
    torch.testing.assert_close(larger.retrieval_parts.part_centres, plain.global_branch.part_centres)
    pixels = _pixels(3, 10)
    out, expected = (m(pixel_values=pixels, category="pushpins", num_masks=2) for m in (larger, plain))
    torch.testing.assert_close(out.logical_predictor_score, expected.logical_predictor_score)
    torch.testing.assert_close(out.logical_retrieval_score, expected.logical_retrieval_score)
    torch.testing.assert_close(out.structural_score, expected.structural_score)
    torch.testing.assert_close(out.memory_bank_score, expected.memory_bank_score)
    assert not torch.allclose(out.global_score, expected.global_score)


def test_features_without_global_features_are_refused_with_the_fix():
    model = fitted_branch_model(**BRANCHES, global_image_size=128)
    pixels = _pixels(2, 11)
    features = model.tokenizer.extract_features(pixels)
    with pytest.raises(ValueError, match="pass pixel_values, or global_features=model.extract_global_features"):
        model(features=features, category="pushpins", num_masks=2)
    with pytest.raises(ValueError, match=r"global_features must have shape \(2, 64, 8, 8\)"):
        model(features=features, global_features=features, category="pushpins", num_masks=2)
    plain = fitted_branch_model(**BRANCHES)
    with pytest.raises(ValueError, match="config.global_image_size is unset"):
        plain(features=features, global_features=features, category="pushpins", num_masks=2)
    given = model(features=features, global_features=model.extract_global_features(pixels), category="pushpins",
                  num_masks=2)
    torch.testing.assert_close(given.pred_score, model(pixel_values=pixels, category="pushpins", num_masks=2).pred_score)


def test_larger_global_image_survives_a_save_and_load(tmp_path):
    model = fitted_branch_model(**{**BRANCHES, **RETRIEVAL}, global_image_size=128)
    model.save_pretrained(tmp_path)
    loaded = LadmimForAnomalyDetection.from_pretrained(tmp_path).eval()
    assert loaded.config.global_image_size == 128
    pixels = _pixels(2, 12)
    out, expected = (m(pixel_values=pixels, category="pushpins", num_masks=2) for m in (loaded, model))
    torch.testing.assert_close(out.pred_score, expected.pred_score)
    torch.testing.assert_close(out.logical_retrieval_score, expected.logical_retrieval_score)


def test_scoring_features_carry_the_global_features(tmp_path):
    from PIL import Image

    model = fitted_branch_model(**BRANCHES, global_image_size=128)
    paths = []
    for index in range(3):
        path = tmp_path / f"{index}.png"
        Image.fromarray((torch.rand(40, 50, 3, generator=torch.Generator().manual_seed(index)) * 255).byte().numpy()).save(path)
        paths.append(str(path))
    processor = LadmimImageProcessor(size=64)
    found = extract_scoring_features(model, processor, paths, 2, "test", disable=True)
    pixels = processor(paths)["pixel_values"]
    assert found.moved is None
    torch.testing.assert_close(found.global_features, model.extract_global_features(pixels))
    torch.testing.assert_close(found.features, model.tokenizer.extract_features(pixels))
