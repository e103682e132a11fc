"""The model-folder contract: what a shareable LADMIM folder holds, and the checks that enforce it.

A folder that `trust_remote_code` users can load holds ``config.json`` (with :data:`AUTO_MAP` and, for the
pipeline, :data:`CUSTOM_PIPELINES`), ``model.safetensors`` (or shards and an index), exactly the code files in
:data:`CODE_FILES` and ``preprocessor_config.json``. :func:`add_pipeline_to_folder` adds the pipeline to a saved
folder; :func:`check_code_files`, :func:`weight_files` and :func:`unknown_config_fields` check a folder
(:mod:`ladmim_hf.hub.loading` runs them before loading).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

# Every file in ladmim_hf/models/ is shipped with the weights (flat, importing each other only relatively), and
# nothing else is: this folder is the trust_remote_code boundary, and the lists below are read from it.
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PROCESSOR_NAME = "preprocessor_config.json"
README_NAME = "README.md"
PIPELINE_FILE = "pipeline_ladmim.py"
PIPELINE_TASK = "image-anomaly-detection"
CODE_FILES = tuple(sorted(p.name for p in MODELS_DIR.glob("*.py") if p.name != "__init__.py"))
PROCESSOR_CODE_FILES = ("image_processing_ladmim.py", "imaging_ladmim.py")  # the image processor and its reader
MODEL_CODE_FILES = tuple(name for name in CODE_FILES if name != PIPELINE_FILE)  # what loading a model needs
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
    shutil.copyfile(MODELS_DIR / PIPELINE_FILE, folder / PIPELINE_FILE)
    if not (folder / "image_processing_ladmim.py").is_file():
        shutil.copyfile(MODELS_DIR / "image_processing_ladmim.py", folder / "image_processing_ladmim.py")
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
    from ..models.configuration_ladmim import LadmimConfig, LadmimPredictorConfig, LadmimTokenizerConfig

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
    needed = [name for name in MODEL_CODE_FILES if name not in PROCESSOR_CODE_FILES]
    processor_path = folder / PROCESSOR_NAME
    processor_map = (_read_json(processor_path).get("auto_map") or {}) if processor_path.is_file() else {}
    if config.get("custom_pipelines") or processor_map:
        needed += PROCESSOR_CODE_FILES  # the processor's class; the pipeline imports it too
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
