"""Training reliability through the real script (`scripts/train.py` in a subprocess, tiny config, small
synthloco data): SIGKILL at seeded pseudo-random points in every stage, then `--resume` until done,
must never expose a half-written file and must end bit-exactly where an uninterrupted run with the
same seed ends; and a corrupt training image stops training with its name unless `--skip_bad_files`
is given, which trains around it and lists it."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

try:  # tests/ may or may not be a package
    from tests.test_training_e2e import CATEGORIES, ROOT, _env, _write_config, synth_root  # noqa: F401
except ImportError:  # pragma: no cover
    from test_training_e2e import CATEGORIES, ROOT, _env, _write_config, synth_root  # noqa: F401

# Tokenizer: 16 train features, batch 4 -> 4 steps per epoch; checkpoints at steps 3, 6, 8 resume in
# the middle of an epoch. Predictors: 8 features, batch 4 -> 2 steps per epoch; checkpoints at 3, 5.
TOKENIZER = {"max_steps": 8, "checkpoint_every": 3}
PREDICTOR = {"max_steps": 5, "checkpoint_every": 3}
STAGES = ["tokenizer", "predictor/pushpins", "predictor/screw_bag"]
TOTAL_STEPS = {"tokenizer": 8, "predictor/pushpins": 5, "predictor/screw_bag": 5}

# Paths a run creates, in this order. A kill point is "this path has just appeared" plus a short
# seeded delay, so kills land mid-step, mid-save, and between stages.
EVENTS = [
    "cache/features.pt",
    "checkpoints/tokenizer/step_0000003",
    "checkpoints/tokenizer/step_0000006",
    "checkpoints/tokenizer/step_0000008",
    "stages/tokenizer",
    "checkpoints/predictor-pushpins/step_0000003",
    "checkpoints/predictor-pushpins/step_0000005",
    "stages/predictor-pushpins",
    "checkpoints/predictor-screw_bag/step_0000003",
    # later ones are followed by too little work (< 0.3 s) for a poll-and-kill to land reliably
]
FIRST_PREDICTOR_EVENT = EVENTS.index("checkpoints/predictor-pushpins/step_0000003")
PLAN_SEEDS = [1, 6]


def kill_plan(seed: int) -> list[tuple[str, float]]:
    """Two kill points per run: one while features or the tokenizer are being made, one later (a
    stage boundary or a predictor stage), each with a delay of 0-30 ms after its trigger path appears."""
    rng = random.Random(seed)
    first = rng.randrange(0, FIRST_PREDICTOR_EVENT)
    second = rng.randrange(first + 2, len(EVENTS))
    return [(EVENTS[first], rng.uniform(0.0, 0.03)), (EVENTS[second], rng.uniform(0.0, 0.03))]


def _config(tmp_path: Path, synth_root: Path, out: Path) -> Path:
    return _write_config(tmp_path / "tiny.yaml", synth_root, out, tokenizer=TOKENIZER, predictor=PREDICTOR, log_with=None)


def _command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(config), *extra]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, synth_root):
    """One uninterrupted run, shared by the kill cases."""
    tmp_path = tmp_path_factory.mktemp("reference")
    out = tmp_path / "run"
    result = subprocess.run(_command(_config(tmp_path, synth_root, out)), cwd=ROOT, env=_env(), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_bit_exact(path: Path, reference: Path) -> None:
    got, want = _tensors(path), _tensors(reference)
    assert sorted(got) == sorted(want), f"{path}: tensor names differ from the uninterrupted run"
    different = [name for name in want if got[name].dtype != want[name].dtype or not torch.equal(got[name], want[name])]
    assert not different, f"{path}: {len(different)} of {len(want)} tensors differ from the uninterrupted run, e.g. {different[:5]}"


def _is_temporary(name: str) -> bool:
    return name.endswith(".tmp") or (name.startswith(".") and name.endswith(".old"))


def assert_no_partial_files(out: Path, reference: Path) -> None:
    """Everything a reader (or `--resume`) can see is complete: only `*.tmp` names (and a hidden
    `.NAME.old` being deleted after a replace) may hold partial data. Complete here means: the same
    files as the uninterrupted run's counterpart, JSON that parses, and tensors that load and are
    bit-exactly the uninterrupted run's at that point."""
    assert set(p.name for p in out.iterdir() if not _is_temporary(p.name)) <= {
        "cache", "checkpoints", "stages", "model", "progress.json", "train_settings.json"}, sorted(out.iterdir())
    # JSON files parse (a half-written one would not); train_settings.json is written before any kill point.
    settings = json.loads((out / "train_settings.json").read_text())
    assert {**settings, "output_dir": None} == {**json.loads((reference / "train_settings.json").read_text()), "output_dir": None}
    if (out / "progress.json").exists():
        done = json.loads((out / "progress.json").read_text())["completed"]
        assert done == STAGES[:len(done)], done
        for stage in done:
            assert (out / "stages" / stage.replace("/", "-")).is_dir(), f"{stage} marked done before its folder was saved"

    features = out / "cache" / "features.pt"
    if features.exists():
        got, want = torch.load(features, weights_only=True), torch.load(reference / "cache" / "features.pt", weights_only=True)
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    for stage_dir in sorted((out / "checkpoints").glob("*")):
        for folder in sorted(stage_dir.iterdir()):
            if _is_temporary(folder.name):
                continue
            twin = reference / "checkpoints" / stage_dir.name / folder.name
            assert twin.is_dir(), f"unexpected checkpoint {folder}"
            files = sorted(p.name for p in folder.iterdir())
            assert files == sorted(p.name for p in twin.iterdir()), f"{folder} is incomplete: {files}"
            assert all((folder / f).stat().st_size > 0 for f in files), f"{folder} holds an empty file"
            _assert_bit_exact(folder / "model.safetensors", twin / "model.safetensors")
    saved = sorted((out / "stages").glob("*")) + [out / "model"]  # save_pretrained folders
    for folder in saved:
        if not folder.exists() or _is_temporary(folder.name):
            continue
        twin = reference / folder.relative_to(out)
        files = sorted(p.name for p in folder.iterdir())
        assert files == sorted(p.name for p in twin.iterdir()), f"{folder} is incomplete: {files}"
        json.loads((folder / "config.json").read_text())
        _assert_bit_exact(folder / "model.safetensors", twin / "model.safetensors")


def expected_resume(out: Path) -> dict[str, str | None]:
    """Per stage, the line a `--resume` run must print given what is on disk now."""
    progress = out / "progress.json"
    done = json.loads(progress.read_text())["completed"] if progress.exists() else []
    expected = {}
    for stage in STAGES:
        checkpoints = sorted((out / "checkpoints" / stage.replace("/", "-")).glob("step_*"))
        if stage in done:
            expected[stage] = f"[{stage}] done earlier, loaded {out / 'stages' / stage.replace('/', '-')}"
        elif checkpoints:
            step = int(checkpoints[-1].name.split("_")[1])
            expected[stage] = f"[{stage}] resumed from {checkpoints[-1]} (step {step}/{TOTAL_STEPS[stage]})"
        else:
            expected[stage] = None  # starts from step 0
    return expected


def _check_resume_lines(log: str, expected: dict[str, str | None], complete: bool) -> None:
    for stage, line in expected.items():
        printed = [text for text in log.splitlines() if text.startswith(f"[{stage}] resumed from")
                   or text.startswith(f"[{stage}] done earlier")]
        if line is None:
            assert not printed, f"{stage} should start from scratch, log says {printed}"
        elif complete or printed:  # a run killed early may not have reached this stage yet
            assert printed == [line], f"expected {line!r}, log says {printed}"


def _run_until(command: list[str], out: Path, trigger: str, delay: float, log_path: Path) -> tuple[int, str]:
    """Start a run and SIGKILL it `delay` s after `out/trigger` appears; returns (returncode, log)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        try:
            while process.poll() is None and not (out / trigger).exists() and time.time() < deadline:
                time.sleep(0.002)
            time.sleep(delay)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()
    return process.returncode, log_path.read_text()


def test_kill_plans_cover_every_stage_and_a_stage_boundary():
    """The seeded plans below really kill during the tokenizer, at a stage boundary and in a predictor."""
    points = [trigger for seed in PLAN_SEEDS for trigger, _ in kill_plan(seed)]
    assert kill_plan(PLAN_SEEDS[0]) == kill_plan(PLAN_SEEDS[0]), "plans are reproducible"
    assert any(p.startswith("checkpoints/tokenizer/") for p in points)
    assert any(p.startswith("checkpoints/predictor-") for p in points)
    assert any(p.startswith("stages/") or p.startswith("cache/") for p in points)
    assert len(set(points)) == len(points)


@pytest.mark.slow
@pytest.mark.parametrize("plan_seed", PLAN_SEEDS)
def test_sigkill_at_random_points_then_resume_is_bit_exact(tmp_path, synth_root, reference_run, plan_seed):
    out = tmp_path / "run"
    config = _config(tmp_path, synth_root, out)
    plan = kill_plan(plan_seed)
    for attempt, (trigger, delay) in enumerate(plan):
        expected = expected_resume(out) if attempt else None
        extra = ("--resume",) if attempt else ()
        code, log = _run_until(_command(config, *extra), out, trigger, delay, tmp_path / f"run{attempt}.log")
        assert code == -signal.SIGKILL, f"plan {plan}: run {attempt} ended with {code} before its kill\n{log[-3000:]}"
        assert (out / trigger).exists(), f"killed before {trigger} appeared\n{log[-3000:]}"
        if expected is not None:
            _check_resume_lines(log, expected, complete=False)
        assert_no_partial_files(out, reference_run)

    expected = expected_resume(out)
    assert any(line is not None for line in expected.values()), "the last kill left nothing to resume from"
    result = subprocess.run(_command(config, "--resume"), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    _check_resume_lines(result.stdout + result.stderr, expected, complete=True)
    assert_no_partial_files(out, reference_run)
    assert not list((out / "checkpoints").glob("*/.step_*.tmp")), "a temporary checkpoint folder is left behind"
    assert json.loads((out / "progress.json").read_text())["completed"] == STAGES

    # The result equals the uninterrupted run's: every tensor bit-exactly, calibration exactly.
    _assert_bit_exact(out / "model" / "model.safetensors", reference_run / "model" / "model.safetensors")
    config_json = json.loads((out / "model" / "config.json").read_text())
    reference_json = json.loads((reference_run / "model" / "config.json").read_text())
    assert config_json["calibration"] == reference_json["calibration"]
    assert set(config_json["calibration"]) == set(CATEGORIES)


# ------------------------------------------------------------------------------ --skip_bad_files


@pytest.mark.slow
def test_corrupt_training_image_fails_then_skip_bad_files_trains(tmp_path, synth_root):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    good = sorted((data / "pushpins" / "train" / "good").iterdir())
    assert len(good) >= 8
    bad = good[3]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])  # truncated PNG among good ones
    out = tmp_path / "run"
    config = _write_config(tmp_path / "tiny.yaml", data, out, log_with=None)
    base = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(config), "--max_steps", "2"]

    refused = subprocess.run(base, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    log = refused.stdout + refused.stderr
    assert refused.returncode == 4, log[-4000:]
    assert f"{bad}: " in log and "1 unusable file(s)" in log, log[-4000:]
    assert "rerun with --skip_bad_files" in log
    assert "Traceback" not in log, "a clear message, not a stack trace"
    assert not (out / "model").exists()

    trained = subprocess.run(base + ["--skip_bad_files"], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    log = trained.stdout + trained.stderr
    assert trained.returncode == 0, log[-4000:]
    assert "skipped 1 unusable file(s)" in log and str(bad) in log, log[-4000:]
    assert (out / "model" / "model.safetensors").exists()
    features = torch.load(out / "cache" / "features.pt", weights_only=True)
    assert len(features["train/pushpins"]) == len(good) - 1, "the bad file was left out, the others kept"
    assert len(features["train/screw_bag"]) == len(list((data / "screw_bag" / "train" / "good").iterdir()))
    assert json.loads((out / "train_settings.json").read_text())["skip_bad_files"] is True


@pytest.mark.parametrize("dataset_format", ["loco", "mvtec_ad", "folder"])
def test_normal_split_honours_skip_bad_files_in_every_layout(tmp_path, dataset_format):
    """`skip_bad_files` reaches the loader of every dataset layout training supports."""
    from ladmim_hf.data import BadFilesError, DataWarning, normal_split
    from ladmim_hf.training import TrainSettings, data_layout

    try:
        from tests.data_fixtures import write_image
    except ImportError:  # pragma: no cover
        from data_fixtures import write_image

    root = tmp_path / "data"
    train = root / "widget" / "train" / "good"
    for i in range(3):
        write_image(train / f"{i:03d}.png", seed=i)
    (train / "003.png").write_bytes(b"")
    settings = TrainSettings(data_root=str(root), dataset_format=dataset_format, categories=["widget"])
    layout, categories = data_layout(settings)
    assert categories == ["widget"] and layout.dataset_format == dataset_format
    with pytest.raises(BadFilesError, match=str(train / "003.png")):
        normal_split(layout, "widget", 0.5, 0)
    with pytest.warns(DataWarning, match=f"(?s)skipped 1 unusable file.*{train / '003.png'}"):
        split = normal_split(layout, "widget", 0.5, 0, skip_bad_files=True)
    assert sorted(Path(p).name for p in split.train + split.validation) == ["000.png", "001.png", "002.png"]
    assert len(split.validation) == 2 and "hold-out" in split.source
