"""Tests of the dataset loaders (schema, transform hook, caching, bad input, other layouts)."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ladmim_hf.data import (
    BadFilesError,
    DataLayoutError,
    DataWarning,
    collate_anomaly_batch,
    dataset_features,
    discover_categories,
    find_bad_images,
    load_defects_config,
    load_folder,
    load_loco,
    load_mvtec_ad,
    resolve_categories,
)
from ladmim_hf.models.image_processing_ladmim import LadmimImageProcessor

try:  # tests/ may or may not be a package
    from tests.data_fixtures import make_loco_folder, synthloco_small, write_image, write_mask  # noqa: F401
except ImportError:  # pragma: no cover
    from data_fixtures import make_loco_folder, synthloco_small, write_image, write_mask  # noqa: F401

CATEGORIES = ["breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors"]


@pytest.fixture()
def cache(tmp_path):
    return tmp_path / "hf_cache"


@pytest.fixture()
def loco(tmp_path):
    return make_loco_folder(tmp_path / "loco").parent


# ---------------------------------------------------------------------------- synthloco / LOCO

def test_loco_schema_on_synthloco(synthloco_small, cache):
    train = load_loco(synthloco_small, "pushpins", "train", cache_dir=cache)
    assert train.features == dataset_features()
    assert train.num_rows == 8 and set(train["label"]) == {0} and set(train["anomaly_type"]) == {0}
    assert load_loco(synthloco_small, "pushpins", "validation", cache_dir=cache).num_rows == 4
    test = load_loco(synthloco_small, "pushpins", "test", cache_dir=cache)
    assert test.num_rows == 9
    config = load_defects_config(synthloco_small / "pushpins")
    names = {entry["defect_name"] for entry in config.values()}
    for row in test:
        assert row["category"] == "pushpins"
        assert row["path"].endswith(".png") and "/test/" in row["path"]
        assert isinstance(row["image"], Image.Image) and row["image"].size == (256, 256)
        if "/test/good/" in row["path"]:
            assert (row["label"], row["anomaly_type"], row["masks"], row["defect_type"]) == (0, 0, [], [])
        else:
            kind = 1 if "/logical_anomalies/" in row["path"] else 2
            assert row["label"] == 1 and row["anomaly_type"] == kind
            assert row["masks"] and all(m.size == (256, 256) for m in row["masks"])
            assert row["defect_type"] and set(row["defect_type"]) <= names
    assert test.features["anomaly_type"].names == ["good", "logical", "structural"]
    assert test.features["label"].names == ["good", "anomalous"]


def test_loco_transform_hook(synthloco_small, cache):
    processor = LadmimImageProcessor(size=64)
    test = load_loco(synthloco_small, "juice_bottle", "test", transform=processor, cache_dir=cache)
    rows = [test[i] for i in range(len(test))]
    for row in rows:
        assert row["pixel_values"].shape == (3, 64, 64) and row["pixel_values"].dtype == torch.float32
        assert row["mask"].shape == (64, 64) and row["mask"].dtype == torch.bool
        assert row["masks"].ndim == 3 and row["masks"].shape[1:] == (64, 64)
        assert bool(row["mask"].any()) == (row["label"] == 1)
        assert {"label", "anomaly_type", "category", "path", "defect_type"} <= set(row)
    loader = torch.utils.data.DataLoader(test, batch_size=4, collate_fn=collate_anomaly_batch)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["mask"].shape == (4, 64, 64)
    assert batch["label"].dtype == torch.int64 and len(batch["masks"]) == 4


def test_several_categories(synthloco_small, cache):
    everything = load_loco(synthloco_small, "all", "validation", cache_dir=cache)
    assert everything.num_rows == 20 and sorted(set(everything["category"])) == CATEGORIES
    two = load_loco(synthloco_small, ["pushpins", "screw_bag"], "train", transform=LadmimImageProcessor(size=32), cache_dir=cache)
    assert len(two) == 16 and two[15]["pixel_values"].shape == (3, 32, 32) and two[15]["category"] == "screw_bag"
    with pytest.raises(ValueError, match="'nope' not found"):
        load_loco(synthloco_small, "pushpins,nope", "train", cache_dir=cache)


def test_plain_callable_transform(loco, cache):
    def to_tensor(image):
        return torch.from_numpy(np.asarray(image.convert("RGB").resize((16, 16)), np.float32)).permute(2, 0, 1)

    row = load_loco(loco, "widget", "test", transform=to_tensor, cache_dir=cache)[-1]
    assert row["pixel_values"].shape == (3, 16, 16) and row["mask"].shape == (16, 16)


def test_loco_defect_types_from_grey_values(loco, cache):
    test = load_loco(loco, "widget", "test", cache_dir=cache)
    by_path = {row["path"].split("widget/")[1]: row for row in test}
    assert by_path["test/logical_anomalies/001.png"]["defect_type"] == ["missing_thing", "extra_thing"]
    assert len(by_path["test/logical_anomalies/001.png"]["masks"]) == 2
    assert by_path["test/structural_anomalies/000.png"]["defect_type"] == ["scratch"]
    assert load_defects_config(loco / "widget")[254]["defect_name"] == "extra_thing"


def test_cache_is_refreshed_when_the_folder_changes(loco, cache):
    assert load_loco(loco, "widget", "train", cache_dir=cache).num_rows == 3
    assert load_loco(loco, "widget", "train", cache_dir=cache).num_rows == 3  # cached
    write_image(loco / "widget" / "train" / "good" / "003.png", seed=99)
    assert load_loco(loco, "widget", "train", cache_dir=cache).num_rows == 4


def test_categories(synthloco_small, tmp_path):
    assert discover_categories(synthloco_small) == CATEGORIES
    assert resolve_categories(synthloco_small, "all") == CATEGORIES
    assert resolve_categories(synthloco_small, ["all"]) == CATEGORIES
    assert resolve_categories(synthloco_small, "pushpins,screw_bag") == ["pushpins", "screw_bag"]
    with pytest.raises(ValueError, match=r"'bagels' not found.*available: breakfast_box, juice_bottle"):
        resolve_categories(synthloco_small, ["pushpins", "bagels"])
    with pytest.raises(FileNotFoundError, match="no category folders"):
        discover_categories(tmp_path)


def test_load_defects_config_errors(tmp_path):
    assert load_defects_config(tmp_path) == {}
    (tmp_path / "defects_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="defects_config.json is not valid JSON"):
        load_defects_config(tmp_path)
    (tmp_path / "defects_config.json").write_text(json.dumps([{"defect_name": "a", "pixel_value": 9},
                                                               {"defect_name": "b", "pixel_value": 9}]))
    with pytest.raises(ValueError, match="pixel_value 9 is used by both"):
        load_defects_config(tmp_path)


# ---------------------------------------------------------------------------- bad input

def test_missing_root_category_and_split(loco, tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="dataset root not found: .*nowhere"):
        load_loco(tmp_path / "nowhere", "widget", "train", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"category 'gadget' not found .*available: widget"):
        load_loco(loco, "gadget", "train", cache_dir=cache)
    with pytest.raises(ValueError, match="split must be"):
        load_loco(loco, "widget", "testing", cache_dir=cache)
    shutil.rmtree(loco / "widget" / "validation")
    with pytest.raises(FileNotFoundError, match="validation") as error:
        load_loco(loco, "widget", "validation", cache_dir=cache)
    # One class for the CLIs to print as one line; the message says what to do.
    assert isinstance(error.value, DataLayoutError) and "\n" not in str(error.value)
    assert f"put normal images in {loco / 'widget' / 'validation' / 'good'}" in str(error.value)


def test_empty_split_folder(loco, cache):
    folder = loco / "widget" / "validation" / "good"
    for f in folder.iterdir():
        f.unlink()
    (folder / ".DS_Store").write_bytes(b"\0\1")
    with pytest.raises(ValueError, match=f"no images in {folder}"):
        load_loco(loco, "widget", "validation", cache_dir=cache)


def test_corrupt_and_truncated_images(loco, cache):
    good = loco / "widget" / "train" / "good"
    corrupt = good / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    truncated = write_image(good / "truncated.png", size=(64, 64))
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    with pytest.raises(BadFilesError) as info:
        load_loco(loco, "widget", "train", cache_dir=cache)
    message = str(info.value)
    assert str(corrupt) in message and str(truncated) in message and "skip_bad_files=True" in message
    assert {p for p, _ in info.value.bad_files} == {str(corrupt), str(truncated)}
    with pytest.warns(DataWarning, match="skipped 2 unusable file") as record:
        ds = load_loco(loco, "widget", "train", skip_bad_files=True, cache_dir=cache)
    assert any(str(corrupt) in str(w.message) for w in record)
    assert ds.num_rows == 3 and str(truncated) in ds.info.description and str(corrupt) in ds.info.description
    bad = dict(find_bad_images(sorted(good.iterdir())))
    assert set(bad) == {str(corrupt), str(truncated)} and all(bad.values())


def test_unknown_and_hidden_files(loco, cache):
    good = loco / "widget" / "train" / "good"
    (good / ".DS_Store").write_bytes(b"junk")
    (good / "Thumbs.db").write_bytes(b"junk")
    assert load_loco(loco, "widget", "train", cache_dir=cache).num_rows == 3  # hidden files ignored
    notes = good / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(BadFilesError, match=r"notes\.txt: not an image file"):
        load_loco(loco, "widget", "train", cache_dir=cache)
    with pytest.warns(DataWarning, match="notes.txt"):
        assert load_loco(loco, "widget", "train", skip_bad_files=True, cache_dir=cache).num_rows == 3
    notes.unlink()
    stray = write_image(loco / "widget" / "train" / "bad" / "000.png")
    with pytest.raises(BadFilesError, match=rf"{stray.parent}: unexpected folder in train/"):
        load_loco(loco, "widget", "train", cache_dir=cache)


def test_mask_size_mismatch(loco, cache):
    mask = write_mask(loco / "widget" / "ground_truth" / "structural_anomalies" / "001" / "000.png", size=(40, 32))
    with pytest.raises(BadFilesError, match=rf"{mask}: mask size 40x32 differs from image size 32x32"):
        load_loco(loco, "widget", "test", cache_dir=cache)
    with pytest.warns(DataWarning, match=str(mask)):
        ds = load_loco(loco, "widget", "test", skip_bad_files=True, cache_dir=cache)
    assert ds.num_rows == 5


def test_16bit_and_palette_images_warn_and_load(loco, cache):
    good = loco / "widget" / "train" / "good"
    deep = write_image(good / "deep.png", mode="I;16")
    palette = write_image(good / "palette.png", mode="P")
    with pytest.warns(DataWarning) as record:
        ds = load_loco(loco, "widget", "train", transform=LadmimImageProcessor(size=32), cache_dir=cache)
    messages = " ".join(str(w.message) for w in record)
    assert f"{deep}: I;16 image (16-bit)" in messages and f"{palette}: palette image" in messages
    assert ds.num_rows == 5
    for row in ds:
        assert row["pixel_values"].shape == (3, 32, 32) and torch.isfinite(row["pixel_values"]).all()


def test_anomalous_image_without_mask_and_unknown_test_folder(loco, cache):
    shutil.rmtree(loco / "widget" / "ground_truth" / "structural_anomalies" / "000")
    with pytest.warns(DataWarning, match="structural_anomalies/000.png: anomalous image without ground-truth masks"):
        ds = load_loco(loco, "widget", "test", cache_dir=cache)
    assert ds.num_rows == 6  # kept (and labelled anomalous), not dropped
    write_image(loco / "widget" / "test" / "weird" / "000.png")
    with pytest.raises(ValueError, match="unknown test folder .*weird"):
        load_loco(loco, "widget", "test", cache_dir=cache)


# ---------------------------------------------------------------------------- other layouts

def test_mvtec_ad_layout(tmp_path, cache):
    cat = tmp_path / "mvtec" / "bottle"
    for i in range(3):
        write_image(cat / "train" / "good" / f"{i:03d}.png", seed=i)
    write_image(cat / "test" / "good" / "000.png", seed=5)
    for i in range(2):
        write_image(cat / "test" / "crack" / f"{i:03d}.png", seed=6 + i)
        write_mask(cat / "ground_truth" / "crack" / f"{i:03d}_mask.png")
    write_image(cat / "test" / "scratch" / "000.png", seed=9)
    assert load_mvtec_ad(tmp_path / "mvtec", "bottle", "train", cache_dir=cache).num_rows == 3
    with pytest.warns(DataWarning, match="scratch/000.png: anomalous image without a ground-truth mask"):
        test = load_mvtec_ad(tmp_path / "mvtec", "bottle", "test", cache_dir=cache)
    assert test.features == dataset_features()
    rows = {row["path"].split("test/")[1]: row for row in test}
    assert rows["good/000.png"]["label"] == 0 and rows["good/000.png"]["masks"] == []
    crack = rows["crack/001.png"]
    assert (crack["label"], crack["anomaly_type"], crack["defect_type"], len(crack["masks"])) == (1, 2, ["crack"], 1)
    assert rows["scratch/000.png"]["masks"] == [] and rows["scratch/000.png"]["anomaly_type"] == 2
    with pytest.raises(ValueError, match="no validation split"):
        load_mvtec_ad(tmp_path / "mvtec", "bottle", "validation", cache_dir=cache)


def test_folder_layout(tmp_path, cache):
    root = tmp_path / "my_parts"
    for i in range(3):
        write_image(root / "train" / "good" / f"img{i}.jpg", seed=i)
    write_image(root / "test" / "good" / "a.png", seed=3)
    write_image(root / "test" / "dent" / "b.png", seed=4)
    write_mask(root / "ground_truth" / "dent" / "b_mask.png")
    write_image(root / "test" / "logical_anomalies" / "c.png", seed=5)
    write_mask(root / "ground_truth" / "logical_anomalies" / "c" / "000.png")
    write_mask(root / "ground_truth" / "logical_anomalies" / "c" / "001.png", box=(20, 20, 30, 30))
    write_image(root / "test" / "wrong_order" / "d.png", seed=6)

    train = load_folder(root, "train", cache_dir=cache)
    assert train.num_rows == 3 and set(train["category"]) == {"my_parts"} and set(train["label"]) == {0}
    test = load_folder(root, "test", cache_dir=cache, anomaly_types={"wrong_order": "logical"})
    rows = {row["path"].split("test/")[1]: row for row in test}
    assert rows["good/a.png"]["anomaly_type"] == 0
    assert (rows["dent/b.png"]["anomaly_type"], rows["dent/b.png"]["defect_type"], len(rows["dent/b.png"]["masks"])) == (2, ["dent"], 1)
    assert (rows["logical_anomalies/c.png"]["anomaly_type"], len(rows["logical_anomalies/c.png"]["masks"])) == (1, 2)
    assert rows["wrong_order/d.png"]["anomaly_type"] == 1 and rows["wrong_order/d.png"]["masks"] == []
    with pytest.raises(FileNotFoundError, match="validation/good folder not found"):
        load_folder(root, "validation", cache_dir=cache)
    with pytest.raises(ValueError, match="anomaly_types names folders that do not exist"):
        load_folder(root, "test", cache_dir=cache, anomaly_types={"nothing": "logical"})
    with pytest.raises(FileNotFoundError, match="no normal images in .*empty_project; put them in DIR/good"):
        load_folder(tmp_path / "empty_project", "train", cache_dir=cache) if (tmp_path / "empty_project").mkdir() is None else None
    (tmp_path / "half_project" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="train/good folder not found"):
        load_folder(tmp_path / "half_project", "train", cache_dir=cache)


def test_no_warnings_on_clean_data(synthloco_small, cache):
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        load_loco(synthloco_small, "screw_bag", "test", cache_dir=cache)
