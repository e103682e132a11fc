"""`ladmim export` and the exported-graph runtime: graphs agree with PyTorch, the mask set is the one
PyTorch draws for the seed, batches of any size are scored, `predict --backend onnx|openvino` gives the
PyTorch verdicts, and the runtime works in an interpreter where torch cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import fitted_branch_model
from PIL import Image

from ladmim_hf import LadmimImageProcessor
from ladmim_hf.cli import main as ladmim
from ladmim_hf.deploy.export import PARITY_TOLERANCE, export_model, scoring_masks
from ladmim_hf.deploy.inference_ladmim import ExportFolderError, LadmimInferencer, read_metadata

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny detector with every branch, saved as a model folder and exported (both formats, batch 2).
    Its predictors read one of the two taps (`predictor_taps`), so the graphs slice channels too; its
    logical branch scores five poses (`logical_pose_step`), so they move images and pick a pose too; and
    it retrieves (`logical_retrieval_neighbours`), so they retrieve and combine the two logical scores; and
    its global branch reads the image enlarged to 128 px (`global_image_size`)."""
    root = tmp_path_factory.mktemp("export")
    model = fitted_branch_model(fusion_rule="sum", histogram_distance="codebook_mmd", predictor_taps=[4],
                                global_descriptor="part_histogram", global_parts=8, logical_pose_step=3,
                                logical_retrieval_neighbours=2, logical_retrieval_rank=4, logical_retrieval_images=8,
                                logical_retrieval_masks=6, logical_retrieval_num_masked=4, logical_retrieval_min_block=2,
                                global_image_size=128)
    for stats in model.config.calibration.values():  # component statistics, so the graphs combine z-scores
        stats.update(logical_predictor_mean=0.5, logical_predictor_std=0.2, logical_retrieval_mean=0.05,
                     logical_retrieval_std=0.01)
    model.save_pretrained(root / "model")
    LadmimImageProcessor(size=64).save_pretrained(root / "model")
    metadata = export_model(model, root / "graphs", ["onnx", "openvino"], categories=["pushpins"], num_masks=5,
                            seed=3, batch_size=2)
    return model, root, metadata


def _images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _assert_close(result, expected, what: str) -> None:
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(np.asarray(result) - expected).max() <= TOLERANCE * scale, what


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_graphs_agree_with_pytorch_on_every_output(exported, backend):
    model, root, metadata = exported
    pixels = _images(5, seed=1)  # 5 images through a batch-2 graph: two full calls and one padded
    with torch.inference_mode():
        expected = model(pixel_values=pixels, category="pushpins", num_masks=5, seed=3)
    result = LadmimInferencer(root / "graphs", backend)(pixel_values=pixels.numpy(), category="pushpins")
    _assert_close(result.pred_score, expected.pred_score.numpy(), "pred_score")
    _assert_close(result.anomaly_map, expected.anomaly_map.numpy(), "anomaly_map")
    assert set(result.branch_scores()) == {"logical", "structural", "memory_bank", "global"}
    for branch, value in expected.branch_scores().items():
        _assert_close(result.branch_scores()[branch], value.numpy(), f"{branch}_score")
    for branch, value in expected.branch_maps().items():
        _assert_close(result.branch_maps()[branch], value.numpy(), f"{branch}_map")
    np.testing.assert_array_equal(result.pred_label, expected.pred_label.numpy())
    assert metadata["parity"]["pushpins"][backend] <= PARITY_TOLERANCE


def test_mask_set_is_the_one_pytorch_draws_for_the_seed(exported):
    model, root, metadata = exported
    with torch.inference_mode():
        used = model(pixel_values=_images(1), category="pushpins", num_masks=5, seed=3).masks[0]
    cells = model.config.tokenizer_config.grid_size ** 2
    stored = torch.zeros(len(metadata["masks"]), cells, dtype=torch.bool)
    for row, indices in enumerate(metadata["masks"]):
        stored[row, indices] = True
    assert torch.equal(stored, used) and torch.equal(stored, scoring_masks(model, 5, 3))
    assert read_metadata(root / "graphs")["num_masks"] == 5 and metadata["seed"] == 3


def test_threshold_and_calibration_follow_the_model(exported):
    model, root, metadata = exported
    inferencer = LadmimInferencer(root / "graphs")
    assert inferencer.backend == "onnx" and inferencer.categories == ["pushpins"]
    assert inferencer.threshold() == model.calibration_for("pushpins")["threshold"]
    result = inferencer(pixel_values=_images(3).numpy(), threshold=-1e9)  # override, as PyTorch's threshold=
    assert result.pred_label.all() and result.threshold == -1e9
    with pytest.raises(ValueError, match="unknown category 'screw_bag'; this export holds \\['pushpins'\\]"):
        inferencer(pixel_values=_images(1).numpy(), category="screw_bag")
    with pytest.raises(ValueError, match=r"pixel_values must be \(n, 3, 64, 64\)"):
        inferencer(pixel_values=np.zeros((1, 3, 32, 32), np.float32))


def test_predict_backends_agree(exported, tmp_path, capsys):
    _, root, _ = exported
    files = []
    for index in range(3):
        path = tmp_path / f"part{index}.png"
        Image.fromarray((np.random.default_rng(index).random((70, 90, 3)) * 255).astype(np.uint8)).save(path)
        files.append(str(path))
    results = {}
    for backend, model in (("pytorch", root / "model"), ("onnx", root / "graphs"), ("openvino", root / "graphs")):
        output = tmp_path / f"{backend}.jsonl"
        assert ladmim(["predict", *files, "--model", str(model), "--backend", backend, "--category", "pushpins",
                       "--num_masks", "5", "--seed", "3", "--output", str(output),
                       "--output_dir", str(tmp_path / backend)]) == 0
        results[backend] = [json.loads(line) for line in output.read_text().splitlines()]
        assert all((tmp_path / backend / f"part{i}_heatmap.png").is_file() for i in range(3))
    for backend in ("onnx", "openvino"):
        for ours, reference in zip(results[backend], results["pytorch"]):
            assert ours["verdict"] == reference["verdict"] and ours["threshold"] == reference["threshold"]
            for key in ("fused_score", "logical_score", "structural_score", "memory_bank_score", "global_score"):
                assert abs(ours[key] - reference[key]) <= TOLERANCE * max(1.0, abs(reference[key])), (backend, key)


def test_predict_backend_mistakes_are_one_line_errors(exported, tmp_path):
    _, root, _ = exported
    image = tmp_path / "part.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    cases = [
        (["--model", str(root / "model"), "--backend", "onnx"], "is not a LADMIM export"),
        (["--model", str(root / "graphs"), "--backend", "onnx", "--num_masks", "7"], "export again with `ladmim export --num_masks 7`"),
        (["--model", str(root / "graphs"), "--backend", "onnx", "--seed", "0"], "export again with `ladmim export --seed 0`"),
        (["--model", str(root / "graphs"), "--backend", "onnx", "--predictor_dtype", "bf16"], "applies to --backend pytorch only"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as raised:
            ladmim(["predict", str(image), *flags, "--output_dir", str(tmp_path / "out")])
        assert message in str(raised.value) and "\n" not in str(raised.value)


def test_export_command_replaces_the_folder_whole(exported, tmp_path, capsys):
    _, root, _ = exported
    out = tmp_path / "graphs"
    out.mkdir()
    (out / "stale.onnx").write_text("left from an earlier export")
    assert ladmim(["export", "--model", str(root / "model"), "--out", str(out), "--category", "breakfast_box",
                   "--num_masks", "2"]) == 0
    printed = capsys.readouterr().out
    assert "breakfast_box: onnx graphs; largest difference from PyTorch onnx" in printed
    assert sorted(p.name for p in out.iterdir()) == ["breakfast_box.onnx", "imaging_ladmim.py", "inference_ladmim.py",
                                                     "ladmim_export.json"]
    with pytest.raises(ExportFolderError, match="holds no openvino graphs"):
        LadmimInferencer(out, "openvino")
    with pytest.raises(SystemExit, match="unknown category 'screw_bag'"):
        ladmim(["export", "--model", str(root / "model"), "--out", str(out), "--category", "screw_bag"])
    assert (out / "breakfast_box.onnx").is_file()  # a failed export leaves the previous one whole


STANDALONE = textwrap.dedent(
    """
    import json, sys
    sys.modules["torch"] = None      # the runtime must not need torch,
    sys.modules["ladmim_hf"] = None  # nor the package: only the files beside the graphs
    folder, image = sys.argv[1], sys.argv[2]
    sys.path.insert(0, folder)
    from inference_ladmim import LadmimInferencer
    result = LadmimInferencer(folder, "onnx")([image], category="pushpins")
    print(json.dumps({"pred_score": result.pred_score.tolist(), "verdict": result.pred_label.tolist()}))
    """
)


def test_runtime_runs_without_torch_or_the_package(exported, tmp_path):
    model, root, _ = exported
    image = tmp_path / "part.png"
    Image.fromarray((np.random.default_rng(5).random((80, 60, 3)) * 255).astype(np.uint8)).save(image)
    script = tmp_path / "standalone.py"
    script.write_text(STANDALONE)
    done = subprocess.run([sys.executable, str(script), str(root / "graphs"), str(image)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={"PYTHONPATH": "", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    processor = LadmimImageProcessor.from_pretrained(root / "model")
    with torch.inference_mode():
        expected = model(**processor(str(image)), category="pushpins", num_masks=5, seed=3)
    assert abs(result["pred_score"][0] - float(expected.pred_score[0])) <= TOLERANCE * max(1.0, abs(float(expected.pred_score[0])))
    assert result["verdict"] == expected.pred_label.tolist()
