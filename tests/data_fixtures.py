"""Shared fixtures for the data tests: a small synthloco benchmark and tiny hand-made folders.

Import the fixtures into a test module (``from data_fixtures import synthloco_small``); pytest
then registers them for that module. The synthloco fixture is session-scoped, so it is generated
once per test session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ladmim_hf.data.synthetic import generate_synthloco

SMALL_SEED = 0


_GENERATED: dict[str, Path] = {}


@pytest.fixture(scope="session")
def synthloco_small(tmp_path_factory) -> Path:
    """``--small`` synthloco (all five categories, seed 0) in a session temp folder.

    Generated once per session even when several test modules import this fixture (each module
    gets its own fixture definition, so the folder is remembered here).
    """
    if "small" not in _GENERATED:
        root = tmp_path_factory.mktemp("synthloco") / "synthloco"
        _GENERATED["small"] = generate_synthloco(root, seed=SMALL_SEED, small=True)
    return _GENERATED["small"]


def write_image(path: Path, size=(32, 32), mode="RGB", value=None, seed=0) -> Path:
    """Write a small image (random content unless ``value`` is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "RGB":
        array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if value is None else np.full((h, w, 3), value, np.uint8)
        Image.fromarray(array).save(path)
    elif mode == "L":
        array = rng.integers(0, 256, (h, w), dtype=np.uint8) if value is None else np.full((h, w), value, np.uint8)
        Image.fromarray(array).save(path)
    elif mode == "I;16":
        array = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        Image.fromarray(array).save(path)
    elif mode == "P":
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P", palette=Image.ADAPTIVE).save(path)
    else:
        raise ValueError(mode)
    return path


def write_mask(path: Path, size=(32, 32), value=255, box=(4, 4, 12, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    array = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = value
    Image.fromarray(array).save(path)
    return path


def make_loco_folder(root: Path, category: str = "widget", size=(32, 32)) -> Path:
    """A tiny MVTec LOCO AD-style category: 3 train, 2 validation, 2+2+2 test with masks."""
    cat = root / category
    for i in range(3):
        write_image(cat / "train" / "good" / f"{i:03d}.png", size, seed=i)
    for i in range(2):
        write_image(cat / "validation" / "good" / f"{i:03d}.png", size, seed=10 + i)
        write_image(cat / "test" / "good" / f"{i:03d}.png", size, seed=20 + i)
        write_image(cat / "test" / "logical_anomalies" / f"{i:03d}.png", size, seed=30 + i)
        write_image(cat / "test" / "structural_anomalies" / f"{i:03d}.png", size, seed=40 + i)
        write_mask(cat / "ground_truth" / "logical_anomalies" / f"{i:03d}" / "000.png", size, value=255)
        write_mask(cat / "ground_truth" / "structural_anomalies" / f"{i:03d}" / "000.png", size, value=245)
    write_mask(cat / "ground_truth" / "logical_anomalies" / "001" / "001.png", size, value=254, box=(20, 20, 28, 28))
    (cat / "defects_config.json").write_text(
        '[{"defect_name": "missing_thing", "pixel_value": 255, "saturation_threshold": 100, "relative_saturation": false},'
        ' {"defect_name": "extra_thing", "pixel_value": 254, "saturation_threshold": 1.0, "relative_saturation": true},'
        ' {"defect_name": "scratch", "pixel_value": 245, "saturation_threshold": 1.0, "relative_saturation": true}]'
    )
    return cat
