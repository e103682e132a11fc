import numpy as np
import pytest
import torch
from scipy import ndimage

from ladmim_hf.models.masking import BlockMaskGenerator


@pytest.mark.parametrize(
    "num_masked,min_block", [(130, 46), (230, 92), (1, 1), (576, 46)], ids=["train", "score", "one", "all"]
)
def test_exact_count(num_masked, min_block):
    generator = BlockMaskGenerator(24, num_masked, min_block)
    masks = generator(16, num_masks=4, seed=0)
    assert masks.shape == (16, 4, 576) and masks.dtype == torch.bool
    assert (masks.sum(-1) == num_masked).all()


def test_masks_are_blocky():
    """Most masked cells belong to large connected regions, unlike uniformly random cells."""
    generator = BlockMaskGenerator(24, 230, 92)
    rng = np.random.default_rng(0)
    block_fraction, random_fraction = [], []
    for _ in range(50):
        mask = generator.sample(rng).reshape(24, 24)
        labels, count = ndimage.label(mask)
        sizes = np.bincount(labels.ravel())[1:]
        block_fraction.append(sizes[sizes >= 20].sum() / 230)
        random_mask = np.zeros(576, bool)
        random_mask[rng.choice(576, 230, replace=False)] = True
        labels, _ = ndimage.label(random_mask.reshape(24, 24))
        sizes = np.bincount(labels.ravel())[1:]
        random_fraction.append(sizes[sizes >= 20].sum() / 230)
    assert np.mean(block_fraction) > 0.8
    assert np.mean(block_fraction) > np.mean(random_fraction) + 0.3


def test_same_seed_same_masks_and_per_image_seeds():
    generator = BlockMaskGenerator(24, 130, 46)
    assert torch.equal(generator(4, 3, seed=7), generator(4, 3, seed=7))
    assert not torch.equal(generator(4, 3, seed=7), generator(4, 3, seed=8))
    # Per-image seeds: an image's masks do not depend on the rest of the batch.
    both = generator(2, 3, seed=[11, 12])
    alone = generator(1, 3, seed=[12])
    assert torch.equal(both[1], alone[0])


def test_single_mask_shape_and_bad_arguments():
    generator = BlockMaskGenerator(8, 20, 4)
    assert generator(5, seed=0).shape == (5, 64)
    with pytest.raises(ValueError, match="num_masked"):
        BlockMaskGenerator(8, 65, 4)
    with pytest.raises(ValueError, match="per-image seeds"):
        generator(2, 1, seed=[1, 2, 3])
