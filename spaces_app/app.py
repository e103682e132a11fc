"""LADMIM logical anomaly detection: Gradio demo (the root file of a Hugging Face Space).

The model is loaded with ``AutoModel.from_pretrained(LADMIM_MODEL, trust_remote_code=True)``; the
``ladmim_hf`` package is *not* needed (a Space does not install it). ``LADMIM_MODEL`` is a Hub id or
a local folder; default: ``./model`` next to this file when present (a Space that bundles its
model), else ``outputs/synthloco/model`` of the repository (what ``make demo`` trains).
``LADMIM_MODEL_REVISION`` pins a Hub revision.

Run ``python spaces_app/app.py``; host and port come from Gradio's own ``GRADIO_SERVER_NAME`` and
``GRADIO_SERVER_PORT``. Tests import :func:`build_demo` and call the ``/predict`` endpoint with
inputs ``(image, category, num_masks, threshold, seed)``; its outputs are verdict, details, the logical and
structural heat maps (and the memory-bank one for a model with a memory bank), 3 mask views, 3 charts and the
JSON scores.
"""

from __future__ import annotations

import os

# Offline by default: no analytics or telemetry calls (must be set before gradio is imported).
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # `drawing` sits next to this file (Space root)
    sys.path.insert(0, str(HERE))

from drawing import heatmap_overlay, histogram_chart, mask_outline  # noqa: E402

logger = logging.getLogger("ladmim_space")

EXAMPLES_DIR = HERE / "examples"
EXAMPLE_TYPES = ("good", "logical", "structural")
REPO_DEFAULT_MODEL = HERE.parent / "outputs" / "synthloco" / "model"
# Per-request limits (documented in README.md), so that one request cannot take minutes or gigabytes.
# 40 MP covers camera images; a 40 MP upload costs about 0.5 GB and 0.5 s to read (16-bit ones ~1 GB, 5 s).
MAX_IMAGE_PIXELS = 40_000_000
# The model squashes every image to a square, so a long strip is unrecognisable anyway; and PNG decoding
# costs per row: a 1 x 99,000,000 PNG of 384 KB took over 3 GB and 8 s. Both checked before decoding.
MAX_ASPECT_RATIO = 20
MAX_SEED = 2**32 - 1  # exact as a float (Gradio's Number) and as a JSON/JavaScript number
WORK_MAX_SIDE = 1024  # uploads are downsized to this before scoring (the model sees ~224 px anyway)
DISPLAY_MAX_SIDE = 512  # overlays and mask views
TOP_MASKS = 3
MAX_MASKS = 50  # scoring time and memory grow linearly with the number of masks
Z_RED = 4.0  # heat-map colour scale: z = 0 (typical of normal images) is blue, z >= Z_RED is red
# Every branch a detector may compute (its output's `{branch}_score` fields), in output order, with its title.
BRANCH_TITLES = {"logical": "Logical branch", "structural": "Structural branch", "memory_bank": "Memory bank",
                 "global": "Global branch"}

CSS = """
.verdict {padding: 14px 18px; border-radius: 10px; border: 1px solid var(--border-color-primary);}
.verdict h2 {margin: 0 0 4px 0 !important;}
.verdict p {margin: 0 !important;}
.badge {display: inline-block; padding: 1px 10px; border-radius: 6px; color: white; font-size: 0.8em;
        letter-spacing: 0.04em; vertical-align: 2px; margin-right: 6px;}
.badge-bad {background: #d62728;}
.badge-good {background: #2ca02c;}
.badge-warn {background: #b8860b;}
#title h1 {margin-bottom: 2px;}
.small-note p, .small-note li {font-size: var(--text-sm); color: var(--body-text-color-subdued);}
"""


class InputError(ValueError):
    """A request the app cannot score; the message is shown to the user as is."""


# --------------------------------------------------------------------------------------------------
# Model loading
# --------------------------------------------------------------------------------------------------


def resolve_model_source(model_path: str | os.PathLike | None = None) -> str:
    """Model folder or Hub id: argument > ``LADMIM_MODEL`` > ``./model`` in the Space > repo default."""
    source = model_path if model_path is not None else os.environ.get("LADMIM_MODEL") or None
    if source is None:
        source = HERE / "model" if (HERE / "model" / "config.json").is_file() else REPO_DEFAULT_MODEL
    text = os.fspath(source)
    if Path(text).expanduser().exists():
        return str(Path(text).expanduser())
    looks_like_path = os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") != 1
    if looks_like_path:
        raise FileNotFoundError(
            f"no LADMIM model at {text!r}. Train the demo model with `make demo` (it writes "
            f"{REPO_DEFAULT_MODEL.relative_to(HERE.parent)}), or set LADMIM_MODEL to a model folder or Hub id."
        )
    return text  # a Hub repo id such as "org/ladmim-loco"


def load_model(source: str):
    """Model and image processor through the Auto classes (remote code: no ``ladmim_hf`` needed)."""
    from transformers import AutoImageProcessor, AutoModel

    revision = os.environ.get("LADMIM_MODEL_REVISION") or None
    started = time.perf_counter()
    model = AutoModel.from_pretrained(source, trust_remote_code=True, revision=revision).eval()
    processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=True, revision=revision)
    logger.info("loaded %s (%s) in %.1f s", source, type(model).__name__, time.perf_counter() - started)
    return model, processor


def model_categories(model) -> list[str]:
    config = model.config
    tokenizer_config = getattr(config, "tokenizer_config", None)
    categories = getattr(tokenizer_config, "categories", None) or getattr(config, "categories", None)
    if not categories:
        raise ValueError("the model config lists no categories (config.tokenizer_config.categories)")
    return list(categories)


# --------------------------------------------------------------------------------------------------
# Reading uploads (own version of ladmim_hf.load_image: the package is not installed in a Space)
# --------------------------------------------------------------------------------------------------


def _upload_path_and_name(value: Any) -> tuple[str | None, str]:
    """The event runs with ``preprocess=False`` (so Gradio never tries to decode the file itself and
    cannot fail before we can explain); the image arrives as Gradio's FileData dict, already moved
    into Gradio's upload cache and checked by Gradio. Plain paths are accepted for direct calls."""
    if value is None or value == "":
        return None, ""
    if isinstance(value, dict):
        path = value.get("path")
        name = value.get("orig_name") or (Path(path).name if path else "")
        return path, name
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value), Path(value).name
    raise InputError(f"unsupported image input of type {type(value).__name__}")


# Copied from ladmim_hf.models.imaging_ladmim.to_rgb (a Space does not install ladmim_hf); kept in sync by
# tests/test_space_app.py::test_unusual_image_modes_are_handled.
def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit/32-bit/float images rescaled by their own range (no white
    saturation), transparency composited on black (as the model's image processor does)."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not reject an otherwise readable image
        pass
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if array.ndim == 3:
            array = array[..., 0]
        low, high = float(np.min(array)), float(np.max(array))
        scale = 255.0 / (high - low) if high > low else 0.0
        return Image.fromarray(((array - low) * scale).round().clip(0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "P":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


def read_upload(value: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an upload to an RGB image at most ``WORK_MAX_SIDE`` px, or raise :class:`InputError`
    with a message meant for the user."""
    if isinstance(value, Image.Image):
        path, name = None, "image"
    else:
        path, name = _upload_path_and_name(value)
        if path is None:
            raise InputError("Please upload an image (or click one of the examples) first.")
        name = name or "the file"
        if not os.path.isfile(path):
            raise InputError(f"The upload of {name} did not arrive; please upload it again.")
        if os.path.getsize(path) == 0:
            raise InputError(f"{name} is empty (0 bytes); please upload an image file.")
    try:
        image = value if path is None else Image.open(path)  # lazy: reads the header, not the pixels
        width, height = image.size
        if width < 1 or height < 1:
            raise InputError(f"{name} has no pixels ({width}x{height}).")
        if max_pixels and width * height > max_pixels:
            raise InputError(
                f"{name} is {width}x{height} = {width * height / 1e6:.0f} megapixels, more than the "
                f"{max_pixels / 1e6:.0f} megapixels this demo accepts (guard against decompression bombs). "
                "Please upload a smaller image."
            )
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise InputError(
                f"{name} is {width}x{height}: its long side is more than {MAX_ASPECT_RATIO} times its short side, "
                "the most this demo accepts (the model squashes every image to a square). Please crop it."
            )
        if hasattr(image, "draft"):
            image.draft("RGB", (WORK_MAX_SIDE, WORK_MAX_SIDE))  # JPEG: decode at reduced size, cheaply
        image.load()
        rgb = _to_rgb(image)
    except InputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as error:
        if isinstance(error, Image.DecompressionBombError):
            raise InputError(
                f"{name} is too large to decode safely (over {max_pixels / 1e6:.0f} megapixels, a guard against "
                "decompression bombs). Please upload a smaller image."
            ) from error
        raise InputError(
            f"{name} is not an image this demo can read. Please upload a PNG, JPEG, BMP, TIFF or WebP image."
        ) from error
    except Exception as error:  # PIL raises many types for corrupt or truncated files
        raise InputError(f"{name} could not be decoded ({type(error).__name__}: {error}); the file may be "
                         "damaged or truncated.") from error
    if max(rgb.size) > WORK_MAX_SIDE:
        rgb = rgb.copy()
        rgb.thumbnail((WORK_MAX_SIDE, WORK_MAX_SIDE), Image.BILINEAR)
    return rgb


# --------------------------------------------------------------------------------------------------
# Parsing controls
# --------------------------------------------------------------------------------------------------


def _parse_number(value: Any, what: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}.") from None
    if math.isnan(number):
        return None
    if not math.isfinite(number):
        raise InputError(f"{what} must be a finite number, got {value!r}.")
    return number


def parse_controls(categories: list[str], category: Any, num_masks: Any, threshold: Any, seed: Any,
                   default_masks: int) -> tuple[str, int, float | None, int]:
    if not category:
        category = categories[0] if len(categories) == 1 else None
    if category not in categories:
        raise InputError(f"Please choose a category: one of {', '.join(categories)} (got {category!r}).")
    masks = _parse_number(num_masks, "Number of masks")
    masks = default_masks if masks is None else int(round(masks))
    if not 1 <= masks <= MAX_MASKS:
        raise InputError(f"Number of masks must be between 1 and {MAX_MASKS}, got {masks}.")
    seed_value = _parse_number(seed, "Seed")
    if seed_value is not None and not (0 <= seed_value <= MAX_SEED and seed_value == int(seed_value)):
        raise InputError(f"Seed must be a whole number between 0 and {MAX_SEED}, got {seed!r}.")
    return category, masks, _parse_number(threshold, "Threshold"), 0 if seed_value is None else int(seed_value)


# --------------------------------------------------------------------------------------------------
# Scoring and explanation
# --------------------------------------------------------------------------------------------------


@dataclass
class Scored:
    category: str
    calibrated: bool
    num_masks: int
    seed: int
    threshold: float
    threshold_source: str
    pred_score: float
    is_anomalous: bool
    logical_score: float
    structural_score: float
    z_logical: float | None  # None: the calibration has no statistics for the branch
    z_structural: float | None
    stats: dict
    logical_map: np.ndarray
    structural_map: np.ndarray
    mask_scores: np.ndarray
    masks: np.ndarray
    predicted: np.ndarray
    target: np.ndarray
    grid_size: int
    distance_name: str = "L1"  # what mask_scores measure: "L1" or the codebook "kernel distance"
    # Every computed branch, in output order: raw score and z (None: no calibration statistics for it).
    branch_scores: dict = field(default_factory=dict)
    branch_z: dict = field(default_factory=dict)
    fused_branches: list = field(default_factory=lambda: ["logical", "structural"])
    fusion_rule: str = "sum"
    memory_bank_map: np.ndarray | None = None
    # The pose the logical branch scored best at (`logical_pose_step`): the image moved (right, down) by
    # this many pixels of the model's input, whose side is `image_size`; (0, 0) is the image as it is.
    pose_move: tuple = (0, 0)
    image_size: int = 224
    # With retrieval (`logical_retrieval_neighbours`): the z-scores of the two scores the logical one is the
    # larger of, `{"logical_predictor": z, "logical_retrieval": z}` (None: no statistics); empty without it.
    logical_components_z: dict = field(default_factory=dict)


def best_pose_move(out, config) -> tuple[int, int]:
    """`(dx, dy)` input pixels of the pose the logical branch kept for the first image, from
    `out.logical_pose_scores` (the image as it is first, then `config.logical_pose_moves`)."""
    pose_scores = getattr(out, "logical_pose_scores", None)
    if pose_scores is None:
        return (0, 0)
    moves = [(0, 0)] + [tuple(move) for move in config.logical_pose_moves]
    return moves[int(pose_scores[0].argmin())]


def _z(raw: float, stats: dict, branch: str) -> float | None:
    """A branch's z-score as the model computes it, or None when the calibration lacks the branch."""
    if f"{branch}_mean" not in stats or f"{branch}_std" not in stats:
        return None
    return (raw - stats[f"{branch}_mean"]) / max(stats[f"{branch}_std"], 1e-12)


def fusion_text(result: Scored) -> str:
    """How the fused score is made, e.g. "sum of z logical, z structural" or "max of z logical, z global"."""
    names = [f"z {BRANCH_TITLES[b].lower().removesuffix(' branch')}" for b in result.fused_branches]
    rule = {"max_mean": "max + mean"}.get(result.fusion_rule, result.fusion_rule)
    return names[0] if len(names) == 1 else f"{rule} of {', '.join(names)}"


def score(model, processor, image: Image.Image, category: str, num_masks: int, threshold: float | None,
          seed: int) -> Scored:
    """One image through the model, with tensors of its own (the model is shared, read-only, eval)."""
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = model(pixel_values=pixel_values, category=category, num_masks=num_masks, seed=seed,
                    threshold=threshold, return_histograms=True)
    config = model.config
    calibration = getattr(config, "calibration", None) or {}
    stats = {key: float(value) for key, value in model.calibration_for(category).items()}
    # getattr: a model whose remote code predates the optional branches has no such fields
    raw = {b: float(getattr(out, f"{b}_score")[0]) for b in BRANCH_TITLES
           if getattr(out, f"{b}_score", None) is not None}
    z = {b: _z(value, stats, b) for b, value in raw.items()}
    memory_bank_map = getattr(out, "memory_bank_map", None)
    used_threshold = float(threshold) if threshold is not None else float(stats["threshold"])
    return Scored(
        category=category, calibrated=category in calibration, num_masks=num_masks, seed=seed,
        threshold=used_threshold, threshold_source="your override" if threshold is not None else "calibrated",
        pred_score=float(out.pred_score[0]), is_anomalous=bool(out.pred_label[0]),
        logical_score=raw["logical"], structural_score=raw["structural"], z_logical=z["logical"],
        z_structural=z["structural"], stats=stats, logical_map=out.logical_map[0].float().cpu().numpy(),
        structural_map=out.structural_map[0].float().cpu().numpy(),
        mask_scores=out.mask_scores[0].float().cpu().numpy(), masks=out.masks[0].cpu().numpy().astype(bool),
        predicted=out.predicted_histograms[0].float().cpu().numpy(),
        target=out.target_histograms[0].float().cpu().numpy(),
        grid_size=int(model.config.tokenizer_config.grid_size),
        distance_name="L1" if getattr(config, "histogram_distance", "l1") == "l1" else "kernel distance",
        branch_scores=raw, branch_z=z,
        fused_branches=list(getattr(config, "fused_branches", None) or ["logical", "structural"]),
        fusion_rule=getattr(config, "fusion_rule", "sum"),
        memory_bank_map=None if memory_bank_map is None else memory_bank_map[0].float().cpu().numpy(),
        pose_move=best_pose_move(out, config), image_size=int(config.tokenizer_config.image_size),
        logical_components_z={name: _z(float(value[0]), stats, name) for name, value in
                               (out.logical_components() if hasattr(out, "logical_components") else {}).items()},
    )


def _level(z: float) -> str:
    if z >= 2.5:
        return "clearly"
    if z >= 1.0:
        return "somewhat"
    return ""


# Per branch: what a normal z says, and what a high z says ({level}: "somewhat" or "clearly").
EXPLANATIONS = {
    "logical": ("the arrangement looks like normal images: with parts of the image hidden, the model predicted what "
                "belongs there about as well as it does for normal images.",
                "the arrangement, counts or combination of parts {level} differ from normal images: what is in the "
                "hidden regions does not match what the rest of the image implies."),
    "structural": ("the local appearance looks like normal images (no unusual texture, colour or damage).",
                   "the local appearance {level} differs from normal images (e.g. a scratch, stain, cut or wrong "
                   "colour) in the red regions of its heat map."),
    "memory_bank": ("every local patch resembles some patch of the normal training images.",
                    "some local patches are {level} unlike any patch of the normal training images (the red regions "
                    "of its heat map)."),
    "global": ("the image's overall feature statistics look like those of normal images.",
               "the image's overall feature statistics are {level} unusual (e.g. too many or too few parts, or a "
               "wrong mix of them, even where each part looks fine)."),
}


def explain(branch: str, raw: float, z: float | None) -> str:
    if z is None:
        return (f"**{BRANCH_TITLES[branch]}** (raw score {raw:.4f}): this category's calibration has no statistics "
                "for this branch, so it cannot be compared with normal images.")
    normal, unusual = EXPLANATIONS[branch]
    level = _level(z)
    return f"**{BRANCH_TITLES[branch]}** (z = {z:+.1f}): " + (unusual.format(level=level) if level else normal)


def verdict_markdown(result: Scored) -> str:
    # A coloured badge instead of an emoji: headless browsers and some systems lack emoji fonts.
    if result.is_anomalous:
        badge, relation = '<span class="badge badge-bad">ANOMALOUS</span>', "above"
    else:
        badge, relation = '<span class="badge badge-good">NORMAL</span>', "not above"
    return (f"## {badge} {result.category}\n\nFused score **{result.pred_score:.2f}** is {relation} the "
            f"threshold **{result.threshold:.2f}** ({result.threshold_source}).")


def details_markdown(result: Scored) -> str:
    s = result.stats
    lines = ["| | raw score | normal images (mean ± std) | z-score |", "|---|---:|---:|---:|"]
    for branch, raw in result.branch_scores.items():
        title = BRANCH_TITLES[branch] + ("" if branch in result.fused_branches else " (not fused)")
        z = result.branch_z[branch]
        normal = "no statistics" if z is None else f"{s[branch + '_mean']:.4f} ± {s[branch + '_std']:.4f}"
        lines.append(f"| {title} | {raw:.4f} | {normal} | {'n/a' if z is None else f'{z:+.2f}'} |")
    lines += [f"| **Fused** ({fusion_text(result)}) | | | **{result.pred_score:+.2f}** |", ""]
    lines += [f"- {explain(b, raw, result.branch_z[b])}" for b, raw in result.branch_scores.items()]
    if not result.calibrated:
        lines.append(f"- **Note:** the model has no calibration for *{result.category}*: scores are raw, not "
                     "standardised, the threshold is the model's default, and each heat map is coloured by its own range.")
    components = result.logical_components_z
    if components and None not in components.values():
        lines.append(f"- The logical score is the larger of the trained predictor's z ({components['logical_predictor']:+.2f}) "
                     f"and the retrieval's z ({components['logical_retrieval']:+.2f}), which compares the hidden regions "
                     "with the training images whose visible parts look most alike.")
    if result.pose_move != (0, 0):
        lines.append(f"- The logical branch fitted best with the image moved {pose_text(result.pose_move)}; its heat map "
                     "and the mask outlines are moved back onto the image.")
    lines.append(f"\n<sub>{result.num_masks} masks, seed {result.seed}. A z-score counts standard deviations "
                 "above the average normal image.</sub>")
    return "\n".join(lines)


def pose_text(move: tuple[int, int]) -> str:
    """`(6, 0)` -> "6 px right", `(0, -6)` -> "6 px up" (pixels of the model's input)."""
    dx, dy = move
    parts = [f"{abs(dx)} px {'right' if dx > 0 else 'left'}"] if dx else []
    parts += [f"{abs(dy)} px {'down' if dy > 0 else 'up'}"] if dy else []
    return " and ".join(parts)


def _display(image: Image.Image) -> Image.Image:
    view = image.copy()
    view.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.BILINEAR)
    return view


def render(result: Scored, image: Image.Image):
    """Heat maps, top masks and charts for the UI."""
    view = _display(image)
    s = result.stats
    logical_range = structural_range = memory_bank_range = (None, None)
    if result.calibrated:
        # Colour scale in calibrated units: blue = typical of normal images, red = Z_RED std above.
        # The structural and memory-bank maps are in the units of their image scores (the memory
        # bank's score is its map's largest cell). A logical-map cell is the mean score of the masks
        # that hid it, so its spread is about one mask's, i.e. the image-level std (a mean over
        # num_masks masks) times sqrt(num_masks).
        # With retrieval the logical score is a z-score, while the map stays the predictor's: its statistics.
        source = "logical_predictor" if "logical_predictor_mean" in s else "logical"
        mask_std = s[f"{source}_std"] * math.sqrt(max(result.num_masks, 1))
        logical_range = (s[f"{source}_mean"], s[f"{source}_mean"] + Z_RED * mask_std)
        structural_range = (s["structural_mean"], s["structural_mean"] + Z_RED * s["structural_std"])
        if result.branch_z.get("memory_bank") is not None:
            memory_bank_range = (s["memory_bank_mean"], s["memory_bank_mean"] + Z_RED * s["memory_bank_std"])
    logical = heatmap_overlay(view, result.logical_map, alpha=0.5, vmin=logical_range[0], vmax=logical_range[1])
    structural = heatmap_overlay(view, result.structural_map, alpha=0.5, vmin=structural_range[0],
                                 vmax=structural_range[1])
    memory_bank = None
    if result.memory_bank_map is not None:
        memory_bank = heatmap_overlay(view, result.memory_bank_map, alpha=0.5, vmin=memory_bank_range[0],
                                      vmax=memory_bank_range[1])
    order = np.argsort(-result.mask_scores, kind="stable")[:TOP_MASKS]
    dx, dy = result.pose_move  # the masks hid cells of the moved image: move them back by (-dx, -dy)
    offset = (round(-dx * view.width / result.image_size), round(-dy * view.height / result.image_size))
    outlines, charts, top = [], [], []
    for rank, index in enumerate(order, start=1):
        mask_score = float(result.mask_scores[index])
        outlines.append(mask_outline(view, result.masks[index], result.grid_size, offset=offset))
        charts.append(histogram_chart(
            result.predicted[index], result.target[index],
            title=f"#{rank}: mask {index + 1} of {result.num_masks}, {result.distance_name} = {mask_score:.2f} "
                  f"(mean of all masks {float(result.mask_scores.mean()):.2f})",
        ))
        top.append({"rank": rank, "mask": int(index), "score": mask_score})
    while len(outlines) < TOP_MASKS:
        outlines.append(None)
        charts.append(None)
    return logical, structural, memory_bank, outlines, charts, top


def summary(result: Scored, top: list[dict]) -> dict:
    """The JSON output: raw score and z (None without calibration statistics) of every computed branch."""
    data = {
        "status": "ok", "verdict": "anomalous" if result.is_anomalous else "normal", "category": result.category,
        "pred_score": result.pred_score, "threshold": result.threshold, "threshold_source": result.threshold_source,
    }
    for branch, raw in result.branch_scores.items():
        data[f"{branch}_score"] = raw
    for branch, z in result.branch_z.items():
        data[f"z_{branch}"] = z
    data.update(fused_branches=result.fused_branches, fusion_rule=result.fusion_rule, calibrated=result.calibrated,
                num_masks=result.num_masks, seed=result.seed, top_masks=top, logical_pose_move=list(result.pose_move))
    return data


# --------------------------------------------------------------------------------------------------
# UI
# --------------------------------------------------------------------------------------------------


def example_rows(categories: list[str]) -> list[list[str]]:
    """Bundled examples of the model's categories; the file name sets the category when clicked."""
    rows = []
    for category in categories:
        for kind in EXAMPLE_TYPES:
            path = EXAMPLES_DIR / f"{category}_{kind}.png"
            if path.is_file():
                rows.append([str(path)])
    return rows


INTRO = """
<div id="title">

# LADMIM · logical anomaly detection

</div>

Upload an image of one of the product categories (or click an example below), pick its category and
press **Detect anomalies**. [LADMIM](https://arxiv.org/abs/2410.10234) checks an image in {ways} ways:
the **logical** branch hides random blocks of the image and predicts which visual "words" (codes of a
learned tokenizer) should be there; missing, extra or mismatched parts make that prediction fail. The
**structural** branch reconstructs the image features and flags local defects such as scratches or stains.
"""

BRANCH_INTRO = {
    "memory_bank": "The **memory bank** compares every local patch with the patches of normal training images.",
    "global": "The **global** branch checks the image's overall feature statistics.",
}
# The global branch's sentence for each `config.global_descriptor` other than the moments above.
GLOBAL_INTRO = {"part_histogram": "The **global** branch counts how much of the image looks like each kind of part "
                                  "in normal images, so too many, too few or the wrong mix of parts stand out."}
RULE_WORDS = {"sum": "sum", "max": "largest", "max_mean": "largest plus the mean"}  # config.fusion_rule in words


def intro(branches: list[str], fused: list[str], rule: str, global_descriptor: str = "moments") -> str:
    """INTRO, plus the optional branches the model has and how its verdict combines them."""
    sentences = {**BRANCH_INTRO, "global": GLOBAL_INTRO.get(global_descriptor, BRANCH_INTRO["global"])}
    extra = [sentences[b] for b in branches if b in sentences]
    text = INTRO.format(ways={2: "two", 3: "three", 4: "four"}.get(len(branches), len(branches)))
    if not extra:
        return text
    names = [BRANCH_TITLES[b].lower().removesuffix(" branch") for b in fused]
    listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    how = (f"the {RULE_WORDS.get(rule, rule)} of the standardised {listed} scores" if len(names) > 1
           else f"the {listed} score")
    return text.rstrip() + " " + " ".join(extra) + f" The verdict uses {how}.\n"


HEATMAP_NOTE = (f"Heat maps: blue = typical of normal images, red = {Z_RED:.0f} standard deviations or more above "
                "(colours use the calibration of the chosen category).")


def build_demo(model_path: str | os.PathLike | None = None) -> gr.Blocks:
    """The Gradio app for the model at ``model_path`` (default: see :func:`resolve_model_source`)."""
    source = resolve_model_source(model_path)
    model, processor = load_model(source)
    categories = model_categories(model)
    config = model.config
    branches = list(getattr(config, "enabled_branches", None) or ["logical", "structural"])
    # The memory-bank heat map exists only for models with a memory bank, so the outputs of other models
    # (and their /predict API) stay as they were.
    has_memory_bank = "memory_bank" in branches
    default_masks = int(min(max(int(getattr(model.config, "num_masks", 10) or 10), 1), MAX_MASKS))
    # A processor may set a stricter limit than the app's (it only ever sees the downsized image).
    max_pixels = min(MAX_IMAGE_PIXELS, int(getattr(processor, "max_pixels", 0) or MAX_IMAGE_PIXELS))
    blank = [None] * (2 + has_memory_bank + 2 * TOP_MASKS)

    def failure(message: str):
        gr.Warning(message)
        return (f'## <span class="badge badge-warn">CANNOT SCORE</span> this input\n\n{message}', "", *blank,
                {"status": "error", "message": message})

    def predict(image, category, num_masks, threshold, seed, progress=gr.Progress()):
        try:
            progress(0.05, desc="Reading the image")
            category, num_masks, threshold, seed = parse_controls(
                categories, category, num_masks, threshold, seed, default_masks)
            picture = read_upload(image, max_pixels=max_pixels)
            progress(0.2, desc=f"Scoring with {num_masks} masks")
            result = score(model, processor, picture, category, num_masks, threshold, seed)
            progress(0.8, desc="Drawing heat maps and charts")
            logical, structural, memory_bank, outlines, charts, top = render(result, picture)
        except InputError as error:
            return failure(str(error))
        except Exception as error:  # never show a stack trace; keep serving the next request
            logger.exception("scoring failed")
            return failure(f"Scoring failed ({type(error).__name__}: {error}). Please try another image.")
        maps = (logical, structural, memory_bank) if has_memory_bank else (logical, structural)
        return (verdict_markdown(result), details_markdown(result), *maps, *outlines, *charts, summary(result, top))

    def category_from_name(value):
        """Pick the category from a file name such as ``pushpins_good.png`` (the examples, or a user's
        LOCO-style file); leave the dropdown alone otherwise."""
        _, name = _upload_path_and_name(value) if isinstance(value, (dict, str)) else (None, "")
        stem = Path(name).stem.lower()
        matches = [c for c in categories if stem == c or stem.startswith(c + "_")]
        return gr.update(value=max(matches, key=len)) if matches else gr.update()

    with gr.Blocks(title="LADMIM logical anomaly detection", analytics_enabled=False) as demo:
        gr.Markdown(intro(branches, list(getattr(config, "fused_branches", None) or branches[:2]),
                          getattr(config, "fusion_rule", "sum"), getattr(config, "global_descriptor", "moments")))
        with gr.Row(equal_height=False):
            with gr.Column(scale=4, min_width=320):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], height=280,
                                 elem_id="input-image")
                category = gr.Dropdown(choices=categories, value=categories[0], label="Category",
                                       info="The product category the image shows", elem_id="category")
                button = gr.Button("Detect anomalies", variant="primary", elem_id="detect")
                with gr.Accordion("Settings", open=True):
                    num_masks = gr.Slider(1, MAX_MASKS, value=default_masks, step=1, label="Number of masks",
                                          info="More masks: a steadier logical score, but slower")
                    with gr.Row():
                        # A Textbox, not a Number: Gradio's Number field sends 0 when left empty.
                        threshold = gr.Textbox(value="", label="Threshold override", min_width=120, max_lines=1,
                                               placeholder="calibrated", info="A number; empty: calibrated",
                                               elem_id="threshold")
                        seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed",
                                         min_width=120, info="Same seed, same masks")
                rows = example_rows(categories)
                if rows:
                    gr.Examples(examples=rows, inputs=[image], examples_per_page=15,
                                label="Examples: good, logical anomaly, structural anomaly of each category",
                                cache_examples=False, elem_id="examples")
            with gr.Column(scale=7, min_width=420):
                verdict = gr.Markdown("## Result\n\nUpload an image or click an example, then press "
                                      "**Detect anomalies**.", elem_id="verdict", elem_classes=["verdict"])
                details = gr.Markdown(elem_id="details")
                with gr.Row():
                    logical_map = gr.Image(label="Logical heat map", type="pil", format="png", interactive=False,
                                           elem_id="logical-heatmap", height=300, buttons=["fullscreen"])
                    structural_map = gr.Image(label="Structural heat map", type="pil", format="png",
                                              interactive=False, elem_id="structural-heatmap", height=300,
                                              buttons=["fullscreen"])
                    heat_maps = [logical_map, structural_map]
                    if has_memory_bank:
                        heat_maps.append(gr.Image(label="Memory-bank heat map", type="pil", format="png",
                                                  interactive=False, elem_id="memory-bank-heatmap", height=300,
                                                  buttons=["fullscreen"]))
                gr.Markdown(HEATMAP_NOTE, elem_classes=["small-note"])
        gr.Markdown("### Where the logical branch was most surprised\nThe three masks with the largest "
                    "disagreement: the hidden region (outlined; the rest is dimmed) and, per tokenizer level, "
                    "the share of each code the model predicted for that region vs. the codes actually there.")
        outlines, charts = [], []
        with gr.Row(equal_height=False):
            for rank in range(1, TOP_MASKS + 1):
                with gr.Column(min_width=260):
                    outlines.append(gr.Image(label=f"Mask #{rank}: hidden region", type="pil", format="png",
                                             interactive=False, height=240, elem_id=f"mask-{rank}",
                                             buttons=["fullscreen"]))
                    charts.append(gr.Image(label=f"Mask #{rank}: predicted vs. actual codes", type="pil",
                                           format="png", interactive=False, elem_id=f"chart-{rank}",
                                           show_label=False, buttons=["fullscreen"]))
        with gr.Accordion("Raw scores (JSON)", open=False):
            raw = gr.JSON(label="scores", elem_id="raw-scores")
        gr.Markdown(f"<sub>Model: `{source}` · categories: {', '.join(categories)}</sub>",
                    elem_classes=["small-note"])
        image.change(category_from_name, inputs=image, outputs=category, preprocess=False, queue=False,
                     show_progress="hidden", api_visibility="private")
        # preprocess=False: the raw upload reaches `predict`, which explains unreadable files itself
        # (Gradio's Image preprocessing would fail on them with a generic error before `predict` runs).
        button.click(predict, inputs=[image, category, num_masks, threshold, seed],
                     outputs=[verdict, details, *heat_maps, *outlines, *charts, raw],
                     api_name="predict", preprocess=False)
    demo.queue(default_concurrency_limit=2)
    demo.ladmim_model, demo.ladmim_source = model, source  # for tests and debugging
    return demo


def launch_kwargs() -> dict:
    """``launch`` settings shared by ``main`` and the tests (Gradio 6: theme and css go here)."""
    # System font stacks: nothing to download, and Gradio's bundled Source Sans Pro subset renders
    # some bold capitals (the "A" of LADMIM) from a fallback font in Chromium.
    theme = gr.themes.Default(primary_hue="orange", font=["ui-sans-serif", "system-ui", "Segoe UI", "Roboto",
                                                          "Helvetica Neue", "Arial", "sans-serif"],
                              font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])
    return dict(ssr_mode=False, theme=theme, css=CSS, max_file_size="50mb", allowed_paths=[str(EXAMPLES_DIR)])


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        demo = build_demo()
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    demo.launch(**launch_kwargs())  # GRADIO_SERVER_NAME / GRADIO_SERVER_PORT pick host and port
    return 0


if __name__ == "__main__":
    sys.exit(main())
