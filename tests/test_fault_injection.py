"""Inference that never lies: corrupt models, bad configs, bad arguments and foreign code are refused
with one line naming the problem, and no verdict is ever given from a non-finite score."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from ladmim_hf import LadmimForAnomalyDetection, LadmimImageProcessor
from ladmim_hf.cli import main
from ladmim_hf.hub import ModelFolderError, add_pipeline_to_folder, load_model

CATEGORY = "pushpins"
STATS = {"logical_mean": 0.0, "logical_std": 1.0, "structural_mean": 0.0, "structural_std": 1.0, "threshold": 3.0}


def _model() -> LadmimForAnomalyDetection:
    torch.manual_seed(0)
    model = LadmimForAnomalyDetection(tiny_config(num_masks=2)).eval()
    model.config.calibration = {c: dict(STATS) for c in model.categories}
    return model


def _folder(tmp_path: Path, model: LadmimForAnomalyDetection | None = None, name: str = "model") -> Path:
    folder = tmp_path / name
    (model or _model()).save_pretrained(folder)
    LadmimImageProcessor(size=64).save_pretrained(folder)
    add_pipeline_to_folder(folder)
    return folder


def _image(tmp_path: Path) -> Path:
    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse errors and one-line refusals
        code = stop.code if isinstance(stop.code, int) else 1
        if isinstance(stop.code, str):
            print(stop.code, file=__import__("sys").stderr)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


# --------------------------------------------------------------------------------------------------
# Non-finite values
# --------------------------------------------------------------------------------------------------


def test_nan_weights_are_refused_at_load_naming_the_tensor(tmp_path, capsys):
    model = _model()
    with torch.no_grad():
        model.predictors[CATEGORY].head.weight[0, 0] = float("nan")
    folder = _folder(tmp_path, model)
    with pytest.raises(ValueError, match="predictors.pushpins.head.weight"):
        LadmimForAnomalyDetection.from_pretrained(folder)
    with pytest.raises(ModelFolderError, match="NaN or inf"):
        load_model(folder, check_code=False)
    code, out, err = _run(["predict", str(_image(tmp_path)), "--model", str(folder), "--category", CATEGORY,
                           "--output_dir", str(tmp_path / "out")], capsys)
    assert code != 0 and "predictors.pushpins.head.weight" in err and "good" not in out


def test_a_non_finite_score_is_an_error_never_a_verdict(pixel_values):
    model = _model()
    broken = pixel_values.clone()
    broken[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match=r"score is not finite .* image\(s\) \[1\]"):
        model(broken, category=CATEGORY, num_masks=2, seed=[0, 1, 2])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "3.0"])
def test_bad_calibration_in_config_json_is_refused_at_load_naming_the_field(tmp_path, value):
    folder = _folder(tmp_path)
    calibration = {c: dict(STATS) for c in tiny_config().categories}
    calibration[CATEGORY]["threshold"] = value
    _edit_config(folder, calibration=calibration)
    with pytest.raises(ModelFolderError, match=r"calibration\['pushpins'\]\['threshold'\] must be a finite number"):
        load_model(folder, check_code=False)


def test_calibration_set_after_loading_is_checked_before_use(pixel_values):
    model = _model()
    model.config.calibration[CATEGORY]["structural_std"] = 0.0
    with pytest.raises(ValueError, match=r"calibration\['pushpins'\]\['structural_std'\] must be positive"):
        model(pixel_values, category=CATEGORY, num_masks=1, seed=0)
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        _model()(pixel_values, category=CATEGORY, num_masks=1, seed=0, threshold=float("nan"))


# --------------------------------------------------------------------------------------------------
# Memory bounded by design
# --------------------------------------------------------------------------------------------------


def test_masks_run_in_chunks_the_memory_budget_holds_with_identical_scores(pixel_values, monkeypatch):
    model = _model()
    predictor = model.predictor_for(CATEGORY)
    per_sequence = predictor.inference_bytes_per_sequence()
    expected_chunk = 2**20 // per_sequence
    assert 1 <= expected_chunk < 60, "the test needs a budget smaller than its 3 x 20 sequences"
    reference = model(pixel_values, category=CATEGORY, num_masks=20, seed=[0, 1, 2], max_sequences_per_chunk=60)
    seen = []
    forward = predictor.embeddings.forward

    def spy(patches, masks):
        seen.append(patches.shape[0])
        return forward(patches, masks)

    monkeypatch.setattr(predictor.embeddings, "forward", spy)
    model.config.scoring_memory_mb = 1
    out = model(pixel_values, category=CATEGORY, num_masks=20, seed=[0, 1, 2])
    assert max(seen) == expected_chunk and sum(seen) == 60
    torch.testing.assert_close(out.mask_scores, reference.mask_scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.pred_score, reference.pred_score, rtol=1e-5, atol=1e-6)


def test_num_masks_zero_is_refused_not_silently_the_default(pixel_values):
    with pytest.raises(ValueError, match="num_masks must be a whole number >= 1"):
        _model()(pixel_values, category=CATEGORY, num_masks=0, seed=0)


# --------------------------------------------------------------------------------------------------
# Config types
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, field", [
    ({"num_masks": "ten"}, "config.num_masks"),
    ({"score_num_masked": "44"}, "config.score_num_masked"),
    ({"tokenizer_config": {**tiny_config().tokenizer_config.to_dict(), "grid_size": "14"}}, "tokenizer_config.grid_size"),
    ({"predictor_config": {**tiny_config().predictor_config.to_dict(), "hidden_size": 32.5}}, "predictor_config.hidden_size"),
])
def test_bad_config_types_are_refused_at_load_naming_the_field(tmp_path, changes, field):
    folder = _folder(tmp_path)
    _edit_config(folder, **changes)
    with pytest.raises(ModelFolderError, match=field.replace(".", r"\.")):
        load_model(folder, check_code=False)


# --------------------------------------------------------------------------------------------------
# Command-line arguments
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory.mktemp("cli"))


@pytest.mark.parametrize("extra, phrase", [
    (["--seed", "-1"], "whole number >= 0"),
    (["--num_masks", "0"], "whole number >= 1"),
    (["--num_masks", "-1"], "whole number >= 1"),
    (["--threshold", "nan"], "finite number"),
    (["--category", "nosuchcat"], "'nosuchcat' is not one this model was trained on"),
])
def test_bad_predict_arguments_get_one_line_and_a_nonzero_exit(tmp_path, capsys, model_folder, extra, phrase):
    argv = ["predict", str(_image(tmp_path)), "--model", str(model_folder), "--output_dir", str(tmp_path / "out")]
    if "--category" not in extra:
        argv += ["--category", CATEGORY]
    code, out, err = _run(argv + extra, capsys)
    assert code != 0 and phrase in err and not out


def test_bad_evaluate_batch_size_gets_one_line(tmp_path, capsys, model_folder):
    code, out, err = _run(["evaluate", "--model", str(model_folder), "--data_root", str(tmp_path),
                           "--output_dir", str(tmp_path / "eval"), "--batch_size", "0"], capsys)
    assert code == 2 and "whole number >= 1" in err


def test_missing_model_folder_gets_one_line(tmp_path, capsys):
    code, _, err = _run(["predict", str(_image(tmp_path)), "--model", str(tmp_path / "nothing"), "--category", CATEGORY],
                        capsys)
    assert code != 0 and "cannot load the model" in err


def test_predict_leaves_only_finished_heat_maps(tmp_path, capsys, model_folder, monkeypatch):
    import ladmim_hf.io_utils as io_utils

    argv = ["predict", str(_image(tmp_path)), "--model", str(model_folder), "--category", CATEGORY]
    out_dir = tmp_path / "out"
    code, out, _ = _run(argv + ["--output_dir", str(out_dir)], capsys)
    assert code == 0 and "image.png" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["image_heatmap.png"]
    Image.open(out_dir / "image_heatmap.png").verify()

    # Killed after the heat map's bytes were written but before they got their final name: nothing under
    # that name, and no temporary left behind.
    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(io_utils.os, "replace", killed)
    killed_dir = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        main(argv + ["--output_dir", str(killed_dir)])
    assert list(killed_dir.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# The remote-code boundary
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["config", "processor", "extra_file"])
def test_checked_loader_refuses_code_outside_the_shipped_files(tmp_path, where):
    folder = _folder(tmp_path)
    marker = tmp_path / "evil_ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    if where == "config":
        config = json.loads((folder / "config.json").read_text())
        config["auto_map"]["AutoModel"] = "evil.Model"
        (folder / "config.json").write_text(json.dumps(config))
    elif where == "processor":
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        processor["auto_map"] = {"AutoImageProcessor": "evil.Processor"}
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(ModelFolderError, match="evil"):
        load_model(folder, check_code=True)
    assert not marker.exists(), "the foreign module ran"


def test_fifos_and_looping_links_in_an_input_folder_are_named_and_counted(tmp_path, capsys, model_folder):
    import os

    folder = tmp_path / "inputs"
    folder.mkdir()
    Image.open(_image(tmp_path)).save(folder / "a.png")
    os.mkfifo(folder / "pipe")
    os.symlink(folder / "loop", folder / "loop")  # a link to itself
    (folder / "sub").mkdir()  # not recursive: a sub-folder is no input and no error
    code, out, err = _run(["predict", str(folder), "--model", str(model_folder), "--category", CATEGORY,
                           "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 1 and "a.png" in out
    assert f"{folder / 'pipe'}: not a regular file" in err and f"{folder / 'loop'}: not a regular file" in err
    assert "2 input(s) could not be scored" in err and "sub" not in err


@pytest.mark.parametrize("damage", ["missing", "trailing_comma"])
def test_a_missing_or_invalid_preprocessor_config_is_refused_not_silently_replaced(tmp_path, capsys, damage):
    folder = _folder(tmp_path)
    processor_file = folder / "preprocessor_config.json"
    if damage == "missing":
        processor_file.unlink()
    else:
        processor_file.write_text(processor_file.read_text().rstrip().rstrip("}") + ",}")
    argv = ["predict", str(_image(tmp_path)), "--model", str(folder), "--category", CATEGORY,
            "--output_dir", str(tmp_path / "out")]
    code, out, err = _run(argv, capsys)
    assert code != 0 and "preprocessor_config.json" in err and not out
    if damage == "missing":  # an explicit, warned fallback
        code, out, err = _run(argv + ["--allow_default_processor"], capsys)
        assert code == 0 and "image.png" in out


# --------------------------------------------------------------------------------------------------
# Decoding bounded by the model's needs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_images_longer_than_the_decode_side_are_reduced_on_decode(tmp_path, suffix):
    from ladmim_hf.models.image_processing_ladmim import MAX_DECODED_SIDE, load_image

    path = tmp_path / f"wide{suffix}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, MAX_DECODED_SIDE + 104, 3), dtype=np.uint8)).save(path)
    image = load_image(path)
    assert image.size == ((MAX_DECODED_SIDE + 104) // 2, 150) and image.mode == "RGB"


def test_a_strip_image_is_refused_from_its_header(tmp_path):
    import struct
    import time
    import warnings
    import zlib

    from ladmim_hf.models.image_processing_ladmim import ImageDecodeError, load_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path = tmp_path / "strip.png"  # 1 x 99,000,000 pixels, under the pixel guard, in 60-odd bytes
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 99_000_000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    started = time.perf_counter()
    with warnings.catch_warnings(), pytest.raises(ImageDecodeError, match="aspect ratio over 100:1"):
        warnings.simplefilter("ignore")  # PIL's own decompression-bomb warning at 89 MP
        load_image(path)
    assert time.perf_counter() - started < 1.0


def test_evaluate_with_a_missing_model_or_other_categories_gets_one_line(tmp_path, capsys, model_folder):
    from data_fixtures import make_loco_folder

    make_loco_folder(tmp_path / "data", "widget")
    argv = ["evaluate", "--data_root", str(tmp_path / "data"), "--output_dir", str(tmp_path / "eval")]
    code, _, err = _run(argv + ["--model", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = _run(argv + ["--model", str(model_folder)], capsys)
    assert code == 2 and "not trained on widget (it knows breakfast_box, pushpins)" in err


def test_the_pixel_budget_follows_the_decoding_cost_of_the_mode(tmp_path):
    import struct
    import warnings
    import zlib

    from ladmim_hf.models.image_processing_ladmim import ImageDecodeError, load_image

    def header_only(path: Path, width: int, height: int, depth: int, colour: int) -> Path:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
                         + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
        return path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 16-bit grey goes through float64: 8 bytes a pixel, so 50 MP is over a 100 MP-of-RGB budget
        with pytest.raises(ImageDecodeError, match=r"over the limit of 37500000 for mode I;16"):
            load_image(header_only(tmp_path / "deep.png", 10_000, 5_000, 16, 0))
        # the same size in 8-bit RGB is within the budget: it gets as far as decoding (and fails there)
        with pytest.raises(ImageDecodeError) as error:
            load_image(header_only(tmp_path / "rgb.png", 10_000, 5_000, 8, 2))
        assert "over the limit" not in str(error.value)
