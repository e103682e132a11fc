"""Unit tests of the training pieces: settings, schedules, calibration, NaN handling, atomic writes."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest
import torch
from torch.utils.data import TensorDataset

from ladmim_hf.calibration import calibration_statistics
from ladmim_hf.io_utils import atomic_save_directory, atomic_write_json
from ladmim_hf.training import (
    StageSettings,
    TrainingDivergedError,
    TrainSettings,
    latest_checkpoint,
    load_settings,
    lr_lambda_for,
    run_stage,
)
from ladmim_hf.training.loop import _StopFlag


def test_settings_from_yaml_with_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\npredictor: {batch_size: 8, epochs: 2}\nmodel: {num_masks: 4}\n")
    settings = load_settings(str(path), {"predictor.max_steps": 5, "output_dir": "x", "seed": None})
    assert settings.seed == 3 and settings.output_dir == "x"
    assert settings.predictor.batch_size == 8 and settings.predictor.max_steps == 5
    assert settings.tokenizer.schedule == "step" and settings.tokenizer.max_grad_norm == 0.1  # HVQ-Trans defaults kept
    assert settings.model == {"num_masks": 4}


def test_unknown_settings_are_rejected_with_names(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sed: 3\n")
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['sed'\]"):
        load_settings(str(path), {})
    path.write_text("predictor: {batchsize: 3}\n")
    with pytest.raises(ValueError, match="unknown predictor setting"):
        load_settings(str(path), {})
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_settings(str(tmp_path / "missing.yaml"), {})


def test_total_steps_from_epochs_or_max_steps():
    assert StageSettings(epochs=2, batch_size=10).total_steps(35) == 6  # 3 full batches per epoch
    assert StageSettings(epochs=2, max_steps=7).total_steps(35) == 7
    with pytest.raises(ValueError, match="epochs or max_steps"):
        StageSettings().total_steps(10)


def test_cosine_schedule_with_warmup_and_step_schedule():
    cosine = lr_lambda_for(StageSettings(learning_rate=1e-4, min_learning_rate=1e-6, warmup_fraction=0.1), 100)
    assert cosine(0) == pytest.approx(0.01 + 0.99 * 0.1)  # linear warm-up from min_lr
    assert cosine(9) == pytest.approx(1.0)
    assert cosine(10) == pytest.approx(1.0)
    assert cosine(55) == pytest.approx(0.01 + 0.99 * 0.5, rel=1e-6)
    assert cosine(100) == pytest.approx(0.01)
    step = lr_lambda_for(StageSettings(schedule="step", warmup_fraction=0.0, step_fraction=0.8, step_gamma=0.1), 100)
    assert step(79) == 1.0 and step(80) == 0.1


def test_calibration_statistics_by_hand():
    logical = torch.tensor([1.0, 2.0, 3.0])
    structural = torch.tensor([10.0, 10.0, 13.0])
    stats = calibration_statistics({"logical": logical, "structural": structural}, ["logical", "structural"], "sum", fpr=0.01)
    assert stats["logical_mean"] == pytest.approx(2.0)
    assert stats["logical_std"] == pytest.approx(math.sqrt(2 / 3))
    assert stats["structural_mean"] == pytest.approx(11.0)
    fused = [(l - 2.0) / math.sqrt(2 / 3) + (s - 11.0) / math.sqrt(2.0) for l, s in zip([1, 2, 3], [10, 10, 13])]
    mean = sum(fused) / 3
    std = math.sqrt(sum((f - mean) ** 2 for f in fused) / 3)
    assert stats["threshold"] == pytest.approx(mean + statistics.NormalDist().inv_cdf(0.99) * std, rel=1e-5)


def test_calibration_statistics_max_rule_and_unfused_branches_by_hand():
    scores = {"logical": torch.tensor([1.0, 2.0, 3.0]), "structural": torch.tensor([10.0, 10.0, 13.0]),
              "memory_bank": torch.tensor([0.5, 1.5, 1.0])}
    stats = calibration_statistics(scores, ["logical", "memory_bank"], "max", fpr=0.05)
    # every branch is measured, also one the fusion leaves out
    assert stats["structural_std"] == pytest.approx(math.sqrt(2.0))
    assert stats["memory_bank_mean"] == pytest.approx(1.0)
    z_logical = [(v - 2.0) / math.sqrt(2 / 3) for v in (1, 2, 3)]
    z_bank = [(v - 1.0) / math.sqrt(1 / 6) for v in (0.5, 1.5, 1.0)]
    fused = [max(a, b) for a, b in zip(z_logical, z_bank)]
    mean = sum(fused) / 3
    std = math.sqrt(sum((f - mean) ** 2 for f in fused) / 3)
    assert stats["threshold"] == pytest.approx(mean + statistics.NormalDist().inv_cdf(0.95) * std, rel=1e-5)
    assert stats["num_images"] == 3


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def forward(self, x):
        return self.layer(x)


def test_nan_loss_stops_with_stage_step_and_cause_and_keeps_last_checkpoint(tmp_path):
    from accelerate import Accelerator

    settings = TrainSettings(output_dir=str(tmp_path), log_with=None)
    stage = StageSettings(max_steps=10, batch_size=2, checkpoint_every=2)
    dataset = TensorDataset(torch.randn(8, 2), torch.randn(8, 1))

    def loss_fn(model, batch, step, first_row):
        x, y = batch
        loss = ((model(x) - y) ** 2).mean()
        return (loss * float("nan") if step == 3 else loss), {}

    accelerator = Accelerator(cpu=True)
    with _StopFlag() as stop, pytest.raises(TrainingDivergedError) as error:
        run_stage(accelerator, settings, "predictor/pushpins", stage, _Linear(), dataset, loss_fn,
                  "learning rate too high, an empty mask", stop, False, "predictor/pushpins")
    message = str(error.value)
    assert "predictor/pushpins" in message and "step 3" in message and "learning rate too high" in message
    checkpoint, step = latest_checkpoint(tmp_path / "checkpoints" / "predictor-pushpins")
    assert step == 2 and (checkpoint / "model.safetensors").exists()


def test_atomic_writes_leave_old_content_on_failure(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    folder = tmp_path / "model"
    atomic_save_directory(folder, lambda tmp: (tmp / "w.txt").write_text("v1"))

    def broken(tmp):
        (tmp / "w.txt").write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_save_directory(folder, broken)
    assert (folder / "w.txt").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert sorted(os.listdir(tmp_path)) == ["model", "result.json"]


def _tiny_predictor(loss_reduction: str):
    from ladmim_hf.models.configuration_ladmim import LadmimPredictorConfig
    from ladmim_hf.models.modeling_ladmim_predictor import LadmimPredictorModel

    config = LadmimPredictorConfig(input_channels=8, grid_size=4, hidden_size=16, num_hidden_layers=2,
                                   num_attention_heads=2, num_levels=2, codebook_size=8,
                                   attention_probs_dropout_prob=0.0, loss_reduction=loss_reduction)
    torch.manual_seed(0)
    return LadmimPredictorModel(config)


def _predictor_loss_fn(seed: int = 0):
    """The training loop's stage-2 loss: masks depend on (seed, step, row) through `_masks_for_step`."""
    from ladmim_hf.models.masking import BlockMaskGenerator
    from ladmim_hf.training.loop import _masks_for_step

    factory = BlockMaskGenerator(4, num_masked=5, min_block=2)

    def loss_fn(model, batch, step, first_row):
        features, codes = batch
        masks = _masks_for_step(factory, features.shape[0], step, seed, 0, first_row)
        return model(features, masks, labels=codes).loss, {}

    return loss_fn


@pytest.mark.parametrize("loss_reduction", ["sum", "mean"])
def test_micro_batches_give_the_whole_batch_loss_and_gradient(loss_reduction):
    from accelerate import Accelerator

    from ladmim_hf.training import forward_backward

    accelerator = Accelerator(cpu=True)
    generator = torch.Generator().manual_seed(1)
    batch = [torch.randn(7, 8, 4, 4, generator=generator), torch.randint(0, 8, (7, 2, 16), generator=generator)]
    results = {}
    for micro in (None, 3, 1):  # 7 rows: one chunk; 3 + 3 + 1 (uneven); seven single rows
        model = _tiny_predictor(loss_reduction)
        loss, _ = forward_backward(accelerator, model, batch, 5, _predictor_loss_fn(), micro, loss_reduction)
        results[micro] = (float(loss), [p.grad.clone() for p in model.parameters()])
    whole_loss, whole_grads = results[None]
    per_row_losses = []
    for row in range(7):  # hand reference: the batch loss is the sum (or mean) of per-row losses
        model = _tiny_predictor("sum")
        rows = [t[row:row + 1] for t in batch]
        per_row_losses.append(float(_predictor_loss_fn()(model, rows, 5, row)[0].detach()))
    expected = sum(per_row_losses) if loss_reduction == "sum" else sum(per_row_losses) / 7
    assert whole_loss == pytest.approx(expected, rel=1e-5)
    for micro in (3, 1):
        loss, grads = results[micro]
        assert loss == pytest.approx(whole_loss, rel=1e-5)
        for got, want in zip(grads, whole_grads):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_run_stage_with_micro_batches_trains_the_same_weights(tmp_path):
    from accelerate import Accelerator

    generator = torch.Generator().manual_seed(2)
    dataset = TensorDataset(torch.randn(12, 8, 4, 4, generator=generator), torch.randint(0, 8, (12, 2, 16), generator=generator))
    weights = {}
    for micro in (None, 4):
        settings = TrainSettings(output_dir=str(tmp_path / str(micro)), log_with=None)
        stage = StageSettings(max_steps=3, batch_size=6, learning_rate=1e-3, checkpoint_every=100, micro_batch_size=micro)
        model = _tiny_predictor("sum")
        with _StopFlag() as stop:
            run_stage(Accelerator(cpu=True), settings, "predictor/x", stage, model, dataset, _predictor_loss_fn(),
                      "hint", stop, False, "predictor/x", loss_reduction="sum")
        weights[micro] = {k: v.clone() for k, v in model.state_dict().items()}
    for name, value in weights[None].items():
        torch.testing.assert_close(weights[4][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(value, _tiny_predictor("sum").state_dict()[name]) for name, value in weights[4].items())


def test_micro_batch_size_is_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tokenizer: {micro_batch_size: 8}\n")
    with pytest.raises(ValueError, match="tokenizer.micro_batch_size"):
        load_settings(str(path), {})
    path.write_text("predictor: {micro_batch_size: 0}\n")
    with pytest.raises(ValueError, match="micro_batch_size must be a positive"):
        load_settings(str(path), {})
    assert load_settings(str(path), {"predictor.micro_batch_size": 8}).predictor.micro_batch_size == 8


def test_recover_interrupted_saves_removes_half_writes_and_restores_a_moved_aside_version(tmp_path):
    from ladmim_hf.io_utils import recover_interrupted_saves

    (tmp_path / "model").mkdir()
    (tmp_path / ".model.old").mkdir()                       # superseded: model exists
    (tmp_path / ".model.x1y2.tmp").mkdir()                  # half-written folder
    (tmp_path / ".metrics.json.a7b8.tmp").write_text("{")   # half-written file
    (tmp_path / ".stage.old").mkdir()                       # killed between the two renames: stage missing
    (tmp_path / ".stage.old" / "weights").write_text("complete")
    (tmp_path / ".hidden_user_file").write_text("kept")
    (tmp_path / "results.tmp").write_text("kept")           # not hidden: not ours
    actions = recover_interrupted_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden_user_file", "model", "results.tmp", "stage"]
    assert (tmp_path / "stage" / "weights").read_text() == "complete"
    assert len(actions) == 4 and any("restored" in a and "stage" in a for a in actions)
    assert recover_interrupted_saves(tmp_path) == [] and recover_interrupted_saves(tmp_path / "missing") == []


def test_builtin_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    """`--config synthloco-cpu` (or `loco-paper.yaml`) names a config shipped inside the package."""
    from ladmim_hf.training import SettingsError, resolve_config_path

    monkeypatch.chdir(tmp_path)
    assert load_settings("synthloco-cpu", {}).model["tokenizer_config"]["grid_size"] == 14
    assert resolve_config_path("loco-paper.yaml").parent.name == "configs"
    with pytest.raises(SettingsError, match="built-in config name .*loco-paper, synthloco-cpu"):
        load_settings("configs/synthloco-cpu", {})
