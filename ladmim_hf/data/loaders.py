"""Dataset loaders returning :class:`datasets.Dataset` for MVTec LOCO AD, MVTec AD and plain folders.

Every loader walks the folder explicitly, validates each file while walking (so a corrupt image
fails at load time, not in the middle of training), and builds the dataset with
``Dataset.from_generator(..., features=...)`` (no loading scripts). The Arrow table is cached in
the datasets cache under a fingerprint of the file names, sizes and modification times, so a
changed folder is read again; the validation result of a walk is cached under the same
fingerprint.

Rows (``features``)::

    image         datasets.Image()                              the image (decoded lazily)
    label         ClassLabel(["good", "anomalous"])
    anomaly_type  ClassLabel(["good", "logical", "structural"])
    category      string
    path          string                                        absolute path of the image
    masks         List(Image())                                 one per ground-truth region
    defect_type   List(string)                                  defect types present

With ``transform`` (e.g. a :class:`~ladmim_hf.models.image_processing_ladmim.LadmimImageProcessor`)
rows come out as ``pixel_values`` ``(3, S, S)`` tensors plus the labels, ``mask`` (the union of
the regions, binarised with ``> 0`` and resized to ``S x S``, a bool tensor) and ``masks``
(``(n_regions, S, S)`` bool tensor).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image as PILImage

from ..models.configuration_ladmim import LOCO_CATEGORIES as OFFICIAL_LOCO_ORDER
from ..models.image_processing_ladmim import ImageDecodeError, load_image
from .transforms import make_batch_transform

__all__ = [
    "IMAGE_EXTENSIONS",
    "LOCO_CATEGORIES",
    "ANOMALY_TYPES",
    "BadFilesError",
    "DataLayoutError",
    "DataWarning",
    "dataset_features",
    "discover_categories",
    "find_bad_images",
    "load_defects_config",
    "load_loco",
    "load_mvtec_ad",
    "resolve_categories",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IGNORED_FILES = {".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db"}
LOCO_CATEGORIES = tuple(sorted(OFFICIAL_LOCO_ORDER))  # as folders list them; the official class-id order is the model's
LABELS = ("good", "anomalous")
ANOMALY_TYPES = ("good", "logical", "structural")
LOCO_TEST_FOLDERS = {"good": "good", "logical_anomalies": "logical", "structural_anomalies": "structural"}
_WALK_VERSION = 1  # bump when the records' content changes


class DataWarning(UserWarning):
    """A file was skipped, converted, or looks suspicious; the message names the path."""


class DataLayoutError(ValueError):
    """A dataset folder is missing, empty or laid out wrongly, or asked for categories it lacks; the
    message is one line naming the path and what to do (`ladmim train`/`evaluate` print it as is)."""


class DataFolderNotFoundError(DataLayoutError, FileNotFoundError):
    """A dataset root, category or split folder does not exist."""


class DataNotAFolderError(DataLayoutError, NotADirectoryError):
    """A path that should be a dataset folder is a file."""


class BadFilesError(ImageDecodeError):
    """One or more files of a dataset folder cannot be used; ``bad_files`` lists ``(path, reason)``."""

    def __init__(self, message: str, bad_files: list[tuple[str, str]]):
        super().__init__(message)
        self.bad_files = bad_files


def dataset_features():
    """The :class:`datasets.Features` shared by all loaders."""
    import datasets

    return datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=list(LABELS)),
            "anomaly_type": datasets.ClassLabel(names=list(ANOMALY_TYPES)),
            "category": datasets.Value("string"),
            "path": datasets.Value("string"),
            "masks": datasets.List(datasets.Image()),
            "defect_type": datasets.List(datasets.Value("string")),
        }
    )


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in IGNORED_FILES


def _check_image(path: str, decode: bool = True) -> tuple[str | None, list[str], tuple[int, int] | None, str | None]:
    """``(error, warnings, size, mode)`` of one image file; ``error`` is ``None`` when it is usable."""
    notes: list[str] = []
    if os.path.splitext(path)[1].lower() not in IMAGE_EXTENSIONS:
        return f"not an image file (unknown extension {os.path.splitext(path)[1] or '<none>'!r})", notes, None, None
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)", notes, None, None
        with PILImage.open(path) as image:
            size, mode = image.size, image.mode
            image.verify()  # checksums and structure (PNG), without decoding
    except Exception as error:  # PIL raises many types for corrupt files
        return f"cannot read image: {type(error).__name__}: {error}", notes, None, None
    if decode:
        try:
            load_image(path)  # full decode: catches truncated data that verify() lets through
        except ImageDecodeError as error:
            return str(error), notes, size, mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        notes.append(f"{path}: {mode} image ({'16-bit' if 'I;16' in mode else 'high bit depth'}) is rescaled to 8-bit by its own range")
    elif mode in ("P", "PA"):
        notes.append(f"{path}: palette image (mode {mode}) is converted to RGB")
    return None, notes, size, mode


def find_bad_images(paths: Iterable[str | os.PathLike], decode: bool = True, workers: int | None = None) -> list[tuple[str, str]]:
    """Return ``(path, reason)`` for every path that is not a readable image (opened, verified, decoded)."""
    paths = [os.fspath(p) for p in paths]
    results = _check_many(paths, decode, workers)
    return [(p, r[0]) for p, r in zip(paths, results) if r[0] is not None]


def _check_many(paths: list[str], decode: bool, workers: int | None = None):
    if len(paths) < 8:
        return [_check_image(p, decode) for p in paths]
    workers = workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        return list(pool.map(lambda p: _check_image(p, decode), paths))


def _mask_values(path: str) -> list[int]:
    """Non-zero grey values of a single-channel mask."""
    with PILImage.open(path) as mask:
        if mask.mode in ("L", "P", "1"):
            if mask.mode == "1":
                mask = mask.convert("L")
            hist = mask.histogram()
            return [v for v in range(1, len(hist)) if hist[v] > 0]
        array = np.asarray(mask)
    if array.ndim == 3:  # RGB masks: use the first channel
        array = array[..., 0]
    return [int(v) for v in np.unique(array) if v != 0]


# --------------------------------------------------------------------------------------------
# Folder walking
# --------------------------------------------------------------------------------------------

def _list_folder(folder: Path, bad: list[tuple[str, str]], skip_folders: bool = False) -> list[Path]:
    """Image candidates in a folder (sorted); hidden files are ignored, sub-folders reported (or, with
    `skip_folders`, passed over: a user's folder of images may hold other folders)."""
    out = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if _is_ignored(entry.name):
            continue
        if entry.is_dir():
            if not skip_folders:
                bad.append((str(entry), "unexpected sub-folder inside an image folder"))
            continue
        out.append(entry)
    return out


def _fingerprint(kind: str, root: Path, folders: Sequence[Path], extra: dict) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"kind": kind, "root": str(root.resolve()), "version": _WALK_VERSION, **extra},
                             sort_keys=True).encode())
    for folder in folders:
        if not folder.exists():
            digest.update(f"missing:{folder}".encode())
            continue
        if folder.is_file():
            st = folder.stat()
            digest.update(f"{folder}|{st.st_size}|{st.st_mtime_ns}".encode())
            continue
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                try:
                    st = os.stat(full)
                except OSError:
                    continue
                digest.update(f"{os.path.relpath(full, root)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def _walk_cache_path(cache_dir: str | os.PathLike | None, fingerprint: str) -> Path:
    if cache_dir is None:
        import datasets

        cache_dir = datasets.config.HF_DATASETS_CACHE
    return Path(cache_dir) / "ladmim_hf_walks" / f"{fingerprint}.json"


def _build(
    records_fn: Callable[[], tuple[list[dict], list[tuple[str, str]], list[str]]],
    fingerprint: str,
    skip_bad_files: bool,
    transform,
    cache_dir,
    what: str,
):
    """Walk (or read the cached walk), report problems, build and cache the dataset."""
    import datasets

    cache_file = _walk_cache_path(cache_dir, fingerprint)
    walk = None
    if cache_file.exists():
        try:
            walk = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            walk = None
    if walk is None:
        records, bad, notes = records_fn()
        walk = {"records": records, "bad": bad, "notes": notes}
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(walk))
            os.replace(tmp, cache_file)
        except OSError:
            pass
    records, bad, notes = walk["records"], [tuple(b) for b in walk["bad"]], walk["notes"]
    for note in notes:
        warnings.warn(note, DataWarning, stacklevel=3)
    if bad:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
        if not skip_bad_files:
            raise BadFilesError(
                f"{len(bad)} unusable file(s) in {what}:\n{listing}\n"
                "Fix or remove them, or pass skip_bad_files=True to skip them.", bad)
        warnings.warn(f"skipped {len(bad)} unusable file(s) in {what}:\n{listing}", DataWarning, stacklevel=3)
    if not records:  # every file was skipped as unusable
        raise DataLayoutError(f"no usable images in {what}: all {len(bad)} file(s) are unusable (listed above); "
                              "fix or replace them")
    payload = json.dumps(records)
    features = dataset_features()
    was_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()
    try:
        dataset = datasets.Dataset.from_generator(
            _generate_rows,
            features=features,
            gen_kwargs={"records_json": payload, "fingerprint": fingerprint},
            cache_dir=None if cache_dir is None else str(cache_dir),
            fingerprint=f"ladmim-{fingerprint}",
        )
    finally:
        if not was_disabled:
            datasets.utils.enable_progress_bars()
    skipped = "\n".join(f"{path}: {reason}" for path, reason in bad)
    dataset.info.description = (f"{what}; {len(records)} images" + (f"; skipped {len(bad)} bad file(s):\n{skipped}" if bad else ""))
    if transform is not None:
        dataset = dataset.with_transform(make_batch_transform(transform))
    return dataset


def _generate_rows(records_json: str, fingerprint: str):
    for record in json.loads(records_json):
        yield record


def _validate_records(candidates: list[dict], validate: bool, bad: list, notes: list) -> list[dict]:
    """Check every candidate image and its masks; return the usable records."""
    paths = [c["path"] for c in candidates]
    results = _check_many(paths, decode=validate)
    good = []
    for cand, (error, image_notes, size, _) in zip(candidates, results):
        if error is not None:
            bad.append((cand["path"], error))
            continue
        notes.extend(image_notes)
        mask_error = None
        for mask in cand["masks"]:
            m_error, _, m_size, _ = _check_image(mask, decode=validate)
            if m_error is not None:
                mask_error = (mask, f"ground-truth mask of {cand['path']} is unusable: {m_error}")
                break
            if m_size != size:
                mask_error = (mask, f"mask size {m_size[0]}x{m_size[1]} differs from image size {size[0]}x{size[1]} of {cand['path']}")
                break
        if mask_error is not None:
            bad.append(mask_error)
            continue
        good.append(cand)
    return good


def _folder_records(candidates: list[dict], category: str, validate: bool, bad: list, notes: list) -> list[dict]:
    """Rows of the usable candidates, each anomaly's defect type named after its folder (`defect`)."""
    usable = _validate_records(candidates, validate, bad, notes)
    return [_record(c["path"], c["kind"], category, c["masks"], [] if c["kind"] == "good" else [c["defect"]])
            for c in usable]


def _require_dir(path: Path, what: str, fix: str = "") -> None:
    fix = f"; {fix}" if fix else ""
    if not path.exists():
        raise DataFolderNotFoundError(f"{what} not found: {path}{fix}")
    if not path.is_dir():
        raise DataNotAFolderError(f"{what} is not a folder: {path}{fix}")


ROOT_FIX = "point data_root (--data_root) at the folder that holds one folder per category"


def _split_fix(split_dir: Path, split: str) -> str:
    """What to do about a missing or empty split folder."""
    if split == "validation":
        return (f"put normal images in {split_dir / 'good'} (they calibrate the scores; e.g. move about 10% of "
                "train/good there)")
    if split == "train":
        return f"put the category's normal images in {split_dir / 'good'}, or leave the category out (categories)"
    return f"put test images in {split_dir}/good and {split_dir}/<anomaly type>/"


def _check_only_good(split_dir: Path, bad: list) -> None:
    """A train / validation folder holds only ``good/``: report anything else instead of ignoring it."""
    for entry in sorted(split_dir.iterdir(), key=lambda p: p.name):
        if not _is_ignored(entry.name) and entry.name != "good":
            bad.append((str(entry), f"unexpected {'folder' if entry.is_dir() else 'file'} in {split_dir.name}/ "
                                    "(only good/ is read; normal-only splits cannot hold anomalies)"))


def _test_subfolders(split_dir: Path, bad: list, fix: str) -> list[str]:
    """Names of the image folders in a test folder (sorted); stray files there are reported as bad."""
    subs = []
    for entry in sorted(split_dir.iterdir(), key=lambda p: p.name):
        if _is_ignored(entry.name):
            continue
        if entry.is_dir():
            subs.append(entry.name)
        else:
            bad.append((str(entry), "unexpected file in the test folder (images belong in test/<type>/)"))
    if not subs:
        raise DataLayoutError(f"no test sub-folders in {split_dir}; {fix}")
    return subs


def _images_in(folder: Path, bad: list, fix: str, skip_folders: bool = False) -> list[Path]:
    files = _list_folder(folder, bad, skip_folders)
    if not files:
        raise DataLayoutError(f"no images in {folder} (the folder is empty or holds only hidden files); {fix}")
    return files


# --------------------------------------------------------------------------------------------
# Categories and defects_config.json
# --------------------------------------------------------------------------------------------

def discover_categories(root: str | os.PathLike) -> list[str]:
    """Names of the category folders under a dataset root (folders that contain ``train/``)."""
    root = Path(root)
    _require_dir(root, "dataset root", ROOT_FIX)
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not _is_ignored(p.name) and (p / "train").is_dir())
    if not found:
        raise DataFolderNotFoundError(f"no category folders (folders with a train/ sub-folder) under {root}; {ROOT_FIX}")
    return found


def resolve_categories(root: str | os.PathLike, categories: str | Sequence[str] = "all") -> list[str]:
    """``"all"`` -> every category found under ``root``; a name, ``"a,b"`` or a list -> checked list."""
    return select_names(discover_categories(root), categories, f"under {root}")


def select_names(available: Sequence[str], categories: str | Sequence[str], where: str) -> list[str]:
    """The categories asked for (``"all"``, a name, ``"a,b"`` or a list), each checked against `available`
    (the error names what is missing, `where` it was looked for, and what is there)."""
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    categories = list(categories)
    if not categories or categories == ["all"]:
        return list(available)
    if "all" in categories:
        raise DataLayoutError(f"'all' cannot be combined with category names (got {categories}); "
                              "pass either 'all' or the names")
    missing = [c for c in categories if c not in available]
    if missing:
        raise DataLayoutError(f"categor{'y' if len(missing) == 1 else 'ies'} {', '.join(map(repr, missing))} not "
                              f"found {where}; available: {', '.join(available)}")
    return list(dict.fromkeys(categories))


def load_defects_config(category_root: str | os.PathLike) -> dict[int, dict]:
    """Read ``<category_root>/defects_config.json`` keyed by mask grey value (``{}`` if absent).

    Every entry needs ``defect_name`` and ``pixel_value``; ``saturation_threshold`` (1.0) and
    ``relative_saturation`` (true) may be left out. The values are checked by the metric's own
    reader (:func:`ladmim_hf.metrics.parse_defects_config`); problems name the file."""
    from ..metrics import parse_defects_config

    path = Path(category_root) / "defects_config.json"
    if not path.exists():
        return {}
    try:
        entries = json.loads(path.read_text())
    except ValueError as error:
        raise DataLayoutError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(entries, list):
        raise DataLayoutError(f"{path} must hold a JSON list of defect types, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "defect_name" not in entry or "pixel_value" not in entry:
            raise DataLayoutError(f"{path}: entry {i} needs 'defect_name' and 'pixel_value', got {entry!r}")
    try:
        return parse_defects_config([{"saturation_threshold": 1.0, "relative_saturation": True, **entry}
                                     for entry in entries]) or {}
    except (TypeError, ValueError) as error:
        raise DataLayoutError(f"{path}: {error}") from None


# --------------------------------------------------------------------------------------------
# MVTec LOCO AD layout
# --------------------------------------------------------------------------------------------

def _category_dir(root: Path, category: str) -> Path:
    _require_dir(root, "dataset root", ROOT_FIX)
    cat_dir = root / category
    if not cat_dir.is_dir():
        try:
            available = ", ".join(discover_categories(root))
        except FileNotFoundError:
            available = "none"
        raise DataFolderNotFoundError(f"category {category!r} not found under {root} (no folder {cat_dir}); "
                                      f"available: {available}")
    return cat_dir


def _category_split(root: str | os.PathLike, category: str, split: str) -> tuple[Path, Path, Path, str]:
    """`(root, category folder, split folder, what to do if it is wrong)`, the split folder checked."""
    root = Path(root)
    cat_dir = _category_dir(root, category)
    split_dir = cat_dir / split
    fix = _split_fix(split_dir, split)
    _require_dir(split_dir, f"{split} folder of category {category!r}", fix)
    return root, cat_dir, split_dir, fix


def _split_fingerprint(kind: str, root: Path, cat_dir: Path, split: str, validate: bool, extra: Sequence[Path] = ()) -> str:
    """Fingerprint of one split of a category folder: its files, `extra` files, and the ground truth for test."""
    watched = [cat_dir / split, *extra] + ([cat_dir / "ground_truth"] if split == "test" else [])
    return _fingerprint(kind, root, watched, {"category": cat_dir.name, "split": split, "validate": validate})


def _loco_masks(cat_dir: Path, sub: str, image: Path) -> list[str]:
    folder = cat_dir / "ground_truth" / sub / image.stem
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if not _is_ignored(p.name) and p.is_file()]


def _several(loader, root, category, split, transform, skip_bad_files, **kwargs):
    """Load several categories (``"all"``, ``"a,b"`` or a list) and concatenate them."""
    import datasets

    names = resolve_categories(root, category)
    parts = [loader(root, name, split, None, skip_bad_files, **kwargs) for name in names]
    dataset = datasets.concatenate_datasets(parts)
    dataset.info.description = "\n".join(part.info.description for part in parts)
    return dataset.with_transform(make_batch_transform(transform)) if transform is not None else dataset


def _is_several(category) -> bool:
    return not isinstance(category, str) or category == "all" or "," in category


def load_loco(root: str | os.PathLike, category: str | Sequence[str], split: str = "train", transform=None,
              skip_bad_files: bool = False, *, validate: bool = True, cache_dir: str | os.PathLike | None = None):
    """Load one category and split of a MVTec LOCO AD-style folder (real LOCO or synthloco).

    Args:
        root: dataset root holding one folder per category.
        category: category folder name, e.g. ``"breakfast_box"``; ``"all"``, ``"a,b"`` or a list
            load several categories into one dataset (see :func:`resolve_categories`).
        split: ``"train"``, ``"validation"`` or ``"test"``.
        transform: optional image processor / callable; rows then carry ``pixel_values``.
        skip_bad_files: skip unreadable images (each listed in a warning and in
            ``dataset.info.description``) instead of raising :class:`BadFilesError`.
        validate: decode every image while walking (default); ``False`` only opens and verifies.
        cache_dir: datasets cache folder (default: the datasets default cache).
    """
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    if _is_several(category):
        return _several(load_loco, root, category, split, transform, skip_bad_files, validate=validate, cache_dir=cache_dir)
    root, cat_dir, split_dir, fix = _category_split(root, category, split)
    config_path = cat_dir / "defects_config.json"
    fingerprint = _split_fingerprint("loco", root, cat_dir, split, validate, [config_path])

    def walk():
        bad: list[tuple[str, str]] = []
        notes: list[str] = []
        candidates = []
        if split == "test":
            subs = []
            for entry in sorted(split_dir.iterdir(), key=lambda p: p.name):
                if _is_ignored(entry.name):
                    continue
                if not entry.is_dir():
                    bad.append((str(entry), "unexpected file in the test folder (images belong in test/<type>/)"))
                elif entry.name not in LOCO_TEST_FOLDERS:
                    raise DataLayoutError(f"unknown test folder {entry} in a MVTec LOCO AD layout; expected "
                                     f"{', '.join(LOCO_TEST_FOLDERS)} (use load_folder for other layouts)")
                else:
                    subs.append(entry.name)
            for sub in LOCO_TEST_FOLDERS:
                if sub not in subs:
                    notes.append(f"{split_dir / sub}: folder missing, category {category!r} has no {sub} test images")
            if not subs:
                raise DataLayoutError(f"no test sub-folders in {split_dir}; expected {', '.join(LOCO_TEST_FOLDERS)}")
        else:
            subs = ["good"]
            _require_dir(split_dir / "good", f"{split}/good folder of category {category!r}", fix)
            _check_only_good(split_dir, bad)
        for sub in subs:
            kind = LOCO_TEST_FOLDERS[sub]
            for image in _images_in(split_dir / sub, bad, fix):
                masks = _loco_masks(cat_dir, sub, image) if kind != "good" else []
                if kind != "good" and not masks:
                    notes.append(f"{image}: anomalous image without ground-truth masks "
                                 f"(expected {cat_dir / 'ground_truth' / sub / image.stem}/000.png)")
                candidates.append({"path": str(image.resolve()), "masks": [str(Path(m).resolve()) for m in masks],
                                   "kind": kind})
        usable = _validate_records(candidates, validate, bad, notes)
        config = load_defects_config(cat_dir)
        if not config_path.exists() and any(c["masks"] for c in usable):
            notes.append(f"{config_path}: missing; defect types are named after the mask grey values")
        records = []
        for cand in usable:
            names: list[str] = []
            for mask in cand["masks"]:
                values = _mask_values(mask)
                if not values:
                    notes.append(f"{mask}: ground-truth mask is empty (all zero)")
                for value in values:
                    if value in config:
                        name = config[value]["defect_name"]
                    else:
                        name = f"pixel_value_{value}"
                        if config:
                            notes.append(f"{mask}: grey value {value} is not in {config_path}")
                    if name not in names:
                        names.append(name)
            records.append(_record(cand["path"], cand["kind"], category, cand["masks"], names))
        return records, bad, notes

    return _build(walk, fingerprint, skip_bad_files, transform, cache_dir, f"{cat_dir / split} (MVTec LOCO AD layout)")


def _record(path: str, kind: str, category: str, masks: list[str], defect_types: list[str]) -> dict:
    return {
        "image": path,
        "label": 0 if kind == "good" else 1,
        "anomaly_type": ANOMALY_TYPES.index(kind),
        "category": category,
        "path": path,
        "masks": list(masks),
        "defect_type": list(defect_types),
    }


# --------------------------------------------------------------------------------------------
# MVTec AD layout
# --------------------------------------------------------------------------------------------

def load_mvtec_ad(root: str | os.PathLike, category: str | Sequence[str], split: str = "train", transform=None,
                  skip_bad_files: bool = False, *, validate: bool = True, cache_dir: str | os.PathLike | None = None):
    """Load one category of a MVTec AD-style folder (``train/good``, ``test/<defect>``,
    ``ground_truth/<defect>/<stem>_mask.png``); every defect folder is a structural anomaly."""
    if split == "validation":
        raise DataLayoutError("the MVTec AD layout has no validation split; hold out part of train/good instead "
                         "(e.g. dataset.train_test_split(test_size=0.1, seed=0))")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for MVTec AD, got {split!r}")
    if _is_several(category):
        return _several(load_mvtec_ad, root, category, split, transform, skip_bad_files, validate=validate, cache_dir=cache_dir)
    root, cat_dir, split_dir, fix = _category_split(root, category, split)
    fingerprint = _split_fingerprint("mvtec_ad", root, cat_dir, split, validate)

    def walk():
        bad: list[tuple[str, str]] = []
        notes: list[str] = []
        candidates = []
        if split == "train":
            _require_dir(split_dir / "good", f"train/good folder of category {category!r}", fix)
            _check_only_good(split_dir, bad)
            subs = ["good"]
        else:
            subs = _test_subfolders(split_dir, bad, fix)
        for sub in subs:
            kind = "good" if sub == "good" else "structural"
            for image in _images_in(split_dir / sub, bad, fix):
                masks = []
                if kind != "good":
                    mask = cat_dir / "ground_truth" / sub / f"{image.stem}_mask.png"
                    if mask.is_file():
                        masks = [str(mask.resolve())]
                    else:
                        notes.append(f"{image}: anomalous image without a ground-truth mask (expected {mask})")
                candidates.append({"path": str(image.resolve()), "masks": masks, "kind": kind, "defect": sub})
        return _folder_records(candidates, category, validate, bad, notes), bad, notes

    return _build(walk, fingerprint, skip_bad_files, transform, cache_dir, f"{cat_dir / split} (MVTec AD layout)")
