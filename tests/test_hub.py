"""Hub sharing: the upload folder and model card, the upload calls (through a recording double of `HfApi`),
the dry run, loading the uploaded folder back in a subprocess where `ladmim_hf` cannot be imported (local folder
and offline Hub cache, models, the pipeline and the README snippets), and `load_model`'s errors."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from ladmim_hf import LadmimImageProcessor, hub
from ladmim_hf.cli import main as cli_main
from ladmim_hf.hub import ConfigFieldsWarning, ModelFolderError, load_model

REPO_ID = "org/ladmim-loco"
TRAINED_ID = "org/ladmim-trained"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
EXPECTED_FILES = {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "configuration_ladmim.py",
                  "modeling_ladmim.py", "modeling_ladmim_tokenizer.py", "modeling_ladmim_predictor.py",
                  "modeling_ladmim_utils.py", "backbone_ladmim.py", "branches_ladmim.py", "masking.py",
                  "image_processing_ladmim.py", "imaging_ladmim.py", "pipeline_ladmim.py"}


def _category(logical: float, structural: float) -> dict:
    return {"auroc_logical": logical, "auroc_structural": structural, "auroc_mean": (logical + structural) / 2,
            "spro_0.05": 0.41, "branches": {"logical": {"auroc_logical": logical - 0.1, "auroc_structural": 0.52},
                                            "structural": {"auroc_logical": 0.55, "auroc_structural": structural}}}


FAKE_METRICS = {
    "categories": {"breakfast_box": _category(0.81, 0.92), "pushpins": _category(0.77, float("nan"))},
    "mean": {"auroc_logical": 0.79, "auroc_structural": 0.92, "auroc_mean": 0.855, "spro_0.05": 0.41},
    "baselines": {"knn": {"breakfast_box": {"auroc_logical": 0.6, "auroc_structural": 0.7},
                          "pushpins": {"auroc_logical": 0.5, "auroc_structural": 0.65},
                          "mean": {"auroc_logical": 0.55, "auroc_structural": 0.675}}},
    "num_masks": 10, "seed": 0,
}


@pytest.fixture
def run_dir(tmp_path, tiny_model):
    """A training run folder: model/ (as training saves it), train_settings.json and eval/metrics.json."""
    run = tmp_path / "run"
    model_dir = run / "model"
    tiny_model.save_pretrained(model_dir)
    LadmimImageProcessor(size=64).save_pretrained(model_dir)
    (model_dir / "training_summary.json").write_text(json.dumps(
        {"stages": {"tokenizer": {"steps": 4, "final_loss": 0.25, "seconds": 1.5},
                    "predictor/pushpins": {"steps": 4, "final_loss": 1.5, "seconds": 0.5}}, "calibration": {}}))
    (run / "train_settings.json").write_text(json.dumps({
        "data_root": "data/mvtec_loco_anomaly_detection", "dataset_format": "loco", "categories": "all", "seed": 4,
        "mixed_precision": "fp16", "calibration_fpr": 0.01, "backbone_weights": None,
        "tokenizer": {"epochs": 1000, "max_steps": None, "batch_size": 16, "learning_rate": 1e-4, "schedule": "step",
                      "warmup_fraction": 0.0, "weight_decay": 1e-4, "max_grad_norm": 0.1},
        "predictor": {"epochs": 1000, "max_steps": None, "batch_size": 32, "learning_rate": 1e-4, "schedule": "cosine",
                      "warmup_fraction": 0.04, "weight_decay": 1e-6, "max_grad_norm": 1.0}}))
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text(json.dumps(FAKE_METRICS))
    return run


class RecordingApi:
    """Stands in for `huggingface_hub.HfApi`: records every call and keeps a copy of the uploaded folder."""

    instances: list["RecordingApi"] = []
    copy_to = None

    def __init__(self, *args, **kwargs):
        assert not args and not kwargs, "HfApi must be built without arguments (token from env / login)"
        self.calls = []
        RecordingApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        shutil.copytree(kwargs["folder_path"], RecordingApi.copy_to)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/{COMMIT}")


def _cache_repo(cache, repo_id: str, folder) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(folder, repo / "snapshots" / COMMIT)


CHILD = textwrap.dedent(
    """
    import json, re, sys
    sys.modules["ladmim_hf"] = None  # any import of the package now fails: only the Hub files may be used
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, pipeline

    image_path, readme_path, sources = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    image = Image.open(image_path)
    results = {}
    for label, source in sources.items():
        entry = {}
        if label != "trained":
            model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
            processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=True)
            out = model(**processor(image), category="pushpins", num_masks=4, seed=[3])
            entry.update(module=type(model).__module__, model_score=float(out.pred_score[0]))
        detector = pipeline("image-anomaly-detection", model=source, trust_remote_code=True)
        result = detector(image_path, category="pushpins", num_masks=4, seed=3)
        entry.update(pipeline_module=type(detector).__module__, score=result["score"], label=result["label"],
                     map_size=list(result["anomaly_map"].size), map_mode=result["anomaly_map"].mode)
        results[label] = entry
    namespace = {}  # the README's snippets, as a user would paste them
    for block in re.findall(r"```python\\n(.*?)```", open(readme_path).read(), re.S):
        exec(block.replace('"image.png"', repr(image_path)), namespace)
    results["readme"] = {"model_score": float(namespace["out"].pred_score[0]), "pipeline_score": namespace["result"]["score"]}
    print(json.dumps(results))
    """
)


def test_push_then_load_back_without_ladmim_hf(tmp_path, run_dir, tiny_model, monkeypatch):
    import huggingface_hub

    model_dir = run_dir / "model"
    uploaded = tmp_path / "uploaded"
    RecordingApi.instances, RecordingApi.copy_to = [], uploaded
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    url = hub.push_to_hub(model_dir, REPO_ID, private=True, revision="v1")
    assert url == f"https://huggingface.co/{REPO_ID}/commit/{COMMIT}"

    (api,) = RecordingApi.instances
    assert [c[0] for c in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1:] == (REPO_ID, {"private": True, "exist_ok": True, "repo_type": "model"})
    assert api.calls[1][1:] == (REPO_ID, {"branch": "v1", "exist_ok": True, "repo_type": "model"})
    upload = api.calls[2][2]
    assert upload["revision"] == "v1" and upload["repo_type"] == "model" and upload["commit_message"]
    assert not any("token" in kwargs for _, _, kwargs in api.calls)
    assert {p.name for p in uploaded.iterdir()} == EXPECTED_FILES

    config = json.loads((uploaded / "config.json").read_text())
    assert config["auto_map"] == hub.AUTO_MAP and config["custom_pipelines"] == hub.CUSTOM_PIPELINES
    processor = json.loads((uploaded / "preprocessor_config.json").read_text())
    assert processor["auto_map"] == {"AutoImageProcessor": "image_processing_ladmim.LadmimImageProcessor"}

    # Model card: metadata, results read from ../eval/metrics.json, settings, citations.
    card = ModelCard((uploaded / "README.md").read_text())
    meta = card.data.to_dict()
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == hub.DEFAULT_PIPELINE_TAG
    assert meta["license"] == "cc-by-nc-sa-4.0" and meta["datasets"] == ["mvtec-loco-ad"]
    assert {"anomaly-detection", "ladmim", "mvtec-loco", "logical-anomaly-detection"} <= set(meta["tags"])
    found = {(r.dataset_config, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert found[("breakfast_box", "Image AUROC, logical anomalies vs good")] == 0.81
    assert found[("mean", "Image AUROC, mean of logical and structural")] == 0.855
    assert ("pushpins", "Image AUROC, structural anomalies vs good") not in found  # NaN is left out
    text = card.text
    assert "| breakfast_box | 0.810 | 0.920 | 0.865 | 0.410 | 0.710 / 0.520 | 0.550 / 0.920 | 0.600 / 0.700 |" in text
    assert "| pushpins | 0.770 | n/a |" in text and "| **mean** | 0.790 | 0.920 | 0.855 |" in text
    assert "batch 32, lr 0.0001 (cosine schedule" in text and "stage `tokenizer`: 4 steps, final loss 0.2500" in text
    assert "no calibration statistics" in text
    assert "(L1 between predicted and true histograms)" in text and "trained with the L1 histogram loss (the paper)" in text
    for needle in ("Sakai", "Hasegawa", "Koshino", "2410.10234", "Transactions on Machine Learning Research",
                   "Hierarchical Vector Quantized Transformer", "NeurIPS", f'pipeline("image-anomaly-detection", model="{REPO_ID}"'):
        assert needle in text, needle

    # The dry run (through the `ladmim push` command) writes the very same folder and uploads nothing.
    dry = tmp_path / "dry"
    assert cli_main(["push", "--model", str(model_dir), "--repo_id", REPO_ID, "--dry_run", str(dry)]) == 0
    assert len(RecordingApi.instances) == 1
    for name in EXPECTED_FILES:
        assert (dry / name).read_bytes() == (uploaded / name).read_bytes(), name
    assert cli_main(["push", "--model", str(model_dir), "--repo_id", REPO_ID, "--dry_run", str(dry)]) == 2  # not empty

    # A folder as training writes it, plus add_pipeline_to_folder (what training will call).
    trained = tmp_path / "trained"
    shutil.copytree(model_dir, trained)
    hub.add_pipeline_to_folder(trained)

    image_path = tmp_path / "image.png"
    Image.fromarray((np.random.default_rng(0).random((48, 60, 3)) * 255).astype(np.uint8)).save(image_path)
    image = Image.open(image_path)
    processor = LadmimImageProcessor(size=64)
    expected_model = float(tiny_model(**processor(image), category="pushpins", num_masks=4, seed=[3]).pred_score[0])
    from transformers import pipeline

    expected_pipeline = pipeline("image-anomaly-detection", model=str(uploaded), trust_remote_code=True)(
        str(image_path), category="pushpins", num_masks=4, seed=3)
    readme_model = float(tiny_model(**processor(image), category="breakfast_box", num_masks=10, seed=0).pred_score[0])

    cache = tmp_path / "hub"
    _cache_repo(cache, REPO_ID, uploaded)
    _cache_repo(cache, TRAINED_ID, trained)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               HF_HUB_CACHE=str(cache), HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH="")
    sources = {"local": str(uploaded), "hub": REPO_ID, "trained": TRAINED_ID}
    result = subprocess.run([sys.executable, str(script), str(image_path), str(uploaded / "README.md"), json.dumps(sources)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    for label in ("local", "hub", "trained"):
        entry = got[label]
        assert entry["pipeline_module"].startswith("transformers_modules"), entry
        assert entry["score"] == pytest.approx(expected_pipeline["score"], rel=1e-5), label
        assert entry["label"] == expected_pipeline["label"] and entry["map_size"] == [60, 48] and entry["map_mode"] == "F"
        if label != "trained":
            assert entry["module"].startswith("transformers_modules"), entry
            assert entry["model_score"] == pytest.approx(expected_model, rel=1e-5), label
    assert got["readme"]["model_score"] == pytest.approx(readme_model, rel=1e-5)
    assert math.isfinite(got["readme"]["pipeline_score"])


def test_push_refuses_bad_folders(tmp_path, run_dir):
    model_dir = run_dir / "model"
    with pytest.raises(ValueError, match="repo_id must look like 'org/name'"):
        hub.push_to_hub(model_dir, "not a repo", dry_run=tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="metrics file .*nope.json does not exist"):
        hub.push_to_hub(model_dir, REPO_ID, dry_run=tmp_path / "b", metrics_path=tmp_path / "nope.json")
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="has no model.safetensors"):
        hub.push_to_hub(model_dir, REPO_ID, dry_run=tmp_path / "c", api=object())


def test_load_model_errors(tmp_path, tiny_model):
    good = tmp_path / "good"
    tiny_model.save_pretrained(good)
    loaded = load_model(good)
    torch.testing.assert_close(loaded.tokenizer.top_quantizer.embed, tiny_model.tokenizer.top_quantizer.embed)
    with pytest.raises(ValueError, match=r"unknown category 'screw_bag'; this model was trained on \['breakfast_box', 'pushpins'\]"):
        loaded(pixel_values=torch.zeros(1, 3, 64, 64), category="screw_bag")

    def variant(name):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        return folder

    def edit_config(folder, change):
        config = json.loads((folder / "config.json").read_text())
        change(config)
        (folder / "config.json").write_text(json.dumps(config))

    no_code = variant("no_code")
    (no_code / "modeling_ladmim.py").unlink()
    with pytest.raises(ModelFolderError, match="does not hold exactly the code trust_remote_code loading needs: modeling_ladmim.py"):
        load_model(no_code)
    load_model(no_code, check_code=False)  # the installed package does not need the files
    _cache_repo(tmp_path / "cache", "org/no-code", no_code)  # the same through a Hub repo id (offline cache)
    with pytest.raises(ModelFolderError, match="org/no-code does not hold exactly the code trust_remote_code loading needs: modeling_ladmim.py"):
        load_model("org/no-code", cache_dir=tmp_path / "cache", local_files_only=True)
    no_map = variant("no_map")
    edit_config(no_map, lambda c: c.pop("auto_map"))
    with pytest.raises(ModelFolderError, match=r"auto_map\['AutoConfig'\]"):
        load_model(no_map)

    newer = variant("newer")
    edit_config(newer, lambda c: (c.update(future_field=1), c["tokenizer_config"].update(new_knob=True)))
    with pytest.warns(ConfigFieldsWarning, match=r"does not know: future_field, tokenizer_config\.new_knob.*ignored"):
        model = load_model(newer)
    assert not hasattr(model.config, "future_field")
    with pytest.raises(ModelFolderError, match="future_field.*refusing to load with strict_config=True"):
        load_model(newer, strict_config=True)

    truncated = variant("truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match=r"model\.safetensors is truncated: \d+ bytes, but its header describes \d+ bytes"):
        load_model(truncated)
    (truncated / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(ModelFolderError, match="truncated: its header alone needs"):
        load_model(truncated)

    no_weights = variant("no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="has no model.safetensors"):
        load_model(no_weights)
    misfit = variant("misfit")
    edit_config(misfit, lambda c: c["predictor_config"].update(num_hidden_layers=3))
    with pytest.raises(ModelFolderError, match=r"do not fit its config: missing tensors .*predictors\.breakfast_box\.layers\.2\."):
        load_model(misfit)
    tokenizer_dir = tmp_path / "tokenizer"
    tiny_model.tokenizer.save_pretrained(tokenizer_dir)
    with pytest.raises(ModelFolderError, match="model_type 'ladmim_tokenizer'.*LadmimTokenizerModel"):
        load_model(tokenizer_dir)
    broken = variant("broken")
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="config.json at .* is not valid JSON"):
        load_model(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFolderError, match="has no config.json"):
        load_model(tmp_path / "empty")
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelFolderError, match="'org/not-cached' is not in the local cache"):
        load_model("org/not-cached", local_files_only=True)


def test_cli_parsers_share_definitions():
    from ladmim_hf import convert
    from ladmim_hf.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["push", "--model", "m", "--repo_id", "org/x", "--private", "--revision", "dev"])
    assert (args.model, args.repo_id, args.private, args.revision, args.func) == ("m", "org/x", True, "dev", hub.run_push_from_args)
    assert vars(hub.build_parser().parse_args(["--model", "m", "--repo_id", "org/x", "--private", "--revision", "dev"])) == {
        k: v for k, v in vars(args).items() if k not in ("command", "func")}
    args = parser.parse_args(["convert", "--hvq", "h.pt", "--predictor", "pushpins=p.pt", "--output", "out"])
    assert (args.hvq, args.predictor, args.output, args.func) == ("h.pt", ["pushpins=p.pt"], "out", convert.run_from_args)
    with pytest.raises(SystemExit):
        parser.parse_args(["push", "--model", "m", "--repo_id", "org/x", "--token", "secret"])  # no token argument


def test_model_card_names_the_structural_map_and_patch_tokens(tmp_path):
    from conftest import tiny_config

    from ladmim_hf import LadmimForAnomalyDetection

    plain, special = tmp_path / "plain", tmp_path / "special"
    LadmimForAnomalyDetection(tiny_config()).save_pretrained(plain)
    LadmimForAnomalyDetection(tiny_config(tokenizer={"residual_normalization": "cell_channel"},
                                          predictor={"patch_size": 2, "loss_type": "token_ce"}, train_num_masked=4,
                                          train_min_block=4, score_num_masked=8, score_min_block=4,
                                          logical_pose_step=3, global_branch=True, global_descriptor="part_histogram",
                                          global_parts=8, logical_retrieval_neighbours=5, logical_retrieval_num_masked=4,
                                          logical_retrieval_min_block=2, logical_retrieval_rank=4,
                                          global_image_size=128)).save_pretrained(special)
    plain_card, special_card = hub.build_model_card(plain, "org/plain"), hub.build_model_card(special, "org/special")
    assert "normalised per cell and channel" in special_card and "normalised per cell and channel" not in plain_card
    assert ("the logical branch scores each image as it is and moved 3 px right, left, down and up, and keeps the "
            "best-fitting pose") in special_card and "best-fitting pose" not in plain_card
    assert ("retrieves the 5 training images whose visible parts look most alike (40 masks of 4 cells) and compares "
            "the hidden cells with the closest of them") in special_card and "retrieves" not in plain_card
    assert ("The global branch reads the image enlarged to 128 px (8 x 8 cells), so parts a cell wide at "
            "64 px count.") in special_card and "enlarged" not in plain_card
    assert "one token per 2x2 cells" in special_card and "one token per" not in plain_card


def test_model_card_shows_every_branch_baseline_and_the_fusion(tmp_path):
    from conftest import tiny_config

    from ladmim_hf import LadmimForAnomalyDetection

    config = tiny_config(memory_bank_size=8, global_branch=True, fusion_rule="max", global_descriptor="part_histogram",
                         global_parts=8, fused_branches=["logical", "memory_bank", "global"])
    LadmimForAnomalyDetection(config).save_pretrained(tmp_path / "model")
    metrics = json.loads(json.dumps(FAKE_METRICS))
    for entry in metrics["categories"].values():
        entry["branches"].update({"memory_bank": {"auroc_logical": 0.61, "auroc_structural": 0.93},
                                  "global": {"auroc_logical": 0.83, "auroc_structural": 0.58}})
    metrics["baselines"]["global"] = {"breakfast_box": {"auroc_logical": 0.7, "auroc_structural": 0.5},
                                      "pushpins": {"auroc_logical": 0.8, "auroc_structural": 0.4},
                                      "mean": {"auroc_logical": 0.75, "auroc_structural": 0.45}}
    metrics["branches_mean"] = {"logical": {"auroc_logical": 0.69, "auroc_structural": 0.52},
                                "memory_bank": {"auroc_logical": 0.61, "auroc_structural": 0.93}}
    metrics["categories"]["pushpins"]["spro_0.05"] = "not measured"  # a hand-edited file: shown as n/a

    card = hub.build_model_card(tmp_path / "model", REPO_ID, metrics=metrics)
    assert ("| breakfast_box | 0.810 | 0.920 | 0.865 | 0.410 | 0.710 / 0.520 | 0.550 / 0.920 | 0.610 / 0.930 | "
            "0.830 / 0.580 | 0.600 / 0.700 | 0.700 / 0.500 |") in card
    assert "| pushpins | 0.770 | n/a | n/a | n/a | 0.670 / 0.520 |" in card
    assert ("| **mean** | 0.790 | 0.920 | 0.855 | 0.410 | 0.690 / 0.520 | n/a | 0.610 / 0.930 | n/a | 0.550 / 0.675 | "
            "0.750 / 0.450 |") in card
    assert "memory bank (log/str) | global (log/str) | kNN baseline (log/str) | global baseline (log/str) |" in card
    assert "global is the Mahalanobis distance of mean- and std-pooled features" in card  # the baseline
    assert "image's part histogram (the share of its feature cells in each of 8 k-means clusters" in card
    assert "the fused score is the maximum of the logical, memory-bank and global scores (fusion rule `max`)" in card
    assert "PatchCore memory bank" in card and "- memory bank: 8 patches per category" in card
    assert "out.logical_score, out.structural_score, out.memory_bank_score, out.global_score)" in card
    assert 'result["memory_bank_score"], result["global_score"])' in card
    assert "summed" not in card

    assert "no calibration statistics: the fused score is the raw maximum of the logical, memory-bank and global" in card
    assert "two branch scores" not in card
    default_card = hub.build_model_card(_saved_tiny(tmp_path / "plain"), REPO_ID)
    assert "the fused score is the sum of the logical and structural scores (fusion rule `sum`)" in default_card
    assert "the fused score is the raw sum of the logical and structural scores" in default_card


def _saved_tiny(folder):
    from conftest import tiny_config

    from ladmim_hf import LadmimForAnomalyDetection

    LadmimForAnomalyDetection(tiny_config()).save_pretrained(folder)
    return folder
