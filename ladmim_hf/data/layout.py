"""Which layout a data root has, and the images of each category's splits.

One place answers "where are the normal training images, which images calibrate, which are test
images" for training, evaluation and calibration, whatever the layout:

- **several categories**: ``ROOT/<category>/train/good`` (MVTec LOCO AD, synthloco, MVTec AD, or
  ``folder`` categories);
- **one category**, named after the folder: ``ROOT/good``, ``ROOT/train/good`` (+ optional
  ``ROOT/validation/good``), or the images directly in ``ROOT`` (see :func:`.folder.load_folder`).

Without a ``validation/good`` folder a seeded, reported hold-out of the training images calibrates
(:func:`holdout_split`); training and ``ladmim calibrate`` draw the same one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .loaders import (
    LOCO_TEST_FOLDERS,
    ROOT_FIX,
    DataFolderNotFoundError,
    DataLayoutError,
    _is_ignored,
    _require_dir,
    load_loco,
    load_mvtec_ad,
    select_names,
)
from .folder import has_images, load_folder

DATASET_FORMATS = ("auto", "loco", "mvtec_ad", "folder")
# Below this many normal images a hold-out would leave too little to train on or to calibrate with.
MIN_HOLDOUT_IMAGES = 2


@dataclass(frozen=True)
class DataLayout:
    """A data root and how to read it.

    Attributes:
        root: the folder given (``--data_root``).
        dataset_format: ``"loco"``, ``"mvtec_ad"`` or ``"folder"`` (which loader reads a category).
        categories: every category found, sorted.
        single_category: the root is one category's folder (named after the folder).
    """

    root: Path
    dataset_format: str
    categories: tuple[str, ...]
    single_category: bool

    def category_root(self, category: str) -> Path:
        """The folder holding `category`'s splits."""
        return self.root if self.single_category else self.root / category

    def has_validation(self, category: str) -> bool:
        return (self.category_root(category) / "validation" / "good").is_dir()

    def load(self, category: str, split: str, skip_bad_files: bool = False):
        """The `datasets.Dataset` of one split (rows as in :mod:`.loaders`)."""
        if self.dataset_format == "folder":
            return load_folder(self.category_root(category), split, skip_bad_files=skip_bad_files, category=category)
        parent = self.root.parent if self.single_category else self.root
        loader = load_loco if self.dataset_format == "loco" else load_mvtec_ad
        return loader(parent, category, split, skip_bad_files=skip_bad_files)

    def paths(self, category: str, split: str, skip_bad_files: bool = False) -> list[str]:
        return list(self.load(category, split, skip_bad_files).select_columns(["path"])["path"])


def _looks_like_loco(category_root: Path) -> bool:
    """A category folder in the MVTec LOCO AD layout: train/good, validation/good, and test folders
    (if any) named as LOCO names them."""
    test = category_root / "test"
    tests_ok = not test.is_dir() or all(p.name in LOCO_TEST_FOLDERS for p in test.iterdir()
                                        if p.is_dir() and not _is_ignored(p.name))
    return (category_root / "train" / "good").is_dir() and (category_root / "validation" / "good").is_dir() and tests_ok


def _is_category_folder(folder: Path) -> bool:
    return (folder / "train").is_dir() or (folder / "good").is_dir()


def find_layout(root: str | os.PathLike, dataset_format: str = "auto") -> DataLayout:
    """Recognise the layout of `root` (one line naming the folder and the accepted layouts if none fits).

    `dataset_format="auto"` reads LOCO-style category folders with the LOCO loader (defect names from
    ``defects_config.json``) and every other category folder with the folder loader; ``"loco"``,
    ``"mvtec_ad"`` and ``"folder"`` force a loader.
    """
    if dataset_format not in DATASET_FORMATS:
        raise DataLayoutError(f"dataset_format must be one of {', '.join(DATASET_FORMATS)}, got {dataset_format!r}")
    root = Path(root)
    _require_dir(root, "dataset root", "check --data_root")
    if (root / "train").is_dir() or (root / "good").is_dir() or has_images(root):
        name = root.resolve().name
        if name == "good" and not (root / "good").is_dir():  # --data_root widget/good: the category is "widget"
            name = root.resolve().parent.name
        fmt = dataset_format
        if fmt == "auto":
            fmt = "loco" if _looks_like_loco(root) else "folder"
        if fmt != "folder" and not (root / "train" / "good").is_dir():
            raise DataLayoutError(f"{root} has no train/good folder, which the {fmt} layout needs; "
                                  "use dataset_format folder (or auto)")
        return DataLayout(root, fmt, (name,), True)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not _is_ignored(p.name) and _is_category_folder(p))
    if not found:
        raise DataFolderNotFoundError(
            f"no images found under {root}: for one category put the normal images in DIR/good/, DIR/train/good/ "
            f"or directly in DIR; for several, DIR/<category>/train/good/ ({ROOT_FIX})")
    fmt = dataset_format
    if fmt == "auto":
        fmt = "loco" if all(_looks_like_loco(root / c) for c in found) else "folder"
    return DataLayout(root, fmt, tuple(found), False)


def select_categories(layout: DataLayout, categories: str | Sequence[str] = "all") -> list[str]:
    """``"all"`` -> every category of the layout; a name, ``"a,b"`` or a list -> those, checked."""
    try:
        return select_names(layout.categories, categories, f"under {layout.root}")
    except DataLayoutError:
        if not layout.single_category:
            raise
        raise DataLayoutError(f"{layout.root} holds one category, named after its folder: {layout.categories[0]!r}; "
                              "rename the folder or leave out --categories") from None


def pair_categories(layout: DataLayout, categories: str | Sequence[str], known: Sequence[str]) -> dict[str, str]:
    """`{category in the data: category of the model}` for the categories asked for.

    Names must match, except for a one-category folder: it is scored as the model's category of the same
    name, as the one category `categories` names, or as the model's only category."""
    known = list(known)
    if layout.single_category:
        folder_name = layout.categories[0]
        asked = [c for c in ([categories] if isinstance(categories, str) else list(categories)) if c != "all"]
        if len(asked) > 1:
            raise DataLayoutError(f"{layout.root} holds one category; pass at most one --categories name")
        target = asked[0] if asked else folder_name if folder_name in known else known[0] if len(known) == 1 else None
        if target is None or target not in known:
            raise DataLayoutError(f"the model knows {', '.join(known)}; say which one {layout.root} holds with "
                                  "--categories NAME")
        return {folder_name: target}
    wanted = select_categories(layout, categories)
    missing = [c for c in wanted if c not in known]
    if missing:
        raise DataLayoutError(f"the model was not trained on {', '.join(missing)} (it knows {', '.join(known)}); "
                              "pass --categories with the ones it knows")
    return {c: c for c in wanted}


def holdout_split(paths: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """`(kept, held_out)`: `round(fraction * n)` images (at least 1, at most n - 1) held out.

    Which images are held out depends only on their file names and `seed` (each name is ranked by a
    hash of seed and name), not on the order of listing, the folder they lie in or the machine;
    both lists keep the order of `paths`."""
    if len(paths) < MIN_HOLDOUT_IMAGES:
        raise DataLayoutError(f"{len(paths)} normal image(s) cannot be split into training and calibration images; "
                              f"give at least {MIN_HOLDOUT_IMAGES} (or a validation/good folder)")
    count = min(max(1, round(fraction * len(paths))), len(paths) - 1)
    rank = sorted(paths, key=lambda p: hashlib.sha256(f"{seed}/{Path(p).name}".encode()).hexdigest())
    held = set(rank[:count])
    return [p for p in paths if p not in held], [p for p in paths if p in held]


@dataclass(frozen=True)
class NormalSplit:
    """Normal images of one category: `train` fits the model, `validation` calibrates it.
    `source` says where the validation images come from (logged and saved with the model)."""

    train: list[str]
    validation: list[str]
    source: str


def normal_split(layout: DataLayout, category: str, holdout_fraction: float, seed: int,
                 skip_bad_files: bool = False) -> NormalSplit:
    """Training and calibration images of `category`: ``validation/good`` if the category has one,
    else a seeded hold-out of `holdout_fraction` of the training images (:func:`holdout_split`)."""
    train = layout.paths(category, "train", skip_bad_files)
    if layout.has_validation(category):
        folder = layout.category_root(category) / "validation" / "good"
        return NormalSplit(train, layout.paths(category, "validation", skip_bad_files), f"{folder}")
    if not 0 < holdout_fraction < 1:
        raise DataLayoutError(
            f"{category!r} has no validation/good folder and holdout_fraction is {holdout_fraction}; add "
            f"{layout.category_root(category) / 'validation' / 'good'} or set holdout_fraction between 0 and 1")
    kept, held = holdout_split(train, holdout_fraction, seed)
    return NormalSplit(kept, held, f"hold-out: {len(held)} of {len(train)} training images "
                                   f"(holdout_fraction {holdout_fraction}, seed {seed})")


def evaluation_rows(layout: DataLayout, category: str) -> list[dict]:
    """Test images of `category` as dicts: ``path``, ``anomaly_type`` ("good"/"logical"/"structural"),
    ``regions`` (one bool-able array per ground-truth region) and ``defect_type`` (comma-separated)."""
    import numpy as np

    dataset = layout.load(category, "test")
    names = dataset.features["anomaly_type"].names
    return [{"path": row["path"], "anomaly_type": names[row["anomaly_type"]],
             "regions": [np.asarray(mask) for mask in (row.get("masks") or [])],
             "defect_type": ",".join(row.get("defect_type") or [])} for row in dataset]


__all__ = ["DATASET_FORMATS", "DataLayout", "NormalSplit", "find_layout", "holdout_split", "normal_split", "pair_categories",
           "select_categories", "evaluation_rows"]
