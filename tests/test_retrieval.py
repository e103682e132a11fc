"""Retrieval beside the trained predictor (`config.logical_retrieval_neighbours`): the module against a slow
reference written with the kernel distance itself, the logical score's combination, poses, calibration,
the config's refusals and a save/load round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import fitted_branch_model, tiny_config

from ladmim_hf import LadmimForAnomalyDetection
from ladmim_hf.calibration import calibrate_category
from ladmim_hf.models.branches_ladmim import LadmimRetrieval
from ladmim_hf.models.modeling_ladmim_utils import translate

RETRIEVAL = dict(global_descriptor="part_histogram", global_parts=8, logical_retrieval_neighbours=2,
                 logical_retrieval_rank=8, logical_retrieval_images=8, logical_retrieval_masks=6,
                 logical_retrieval_num_masked=4, logical_retrieval_min_block=2)


def _assignments(count: int, cells: int, parts: int, seed: int) -> torch.Tensor:
    logits = torch.randn(count, cells, parts, generator=torch.Generator().manual_seed(seed))
    return torch.softmax(2.0 * logits, -1)


def _kernel(parts: int, seed: int = 0) -> torch.Tensor:
    centres = torch.randn(parts, 3, generator=torch.Generator().manual_seed(seed))
    squared = torch.cdist(centres, centres) ** 2
    return torch.exp(-squared / squared[squared > 0].median())


def _reference(test: torch.Tensor, train: torch.Tensor, masks: torch.Tensor, kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Per-mask scores `(B, M)`, one image, mask and training image at a time, with kernel distances between
    part histograms: the k training images closest in their visible cells, the closest of them in the hidden ones."""
    def distance(a, b):
        difference = (a - b).double()
        return float(difference @ kernel.double() @ difference) ** 0.5

    scores = torch.empty(len(test), len(masks))
    for b in range(len(test)):
        for m, hidden in enumerate(masks):
            visible_distances = [distance(test[b][~hidden].mean(0), image[~hidden].mean(0)) for image in train]
            chosen = sorted(range(len(train)), key=visible_distances.__getitem__)[:k]
            scores[b, m] = min(distance(test[b][hidden].mean(0), train[t][hidden].mean(0)) for t in chosen)
    return scores


def test_retrieval_matches_the_kernel_distance_reference():
    cells, parts, k = 16, 6, 3
    train, test = _assignments(7, cells, parts, 1), _assignments(3, cells, parts, 2)
    masks = torch.rand(5, cells, generator=torch.Generator().manual_seed(3)) < 0.3
    masks[:, 0], masks[:, 1] = True, False  # every mask hides a cell and shows one
    kernel = _kernel(parts)
    retrieval = LadmimRetrieval(1, cells, parts, images=10, rank=parts)  # full rank: exact, 3 padded rows
    retrieval.fit(train, kernel, 0)
    projection = retrieval.projection[0]
    torch.testing.assert_close(projection @ projection.T, kernel, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(retrieval.cells[0, :7].float(), train @ projection, atol=2e-3, rtol=2e-3)
    assert int(retrieval.count[0]) == 7 and not retrieval.cells[0, 7:].any()
    scores = retrieval(test, torch.zeros(3, dtype=torch.long), masks, k, ["only"])
    torch.testing.assert_close(scores, _reference(test, train, masks, kernel, k), atol=3e-3, rtol=3e-3)
    # more neighbours than real images: the padded rows are never retrieved
    torch.testing.assert_close(retrieval(test, torch.zeros(3, dtype=torch.long), masks, 9, ["only"]),
                               _reference(test, train, masks, kernel, 7), atol=3e-3, rtol=3e-3)


def test_more_training_images_than_the_bank_keep_an_evenly_spaced_subset():
    train = _assignments(10, 4, 3, 4)
    retrieval = LadmimRetrieval(2, 4, 3, images=4, rank=2)
    retrieval.fit(train, _kernel(3), 1)
    assert int(retrieval.count[1]) == 4 and int(retrieval.count[0]) == 0
    torch.testing.assert_close(retrieval.cells[1].float(), train[[0, 3, 6, 9]] @ retrieval.projection[1],
                               atol=2e-3, rtol=2e-3)


def test_mixed_categories_score_as_each_alone():
    cells, parts = 9, 5
    retrieval = LadmimRetrieval(2, cells, parts, images=6, rank=3)
    for cid in (0, 1):
        retrieval.fit(_assignments(5 + cid, cells, parts, 10 + cid), _kernel(parts, cid), cid)
    test = _assignments(4, cells, parts, 20)
    masks = torch.zeros(3, cells, dtype=torch.bool)
    masks[0, :3], masks[1, 3:6], masks[2, [0, 4, 8]] = True, True, True
    ids = torch.tensor([1, 0, 0, 1])
    mixed = retrieval(test, ids, masks, 2, ["a", "b"])
    for cid in (0, 1):
        rows = ids == cid
        torch.testing.assert_close(mixed[rows], retrieval(test[rows], ids[rows], masks, 2, ["a", "b"]))


def _model(**overrides) -> LadmimForAnomalyDetection:
    return fitted_branch_model(**{**RETRIEVAL, **overrides})


def test_logical_score_is_the_larger_z_of_predictor_and_retrieval():
    model = _model()
    stats = model.config.calibration["pushpins"]
    stats.update(logical_predictor_mean=0.5, logical_predictor_std=0.25, logical_retrieval_mean=0.01, logical_retrieval_std=0.002)
    out = model(pixel_values=torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5)),
                category="pushpins", num_masks=2)
    z_predictor = (out.logical_predictor_score - 0.5) / 0.25
    z_retrieval = (out.logical_retrieval_score - 0.01) / 0.002
    torch.testing.assert_close(out.logical_score, torch.maximum(z_predictor, z_retrieval))
    assert set(out.logical_components()) == {"logical_predictor", "logical_retrieval"}
    assert model.retrieval_masks().shape == (6, 16) and (model.retrieval_masks().sum(1) >= 4).all()
    model.config.logical_retrieval_neighbours = 0  # the switch: the predictor alone, as before retrieval
    alone = model(pixel_values=torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5)),
                  category="pushpins", num_masks=2)
    torch.testing.assert_close(alone.logical_score, out.logical_predictor_score)
    assert alone.logical_components() == {} and alone.logical_retrieval_score is None


def test_retrieval_keeps_the_best_pose():
    model = _model(logical_pose_step=5)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    out = model(pixel_values=pixels, category="pushpins", num_masks=2)
    moves = [(0, 0), *model.config.logical_pose_moves]
    model.config.logical_pose_step = 0
    alone = torch.stack([model(pixel_values=translate(pixels, dx, dy), category="pushpins",
                               num_masks=2).logical_retrieval_score for dx, dy in moves], 1)
    torch.testing.assert_close(out.logical_retrieval_score, alone.amin(1))


def test_calibration_measures_the_components_and_the_combined_score():
    model = _model()
    features = model.tokenizer.extract_features(torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(7)))
    model.config.calibration = {}
    stats = calibrate_category(model, features, "pushpins", 2, 0, 0.01)
    for key in ("logical_predictor_mean", "logical_predictor_std", "logical_retrieval_mean", "logical_retrieval_std"):
        assert key in stats, key
    model.config.calibration = {"pushpins": stats, "breakfast_box": stats}
    out = model(features=features, category="pushpins", num_masks=2, seed=0)
    assert abs(float(out.logical_predictor_score.mean()) - stats["logical_predictor_mean"]) < 1e-5
    # the detector now combines its components as the calibration did: their z-scores average 0
    z = (out.logical_score - stats["logical_mean"]) / stats["logical_std"]
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std(unbiased=False)) - 1.0) < 1e-3
    assert float(out.logical_score.max()) >= 0.0  # the larger of two z-scores that average 0


def test_retrieval_survives_a_save_and_load(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    loaded = LadmimForAnomalyDetection.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded.retrieval_masks(), model.retrieval_masks())
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(loaded(pixels, category="pushpins", num_masks=2).logical_retrieval_score,
                               model(pixels, category="pushpins", num_masks=2).logical_retrieval_score)


@pytest.mark.parametrize("overrides, message", [
    (dict(logical_retrieval_neighbours=-1), "logical_retrieval_neighbours must be a whole number >= 0"),
    (dict(logical_retrieval_neighbours=3), "set global_branch: true and global_descriptor: part_histogram"),
    (dict(logical_retrieval_neighbours=3, global_branch=True), "set global_branch: true and global_descriptor"),
    (dict(logical_retrieval_rank=0), "logical_retrieval_rank must be a whole number >= 1"),
    ({**RETRIEVAL, "global_branch": True, "logical_retrieval_rank": 9}, r"logical_retrieval_rank \(9\) cannot exceed global_parts \(8\)"),
    ({**RETRIEVAL, "global_branch": True, "logical_retrieval_num_masked": 16}, r"logical_retrieval_num_masked must be in 1..15"),
])
def test_config_refuses_bad_retrieval_settings(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_retrieval_is_off_by_default_and_in_the_papers_config():
    import yaml

    from ladmim_hf import LadmimConfig
    from ladmim_hf.training.settings import BUILTIN_CONFIGS

    paper = yaml.safe_load((BUILTIN_CONFIGS / "loco-paper.yaml").read_text())
    assert paper["model"].get("logical_retrieval_neighbours", 0) == 0
    assert LadmimConfig().logical_retrieval_neighbours == 0
    assert LadmimForAnomalyDetection(tiny_config()).retrieval is None
