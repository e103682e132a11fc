"""The memory-bank and global branches and the fusion rules, against slow obvious references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BRANCH_STATS, fitted_branch_model, tiny_config
from scipy.ndimage import gaussian_filter
from sklearn.covariance import LedoitWolf

from ladmim_hf.models.branches_ladmim import (
    LadmimGlobalBranch,
    LadmimMemoryBank,
    fuse,
    gaussian_blur,
    greedy_coreset,
    kmeans,
    ledoit_wolf_covariance,
)


def _features(n=4, c=6, g=5, seed=0) -> torch.Tensor:
    return torch.randn(n, c, g, g, generator=torch.Generator().manual_seed(seed))


def test_memory_bank_distances_equal_brute_force_nearest_neighbours():
    train, test = _features(3, seed=1), _features(2, seed=2)
    bank = LadmimMemoryBank(2, 6, bank_size=75, smoothing_sigma=0.0)  # 3 x 25 patches: all of them
    bank.fit(train, 1)
    scores, maps = bank(test, torch.tensor([1, 1]), image_size=5, categories=["a", "b"])
    rows = [train[i, :, y, x].half().float() for i in range(3) for y in range(5) for x in range(5)]
    for b in range(2):
        expected = torch.tensor([[min(float((test[b, :, y, x] - r).norm()) for r in rows) for x in range(5)] for y in range(5)])
        # image_size == grid: bilinear resizing with align_corners=False is the identity
        torch.testing.assert_close(maps[b], expected, rtol=1e-4, atol=1e-4)
        assert float(scores[b]) == pytest.approx(float(expected.max()), rel=1e-4)


def test_memory_bank_neighbourhood_is_a_mean_over_the_cells_around():
    features = _features(1, c=2, g=4)
    bank = LadmimMemoryBank(1, 2, bank_size=4, neighbourhood=3)
    patches = bank.patch_features(features)
    expected = features[0, :, 0:2, 0:2].mean((1, 2))  # a corner cell averages its 2 x 2 neighbours
    torch.testing.assert_close(patches[0, 0, 0], expected)
    torch.testing.assert_close(patches[0, 1, 1], features[0, :, 0:3, 0:3].mean((1, 2)))


def test_memory_bank_coreset_is_deterministic_by_seed_and_small_banks_keep_every_patch():
    train = _features(6, seed=3)  # 150 patches
    a, b, c = (LadmimMemoryBank(1, 6, bank_size=20) for _ in range(3))
    a.fit(train, 0, seed=0)
    b.fit(train, 0, seed=0)
    c.fit(train, 0, seed=1)
    assert torch.equal(a.bank, b.bank) and not torch.equal(a.bank, c.bank)
    small = LadmimMemoryBank(1, 6, bank_size=200)
    small.fit(train, 0)
    rows = train.permute(0, 2, 3, 1).reshape(-1, 6).half()
    assert torch.equal(small.bank[0, :150], rows) and torch.equal(small.bank[0, 150:], rows[:1].expand(50, -1))


def test_greedy_coreset_covers_the_outlier_first():
    rows = torch.cat([torch.zeros(10, 3), torch.tensor([[100.0, 0, 0]])])
    assert greedy_coreset(rows, 2, projection_dim=None, start_index=0).tolist() == [0, 10]


def test_ledoit_wolf_matches_scikit_learn():
    samples = torch.randn(30, 40, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.2, 3.0, 40)
    covariance, shrinkage = ledoit_wolf_covariance(samples)
    reference = LedoitWolf().fit(samples.double().numpy())
    assert shrinkage == pytest.approx(reference.shrinkage_, rel=1e-9)
    np.testing.assert_allclose(covariance.numpy(), reference.covariance_, rtol=1e-9, atol=1e-12)


def test_global_branch_is_the_mahalanobis_distance_of_pooled_features_by_hand():
    train, test = _features(12, c=3, g=4, seed=5), _features(2, c=3, g=4, seed=6)
    branch = LadmimGlobalBranch(1, 3)
    branch.fit(train, 0)
    pooled = lambda x: np.concatenate([x.reshape(len(x), 3, -1).mean(-1), x.reshape(len(x), 3, -1).std(-1)], 1)  # noqa: E731
    train_pooled, test_pooled = pooled(train.double().numpy()), pooled(test.double().numpy())
    reference = LedoitWolf().fit(train_pooled)
    precision = np.linalg.inv(reference.covariance_)
    centred = test_pooled - train_pooled.mean(0)
    expected = np.sqrt(np.einsum("bi,ij,bj->b", centred, precision, centred))
    got = branch(test, torch.zeros(2, dtype=torch.long), ["only"])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4)


def test_kmeans_finds_separated_clusters_and_is_deterministic_by_seed():
    generator = torch.Generator().manual_seed(9)
    truth = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    rows = torch.cat([c + 0.1 * torch.randn(40, 2, generator=generator) for c in truth])
    centres = kmeans(rows, 3, seed=0)
    for c in truth:  # every true centre has a found centre within the noise
        assert float((centres - c).norm(dim=1).min()) < 0.1
    torch.testing.assert_close(sorted(centres.tolist()), sorted([rows[i * 40:(i + 1) * 40].mean(0).tolist() for i in range(3)]))
    many = torch.randn(300, 4, generator=generator)
    assert torch.equal(kmeans(many, 8, seed=1), kmeans(many, 8, seed=1))
    assert not torch.equal(kmeans(many, 8, seed=1), kmeans(many, 8, seed=2))
    with pytest.raises(ValueError, match="clusters"):
        kmeans(many, 301)


def test_part_histogram_global_branch_by_hand():
    """Cells standardised with the training cells' statistics, soft-assigned to the k-means centres at the
    median nearest-centre distance, averaged per image; then the Mahalanobis distance of that histogram."""
    train, test = _features(12, c=3, g=4, seed=5), _features(2, c=3, g=4, seed=6)
    branch = LadmimGlobalBranch(1, 3, descriptor="part_histogram", parts=5)
    branch.fit(train, 0, seed=3)

    cells = train.double().permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    mean, std = cells.mean(0), cells.std(0, ddof=1)
    centres = kmeans(torch.from_numpy((cells - mean) / std).float(), 5, seed=3).double().numpy()
    squared = lambda x: (((x[:, None, :] - centres[None]) ** 2).sum(-1))  # noqa: E731
    nearest = np.sort(squared((cells - mean) / std).min(1))
    temperature = nearest[(len(nearest) - 1) // 2]  # torch's median of an even count: the lower middle value

    def histogram(features):
        rows = features.double().permute(0, 2, 3, 1).reshape(len(features), -1, 3).numpy()
        out = []
        for image in rows:
            logits = -squared((image - mean) / std) / temperature
            weights = np.exp(logits - logits.max(1, keepdims=True))
            out.append((weights / weights.sum(1, keepdims=True)).mean(0))
        return np.array(out)

    train_histograms, test_histograms = histogram(train), histogram(test)
    np.testing.assert_allclose(train_histograms.sum(1), 1.0, rtol=1e-9)
    reference = LedoitWolf().fit(train_histograms)
    centred = test_histograms - train_histograms.mean(0)
    expected = np.sqrt(np.einsum("bi,ij,bj->b", centred, np.linalg.inv(reference.covariance_), centred))
    np.testing.assert_allclose(branch.descriptor(test, torch.zeros(2, dtype=torch.long)).numpy(), test_histograms, rtol=1e-4)
    np.testing.assert_allclose(branch(test, torch.zeros(2, dtype=torch.long), ["only"]).numpy(), expected, rtol=1e-3)


def test_part_histogram_needs_as_many_training_cells_as_parts():
    branch = LadmimGlobalBranch(1, 3, descriptor="part_histogram", parts=20)
    with pytest.raises(ValueError, match="global_parts"):
        branch.fit(_features(1, c=3, g=4), 0)  # 16 cells


def test_gaussian_blur_matches_scipy():
    maps = torch.rand(2, 40, 40, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    got = gaussian_blur(maps, 2.0)
    for b in range(2):
        # torch's "reflect" padding excludes the edge sample, which is scipy's "mirror" mode
        expected = gaussian_filter(maps[b].numpy(), 2.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(gaussian_blur(maps, 0.0), maps)


def test_fusion_rules_by_hand():
    z = torch.tensor([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]])
    assert fuse(z, "sum").tolist() == [-0.5, 2.0]
    assert fuse(z, "max").tolist() == [1.0, 3.0]
    torch.testing.assert_close(fuse(z, "max_mean"), torch.tensor([1.0 - 0.5 / 3, 3.0 + 2.0 / 3]))
    with pytest.raises(ValueError, match="fusion rule"):
        fuse(z, "mean")


@pytest.mark.parametrize("rule", ["max", "max_mean"])
def test_detector_fuses_standardised_branches_by_the_configured_rule(pixel_values, rule):
    combine = {"max": lambda z: z.amax(-1), "max_mean": lambda z: z.amax(-1) + z.mean(-1)}[rule]
    model = fitted_branch_model(fusion_rule=rule, fused_branches=["logical", "memory_bank", "global"])
    assert BRANCH_STATS["memory_bank_std"] == 0.5 and BRANCH_STATS["global_mean"] == 3.0
    out = model(pixel_values, category="pushpins", num_masks=3, seed=[1, 2, 3])
    z = torch.stack([(out.logical_score - 0.1) / 2.0, (out.memory_bank_score - 1.0) / 0.5, (out.global_score - 3.0) / 4.0], -1)
    torch.testing.assert_close(out.pred_score, combine(z))
    maps = torch.stack([(out.logical_map - 0.1) / 2.0, (out.memory_bank_map - 1.0) / 0.5], -1)  # the global branch has no map
    torch.testing.assert_close(out.anomaly_map, combine(maps))
    assert (out.memory_bank_score > 1e-3).all(), "ImageNet features: a real distance, not fp16 zeros"
    assert out.pred_label.tolist() == (out.pred_score > 1.0).tolist()
    assert set(out.branch_scores()) == {"logical", "structural", "memory_bank", "global"}


def test_detector_without_the_new_branches_leaves_them_none(tiny_model, pixel_values):
    out = tiny_model(pixel_values, category="pushpins", num_masks=2, seed=0)
    assert out.memory_bank_score is None and out.memory_bank_map is None and out.global_score is None
    assert tiny_model.memory_bank is None and tiny_model.global_branch is None
    torch.testing.assert_close(out.pred_score, out.logical_score + out.structural_score)


@pytest.mark.parametrize("descriptor", ["moments", "part_histogram"])
def test_branch_buffers_survive_a_save_and_load_round_trip(tmp_path, pixel_values, descriptor):
    from ladmim_hf import LadmimForAnomalyDetection

    model = fitted_branch_model(global_descriptor=descriptor, global_parts=8)
    model.save_pretrained(tmp_path)
    loaded = LadmimForAnomalyDetection.from_pretrained(tmp_path).eval()
    names = [n for n in model.state_dict() if n.startswith(("memory_bank.", "global_branch."))]
    assert ("global_branch.part_centres" in names) == (descriptor == "part_histogram")
    for name in names:
        assert torch.equal(model.state_dict()[name], loaded.state_dict()[name]), name
    assert loaded.memory_bank.bank.dtype == torch.float16
    a = model(pixel_values, category="breakfast_box", num_masks=2, seed=0)
    b = loaded(pixel_values, category="breakfast_box", num_masks=2, seed=0)
    torch.testing.assert_close(a.memory_bank_score, b.memory_bank_score)
    torch.testing.assert_close(a.global_score, b.global_score)
    torch.testing.assert_close(a.pred_score, b.pred_score)


def test_unfitted_branch_warns_once_naming_the_category(pixel_values, caplog):
    from ladmim_hf import LadmimForAnomalyDetection

    model = LadmimForAnomalyDetection(tiny_config(memory_bank_size=4)).eval()
    with caplog.at_level("WARNING"):
        model(pixel_values, category="pushpins", num_masks=1, seed=0)
        model(pixel_values, category="pushpins", num_masks=1, seed=0)
    warnings = [r for r in caplog.records if "memory_bank branch was never fitted" in r.getMessage()]
    assert len(warnings) == 1 and "pushpins" in warnings[0].getMessage()


@pytest.mark.parametrize("overrides, fragment", [
    ({"memory_bank_size": -1}, "memory_bank_size"),
    ({"memory_bank_size": "8"}, "memory_bank_size"),
    ({"memory_bank_neighbourhood": 2}, "memory_bank_neighbourhood"),
    ({"memory_bank_smoothing_sigma": float("nan")}, "memory_bank_smoothing_sigma"),
    ({"global_branch": "yes"}, "global_branch"),
    ({"global_descriptor": "histogram"}, "global_descriptor"),
    ({"global_parts": 1}, "global_parts"),
    ({"global_parts": 8.0}, "global_parts"),
    ({"fusion_rule": "mean"}, "fusion_rule"),
    ({"fused_branches": ["logical", "memory_bank"]}, "memory_bank_size > 0"),
    ({"fused_branches": ["global"]}, "global_branch: true"),
    ({"fused_branches": []}, "fused_branches"),
    ({"fused_branches": ["logical", "logical"]}, "twice"),
])
def test_config_refuses_bad_branch_settings_naming_the_field(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        tiny_config(**overrides)


def test_calibration_missing_a_fused_branch_names_it(pixel_values):
    model = fitted_branch_model()
    model.config.calibration = {"pushpins": {"logical_mean": 0.0, "logical_std": 1.0, "structural_mean": 0.0,
                                             "structural_std": 1.0, "threshold": 3.0}}
    with pytest.raises(ValueError, match=r"\['memory_bank', 'global'\]"):
        model(pixel_values, category="pushpins", num_masks=1, seed=0)


def test_map_statistics_are_the_pixels_mean_and_std_and_standardise_the_fused_map(pixel_values):
    """Calibration measures each branch map's pixel mean and std on normal images; the fused map uses them
    (the image score keeps the score statistics), and a calibration without them falls back to the score's."""
    from ladmim_hf.calibration import calibrate_category
    from ladmim_hf.scoring import branch_scores_and_map_statistics

    model = fitted_branch_model(fusion_rule="max_mean", fused_branches=["logical", "memory_bank", "global"])
    with torch.no_grad():
        features = model.tokenizer.extract_features(pixel_values)
    scores, statistics = branch_scores_and_map_statistics(model, features, "pushpins", 2, seed=0, batch_size=2)
    reference = model(features=features, category="pushpins", num_masks=2, seed=0)
    for branch, values in reference.branch_maps().items():
        assert statistics[f"{branch}_map_mean"] == pytest.approx(float(values.double().mean()), rel=1e-5)
        assert statistics[f"{branch}_map_std"] == pytest.approx(float(values.double().std(unbiased=False)), rel=1e-5)
    assert set(statistics) == {f"{b}_map_{s}" for b in ("logical", "structural", "memory_bank") for s in ("mean", "std")}
    torch.testing.assert_close(scores["memory_bank"], reference.memory_bank_score)
    # `normal`: only the chosen images' maps count, the scores still cover every image
    picked_scores, picked = branch_scores_and_map_statistics(model, features, "pushpins", 2, seed=0, batch_size=2,
                                                             normal=torch.tensor([True, False, True]))
    assert picked_scores["memory_bank"].shape == (3,)
    for branch, values in reference.branch_maps().items():
        assert picked[f"{branch}_map_mean"] == pytest.approx(float(values[[0, 2]].double().mean()), rel=1e-5)
        assert picked[f"{branch}_map_std"] == pytest.approx(float(values[[0, 2]].double().std(unbiased=False)), rel=1e-5)

    stats = calibrate_category(model, features, "pushpins", 2, seed=0, fpr=0.05)
    assert stats["memory_bank_map_std"] == pytest.approx(statistics["memory_bank_map_std"], rel=1e-5)
    assert stats["memory_bank_std"] != stats["memory_bank_map_std"]
    model.config.calibration["pushpins"] = stats
    out = model(features=features, category="pushpins", num_masks=2, seed=0)
    z = {b: (out.branch_maps()[b] - stats[f"{b}_map_mean"]) / stats[f"{b}_map_std"] for b in ("logical", "memory_bank")}
    maps = torch.stack([z["logical"], z["memory_bank"]], -1)
    torch.testing.assert_close(out.anomaly_map, maps.amax(-1) + maps.mean(-1))
    scores_z = torch.stack([(out.branch_scores()[b] - stats[f"{b}_mean"]) / stats[f"{b}_std"]
                            for b in ("logical", "memory_bank", "global")], -1)
    torch.testing.assert_close(out.pred_score, scores_z.amax(-1) + scores_z.mean(-1))
    legacy = {k: v for k, v in stats.items() if "_map_" not in k}
    torch.testing.assert_close(model.standardized_maps({"memory_bank": out.memory_bank_map}, "pushpins")["memory_bank"],
                               (out.memory_bank_map - stats["memory_bank_map_mean"]) / stats["memory_bank_map_std"])
    model.config.calibration["pushpins"] = legacy
    torch.testing.assert_close(model.standardized_maps({"memory_bank": out.memory_bank_map}, "pushpins")["memory_bank"],
                               (out.memory_bank_map - legacy["memory_bank_mean"]) / legacy["memory_bank_std"])
