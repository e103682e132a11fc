"""Training and evaluation faults end in one `error:` line naming the file or field and the fix, a
non-zero exit code and no traceback: YAML 1.2 numbers and number checks in settings, `--resume`
with other settings, missing or empty data folders (all in-process, seconds each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from ladmim_hf import cli, training
from ladmim_hf.training import TrainSettings, build_parser, load_settings, resume_differences, settings_from_args

try:
    from tests.data_fixtures import make_loco_folder
except ImportError:  # pragma: no cover
    from data_fixtures import make_loco_folder

TINY_SETTINGS = {
    "categories": ["widget"],
    "seed": 0,
    "load_imagenet_weights": False,
    "model": {
        "tokenizer_config": dict(backbone="efficientnet_lite0", backbone_taps=[2, 4], feature_channels=64, image_size=64,
                                 grid_size=4, hidden_size=32, num_encoder_layers=2, num_decoder_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_levels=2, codebook_size=16,
                                 score_filter_size=8),
        "predictor_config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0),
        "num_masks": 3,
    },
    "tokenizer": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3},
    "predictor": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3},
    "log_with": None,
}


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Walks and Arrow tables go to the test's folder, not the user's datasets cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    make_loco_folder(root, "widget")
    return root


def _config(tmp_path: Path, data_root: Path, **changes) -> Path:
    settings = {**json.loads(json.dumps(TINY_SETTINGS)), "data_root": str(data_root),
                "output_dir": str(tmp_path / "run"), **changes}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def _run(entry, argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and printed output of an entry point (`main` returning or raising SystemExit)."""
    try:
        code = entry(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _assert_one_line_error(code, output: str, *names: str) -> str:
    assert code not in (0, None), output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    for name in names:
        assert name in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- settings


def test_set_and_config_read_yaml_1_2_floats(tmp_path):
    args = build_parser().parse_args(["--set", "tokenizer.learning_rate=1e-4", "predictor.learning_rate=1E5",
                                      "predictor.min_learning_rate=-2.5e-3", "output_dir=run1e5"])
    with pytest.raises(training.SettingsError, match="predictor.min_learning_rate must be a number >= 0"):
        settings_from_args(args)
    args.set[2] = "predictor.weight_decay=2.5e-3"
    settings = settings_from_args(args)
    assert settings.tokenizer.learning_rate == 1e-4 and isinstance(settings.tokenizer.learning_rate, float)
    assert settings.predictor.learning_rate == 1e5 and settings.predictor.weight_decay == 2.5e-3
    assert settings.output_dir == "run1e5"  # strings stay strings

    path = tmp_path / "c.yaml"
    path.write_text("data_root: data/1e-4\ntokenizer: {learning_rate: 1e-4, max_steps: 1e3}\nlog_with: '1e-4'\n")
    settings = load_settings(str(path), {})
    assert settings.tokenizer.learning_rate == 1e-4 and isinstance(settings.tokenizer.learning_rate, float)
    assert settings.tokenizer.max_steps == 1000 and isinstance(settings.tokenizer.max_steps, int)
    assert settings.data_root == "data/1e-4" and settings.log_with == "1e-4"
    assert yaml.safe_load("x: 1e-4")["x"] == "1e-4", "PyYAML's own loaders are left alone"


@pytest.mark.parametrize("line, field", [
    ("tokenizer: {learning_rate: abc}", "tokenizer.learning_rate must be a number"),
    ("predictor: {batch_size: 2.5}", "predictor.batch_size must be a whole number"),
    ("predictor: {betas: [0.9]}", "betas must be two numbers"),
    ("seed: -1", "seed must be a whole number >= 0"),
    ("calibration_fpr: 1.5", "calibration_fpr must be below 1"),
    ("dataset_format: coco", "dataset_format must be one of"),
    ("tokenizer: [1, 2]", "tokenizer must be a mapping"),
    ("model: {fusion_rule: nope}", "model settings: fusion_rule"),
    ("tokenizer: {learning_rate: [1e-4", "tiny.yaml is not valid YAML (line"),
])
def test_bad_settings_are_one_line_naming_the_field(tmp_path, data, capsys, line, field):
    config = _config(tmp_path, data)
    config.write_text(config.read_text() + line + "\n")
    code, output = _run(training.main, ["--config", str(config)], capsys)
    assert code == 2
    _assert_one_line_error(code, output, field)
    assert not (tmp_path / "run").exists()


def test_missing_config_and_bad_set(tmp_path, capsys):
    code, output = _run(training.main, ["--config", str(tmp_path / "missing.yaml")], capsys)
    _assert_one_line_error(code, output, "missing.yaml", "--config")
    code, output = _run(training.main, ["--set", "seed"], capsys)
    _assert_one_line_error(code, output, "--set expects KEY=VALUE")


# ---------------------------------------------------------------------------- --resume


def test_resume_with_other_categories_is_refused_before_anything_loads(tmp_path, data, capsys):
    config = _config(tmp_path, data)
    run = tmp_path / "run"
    (run / "cache").mkdir(parents=True)
    (run / "cache" / "features.pt").write_bytes(b"not a torch file")  # loading it would fail differently
    saved = json.loads(json.dumps({**load_settings(str(config), {}).to_dict(), "categories": ["gadget"], "seed": 1}))
    (run / "train_settings.json").write_text(json.dumps(saved))
    code, output = _run(training.main, ["--config", str(config), "--resume"], capsys)
    line = _assert_one_line_error(code, output, "categories: ['gadget'] -> ['widget']", "seed: 1 -> 0",
                                  f"--config {run / 'train_settings.json'} --resume", "--output_dir")
    assert code == 2 and "max_steps" not in line
    assert json.loads((run / "train_settings.json").read_text()) == saved, "the run's settings are not overwritten"
    assert sorted(p.name for p in run.iterdir()) == ["cache", "train_settings.json"]


def test_resume_differences_ignores_operational_settings(tmp_path):
    settings = TrainSettings(data_root=str(tmp_path), categories=["a"], tokenizer=training.StageSettings(max_steps=5))
    saved = json.loads(json.dumps(settings.to_dict()))
    changed = {**settings.to_dict(), "output_dir": "elsewhere", "log_with": None, "feature_batch_size": 3,
               "tokenizer": {**settings.to_dict()["tokenizer"], "max_steps": 50, "checkpoint_every": 7}}
    assert resume_differences(saved, changed) == []
    old_file = {k: v for k, v in saved.items() if k != "backbone_weights"}  # a field added since: its default
    assert resume_differences({**old_file, "removed_field": 1}, settings.to_dict()) == []
    changed = {**settings.to_dict(), "model": {"predictor_config": {"hidden_size": 64}}, "mixed_precision": "bf16"}
    assert resume_differences(saved, changed) == ["mixed_precision: 'no' -> 'bf16'",
                                                  "model.predictor_config.hidden_size: unset -> 64"]


def test_saved_settings_resume_as_a_config(tmp_path, data):
    """The refusal's advice works: train_settings.json is itself a valid --config."""
    config = load_settings(str(_config(tmp_path, data)), {})
    path = tmp_path / "train_settings.json"
    path.write_text(json.dumps({**config.to_dict(), "categories": ["widget"]}))
    assert resume_differences(json.loads(path.read_text()), load_settings(str(path), {}).to_dict()) == []


# ---------------------------------------------------------------------------- training data


def test_train_with_a_missing_data_root(tmp_path, data, capsys):
    config = _config(tmp_path, data)
    code, output = _run(cli.main, ["train", "--config", str(config), "--data_root", str(tmp_path / "nowhere")], capsys)
    _assert_one_line_error(code, output, f"dataset root not found: {tmp_path / 'nowhere'}", "--data_root")
    assert not (tmp_path / "run").exists()


def test_train_with_an_empty_train_folder(tmp_path, data, capsys):
    good = data / "widget" / "train" / "good"
    shutil.rmtree(good)
    good.mkdir()
    code, output = _run(training.main, ["--config", str(_config(tmp_path, data))], capsys)
    _assert_one_line_error(code, output, f"no images in {good}", "put the category's normal images in")
    assert not (tmp_path / "run").exists()


def test_train_without_a_validation_split_and_no_holdout(tmp_path, data, capsys):
    """Without validation/good a hold-out calibrates (tests/test_own_data.py); with holdout_fraction 0 the
    missing folder is named."""
    make_loco_folder(data, "gadget")
    shutil.rmtree(data / "gadget" / "validation")
    config = _config(tmp_path, data, categories="all", holdout_fraction=0)
    code, output = _run(training.main, ["--config", str(config)], capsys)
    validation = data / "gadget" / "validation"
    _assert_one_line_error(code, output, "'gadget' has no validation/good folder and holdout_fraction is 0",
                           f"add {validation / 'good'}")
    assert not (tmp_path / "run").exists(), "the data is checked before the run folder is made"


# ---------------------------------------------------------------------------- evaluation data


def _evaluate(tmp_path, data_root, capsys, *extra):
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(tmp_path / "no-model"), "--data_root", str(data_root), "--output_dir", str(out),
            *extra]
    code, output = _run(cli.main, argv, capsys)
    assert not out.exists(), "nothing (no empty figures/ folder) is left behind"
    return code, output


def test_evaluate_with_a_missing_data_root(tmp_path, capsys):
    code, output = _evaluate(tmp_path, tmp_path / "nowhere", capsys)
    _assert_one_line_error(code, output, f"dataset root not found: {tmp_path / 'nowhere'}")


def test_evaluate_a_category_without_test_images(tmp_path, data, capsys):
    test = data / "widget" / "test"
    shutil.rmtree(test)
    code, output = _evaluate(tmp_path, data, capsys)
    _assert_one_line_error(code, output, f"test folder of category 'widget' not found: {test}", "put test images in")
    (test / "good").mkdir(parents=True)
    code, output = _evaluate(tmp_path, data, capsys, "--categories", "widget")
    _assert_one_line_error(code, output, f"no images in {test / 'good'}")
