"""Tests of the PatchCore-style kNN baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ladmim_hf.baselines import KNNPatchBaseline, greedy_coreset, nearest_distances


def _features(n=4, c=8, h=5, w=6, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_far_patch_gets_highest_score():
    train = _features(6, 8, 5, 5, seed=0) * 0.1
    test = _features(2, 8, 5, 5, seed=1) * 0.1
    test[1, :, 3, 2] += 5.0  # one patch far from every training patch
    model = KNNPatchBaseline().fit(train)
    image_scores, maps = model.score(test)
    assert image_scores.shape == (2,) and maps.shape == (2, 5, 5)
    assert np.unravel_index(np.argmax(maps), maps.shape) == (1, 3, 2)
    assert image_scores[1] > image_scores[0]
    np.testing.assert_allclose(image_scores, maps.reshape(2, -1).max(axis=1))


def test_scores_are_nearest_neighbour_distances():
    train = _features(3, 4, 2, 3, seed=2)
    test = _features(2, 4, 2, 3, seed=3)
    _, maps = KNNPatchBaseline().fit(train.numpy()).score(test.numpy())  # numpy input works too
    bank = train.permute(0, 2, 3, 1).reshape(-1, 4)
    queries = test.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(queries.double(), bank.double()).min(dim=1).values.reshape(2, 2, 3)
    np.testing.assert_allclose(maps, expected.numpy(), rtol=1e-5, atol=1e-5)
    # A training image scores (about) zero against its own bank.
    _, own = KNNPatchBaseline().fit(train).score(train[:1])
    assert float(own.max()) < 1e-3


def test_chunking_does_not_change_results():
    train = _features(5, 16, 6, 6, seed=4)
    test = _features(3, 16, 6, 6, seed=5)
    ref_scores, ref_maps = KNNPatchBaseline().fit(train).score(test)
    for chunk, bank_chunk in [(1, 1000), (16, 64), (1000, 50)]:
        scores, maps = KNNPatchBaseline(chunk_size=chunk, bank_chunk_size=bank_chunk).fit(train).score(test)
        np.testing.assert_allclose(maps, ref_maps, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_greedy_coreset_picks_farthest_points():
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    x[17] += 10.0
    x[150] -= 10.0
    x[90] += 5.0
    sel = greedy_coreset(x, 4, projection_dim=None, start_index=0)
    # From row 0: the farthest row is 17 or 150 (both ~10*sqrt(32) away), then the other, then 90.
    assert sel[0] == 0 and set(sel[1:3].tolist()) == {17, 150} and sel[3] == 90
    # Every step takes the row with the largest distance to the rows already selected.
    sel = greedy_coreset(x, 10, projection_dim=None, seed=3)
    for k in range(1, 10):
        d = torch.cdist(x, x[sel[:k]]).min(dim=1).values
        assert d[sel[k]] == pytest.approx(float(d.max()), rel=1e-5)
    # With a (seeded) random projection the outliers are still found, deterministically.
    a = greedy_coreset(x, 4, projection_dim=8, seed=1)
    assert {17, 150, 90} <= set(a.tolist())
    assert torch.equal(a, greedy_coreset(x, 4, projection_dim=8, seed=1))


def test_coreset_fit_sizes_and_modes():
    train = _features(4, 8, 5, 5, seed=6)  # 100 patches
    greedy = KNNPatchBaseline(coreset_ratio=0.1).fit(train)
    assert greedy.memory_bank.shape == (10, 8)
    assert len(set(greedy.coreset_indices.tolist())) == 10
    random = KNNPatchBaseline(coreset_ratio=0.25, coreset_method="random", seed=1).fit(train)
    assert random.memory_bank.shape == (25, 8)
    again = KNNPatchBaseline(coreset_ratio=0.25, coreset_method="random", seed=1).fit(train)
    assert torch.equal(random.coreset_indices, again.coreset_indices)
    # A smaller bank can only increase nearest-neighbour distances.
    test = _features(2, 8, 5, 5, seed=7)
    full = KNNPatchBaseline().fit(train).score(test)[1]
    assert np.all(greedy.score(test)[1] >= full - 1e-5)


def test_errors():
    with pytest.raises(ValueError, match="coreset_ratio"):
        KNNPatchBaseline(coreset_ratio=0.0)
    with pytest.raises(ValueError, match="coreset_method"):
        KNNPatchBaseline(coreset_method="kmeans")
    with pytest.raises(RuntimeError, match="fit"):
        KNNPatchBaseline().score(_features())
    model = KNNPatchBaseline().fit(_features(c=8))
    with pytest.raises(ValueError, match="channels"):
        model.score(_features(c=4))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        KNNPatchBaseline().fit(torch.randn(10, 8))
    with pytest.raises(ValueError, match="NaN"):
        KNNPatchBaseline().fit(torch.full((1, 2, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="feature dims"):
        nearest_distances(torch.randn(3, 4), torch.randn(5, 3))
