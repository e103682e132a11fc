"""A user's own folder of images: one category, normal images only required (anomalib-`Folder`-like)."""

from __future__ import annotations

import os
from pathlib import Path

from .loaders import (
    IMAGE_EXTENSIONS,
    DataFolderNotFoundError,
    DataLayoutError,
    _build,
    _check_only_good,
    _folder_records,
    _fingerprint,
    _images_in,
    _is_ignored,
    _require_dir,
    _split_fix,
    _test_subfolders,
)

__all__ = ["FOLDER_LAYOUTS", "has_images", "load_folder"]


def _folder_masks(root: Path, sub: str, image: Path) -> list[str]:
    gt = root / "ground_truth" / sub
    if not gt.is_dir():
        return []
    folder = gt / image.stem
    if folder.is_dir():
        return [str(p.resolve()) for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.is_file() and not _is_ignored(p.name)]
    for name in (f"{image.stem}_mask{image.suffix}", f"{image.stem}_mask.png", f"{image.stem}.png", image.name):
        if (gt / name).is_file():
            return [str((gt / name).resolve())]
    return []


# Folders of a single-category root that are never test image folders.
_NOT_TEST_FOLDERS = {"train", "validation", "test", "ground_truth"}


def has_images(folder: Path) -> bool:
    """True if `folder` directly holds at least one file with an image extension."""
    return folder.is_dir() and any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not _is_ignored(p.name)
                                   for p in folder.iterdir())


FOLDER_LAYOUTS = ("DIR/good/*.png, DIR/train/good/*.png (+ optional DIR/validation/good), or the images directly "
                  "in DIR")


def _folder_split(root: Path, split: str) -> tuple[Path, list[str] | None]:
    """`(folder, subs)` holding one split of a single-category folder; `subs` is `None` for a test split
    whose sub-folders are still to be listed, `["."]` when the images lie directly in `folder`."""
    if split == "train":
        if (root / "train").is_dir():
            _require_dir(root / "train" / "good", "train/good folder", _split_fix(root / "train", "train"))
            return root / "train", ["good"]
        if (root / "good").is_dir():
            return root, ["good"]
        if has_images(root):
            return root, ["."]
        raise DataFolderNotFoundError(f"no normal images in {root}; put them in {FOLDER_LAYOUTS}")
    if split == "validation":
        fix = _split_fix(root / "validation", "validation")
        _require_dir(root / "validation" / "good", "validation/good folder", fix)
        return root / "validation", ["good"]
    if (root / "test").exists():
        _require_dir(root / "test", "test folder", _split_fix(root / "test", "test"))
        return root / "test", None
    if (root / "good").is_dir():  # anomalib-Folder style: DIR/good next to DIR/<defect>/
        return root, [p.name for p in sorted(root.iterdir(), key=lambda p: p.name)
                      if p.is_dir() and not _is_ignored(p.name) and p.name not in _NOT_TEST_FOLDERS]
    raise DataFolderNotFoundError(f"no test images in {root}: put them in {root / 'test'}/good and "
                                  f"{root / 'test'}/<defect>/, or in {root}/good and {root}/<defect>/")


def load_folder(root: str | os.PathLike, split: str = "train", transform=None, skip_bad_files: bool = False, *,
                category: str | None = None, anomaly_types: dict[str, str] | None = None, validate: bool = True,
                cache_dir: str | os.PathLike | None = None):
    """Load one category from a user's own folder without writing code.

    Accepted layouts (anomalib-`Folder`-like; only normal images are required)::

        root/*.png                                  normal images directly in the folder, or
        root/good/*.png                             normal images, with optional
        root/<defect>/*.png                         anomalous test images next to them, or
        root/train/good/*.png                       normal training images
        root/validation/good/*.png                  (optional) normal calibration images
        root/test/good/*.png, root/test/<defect>/*.png   (optional) test images
        root/ground_truth/<defect>/<stem>.png | <stem>_mask.png | <stem>/000.png   (optional masks)

    The ``train`` split reads ``train/good``, else ``good/``, else the images in ``root``; ``test``
    reads ``test/``, else ``good/`` plus every other sub-folder of ``root``; ``validation`` needs
    ``validation/good`` (see :func:`ladmim_hf.data.layout.normal_split` for the hold-out used without it).
    Test folders named ``logical_anomalies`` / ``logical`` are logical, all others structural,
    unless ``anomaly_types`` maps folder names to ``"logical"`` or ``"structural"``.
    ``defect_type`` is the folder name. ``category`` defaults to the root folder's name.
    """
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    root = Path(root)
    _require_dir(root, "dataset folder", "check the path")
    category = category or root.resolve().name
    anomaly_types = dict(anomaly_types or {})
    for folder, kind in anomaly_types.items():
        if kind not in ("logical", "structural"):
            raise ValueError(f"anomaly_types[{folder!r}] must be 'logical' or 'structural', got {kind!r}")
    split_dir, listed = _folder_split(root, split)
    fix = _split_fix(split_dir, split)
    watched = ([split_dir / s for s in listed] if listed is not None and split != "test" else [split_dir])
    if split == "test":
        watched.append(root / "ground_truth")
    fingerprint = _fingerprint("folder", root, watched, {"category": category, "split": split, "validate": validate,
                                                          "anomaly_types": anomaly_types, "subs": listed})

    def walk():
        bad: list[tuple[str, str]] = []
        notes: list[str] = []
        if split != "test":
            subs = list(listed)
            if split_dir.name in ("train", "validation"):
                _check_only_good(split_dir, bad)
        else:
            subs = listed if listed is not None else _test_subfolders(split_dir, bad, fix)
            if not subs:
                raise DataLayoutError(f"no test sub-folders in {split_dir}; {fix}")
            unknown = set(anomaly_types) - set(subs)
            if unknown:
                raise DataLayoutError(f"anomaly_types names folders that do not exist in {split_dir}: {sorted(unknown)}")
        candidates = []
        for sub in subs:
            if sub in ("good", "."):
                kind = "good"
            elif sub in anomaly_types:
                kind = anomaly_types[sub]
            else:
                kind = "logical" if sub in ("logical_anomalies", "logical") else "structural"
            folder = split_dir if sub == "." else split_dir / sub
            for image in _images_in(folder, bad, fix, skip_folders=sub == "."):
                masks = _folder_masks(root, sub, image) if kind != "good" else []
                candidates.append({"path": str(image.resolve()), "masks": masks, "kind": kind, "defect": sub})
        return _folder_records(candidates, category, validate, bad, notes), bad, notes

    return _build(walk, fingerprint, skip_bad_files, transform, cache_dir, f"{split_dir} (folder layout)")
