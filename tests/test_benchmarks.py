"""The benchmark scripts (and the quality probe `experiments/quality_probe.py`) run in `--tiny` mode and
end with one JSON line carrying the documented keys.

All scripts start at once in one module fixture (each is a separate interpreter whose import of
torch + transformers is single-threaded), so the file takes about as long as the slowest script.
Only the output format and the exactness checks are asserted, never speed: timings on a shared
2-core machine say nothing in tiny mode.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
EXPERIMENTS = ROOT / "experiments"
TIMEOUT = 600

RUNS = {
    "scoring": ["benchmarks/scoring.py", "--tiny", "--chunk", "4", "--bf16"],
    "scoring_memory": ["benchmarks/scoring.py", "--tiny", "--memory", "--memory_settings", "1x6,4x6"],
    "train_step": ["benchmarks/train_step.py", "--tiny", "--micro_batch", "8"],
    "roofline": ["benchmarks/roofline.py", "--tiny", "--explicit_attention"],
    "feature_cache": ["benchmarks/feature_cache.py", "--tiny"],
    "mask_sweep": ["benchmarks/mask_sweep.py", "--tiny", "--masks", "1,5,10"],
    "quality_probe": ["experiments/quality_probe.py", "--tiny"],
    "run_all": ["benchmarks/run_all.py", "--tiny", "--only", "roofline"],
    "branch_cost": ["benchmarks/branch_cost.py", "--tiny"],
    "retrieval_cost": ["benchmarks/branch_cost.py", "--tiny", "--retrieval"],
    "pose_cost": ["benchmarks/pose_cost.py", "--tiny"],
    "predict_memory": ["benchmarks/predict_memory.py", "--tiny"],
    "latency": ["benchmarks/latency.py", "--tiny"],
    "export_parity": ["benchmarks/export_parity.py", "--tiny"],
}


@pytest.fixture(scope="module")
def runs():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    processes = {
        name: subprocess.Popen([sys.executable, str(ROOT / args[0]), *args[1:]], cwd=ROOT, env=env,
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


def test_branch_cost(runs):
    out = last_json(runs, "branch_cost")
    check_keys(out, ["ratio", "ratio_wall", "cpu_s_per_image_with", "cpu_s_per_image_without", "memory_bank_size"])
    assert out["ratio"] > 0 and out["memory_bank_size"] == 16 and out["global_branch"] is True
    assert out["compared"] == "branches" and out["logical_retrieval_neighbours"] == 3
    retrieval = last_json(runs, "retrieval_cost")
    assert retrieval["ratio"] > 0 and retrieval["compared"] == "retrieval"


def test_pose_cost(runs):
    out = last_json(runs, "pose_cost")
    check_keys(out, ["ratio", "ratio_wall", "cpu_s_per_image_with", "cpu_s_per_image_without", "logical_pose_step"])
    assert out["ratio"] > 1 and out["logical_pose_step"] == 6 and out["poses"] == 5


def test_latency(runs):
    out = last_json(runs, "latency")
    check_keys(out, ["backends", "best_backend", "p50_ratio_best_vs_eager", "parity_at_export"])
    assert set(out["backends"]) == {"pytorch-eager", "onnx", "openvino"} and out["best_backend"] in ("onnx", "openvino")
    for backend in out["backends"].values():
        cold = backend["cold_start"]
        assert set(cold) == {"import_s", "load_s", "first_image_s", "total_s", "score"}
        assert math.isfinite(cold["score"]) and cold["total_s"] > 0
        stream = backend["streaming"]
        assert stream["calls"] == 6 and len(stream["first_calls_ms"]) == 2
        assert 0 < stream["p50_ms"] <= stream["p99_ms"] <= stream["max_ms"]
        assert backend["throughput"]["batch"] == 2 and backend["throughput"]["images_per_s"] > 0
    # the same image file scores the same in a fresh interpreter, whatever the backend
    scores = [backend["cold_start"]["score"] for backend in out["backends"].values()]
    assert max(scores) - min(scores) <= 1e-4 * max(1.0, abs(scores[0]))
    assert all(value <= 1e-4 for batch in out["parity_at_export"].values() for value in batch.values())
    assert out["p50_ratio_best_vs_eager"] > 0


def test_export_parity(runs):
    out = last_json(runs, "export_parity")
    check_keys(out, ["images", "max_difference", "worst", "verdicts_agree"])
    assert set(out["worst"]) == {"onnx", "openvino"}
    for backend, per_output in out["max_difference"].items():
        assert {"pred_score", "anomaly_map", "logical_score", "structural_score"} <= set(per_output)
        assert out["worst"][backend] == max(per_output.values()) <= 1e-4
        assert out["verdicts_agree"][backend] == out["images"]


def test_predict_memory(runs):
    out = last_json(runs, "predict_memory")
    check_keys(out, ["peak_rss_mb", "growth_mb"])
    assert set(out["peak_rss_mb"]) == {"2", "200"} and all(v > 0 for v in out["peak_rss_mb"].values())


def test_scoring(runs):
    out = last_json(runs, "scoring")
    check_keys(out, ["images_per_s", "reference_images_per_s", "speedup", "max_abs_score_diff", "num_masks",
                     "chunk4", "bf16", "environment"])
    assert out["num_masks"] == 10
    assert out["speedup"] > 0 and out["images_per_s"] > 0
    assert out["max_abs_score_diff"] < 1e-4
    assert out["chunk4"]["max_abs_score_diff"] < 1e-4
    assert isinstance(out["bf16"]["wins"], bool)


def test_scoring_memory(runs):
    out = last_json(runs, "scoring_memory")
    check_keys(out, ["peak_rss_mb", "grows_with_images", "grows_with_batch", "scoring_working_mb"])
    assert set(out["peak_rss_mb"]) == {"batch1_images6", "batch4_images6"}
    assert all(v > 0 for v in out["peak_rss_mb"].values())
    assert isinstance(out["grows_with_images"], bool)


def test_train_step(runs):
    out = last_json(runs, "train_step")
    check_keys(out, ["steps_per_s", "reference_steps_per_s", "speedup", "batch_size", "initial_loss_diff", "micro_batch"])
    assert out["batch_size"] == 32
    assert out["speedup"] > 0
    assert out["micro_batch"]["size"] == 8 and out["micro_batch"]["speedup_vs_fast"] > 0
    # Same weights, same masks, dropout off: the literal reference computes the package's loss.
    assert out["initial_loss_diff"] < 1e-3 * max(1.0, out["initial_loss"])


def test_roofline(runs):
    out = last_json(runs, "roofline")
    check_keys(out, ["efficiency", "predictor_gflops", "matmul_gflops", "flop_shares"])
    assert out["efficiency"] > 0
    assert abs(sum(out["flop_shares"].values()) - 1.0) < 1e-2
    assert out["variants"]["explicit_attention"]["max_abs_logit_diff"] < 1e-4  # same logits, other attention


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
    """The analytic count of the roofline: 17.5 GFLOP per paper-size sequence of 578 tokens with the
    full last block, 13.8 GFLOP (21 % fewer) with the last block for the hist token only, as the
    model runs it when only the hist logits are needed."""
    sys.path.insert(0, str(BENCHMARKS))
    import _common

    from ladmim_hf import LadmimPredictorConfig

    cfg = LadmimPredictorConfig()
    full = _common.predictor_flops(cfg, sequences=1, hist_only=False)
    t, d = 578, 512
    per_layer = 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * 4 * d
    embed_and_head = 2 * 576 * 384 * d + 2 * d * 2048
    assert full["total"] == 4 * per_layer + embed_and_head
    assert 17.0e9 < full["total"] < 18.0e9
    hist_only = _common.predictor_flops(cfg, sequences=1)
    last_layer = 2 * t * d * 2 * d + 2 * d * d + 4 * t * d + 2 * d * d + 2 * 2 * d * 4 * d
    assert hist_only["total"] == 3 * per_layer + last_layer + embed_and_head
    assert 0.20 < 1 - hist_only["total"] / full["total"] < 0.22
    # 2x2 patch tokens: 144 tokens of 4 x 384 features; the same embedding work, 4x less in the linear layers
    patched = _common.predictor_flops(LadmimPredictorConfig(patch_size=2), sequences=1, hist_only=False)
    t = 146
    per_layer = 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * 4 * d
    assert patched["total"] == 4 * per_layer + 2 * 144 * 4 * 384 * d + 2 * d * 2048
    assert 4.0 < full["total"] / patched["total"] < 4.5  # attention shrinks 16x


def test_quality_probe(runs):
    result = last_json(runs, "quality_probe")
    entry = result["categories"]["pushpins"]
    for key in ("structural", "structural_no_ot", "position_prior_logical", "global_histogram_logical", "logical",
                "logical_l1", "logical_mmd"):
        assert 0.0 <= entry[key] <= 1.0, (key, entry[key])
        assert result["mean"][key] == pytest.approx(entry[key])
    configured = {"l1": "logical_l1", "codebook_mmd": "logical_mmd"}[result["histogram_distance"]]
    assert entry["logical"] == pytest.approx(entry[configured])  # `logical` is the configured distance
    assert entry["logical_per_defect"], "at least one logical defect type in the small test split"
    assert set(entry["logical_per_defect"]) <= {"missing_pushpin", "additional_pushpin", "missing_separator"}
    assert len(entry["codes_used"]) == 2 and all(1 <= n <= 64 for n in entry["codes_used"])
    # the default config trains token_ce (cross-entropy summed over 2 levels of 64 codes); l1 lies in 0..2L
    bound = 1.5 * 2 * math.log(64) if result["predictor_loss_type"] == "token_ce" else 4.0
    assert math.isfinite(entry["predictor_loss"]) and 0.0 <= entry["predictor_loss"] <= bound
    assert result["tokenizer_steps"] == 3 and result["predictor_steps"] == 3
    # every small-split logical anomaly has a ground-truth region, so each defect type gets a figure
    assert set(entry["defect_mask_per_defect"]) == set(entry["logical_per_defect"])
    assert all(0.0 <= v <= 1.0 for v in entry["defect_mask_per_defect"].values())
    assert 0.0 <= entry["defect_mask_logical"] <= 1.0 and result["mean"]["defect_mask_logical"] == pytest.approx(entry["defect_mask_logical"])


def test_quality_probe_defect_cells_by_hand():
    sys.path.insert(0, str(EXPERIMENTS))
    from quality_probe import defect_cells

    region = np.zeros((8, 8), dtype=bool)
    region[5, 6] = True  # row 5, column 6 -> cell (2, 3) of a 4 x 4 grid
    other = np.zeros((8, 8), dtype=bool)
    other[0:2, 0] = True  # cell (0, 0)
    assert defect_cells([region, other], 4).nonzero().flatten().tolist() == [0, 11]
    assert not defect_cells([], 4).any() and defect_cells([], 4).shape == (16,)


def test_neighbour_predictor_scores_by_hand():
    """`experiments/neighbour_predictor.py`: each mask's score against a slow loop over images, masks and
    training images, for both rules, both distances and k = 2 or all."""
    sys.path.insert(0, str(EXPERIMENTS))
    import torch
    from neighbour_predictor import neighbour_scores

    generator = torch.Generator().manual_seed(0)
    assignments = torch.rand(3, 16, 5, generator=generator).softmax(-1)
    train = torch.rand(6, 16, 5, generator=generator).softmax(-1)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :6], masks[1, 10:] = True, True
    kernel = torch.exp(-torch.cdist(torch.arange(5.0)[:, None], torch.arange(5.0)[:, None]) ** 2)

    def distance(a, b, g):
        d = a - b
        return float(d.abs().sum()) if g is None else float((d @ g @ d).sqrt())

    for k, rule, g in [(2, "predict", kernel), (None, "predict", None), (2, "nearest", None), (None, "nearest", kernel)]:
        scores = neighbour_scores(assignments, train, masks, k, rule, g)
        for b in range(3):
            for m in range(2):
                hidden, visible = masks[m], ~masks[m]
                near = sorted(range(6), key=lambda t: distance(assignments[b, visible].mean(0), train[t, visible].mean(0), g))
                near = near[:k] if k else near
                if rule == "predict":
                    expected = distance(assignments[b, hidden].mean(0), torch.stack([train[t, hidden].mean(0) for t in near]).mean(0), g)
                else:
                    expected = min(distance(assignments[b, hidden].mean(0), train[t, hidden].mean(0), g) for t in near)
                assert float(scores[b, m]) == pytest.approx(expected, abs=1e-5), (k, rule, b, m)


def test_neighbour_predictor_combines_with_the_trained_predictor_by_hand():
    """`combine=replace|mean|max|join`: a variant's z-score in place of, averaged with, the larger with, or fused beside the
    model's logical branch (fusion by the sum, computed by hand)."""
    sys.path.insert(0, str(EXPERIMENTS))
    import torch
    from neighbour_predictor import fused_with_variant

    z = {"logical": torch.tensor([0.0, 2.0]), "memory_bank": torch.tensor([1.0, 1.0]), "global": torch.tensor([5.0, 5.0])}
    variant = torch.tensor([2.0, 0.0])
    branches = ["logical", "memory_bank"]  # the global branch is not fused, so it never counts
    logical, fused = fused_with_variant(z, variant, branches, "sum", "replace")
    assert logical is None and fused.tolist() == [3.0, 1.0]
    logical, fused = fused_with_variant(z, variant, branches, "sum", "mean")
    assert logical.tolist() == [1.0, 1.0] and fused.tolist() == [2.0, 2.0]
    logical, fused = fused_with_variant(z, variant, branches, "sum", "max")
    assert logical.tolist() == [2.0, 2.0] and fused.tolist() == [3.0, 3.0]
    logical, fused = fused_with_variant(z, variant, branches, "sum", "join")
    assert logical is None and fused.tolist() == [3.0, 3.0]
    _, fused = fused_with_variant(z, variant, branches, "max", "join")
    assert fused.tolist() == [2.0, 2.0]


def test_neighbour_predictor_refuses_bad_variants():
    sys.path.insert(0, str(EXPERIMENTS))
    from neighbour_predictor import DEFAULTS, parse_variant

    assert parse_variant("k=all,rule=nearest") == {**DEFAULTS, "k": "all", "rule": "nearest"}
    assert parse_variant("combine=join")["combine"] == "join"
    for text in ("neighbours=5", "k=five", "rule=median", "masks=0", "distance=l2", "soft=yes", "k", "combine=min", "rank=-1"):
        with pytest.raises(SystemExit, match="bad variant"):
            parse_variant(text)


def test_run_all_times_each_script_and_collects_its_result(runs):
    out = last_json(runs, "run_all")
    assert list(out["scripts"]) == ["roofline"]
    entry = out["scripts"]["roofline"]
    assert entry["seconds"] > 0 and out["total_seconds"] >= entry["seconds"]
    assert entry["result"]["benchmark"] == "roofline" and 0 < entry["result"]["efficiency"]


def test_pose_shifts_moves_and_refusals():
    sys.path.insert(0, str(EXPERIMENTS))
    import torch
    from pose_shifts import AGGREGATIONS, main, pose_moves

    assert pose_moves(4) == [(0, 0), (4, 0), (-4, 0), (0, 4), (0, -4)]
    scores = torch.tensor([[3.0, 1.0, 2.0, 5.0, 4.0]])  # one image, five poses, the unmoved one first
    assert [float(AGGREGATIONS[name](scores)[0]) for name in ("centre", "min", "mean")] == [3.0, 1.0, 3.0]
    with pytest.raises(SystemExit):
        main(["--model", "m", "--data_root", "d", "--scores", "z.pt", "--step", "0"])


def test_pose_shifts_moves_feature_grids_by_hand():
    """`move_features`: whole cells move like `translate` moves pixels (border repeated); half a cell
    is the mean of the two neighbouring cells."""
    sys.path.insert(0, str(EXPERIMENTS))
    import torch
    from pose_shifts import move_features

    from ladmim_hf.models.modeling_ladmim_utils import translate

    grid = torch.arange(32.0).view(2, 1, 4, 4)
    for dx, dy in [(1, 0), (-2, 1), (0, -1), (0, 0)]:
        assert torch.allclose(move_features(grid, dx, dy), translate(grid, dx, dy), atol=1e-5), (dx, dy)
    half = move_features(grid, 0.5, 0.0)[0, 0]
    assert torch.allclose(half[:, 1:], (grid[0, 0, :, 1:] + grid[0, 0, :, :-1]) / 2, atol=1e-5)
    assert torch.allclose(half[:, 0], grid[0, 0, :, 0], atol=1e-5)  # the border cell repeats


def test_quality_probe_shifted_features_follow_the_drawn_moves(tmp_path, tiny_model):
    """Copy-major rows; each row is the features of its image moved as drawn, checked image by image
    against the package's own extraction; no move at all gives the plain features."""
    sys.path.insert(0, str(EXPERIMENTS))
    import torch
    from data_fixtures import write_image
    from quality_probe import shifted_features

    from ladmim_hf.models.modeling_ladmim_utils import translate

    from ladmim_hf.models.image_processing_ladmim import LadmimImageProcessor
    from ladmim_hf.scoring import extract_features

    paths = [str(write_image(tmp_path / f"{i}.png", size=(40, 40), seed=i)) for i in range(3)]
    processor = LadmimImageProcessor(size=tiny_model.config.tokenizer_config.image_size)
    plain = extract_features(tiny_model.tokenizer, processor, paths, 2, "plain", disable=True)
    assert torch.allclose(shifted_features(tiny_model, paths, 1, 0, seed=0, batch_size=2), plain, atol=1e-6)
    rows = shifted_features(tiny_model, paths, 2, 5, seed=3, batch_size=2)
    assert rows.shape == (6,) + plain.shape[1:]
    moves = torch.randint(-5, 6, (2, 3, 2), generator=torch.Generator().manual_seed(3)).tolist()
    pixel_values = processor(paths)["pixel_values"]
    for copy in range(2):
        for i, (dx, dy) in enumerate(moves[copy]):
            with torch.no_grad():
                expected = tiny_model.tokenizer.extract_features(translate(pixel_values[i:i + 1], dx, dy))
            assert torch.allclose(rows[copy * 3 + i], expected[0], atol=1e-5)
    assert any(m != [0, 0] for copy in moves for m in copy), "the seed draws at least one real move"


def test_quality_probe_reuses_a_cached_tokenizer_only_for_the_same_settings(tmp_path, capsys):
    sys.path.insert(0, str(EXPERIMENTS))
    import quality_probe

    cache = tmp_path / "tokenizer.pt"
    first = quality_probe.main(["--tiny", "--tokenizer_cache", str(cache)])
    saved = cache.read_bytes()
    again = quality_probe.main(["--tiny", "--tokenizer_cache", str(cache), "--predictor_batch_size", "2"])
    assert cache.read_bytes() == saved, "same tokenizer settings: the cached tokenizer is loaded, not retrained"
    assert again["tokenizer_reconstruction_loss"] == first["tokenizer_reconstruction_loss"]
    assert again["categories"]["pushpins"]["structural"] == first["categories"]["pushpins"]["structural"]
    assert again["predictor_batch_size"] == 2 and first["predictor_batch_size"] == 4
    shifted = quality_probe.main(["--tiny", "--tokenizer_cache", str(cache), "--shift_copies", "2", "--max_shift", "3"])
    assert cache.read_bytes() == saved, "shifted copies train the predictor only, never the tokenizer"
    assert shifted["tokenizer_reconstruction_loss"] == first["tokenizer_reconstruction_loss"]
    originals = first["predictor_training_grids"]["pushpins"]
    assert originals > 0 and shifted["predictor_training_grids"] == {"pushpins": 3 * originals}
    assert shifted["shift_copies"] == 2 and shifted["max_shift"] == 3
    other = quality_probe.main(["--tiny", "--tokenizer_cache", str(cache), "--seed", "1"])
    assert cache.read_bytes() != saved, "another seed retrains the tokenizer and replaces the cache"
    assert other["tokenizer_reconstruction_loss"] != first["tokenizer_reconstruction_loss"]
    import logging

    assert logging.root.manager.disable == logging.NOTSET, "the probe silences warnings only while it runs"
