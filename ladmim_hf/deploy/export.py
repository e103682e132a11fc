"""`ladmim export`: a trained detector as ONNX and OpenVINO graphs, one per category, that take
preprocessed pixels and return the fused score and map and every branch's raw score and map.

The graph is [`LadmimForAnomalyDetection.branch_outputs`] traced by `torch.onnx.export` (the
`torch.export` path) for one category, with that category's calibration and the mask set drawn from
`seed` held as constants, so it computes what `model(pixel_values, category=C, seed=seed)` does.
OpenVINO's graph is converted from the ONNX one (weights kept in float32). The folder also holds
`ladmim_export.json` (masks, thresholds, preprocessing, parity measured at export) and the torch-free
runtime `inference_ladmim.py` + `imaging_ladmim.py` that scores with it.

    ladmim export --model outputs/synthloco/model --format onnx openvino --out exported
    ladmim predict --backend onnx --model exported --category pushpins part.png

Needs the `export` extra: `pip install 'ladmim-hf[export]'` (onnx, onnxscript, onnxruntime, openvino).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.modeling_ladmim import LadmimForAnomalyDetection
from . import inference_ladmim
from .inference_ladmim import BACKENDS, FORMAT_VERSION, GRAPH_SUFFIX, METADATA_NAME, LadmimInferencer

logger = logging.getLogger(__name__)

OPSET = 18
# Parity of an export with PyTorch on random pixels, checked at export (the bar of issue 21 is 1e-4).
PARITY_TOLERANCE = 1e-4
_EXTRA_PACKAGES = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "openvino": ("onnx", "onnxscript", "openvino")}


class DetectorGraph(nn.Module):
    """One category of a detector, as a module with a single tensor input and a tuple of outputs.

    Args:
        detector: the trained detector (eval mode).
        category: the category this graph scores.
        masks: the mask set `(M, N)` bool, shared by every image (as `forward` with an int seed).

    `forward(pixel_values (B, 3, S, S))` returns, in `output_names` order: `pred_score (B,)`,
    `anomaly_map (B, S, S)`, then every enabled branch's raw `{branch}_score (B,)` and, for the
    branches with a map, `{branch}_map (B, S, S)`.
    """

    def __init__(self, detector: LadmimForAnomalyDetection, category: str, masks: torch.Tensor):
        super().__init__()
        self.detector = detector
        self.category = category
        self.class_id = detector.categories.index(category)
        self.register_buffer("masks", masks.to(torch.bool))
        self.branches = list(detector.config.enabled_branches)
        self.map_branches = [b for b in self.branches if b != "global"]
        # The kernel's median needs a value-dependent shape, which a graph cannot hold: a constant here.
        self.code_kernels = None
        if detector.config.histogram_distance == "codebook_mmd":
            self.code_kernels = {self.class_id: detector.tokenizer.code_kernel(category, detector.config.kernel_bandwidth)}

    @property
    def output_names(self) -> list[str]:
        return ["pred_score", "anomaly_map", *(f"{b}_score" for b in self.branches),
                *(f"{b}_map" for b in self.map_branches)]

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        detector = self.detector
        features = detector.tokenizer.extract_features(pixel_values)
        batch = pixel_values.shape[0]
        class_ids = torch.full((batch,), self.class_id, dtype=torch.long, device=pixel_values.device)
        masks = self.masks[None].expand(batch, -1, -1)
        raw = detector.branch_outputs(features, class_ids, masks, groups=[self.class_id], code_kernels=self.code_kernels,
                                      moved_features=detector.extract_moved_features(pixel_values),
                                      global_features=detector.extract_global_features(pixel_values))
        pred_score = detector.fuse_branches(detector.standardized_scores(raw.scores, self.category))
        anomaly_map = detector.fuse_branches(detector.standardized_maps(raw.maps, self.category))
        return (pred_score, anomaly_map, *(raw.scores[b] for b in self.branches),
                *(raw.maps[b] for b in self.map_branches))


def processor_settings(processor) -> dict:
    """What an exported folder needs of a [`LadmimImageProcessor`] to prepare pixels the same way."""
    return {"size": processor.size, "resample": processor.resample, "image_mean": list(processor.image_mean),
            "image_std": list(processor.image_std), "max_pixels": processor.max_pixels}


def scoring_masks(detector: LadmimForAnomalyDetection, num_masks: int | None, seed: int) -> torch.Tensor:
    """The mask set `(M, N)` that `detector(..., num_masks=num_masks, seed=seed)` scores every image with."""
    return detector.mask_generator()(1, detector.resolve_num_masks(num_masks), [int(seed)])[0]


def reference_outputs(detector: LadmimForAnomalyDetection, pixel_values: torch.Tensor, category: str,
                      num_masks: int | None, seed: int) -> dict[str, np.ndarray]:
    """What PyTorch's `forward` gives for the graph's outputs, by name (the parity reference)."""
    with torch.inference_mode():
        out = detector(pixel_values=pixel_values, category=category, num_masks=num_masks, seed=seed)
    values = {"pred_score": out.pred_score, "anomaly_map": out.anomaly_map}
    values.update({f"{b}_score": v for b, v in out.branch_scores().items()})
    values.update({f"{b}_map": v for b, v in out.branch_maps().items()})
    return {name: value.float().cpu().numpy() for name, value in values.items()}


def max_difference(ours: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest absolute difference per output, relative to the output's scale where that exceeds 1."""
    out = {}
    for name, expected in reference.items():
        scale = max(1.0, float(np.abs(expected).max()))
        out[name] = float(np.abs(ours[name] - expected).max() / scale)
    return out


def _check_packages(formats: list[str]) -> None:
    missing = sorted({package for fmt in formats for package in _EXTRA_PACKAGES[fmt]
                      if importlib.util.find_spec(package) is None})
    if missing:
        raise SystemExit(f"error: exporting to {', '.join(formats)} needs {', '.join(missing)}: "
                         "pip install 'ladmim-hf[export]'")


def export_onnx(graph: DetectorGraph, example: torch.Tensor, path: Path) -> None:
    """Trace `graph` for inputs shaped like `example` and write one self-contained `.onnx` file."""
    captured = io.StringIO()
    # One INFO line per folded constant or rewrite otherwise, and one warning per torchvision operator
    # the exporter could register (we use none).
    quiet = {"onnx_ir": logging.WARNING, "onnxscript": logging.WARNING,
             "torch.onnx._internal.exporter._registration": logging.ERROR}
    saved = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(captured), warnings.catch_warnings():
            # the exporter narrates every step on stdout, and warns about its own internals
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(graph, (example,), str(path), dynamo=True, external_data=False, opset_version=OPSET,
                              input_names=["pixel_values"], output_names=graph.output_names, optimize=True)
    except Exception:
        logger.error("torch.onnx.export failed; its log:\n%s", captured.getvalue())
        raise
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def export_openvino(onnx_path: Path, path: Path) -> None:
    """Convert an ONNX graph to OpenVINO IR (`.xml` + `.bin`), weights kept in float32."""
    import openvino as ov

    ov.save_model(ov.convert_model(str(onnx_path)), str(path), compress_to_fp16=False)


def export_model(detector: LadmimForAnomalyDetection, out_dir: str | Path, formats=("onnx",), categories=None,
                 num_masks: int | None = None, seed: int = 0, batch_size: int = 1, preprocessing: dict | None = None,
                 check_parity: bool = True) -> dict:
    """Export `detector` to `out_dir` (replaced as a whole, atomically) and return its metadata.

    Args:
        formats: any of `"onnx"`, `"openvino"`.
        categories: the categories to export (default: all), one graph each.
        num_masks, seed: the scoring mask set (default: `config.num_masks`, seed 0: what `forward` uses).
        batch_size: images per graph call (the graph's input shape is fixed; the inferencer pads).
        preprocessing: the image processor's settings (`processor_settings`); default: a default
            `LadmimImageProcessor` at the model's input size (ImageNet normalisation).
        check_parity: score random pixels with every graph and with PyTorch, and record the largest
            difference per output (`parity` in the metadata; a warning above `PARITY_TOLERANCE`).
    """
    from ..io_utils import atomic_save_directory
    from ..models.image_processing_ladmim import LadmimImageProcessor

    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in BACKENDS]
    if unknown or not formats:
        raise ValueError(f"formats must be some of {BACKENDS}, got {formats}")
    categories = list(categories or detector.categories)
    for category in categories:
        if category not in detector.categories:
            raise ValueError(f"unknown category {category!r}; this model was trained on {detector.categories}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    detector = detector.eval()
    size = detector.config.tokenizer_config.image_size
    masks = scoring_masks(detector, num_masks, seed)
    preprocessing = preprocessing or processor_settings(LadmimImageProcessor(size=size))
    example = torch.from_numpy(np.random.default_rng(seed).standard_normal((batch_size, 3, size, size)).astype(np.float32))
    metadata = {
        "format_version": FORMAT_VERSION, "backends": formats, "batch_size": batch_size,
        "input": {"name": "pixel_values", "shape": [batch_size, 3, size, size], "dtype": "float32"},
        "branches": list(detector.config.enabled_branches), "fused_branches": list(detector.config.fused_branches),
        "fusion_rule": detector.config.fusion_rule, "num_masks": int(masks.shape[0]), "seed": int(seed),
        "masks": [torch.nonzero(mask).flatten().tolist() for mask in masks], "grid_size": int(masks.shape[1] ** 0.5),
        "preprocessing": preprocessing, "categories": {}, "parity": {},
        "exported_with": {"torch": torch.__version__, "opset": OPSET},
    }

    def write(folder: Path) -> None:
        for category in categories:
            stats = detector.calibration_for(category)
            graph = DetectorGraph(detector, category, masks).eval()
            entry = {"threshold": float(stats["threshold"]), "calibrated": category in detector.config.calibration}
            metadata["output_names"] = graph.output_names
            onnx_path = folder / f"{category}.onnx"
            logger.info("exporting %s to ONNX", category)
            export_onnx(graph, example, onnx_path)
            if "onnx" in formats:
                entry["onnx"] = onnx_path.name
            if "openvino" in formats:
                logger.info("converting %s to OpenVINO", category)
                xml = folder / f"{category}{GRAPH_SUFFIX['openvino']}"
                export_openvino(onnx_path, xml)
                entry["openvino"] = xml.name
            if "onnx" not in formats:
                onnx_path.unlink()
            metadata["categories"][category] = entry
        for module in (inference_ladmim.__file__, Path(__file__).resolve().parent.parent / "models" / "imaging_ladmim.py"):
            shutil.copyfile(module, folder / Path(module).name)
        (folder / METADATA_NAME).write_text(json.dumps(metadata, indent=1) + "\n")
        if check_parity:
            for category in categories:
                reference = reference_outputs(detector, example, category, num_masks, seed)
                metadata["parity"][category] = {}
                for backend in formats:
                    result = LadmimInferencer(folder, backend).graph(category)(example.numpy())
                    worst = max(max_difference(result, reference).values())
                    metadata["parity"][category][backend] = worst
                    if worst > PARITY_TOLERANCE:
                        logger.warning("%s %s differs from PyTorch by %.2e (tolerance %.0e)", category, backend,
                                       worst, PARITY_TOLERANCE)
            (folder / METADATA_NAME).write_text(json.dumps(metadata, indent=1) + "\n")

    atomic_save_directory(out_dir, write)
    return metadata


# --------------------------------------------------------------------------------------------------
# The `ladmim export` subcommand
# --------------------------------------------------------------------------------------------------


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_model_option, add_processor_option, non_negative_int, positive_int

    add_model_option(parser)
    parser.add_argument("--format", nargs="+", choices=BACKENDS, default=["onnx"],
                        help="graph formats to write (default: onnx)")
    parser.add_argument("--out", required=True, help="export folder (replaced as a whole if it exists)")
    parser.add_argument("--category", nargs="+", default=None, help="categories to export (default: all)")
    parser.add_argument("--num_masks", type=positive_int, default=None, help="masks per image (default: the model's)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="seed of the mask set, fixed in the graph (default: 0, as `predict`)")
    parser.add_argument("--batch_size", type=positive_int, default=1,
                        help="images per graph call (default: 1, for streaming; other counts are padded)")
    add_processor_option(parser)


def run_from_args(args: argparse.Namespace) -> int:
    from ..evaluation import load_detector

    _check_packages(args.format)
    try:
        detector, processor = load_detector(args.model, args.allow_default_processor)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load the model {args.model}: {error}") from None
    try:
        metadata = export_model(detector, args.out, args.format, args.category, args.num_masks, args.seed,
                                args.batch_size, processor_settings(processor))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    for category, parity in metadata["parity"].items():
        checks = ", ".join(f"{backend} {value:.1e}" for backend, value in parity.items())
        print(f"{category}: {', '.join(metadata['backends'])} graphs; largest difference from PyTorch {checks}")
    print(f"export: {args.out} ({metadata['num_masks']} masks from seed {metadata['seed']}, batch "
          f"{metadata['batch_size']}); score with `ladmim predict --backend {metadata['backends'][0]} --model {args.out} IMAGES`")
    return 0


__all__ = ["DetectorGraph", "PARITY_TOLERANCE", "add_export_arguments", "export_model", "max_difference",
           "processor_settings", "reference_outputs", "run_from_args", "scoring_masks"]
