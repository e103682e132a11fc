"""Loading a LADMIM detector from a folder or Hub id with errors that say what is wrong.

:func:`load_model` checks, in order: the folder (or repo) exists (:func:`resolve_model_folder`), its config is a
LADMIM detector config (:func:`load_config`), the code files and ``auto_map`` (:func:`~ladmim_hf.hub.folder.check_code_files`),
the weights are complete, and they fit the config.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from .folder import (
    _REPO_ID,
    CONFIG_NAME,
    ConfigFieldsWarning,
    ModelFolderError,
    _listing,
    _read_json,
    _strip_fields,
    check_code_files,
    unknown_config_fields,
    weight_files,
)


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
    from ..models.configuration_ladmim import LadmimConfig

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
    from ..models.modeling_ladmim import LadmimForAnomalyDetection

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
