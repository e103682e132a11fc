"""`ladmim predict` on bad and odd files: every readable file is scored (exactly as the library scores
its decoded image), every unreadable one is reported with a message naming it, and one bad file
never stops the others from being scored."""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ladmim_hf import LadmimImageProcessor
from ladmim_hf import visualization as V
from ladmim_hf.cli import main
from ladmim_hf.models.image_processing_ladmim import load_image

CATEGORY = "pushpins"
NUM_MASKS = 2
SIZE = (40, 30)  # (W, H) of the readable test images; not square, so a wrong EXIF rotation shows


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG header declaring `width x height` RGB with an empty IDAT: a decompression bomb's
    header in 60-odd bytes, without allocating its pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b""))
                     + _png_chunk(b"IEND", b""))
    return path


def _make_inputs(folder: Path) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """Write the test files; returns `good` (name -> expected (W, H) after EXIF) and `bad` (name -> a
    phrase the error message must contain besides the path)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8))
    rgb.save(folder / "plain.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "one_pixel.png")
    Image.fromarray(rng.integers(0, 65536, (SIZE[1], SIZE[0]), dtype=np.uint16)).save(folder / "deep16.png")
    rgb.convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rgb.save(folder / "exif_rotated.jpg", exif=exif)
    # Check the writers produced what the test means to feed in.
    assert Image.open(folder / "deep16.png").mode == "I;16"
    assert Image.open(folder / "palette.png").mode == "P"
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    assert Image.open(folder / "exif_rotated.jpg").getexif()[0x0112] == 6

    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 256, 200, dtype=np.uint8)))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image, just text with a .png name\n")
    _png_header_only(folder / "bomb.png", 20000, 20000)  # over PIL's own hard limit: refused at open
    _png_header_only(folder / "big.png", 11000, 11000)  # under PIL's limit, over our max_pixels guard
    good = {"plain.png": SIZE, "one_pixel.png": (1, 1), "deep16.png": SIZE, "palette.png": SIZE, "cmyk.jpg": SIZE,
            "exif_rotated.jpg": SIZE[::-1]}
    bad = {"corrupt.png": "cannot read image", "truncated.png": "truncated", "empty.png": "0 bytes",
           "notes.png": "cannot identify image file", "bomb.png": "too large to decode safely",
           "big.png": "decompression-bomb guard"}
    return good, bad


@pytest.fixture
def model_dir(tmp_path, tiny_model):
    folder = tmp_path / "model"
    tiny_model.save_pretrained(folder)
    LadmimImageProcessor(size=64).save_pretrained(folder)
    return folder


def _run_predict(capsys, inputs: list[str], model_dir: Path, out_dir: Path, seed: int = 0, extra: tuple = ()):
    code = main(["predict", *inputs, "--model", str(model_dir), "--category", CATEGORY, "--num_masks", str(NUM_MASKS),
                 "--seed", str(seed), "--output_dir", str(out_dir), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _table(stdout: str) -> dict[str, dict]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["image", "fused_score", "verdict"])
    rows = {}
    for line in lines[header + 1:]:
        if line.startswith(("heat maps: ", "results: ")):  # the footer after the table
            break
        path, score, verdict, logical, structural, heatmap = line.split()
        rows[path] = dict(score=float(score), verdict=verdict, logical=float(logical), structural=float(structural),
                          heatmap=Path(heatmap))
    return rows


def _expected_scores(tiny_model, path: str, index: int, seed: int) -> tuple[float, float, float]:
    """What the library gives for this file at the seed predict uses for position `index`."""
    processor = LadmimImageProcessor(size=64)
    with torch.no_grad():
        out = tiny_model(**processor(load_image(path)), category=CATEGORY, num_masks=NUM_MASKS, seed=seed)
    return float(out.pred_score[0]), float(out.logical_score[0]), float(out.structural_score[0])


def _library_map(model, path: str, seed: int, threshold: float | None = None):
    """`(image, output, fused map at image size)` the library gives for this file."""
    processor = LadmimImageProcessor(size=64)
    image = load_image(path)
    with torch.no_grad():
        out = model(**processor(image), category=CATEGORY, num_masks=NUM_MASKS, seed=seed, threshold=threshold)
    return image, out, processor.postprocess_anomaly_map(out.anomaly_map, image.size[::-1])[0].numpy()


def _check_heatmap_png(png: Path, image: Image.Image, anomaly_map: np.ndarray, size: tuple[int, int],
                       scale: tuple[float, float]) -> None:
    """The PNG's top left is the overlay of `anomaly_map` on the fixed colour `scale`, enlarged by the
    whole factor that brings the `size` (W, H) image to >= 320 px tall; a colour bar fills the rest."""
    factor = -(-320 // size[1])
    expected = V.heatmap_overlay(image, anomaly_map, vmin=scale[0], vmax=scale[1])
    expected = expected.resize((size[0] * factor, size[1] * factor), Image.NEAREST)
    with Image.open(png) as saved:
        assert saved.height == max(size[1] * factor, 320) and saved.width > size[0] * factor + 100, saved.size
        overlay = np.asarray(saved.convert("RGB").crop((0, 0, *expected.size))).astype(int)
    assert np.abs(overlay - np.asarray(expected).astype(int)).max() <= 1, png


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # big.png is refused by our guard
def test_predict_folder_with_bad_and_odd_files(tmp_path, capsys, model_dir, tiny_model):
    good, bad = _make_inputs(tmp_path / "images")
    out_dir = tmp_path / "predictions"
    code, stdout, stderr = _run_predict(capsys, [str(tmp_path / "images")], model_dir, out_dir, seed=5)

    assert code == 1, "unreadable inputs must give a non-zero exit status"
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    for name, reason in bad.items():
        lines = [line for line in errors if str(tmp_path / "images" / name) in line]
        assert len(lines) == 1, f"{name} is not reported exactly once by path:\n{stderr}"
        assert reason in lines[0], (name, lines[0])
    assert f"{len(bad)} input(s) could not be scored" in stderr and f"{len(good)} of {len(good) + len(bad)} image(s) scored" in stderr

    rows = _table(stdout)
    assert sorted(Path(p).name for p in rows) == sorted(good), "every readable file is scored, no unreadable one"
    order = sorted(str(p) for p in (tmp_path / "images").iterdir())  # predict's order: sorted folder listing
    for path, row in rows.items():
        name = Path(path).name
        assert all(math.isfinite(row[k]) for k in ("score", "logical", "structural")), (name, row)
        assert row["verdict"] in ("good", "anomalous")
        score, logical, structural = _expected_scores(tiny_model, path, order.index(path), seed=5)
        # The table prints 3-4 decimals; the library's own scores for the decoded image must match.
        assert row["score"] == pytest.approx(score, abs=1e-3), name
        assert row["logical"] == pytest.approx(logical, abs=1e-4), name
        assert row["structural"] == pytest.approx(structural, abs=1e-4), name
        assert row["heatmap"] == out_dir / f"{Path(name).stem}_heatmap.png"
        # The uncalibrated tiny model's threshold is the default 3.0, so the fixed scale is [0, 6];
        # the size is hand-given, so a heat map of the un-rotated EXIF image fails.
        image, _, anomaly_map = _library_map(tiny_model, path, seed=5)
        _check_heatmap_png(row["heatmap"], image, anomaly_map, good[name], (0.0, 6.0))
    assert "threshold 3.000 (model default: not calibrated)" in stdout
    assert f"heat maps: {len(good)} written to {out_dir} (" in stdout
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(f"{Path(n).stem}_heatmap.png" for n in good)


def test_predict_list_keeps_scoring_after_bad_files(tmp_path, capsys, model_dir, tiny_model):
    _make_inputs(tmp_path / "images")
    images = tmp_path / "images"
    empty_folder = tmp_path / "nothing_here"
    empty_folder.mkdir()
    files = [images / "empty.png", images / "plain.png", tmp_path / "missing.png", images / "notes.png",
             images / "one_pixel.png", images / "bomb.png", images / "cmyk.jpg"]
    code, stdout, stderr = _run_predict(capsys, [*map(str, files), str(empty_folder)], model_dir, tmp_path / "out")
    assert code == 1
    assert f"error: image file is empty (0 bytes): {images / 'empty.png'}" in stderr
    assert f"error: image file not found: {tmp_path / 'missing.png'}" in stderr
    assert f"error: cannot read image {images / 'notes.png'}: UnidentifiedImageError" in stderr
    assert f"error: image {images / 'bomb.png'} is too large to decode safely" in stderr
    assert f"error: no files in folder {empty_folder}" in stderr
    assert "5 input(s) could not be scored" in stderr and "3 of 7 image(s) scored" in stderr
    rows = _table(stdout)
    scored = [str(images / name) for name in ("plain.png", "one_pixel.png", "cmyk.jpg")]
    assert list(rows) == scored, "the good files after each bad one are still scored, in input order"
    for path in scored:  # each keeps the seed of its own position, whatever failed before it
        expected = _expected_scores(tiny_model, path, [str(f) for f in files].index(path), seed=0)[0]
        assert rows[path]["score"] == pytest.approx(expected, abs=1e-3), path


def test_predict_only_good_files_succeeds(tmp_path, capsys, model_dir):
    good, _ = _make_inputs(tmp_path / "images")
    inputs = [str(tmp_path / "images" / name) for name in good]
    code, stdout, stderr = _run_predict(capsys, inputs, model_dir, tmp_path / "out")
    assert code == 0, stderr
    assert "error:" not in stderr
    assert list(_table(stdout)) == inputs, "rows in input order"


def test_predict_with_a_bf16_predictor_scores_close_to_float32(tmp_path, capsys, model_dir):
    good, _ = _make_inputs(tmp_path / "images")
    inputs = [str(tmp_path / "images" / name) for name in good]
    _, stdout, _ = _run_predict(capsys, inputs, model_dir, tmp_path / "fp32")
    code, stdout_bf16, stderr = _run_predict(capsys, inputs, model_dir, tmp_path / "bf16", extra=("--predictor_dtype", "bf16"))
    assert code == 0, stderr
    fp32, bf16 = _table(stdout), _table(stdout_bf16)
    assert list(fp32) == list(bf16) == inputs
    for path in inputs:
        assert bf16[path]["score"] == pytest.approx(fp32[path]["score"], abs=0.25), path
        assert bf16[path]["structural"] == fp32[path]["structural"], "the tokenizer stays float32"


def test_heatmap_names_never_overwrite_each_other():
    from ladmim_hf.cli import _heatmap_names

    assert _heatmap_names(["imgs/a/x.png", "imgs/b/x.png", "imgs/a/y.png"]) == [
        "a__x_png_heatmap.png", "b__x_png_heatmap.png", "y_heatmap.png"]
    assert _heatmap_names(["x.png", "x.jpg"]) == ["x_png_heatmap.png", "x_jpg_heatmap.png"]
    assert _heatmap_names(["d/x.png", "d/x.png"]) == ["x_png_heatmap.png", "x_png_2_heatmap.png"]
    assert _heatmap_names(["one.png"]) == ["one_heatmap.png"]


def test_predict_same_file_name_in_two_folders_keeps_both_heatmaps(tmp_path, capsys, model_dir):
    _make_inputs(tmp_path / "a")
    name = "plain.png"
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / name).write_bytes((tmp_path / "a" / name).read_bytes())
    inputs = [str(tmp_path / "a" / name), str(tmp_path / "b" / name)]
    code, stdout, stderr = _run_predict(capsys, inputs, model_dir, tmp_path / "out")
    assert code == 0, stderr
    heatmaps = [row["heatmap"] for row in _table(stdout).values()]
    assert len(set(heatmaps)) == 2 and all(Path(h).is_file() for h in heatmaps)


def test_predict_prints_a_column_per_enabled_branch(tmp_path, capsys):
    from conftest import fitted_branch_model

    model = fitted_branch_model()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    LadmimImageProcessor(size=64).save_pretrained(model_dir)
    _make_inputs(tmp_path / "images")
    inputs = [str(tmp_path / "images" / name) for name in ("plain.png", "cmyk.jpg")]
    code, stdout, stderr = _run_predict(capsys, inputs, model_dir, tmp_path / "out", seed=1)
    assert code == 0, stderr
    lines = [line.split() for line in stdout.splitlines() if line.strip()]
    header = next(line for line in lines if line[:3] == ["image", "fused_score", "verdict"])
    assert header == ["image", "fused_score", "verdict", "logical", "structural", "memory_bank", "global", "heatmap"]
    rows = {line[0]: dict(zip(header, line)) for line in lines[lines.index(header) + 1:] if line[0] != "heat"}
    assert list(rows) == inputs
    processor = LadmimImageProcessor(size=64)
    for index, path in enumerate(inputs):
        with torch.no_grad():
            out = model(**processor(load_image(path)), category=CATEGORY, num_masks=NUM_MASKS, seed=1)
        assert float(rows[path]["fused_score"]) == pytest.approx(float(out.pred_score[0]), abs=1e-3), path
        for branch, value in out.branch_scores().items():
            assert float(rows[path][branch]) == pytest.approx(float(value[0]), abs=1e-4), (path, branch)


def _branch_model_dir(tmp_path: Path, threshold: float | None = None):
    """The all-branch model (calibrated with BRANCH_STATS: threshold 1.0, or `threshold`) saved with its processor."""
    from conftest import fitted_branch_model

    model = fitted_branch_model()
    if threshold is not None:
        model.config.calibration[CATEGORY]["threshold"] = threshold
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    LadmimImageProcessor(size=64).save_pretrained(folder)
    return model, folder


FIELDS = ["path", "category", "logical_score", "structural_score", "memory_bank_score", "global_score", "fused_score",
          "threshold", "verdict", "heatmap", "error"]


def _read_results(path: Path) -> list[dict]:
    """Records of a --output file, CSV cells turned back into numbers / None."""
    import csv
    import json

    text = path.read_text()
    assert text.endswith("\n"), "the file is complete: its last record ends its line"
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines()]
    reader = csv.DictReader(text.splitlines())
    assert reader.fieldnames == FIELDS
    numeric = {f for f in FIELDS if f.endswith("_score")} | {"threshold"}
    return [{k: (None if v == "" else float(v) if k in numeric else v) for k, v in row.items()} for row in reader]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_predict_output_file_has_a_record_per_input(tmp_path, capsys, suffix):
    model, model_dir = _branch_model_dir(tmp_path)
    _make_inputs(tmp_path / "images")
    images = tmp_path / "images"
    (tmp_path / "empty").mkdir()
    good = [str(images / "plain.png"), str(images / "cmyk.jpg")]
    inputs = [good[0], str(images / "notes.png"), str(tmp_path / "empty"), good[1]]
    fused = [float(_library_map(model, p, seed=3)[1].pred_score[0]) for p in good]
    assert fused[0] != fused[1]
    threshold = sum(fused) / 2  # between the two: one verdict of each kind
    results = tmp_path / "out" / f"results{suffix}"
    code, stdout, stderr = _run_predict(capsys, inputs, model_dir, tmp_path / "heatmaps", seed=3,
                                        extra=("--output", str(results), "--threshold", repr(threshold)))
    assert code == 1, "the unreadable file and the empty folder still fail the run"
    assert sorted(p.name for p in results.parent.iterdir()) == [results.name], "no temporary file is left"
    records = _read_results(results)
    assert [r["path"] for r in records] == inputs, "one record per input, in input order"
    assert all(list(r) == FIELDS for r in records)
    for path, record in zip(good, records[::3]):
        _, out, _ = _library_map(model, path, seed=3, threshold=threshold)
        assert record["error"] is None and record["category"] == CATEGORY
        for branch, value in out.branch_scores().items():
            assert record[f"{branch}_score"] == pytest.approx(float(value[0]), rel=1e-6), (path, branch)
        assert record["fused_score"] == pytest.approx(float(out.pred_score[0]), rel=1e-6)
        assert record["threshold"] == pytest.approx(threshold, rel=1e-12)
        assert record["verdict"] == ("anomalous" if record["fused_score"] > threshold else "good")
        assert Path(record["heatmap"]).is_file()
    assert sorted(r["verdict"] for r in records[::3]) == ["anomalous", "good"]
    for record, reason in zip(records[1:3], ["cannot identify image file", "no files in folder"]):
        assert reason in record["error"] and record["path"] in record["error"]
        assert all(record[f] is None for f in FIELDS if f.endswith("_score") or f in ("verdict", "heatmap"))
    assert f"threshold {threshold:.3f} (--threshold)" in stdout
    assert f"results: 4 record(s) written to {results}" in stdout


def test_predict_output_default_threshold_is_the_calibrated_one(tmp_path, capsys):
    # Threshold 100: this model's fused maps (about 137 to 149 here) fall inside the fixed scale
    # [0, 200] rather than all clipping, so a heat map on any other scale shows other colours.
    model, model_dir = _branch_model_dir(tmp_path, threshold=100.0)
    _make_inputs(tmp_path / "images")
    path = str(tmp_path / "images" / "plain.png")
    results = tmp_path / "r.jsonl"
    code, stdout, stderr = _run_predict(capsys, [path], model_dir, tmp_path / "heatmaps",
                                        extra=("--output", str(results)))
    assert code == 0, stderr
    [record] = _read_results(results)
    assert record["threshold"] == 100.0
    assert record["verdict"] == ("anomalous" if record["fused_score"] > 100.0 else "good")
    assert "threshold 100.000 (calibrated)" in stdout
    image, _, anomaly_map = _library_map(model, path, seed=0)
    assert 0.0 < anomaly_map.min() and anomaly_map.max() < 200.0, "the map is inside the scale, not clipped"
    _check_heatmap_png(Path(record["heatmap"]), image, anomaly_map, SIZE, (0.0, 200.0))
    with pytest.raises(AssertionError):  # per-image min-max (the old rendering) is not what was written
        _check_heatmap_png(Path(record["heatmap"]), image, anomaly_map, SIZE, (anomaly_map.min(), anomaly_map.max()))


@pytest.mark.parametrize("name", ["results.txt", "results", "results.json"])
def test_predict_output_with_another_extension_is_refused_before_loading(tmp_path, capsys, name):
    with pytest.raises(SystemExit) as exit_info:
        # the model folder does not exist: the error must come from the flag, before any loading
        main(["predict", "x.png", "--model", str(tmp_path / "no_model"), "--output", str(tmp_path / name)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "argument --output" in err and ".jsonl or .csv" in err and "cannot load" not in err
    assert not (tmp_path / name).exists()
