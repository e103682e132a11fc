"""Tests of the synthloco generator (layout, masks, determinism, rules by construction)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ladmim_hf.data import synthetic
from ladmim_hf.data.synthetic import (
    CATEGORIES,
    SMALL_COUNTS,
    check_scene_rules,
    defect_types,
    generate_synthloco,
    render_scene,
)

try:  # tests/ may or may not be a package
    from tests.data_fixtures import SMALL_SEED, synthloco_small  # noqa: F401
except ImportError:  # pragma: no cover
    from data_fixtures import SMALL_SEED, synthloco_small  # noqa: F401

SPLIT_DIRS = {
    "train": "train/good",
    "validation": "validation/good",
    "good": "test/good",
    "logical": "test/logical_anomalies",
    "structural": "test/structural_anomalies",
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_counts(synthloco_small):
    assert sorted(p.name for p in synthloco_small.iterdir() if p.is_dir()) == sorted(CATEGORIES)
    for category in CATEGORIES:
        cat = synthloco_small / category
        for key, folder in SPLIT_DIRS.items():
            files = sorted((cat / folder).glob("*.png"))
            assert len(files) == SMALL_COUNTS[key], (category, folder)
            assert [f.name for f in files] == [f"{i:03d}.png" for i in range(SMALL_COUNTS[key])]
        for folder in ("logical_anomalies", "structural_anomalies"):
            assert (cat / "ground_truth" / folder).is_dir()
        assert (cat / "scenes.json").is_file() and (cat / synthetic.MARKER_FILE).is_file()


def test_images_are_rgb_256(synthloco_small):
    for path in list((synthloco_small / "pushpins").rglob("test/*/*.png"))[:5]:
        with Image.open(path) as image:
            assert image.mode == "RGB" and image.size == (256, 256)


def test_defects_config_matches_loco_format(synthloco_small):
    for category in CATEGORIES:
        config = json.loads((synthloco_small / category / "defects_config.json").read_text())
        assert isinstance(config, list) and config
        values = [entry["pixel_value"] for entry in config]
        assert len(set(values)) == len(values)
        for entry in config:
            assert set(entry) == {"defect_name", "pixel_value", "saturation_threshold", "relative_saturation"}
            assert isinstance(entry["defect_name"], str)
            assert 234 <= entry["pixel_value"] <= 255
            assert isinstance(entry["saturation_threshold"], (int, float)) and entry["saturation_threshold"] > 0
            assert isinstance(entry["relative_saturation"], bool)
        assert {e["defect_name"] for e in config} == set(defect_types(category))


def test_masks(synthloco_small):
    for category in CATEGORIES:
        cat = synthloco_small / category
        config = {e["defect_name"]: e["pixel_value"] for e in json.loads((cat / "defects_config.json").read_text())}
        scenes = json.loads((cat / "scenes.json").read_text())
        for sub in ("logical_anomalies", "structural_anomalies"):
            images = sorted((cat / "test" / sub).glob("*.png"))
            assert sorted(p.name for p in (cat / "ground_truth" / sub).iterdir()) == [p.stem for p in images]
            for image in images:
                masks = sorted((cat / "ground_truth" / sub / image.stem).glob("*.png"))
                assert masks and [m.name for m in masks] == [f"{i:03d}.png" for i in range(len(masks))]
                defect = scenes[f"test/{sub}/{image.name}"]["scene"]["defect"]
                for mask_path in masks:
                    with Image.open(mask_path) as mask:
                        assert mask.mode == "L"
                        assert mask.size == Image.open(image).size
                        values = set(np.unique(np.asarray(mask)).tolist())
                    assert values == {0, config[defect]}, (mask_path, values)
        # good images have no ground truth (the folders above hold only anomalous stems)
        assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == ["logical_anomalies", "structural_anomalies"]


def test_scene_descriptions_are_the_source_of_truth(synthloco_small):
    for category in CATEGORIES:
        scenes = json.loads((synthloco_small / category / "scenes.json").read_text())
        assert len(scenes) == sum(SMALL_COUNTS.values())
        kinds = {"logical": set(), "structural": set()}
        for rel, record in scenes.items():
            scene = record["scene"]
            broken = check_scene_rules(scene)
            if scene["anomaly_type"] == "logical":
                assert broken == [scene["defect"]], rel
                kinds["logical"].add(scene["defect"])
            else:
                assert broken == [], rel
                if scene["anomaly_type"] == "structural":
                    kinds["structural"].add(scene["defect"])
        assert kinds["logical"] <= set(defect_types(category, "logical"))
        assert kinds["structural"] <= set(defect_types(category, "structural"))
    # re-rendering a stored description reproduces the stored image and masks exactly
    cat = synthloco_small / "splicing_connectors"
    scenes = json.loads((cat / "scenes.json").read_text())
    for rel in ("train/good/000.png", "test/logical_anomalies/001.png"):
        image, masks = render_scene(scenes[rel]["scene"])
        assert np.array_equal(image, np.asarray(Image.open(cat / rel)))
        for mask, mask_rel in zip(masks, scenes[rel]["masks"]):
            assert np.array_equal(mask, np.asarray(Image.open(cat / mask_rel)) > 0)


def test_every_defect_type_renders_a_non_empty_mask():
    for category in CATEGORIES:
        for kind in ("logical", "structural"):
            for i, name in enumerate(defect_types(category, kind)):
                scene = synthetic.make_scene(category, kind, i, seed=123, defect=name)
                assert check_scene_rules(scene) == ([name] if kind == "logical" else [])
                _, masks = render_scene(scene, image_size=64)
                assert masks and all(m.shape == (64, 64) for m in masks)
                assert any(m.any() for m in masks), (category, name)


def test_deterministic_and_seed_dependent(synthloco_small, tmp_path):
    subset = ["juice_bottle", "screw_bag"]
    again = generate_synthloco(tmp_path / "again", seed=SMALL_SEED, small=True, categories=subset, workers=1)
    for category in subset:  # byte-identical, whatever the number of workers
        assert _files(again / category) == _files(synthloco_small / category)
    other = generate_synthloco(tmp_path / "other", seed=SMALL_SEED + 1, small=True, categories=["pushpins"])
    a, b = _files(synthloco_small / "pushpins"), _files(other / "pushpins")
    assert a.keys() == b.keys()
    assert a["train/good/000.png"] != b["train/good/000.png"]
    assert a["test/logical_anomalies/000.png"] != b["test/logical_anomalies/000.png"]


def test_image_size_and_counts_options(tmp_path):
    root = generate_synthloco(tmp_path / "s", categories=["juice_bottle"], image_size=96,
                              counts={"train": 2, "validation": 1, "good": 1, "logical": 1, "structural": 1})
    cat = root / "juice_bottle"
    assert len(list((cat / "train" / "good").glob("*.png"))) == 2
    assert Image.open(cat / "test" / "good" / "000.png").size == (96, 96)
    assert Image.open(cat / "ground_truth" / "logical_anomalies" / "000" / "000.png").size == (96, 96)
    config = json.loads((cat / "defects_config.json").read_text())
    absolute = [e for e in config if not e["relative_saturation"]]
    assert absolute and all(isinstance(e["saturation_threshold"], int) for e in absolute)


def test_refuses_to_delete_foreign_folders(tmp_path):
    (tmp_path / "pushpins").mkdir()
    (tmp_path / "pushpins" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="pushpins"):
        generate_synthloco(tmp_path, small=True, categories=["pushpins"])
    assert (tmp_path / "pushpins" / "mine.txt").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown synthloco category 'nope'"):
        generate_synthloco(tmp_path, small=True, categories=["nope"])
    with pytest.raises(ValueError, match="unknown split names"):
        generate_synthloco(tmp_path, small=True, counts={"test": 3})


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synthetic.main(["--out", str(out), "--small", "--categories", "screw_bag", "--no-progress", "--workers", "1"]) == 0
    assert (out / "screw_bag" / "train" / "good" / "000.png").is_file()
    assert synthetic.main(["--out", str(out), "--small", "--categories", "bogus", "--no-progress"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_make_demo_skips_generation_only_when_the_set_is_complete(tmp_path, monkeypatch):
    """`make demo` regenerates unless the file its guard names exists; the generator writes that file last
    and removes it first, so an interrupted run is regenerated and a complete one is not."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    guard = next(line.split("test -f $(DATA)/")[1].split()[0] for line in makefile.splitlines() if "test -f $(DATA)/" in line)
    root = generate_synthloco(tmp_path / "s", categories=["juice_bottle"], image_size=64,
                              counts={"train": 1, "validation": 1, "good": 1, "logical": 1, "structural": 1})
    assert (root / guard).is_file()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(synthetic.writer, "_prepare_category_dir", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate_synthloco(root, categories=["juice_bottle"], image_size=64)
    assert not (root / guard).exists()
