"""A newcomer's path: a folder of their own good images, no LOCO layout anywhere.

`ladmim train` on the folder, `ladmim predict --output`, `ladmim calibrate` (normal and labelled),
`ladmim evaluate` on good/ next to named defect folders; every entry point gives the same score; and
every layout or argument mistake on the way is one `error:` line.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ladmim_hf import cli
from ladmim_hf.data import find_layout, holdout_split, normal_split
from ladmim_hf.data.layout import pair_categories

try:
    from tests.data_fixtures import write_image
    from tests.test_cli_errors import TINY_SETTINGS
    from tests.test_space_app import load_app_module
except ImportError:  # pragma: no cover
    from data_fixtures import write_image
    from test_cli_errors import TINY_SETTINGS
    from test_space_app import load_app_module

NUM_IMAGES = 10
HOLDOUT = 0.3
# The tiny model of test_cli_errors, with ImageNet weights (so images differ) and every branch.
SETTINGS = {
    **{k: v for k, v in TINY_SETTINGS.items() if k not in ("categories", "load_imagenet_weights")},
    "holdout_fraction": HOLDOUT,
    "model": {**TINY_SETTINGS["model"], "memory_bank_size": 16, "global_branch": True,
              "fused_branches": ["logical", "memory_bank", "global"]},
    "tokenizer": {**TINY_SETTINGS["tokenizer"], "batch_size": 4},
    "predictor": {**TINY_SETTINGS["predictor"], "batch_size": 4},
}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _scene(path: Path, seed: int, bright: bool = False) -> Path:
    """A smooth 48 px picture (a random blob on a gradient), brighter for the 'defects'."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:48] / 48.0
    cx, cy = rng.uniform(0.3, 0.7, 2)
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.02)
    array = np.stack([0.3 + 0.3 * x + 0.4 * blob, 0.3 + 0.3 * y, 0.5 - 0.2 * blob], -1) + (0.35 if bright else 0.0)
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A folder of 10 good images (directly in `widget/`), a tiny config file, and the trained run."""
    import datasets

    base = tmp_path_factory.mktemp("own")
    previous = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = str(base / "hf-cache")
    images = base / "widget"
    for i in range(NUM_IMAGES):
        _scene(images / f"img_{i:02d}.png", seed=i)
    labelled = base / "line_check"  # anomalib-Folder style: good/ next to a named defect folder
    for i in range(4):
        _scene(labelled / "good" / f"g{i}.png", seed=100 + i)
    for i in range(3):
        _scene(labelled / "too_bright" / f"b{i}.png", seed=200 + i, bright=True)
    config = base / "tiny.yaml"
    config.write_text(yaml.safe_dump(SETTINGS))
    run = base / "run"
    code = cli.main(["train", "--config", str(config), "--data_root", str(images), "--output_dir", str(run)])
    assert code == 0
    yield {"base": base, "images": images, "labelled": labelled, "config": config, "model": run / "model"}
    datasets.config.HF_DATASETS_CACHE = previous


def _load(model_dir: Path):
    from ladmim_hf.evaluation import load_detector

    return load_detector(str(model_dir))


# ---------------------------------------------------------------------------- layouts and the hold-out


def test_find_layout_reads_every_own_data_layout(tmp_path):
    write_image(tmp_path / "flat" / "a.png")
    write_image(tmp_path / "anomalib" / "good" / "a.png")
    write_image(tmp_path / "split" / "train" / "good" / "a.png")
    write_image(tmp_path / "many" / "bolt" / "train" / "good" / "a.png")
    write_image(tmp_path / "many" / "nut" / "good" / "a.png")
    for name, categories, single in (("flat", ("flat",), True), ("anomalib", ("anomalib",), True),
                                     ("split", ("split",), True), ("many", ("bolt", "nut"), False)):
        layout = find_layout(tmp_path / name)
        assert (layout.categories, layout.single_category, layout.dataset_format) == (categories, single, "folder")
    assert find_layout(tmp_path / "anomalib" / "good").categories == ("anomalib",), "DIR/good is named after DIR"


def test_holdout_depends_on_names_and_seed_only(tmp_path):
    paths = [f"/data/a/img_{i:02d}.png" for i in range(20)]
    kept, held = holdout_split(paths, 0.25, seed=3)
    assert len(held) == 5 and sorted(kept + held) == sorted(paths) and kept == [p for p in paths if p not in held]
    moved = [p.replace("/data/a/", "/elsewhere/") for p in reversed(paths)]
    assert sorted(Path(p).name for p in holdout_split(moved, 0.25, seed=3)[1]) == sorted(Path(p).name for p in held)
    assert holdout_split(paths, 0.25, seed=4)[1] != held, "another seed holds out other images"
    assert len(holdout_split(paths[:2], 0.01, 0)[1]) == 1 and len(holdout_split(paths[:2], 0.99, 0)[0]) == 1


def test_pair_categories_maps_a_one_category_folder_to_the_model(tmp_path):
    write_image(tmp_path / "line_check" / "good" / "a.png")
    layout = find_layout(tmp_path / "line_check")
    assert pair_categories(layout, "all", ["widget"]) == {"line_check": "widget"}
    assert pair_categories(layout, ["bolt"], ["widget", "bolt"]) == {"line_check": "bolt"}
    with pytest.raises(ValueError, match="say which one .* holds with --categories NAME"):
        pair_categories(layout, "all", ["widget", "bolt"])


# ---------------------------------------------------------------------------- train, predict, calibrate, evaluate


def test_train_on_a_folder_of_good_images_holds_out_calibration_images(own_run):
    detector, _ = _load(own_run["model"])
    assert detector.categories == ["widget"]
    summary = json.loads((own_run["model"] / "training_summary.json").read_text())
    assert summary["validation"]["widget"] == f"hold-out: 3 of {NUM_IMAGES} training images (holdout_fraction {HOLDOUT}, seed 0)"
    assert summary["holdout"] == {"fraction": HOLDOUT, "seed": 0}
    assert detector.config.calibration["widget"]["num_images"] == 3
    cache = torch.load(own_run["model"].parent / "cache" / "features.pt", weights_only=True)
    assert len(cache["train/widget"]) == NUM_IMAGES - 3 and len(cache["validation/widget"]) == 3


def test_predict_output_jsonl_and_calibrate(own_run, tmp_path, capsys, caplog):
    from ladmim_hf.calibration import calibration_statistics
    from ladmim_hf.scoring import branch_scores, extract_features

    results = tmp_path / "x.jsonl"
    code, output = _run(["predict", str(own_run["images"]), "--model", str(own_run["model"]), "--output", str(results),
                         "--output_dir", str(tmp_path / "maps")], capsys)
    assert code == 0, output
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(records) == NUM_IMAGES and all(Path(r["heatmap"]).is_file() for r in records)
    assert {r["verdict"] for r in records} <= {"good", "anomalous"}

    # Recalibrate at another false-positive rate: the threshold is training's formula on the same hold-out.
    model_dir = own_run["model"]
    before = json.loads((model_dir / "config.json").read_text())["calibration"]["widget"]
    with caplog.at_level(logging.WARNING, logger="ladmim_hf.calibration"):
        code, output = _run(["calibrate", "--model", str(model_dir), "--data_root", str(own_run["images"]),
                             "--fpr", "0.2"], capsys)
    assert code == 0, output
    assert "3 normal images cannot measure a false-positive rate of 0.2 (that needs at least 5)" in caplog.text
    detector, processor = _load(model_dir)
    held = normal_split(find_layout(own_run["images"]), "widget", HOLDOUT, 0).validation
    features = extract_features(detector.tokenizer, processor, held, 4, "test")
    expected = calibration_statistics(branch_scores(detector, features, "widget", None, 0),
                                      detector.config.fused_branches, detector.config.fusion_rule, 0.2)
    saved = detector.config.calibration["widget"]
    assert saved["threshold"] == pytest.approx(expected["threshold"], abs=1e-5)
    assert saved["threshold"] < before["threshold"], "a higher false-positive rate lowers the threshold"
    assert saved["global_mean"] == pytest.approx(before["global_mean"], abs=1e-5), "same images, same z statistics"
    assert not list(model_dir.glob("*.tmp*")), "written atomically, no temporaries left"
    summary = json.loads((model_dir / "training_summary.json").read_text())
    trained_fusion = (detector.config.fused_branches, detector.config.fusion_rule)
    assert summary["recalibrated"] == {"categories": ["widget"], "fpr": 0.2, "labelled": False,
                                       "fused_branches": trained_fusion[0], "fusion_rule": trained_fusion[1],
                                       "logical_pose_step": 0}

    # Another fusion without retraining: the logical branch left out, the other two summed. The threshold is
    # training's formula for that fusion, and the detector's fused score is now that sum of z-scores.
    code, output = _run(["calibrate", "--model", str(model_dir), "--data_root", str(own_run["images"]), "--fpr", "0.2",
                         "--fused_branches", "memory_bank", "global", "--fusion_rule", "sum"], capsys)
    assert code == 0, output
    assert "fused: memory_bank + global (sum)" in output
    refit = _load(model_dir)[0]
    assert (refit.config.fused_branches, refit.config.fusion_rule) == (["memory_bank", "global"], "sum")
    expected = calibration_statistics(branch_scores(refit, features, "widget", None, 0), ["memory_bank", "global"], "sum", 0.2)
    stats = refit.config.calibration["widget"]
    assert stats["threshold"] == pytest.approx(expected["threshold"], abs=1e-5)
    out = refit(features=features, category="widget")
    by_hand = ((out.memory_bank_score - stats["memory_bank_mean"]) / stats["memory_bank_std"]
               + (out.global_score - stats["global_mean"]) / stats["global_std"])
    torch.testing.assert_close(out.pred_score, by_hand)
    assert json.loads((model_dir / "training_summary.json").read_text())["recalibrated"]["fusion_rule"] == "sum"
    code, output = _run(["calibrate", "--model", str(model_dir), "--data_root", str(own_run["images"]), "--fpr", "0.2",
                         "--fused_branches", *trained_fusion[0], "--fusion_rule", trained_fusion[1]], capsys)
    assert code == 0, output  # back to the trained fusion for the tests that follow

    # The logical branch at the best-fitting of five poses, switched on without retraining: the validation
    # images are scored at every pose, as `model(pixel_values)` scores them; a bad step is one error line.
    code, output = _run(["calibrate", "--model", str(model_dir), "--data_root", str(own_run["images"]), "--fpr", "0.2",
                         "--logical_pose_step", "3"], capsys)
    assert code == 0 and "logical poses: 3 px" in output, output
    posed = _load(model_dir)[0]
    assert posed.config.logical_pose_step == 3
    with torch.no_grad():
        logical = posed(pixel_values=processor(held)["pixel_values"], category="widget").logical_score
    assert posed.config.calibration["widget"]["logical_mean"] == pytest.approx(float(logical.mean()), rel=1e-5)
    code, output = _run(["calibrate", "--model", str(model_dir), "--data_root", str(own_run["images"]),
                         "--logical_pose_step", "-2"], capsys)
    assert code == 2 and output.strip().splitlines()[-1].startswith("error: logical_pose_step must be"), output
    code, output = _run(["calibrate", "--model", str(model_dir), "--data_root", str(own_run["images"]), "--fpr", "0.2",
                         "--logical_pose_step", "0"], capsys)
    assert code == 0 and _load(model_dir)[0].config.logical_pose_step == 0, output

    code, output = _run(["calibrate", "--model", str(model_dir), "--data_root", str(own_run["labelled"]), "--labelled"],
                        capsys)
    assert code == 0, output
    stats = _load(model_dir)[0].config.calibration["widget"]
    assert (stats["num_images"], stats["num_anomalous"]) == (4, 3)


def test_evaluate_on_good_next_to_named_defect_folders(own_run, tmp_path, capsys):
    out = tmp_path / "eval"
    code, output = _run(["evaluate", "--model", str(own_run["model"]), "--data_root", str(own_run["labelled"]),
                         "--output_dir", str(out)], capsys)
    assert code == 0, output
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["categories"]) == ["widget"], "the one-category folder is scored as the model's category"
    assert metrics["per_defect"]["widget"]["too_bright"]["count"] == 3
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["defect_type"] for r in rows) == [""] * 4 + ["too_bright"] * 3
    assert (out / "report.md").is_file()


def test_every_entry_point_and_batch_order_gives_the_same_score(own_run):
    """CLI, the README's Python lines, the pipeline and the Space, with default arguments; and a batch in
    another order or size: equal to 1e-5."""
    from transformers import pipeline

    from ladmim_hf.models.image_processing_ladmim import load_image
    from ladmim_hf.scoring import extract_features

    model_dir = own_run["model"]
    paths = sorted(str(p) for p in own_run["images"].glob("*.png"))[:4]
    detector, processor = _load(model_dir)
    category = "widget"

    python = [float(detector(**processor(load_image(p)), category=category).pred_score[0]) for p in paths]
    pipe = pipeline("image-anomaly-detection", model=str(model_dir), trust_remote_code=True)
    piped = [r["score"] for r in pipe(paths)]
    app = load_app_module()
    space_model, space_processor = app.load_model(str(model_dir))
    space = [app.score(space_model, space_processor, load_image(p), category, space_model.config.num_masks, None, 0)
             .pred_score for p in paths]
    cli_scores = []
    for p in paths:  # one file per call: a single file's score must not depend on the others
        out_file = model_dir.parent / "one.jsonl"
        assert cli.main(["predict", p, "--model", str(model_dir), "--output", str(out_file),
                         "--output_dir", str(model_dir.parent / "maps")]) == 0
        cli_scores.append(json.loads(out_file.read_text())["fused_score"])
    features = extract_features(detector.tokenizer, processor, paths, 4, "test")
    order = [2, 0, 3, 1]
    permuted = detector(features=features[order], category=category).pred_score
    batched = torch.empty(4)
    batched[order] = permuted
    pairs = torch.cat([detector(features=features[i:i + 2], category=category).pred_score for i in (0, 2)])
    for name, values in (("pipeline", piped), ("Space", space), ("CLI", cli_scores), ("permuted batch", batched),
                         ("batches of 2", pairs)):
        np.testing.assert_allclose(np.asarray(values, dtype=np.float64), python, rtol=0, atol=1e-5, err_msg=name)
    assert len(set(np.round(python, 4))) > 1, "the images score differently (the check is not vacuous)"


# ---------------------------------------------------------------------------- newcomer mistakes: one line each


def _one_line_error(code, output: str, *parts: str) -> None:
    assert code not in (0, None), output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error:") or ": error:" in line]
    assert len(lines) == 1, output
    for part in parts:
        assert part in lines[0], lines[0]


def test_newcomer_mistakes_are_one_line_errors(own_run, tmp_path, capsys):
    model, config = str(own_run["model"]), str(own_run["config"])
    empty = tmp_path / "empty"
    empty.mkdir()
    one = tmp_path / "one"
    write_image(one / "a.png")
    cases = [
        (["train", "--config", config, "--data_root", str(empty), "--output_dir", str(tmp_path / "r1")],
         ["no images found under", "DIR/good/"]),
        (["train", "--config", config, "--data_root", str(one), "--output_dir", str(tmp_path / "r2")],
         ["1 normal image(s) cannot be split", "validation/good"]),
        (["train", "--config", "no-such-config", "--data_root", str(one)], ["built-in config name", "synthloco-cpu"]),
        (["train", "--config", config, "--data_root", str(one), "--categories", "bolt", "--output_dir",
          str(tmp_path / "r3")], ["holds one category, named after its folder: 'one'"]),
        (["evaluate", "--model", model, "--data_root", str(own_run["images"]), "--output_dir", str(tmp_path / "e")],
         ["no test images in", "/good and"]),
        (["calibrate", "--model", str(tmp_path / "nowhere"), "--data_root", str(own_run["images"])],
         ["is not a local model folder"]),
        (["calibrate", "--model", model, "--data_root", str(own_run["images"]), "--fpr", "2"], ["--fpr must be between"]),
        (["calibrate", "--model", model, "--data_root", str(own_run["images"]), "--fused_branches", "global", "global"],
         ["fused_branches lists a branch twice"]),
        (["calibrate", "--model", model, "--data_root", str(own_run["images"]), "--labelled"],
         ["no test images in"]),
        (["predict", str(one / "a.png"), "--model", model, "--output", str(tmp_path / "x.txt")], ["--output"]),
    ]
    for argv, parts in cases:
        code, output = _run(argv, capsys)
        _one_line_error(code, output, *parts)
    for folder in ("r1", "r2", "r3", "e"):
        assert not (tmp_path / folder).exists(), f"{folder}: nothing half-written"


def test_newcomer_layouts_train_and_evaluate(own_run, tmp_path, capsys):
    """The layouts a newcomer tried: `mine/widget/train/good` without validation (also with
    `--set dataset_format=folder`), and evaluation of a `test/good` + `test/bad` folder."""
    mine = tmp_path / "mine"
    for i in range(4):
        _scene(mine / "widget" / "train" / "good" / f"{i}.png", seed=300 + i)
    for extra in ([], ["--set", "dataset_format=folder"]):
        run = tmp_path / f"run{len(extra)}"
        code, output = _run(["train", "--config", str(own_run["config"]), "--data_root", str(mine), "--output_dir",
                             str(run), *extra], capsys)
        assert code == 0, output
        assert "widget: 3 training images; calibration on hold-out: 1 of 4 training images" in output
    project = tmp_path / "project"
    for i in range(2):
        _scene(project / "test" / "good" / f"g{i}.png", seed=400 + i)
        _scene(project / "test" / "bad" / f"b{i}.png", seed=500 + i, bright=True)
    _scene(project / "train" / "good" / "t.png", seed=600)
    out = tmp_path / "eval"
    code, output = _run(["evaluate", "--model", str(own_run["model"]), "--data_root", str(project), "--output_dir",
                         str(out), "--no_knn"], capsys)
    assert code == 0 and "Traceback" not in output, output
    metrics = json.loads((out / "metrics.json").read_text())
    calibrated = metrics["operating_points"]["widget"]["calibrated"]
    assert calibrated["tp"] + calibrated["fn"] == 2 and calibrated["tn"] + calibrated["fp"] == 2
