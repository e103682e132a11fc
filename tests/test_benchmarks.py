"""The benchmark scripts run in `--tiny` mode and end with one JSON line carrying the documented keys.

All scripts start at once in one module fixture (each is a separate interpreter whose import of
torch + transformers is single-threaded), so the file takes about as long as the slowest script.
Only the output format and the exactness checks are asserted, never speed: timings on a shared
2-core machine say nothing in tiny mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TIMEOUT = 600

RUNS = {
    "scoring": ["scoring.py", "--tiny", "--proposed", "--bf16"],
    "scoring_memory": ["scoring.py", "--tiny", "--memory", "--memory_settings", "1x6,4x6"],
    "train_step": ["train_step.py", "--tiny", "--proposed"],
    "roofline": ["roofline.py", "--tiny"],
    "feature_cache": ["feature_cache.py", "--tiny"],
    "mask_sweep": ["mask_sweep.py", "--tiny", "--masks", "1,5,10"],
}


@pytest.fixture(scope="module")
def runs():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    processes = {
        name: subprocess.Popen([sys.executable, str(BENCHMARKS / args[0]), *args[1:]], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, args in RUNS.items()
    }
    deadline = time.monotonic() + TIMEOUT
    results = {}
    for name, process in processes.items():
        try:
            stdout, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        results[name] = (process.returncode, stdout, stderr)
    return results


def last_json(runs, name: str) -> dict:
    code, stdout, stderr = runs[name]
    assert code == 0, f"{name} exited with {code}:\n{stderr[-4000:]}"
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    assert len(lines) >= 2, f"{name}: expected a summary line and a JSON line, got {stdout!r}"
    assert not lines[-2].startswith("{"), "the line before the JSON is the human summary"
    return json.loads(lines[-1])


def check_keys(payload: dict, keys: list[str]) -> None:
    missing = [k for k in keys if k not in payload]
    assert not missing, f"missing keys {missing} in {sorted(payload)}"
    assert "load_average" in payload["environment"]


def test_scoring(runs):
    out = last_json(runs, "scoring")
    check_keys(out, ["images_per_s", "reference_images_per_s", "speedup", "max_abs_score_diff", "num_masks",
                     "proposed", "bf16", "environment"])
    assert out["num_masks"] == 10
    assert out["speedup"] > 0 and out["images_per_s"] > 0
    assert out["max_abs_score_diff"] < 1e-4
    assert out["proposed"]["max_abs_score_diff"] < 1e-4
    assert isinstance(out["bf16"]["wins"], bool)


def test_scoring_memory(runs):
    out = last_json(runs, "scoring_memory")
    check_keys(out, ["peak_rss_mb", "grows_with_images", "grows_with_batch", "scoring_working_mb"])
    assert set(out["peak_rss_mb"]) == {"batch1_images6", "batch4_images6"}
    assert all(v > 0 for v in out["peak_rss_mb"].values())
    assert isinstance(out["grows_with_images"], bool)


def test_train_step(runs):
    out = last_json(runs, "train_step")
    check_keys(out, ["steps_per_s", "reference_steps_per_s", "speedup", "batch_size", "initial_loss_diff", "proposed"])
    assert out["batch_size"] == 32
    assert out["speedup"] > 0
    # Same weights, same masks, dropout off: the literal reference computes the package's loss.
    assert out["initial_loss_diff"] < 1e-3 * max(1.0, out["initial_loss"])


def test_roofline(runs):
    out = last_json(runs, "roofline")
    check_keys(out, ["efficiency", "predictor_gflops", "matmul_gflops", "flop_shares"])
    assert out["efficiency"] > 0
    assert abs(sum(out["flop_shares"].values()) - 1.0) < 1e-2


def test_feature_cache(runs):
    out = last_json(runs, "feature_cache")
    check_keys(out, ["speedup", "cached_steps_per_s", "uncached_steps_per_s"])
    assert out["speedup"] > 0


def test_mask_sweep(runs):
    out = last_json(runs, "mask_sweep")
    check_keys(out, ["num_masks", "relative_time"])
    assert out["num_masks"] == [1, 5, 10]
    assert out["relative_time"][0] == 1.0 and len(out["relative_time"]) == 3


def test_flop_count_matches_paper_model():
    """The analytic count of the roofline: 17.5 GFLOP per paper-size sequence of 578 tokens."""
    sys.path.insert(0, str(BENCHMARKS))
    import _common

    from ladmim_hf import LadmimPredictorConfig

    cfg = LadmimPredictorConfig()
    flops = _common.predictor_flops(cfg, sequences=1)
    t, d = 578, 512
    per_layer = 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * 4 * d
    expected = 4 * per_layer + 2 * 576 * 384 * d + 2 * d * 2048
    assert flops["total"] == expected
    assert 17.0e9 < flops["total"] < 18.0e9
