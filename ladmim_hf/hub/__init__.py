"""Sharing LADMIM models on the Hugging Face Hub: folder preparation, model card, upload, checked loading.

`python scripts/push_to_hub.py --model OUTPUT_DIR/model --repo_id org/name [--private] [--revision REV]
[--metrics PATH] [--dry_run DIR]` (or `ladmim push ...`) uploads exactly the folder that
:func:`prepare_upload_folder` builds:

* ``config.json`` with ``auto_map`` (AutoConfig/AutoModel) and ``custom_pipelines`` (the
  ``image-anomaly-detection`` pipeline),
* ``model.safetensors`` (or its shards and index),
* the flat code files: every module of ``ladmim_hf/models/`` (:data:`CODE_FILES`, read from that folder),
  so they always belong together,
* ``preprocessor_config.json`` (written with the model's input size when the folder has none),
* ``README.md``: the generated model card (:func:`build_model_card`).

The token is never an argument: ``huggingface_hub`` reads ``HF_TOKEN`` or the cached ``hf auth login``.

:func:`load_model` loads a folder or Hub id with errors that say what is wrong (no config, not a LADMIM
folder, missing code files, unknown config fields, missing or truncated weights, weights that do not fit).

Where things live:

* :mod:`.folder`: the model-folder contract (file names, the shipped code files, ``auto_map``,
  ``custom_pipelines``), :func:`add_pipeline_to_folder` and the folder checks;
* :mod:`.loading`: :func:`resolve_model_folder`, :func:`load_config`, :func:`load_model`;
* :mod:`.card`: the model card (:func:`build_model_card`; its results table is
  :func:`ladmim_hf.evaluation.results_table`);
* :mod:`.push`: :func:`prepare_upload_folder`, :func:`push_to_hub` and the command line.
"""

from __future__ import annotations

from .card import HVQ_CITATION, LADMIM_CITATION, build_model_card, find_metrics
from .folder import (
    AUTO_MAP,
    CODE_FILES,
    CONFIG_NAME,
    CUSTOM_PIPELINES,
    DEFAULT_PIPELINE_TAG,
    MODEL_CODE_FILES,
    MODELS_DIR,
    PIPELINE_FILE,
    PIPELINE_TASK,
    PROCESSOR_AUTO_MAP,
    PROCESSOR_NAME,
    README_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    ConfigFieldsWarning,
    ModelFolderError,
    add_pipeline_to_folder,
    check_code_files,
    check_safetensors_file,
    unknown_config_fields,
    weight_files,
)
from .loading import load_config, load_model, resolve_model_folder
from .push import add_push_arguments, build_parser, main, prepare_upload_folder, push_to_hub, run_push_from_args

__all__ = [
    "AUTO_MAP",
    "CODE_FILES",
    "CONFIG_NAME",
    "CUSTOM_PIPELINES",
    "ConfigFieldsWarning",
    "DEFAULT_PIPELINE_TAG",
    "HVQ_CITATION",
    "LADMIM_CITATION",
    "MODEL_CODE_FILES",
    "ModelFolderError",
    "MODELS_DIR",
    "PIPELINE_FILE",
    "PIPELINE_TASK",
    "PROCESSOR_AUTO_MAP",
    "PROCESSOR_NAME",
    "README_NAME",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "add_pipeline_to_folder",
    "add_push_arguments",
    "build_model_card",
    "build_parser",
    "check_code_files",
    "check_safetensors_file",
    "find_metrics",
    "load_config",
    "load_model",
    "main",
    "prepare_upload_folder",
    "push_to_hub",
    "resolve_model_folder",
    "run_push_from_args",
    "unknown_config_fields",
    "weight_files",
]
