"""The `image-anomaly-detection` pipeline of LADMIM.

Shipped to the Hub next to the model (listed under `custom_pipelines` in `config.json`), so that

    >>> from transformers import pipeline
    >>> detector = pipeline("image-anomaly-detection", model="org/ladmim-loco", trust_remote_code=True)
    >>> detector("image.png", category="breakfast_box")
    {'score': 4.1, 'label': 'anomalous', 'logical_score': 1.3, 'structural_score': 0.6, 'anomaly_map': <PIL.Image mode=F>}

works without installing `ladmim_hf` (a model with the optional branches adds `memory_bank_score` and
`global_score`). Like the other shipped files it imports only torch, numpy, PIL,
transformers and its flat sibling `image_processing_ladmim` (relatively), never the rest of `ladmim_hf`.
Importing this module also registers the task in-process, so
`pipeline("image-anomaly-detection", model=<a loaded LadmimForAnomalyDetection>)` works too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .image_processing_ladmim import LadmimImageProcessor, load_image

TASK = "image-anomaly-detection"
_URL_PREFIXES = ("http://", "https://", "ftp://", "ftps://", "s3://", "gs://", "hf://", "data:")
_PARAMETERS = ("category", "num_masks", "threshold", "seed")
_BRANCHES = ("logical", "structural", "memory_bank", "global")  # the output's `{branch}_score` fields, in order


def _is_url(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower().startswith(_URL_PREFIXES)


class LadmimAnomalyDetectionPipeline(Pipeline):
    """Scores images with a [`LadmimForAnomalyDetection`] model.

    Inputs: a local image path, a PIL image, a numpy array, or a list of these. URLs are refused:
    download the file first (the pipeline never touches the network).

    Call arguments (also accepted by `pipeline(...)` as defaults):
        category (`str`): the category the images belong to; required when the model knows several.
        num_masks (`int`): test-time masks per image (default: the model's `num_masks`).
        threshold (`float`): decision threshold on the fused score (default: the category's
            calibrated threshold).
        seed (`int` or `None`, defaults to 0): seed of the masks. Every image gets the same seed, so
            an image's score does not depend on its position in a list; `None` draws fresh masks.

    Returns, per image, a dict:
        score (`float`): fused score: the branches in `config.fused_branches`, each standardised on
            normal validation images, combined by `config.fusion_rule` ("sum", "max" or "max_mean").
        label (`str`): `"anomalous"` if `score > threshold`, else `"good"`.
        logical_score (`float`): mean over the masks of the histogram discrepancy
            (`config.histogram_distance`).
        structural_score (`float`): HVQ-Trans reconstruction score.
        memory_bank_score (`float`, only with a memory bank): largest distance of a patch to its
            nearest normal training patch.
        global_score (`float`, only with the global branch): Mahalanobis distance of the image descriptor.
        anomaly_map (`PIL.Image.Image`): the fused anomaly map at the original image size, mode `"F"`
            (32-bit float values; `numpy.asarray(result["anomaly_map"])` gives the array).

    All branch scores are raw (not standardised).
    """

    # The image processor is loaded when the repository has one; otherwise a default one with the
    # model's input size is built (see __init__).
    _load_image_processor = None
    _load_tokenizer = False
    _load_feature_extractor = False
    _load_processor = False
    _load_video_processor = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.image_processor is None:
            self.image_processor = LadmimImageProcessor(size=self._config().tokenizer_config.image_size)

    # ----------------------------------------------------------------------------------- helpers

    def _config(self):
        config = getattr(self.model, "config", None)
        if config is None or getattr(config, "model_type", None) != "ladmim":
            raise ValueError(
                f"the {TASK} pipeline needs a LadmimForAnomalyDetection model (config.model_type 'ladmim'), "
                f"got {type(self.model).__name__} with model_type {getattr(config, 'model_type', None)!r}"
            )
        return config

    def _categories(self) -> list[str]:
        return list(self._config().tokenizer_config.categories)

    # ----------------------------------------------------------------------------------- Pipeline API

    def _sanitize_parameters(self, category=None, num_masks=None, threshold=None, seed="unset", **kwargs):
        if kwargs:
            raise TypeError(
                f"unknown argument(s) {sorted(kwargs)} for the {TASK} pipeline; it accepts {list(_PARAMETERS)}"
            )
        forward: dict[str, Any] = {}
        if category is not None:
            if not isinstance(category, str):
                raise TypeError(f"category must be a category name (str), got {type(category).__name__}")
            categories = self._categories()
            if category not in categories:
                raise ValueError(f"unknown category {category!r}; this model was trained on {categories}")
            forward["category"] = category
        if num_masks is not None:
            if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
                raise ValueError(f"num_masks must be a positive integer, got {num_masks!r}")
            forward["num_masks"] = num_masks
        if threshold is not None:
            threshold = float(threshold)
            if not np.isfinite(threshold):
                raise ValueError(f"threshold must be a finite number, got {threshold}")
            forward["threshold"] = threshold
        if seed != "unset":
            if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
                raise ValueError(f"seed must be an integer or None, got {seed!r}")
            forward["seed"] = None if seed is None else int(seed)
        return {}, forward, {}

    def __call__(self, images, **kwargs):
        """Score one image (path, PIL image, array) or a list of them; see the class docstring."""
        batch_size = kwargs.get("batch_size") or self._batch_size
        if batch_size not in (None, 1):
            raise ValueError(f"the {TASK} pipeline scores one image per forward pass: leave batch_size at 1 "
                             f"(got {batch_size}); lists are still accepted")
        if isinstance(images, (list, tuple)):
            if len(images) == 0:
                raise ValueError("no images given (empty list)")
            for item in images:
                self._refuse_url(item)
            images = list(images)
        else:
            self._refuse_url(images)
        return super().__call__(images, **kwargs)

    @staticmethod
    def _refuse_url(image) -> None:
        if _is_url(image):
            raise ValueError(
                f"URLs are not supported by the {TASK} pipeline (got {image!r}): download the image first and pass "
                "the local file path, a PIL image or a numpy array"
            )

    def preprocess(self, image) -> dict[str, Any]:
        self._refuse_url(image)
        max_pixels = getattr(self.image_processor, "max_pixels", None)
        rgb = load_image(image, max_pixels=max_pixels) if max_pixels else load_image(image)
        pixel_values = self.image_processor(rgb, return_tensors="pt")["pixel_values"]
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.as_tensor(np.asarray(pixel_values))
        return {"pixel_values": pixel_values, "original_size": (rgb.height, rgb.width)}

    def _forward(self, model_inputs: dict[str, Any], category=None, num_masks=None, threshold=None, seed=0) -> dict[str, Any]:
        if category is None:
            categories = self._categories()
            if len(categories) != 1:
                raise ValueError(f"this model covers several categories: pass category= (one of {categories})")
            category = categories[0]
        pixel_values = model_inputs["pixel_values"]
        dtype = getattr(self.model, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            pixel_values = pixel_values.to(dtype)
        out = self.model(
            pixel_values=pixel_values,
            category=category,
            num_masks=num_masks,
            seed=None if seed is None else int(seed),
            threshold=threshold,
        )
        outputs = {
            "pred_score": out.pred_score,
            "pred_label": out.pred_label,
            "anomaly_map": out.anomaly_map,
            "original_size": model_inputs["original_size"],
        }
        for branch in _BRANCHES:  # getattr: the model's remote code may predate the optional branches
            value = getattr(out, f"{branch}_score", None)
            if value is not None:
                outputs[f"{branch}_score"] = value
        return outputs

    def postprocess(self, model_outputs: dict[str, Any]) -> dict[str, Any]:
        height, width = (int(v) for v in model_outputs["original_size"])
        anomaly_map = model_outputs["anomaly_map"].float()
        if anomaly_map.dim() == 2:
            anomaly_map = anomaly_map[None]
        resized = F.interpolate(anomaly_map[:1, None], size=(height, width), mode="bilinear", align_corners=False)
        array = np.ascontiguousarray(resized[0, 0].cpu().numpy().astype(np.float32))
        result = {
            "score": float(model_outputs["pred_score"].reshape(-1)[0]),
            "label": "anomalous" if bool(model_outputs["pred_label"].reshape(-1)[0]) else "good",
        }
        for branch in _BRANCHES:
            if f"{branch}_score" in model_outputs:
                result[f"{branch}_score"] = float(model_outputs[f"{branch}_score"].reshape(-1)[0])
        result["anomaly_map"] = Image.fromarray(array)
        return result


def _register() -> None:
    """Register the task in-process (once: the Hub copy of this file and `ladmim_hf.models.pipeline_ladmim`
    may both be imported in one process)."""
    impl = {"impl": LadmimAnomalyDetectionPipeline, "pt": (AutoModel,), "type": "image"}
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=LadmimAnomalyDetectionPipeline, pt_model=AutoModel,
                                            type="image")
    # Lets `pipe.save_pretrained(...)` write `custom_pipelines` for this class whichever copy is registered.
    LadmimAnomalyDetectionPipeline._registered_impl = {TASK: impl}


_register()

__all__ = ["LadmimAnomalyDetectionPipeline", "TASK"]
