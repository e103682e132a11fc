"""Score images with an exported LADMIM detector, with ONNX Runtime or OpenVINO and without torch.

`ladmim export` copies this file and `imaging_ladmim.py` beside the graphs, so a line computer needs
only `numpy`, `pillow` and `onnxruntime` (or `openvino`):

    import sys; sys.path.insert(0, "exported")
    from inference_ladmim import LadmimInferencer
    inferencer = LadmimInferencer("exported", backend="onnx")
    result = inferencer(["part.png"], category="pushpins")
    result.pred_score, result.pred_label, result.anomaly_map.shape, result.branch_scores()

Inside `ladmim_hf` the same class serves `ladmim predict --backend onnx|openvino`.

Each graph scores one category with the mask set drawn at export time (the same masks PyTorch draws
for that seed) and the calibration the model had then; it returns the fused score and map and every
branch's raw score and map. The verdict is `pred_score > threshold`, as in PyTorch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

try:
    from ..models.imaging_ladmim import ImageDecodeError, prepare_image
except ImportError:  # copied beside the graphs and imported from that folder
    from imaging_ladmim import ImageDecodeError, prepare_image  # type: ignore[no-redef]

METADATA_NAME = "ladmim_export.json"
FORMAT_VERSION = 1
BACKENDS = ("onnx", "openvino")
GRAPH_SUFFIX = {"onnx": ".onnx", "openvino": ".xml"}


class ExportFolderError(ValueError):
    """An export folder is missing, incomplete or of another version; the message names the fix."""


@dataclass
class LadmimInferenceResult:
    """Scores of a batch from an exported graph (names as [`LadmimAnomalyOutput`]).

    Args:
        pred_score: fused score `(B,)`; pred_label: `pred_score > threshold` `(B,)`.
        anomaly_map: fused map `(B, S, S)`.
        scores: raw score of every branch `{branch: (B,)}`; maps: raw map of every branch that has one.
        threshold: the decision threshold used.
    """

    pred_score: np.ndarray
    pred_label: np.ndarray
    anomaly_map: np.ndarray
    scores: dict
    maps: dict
    threshold: float

    def branch_scores(self) -> dict:
        return self.scores

    def branch_maps(self) -> dict:
        return self.maps


class _OnnxRuntimeGraph:
    def __init__(self, path: Path, threads: int | None, output_names: list[str]):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]

    def __call__(self, pixel_values: np.ndarray) -> dict:
        return dict(zip(self.output_names, self.session.run(None, {self.input_name: pixel_values})))


class _OpenVinoGraph:
    def __init__(self, path: Path, threads: int | None, output_names: list[str]):
        import openvino as ov

        # f32: on CPUs with bf16 units OpenVINO would otherwise compute in bf16 (scores off by ~1e-2).
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = compiled.create_infer_request()
        # A compiled output may carry extra tensor names (fused nodes): find each by the name it was exported with.
        self.outputs = [(next(n for n in output.get_names() if n in output_names), output) for output in compiled.outputs]

    def __call__(self, pixel_values: np.ndarray) -> dict:
        results = self.request.infer({0: pixel_values})
        return {name: np.array(results[output], copy=True) for name, output in self.outputs}  # the request reuses its buffers


_RUNTIMES = {"onnx": _OnnxRuntimeGraph, "openvino": _OpenVinoGraph}
_RUNTIME_PACKAGES = {"onnx": "onnxruntime", "openvino": "openvino"}


def read_metadata(folder: str | os.PathLike) -> dict:
    """The export's `ladmim_export.json`, checked; raises `ExportFolderError` naming the problem."""
    path = Path(folder) / METADATA_NAME
    if not path.is_file():
        raise ExportFolderError(f"{folder} is not a LADMIM export (no {METADATA_NAME}); create one with "
                                "`ladmim export --model MODEL --out DIR`")
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ExportFolderError(f"{path} cannot be read as JSON ({error}); export the model again") from None
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ExportFolderError(f"{path} has format_version {metadata.get('format_version')!r}, this code reads "
                                f"{FORMAT_VERSION}; export the model again with this version")
    return metadata


class LadmimInferencer:
    """Scores images with the graphs of an export folder (`ladmim export`).

    Args:
        folder: the export folder.
        backend: `"onnx"` (ONNX Runtime) or `"openvino"`; default: the first the folder holds.
        threads: CPU threads for the runtime (default: the runtime's choice).
    """

    def __init__(self, folder: str | os.PathLike, backend: str | None = None, threads: int | None = None):
        self.folder = Path(folder)
        self.metadata = read_metadata(self.folder)
        available = list(self.metadata["backends"])
        backend = backend or available[0]
        if backend not in BACKENDS:
            raise ExportFolderError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend not in available:
            raise ExportFolderError(f"{self.folder} holds no {backend} graphs (it has {available}); export with "
                                    f"`ladmim export --format {backend}`")
        try:
            __import__(_RUNTIME_PACKAGES[backend])
        except ImportError:
            raise ExportFolderError(f"the {backend} backend needs the {_RUNTIME_PACKAGES[backend]} package: "
                                    "pip install 'ladmim-hf[export]'") from None
        self.backend = backend
        self.threads = threads
        self._graphs: dict[str, object] = {}

    @property
    def categories(self) -> list[str]:
        return list(self.metadata["categories"])

    @property
    def batch_size(self) -> int:
        """Images per graph call (fixed at export); other counts are split and padded."""
        return int(self.metadata["batch_size"])

    def resolve_category(self, category: str | None) -> str:
        if category is None:
            if len(self.categories) != 1:
                raise ValueError(f"pass category= (one of {self.categories})")
            return self.categories[0]
        if category not in self.metadata["categories"]:
            raise ValueError(f"unknown category {category!r}; this export holds {self.categories}")
        return category

    def threshold(self, category: str | None = None) -> float:
        """The calibrated threshold of a category, as the model had it at export."""
        return float(self.metadata["categories"][self.resolve_category(category)]["threshold"])

    def graph(self, category: str):
        """The compiled graph of a category (compiled on first use)."""
        if category not in self._graphs:
            path = self.folder / self.metadata["categories"][category][self.backend]
            if not path.is_file():
                raise ExportFolderError(f"{path} is missing; export the model again")
            self._graphs[category] = _RUNTIMES[self.backend](path, self.threads, self.metadata["output_names"])
        return self._graphs[category]

    def preprocess(self, images) -> np.ndarray:
        """Images (paths, PIL images or arrays) -> pixels `(n, 3, S, S)` float32, as `LadmimImageProcessor`."""
        settings = self.metadata["preprocessing"]
        items = images if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ImageDecodeError("no images given")
        return np.stack([prepare_image(item, settings["size"], settings["resample"], settings["image_mean"],
                                       settings["image_std"], settings["max_pixels"]) for item in items])

    def __call__(self, images=None, category: str | None = None, threshold: float | None = None,
                 pixel_values: np.ndarray | None = None) -> LadmimInferenceResult:
        """Score `images` (or preprocessed `pixel_values (n, 3, S, S)`) as `category`."""
        category = self.resolve_category(category)
        if pixel_values is None:
            pixel_values = self.preprocess(images)
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        size = self.metadata["preprocessing"]["size"]
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise ValueError(f"pixel_values must be (n, 3, {size}, {size}), got {pixel_values.shape}")
        graph, count, step = self.graph(category), len(pixel_values), self.batch_size
        parts = []
        for start in range(0, count, step):
            chunk = pixel_values[start:start + step]
            if len(chunk) < step:  # the graph takes exactly `step` images: repeat the last, drop its outputs
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), axis=0)])
            parts.append({name: value[:count - start] for name, value in graph(chunk).items()})
        outputs = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
        threshold = self.threshold(category) if threshold is None else float(threshold)
        branches = self.metadata["branches"]
        return LadmimInferenceResult(
            pred_score=outputs["pred_score"], pred_label=outputs["pred_score"] > threshold,
            anomaly_map=outputs["anomaly_map"],
            scores={b: outputs[f"{b}_score"] for b in branches},
            maps={b: outputs[f"{b}_map"] for b in branches if f"{b}_map" in outputs}, threshold=threshold,
        )


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One map `(S, S)` resized bilinearly to an image's `(height, width)`, for display."""
    image = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32)


__all__ = ["BACKENDS", "ExportFolderError", "LadmimInferenceResult", "LadmimInferencer", "METADATA_NAME",
           "read_metadata", "resize_map"]
