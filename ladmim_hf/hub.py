"""Sharing LADMIM models on the Hugging Face Hub: folder preparation, model card, upload, checked loading.

`python scripts/push_to_hub.py --model OUTPUT_DIR/model --repo_id org/name [--private] [--revision REV]
[--metrics PATH] [--dry_run DIR]` (or `ladmim push ...`) uploads exactly the folder that
:func:`prepare_upload_folder` builds:

* ``config.json`` with ``auto_map`` (AutoConfig/AutoModel) and ``custom_pipelines`` (the
  ``image-anomaly-detection`` pipeline),
* ``model.safetensors`` (or its shards and index),
* the flat code files (``configuration_ladmim.py``, ``modeling_ladmim.py``, ``backbone_ladmim.py``,
  ``branches_ladmim.py``, ``masking.py``, ``image_processing_ladmim.py``, ``pipeline_ladmim.py``) taken from
  this package, so they always belong together,
* ``preprocessor_config.json`` (written with the model's input size when the folder has none),
* ``README.md``: the generated model card (:func:`build_model_card`).

The token is never an argument: ``huggingface_hub`` reads ``HF_TOKEN`` or the cached ``hf auth login``.

:func:`load_model` loads a folder or Hub id with errors that say what is wrong (no config, not a LADMIM
folder, missing code files, unknown config fields, missing or truncated weights, weights that do not fit).
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

logger = logging.getLogger("ladmim_hf.hub")

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PROCESSOR_NAME = "preprocessor_config.json"
README_NAME = "README.md"
PIPELINE_FILE = "pipeline_ladmim.py"
PIPELINE_TASK = "image-anomaly-detection"
MODEL_CODE_FILES = (
    "configuration_ladmim.py",
    "modeling_ladmim.py",
    "backbone_ladmim.py",
    "branches_ladmim.py",
    "masking.py",
    "image_processing_ladmim.py",
)
CODE_FILES = MODEL_CODE_FILES + (PIPELINE_FILE,)
AUTO_MAP = {
    "AutoConfig": "configuration_ladmim.LadmimConfig",
    "AutoModel": "modeling_ladmim.LadmimForAnomalyDetection",
}
PROCESSOR_AUTO_MAP = {"AutoImageProcessor": "image_processing_ladmim.LadmimImageProcessor"}
# The same structure `Pipeline.save_pretrained` writes for a registered custom pipeline (transformers 5.x):
# `pipeline()` reads `impl` ("module.Class" inside the repo, loaded with trust_remote_code) and `pt` (names of
# transformers Auto classes, resolved with getattr(transformers, name)).
CUSTOM_PIPELINES = {
    PIPELINE_TASK: {"impl": "pipeline_ladmim.LadmimAnomalyDetectionPipeline", "pt": ["AutoModel"], "type": "image"}
}
DEFAULT_PIPELINE_TAG = "image-classification"  # the Hub has no anomaly-detection task; good/anomalous is closest
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
# Keys any transformers version may write into a config (besides the model's own arguments).
_GENERIC_CONFIG_KEYS = {
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "architectures", "auto_map", "custom_pipelines",
    "model_type", "transformers_version", "dtype", "torch_dtype", "id2label", "label2id", "num_labels",
    "problem_type", "return_dict", "output_attentions", "output_hidden_states", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder", "tie_word_embeddings",
    "cross_attention_hidden_size", "torchscript", "pruned_heads", "tf_legacy_loss", "use_bfloat16",
    "finetuning_task", "tokenizer_class", "prefix", "bos_token_id", "pad_token_id", "eos_token_id",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "use_cache",
}

LADMIM_CITATION = """@article{sakai2026ladmim,
  title   = {Logical Anomaly Detection with Masked Image Modeling},
  author  = {Sakai, Shunsuke and Hasegawa, Tatsuhito and Koshino, Makoto},
  journal = {Transactions on Machine Learning Research},
  year    = {2026},
  eprint  = {2410.10234},
  archivePrefix = {arXiv}
}"""
HVQ_CITATION = """@inproceedings{lu2023hvqtrans,
  title     = {Hierarchical Vector Quantized Transformer for Multi-class Unsupervised Anomaly Detection},
  author    = {Lu, Ruiying and Wu, YuJie and Tian, Long and others},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2023}
}"""


class ModelFolderError(ValueError):
    """A model folder or Hub repository cannot be used; the message names the folder and what is wrong."""


class ConfigFieldsWarning(UserWarning):
    """A config has fields this version of `ladmim_hf` does not know (they are ignored)."""


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _read_json(path: Path, what: str | None = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelFolderError(f"{what or path.name} at {path} is not valid JSON: {error}") from error
    except OSError as error:
        raise ModelFolderError(f"cannot read {what or path.name} at {path}: {error}") from error


def _write_json(path: Path, data: Any) -> None:
    # The layout transformers writes (indent 2, sorted keys, trailing newline).
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _listing(items, limit: int = 20) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


# --------------------------------------------------------------------------------------------------
# Pipeline in a saved folder
# --------------------------------------------------------------------------------------------------


def add_pipeline_to_folder(model_dir: str | os.PathLike) -> Path:
    """Make `pipeline("image-anomaly-detection", model=model_dir, trust_remote_code=True)` work for a folder
    saved with `save_pretrained` (model + image processor).

    Copies `pipeline_ladmim.py` (and `image_processing_ladmim.py`, which it imports, when missing) into the
    folder and writes `custom_pipelines` into its `config.json`. Idempotent. Returns the folder.
    """
    folder = Path(model_dir)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelFolderError(f"{folder} has no {CONFIG_NAME}: save the model there (save_pretrained) first")
    config = _read_json(config_path)
    if config.get("model_type") != "ladmim":
        raise ModelFolderError(
            f"{config_path} is a {config.get('model_type')!r} config; the {PIPELINE_TASK} pipeline needs a "
            "LadmimForAnomalyDetection folder (model_type 'ladmim')"
        )
    shutil.copyfile(PACKAGE_DIR / PIPELINE_FILE, folder / PIPELINE_FILE)
    if not (folder / "image_processing_ladmim.py").is_file():
        shutil.copyfile(PACKAGE_DIR / "image_processing_ladmim.py", folder / "image_processing_ladmim.py")
    pipelines = dict(config.get("custom_pipelines") or {})
    pipelines.update(json.loads(json.dumps(CUSTOM_PIPELINES)))
    config["custom_pipelines"] = pipelines
    _write_json(config_path, config)
    return folder


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def check_safetensors_file(path: str | os.PathLike) -> dict:
    """Check that a safetensors file is complete (header readable, every tensor's bytes present).

    Returns the header (tensor name -> dtype/shape/offsets). Raises `ModelFolderError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFolderError(f"weights file {path} does not exist")
    size = path.stat().st_size
    if size < 8:
        raise ModelFolderError(f"weights file {path} is truncated or empty ({size} bytes): re-download or re-save it")
    with open(path, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > size - 8:
            raise ModelFolderError(
                f"weights file {path} is truncated: its header alone needs {header_len + 8} bytes but the file has "
                f"{size}; re-download or re-save it"
            )
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ModelFolderError(f"weights file {path} is not a valid safetensors file (bad header: {error})") from error
    if not isinstance(header, dict):
        raise ModelFolderError(f"weights file {path} is not a valid safetensors file (header is not a JSON object)")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            data_end = max(data_end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError) as error:
            raise ModelFolderError(f"weights file {path} has a malformed entry for tensor {name!r}") from error
    expected = 8 + header_len + data_end
    if size < expected:
        raise ModelFolderError(
            f"weights file {path} is truncated: {size} bytes, but its header describes {expected} bytes "
            f"({len(header) - ('__metadata__' in header)} tensors); re-download or re-save it"
        )
    return header


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors file(s) of a saved folder, checked for completeness."""
    folder = Path(folder)
    single = folder / WEIGHTS_NAME
    index = folder / WEIGHTS_INDEX_NAME
    if single.is_file():
        check_safetensors_file(single)
        return [single]
    if index.is_file():
        data = _read_json(index)
        shards = sorted(set((data.get("weight_map") or {}).values()))
        if not shards:
            raise ModelFolderError(f"{index} lists no weight shards")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelFolderError(f"{folder} is missing weight shard(s) listed in {WEIGHTS_INDEX_NAME}: {_listing(missing)}")
        for shard in shards:
            check_safetensors_file(folder / shard)
        return [index] + [folder / s for s in shards]
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = f" (found {_listing(others)}: only safetensors weights are loaded)" if others else ""
    raise ModelFolderError(f"{folder} has no {WEIGHTS_NAME} (nor a sharded {WEIGHTS_INDEX_NAME}){hint}")


def _known_fields(config_class) -> set[str]:
    from transformers import PretrainedConfig

    names = {name for name in inspect.signature(config_class.__init__).parameters if name not in ("self", "kwargs")}
    return names | _GENERIC_CONFIG_KEYS | set(PretrainedConfig().to_dict())


def unknown_config_fields(config: dict) -> list[str]:
    """Fields of a LADMIM `config.json` dict that this version does not know (dotted for sub-configs)."""
    from .configuration_ladmim import LadmimConfig, LadmimPredictorConfig, LadmimTokenizerConfig

    unknown = sorted(k for k in config if k not in _known_fields(LadmimConfig))
    for key, cls in (("tokenizer_config", LadmimTokenizerConfig), ("predictor_config", LadmimPredictorConfig)):
        sub = config.get(key)
        if isinstance(sub, dict):
            unknown += sorted(f"{key}.{k}" for k in sub if k not in _known_fields(cls))
    return unknown


def _strip_fields(config: dict, fields: list[str]) -> dict:
    config = json.loads(json.dumps(config))
    for field in fields:
        if "." in field:
            parent, child = field.split(".", 1)
            config.get(parent, {}).pop(child, None)
        else:
            config.pop(field, None)
    return config


def check_code_files(folder: str | os.PathLike, config: dict | None = None) -> list[str]:
    """What a folder lacks for `trust_remote_code` loading (code files, `auto_map` entries), and any code
    beyond the shipped files that such loading would run (empty if fine)."""
    folder = Path(folder)
    config = config if config is not None else _read_json(folder / CONFIG_NAME)
    problems = []
    auto_map = config.get("auto_map") or {}
    for auto_class, reference in AUTO_MAP.items():
        if auto_class not in auto_map:
            problems.append(f"auto_map[{auto_class!r}] in {CONFIG_NAME} (should be {reference!r})")
    needed = [name for name in MODEL_CODE_FILES if name != "image_processing_ladmim.py"]
    processor_path = folder / PROCESSOR_NAME
    processor_map = (_read_json(processor_path).get("auto_map") or {}) if processor_path.is_file() else {}
    if config.get("custom_pipelines") or processor_map:
        needed.append("image_processing_ladmim.py")  # the processor's class; the pipeline imports it too
    if config.get("custom_pipelines"):
        needed.append(PIPELINE_FILE)
    problems += [name for name in needed if not (folder / name).is_file()]
    # trust_remote_code runs whatever module these entries name: only the shipped files may be named,
    # and the folder may hold no other Python code (a shipped file could import it).
    targets = [(f"{CONFIG_NAME} auto_map[{k!r}]", v) for k, v in auto_map.items()]
    targets += [(f"{PROCESSOR_NAME} auto_map[{k!r}]", v) for k, v in processor_map.items()]
    targets += [(f"{CONFIG_NAME} custom_pipelines[{task!r}]", (entry or {}).get("impl"))
                for task, entry in (config.get("custom_pipelines") or {}).items()]
    for where, reference in targets:
        for item in reference if isinstance(reference, (list, tuple)) else [reference]:
            if item is None:
                continue
            module = str(item).rsplit(".", 1)[0]
            if "--" in str(item) or f"{module}.py" not in CODE_FILES:
                problems.append(f"{where} = {item!r} names code outside the shipped files {list(CODE_FILES)}")
    problems += [f"unexpected code file {path.name}" for path in sorted(folder.glob("*.py")) if path.name not in CODE_FILES]
    return problems


# --------------------------------------------------------------------------------------------------
# Loading with clear errors
# --------------------------------------------------------------------------------------------------


def resolve_model_folder(path_or_id: str | os.PathLike, revision: str | None = None,
                         local_files_only: bool | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local folder, or the local snapshot of a Hub repository (downloaded, or from the offline cache)."""
    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelFolderError(f"{path} is a file; pass the model folder (the one holding {CONFIG_NAME})")
    if text.startswith((".", "/", "~")) or not _REPO_ID.match(text):
        raise ModelFolderError(f"model folder {text} does not exist (and it is not a Hub repo id like 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(snapshot_download(text, revision=revision, local_files_only=bool(local_files_only),
                                      cache_dir=cache_dir, allow_patterns=["*.json", "*.safetensors", "*.py", "*.md"]))
    except RepositoryNotFoundError as error:
        raise ModelFolderError(f"Hub repository {text!r} not found (or private: log in with `hf auth login`)") from error
    except RevisionNotFoundError as error:
        raise ModelFolderError(f"revision {revision!r} not found in Hub repository {text!r}") from error
    except GatedRepoError as error:
        raise ModelFolderError(f"Hub repository {text!r} is gated: accept its terms on the Hub and log in") from error
    except LocalEntryNotFoundError as error:
        raise ModelFolderError(
            f"Hub repository {text!r} is not in the local cache and the Hub cannot be reached (offline mode or no "
            "network); download it once with network access"
        ) from error


def load_config(folder: str | os.PathLike, strict: bool = False):
    """`LadmimConfig` of a saved folder. Unknown fields (a config written by a newer version) are ignored with a
    `ConfigFieldsWarning` naming them, or raise `ModelFolderError` with `strict=True`."""
    from .configuration_ladmim import LadmimConfig

    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        present = sorted(p.name for p in folder.iterdir())[:10] if folder.is_dir() else []
        raise ModelFolderError(f"{folder} has no {CONFIG_NAME}: not a saved LADMIM model folder (it holds {present})")
    raw = _read_json(config_path)
    if not isinstance(raw, dict):
        raise ModelFolderError(f"{config_path} does not hold a JSON object")
    model_type = raw.get("model_type")
    if model_type != "ladmim":
        hint = {
            "ladmim_tokenizer": " (a LadmimTokenizerModel: load it with LadmimTokenizerModel.from_pretrained)",
            "ladmim_predictor": " (a LadmimPredictorModel: load it with LadmimPredictorModel.from_pretrained)",
        }.get(model_type, "")
        raise ModelFolderError(f"{config_path} has model_type {model_type!r}, not a LADMIM detector ('ladmim'){hint}")
    unknown = unknown_config_fields(raw)
    if unknown:
        version = raw.get("transformers_version", "unknown")
        message = (f"{config_path} has field(s) this version of ladmim_hf does not know: {_listing(unknown)} "
                   f"(written by a newer version? transformers_version {version})")
        if strict:
            raise ModelFolderError(message + "; refusing to load with strict_config=True")
        warnings.warn(message + "; they are ignored (pass strict_config=True to refuse such configs)",
                      ConfigFieldsWarning, stacklevel=3)
        raw = _strip_fields(raw, unknown)
    try:
        return LadmimConfig.from_dict(raw)
    except (TypeError, ValueError) as error:
        raise ModelFolderError(f"{config_path} is not a valid LADMIM config: {error}") from error


def load_model(path_or_id: str | os.PathLike, *, revision: str | None = None, check_code: bool = True,
               strict_config: bool = False, local_files_only: bool | None = None,
               cache_dir: str | os.PathLike | None = None, device=None):
    """Load a `LadmimForAnomalyDetection` from a folder or Hub id, with errors that name the problem.

    Checks, in order: the folder (or repo) exists; `config.json` exists, is JSON and is a LADMIM detector
    config; with `check_code` the folder has the code files and `auto_map` that `trust_remote_code` users need;
    unknown config fields (warned about and ignored, or refused with `strict_config`); the weights file exists
    and is complete; the weights fit the config (no missing, unexpected or mis-shaped tensors).

    Returns the model in eval mode. Raises `ModelFolderError` (a `ValueError`).
    """
    from .modeling_ladmim import LadmimForAnomalyDetection

    folder = resolve_model_folder(path_or_id, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
    config = load_config(folder, strict=strict_config)
    if check_code:
        problems = check_code_files(folder, _read_json(folder / CONFIG_NAME))
        if problems:
            raise ModelFolderError(
                f"{path_or_id} does not hold exactly the code trust_remote_code loading needs: {_listing(problems)}. "
                "Rebuild the folder with "
                "`python scripts/push_to_hub.py --model DIR --repo_id org/name --dry_run OUT` (or "
                "ladmim_hf.hub.prepare_upload_folder), or pass check_code=False to load it with the installed ladmim_hf"
            )
    weight_files(folder)
    try:
        model, info = LadmimForAnomalyDetection.from_pretrained(folder, config=config, output_loading_info=True)
    except Exception as error:  # size mismatches, unreadable tensors, ...
        raise ModelFolderError(f"cannot load the weights in {folder}: {type(error).__name__}: {error}") from error
    problems = []
    for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "mis-shaped")):
        values = sorted(str(v) for v in (info.get(key) or []))
        if values:
            problems.append(f"{label} tensors ({len(values)}): {_listing(values)}")
    if problems:
        raise ModelFolderError(f"the weights in {folder} do not fit its config: " + "; ".join(problems))
    if device is not None:
        model.to(device)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------


def find_metrics(model_dir: str | os.PathLike, metrics_path: str | os.PathLike | None = None) -> Path | None:
    """`metrics_path` if given (must exist), else `MODEL_DIR/../eval/metrics.json` or `MODEL_DIR/metrics.json`."""
    if metrics_path is not None:
        path = Path(metrics_path)
        if not path.is_file():
            raise FileNotFoundError(f"metrics file {path} does not exist")
        return path
    model_dir = Path(model_dir)
    for candidate in (model_dir.parent / "eval" / "metrics.json", model_dir / "metrics.json"):
        if candidate.is_file():
            return candidate
    return None


def _optional_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("ignoring unreadable %s: %s", path, error)
        return None
    return data if isinstance(data, dict) else None


def _dataset_info(categories: list[str], settings: dict | None, override: str | None) -> dict:
    from .configuration_ladmim import LOCO_CATEGORIES

    settings = settings or {}
    root = Path(str(settings.get("data_root") or "")).name.lower()
    fmt = settings.get("dataset_format") or ("loco" if set(categories) <= set(LOCO_CATEGORIES) else None)
    if override:
        return {"id": override, "name": override, "license": None, "loco": "loco" in override.lower()}
    if "synth" in root:
        return {"id": "synthloco", "name": "synthloco (synthetic LOCO-style benchmark generated by `ladmim synth`)",
                "license": None, "loco": True}
    if fmt == "loco":
        return {"id": "mvtec-loco-ad", "name": "MVTec LOCO AD", "license": "cc-by-nc-sa-4.0", "loco": True}
    if fmt == "mvtec_ad":
        return {"id": "mvtec-ad", "name": "MVTec AD", "license": "cc-by-nc-sa-4.0", "loco": False}
    name = root or "custom"
    return {"id": name, "name": name, "license": None, "loco": False}


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{float(value):.{digits}f}" if _is_number(value) else "n/a"


_METRIC_KEYS = ("auroc_logical", "auroc_structural", "auroc_mean", "spro_0.05")


def _numbers(entry: Any) -> dict:
    """The plain values of a metrics entry, each a float or None (shown as n/a): metrics.json may be hand-edited."""
    if not isinstance(entry, dict):
        return {}
    return {k: float(v) if _is_number(v) else None for k, v in entry.items() if not isinstance(v, dict)}


def _entries(group: Any) -> dict:
    """`{name: _numbers(entry)}` of a dict of metrics entries (branches, a baseline's categories)."""
    return {k: _numbers(v) for k, v in group.items() if isinstance(v, dict)} if isinstance(group, dict) else {}


def _results_table(metrics: dict) -> str:
    """`evaluation.results_table` (every branch and baseline the metrics report) of a sanitised copy."""
    from .evaluation import results_table

    def entry(raw: Any) -> dict:
        return {**dict.fromkeys(_METRIC_KEYS), **_numbers(raw),
                "branches": _entries(raw.get("branches") if isinstance(raw, dict) else None)}

    clean = {"categories": {name: entry(e) for name, e in (metrics.get("categories") or {}).items()},
             "mean": entry(metrics.get("mean")), "branches_mean": _entries(metrics.get("branches_mean")),
             "baselines": {name: _entries(per) for name, per in (metrics.get("baselines") or {}).items()}}
    lines = results_table(clean).split("\n")
    return "\n".join(lines if metrics.get("mean") else lines[:-1])  # no mean row without means


_BRANCH_NAMES = {"logical": "logical", "structural": "structural", "memory_bank": "memory-bank", "global": "global"}


def _fusion_phrase(config, raw: bool = False) -> str:
    """How the fused score combines the branches, e.g. "the sum of the logical and structural scores"."""
    names = [_BRANCH_NAMES[b] for b in config.fused_branches]
    listed = " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    if len(names) == 1:
        return f"the {'raw ' if raw else ''}{listed} score alone"
    rule = {"sum": "sum", "max": "maximum"}[config.fusion_rule]
    return f"the {'raw ' if raw else ''}{rule} of the {listed} scores"


_BASELINE_TEXT = {"knn": "kNN is a PatchCore-style nearest-neighbour score with every training patch in its bank",
                  "global": "global is the Mahalanobis distance of pooled features"}


def _eval_results(metrics: dict, dataset: dict):
    from huggingface_hub import EvalResult

    names = {"auroc_logical": ("roc_auc", "Image AUROC, logical anomalies vs good"),
             "auroc_structural": ("roc_auc", "Image AUROC, structural anomalies vs good"),
             "auroc_mean": ("roc_auc", "Image AUROC, mean of logical and structural"),
             "spro_0.05": ("au_spro", "AU-sPRO up to FPR 0.05")}
    entries = list((metrics.get("categories") or {}).items())
    if metrics.get("mean"):
        entries.append(("mean", metrics["mean"]))
    results = []
    for category, entry in entries:
        for key, (metric_type, metric_name) in names.items():
            value = (entry or {}).get(key)
            if not _is_number(value):
                continue
            label = "mean over categories" if category == "mean" else category
            results.append(EvalResult(
                task_type="anomaly-detection", task_name="Logical and structural anomaly detection",
                dataset_type=dataset["id"], dataset_name=f"{dataset['name']} ({label})", dataset_config=category,
                dataset_split="test", metric_type=metric_type, metric_name=metric_name, metric_value=round(float(value), 4),
            ))
    return results


def _settings_lines(settings: dict | None, summary: dict | None, config) -> list[str]:
    lines: list[str] = []
    if settings:
        lines += [f"- data: `{settings.get('data_root')}` ({settings.get('dataset_format', 'loco')} layout), "
                  f"categories: {settings.get('categories')}, seed {settings.get('seed')}, "
                  f"mixed precision: {settings.get('mixed_precision', 'no')}"]
        if settings.get("backbone_weights"):
            lines.append(f"- backbone weights: `{settings['backbone_weights']}`")
        for stage in ("tokenizer", "predictor"):
            s = settings.get(stage) or {}
            if s:
                length = f"{s.get('max_steps')} steps" if s.get("max_steps") else f"{s.get('epochs')} epochs"
                lines.append(
                    f"- {stage}: AdamW, {length}, batch {s.get('batch_size')}, lr {s.get('learning_rate')} "
                    f"({s.get('schedule')} schedule, warm-up fraction {s.get('warmup_fraction')}), weight decay "
                    f"{s.get('weight_decay')}, gradient clip {s.get('max_grad_norm')}"
                )
        if "calibration_fpr" in settings:
            lines.append(f"- calibration: thresholds at a false-positive rate of {settings['calibration_fpr']} on normal "
                         "validation images (never test images)")
    if summary:
        for name, stage in (summary.get("stages") or {}).items():
            if isinstance(stage, dict):
                lines.append(f"- stage `{name}`: {stage.get('steps')} steps, final loss {_fmt(stage.get('final_loss'), 4)}, "
                             f"{stage.get('seconds')} s")
    calibration = config.calibration or {}
    if calibration:
        thresholds = ", ".join(f"{c}: {_fmt(s.get('threshold'), 2)}" for c, s in calibration.items())
        lines.append(f"- calibrated thresholds on the fused score: {thresholds}")
    else:
        lines.append(f"- no calibration statistics: scores are not standardised and the default threshold "
                     f"{config.default_threshold} is used")
    return lines


def build_model_card(model_dir: str | os.PathLike, repo_id: str, metrics: dict | None = None,
                     training_summary: dict | None = None, train_settings: dict | None = None,
                     license: str | None = None, pipeline_tag: str = DEFAULT_PIPELINE_TAG,
                     base_model: str | None = None, dataset: str | None = None) -> str:
    """The README.md (YAML metadata + text) of a LADMIM model repository."""
    from huggingface_hub import ModelCardData

    config = load_config(model_dir)
    tok, pred = config.tokenizer_config, config.predictor_config
    categories = list(config.categories)
    data = _dataset_info(categories, train_settings, dataset)
    if base_model is None and tok.backbone == "efficientnet_b4" and "google/efficientnet-b4" in str(
            (train_settings or {}).get("backbone_weights")):
        base_model = "google/efficientnet-b4"
    license = license or data["license"] or "apache-2.0"
    tags = ["anomaly-detection", "logical-anomaly-detection", "image-anomaly-detection", "ladmim", "hvq-trans",
            "masked-image-modeling", "vision", "custom_code"]
    if data["loco"]:
        tags.insert(3, "mvtec-loco")
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag=pipeline_tag, license=license, tags=tags, datasets=[data["id"]],
        base_model=base_model, model_name=repo_id,
        eval_results=_eval_results(metrics, data) if metrics else None,
    )
    example = categories[0]
    num_masks = config.num_masks
    predictors = "one shared predictor" if config.shared_predictor else f"one predictor per category ({len(categories)})"
    distance = ("L1 between predicted and true histograms" if config.histogram_distance == "l1"
                else "an RBF-kernel distance over the codebook vectors, so near-identical codes do not count as errors")
    branches = config.enabled_branches
    branch_text, branch_lines = "", []
    if config.memory_bank_size > 0:
        branch_text += (" A PatchCore memory bank of normal training patches gives the memory-bank score: the largest "
                        "distance of an image's patch to its nearest bank patch.")
        branch_lines.append(f"- memory bank: {config.memory_bank_size} patches per category (a greedy k-center coreset "
                            f"of the training images' backbone features), {config.memory_bank_neighbourhood}x"
                            f"{config.memory_bank_neighbourhood} neighbourhood, map smoothing sigma "
                            f"{config.memory_bank_smoothing_sigma:g} px")
    if config.global_branch:
        branch_text += (" The global score is the Mahalanobis distance of the image's pooled backbone features "
                        "(per-channel mean and standard deviation) under a Ledoit-Wolf covariance of the training images.")
    pipeline_scores = ", ".join(f'result["{b}_score"]' for b in branches)
    losses = {"l1": "the L1 histogram loss (the paper)", "kl": "a KL histogram loss",
              "token_ce": "a cross-entropy on each masked cell's code (the histogram is the mean of the cells' predictions)",
              "codebook_mmd": "the kernel histogram distance as loss"}
    sections = [
        f"# LADMIM logical anomaly detector: `{repo_id}`",
        "",
        "LADMIM (Logical Anomaly Detection with Masked Image Modeling) detects *logical* anomalies (missing, extra or "
        "misplaced parts, wrong combinations) as well as *structural* ones (scratches, dents, contamination) in "
        "industrial images. A frozen EfficientNet gives a feature grid; a class-switched HVQ-Trans tokenizer turns it "
        "into discrete codes and reconstructs it (the reconstruction error is the structural score); a masked "
        "transformer (LAViT) predicts the histogram of codes hidden under random block masks, and its error "
        f"({distance}) is the logical score.{branch_text} Each branch is standardised with statistics of normal "
        f"validation images; the fused score is {_fusion_phrase(config)} (fusion rule `{config.fusion_rule}`).",
        "",
        f"- categories: {', '.join(f'`{c}`' for c in categories)}",
        f"- backbone: `{tok.backbone}` taps {tok.backbone_taps} -> {tok.feature_channels} x {tok.grid_size} x "
        f"{tok.grid_size} features from {tok.image_size} px input",
        f"- tokenizer: width {tok.hidden_size}, {tok.num_encoder_layers} encoder / {tok.num_decoder_layers} decoder "
        f"layers, {tok.num_levels} levels x {tok.codebook_size} codes per category"
        f"{', OT term in the structural map' if tok.use_ot_score else ''}"
        f"{', reconstruction error normalised per cell and channel' if tok.residual_normalization == 'cell_channel' else ''}",
        f"- predictor: {predictors}, width {pred.hidden_size}, {pred.num_hidden_layers} layers, "
        f"{pred.num_attention_heads} heads"
        f"{f', one token per {pred.patch_size}x{pred.patch_size} cells' if pred.patch_size > 1 else ''}, "
        f"trained with {losses[pred.loss_type]}",
        f"- scoring: {num_masks} masks of {config.score_num_masked} cells per image by default",
        *branch_lines,
        "",
        "## Usage",
        "",
        "The code ships with the weights (`trust_remote_code=True`); no extra package is needed beyond `torch`, "
        "`transformers`, `numpy` and `Pillow`.",
        "",
        "```python",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModel",
        "",
        f'model = AutoModel.from_pretrained("{repo_id}", trust_remote_code=True).eval()',
        f'processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True)',
        'image = Image.open("image.png")',
        f'out = model(**processor(image), category="{example}", num_masks={num_masks}, seed=0)',
        f"print(out.pred_score, out.pred_label, {', '.join(f'out.{b}_score' for b in branches)})",
        "anomaly_map = processor.postprocess_anomaly_map(out.anomaly_map, image.size[::-1])  # (1, H, W)",
        "```",
        "",
        "Or with the pipeline (it travels with the model):",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'detector = pipeline("{PIPELINE_TASK}", model="{repo_id}", trust_remote_code=True)',
        f'result = detector("image.png", category="{example}")',
        f'print(result["score"], result["label"], {pipeline_scores})',
        'result["anomaly_map"]  # PIL image (mode "F", float values) at the size of the input image',
        "```",
        "",
        "The pipeline takes file paths, PIL images, numpy arrays or lists of them (not URLs), and `category=`, "
        "`num_masks=`, `threshold=` and `seed=` (default 0: the same masks for every call, so scores are "
        "reproducible; `seed=None` draws fresh masks).",
        "",
        "## Evaluation",
        "",
    ]
    if metrics:
        baselines = [name for name, per in (metrics.get("baselines") or {}).items() if per]
        baseline_text = "".join(f"; {_BASELINE_TEXT.get(name, f'{name} is a baseline')}" for name in baselines)
        if baselines:
            baseline_text += " (baselines need no training and use the same backbone features)"
        sections += [
            f"Test split of {data['name']}, {metrics.get('num_masks', num_masks)} masks per image, seed "
            f"{metrics.get('seed', 'n/a')}. Image AUROCs compare good images with logical (resp. structural) "
            f"anomalies; the branch columns score with one branch alone{baseline_text}.",
            "",
            _results_table(metrics),
            "",
        ]
    else:
        sections += ["No evaluation results were provided with this upload.", ""]
    sections += ["## Training", ""] + _settings_lines(train_settings, training_summary, config) + [""]
    sections += [
        "## Limitations",
        "",
        f"- It only knows the categories it was trained on ({', '.join(categories)}); other categories raise an error, "
        "and images of a known category under a different setup (camera, lighting, layout) need retraining.",
        "- Scores are random in part: each image is scored through random block masks. Pass a fixed `seed` for "
        "reproducible scores; more masks reduce the variance.",
        ("- Thresholds were calibrated at a fixed false-positive rate on a few normal validation images; check them "
         "on your own data before using the `label` output for decisions." if config.calibration else
         f"- This model has no calibration statistics: the fused score is {_fusion_phrase(config, raw=True)} and "
         f"`label` uses the default threshold {config.default_threshold}, which is not meaningful; calibrate it on "
         "normal images of your own before using `label`."),
        "- The anomaly map is coarse (one value per feature cell, upsampled); it localises, it does not segment.",
        "- Not a reproduction of the paper's numbers unless the evaluation above says so; see the training settings.",
    ]
    if data["license"]:
        sections.append(f"- Trained on {data['name']}, whose license ({data['license']}) restricts commercial use; "
                        "the weights are released under the same terms.")
    sections += [
        "",
        "## Citation",
        "",
        "LADMIM (Sakai, Hasegawa, Koshino, TMLR 2026, arXiv:2410.10234) and HVQ-Trans (Lu et al., NeurIPS 2023), "
        "whose tokenizer it uses:",
        "",
        "```bibtex",
        LADMIM_CITATION,
        "",
        HVQ_CITATION,
        "```",
        "",
    ]
    yaml = card_data.to_yaml()
    return f"---\n{yaml}\n---\n\n" + "\n".join(sections)


# --------------------------------------------------------------------------------------------------
# Upload folder and push
# --------------------------------------------------------------------------------------------------


def prepare_upload_folder(model_dir: str | os.PathLike, out_dir: str | os.PathLike, repo_id: str,
                          metrics_path: str | os.PathLike | None = None, license: str | None = None,
                          pipeline_tag: str = DEFAULT_PIPELINE_TAG, base_model: str | None = None,
                          dataset: str | None = None, verify: bool = True) -> Path:
    """Write into `out_dir` (empty or new) exactly what would be uploaded for `model_dir`. Returns `out_dir`."""
    from .image_processing_ladmim import LadmimImageProcessor

    model_dir = Path(model_dir)
    out = Path(out_dir)
    if not model_dir.is_dir():
        raise ModelFolderError(f"model folder {model_dir} does not exist")
    if not _REPO_ID.match(repo_id or ""):
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    if out.resolve() == model_dir.resolve():
        raise ValueError("the upload folder must differ from the model folder")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; pass a new or empty folder")
    config = load_config(model_dir)  # validates config.json (and warns about unknown fields)
    weights = weight_files(model_dir)
    out.mkdir(parents=True, exist_ok=True)

    raw = _read_json(model_dir / CONFIG_NAME)
    raw["auto_map"] = {**(raw.get("auto_map") or {}), **AUTO_MAP}
    raw.setdefault("architectures", ["LadmimForAnomalyDetection"])
    _write_json(out / CONFIG_NAME, raw)
    for path in weights:
        shutil.copyfile(path, out / path.name)
    for name in CODE_FILES:
        shutil.copyfile(PACKAGE_DIR / name, out / name)
    processor_path = model_dir / PROCESSOR_NAME
    if processor_path.is_file():
        processor = _read_json(processor_path)
        processor["auto_map"] = {**(processor.get("auto_map") or {}), **PROCESSOR_AUTO_MAP}
        _write_json(out / PROCESSOR_NAME, processor)
    else:
        logger.info("%s has no %s: writing the default one (size %d)", model_dir, PROCESSOR_NAME,
                    config.tokenizer_config.image_size)
        LadmimImageProcessor(size=config.tokenizer_config.image_size).save_pretrained(out)
    add_pipeline_to_folder(out)

    metrics_file = find_metrics(model_dir, metrics_path)
    metrics = _optional_json(metrics_file) if metrics_file else None
    if metrics_file and metrics is None:
        raise ModelFolderError(f"metrics file {metrics_file} is not a JSON object")
    card = build_model_card(
        out, repo_id, metrics=metrics, training_summary=_optional_json(model_dir / "training_summary.json"),
        train_settings=_optional_json(model_dir.parent / "train_settings.json"), license=license,
        pipeline_tag=pipeline_tag, base_model=base_model, dataset=dataset,
    )
    (out / README_NAME).write_text(card, encoding="utf-8")
    if verify:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigFieldsWarning)  # already reported for the model folder
            load_model(out)
    return out


def push_to_hub(model_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                metrics_path: str | os.PathLike | None = None, dry_run: str | os.PathLike | None = None,
                commit_message: str | None = None, license: str | None = None,
                pipeline_tag: str = DEFAULT_PIPELINE_TAG, base_model: str | None = None, dataset: str | None = None,
                api=None) -> str:
    """Upload a trained detector folder (see the module docstring for what is uploaded).

    With `dry_run=DIR` the folder is written to DIR and nothing is uploaded. `api` defaults to
    `huggingface_hub.HfApi()` (token from `HF_TOKEN` or the cached login). Returns the commit URL, or DIR.
    """
    if dry_run is not None:
        folder = prepare_upload_folder(model_dir, dry_run, repo_id, metrics_path, license, pipeline_tag, base_model, dataset)
        logger.info("dry run: wrote the upload folder for %s to %s (nothing uploaded)", repo_id, folder)
        return str(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    with tempfile.TemporaryDirectory(prefix="ladmim-upload-") as tmp:
        folder = prepare_upload_folder(model_dir, Path(tmp) / "upload", repo_id, metrics_path, license, pipeline_tag,
                                       base_model, dataset)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        logger.info("repository %s ready", repo_url)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
            commit_message=commit_message or "Upload LADMIM detector (weights, code, pipeline, model card)",
        )
    url = getattr(commit, "commit_url", None) or str(commit)
    logger.info("uploaded %s: %s", repo_id, url)
    return url


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `scripts/push_to_hub.py` and `ladmim push` (the token is never an argument)."""
    parser.add_argument("--model", required=True, help="trained detector folder (OUTPUT_DIR/model)")
    parser.add_argument("--repo_id", required=True, help="Hub repository, 'org/name'")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--metrics", default=None,
                        help="metrics.json for the card (default: MODEL/../eval/metrics.json when present)")
    parser.add_argument("--dry_run", default=None, metavar="DIR",
                        help="write the exact upload folder to DIR and upload nothing")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--license", default=None,
                        help="license id for the card (default: the dataset's, cc-by-nc-sa-4.0 for MVTec data, "
                             "else apache-2.0)")
    parser.add_argument("--pipeline_tag", default=DEFAULT_PIPELINE_TAG, help="Hub task tag of the card")
    parser.add_argument("--base_model", default=None, help="Hub id of the backbone weights, if any")
    parser.add_argument("--dataset", default=None, help="dataset id for the card (default: from train_settings.json)")


def run_push_from_args(args: argparse.Namespace) -> int:
    try:
        result = push_to_hub(args.model, args.repo_id, private=args.private, revision=args.revision,
                             metrics_path=args.metrics, dry_run=args.dry_run, commit_message=args.commit_message,
                             license=args.license, pipeline_tag=args.pipeline_tag, base_model=args.base_model,
                             dataset=args.dataset)
    except (ModelFolderError, FileExistsError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="push_to_hub.py", description="Upload a trained LADMIM detector to the Hub.")
    add_push_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_push_from_args(build_parser().parse_args(argv))


__all__ = [
    "AUTO_MAP",
    "CODE_FILES",
    "CUSTOM_PIPELINES",
    "ConfigFieldsWarning",
    "ModelFolderError",
    "PIPELINE_TASK",
    "add_pipeline_to_folder",
    "add_push_arguments",
    "build_model_card",
    "check_code_files",
    "check_safetensors_file",
    "find_metrics",
    "load_config",
    "load_model",
    "prepare_upload_folder",
    "push_to_hub",
    "resolve_model_folder",
    "run_push_from_args",
    "unknown_config_fields",
    "weight_files",
]
