"""Exported graphs against PyTorch on a trained model's real test images: the largest difference of the
fused score and of every branch's score and map, per backend, and how many verdicts agree.

Exports every category of `--model` (ONNX and OpenVINO, batch 1, seed 0) and scores
`--images_per_category` test images of each category of `--data_root` (spread evenly over its test
split: good, logical and structural) three ways: PyTorch `forward`, and each exported graph through
`LadmimInferencer` from the image files (its own torch-free preprocessing).

    python benchmarks/export_parity.py --model outputs/synthloco/model --data_root data/synthloco --threads 2
    python benchmarks/export_parity.py --tiny      # a random tiny model and generated images, for the tests

Last stdout line: JSON with `images`, `max_difference` (`{backend: {output: value}}`, relative to the
output's scale where it exceeds 1), `worst` (`{backend: value}`) and `verdicts_agree` (`{backend: n}`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

import _common as C

BACKENDS = ("onnx", "openvino")


def _tiny_folder_and_images(root: Path, count: int, seed: int) -> tuple[Path, dict[str, list[str]]]:
    from PIL import Image

    from ladmim_hf import LadmimImageProcessor

    config = C.tiny_config()
    folder = root / "model"
    C.build_detector(config, seed=seed).save_pretrained(folder)
    LadmimImageProcessor(size=config.tokenizer_config.image_size).save_pretrained(folder)
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        path = root / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, (48 + index, 80, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return folder, {C.CATEGORY: paths}


def _test_images(data_root: str, categories: list[str], per_category: int) -> dict[str, list[str]]:
    from ladmim_hf.data.layout import evaluation_rows, find_layout

    layout = find_layout(data_root)
    out = {}
    for category in categories:
        rows = evaluation_rows(layout, category)
        picks = np.linspace(0, len(rows) - 1, min(per_category, len(rows))).round().astype(int)
        out[category] = [rows[i]["path"] for i in sorted(set(picks.tolist()))]
    return out


def main(argv=None) -> dict:
    parser = C.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="trained model folder (required unless --tiny)")
    parser.add_argument("--data_root", default=None, help="its benchmark (LOCO layout; required unless --tiny)")
    parser.add_argument("--images_per_category", type=int, default=10)
    args = parser.parse_args(argv)
    C.apply_threads(args)
    if not args.tiny and (args.model is None or args.data_root is None):
        parser.error("pass --model and --data_root (or --tiny)")
    from ladmim_hf.deploy.export import export_model, max_difference, processor_settings, reference_outputs
    from ladmim_hf.deploy.inference_ladmim import LadmimInferencer
    from ladmim_hf.evaluation import load_detector

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.tiny:
            folder, images = _tiny_folder_and_images(tmp, 4, args.seed)
        else:
            folder = Path(args.model)
        detector, processor = load_detector(str(folder))
        if not args.tiny:
            images = _test_images(args.data_root, detector.categories, args.images_per_category)
        C.log(f"exporting {len(images)} categories (ONNX + OpenVINO)")
        export_model(detector, tmp / "export", list(BACKENDS), list(images), preprocessing=processor_settings(processor))
        worst = {backend: {} for backend in BACKENDS}
        agree = dict.fromkeys(BACKENDS, 0)
        inferencers = {backend: LadmimInferencer(tmp / "export", backend, torch.get_num_threads()) for backend in BACKENDS}
        count = 0
        for category, paths in images.items():
            C.log(f"{category}: {len(paths)} images")
            for path in paths:
                reference = reference_outputs(detector, processor(path)["pixel_values"], category, None, 0)
                threshold = float(detector.calibration_for(category)["threshold"])
                for backend, inferencer in inferencers.items():
                    result = inferencer([path], category=category)
                    outputs = {"pred_score": result.pred_score, "anomaly_map": result.anomaly_map}
                    outputs.update({f"{b}_score": v for b, v in result.branch_scores().items()})
                    outputs.update({f"{b}_map": v for b, v in result.branch_maps().items()})
                    for name, value in max_difference(outputs, reference).items():
                        worst[backend][name] = max(worst[backend].get(name, 0.0), value)
                    agree[backend] += int(bool(result.pred_label[0]) == bool(reference["pred_score"][0] > threshold))
                count += 1
    summary = {backend: max(values.values()) for backend, values in worst.items()}
    payload = {"benchmark": "export_parity", "model": args.model or "tiny", "images": count,
               "max_difference": worst, "worst": summary, "verdicts_agree": agree}
    C.emit(f"{count} images: largest difference from PyTorch over every score and map "
           + ", ".join(f"{b} {v:.1e}" for b, v in summary.items())
           + "; verdicts agree " + ", ".join(f"{b} {n}/{count}" for b, n in agree.items()), payload)
    return payload


if __name__ == "__main__":
    main()
