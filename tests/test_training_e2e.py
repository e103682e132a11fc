"""End to end through the real scripts: a tiny training run, evaluation, resume after SIGKILL, and a
2-process CPU launch with accelerate."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CATEGORIES = ["pushpins", "screw_bag"]

TINY_SETTINGS = {
    "categories": CATEGORIES,
    "seed": 0,
    "model": {
        "tokenizer_config": dict(backbone="efficientnet_lite0", backbone_taps=[2, 4], feature_channels=64, image_size=64,
                                 grid_size=4, hidden_size=32, num_encoder_layers=2, num_decoder_layers=2,
                                 num_attention_heads=4, intermediate_size=64, num_levels=2, codebook_size=16,
                                 score_filter_size=8, standardize_features=True,
                                 residual_normalization="cell_channel"),
        "predictor_config": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0),
        "num_masks": 3,
        "memory_bank_size": 24,
        "global_branch": True,
        "global_descriptor": "part_histogram",
        "global_parts": 8,
        "fusion_rule": "max",
    },
    "tokenizer": {"max_steps": 4, "batch_size": 4, "checkpoint_every": 2, "learning_rate": 1e-3},
    "predictor": {"max_steps": 4, "batch_size": 4, "checkpoint_every": 2, "learning_rate": 1e-3},
    "feature_batch_size": 8,
    "log_with": "tensorboard",
}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    from ladmim_hf.data.synthetic import generate_synthloco

    root = tmp_path_factory.mktemp("synthloco")
    generate_synthloco(root, seed=0, small=True, categories=CATEGORIES)
    return root


def _env():
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _write_config(path: Path, synth_root: Path, output_dir: Path, **changes) -> Path:
    settings = json.loads(json.dumps(TINY_SETTINGS))
    settings.update(data_root=str(synth_root), output_dir=str(output_dir))
    for key, value in changes.items():
        settings[key] = {**settings.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(settings))
    return path


def _train(config: Path, *extra: str, launcher: list[str] | None = None, timeout: int = 600, env_extra: dict | None = None):
    command = (launcher or [sys.executable]) + [str(ROOT / "scripts" / "train.py"), "--config", str(config), *extra]
    env = {**_env(), **(env_extra or {})}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_train_then_evaluate_end_to_end(tmp_path, synth_root, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".notes.tmp").write_text("a user's file")  # a fresh run leaves hidden files alone (resume tidies)
    result = _train(_write_config(tmp_path / "tiny.yaml", synth_root, out))
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / ".notes.tmp").read_text() == "a user's file"
    assert "done: model saved to" in result.stdout + result.stderr
    model_dir = out / "model"
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "modeling_ladmim.py"):
        assert (model_dir / name).exists(), name
    progress = json.loads((out / "progress.json").read_text())
    assert progress["completed"] == ["tokenizer", "predictor/pushpins", "predictor/screw_bag"]
    assert (out / "checkpoints" / "tokenizer" / "step_0000002").is_dir()
    assert any((out / "logs").rglob("events.out.tfevents*")), "tensorboard logs"

    from ladmim_hf import LadmimForAnomalyDetection

    model = LadmimForAnomalyDetection.from_pretrained(model_dir)
    # Standardisation statistics come from the cached training features of every category.
    import torch

    cache = torch.load(out / "cache" / "features.pt", weights_only=True)
    train_features = torch.cat([cache[f"train/{c}"] for c in CATEGORIES])
    torch.testing.assert_close(model.tokenizer.feature_mean, train_features.mean((0, 2, 3)), rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.tokenizer.feature_std, torch.ones_like(model.tokenizer.feature_std))
    # Residual statistics of the structural map: from each category's training features, by hand
    assert model.tokenizer.residual_fitted.all()
    with torch.no_grad():
        tokens = model.tokenizer(features=cache["train/pushpins"], category="pushpins", return_maps=False)
    residual = tokens.reconstruction - tokens.features
    pushpins = CATEGORIES.index("pushpins")
    torch.testing.assert_close(model.tokenizer.residual_mean[pushpins], residual.mean(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.tokenizer.residual_var[pushpins], residual.var(0), rtol=1e-3, atol=1e-5)
    # Memory bank and global branch: fitted on each category's training features, as a by-hand refit gives
    from ladmim_hf.models.branches_ladmim import LadmimGlobalBranch, LadmimMemoryBank

    bank = LadmimMemoryBank(1, 64, 24)
    bank.fit(cache["train/pushpins"], 0, seed=0)
    assert torch.equal(model.memory_bank.bank[pushpins], bank.bank[0])
    global_branch = LadmimGlobalBranch(1, 64, "part_histogram", 8)
    global_branch.fit(cache["train/pushpins"], 0, seed=0)
    torch.testing.assert_close(model.global_branch.part_centres[pushpins], global_branch.part_centres[0])
    torch.testing.assert_close(model.global_branch.precision[pushpins], global_branch.precision[0])
    assert model.memory_bank.fitted.all() and model.global_branch.fitted.all()
    calibration = model.config.calibration
    assert set(calibration) == set(CATEGORIES)
    for category in CATEGORIES:
        assert "threshold" in calibration[category]
        assert all(calibration[category][f"{b}_std"] > 0 for b in ("logical", "structural", "memory_bank", "global"))

    eval_dir = tmp_path / "eval"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(model_dir), "--data_root", str(synth_root),
         "--categories", "all", "--output_dir", str(eval_dir), "--num_masks", "2",
         "--feature_cache", str(out / "cache" / "features.pt")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert set(metrics) >= {"categories", "mean", "baselines", "num_masks", "seed"}
    assert metrics["num_masks"] == 2 and metrics["seed"] == 0
    for category in CATEGORIES:
        entry = metrics["categories"][category]
        for key in ("auroc_logical", "auroc_structural", "auroc_mean", "spro_0.05"):
            assert 0.0 <= entry[key] <= 1.0, (category, key, entry[key])
        for branch in ("logical", "structural", "memory_bank", "global"):
            assert set(entry["branches"][branch]) == {"auroc_logical", "auroc_structural"}
        for baseline in ("knn", "global"):
            assert set(metrics["baselines"][baseline][category]) == {"auroc_logical", "auroc_structural"}
    assert set(metrics["mean"]) == {"auroc_logical", "auroc_structural", "auroc_mean", "spro_0.05"}
    assert set(metrics["baselines"]["knn"]["mean"]) == {"auroc_logical", "auroc_structural"}
    assert metrics["fusion_rule"] == "max" and metrics["fused_branches"] == ["logical", "structural", "memory_bank", "global"]
    rows = (eval_dir / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("path,category,anomaly_type,defect_type,pred_score,logical_score,structural_score,"
                              "memory_bank_score,global_score")
    for category in CATEGORIES:
        defects = metrics["per_defect"][category]
        assert defects, category
        for name, entry in defects.items():
            assert entry["anomaly_type"] in ("logical", "structural") and entry["count"] >= 1, (category, name)
            for key in ("fused", "logical_branch", "structural_branch", "memory_bank_branch", "global_branch"):
                assert 0.0 <= entry[key] <= 1.0, (category, name, key)
    assert "## Per defect type" in (eval_dir / "report.md").read_text()
    assert len(rows) == 1 + 2 * 9
    report = (eval_dir / "report.md").read_text()
    assert "| pushpins |" in report and "figures/heatmaps.png" in report
    assert "memory bank (log/str)" in report and "global baseline (log/str)" in report
    # Operating points at the calibrated and the F1-best threshold; the calibrated confusion matrix is
    # the pred_label column of scores.csv, the F1-best one follows from its pred_score column.
    import csv

    with open(eval_dir / "scores.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    totals = dict.fromkeys(("tp", "fp", "tn", "fn"), 0)
    for category in CATEGORIES:
        points = metrics["operating_points"][category]
        mine = [r for r in table if r["category"] == category]
        anomalous = [r["anomaly_type"] != "good" for r in mine]
        for name, flagged in (("calibrated", [r["pred_label"] == "True" for r in mine]),
                              ("best_f1", [float(r["pred_score"]) > points["best_f1"]["threshold"] for r in mine])):
            point = points[name]
            for key in ("precision", "recall", "recall_logical", "recall_structural", "f1", "fpr"):
                assert math.isnan(point[key]) or 0.0 <= point[key] <= 1.0, (category, name, key)
            assert not math.isnan(point["recall"]) and not math.isnan(point["f1"]), (category, name)
            counts = {"tp": sum(f and a for f, a in zip(flagged, anomalous)), "fp": sum(f and not a for f, a in zip(flagged, anomalous)),
                      "tn": sum(not f and not a for f, a in zip(flagged, anomalous)), "fn": sum(not f and a for f, a in zip(flagged, anomalous))}
            assert {k: point[k] for k in counts} == counts, (category, name)
        assert points["best_f1"]["f1"] >= points["calibrated"]["f1"]
        assert points["calibrated"]["threshold"] == pytest.approx(calibration[category]["threshold"], rel=1e-6)
        assert points["calibrated"]["num_validation_images"] == calibration[category]["num_images"] > 0
        totals = {k: totals[k] + points["calibrated"][k] for k in totals}
    assert {k: metrics["operating_points_total"]["calibrated"][k] for k in totals} == totals
    assert "## Operating points" in report and "### total" in report and "optimistic upper bound" in report
    assert "| calibrated |" in report and "| best F1 (test labels) |" in report

    # The fusion sweep on the same trained model: its variant equal to the trained fusion reproduces
    # the evaluation's fused AUROCs (same calibration and test mask seeds)
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "fusion_sweep.py"), "--model", str(model_dir), "--data_root",
         str(synth_root), "--feature_cache", str(out / "cache" / "features.pt"), "--num_masks", "2", "--threads", "1",
         "--variants", "logical+structural+memory_bank+global:max", "memory_bank:sum", "logical+structural+global:max",
         "structural+memory_bank+global:max", "--no_spro",
         "--save_scores", str(out / "z.pt")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    sweep = json.loads(result.stdout.strip().splitlines()[-1])
    trained = sweep["variants"]["logical + structural + memory_bank + global (max)"]
    for category in CATEGORIES:
        for key in ("auroc_logical", "auroc_structural"):
            assert trained[category][key] == pytest.approx(metrics["categories"][category][key]), (category, key)
            assert sweep["variants"]["memory_bank (sum)"][category][key] == pytest.approx(
                metrics["categories"][category]["branches"]["memory_bank"][key])
            # the evaluation's "what each fused branch adds" is the fusion without that branch
            without = metrics["categories"][category]["without"]
            assert list(without) == ["logical", "structural", "memory_bank", "global"]
            assert without["memory_bank"][key] == pytest.approx(sweep["variants"]["logical + structural + global (max)"][category][key])
            assert without["logical"][key] == pytest.approx(
                sweep["variants"]["structural + memory_bank + global (max)"][category][key])
    assert metrics["without_mean"]["logical"]["auroc_logical"] == pytest.approx(
        sum(metrics["categories"][c]["without"]["logical"]["auroc_logical"] for c in CATEGORIES) / len(CATEGORIES))
    assert "## What each fused branch adds" in report and "without the logical branch (log/str)" in report
    assert (eval_dir / "figures" / "roc_pushpins.png").stat().st_size > 1000

    # experiments/branch_variants.py on the sweep's saved scores: its "model" row is the trained fusion;
    # the memory bank refitted as the model's (same size, seed and grid) scores as the model's does (its
    # bank is stored in fp16); the other variants run; a bad variant is refused by name.
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import branch_variants
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    capsys.readouterr()
    branch_variants.main(["--model", str(model_dir), "--data_root", str(synth_root), "--scores", str(out / "z.pt"),
                          "--feature_cache", str(out / "cache" / "features.pt"), "--threads", "1", "--variants",
                          "memory_bank:size=24", "memory_bank:grid=8", "memory_bank:position=0.5",
                          "global:standardized", "global:code_histogram", "global:set_cdf", "global:per_tap",
                          "global:clusters=8", "global:moments", "global:knn=2", "parts:clusters=4", "per_cell:gaussian"])
    probe = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert probe["fused_branches"] == ["logical", "structural", "memory_bank", "global"] and probe["fusion_rule"] == "max"
    for category in CATEGORIES:
        for key in ("auroc_logical", "auroc_structural"):
            assert probe["model"][category]["fused"][key] == pytest.approx(trained[category][key])
            assert probe["variants"]["memory_bank:size=24"][category]["alone"][key] == pytest.approx(
                metrics["categories"][category]["branches"]["memory_bank"][key], abs=0.02)
            # the moments descriptor refitted is the evaluation's global baseline; the model's own part
            # histogram, refitted with the same seed, scores as the model's global branch
            assert probe["variants"]["global:moments"][category]["alone"][key] == pytest.approx(
                metrics["baselines"]["global"][category][key], abs=1e-9)
            assert probe["variants"]["global:clusters=8"][category]["alone"][key] == pytest.approx(
                metrics["categories"][category]["branches"]["global"][key], abs=0.02)
        for variant in probe["variants"].values():
            assert all(0.0 <= v <= 1.0 for part in variant[category].values() for v in part.values())
    with pytest.raises(SystemExit, match="bad variant 'memory_bank:grid'"):
        branch_variants.main(["--model", str(model_dir), "--data_root", str(synth_root), "--scores", str(out / "z.pt"),
                              "--variants", "memory_bank:grid"])

    # experiments/scoring_sweep.py rescoring the trained model: the 2-mask variant reproduces the
    # evaluation above exactly (same seed, same masks); a bad field is refused by name.
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import scoring_sweep
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    capsys.readouterr()
    scoring_sweep.main(["--model", str(model_dir), "--data_root", str(synth_root), "--threads", "1",
                        "--variants", "num_masks=2", "num_masks=2,histogram_distance=codebook_mmd,kernel_bandwidth=4",
                        "num_masks=2,residual_normalization=none"])
    sweep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    as_evaluated, kernel, plain = sweep["variants"]
    assert as_evaluated["overrides"] == {"num_masks": 2}
    assert as_evaluated["logical_branch_auroc"] == round(metrics["branches_mean"]["logical"]["auroc_logical"], 4)
    assert as_evaluated["per_category"] == {
        c: round(metrics["categories"][c]["branches"]["logical"]["auroc_logical"], 4) for c in CATEGORIES}
    assert as_evaluated["structural_branch_auroc"] == round(metrics["branches_mean"]["structural"]["auroc_structural"], 4)
    assert kernel["overrides"]["kernel_bandwidth"] == 4.0 and 0.0 <= kernel["logical_branch_auroc"] <= 1.0
    # the structural map without normalisation: the logical branch is untouched
    assert plain["per_category"] == as_evaluated["per_category"] and 0.0 <= plain["structural_branch_auroc"] <= 1.0
    # refitting cell_channel statistics from the training images reproduces what training fitted
    refit = LadmimForAnomalyDetection.from_pretrained(model_dir)
    scoring_sweep.apply_variant(refit, {"residual_variance_floor": 0.1}, str(synth_root))
    torch.testing.assert_close(refit.tokenizer.residual_mean, model.tokenizer.residual_mean, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(refit.tokenizer.residual_var, model.tokenizer.residual_var, rtol=1e-3, atol=1e-4)
    with pytest.raises(SystemExit, match="residual_normalization must be"):
        scoring_sweep.apply_variant(refit, {"residual_normalization": "zscore"}, str(synth_root))
    with pytest.raises(SystemExit, match="score_num_masks"):
        scoring_sweep.parse_variant("score_num_masks=4")
    with pytest.raises(SystemExit, match="'kernel_bandwidth=wide'.*float"):
        scoring_sweep.parse_variant("kernel_bandwidth=wide")
    with pytest.raises(SystemExit, match="histogram_distance must be"):
        scoring_sweep.apply_variant(model, {"histogram_distance": "mmd"})
    with pytest.raises(SystemExit, match="score_num_masked must be in"):
        scoring_sweep.apply_variant(model, {"score_num_masked": 10_000})
    assert model.config.histogram_distance != "mmd" and model.config.score_num_masked != 10_000

    # experiments/window_masks.py: its reference row (the evaluation's 2 shared masks, raw mean) is the
    # evaluated logical branch; the 2x1 windows tile the 4x4 grid in 9 masks; a bad window is named.
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import window_masks
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    capsys.readouterr()
    window_masks.main(["--model", str(model_dir), "--data_root", str(synth_root), "--feature_cache",
                       str(out / "cache" / "features.pt"), "--num_masks", "2", "--windows", "2x1", "--threads", "1"])
    windows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["schemes"]
    assert windows["window2x1"]["num_masks"] == 9
    for category in CATEGORIES:
        assert windows["random2_seed0"]["per_category"][category]["mean"]["alone"]["auroc_logical"] == pytest.approx(
            metrics["categories"][category]["branches"]["logical"]["auroc_logical"], abs=1e-4)
    assert window_masks.window_masks(4, 2, 1).sum(0).tolist() == [1, 2, 2, 1, 2, 4, 4, 2, 2, 4, 4, 2, 1, 2, 2, 1]
    with pytest.raises(SystemExit, match="bad window 5x1"):
        window_masks.window_masks(4, 5, 1)

    # experiments/neighbour_predictor.py on the same saved scores: its first row is the model's own
    # logical branch and fusion; the model's 8-part histogram is reused, another part count is fitted.
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import neighbour_predictor
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    capsys.readouterr()
    payload = neighbour_predictor.main([
        "--model", str(model_dir), "--data_root", str(synth_root), "--feature_cache", str(out / "cache" / "features.pt"),
        "--scores", str(out / "z.pt"), "--threads", "1", "--variants", "k=all,masks=2,cells=4,block=1,parts=8",
        "k=2,rule=nearest,masks=2,cells=4,block=1,parts=4,soft=0,distance=l1", "k=2,masks=2,cells=4,block=1,parts=8,combine=mean"])
    neighbours = payload["variants"]
    # per logical defect type: the model's own logical branch as the evaluation's per_defect reports it
    assert all(payload["per_defect"][category] for category in CATEGORIES)
    for category in CATEGORIES:
        for defect, values in payload["per_defect"][category].items():
            assert metrics["per_defect"][category][defect]["anomaly_type"] == "logical"
            assert values["model"] == pytest.approx(metrics["per_defect"][category][defect]["logical_branch"], abs=1e-6)
            assert all(0.0 <= v <= 1.0 for v in values.values())
    for category in CATEGORIES:
        own = neighbours["model"]["per_category"][category]
        assert own["alone"]["auroc_logical"] == pytest.approx(
            metrics["categories"][category]["branches"]["logical"]["auroc_logical"], abs=1e-4)
        assert own["fused"]["auroc_logical"] == pytest.approx(trained[category]["auroc_logical"], abs=1e-4)
        for name in ("k=all,masks=2,cells=4,block=1,parts=8", "k=2,rule=nearest,masks=2,cells=4,block=1,parts=4,soft=0,distance=l1",
                     "k=2,masks=2,cells=4,block=1,parts=8,combine=mean"):
            entry = neighbours[name]["per_category"][category]
            assert all(0.0 <= v <= 1.0 for part in entry.values() for v in part.values())

    # experiments/pose_shifts.py: the unmoved pose, scored from the image files, is the evaluation's
    # logical branch (scored from its own feature extraction).
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        import pose_shifts
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    capsys.readouterr()
    poses = pose_shifts.main(["--model", str(model_dir), "--data_root", str(synth_root), "--scores", str(out / "z.pt"),
                              "--step", "3", "--num_masks", "2", "--threads", "1"])
    assert poses["moves"] == [(0, 0), (3, 0), (-3, 0), (0, 3), (0, -3)]
    for category in CATEGORIES:
        assert poses["variants"]["centre"]["per_category"][category]["alone"]["auroc_logical"] == pytest.approx(
            metrics["categories"][category]["branches"]["logical"]["auroc_logical"], abs=1e-4)
        for name in ("min", "mean"):
            entry = poses["variants"][name]["per_category"][category]
            assert all(0.0 <= v <= 1.0 for part in entry.values() for v in part.values())
    # moving the feature grid instead: its unmoved pose is the same scoring
    moved = pose_shifts.main(["--model", str(model_dir), "--data_root", str(synth_root), "--scores", str(out / "z.pt"),
                              "--step", "3", "--num_masks", "2", "--level", "features", "--threads", "1"])
    assert moved["level"] == "features"
    for category in CATEGORIES:
        assert moved["variants"]["centre"]["per_category"][category] == poses["variants"]["centre"]["per_category"][category]


def test_resume_after_sigkill_keeps_checkpoints_and_step_count(tmp_path, synth_root):
    out = tmp_path / "run"
    config = _write_config(tmp_path / "tiny.yaml", synth_root, out,
                           tokenizer={"max_steps": 400, "checkpoint_every": 5}, predictor={"max_steps": 2})
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(config)],
                               cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stage_dir = out / "checkpoints" / "tokenizer"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and len(list(stage_dir.glob("step_*"))) < 2:
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    before = sorted(p.name for p in stage_dir.glob("step_*"))
    assert len(before) >= 2, "training did not reach two checkpoints in time"
    last_step = int(before[-1].split("_")[1])
    assert last_step < 400, "the run finished before it was killed"

    # What a kill during a save can leave (planted, as the kill above lands anywhere): a half-written
    # checkpoint, a half-written stage folder, and a settings file moved aside just before the new one
    # was moved in. Resume tidies them and restores the moved-aside file.
    (stage_dir / f".step_{last_step + 1:07d}.tmp").mkdir()
    (out / "stages").mkdir(exist_ok=True)
    (out / "stages" / ".predictor-pushpins.k3j2.tmp").mkdir()
    os.replace(out / "train_settings.json", out / ".train_settings.json.old")

    # The folder refuses a fresh start, then --resume continues from the newest complete checkpoint.
    refused = _train(config)
    assert refused.returncode == 2 and "pass --resume" in refused.stderr
    result = _train(config, "--resume", "--set", "tokenizer.max_steps=" + str(last_step + 5), "tokenizer.checkpoint_every=5")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed from {stage_dir / before[-1]} (step {last_step}/{last_step + 5})" in result.stdout + result.stderr
    after = sorted(p.name for p in stage_dir.glob("step_*"))
    assert set(before) <= set(after), "an earlier checkpoint was lost"
    assert f"step_{last_step + 5:07d}" in after
    assert not list(stage_dir.glob(".*tmp")), "no temporary checkpoint folder is left behind"
    assert not list((out / "stages").glob(".*tmp")) and not (out / ".train_settings.json.old").exists()
    assert "restored" in result.stderr and "train_settings.json" in result.stderr
    assert (out / "model" / "model.safetensors").exists()


def test_two_process_cpu_launch(tmp_path, synth_root):
    out = tmp_path / "run"
    config = _write_config(tmp_path / "tiny.yaml", synth_root, out, tokenizer={"max_steps": 2}, predictor={"max_steps": 2},
                           log_with=None)
    # accelerate 1.15 runs `launch --cpu --num_processes 2` as ONE process (multi-CPU there needs mpirun);
    # the torch.distributed launcher with ACCELERATE_USE_CPU=1 gives two gloo processes on CPU.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]
    # This run also trains with the codebook-kernel histogram loss and scores with its distance.
    result = _train(config, "--set", "model.predictor_config.loss_type=codebook_mmd", "model.histogram_distance=codebook_mmd",
                    launcher=launcher, env_extra={"ACCELERATE_USE_CPU": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / "model" / "model.safetensors").exists()
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["histogram_distance"] == "codebook_mmd" and saved["predictor_config"]["loss_type"] == "codebook_mmd"
    assert all(math.isfinite(v["logical_mean"]) for v in saved["calibration"].values())
    assert "MULTI_CPU" in result.stdout + result.stderr or (out / "checkpoints" / "tokenizer" / "step_0000002" / "random_states_1.pkl").exists()
    assert (out / "checkpoints" / "tokenizer" / "step_0000002" / "random_states_1.pkl").exists(), "both processes saved their state"


def test_sigint_stops_cleanly_after_saving(tmp_path, synth_root):
    out = tmp_path / "run"
    config = _write_config(tmp_path / "tiny.yaml", synth_root, out,
                           tokenizer={"max_steps": 400, "checkpoint_every": 50}, predictor={"max_steps": 2}, log_with=None)
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(config)],
                               cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    # Wait until the tokenizer stage is running (its first tensorboard-free progress line appears).
    lines = []
    while time.time() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "tokenizer:" in line and "step" in line:
            break
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    output = "".join(lines) + output
    assert process.returncode == 130, output[-3000:]
    assert "rerun with --resume" in output
    saved = sorted((out / "checkpoints" / "tokenizer").glob("step_*"))
    assert saved, "a checkpoint was written at the step where training stopped"
    step = int(saved[-1].name.split("_")[1])
    assert 0 < step < 400


def test_training_with_poses_calibrates_and_evaluates_at_the_best_pose(tmp_path, synth_root):
    """`model.logical_pose_step`: training caches the validation images' moved features (as the model
    extracts them), calibrates on their best-fitting poses, and `evaluate` scores test images as
    `model(pixel_values)` does. The run also retrieves (`model.logical_retrieval_neighbours`): stage 3
    stores every training image's cells and calibrates both logical components. Its global branch reads the
    image enlarged to 128 px (`model.global_image_size`): training caches those features as the model
    extracts them, and fits and calibrates the branch on them."""
    import csv

    import torch

    from ladmim_hf import LadmimForAnomalyDetection, LadmimImageProcessor
    from ladmim_hf.data import find_layout, normal_split
    from ladmim_hf.evaluation import evaluate
    from ladmim_hf.training.pipeline import global_cache_key, moved_cache_key

    out = tmp_path / "run"
    config = _write_config(tmp_path / "tiny.yaml", synth_root, out, categories=["pushpins"], tokenizer={"max_steps": 2},
                           predictor={"max_steps": 2}, log_with=None)
    result = _train(config, "--set", "model.logical_pose_step=3", "model.logical_retrieval_neighbours=3",
                    "model.logical_retrieval_rank=4", "model.logical_retrieval_num_masked=4",
                    "model.logical_retrieval_min_block=2", "model.global_image_size=128")
    assert result.returncode == 0, result.stderr[-4000:]
    model = LadmimForAnomalyDetection.from_pretrained(out / "model").eval()
    processor = LadmimImageProcessor.from_pretrained(out / "model")
    assert model.config.logical_pose_step == 3 and model.config.logical_retrieval_neighbours == 3
    cache = torch.load(out / "cache" / "features.pt", weights_only=True)
    class_id = int(model.tokenizer.category_ids("pushpins", 1)[0])
    assert int(model.retrieval.count[class_id]) == min(len(cache["train/pushpins"]), 200)
    validation = normal_split(find_layout(synth_root), "pushpins", 0.1, 0).validation
    with torch.no_grad():
        pixels = processor(validation)["pixel_values"]
        torch.testing.assert_close(cache[moved_cache_key("pushpins", 3)], model.extract_moved_features(pixels))
        torch.testing.assert_close(cache[global_cache_key("validation", "pushpins", 128)],
                                   model.extract_global_features(pixels), atol=1e-4, rtol=1e-3)  # other batches
        scored = model(pixel_values=pixels, category="pushpins", seed=0)
        logical = scored.logical_score
    assert cache[global_cache_key("train", "pushpins", 128)].shape[-1] == 8 and bool(model.global_branch.fitted[class_id])
    calibration = model.config.calibration["pushpins"]
    assert calibration["logical_mean"] == pytest.approx(float(logical.mean()), rel=1e-5, abs=1e-6)
    assert {"logical_predictor_mean", "logical_retrieval_std"} <= set(calibration)
    assert calibration["global_mean"] == pytest.approx(float(scored.global_score.mean()), rel=1e-5, abs=1e-6)

    evaluate(str(out / "model"), str(synth_root), ["pushpins"], str(tmp_path / "eval"), num_masks=2, knn_baseline=False,
             report_images=1)
    with open(tmp_path / "eval" / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))[:3]
    with torch.no_grad():
        expected = model(pixel_values=processor([r["path"] for r in rows])["pixel_values"], category="pushpins",
                         num_masks=2, seed=0)
    assert [float(r["logical_score"]) for r in rows] == pytest.approx(expected.logical_score.tolist(), rel=1e-5)
    assert [float(r["pred_score"]) for r in rows] == pytest.approx(expected.pred_score.tolist(), rel=1e-5, abs=1e-6)
