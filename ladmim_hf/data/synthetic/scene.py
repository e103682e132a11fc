"""Scene descriptions: sample one (with its anomaly), check its rules, render it.

Each category module provides ``sample``, ``logical``, ``structural``, ``rules`` and ``render``
(see :mod:`.breakfast_box`); this module picks the module by category name and ties them together
with the per-image seed.
"""

from __future__ import annotations

import numpy as np

from . import breakfast_box, juice_bottle, pushpins, screw_bag, splicing_connectors
from .canvas import Canvas, finish
from .defects import CATEGORIES, check_category, defect_types
from .sampling import Retry, sample_photo

# (count key, folder relative to the category, split id used in the per-image seed)
SPLIT_FOLDERS = (
    ("train", "train/good", 0),
    ("validation", "validation/good", 1),
    ("good", "test/good", 2),
    ("logical", "test/logical_anomalies", 3),
    ("structural", "test/structural_anomalies", 4),
)

# category name -> its module (sample, logical, structural, rules, render)
_MODULES = {
    "breakfast_box": breakfast_box,
    "juice_bottle": juice_bottle,
    "pushpins": pushpins,
    "screw_bag": screw_bag,
    "splicing_connectors": splicing_connectors,
}


def check_scene_rules(scene: dict) -> list[str]:
    """Names of the logical rules a scene description breaks (empty for good and structural scenes)."""
    return _MODULES[scene["category"]].rules(scene["params"])


def image_seed(seed: int, category: str, split: str, index: int) -> np.random.SeedSequence:
    """The seed sequence of one image: ``(seed, category, split, index)``."""
    split_id = {key: sid for key, _, sid in SPLIT_FOLDERS}[split]
    return np.random.SeedSequence([int(seed), CATEGORIES.index(category), split_id, int(index)])


def make_scene(category: str, split: str, index: int, seed: int = 0, defect: str | None = None) -> dict:
    """Sample the scene description of one image.

    ``split`` is one of ``train``, ``validation``, ``good``, ``logical``, ``structural``; for the
    two anomalous splits ``defect`` picks the defect type (default: cycles through the types).
    """
    check_category(category)
    module = _MODULES[category]
    rng = np.random.default_rng(image_seed(seed, category, split, index))
    kind = "logical" if split == "logical" else "structural" if split == "structural" else "good"
    if kind != "good" and defect is None:
        names = defect_types(category, kind)
        defect = names[index % len(names)]
    for _attempt in range(50):
        try:
            params = module.sample(rng)
            regions: list[dict] = []
            if kind == "logical":
                regions = module.logical(params, defect, rng)
            elif kind == "structural":
                regions = module.structural(params, defect, rng)
        except Retry:
            continue
        broken = module.rules(params)
        expected = [defect] if kind == "logical" else []
        if broken != expected:  # the description is the source of truth: re-sample if it disagrees
            continue
        break
    else:  # pragma: no cover - would be a generator bug
        raise RuntimeError(f"could not sample a valid {category}/{split}/{index} scene")
    photo = sample_photo(rng, angle_deg=6.0 if category == "screw_bag" else 3.0)
    return {
        "category": category,
        "split": split,
        "index": int(index),
        "anomaly_type": kind,
        "defect": defect,
        "regions": regions,
        "params": params,
        "photo": photo,
    }


def render_scene(scene: dict, image_size: int = 256) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render a scene description: ``(image uint8 (S, S, 3), [bool masks (S, S), one per region])``."""
    photo = scene["photo"]
    cv = Canvas(image_size, photo["angle"], photo["scale"], photo["shift"], photo["light"])
    rng = np.random.default_rng(photo["render_seed"])
    _MODULES[scene["category"]].render(scene["params"], cv, rng, photo)
    image = finish(cv, rng, photo)
    masks = [cv.mask(region) for region in scene["regions"]]
    return image, masks
