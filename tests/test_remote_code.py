"""The real `trust_remote_code` path: a subprocess where `ladmim_hf` cannot be imported loads the
saved folder from a local path and from an offline Hub cache under the repo id `org/ladmim-loco`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import torch
from conftest import fitted_branch_model

from ladmim_hf import LadmimImageProcessor

REPO_ID = "org/ladmim-loco"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

CHILD = textwrap.dedent(
    """
    import json, sys
    sys.modules["ladmim_hf"] = None  # any import of the package now fails: only the Hub files may be used
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    source = sys.argv[1]
    config = AutoConfig.from_pretrained(source, trust_remote_code=True)
    model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=True)
    assert type(model).__name__ == "LadmimForAnomalyDetection", type(model)
    assert "ladmim_hf" not in type(model).__module__, type(model).__module__
    image = Image.fromarray(np.load(sys.argv[2]))
    inputs = processor(image)
    out = model(**inputs, category="pushpins", num_masks=4, seed=[3])
    print(json.dumps({"module": type(model).__module__, "categories": config.tokenizer_config.categories,
                      "pred_score": out.pred_score.tolist(), "logical_score": out.logical_score.tolist(),
                      "structural_score": out.structural_score.tolist(),
                      "memory_bank_score": out.memory_bank_score.tolist(), "global_score": out.global_score.tolist(),
                      "pixel_sum": float(inputs["pixel_values"].sum())}))
    """
)


def _run_child(source: str, image_path, env_extra: dict, tmp_path) -> dict:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"),
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH="")
    env.update(env_extra)
    result = subprocess.run([sys.executable, str(script), source, str(image_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_remote_code_local_folder_and_offline_hub_cache(tmp_path):
    import numpy as np

    # every branch, so the shipped branches_ladmim.py is exercised too, and predictors that read one tap,
    # so the config's tap lookup runs from the shipped files
    tiny_model = fitted_branch_model(predictor_taps=[2], global_descriptor="part_histogram", global_parts=8)

    save_dir = tmp_path / "saved"
    tiny_model.save_pretrained(save_dir)
    processor = LadmimImageProcessor(size=64)
    processor.save_pretrained(save_dir)
    preprocessor = json.loads((save_dir / "preprocessor_config.json").read_text())
    assert preprocessor["auto_map"]["AutoImageProcessor"] == "image_processing_ladmim.LadmimImageProcessor"
    assert (save_dir / "image_processing_ladmim.py").exists()

    image = (np.random.default_rng(0).random((80, 96, 3)) * 255).astype(np.uint8)
    image_path = tmp_path / "image.npy"
    np.save(image_path, image)
    inputs = processor(image)
    expected = tiny_model(**inputs, category="pushpins", num_masks=4, seed=[3])

    # An offline Hub cache laid out as huggingface_hub writes it.
    cache = tmp_path / "hub"
    repo = cache / "models--org--ladmim-loco"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(save_dir, repo / "snapshots" / COMMIT)

    results = {
        "local": _run_child(str(save_dir), image_path, {}, tmp_path),
        "hub": _run_child(REPO_ID, image_path, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}, tmp_path),
    }
    for name, got in results.items():
        assert got["categories"] == ["breakfast_box", "pushpins"], name
        assert got["module"].startswith("transformers_modules"), got["module"]
        assert abs(got["pixel_sum"] - float(inputs["pixel_values"].sum())) < 1e-3, name
        for key in ("pred_score", "logical_score", "structural_score", "memory_bank_score", "global_score"):
            torch.testing.assert_close(torch.tensor(got[key]), getattr(expected, key), rtol=1e-5, atol=1e-5, msg=f"{name} {key}")
