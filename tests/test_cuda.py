"""The model code on CUDA (`pytest -m cuda`; every test skips without a CUDA GPU).

Each check runs the same weights, inputs and mask seeds on the CPU in float32 and on the GPU: the
tiny detector's scores with every branch, in float32 and with the predictor in bf16; the memory-bank
and global branches fitted and scored on the GPU; the `image-anomaly-detection` pipeline with
`device="cuda"`; and a few training steps per stage on the GPU, through `ladmim_hf.training.train`
(stage loop, bf16 autocast, calibration). `benchmarks/gpu_run.sh` runs this module first.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import fitted_branch_model

try:
    from tests.test_training_e2e import TINY_SETTINGS
except ImportError:  # pragma: no cover - run from inside tests/
    from test_training_e2e import TINY_SETTINGS

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda"
# CUDA float32 against the CPU's: the same algorithm, summed in another order. The relative part
# covers the structural score and maps (sums of ~150 here), where a few float32 ulps exceed 1e-3.
FP32_TOLERANCE = 1e-3
FP32_RELATIVE = 1e-5
# bf16 keeps 8 significant bits, so each predictor logit moves by up to ~0.4 % of its size; a mask's
# histogram distance (a sum of |p - h| over codes, at most 2 per level) moves by up to a few 1e-2.
BF16_TOLERANCE = 5e-2
SCORES = ("pred_score", "logical_score", "structural_score", "memory_bank_score", "global_score", "mask_scores",
          "anomaly_map")
# Scores the tokenizer and the feature branches give: float32 whatever the predictor's dtype.
FLOAT32_SCORES = ("structural_score", "memory_bank_score", "global_score")
CATEGORIES = ["pushpins", "breakfast_box", "pushpins"]  # a mixed batch: one predictor call per category


@pytest.fixture
def exact_float32():
    """TF32 off: cuDNN convolutions use it by default, which rounds the backbone's inputs to 10 bits."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _scores(model, pixel_values, **kwargs) -> dict[str, torch.Tensor]:
    out = model(pixel_values, category=CATEGORIES, num_masks=4, seed=0, **kwargs)
    result = {name: getattr(out, name).float().cpu() for name in SCORES}
    result["masks"] = out.masks.cpu()
    return result


def _beyond(got: dict, expected: dict, names, atol: float, rtol: float = FP32_RELATIVE) -> dict[str, float]:
    """The largest |got - expected| of each named score that is anywhere above atol + rtol * |expected|
    (empty when all are within)."""
    out = {}
    for name in names:
        difference = (got[name] - expected[name]).abs()
        if (difference > atol + rtol * expected[name].abs()).any():
            out[name] = float(difference.max())
    return out


def test_scores_on_cuda_match_the_cpu_in_float32(exact_float32, pixel_values):
    cpu_model = fitted_branch_model()
    expected = _scores(cpu_model, pixel_values)
    got = _scores(copy.deepcopy(cpu_model).to(DEVICE), pixel_values.to(DEVICE))
    assert torch.equal(got["masks"], expected["masks"])
    assert not _beyond(got, expected, SCORES, FP32_TOLERANCE)


def test_bf16_predictor_on_cuda_stays_close_to_the_cpu_float32_scores(exact_float32, pixel_values):
    cpu_model = fitted_branch_model()
    expected = _scores(cpu_model, pixel_values)
    got = _scores(copy.deepcopy(cpu_model).to(DEVICE), pixel_values.to(DEVICE), predictor_dtype="bf16")
    assert not _beyond(got, expected, ("logical_score", "mask_scores"), BF16_TOLERANCE, rtol=0.0)
    # The tokenizer and the feature branches stay in float32 under predictor_dtype.
    assert not _beyond(got, expected, FLOAT32_SCORES, FP32_TOLERANCE)


def test_memory_bank_and_global_branch_fit_and_score_on_cuda(exact_float32):
    cpu_model = fitted_branch_model()
    cuda_model = copy.deepcopy(cpu_model).to(DEVICE)
    images = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        features = cpu_model.tokenizer.extract_features(images)
    for category in cpu_model.categories:
        cpu_model.fit_feature_branches(features, category, seed=3)
        cuda_model.fit_feature_branches(features.to(DEVICE), category, seed=3)
    assert cuda_model.memory_bank.bank.device.type == DEVICE
    # The greedy coreset picks the same patches on both devices.
    assert torch.equal(cuda_model.memory_bank.bank.cpu(), cpu_model.memory_bank.bank)
    test_images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(22))
    expected = _scores(cpu_model, test_images)
    got = _scores(cuda_model, test_images.to(DEVICE))
    for name in ("memory_bank_score", "global_score"):
        torch.testing.assert_close(got[name], expected[name], rtol=FP32_RELATIVE, atol=FP32_TOLERANCE, msg=name)


def test_pipeline_with_device_cuda_matches_the_cpu_pipeline(exact_float32):
    from transformers import pipeline

    from ladmim_hf import LadmimImageProcessor
    from ladmim_hf.models.pipeline_ladmim import TASK

    model = fitted_branch_model()
    processor = LadmimImageProcessor(size=64)
    image = Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8))
    expected = pipeline(TASK, model=model, image_processor=processor)(image, category="pushpins", num_masks=3, seed=0)
    detector = pipeline(TASK, model=copy.deepcopy(model), image_processor=processor, device=DEVICE)
    assert detector.model.device.type == DEVICE
    got = detector(image, category="pushpins", num_masks=3, seed=0)
    assert got["label"] == expected["label"]
    for key in ("score", "logical_score", "structural_score", "memory_bank_score", "global_score"):
        assert got[key] == pytest.approx(expected[key], rel=FP32_RELATIVE, abs=FP32_TOLERANCE), key
    np.testing.assert_allclose(np.asarray(got["anomaly_map"]), np.asarray(expected["anomaly_map"]), rtol=FP32_RELATIVE,
                               atol=FP32_TOLERANCE)


# Train in a fresh interpreter (Accelerate keeps one mixed-precision state per process) and print
# the CUDA memory it allocated, which proves the steps ran on the GPU.
TRAIN_AND_REPORT = """
import sys, torch
from ladmim_hf.training import load_settings, train
train(load_settings(sys.argv[1], {}))
print("peak_cuda_bytes", torch.cuda.max_memory_allocated())
"""


@pytest.mark.parametrize("mixed_precision, branches", [("bf16", False), ("no", True)],
                         ids=["bf16-logical-structural", "fp32-memory-bank-global"])
def test_training_steps_and_calibration_on_cuda(tmp_path, mixed_precision, branches):
    from ladmim_hf import LadmimForAnomalyDetection
    from ladmim_hf.data.synthetic import generate_synthloco

    data = tmp_path / "data"
    generate_synthloco(data, seed=0, small=True, categories=["pushpins"])
    settings = json.loads(json.dumps(TINY_SETTINGS))
    settings.update(data_root=str(data), output_dir=str(tmp_path / "run"), categories=["pushpins"],
                    mixed_precision=mixed_precision, log_with=None)
    for stage in ("tokenizer", "predictor"):
        settings[stage].update(max_steps=3, checkpoint_every=2)
    if not branches:
        for key in ("memory_bank_size", "global_branch", "fusion_rule"):
            settings["model"].pop(key)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(settings))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), HF_HUB_OFFLINE="1",
               HF_DATASETS_CACHE=str(tmp_path / "hf-cache"), TOKENIZERS_PARALLELISM="false")
    result = subprocess.run([sys.executable, "-c", TRAIN_AND_REPORT, str(config)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    peak = int(result.stdout.strip().splitlines()[-1].split()[-1])
    assert peak > 0, "nothing was allocated on the GPU"
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["completed"] == ["tokenizer", "predictor/pushpins"]
    assert all(math.isfinite(stage["final_loss"]) for stage in progress["history"].values())
    model = LadmimForAnomalyDetection.from_pretrained(tmp_path / "run" / "model")
    calibration = model.config.calibration["pushpins"]
    assert all(math.isfinite(value) for value in calibration.values()), calibration
    if branches:
        assert model.memory_bank.fitted.all() and model.global_branch.fitted.all()
        assert calibration["memory_bank_std"] > 0 and calibration["global_std"] > 0
