"""Upload: the exact upload folder (:func:`prepare_upload_folder`), :func:`push_to_hub`, and its command line
(`scripts/push_to_hub.py`, `ladmim push`: :func:`add_push_arguments`, :func:`run_push_from_args`, :func:`main`).

The token is never an argument: ``huggingface_hub`` reads ``HF_TOKEN`` or the cached ``hf auth login``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from .card import _optional_json, build_model_card, find_metrics
from .folder import (
    _REPO_ID,
    AUTO_MAP,
    CODE_FILES,
    CONFIG_NAME,
    DEFAULT_PIPELINE_TAG,
    MODELS_DIR,
    PROCESSOR_AUTO_MAP,
    PROCESSOR_NAME,
    README_NAME,
    ConfigFieldsWarning,
    ModelFolderError,
    _read_json,
    _write_json,
    add_pipeline_to_folder,
    weight_files,
)
from .loading import load_config, load_model

logger = logging.getLogger("ladmim_hf.hub")


def prepare_upload_folder(model_dir: str | os.PathLike, out_dir: str | os.PathLike, repo_id: str,
                          metrics_path: str | os.PathLike | None = None, license: str | None = None,
                          pipeline_tag: str = DEFAULT_PIPELINE_TAG, base_model: str | None = None,
                          dataset: str | None = None, verify: bool = True) -> Path:
    """Write into `out_dir` (empty or new) exactly what would be uploaded for `model_dir`. Returns `out_dir`."""
    from ..models.image_processing_ladmim import LadmimImageProcessor

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
        shutil.copyfile(MODELS_DIR / name, out / name)
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
    """Options of `ladmim push` and `scripts/push_to_hub.py` (the token is never an argument)."""
    from ..cli import add_model_option

    add_model_option(parser, local_only=True)
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
    """The `ladmim push` options alone (no subcommand)."""
    from ..cli import subcommand_parser

    return subcommand_parser("push")


def main(argv: list[str] | None = None) -> int:
    """`ladmim push ARGV` (ARGV defaults to the command line's)."""
    from ..cli import run_subcommand

    return run_subcommand("push", argv)
