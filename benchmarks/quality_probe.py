"""Where does logical-detection quality come from? A fast probe of the tokenizer's codes and the predictor.

Trains a tokenizer and per-category predictors from cached backbone features with plain loops (no
checkpoints, no calibration, minutes instead of the full `make demo`), then reports per category:

- `structural` / `structural_no_ot`: image AUROC of the tokenizer's structural score on structural
  anomalies, with and without the OT term;
- `position_prior_logical`: AUROC on logical anomalies of a context-free oracle, the mean
  negative log-frequency of each cell's code among the training images at that cell;
- `global_histogram_logical`: AUROC of the L1 distance from an image's whole-grid code histogram
  to its nearest training image's (what the codes can express about counts at all);
- `logical` / `logical_per_defect`: the predictor's logical score (the mean over masks of the
  config's `histogram_distance`), the method's logical branch, overall and per logical defect type;
- `logical_l1` / `logical_mmd`: the same predictions scored with the L1 (the paper) and with the
  kernel distance over the codebook vectors (`histogram_distance="codebook_mmd"`); one of them
  equals `logical`;
- `defect_mask_logical` / `defect_mask_per_defect`: the predictor scored with one mask that hides
  exactly a logical anomaly's ground-truth region (grown by one cell), against the good test images
  under the same mask: per anomaly the fraction of good images with a smaller score (the config's
  distance), averaged. Where
  this stays near 0.5, even perfect mask placement would not reveal the defect: the predictor (or
  the codes) miss the rule, and no mask sampling or score aggregation can recover it;
- `predictor_loss`: final per-sample training loss of the configured `loss_type` (`predictor_loss_type`):
  0..2L for `l1`, a cross-entropy summed over levels (about L ln K untrained) for `token_ce`.

If the two oracles sit near 0.5 the codes do not carry the rule and no predictor can score it;
if they are high and `logical` is low, the predictor is the bottleneck.

    python benchmarks/quality_probe.py --data_root data/synthloco                      # default config
    python benchmarks/quality_probe.py --data_root data/synthloco --set model.tokenizer_config.codebook_size=16
    python benchmarks/quality_probe.py --tiny                                           # seconds, for tests

Predictor-only comparisons can reuse one trained tokenizer: `--tokenizer_cache FILE` saves its
weights with the settings that produced them and loads them on the next run with the same settings
(a run with other tokenizer settings retrains and overwrites the file).

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ladmim_hf.data import evaluation_rows, find_layout, select_categories  # noqa: E402
from ladmim_hf.evaluation import per_defect_aurocs  # noqa: E402
from ladmim_hf.metrics import loco_image_aurocs  # noqa: E402
from ladmim_hf.models.modeling_ladmim_utils import code_histograms, kernel_histogram_distance  # noqa: E402
from ladmim_hf.scoring import extract_features  # noqa: E402
from ladmim_hf.training import build_model, load_settings  # noqa: E402
from ladmim_hf.models.image_processing_ladmim import LadmimImageProcessor  # noqa: E402


def defect_cells(regions: list[np.ndarray], grid: int) -> torch.Tensor:
    """`(grid * grid,)` bool: the cells that any pixel of the ground-truth regions `(H, W)` touches."""
    if not regions:
        return torch.zeros(grid * grid, dtype=torch.bool)
    union = torch.from_numpy(np.any(np.stack([np.asarray(r, dtype=bool) for r in regions]), axis=0)).float()
    return (torch.nn.functional.adaptive_max_pool2d(union[None, None], grid)[0, 0] > 0).flatten()


def cached_features(model, settings, categories: list[str], cache_path: Path) -> dict:
    """Raw backbone features of train and test images per category (with the test images' anomaly and
    defect types and defect cells), cached on disk; tensors, strings and lists only, so it loads with
    weights_only."""
    cache = {}
    if cache_path.is_file():
        try:
            cache = torch.load(cache_path, weights_only=True)
        except pickle.UnpicklingError:
            print(f"rebuilding {cache_path}: written by an older version of this probe", file=sys.stderr)
    processor = LadmimImageProcessor(size=model.config.tokenizer_config.image_size)
    changed = False
    grid = model.config.tokenizer_config.grid_size
    for category in categories:
        for split in ("train", "test"):
            key = f"{split}/{category}"
            cells = cache.get(key, {}).get("defect_cells")
            needs_cells = split == "test" and (cells is None or cells.shape[-1] != grid * grid)
            if key in cache and not needs_cells:
                continue
            if split == "train":
                paths, types, defects = find_layout(settings.data_root).paths(category, "train"), [], []
            else:
                rows = evaluation_rows(find_layout(settings.data_root), category)
                paths = [r["path"] for r in rows]
                types, defects = [r["anomaly_type"] for r in rows], [r["defect_type"] for r in rows]
            if key in cache:  # a cache from before the defect cells: add them, keep the features
                features = cache[key]["features"]
            else:
                features = extract_features(model.tokenizer, processor, paths, settings.feature_batch_size, f"features {key}")
            cache[key] = {"features": features, "types": types, "defects": defects}
            if split == "test":
                cache[key]["defect_cells"] = torch.stack([defect_cells(r["regions"], grid) for r in rows])
            changed = True
    if changed:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(cache, cache_path)
    return cache


def train_tokenizer(tokenizer, features: torch.Tensor, class_ids: torch.Tensor, steps: int, lr: float,
                    batch_size: int, seed: int) -> float:
    if tokenizer.config.standardize_features:
        tokenizer.set_feature_statistics(features)
    params = [p for p in tokenizer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    tokenizer.train()
    loss = torch.tensor(float("nan"))
    for step in tqdm(range(steps), desc="tokenizer", unit="step", leave=False):
        if step == int(0.8 * steps):  # HVQ-Trans step schedule
            for group in optimizer.param_groups:
                group["lr"] *= 0.1
        index = torch.randint(0, len(features), (min(batch_size, len(features)),), generator=generator)
        out = tokenizer(features=features[index], category=class_ids[index])
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        loss = out.reconstruction_loss.detach()
    tokenizer.eval()
    return float(loss)


def train_predictor(model, category: str, features: torch.Tensor, codes: torch.Tensor, steps: int, lr: float,
                    batch_size: int, seed: int) -> float:
    predictor = model.predictor_for(category)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, int(0.05 * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    masks_for = model.mask_generator(training=True)
    generator = torch.Generator().manual_seed(seed)
    kernel = None
    if predictor.config.loss_type == "codebook_mmd":
        kernel = model.tokenizer.code_kernel(category, model.config.kernel_bandwidth)
    predictor.train()
    per_sample = float("nan")
    for step in tqdm(range(steps), desc=f"predictor {category}", unit="step", leave=False):
        size = min(batch_size, len(features))
        index = torch.randint(0, len(features), (size,), generator=generator)
        masks = masks_for(size, seed=[seed * 1_000_003 + step * size + i for i in range(size)])
        out = predictor(features[index], masks, labels=codes[index], code_kernel=kernel)
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(predictor.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        per_sample = float(out.loss.detach()) / (size if predictor.config.loss_reduction == "sum" else 1)
    predictor.eval()
    return per_sample


def trained_tokenizer(tokenizer, features: torch.Tensor, class_ids: torch.Tensor, args, categories: list[str]) -> float:
    """Train the tokenizer, or load it from `args.tokenizer_cache` when that file was written with the
    same settings; returns the final reconstruction loss."""
    fingerprint = {"config": tokenizer.config.to_dict(), "categories": categories, "steps": args.tokenizer_steps,
                   "lr": args.tokenizer_lr, "batch_size": args.batch_size, "seed": args.seed,
                   "num_features": len(features)}
    fingerprint["config"].pop("transformers_version", None)
    cache = Path(args.tokenizer_cache) if args.tokenizer_cache else None
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if json.loads(saved["fingerprint"]) == json.loads(json.dumps(fingerprint)):
            tokenizer.load_state_dict(saved["state"])
            tokenizer.eval()
            return float(saved["reconstruction_loss"])
    torch.manual_seed(args.seed)
    reconstruction = train_tokenizer(tokenizer, features, class_ids, args.tokenizer_steps, args.tokenizer_lr,
                                     args.batch_size, args.seed)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(cache.name + ".tmp")
        torch.save({"fingerprint": json.dumps(fingerprint), "state": tokenizer.state_dict(),
                    "reconstruction_loss": reconstruction}, temporary)
        temporary.replace(cache)
    return reconstruction


@torch.no_grad()
def probe_category(model, category: str, train: dict, test: dict, args) -> dict:
    tokenizer = model.tokenizer
    levels, size = tokenizer.config.num_levels, tokenizer.config.codebook_size
    types, defects = test["types"], test["defects"]
    train_codes = tokenizer.encode(features=train["features"], category=category)
    if tokenizer.config.residual_normalization == "cell_channel":
        tokenizer.fit_residual_statistics(train["features"], category)
    tokens = tokenizer.tokenize(features=test["features"], category=category, use_ot=True)
    no_ot = tokenizer.tokenize(features=test["features"], category=category, use_ot=False)["structural_score"]
    # Context-free oracle: how unusual is each cell's code at that cell?
    prior = torch.zeros(len(types))
    for level in range(levels):
        frequency = torch.nn.functional.one_hot(train_codes[:, level], size).float().mean(0)  # (N, K)
        seen = frequency.gather(1, tokens["codes"][:, level].T).T  # (B, N)
        prior += -(seen + 1e-3).log().mean(1)
    everything = lambda n: torch.ones(n, train_codes.shape[-1], dtype=torch.bool)  # noqa: E731
    train_hist = code_histograms(train_codes, everything(len(train_codes)), size).flatten(1)
    test_hist = code_histograms(tokens["codes"], everything(len(types)), size).flatten(1)
    global_hist = torch.cdist(test_hist, train_hist, p=1).min(1).values
    result = {
        "structural": loco_image_aurocs(tokens["structural_score"].numpy(), types)["auroc_structural"],
        "structural_no_ot": loco_image_aurocs(no_ot.numpy(), types)["auroc_structural"],
        "position_prior_logical": loco_image_aurocs(prior.numpy(), types)["auroc_logical"],
        "global_histogram_logical": loco_image_aurocs(global_hist.numpy(), types)["auroc_logical"],
        "codes_used": [int(train_codes[:, level].unique().numel()) for level in range(levels)],
    }
    with torch.enable_grad():
        standardised = tokenizer.standardize(train["features"])
        result["predictor_loss"] = train_predictor(model, category, standardised, train_codes, args.predictor_steps,
                                                   args.predictor_lr, args.predictor_batch_size or args.batch_size,
                                                   args.seed)
    out = model(features=test["features"], category=category, num_masks=args.num_masks, seed=args.seed,
                return_histograms=True)
    logical = out.logical_score.numpy()
    aurocs = loco_image_aurocs(logical, types)
    result["logical"], result["logical_on_structural"] = aurocs["auroc_logical"], aurocs["auroc_structural"]
    difference = out.predicted_histograms - out.target_histograms
    kernel = model.tokenizer.code_kernel(category, model.config.kernel_bandwidth)
    for name, distance in (("logical_l1", difference.abs().sum((-1, -2))),
                           ("logical_mmd", kernel_histogram_distance(difference, kernel))):
        result[name] = loco_image_aurocs(distance.mean(1).numpy(), types)["auroc_logical"]
    per_defect = per_defect_aurocs({"logical": logical}, types, defects)
    result["logical_per_defect"] = {name: entry["logical"] for name, entry in per_defect.items()
                                    if entry["anomaly_type"] == "logical"}
    result.update(defect_mask_scores(model, category, tokens, types, defects, test["defect_cells"]))
    return result


def defect_mask_scores(model, category: str, tokens: dict, types: list[str], defects: list[str],
                       cells: torch.Tensor) -> dict:
    """Score each logical anomaly with one mask over its defect cells `(B, N)` grown by one cell, and
    the good images under the same mask; see `defect_mask_logical` in the module docstring."""
    grid = model.config.tokenizer_config.grid_size
    good = [i for i, t in enumerate(types) if t == "good"]
    per_defect: dict[str, list[float]] = {}
    for i, (kind, defect) in enumerate(zip(types, defects)):
        if kind != "logical" or not good or not cells[i].any():
            continue
        grown = torch.nn.functional.max_pool2d(cells[i].view(1, 1, grid, grid).float(), 3, 1, 1).flatten() > 0
        index = [i] + good
        scores = model.logical_scores(tokens["features"][index], tokens["codes"][index],
                                      grown.expand(len(index), 1, -1), category)[0][:, 0]
        below = (scores[1:] < scores[0]).float().mean() + 0.5 * (scores[1:] == scores[0]).float().mean()
        per_defect.setdefault(defect, []).append(float(below))
    everything = [v for values in per_defect.values() for v in values]
    return {"defect_mask_logical": float(np.mean(everything)) if everything else float("nan"),
            "defect_mask_per_defect": {name: float(np.mean(v)) for name, v in per_defect.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "synthloco-cpu.yaml"))
    parser.add_argument("--data_root", default="data/synthloco")
    parser.add_argument("--categories", nargs="+", default=None)
    parser.add_argument("--cache", default=None, help="feature cache file (default: <data_root>/../probe_features.pt)")
    parser.add_argument("--tokenizer_steps", type=int, default=400)
    parser.add_argument("--tokenizer_lr", type=float, default=1e-3)
    parser.add_argument("--predictor_steps", type=int, default=150)
    parser.add_argument("--predictor_lr", type=float, default=1e-3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--predictor_batch_size", type=int, default=None, help="default: --batch_size")
    parser.add_argument("--tokenizer_cache", default=None,
                        help="reuse a tokenizer trained with the same settings (saved here after training)")
    parser.add_argument("--num_masks", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config settings, as in train.py")
    parser.add_argument("--tiny", action="store_true", help="generate --small data and run a few steps (tests)")
    args = parser.parse_args(argv)
    # The uncalibrated-category warning is expected here; in-process callers (tests) get their
    # logging back afterwards.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return _probe(args)
    finally:
        logging.disable(previous)


def _probe(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    workdir = None
    if args.tiny:
        from ladmim_hf.data.synthetic import generate_synthloco

        workdir = tempfile.TemporaryDirectory()
        args.data_root = str(Path(workdir.name) / "synth")
        args.categories = args.categories or ["pushpins"]
        generate_synthloco(args.data_root, seed=0, small=True, categories=args.categories)
        args.tokenizer_steps, args.predictor_steps, args.batch_size, args.num_masks = 3, 3, 4, 2
        overrides.update({"model.tokenizer_config.image_size": 64, "model.tokenizer_config.grid_size": 4,
                          "model.tokenizer_config.score_filter_size": 8,
                          # the config's mask sizes are cells of its 14 x 14 grid: the paper's training
                          # fraction on 4 x 4, for scoring too
                          "model.train_num_masked": 4, "model.train_min_block": 1,
                          "model.score_num_masked": 4, "model.score_min_block": 1})
    settings = load_settings(args.config, {"data_root": args.data_root, **overrides})
    categories = select_categories(find_layout(settings.data_root), args.categories or settings.categories)
    torch.manual_seed(args.seed)
    model = build_model(settings, categories).eval()
    cache_path = Path(args.cache) if args.cache else Path(settings.data_root).resolve().parent / f"probe_features_{Path(settings.data_root).name}.pt"
    if args.tiny:
        cache_path = Path(workdir.name) / "features.pt"
    started = time.time()
    cache = cached_features(model, settings, categories, cache_path)
    train_features = torch.cat([cache[f"train/{c}"]["features"] for c in categories])
    class_ids = torch.cat([torch.full((len(cache[f"train/{c}"]["features"]),), i) for i, c in enumerate(categories)])
    reconstruction = trained_tokenizer(model.tokenizer, train_features, class_ids, args, categories)
    per_category = {c: probe_category(model, c, cache[f"train/{c}"], cache[f"test/{c}"], args) for c in categories}
    keys = ["structural", "structural_no_ot", "position_prior_logical", "global_histogram_logical", "logical", "logical_l1",
            "logical_mmd", "logical_on_structural", "defect_mask_logical"]
    mean = {k: float(np.nanmean([per_category[c][k] for c in categories])) for k in keys}
    result = {"categories": per_category, "mean": mean, "tokenizer_reconstruction_loss": reconstruction,
              "tokenizer_steps": args.tokenizer_steps, "predictor_steps": args.predictor_steps, "num_masks": args.num_masks,
              "predictor_batch_size": args.predictor_batch_size or args.batch_size,
              "predictor_loss_type": model.config.predictor_config.loss_type,
              "histogram_distance": model.config.histogram_distance,
              "overrides": overrides, "seconds": round(time.time() - started, 1)}
    print(f"quality probe: logical {mean['logical']:.3f} (L1 {mean['logical_l1']:.3f}, kernel distance {mean['logical_mmd']:.3f}; defect-placed mask "
          f"{mean['defect_mask_logical']:.3f}; oracles: position prior {mean['position_prior_logical']:.3f}, "
          f"global histogram {mean['global_histogram_logical']:.3f}), structural {mean['structural']:.3f} "
          f"(no OT {mean['structural_no_ot']:.3f}), reconstruction loss {reconstruction:.3f}, {result['seconds']} s")
    print(json.dumps(result))
    if workdir is not None:
        workdir.cleanup()
    return result


if __name__ == "__main__":
    main()
