"""The logical branch at moved poses (`config.logical_pose_step`): against the slow reference of scoring
each moved image alone, through every entry point (pixels, cached features, scoring, calibration), and
the refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import fitted_branch_model, tiny_config

from ladmim_hf import LadmimConfig, LadmimForAnomalyDetection
from ladmim_hf.models.modeling_ladmim_utils import translate

STEP = 5


def _images(count: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _scored_one_pose_at_a_time(model, pixel_values, category, **kwargs):
    """The reference: every pose scored as its own image by the same model with poses switched off."""
    moves = [(0, 0), *model.config.logical_pose_moves]
    step, model.config.logical_pose_step = model.config.logical_pose_step, 0
    try:
        return moves, [model(pixel_values=translate(pixel_values, dx, dy), category=category, **kwargs) for dx, dy in moves]
    finally:
        model.config.logical_pose_step = step


def test_translate_by_hand():
    image = torch.arange(12.0).view(1, 1, 3, 4)  # rows [0 1 2 3], [4 5 6 7], [8 9 10 11]
    right_up = torch.tensor([[4.0, 4, 5, 6], [8, 8, 9, 10], [8, 8, 9, 10]])  # 1 right, 1 up: border repeated
    assert torch.equal(translate(image, 1, -1)[0, 0], right_up)
    left_down = torch.tensor([[2.0, 3, 3, 3], [2, 3, 3, 3], [6, 7, 7, 7]])  # 2 left, 1 down
    assert torch.equal(translate(image, -2, 1)[0, 0], left_down)
    assert torch.equal(translate(image, 0, 0), image)
    assert torch.equal(translate(image[0], 1, -1)[0], right_up)  # maps (B, H, W) move alike


def test_pose_moves_follow_the_step():
    assert tiny_config().logical_pose_moves == []
    assert tiny_config(logical_pose_step=3).logical_pose_moves == [(3, 0), (-3, 0), (0, 3), (0, -3)]


@pytest.mark.parametrize("bad", [-1, 32, 2.5, True, "6"])
def test_config_refuses_bad_steps(bad):
    with pytest.raises(ValueError, match="logical_pose_step must be a whole number of pixels in 0..31"):
        tiny_config(logical_pose_step=bad)


def test_step_survives_a_save_and_load(tmp_path):
    model = fitted_branch_model(logical_pose_step=STEP)
    model.save_pretrained(tmp_path)
    loaded = LadmimForAnomalyDetection.from_pretrained(tmp_path).eval()
    assert loaded.config.logical_pose_step == STEP
    pixels = _images()
    torch.testing.assert_close(loaded(pixels, category="pushpins", num_masks=2).logical_pose_scores,
                               model(pixels, category="pushpins", num_masks=2).logical_pose_scores)


def test_lowest_pose_equals_scoring_each_moved_image_alone():
    """Score = the lowest of the five poses' scores; that pose's masks, histograms and map (moved back
    onto the image); every other branch from the image as it is; the fused score from those."""
    model = fitted_branch_model(logical_pose_step=STEP, fusion_rule="sum")
    pixels = _images()
    out = model(pixel_values=pixels, category="pushpins", num_masks=3, seed=0, return_histograms=True)
    moves, reference = _scored_one_pose_at_a_time(model, pixels, "pushpins", num_masks=3, seed=0, return_histograms=True)
    pose_scores = torch.stack([r.logical_score for r in reference], 1)
    torch.testing.assert_close(out.logical_pose_scores, pose_scores)
    torch.testing.assert_close(out.logical_score, pose_scores.amin(1))
    best = pose_scores.argmin(1)
    assert len(set(best.tolist())) > 1, "the random images should not all fit best at one pose"
    for i, pose in enumerate(best.tolist()):
        dx, dy = moves[pose]
        torch.testing.assert_close(out.logical_map[i], translate(reference[pose].logical_map[i], -dx, -dy))
        torch.testing.assert_close(out.mask_scores[i], reference[pose].mask_scores[i])
        torch.testing.assert_close(out.predicted_histograms[i], reference[pose].predicted_histograms[i])
        torch.testing.assert_close(out.target_histograms[i], reference[pose].target_histograms[i])
    for name in ("structural_score", "structural_map", "memory_bank_score", "memory_bank_map", "global_score"):
        torch.testing.assert_close(getattr(out, name), getattr(reference[0], name))
    z = model.standardized_scores(out.branch_scores(), "pushpins")
    torch.testing.assert_close(out.pred_score, sum(z[b] for b in model.config.fused_branches))
    assert reference[0].logical_pose_scores is None  # poses off: no pose scores


def test_cached_features_score_like_pixels_and_are_checked():
    from ladmim_hf.calibration import calibrate_category
    from ladmim_hf.scoring import branch_scores

    model = fitted_branch_model(logical_pose_step=STEP)
    pixels = _images(4)
    expected = model(pixel_values=pixels, category="pushpins", num_masks=2, seed=1)
    with torch.no_grad():
        features, moved = model.tokenizer.extract_features(pixels), model.extract_moved_features(pixels)
    assert moved.shape == (4, 4, *features.shape[1:])
    out = model(features=features, moved_features=moved, category="pushpins", num_masks=2, seed=1)
    torch.testing.assert_close(out.pred_score, expected.pred_score)
    torch.testing.assert_close(out.logical_map, expected.logical_map)
    scores = branch_scores(model, features, "pushpins", 2, seed=1, batch_size=3, moved_features=moved)
    torch.testing.assert_close(scores["logical"], expected.logical_score)
    stats = calibrate_category(model, features, "pushpins", 2, 1, 0.05, moved)
    assert stats["logical_mean"] == pytest.approx(float(expected.logical_score.mean()), rel=1e-5)

    with pytest.raises(ValueError, match="logical_pose_step is 5.*moved_features=model.extract_moved_features"):
        model(features=features, category="pushpins", num_masks=2)
    with pytest.raises(ValueError, match=r"moved_features must have shape \(4, 4,"):
        model(features=features, moved_features=moved[:, :2], category="pushpins", num_masks=2)
    model.config.logical_pose_step = 0
    with pytest.raises(ValueError, match="moved_features were given, but config.logical_pose_step is 0"):
        model(features=features, moved_features=moved, category="pushpins", num_masks=2)
    assert model.extract_moved_features(pixels) is None


def test_mixed_category_batches_score_like_one_category_at_a_time():
    model = fitted_branch_model(logical_pose_step=STEP)
    pixels = _images(4)
    names = ["pushpins", "breakfast_box", "pushpins", "breakfast_box"]
    mixed = model(pixel_values=pixels, category=names, num_masks=2, seed=0)
    for category in ("pushpins", "breakfast_box"):
        rows = [i for i, name in enumerate(names) if name == category]
        alone = model(pixel_values=pixels[rows], category=category, num_masks=2, seed=0)
        torch.testing.assert_close(mixed.logical_pose_scores[rows], alone.logical_pose_scores)
        torch.testing.assert_close(mixed.logical_map[rows], alone.logical_map)
        torch.testing.assert_close(mixed.pred_score[rows], alone.pred_score)


def test_moved_features_of_files_equal_the_models_own(tmp_path):
    from PIL import Image

    from ladmim_hf import LadmimImageProcessor
    from ladmim_hf.scoring import extract_features, extract_moved_features, extract_scoring_features

    model = fitted_branch_model(logical_pose_step=STEP)
    processor = LadmimImageProcessor(size=64)
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray((torch.rand(40, 50, 3, generator=torch.Generator().manual_seed(i)) * 255).byte().numpy()).save(paths[-1])
    moved = extract_moved_features(model, processor, paths, batch_size=2, description="test", disable=True)
    with torch.no_grad():
        expected = model.extract_moved_features(processor(paths)["pixel_values"])
    torch.testing.assert_close(moved, expected)
    features, moved_too, global_features = extract_scoring_features(model, processor, paths, 2, "test", True)  # read once
    torch.testing.assert_close(features, extract_features(model.tokenizer, processor, paths, 2, "test", True))
    torch.testing.assert_close(moved_too, expected)
    assert global_features is None  # the global branch reads the tokenizer's features
    model.config.logical_pose_step = 0
    assert extract_moved_features(model, processor, paths, 2, "test", True) is None
    assert extract_scoring_features(model, processor, paths, 2, "test", True).moved is None


def test_paper_config_scores_the_image_as_it_is():
    import yaml

    from ladmim_hf.training.settings import BUILTIN_CONFIGS

    paper = yaml.safe_load((BUILTIN_CONFIGS / "loco-paper.yaml").read_text())
    assert paper["model"].get("logical_pose_step", 0) == 0
    assert LadmimConfig().logical_pose_step == 0
