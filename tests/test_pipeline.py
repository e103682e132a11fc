"""The `image-anomaly-detection` pipeline in-process: from a saved folder (the pipeline file travels with the
model through `custom_pipelines`) and from a loaded model. The remote path (a subprocess without `ladmim_hf`,
loading from an offline Hub cache) is exercised in `test_hub.py::test_push_then_load_back_without_ladmim_hf`,
together with the other Hub checks, to pay for one subprocess only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from ladmim_hf import LadmimImageProcessor
from ladmim_hf.hub import CUSTOM_PIPELINES, MODELS_DIR, ModelFolderError, add_pipeline_to_folder

TASK = "image-anomaly-detection"


@pytest.fixture
def saved(tmp_path, tiny_model):
    """A folder as training writes it (model + processor save_pretrained), then add_pipeline_to_folder."""
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    LadmimImageProcessor(size=64).save_pretrained(folder)
    add_pipeline_to_folder(folder)
    image = Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8))
    image_path = tmp_path / "image.png"
    image.save(image_path)
    return folder, image_path, image


def test_add_pipeline_to_folder(saved, tmp_path, tiny_model):
    folder, _, _ = saved
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"] == CUSTOM_PIPELINES
    assert config["auto_map"]["AutoModel"] == "modeling_ladmim.LadmimForAnomalyDetection"
    assert (folder / "pipeline_ladmim.py").read_text() == (MODELS_DIR / "pipeline_ladmim.py").read_text()
    add_pipeline_to_folder(folder)  # idempotent
    assert json.loads((folder / "config.json").read_text()) == config
    tokenizer_dir = tmp_path / "tokenizer"
    tiny_model.tokenizer.save_pretrained(tokenizer_dir)
    with pytest.raises(ModelFolderError, match="'ladmim_tokenizer' config"):
        add_pipeline_to_folder(tokenizer_dir)
    with pytest.raises(ModelFolderError, match="has no config.json"):
        add_pipeline_to_folder(tmp_path / "empty")


def test_pipeline_from_folder(saved, tiny_model):
    folder, image_path, image = saved
    detector = pipeline(TASK, model=str(folder), trust_remote_code=True)
    assert type(detector).__name__ == "LadmimAnomalyDetectionPipeline"
    assert type(detector).__module__.startswith("transformers_modules")  # the folder's copy of the file
    result = detector(str(image_path), category="pushpins", num_masks=4, seed=3)
    assert set(result) == {"score", "label", "logical_score", "structural_score", "anomaly_map"}
    assert result["label"] in ("anomalous", "good")
    assert result["anomaly_map"].size == image.size and result["anomaly_map"].mode == "F"

    processor = LadmimImageProcessor(size=64)
    expected = tiny_model(**processor(image), category="pushpins", num_masks=4, seed=[3])
    assert result["score"] == pytest.approx(float(expected.pred_score[0]), rel=1e-5)
    assert result["logical_score"] == pytest.approx(float(expected.logical_score[0]), rel=1e-5)
    assert result["structural_score"] == pytest.approx(float(expected.structural_score[0]), rel=1e-5)
    full = processor.postprocess_anomaly_map(expected.anomaly_map, (50, 70))[0].numpy()
    np.testing.assert_allclose(np.asarray(result["anomaly_map"]), full, rtol=1e-5, atol=1e-4)

    # PIL images, arrays and lists give the same scores (every image gets the same seed).
    batch = detector([image, np.asarray(image)], category="pushpins", num_masks=4, seed=3)
    assert [r["score"] for r in batch] == pytest.approx([result["score"]] * 2, rel=1e-6)
    assert detector(image, category="pushpins", num_masks=4, seed=3, threshold=-1e9)["label"] == "anomalous"
    assert detector(image, category="pushpins", num_masks=4, seed=3, threshold=1e9)["label"] == "good"
    assert np.isfinite(detector(image, category="pushpins", num_masks=4, seed=None)["score"])

    # Defaults given to pipeline() apply to every call.
    preset = pipeline(TASK, model=str(folder), trust_remote_code=True, category="pushpins", num_masks=4, seed=3)
    assert preset(image)["score"] == pytest.approx(result["score"], rel=1e-6)


def test_pipeline_bad_input(saved, tmp_path):
    folder, image_path, image = saved
    detector = pipeline(TASK, model=str(folder), trust_remote_code=True)
    with pytest.raises(ValueError, match="URLs are not supported.*download the image first"):
        detector("https://example.com/image.png", category="pushpins")
    with pytest.raises(ValueError, match="URLs are not supported"):
        detector([image, "http://example.com/a.png"], category="pushpins")
    with pytest.raises(ValueError, match=r"unknown category 'screw_bag'; this model was trained on \['breakfast_box', 'pushpins'\]"):
        detector(image, category="screw_bag")
    with pytest.raises(ValueError, match=r"several categories: pass category= \(one of \['breakfast_box', 'pushpins'\]\)"):
        detector(image)
    with pytest.raises(ValueError, match="num_masks must be a positive integer"):
        detector(image, category="pushpins", num_masks=0)
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['top_k'\]"):
        detector(image, category="pushpins", top_k=3)
    with pytest.raises(ValueError, match="image file not found: .*missing.png"):  # an ImageDecodeError
        detector(str(tmp_path / "missing.png"), category="pushpins")
    with pytest.raises(ValueError, match="no images given"):
        detector([], category="pushpins")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline(TASK, model=str(folder))


def test_pipeline_from_model_instance(tiny_model):
    import ladmim_hf.models.pipeline_ladmim  # noqa: F401  (registers the task in-process)

    detector = pipeline(TASK, model=tiny_model)  # no processor in reach: the default one is built
    assert detector.image_processor.size == 64
    image = Image.fromarray(np.full((30, 40, 3), 128, dtype=np.uint8))
    result = detector(image, category="breakfast_box", num_masks=3)
    assert result["anomaly_map"].size == (40, 30)
    assert isinstance(result["score"], float)
    with torch.no_grad():
        again = detector(image, category="breakfast_box", num_masks=3)
    assert again["score"] == result["score"]  # default seed 0: reproducible


def test_pipeline_bad_files_name_the_file_and_odd_files_are_scored(saved, tmp_path):
    """Issue 8's list through the pipeline: each bad file is refused naming it, each odd one is scored."""
    import struct
    import zlib

    folder, _, image = saved
    detector = pipeline(TASK, model=str(folder), trust_remote_code=True, category="pushpins", num_masks=2, seed=0)
    good = tmp_path / "good.png"
    image.save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all" * 10)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("just some text")
    bomb = tmp_path / "bomb.png"
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    for bad in (truncated, corrupt, empty, text, bomb):
        with pytest.raises(ValueError, match=bad.name):
            detector(str(bad))
    # The pipeline keeps serving after refusals.
    reference = detector(str(good))["score"]
    odd = {
        "one_pixel.png": Image.new("RGB", (1, 1), (120, 30, 200)),
        "sixteen_bit.png": Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)),
        "palette.png": image.convert("P"),
        "cmyk.jpg": image.convert("CMYK"),
    }
    for name, picture in odd.items():
        picture.save(tmp_path / name)
        result = detector(str(tmp_path / name))
        assert np.isfinite(result["score"]), name
        assert result["anomaly_map"].size == Image.open(tmp_path / name).size, name
    # EXIF orientation 6 (rotate 90): scored as the upright image, map in the upright size.
    exif = Image.Exif()
    exif[0x0112] = 6
    image.convert("RGB").save(tmp_path / "rotated.jpg", exif=exif)
    rotated = detector(str(tmp_path / "rotated.jpg"))
    assert rotated["anomaly_map"].size == (image.height, image.width)
    assert detector(str(good))["score"] == pytest.approx(reference, rel=1e-6)


def test_pipeline_reports_every_enabled_branch(tmp_path):
    from conftest import fitted_branch_model

    model = fitted_branch_model()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor = LadmimImageProcessor(size=64)
    processor.save_pretrained(folder)
    add_pipeline_to_folder(folder)
    image = Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8))

    result = pipeline(TASK, model=str(folder), trust_remote_code=True)(image, category="pushpins", num_masks=3, seed=2)
    assert list(result) == ["score", "label", "logical_score", "structural_score", "memory_bank_score", "global_score",
                            "anomaly_map"]
    with torch.no_grad():
        expected = model(**processor(image), category="pushpins", num_masks=3, seed=[2])
    for branch, value in expected.branch_scores().items():
        assert result[f"{branch}_score"] == pytest.approx(float(value[0]), rel=1e-5), branch
    assert result["score"] == pytest.approx(float(expected.pred_score[0]), rel=1e-5)
    full = processor.postprocess_anomaly_map(expected.anomaly_map, (40, 56))[0].numpy()
    np.testing.assert_allclose(np.asarray(result["anomaly_map"]), full, rtol=1e-5, atol=1e-4)
