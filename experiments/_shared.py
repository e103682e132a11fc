"""What the quality probes in `experiments/` share: their common options and the output convention.

Every probe prints a human summary (a line or a table) and then, as the last line of stdout, one JSON
object; progress goes to stderr. A quality figure does not depend on the machine's load, so the JSON
records only the torch version and thread count next to the probe's own keys.

(Not called `_common.py`: `benchmarks/_common.py` has that module name, and a test session that
imports both must not get one for the other from `sys.modules`.)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every probe takes: `--seed` and `--threads`."""
    out = argparse.ArgumentParser(description=description)
    out.add_argument("--seed", type=int, default=0, help="the mask (and training) seed")
    out.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return out


def use_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def predictor_alone(model) -> None:
    """Let a detector score cached tokenizer features with its trained predictor alone: the retrieval off, and
    the memory-bank and global branches (the global one may read its own features, `global_image_size`) dropped from
    the model and its fusion. For the probes that study the logical branch's predictor."""
    config = model.config
    model.memory_bank = model.global_branch = model.retrieval = model.retrieval_parts = None
    config.logical_retrieval_neighbours, config.memory_bank_size, config.global_branch = 0, 0, False
    config.global_image_size = None
    config.fused_branches = [b for b in config.fused_branches if b in ("logical", "structural")] or ["logical"]


def progress(message: str) -> None:
    """A progress line on stderr, so stdout stays summary + JSON."""
    print(message, file=sys.stderr, flush=True)


def category_mean(per_category: dict, part: str, key: str) -> float:
    """The mean over categories of `per_category[category][part][key]` (e.g. part "fused", key "auroc_logical")."""
    return sum(entry[part][key] for entry in per_category.values()) / len(per_category)


def image_aurocs(scores: torch.Tensor, types: list[str]) -> dict:
    """`{"auroc_logical", "auroc_structural"}` of image scores `(N,)` against anomaly types, to 4 decimals."""
    from ladmim_hf.metrics import loco_image_aurocs

    values = loco_image_aurocs(scores.double().numpy(), types)
    return {k: round(float(values[k]), 4) for k in ("auroc_logical", "auroc_structural")}


def report(summary: str, payload: dict) -> None:
    """Print `summary`, then `payload` (with the torch version and thread count) as the last stdout line."""
    print(summary, flush=True)
    print(json.dumps({**payload, "torch": torch.__version__, "threads": torch.get_num_threads()}), flush=True)
