"""Data: loaders returning ``datasets.Dataset`` and the synthloco benchmark generator.

Names are imported lazily so that ``python -m ladmim_hf.data.synthetic`` (and its worker
processes) do not pay for importing ``datasets``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    # loaders
    "load_loco": "loaders",
    "load_mvtec_ad": "loaders",
    "load_folder": "folder",
    "discover_categories": "loaders",
    "resolve_categories": "loaders",
    "load_defects_config": "loaders",
    "find_bad_images": "loaders",
    "dataset_features": "loaders",
    "make_batch_transform": "transforms",
    "collate_anomaly_batch": "transforms",
    "BadFilesError": "loaders",
    "DataLayoutError": "loaders",
    "DataWarning": "loaders",
    "IMAGE_EXTENSIONS": "loaders",
    "LOCO_CATEGORIES": "loaders",
    "ANOMALY_TYPES": "loaders",
    # layouts and splits
    "DataLayout": "layout",
    "NormalSplit": "layout",
    "find_layout": "layout",
    "select_categories": "layout",
    "holdout_split": "layout",
    "normal_split": "layout",
    "evaluation_rows": "layout",
    # synthetic benchmark
    "generate_synthloco": "synthetic",
    "make_scene": "synthetic",
    "render_scene": "synthetic",
    "check_scene_rules": "synthetic",
    "defect_types": "synthetic",
    "defects_config": "synthetic",
    "CATEGORIES": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
