"""Writing the benchmark: one process-pool task per image, then ``defects_config.json``,
``scenes.json`` and the marker file per category.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from .defects import CATEGORIES, check_category, defects_config, pixel_value
from .scene import SPLIT_FOLDERS, make_scene, render_scene
from .textures import load_textures

DEFAULT_COUNTS = {"train": 150, "validation": 30, "good": 40, "logical": 40, "structural": 40}
SMALL_COUNTS = {"train": 8, "validation": 4, "good": 3, "logical": 3, "structural": 3}
PNG_OPTIONS = {"format": "PNG", "compress_level": 1, "optimize": False}  # fixed: byte-identical output
MARKER_FILE = "synthloco.json"


def _plain(obj):
    """JSON-ready copy (full float precision, so ``render_scene`` reproduces the image exactly)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, **PNG_OPTIONS)


def _task(args) -> tuple[str, dict]:
    """Sample, render and write one image and its masks (runs in the pool workers) -> ``(key, record)``."""
    out_dir, category, split, folder, index, seed, image_size = args
    scene = make_scene(category, split, index, seed)
    image, masks = render_scene(scene, image_size)
    stem = f"{index:03d}"
    cat_dir = Path(out_dir) / category
    _save_png(image, cat_dir / folder / f"{stem}.png")
    mask_files = []
    if scene["anomaly_type"] != "good":
        value = pixel_value(category, scene["defect"])
        gt_dir = cat_dir / "ground_truth" / folder.split("/")[-1] / stem
        gt_dir.mkdir(parents=True, exist_ok=True)
        kept = [m for m in masks if m.any()]
        if not kept:  # pragma: no cover - guarded by construction
            raise RuntimeError(f"empty ground truth for {category}/{folder}/{stem}")
        for j, m in enumerate(kept):
            _save_png((m.astype(np.uint8) * value), gt_dir / f"{j:03d}.png")
            mask_files.append(f"ground_truth/{folder.split('/')[-1]}/{stem}/{j:03d}.png")
    rel = f"{folder}/{stem}.png"
    record = {"scene": _plain(scene), "masks": mask_files}
    return f"{category}/{rel}", record


def _prepare_category_dir(cat_dir: Path) -> None:
    if cat_dir.exists():
        if not (cat_dir / MARKER_FILE).exists() and any(cat_dir.iterdir()):
            raise FileExistsError(f"{cat_dir} exists and was not written by synthloco; refusing to overwrite it")
        shutil.rmtree(cat_dir)
    for _, folder, _ in SPLIT_FOLDERS:
        (cat_dir / folder).mkdir(parents=True, exist_ok=True)
    (cat_dir / "ground_truth" / "logical_anomalies").mkdir(parents=True, exist_ok=True)
    (cat_dir / "ground_truth" / "structural_anomalies").mkdir(parents=True, exist_ok=True)


_README = """synthloco: a generated benchmark in the MVTec LOCO AD layout (ladmim_hf.data.synthetic).

Categories: {categories}. Each category folder holds train/good, validation/good, test/good,
test/logical_anomalies, test/structural_anomalies, ground_truth/<type>/<image>/000.png (single-channel
masks whose grey value encodes the defect type, see defects_config.json) and scenes.json (the scene
description each image was rendered from).

Generated with seed={seed}, image_size={image_size}, counts={counts}.
Textures: scikit-image's brick, grass and gravel images (CC0). Everything else is procedural.
"""


def generate_synthloco(out_dir, seed: int = 0, small: bool = False, categories: Sequence[str] | None = None,
                       image_size: int = 256, counts: dict | None = None, workers: int | None = None,
                       progress: bool = False) -> Path:
    """Write the synthloco benchmark to ``out_dir`` and return the path.

    Args:
        out_dir: dataset root; one folder per category is (re)created in it. A category folder that
            exists but was not written by synthloco is never deleted (``FileExistsError``).
        seed: global seed; each image gets its own generator from ``(seed, category, split, index)``,
            so the output is byte-identical for a seed whatever the number of workers.
        small: tiny sizes for tests (8 train, 4 validation, 3 per test type).
        categories: subset of :data:`CATEGORIES` (default: all five).
        image_size: side of the square images and masks in pixels.
        counts: override the number of images per split (keys ``train``, ``validation``, ``good``,
            ``logical``, ``structural``).
        workers: processes to use (default: CPU count, at most 8; 1 = in-process).
        progress: show a tqdm progress bar.
    """
    out = Path(out_dir)
    categories = list(CATEGORIES if categories in (None, "all", ["all"]) else categories)
    for category in categories:
        check_category(category)
    sizes = dict(SMALL_COUNTS if small else DEFAULT_COUNTS)
    if counts:
        unknown = set(counts) - set(sizes)
        if unknown:
            raise ValueError(f"unknown split names in counts: {sorted(unknown)}; use {sorted(sizes)}")
        sizes.update({k: int(v) for k, v in counts.items()})
    image_size = int(image_size)
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "readme.txt").unlink(missing_ok=True)  # written last: its presence means the set is complete
    tasks = []
    for category in categories:
        _prepare_category_dir(out / category)
        for key, folder, _ in SPLIT_FOLDERS:
            for index in range(sizes[key]):
                tasks.append((str(out), category, key, folder, index, int(seed), image_size))
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    workers = max(1, min(int(workers), len(tasks) // 16 + 1))
    records: dict[str, dict] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc="synthloco", unit="img")
    if workers == 1:
        results: Iterable = map(_task, tasks)
        pool = None
    else:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        if ctx.get_start_method() == "fork":
            load_textures()  # loaded once here, inherited by the forked workers
        pool = ctx.Pool(workers, initializer=load_textures)
        results = pool.imap_unordered(_task, tasks, chunksize=4)
    try:
        for key, record in results:
            records[key] = record
            if bar is not None:
                bar.update(1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        if bar is not None:
            bar.close()
    for category in categories:
        cat_dir = out / category
        with open(cat_dir / "defects_config.json", "w") as handle:
            json.dump(defects_config(category, image_size), handle, indent=2)
            handle.write("\n")
        scenes = {k[len(category) + 1:]: v for k, v in sorted(records.items()) if k.startswith(category + "/")}
        with open(cat_dir / "scenes.json", "w") as handle:
            json.dump(scenes, handle, sort_keys=True, separators=(",", ":"))
        with open(cat_dir / MARKER_FILE, "w") as handle:
            json.dump({"generator": "ladmim_hf.data.synthetic", "seed": int(seed), "image_size": image_size,
                       "counts": sizes, "rules_version": 1}, handle, indent=2, sort_keys=True)
            handle.write("\n")
    with open(out / "readme.txt", "w") as handle:
        handle.write(_README.format(categories=", ".join(categories), seed=seed, image_size=image_size, counts=sizes))
    return out
