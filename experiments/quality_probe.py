"""Where does logical-detection quality come from? A fast probe of the tokenizer's codes and the predictor.

Trains a tokenizer and per-category predictors from cached backbone features with training's own
stages 1 and 2 (`ladmim_hf.training.pipeline.train_tokenizer` / `train_predictors`, into a temporary
run folder: the config's optimiser, schedule, gradient clipping and training masks, for
`--tokenizer_steps` / `--predictor_steps` steps; no calibration, minutes instead of the full
`make demo`), then reports per category:

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
- `predictor_loss`: per-sample training loss of the configured `loss_type` (`predictor_loss_type`) over
  the last tenth of the steps: 0..2L for `l1`, a cross-entropy summed over levels (about L ln K
  untrained) for `token_ce`.

`tokenizer_reconstruction_loss` is the trained tokenizer's mean squared reconstruction error over all
training features (eval mode); `stages` records the training settings both stages ran with.

If the two oracles sit near 0.5 the codes do not carry the rule and no predictor can score it;
if they are high and `logical` is low, the predictor is the bottleneck.

    python experiments/quality_probe.py --data_root data/synthloco                      # default config
    python experiments/quality_probe.py --data_root data/synthloco --set model.tokenizer_config.codebook_size=16
    python experiments/quality_probe.py --tiny                                           # seconds, for tests

`--shift_copies N` adds N translated copies of every training image to the predictor's training set
(the tokenizer still trains on the originals): each copy is the image moved by a whole number of
pixels, up to `--max_shift` along each axis (drawn from `--seed`; the pixels that enter repeat the
border), and its features extracted again. A small translation keeps every logical rule true, so this tests
whether the predictor gains from more views of the same 150 scenes; `predictor_training_grids`
records the set's size.

Predictor-only comparisons can reuse one trained tokenizer: `--tokenizer_cache FILE` saves its
weights with the settings that produced them and loads them on the next run with the same settings
(a run with other tokenizer settings retrains and overwrites the file).

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from ladmim_hf.data import evaluation_rows, find_layout
from ladmim_hf.evaluation import per_defect_aurocs
from ladmim_hf.metrics import loco_image_aurocs
from ladmim_hf.models.image_processing_ladmim import LadmimImageProcessor
from ladmim_hf.models.modeling_ladmim_utils import code_histograms, kernel_histogram_distance, translate
from ladmim_hf.scoring import extract_features
from ladmim_hf.training import build_model, load_settings
from ladmim_hf.training.pipeline import open_run, train_predictors, train_tokenizer

import _shared as S


@torch.no_grad()
def shifted_features(model, paths: list[str], copies: int, max_shift: int, seed: int, batch_size: int = 32) -> torch.Tensor:
    """Backbone features `(copies * len(paths), C, g, g)` of `copies` translations of each image (up to
    `max_shift` pixels along each axis, drawn from `seed`), copy-major: the first `len(paths)` rows are
    the first copy of every image."""
    processor = LadmimImageProcessor(size=model.config.tokenizer_config.image_size)
    generator = torch.Generator().manual_seed(seed)
    moves = torch.randint(-max_shift, max_shift + 1, (copies, len(paths), 2), generator=generator).tolist()
    rows = [[] for _ in range(copies)]
    for start in range(0, len(paths), batch_size):
        pixel_values = processor(paths[start:start + batch_size])["pixel_values"]  # each image read once
        for copy in range(copies):
            moved = torch.cat([translate(image[None], dx, dy)
                               for image, (dx, dy) in zip(pixel_values, moves[copy][start:start + batch_size])])
            rows[copy].append(model.tokenizer.extract_features(moved.to(model.device)).float().cpu())
    return torch.cat([row for copy_rows in rows for row in copy_rows])


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


def stage_overrides(args) -> dict:
    """The probe's arguments as training settings: each stage trains `--*_steps` steps (one checkpoint,
    at the end, into the probe's temporary run folder); learning rates and batch sizes are the
    config's unless given. Everything else (AdamW betas and weight decay, warm-up, schedule, gradient
    clipping, the training masks) is the config's, run by `ladmim_hf.training`."""
    overrides = {"seed": args.seed,
                 "tokenizer.max_steps": args.tokenizer_steps, "tokenizer.checkpoint_every": args.tokenizer_steps,
                 "tokenizer.learning_rate": args.tokenizer_lr, "tokenizer.batch_size": args.batch_size,
                 "predictor.max_steps": args.predictor_steps, "predictor.checkpoint_every": args.predictor_steps,
                 "predictor.learning_rate": args.predictor_lr,
                 "predictor.batch_size": args.predictor_batch_size or args.batch_size}
    return {key: value for key, value in overrides.items() if value is not None}


@torch.no_grad()
def reconstruction_loss(tokenizer, features: torch.Tensor, class_ids: torch.Tensor, chunk: int = 64) -> float:
    """Mean squared reconstruction error of the (eval-mode) tokenizer over all `features`."""
    total = 0.0
    for start in range(0, len(features), chunk):
        rows = features[start:start + chunk]
        out = tokenizer(features=rows, category=class_ids[start:start + chunk], update_codebooks=False,
                        return_maps=False)
        total += float(out.reconstruction_loss) * len(rows)
    return total / len(features)


def trained_tokenizer(run, model, stage_cache: dict, settings, args, categories: list[str]) -> None:
    """Train the tokenizer with training's stage 1 (`ladmim_hf.training.pipeline.train_tokenizer`), or
    load it from `args.tokenizer_cache` when that file was written with the same settings."""
    tokenizer = model.tokenizer
    fingerprint = {"config": tokenizer.config.to_dict(), "categories": categories, "stage": settings.tokenizer.__dict__,
                   "seed": settings.seed, "num_features": sum(len(stage_cache[f"train/{c}"]) for c in categories)}
    fingerprint["config"].pop("transformers_version", None)
    fingerprint = json.dumps(fingerprint, sort_keys=True)
    cache = Path(args.tokenizer_cache) if args.tokenizer_cache else None
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved.get("fingerprint") == fingerprint:
            tokenizer.load_state_dict(saved["state"])
            tokenizer.eval()
            return
    train_tokenizer(run, model, stage_cache)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache.with_name(cache.name + ".tmp")
        torch.save({"fingerprint": fingerprint, "state": model.tokenizer.state_dict()}, temporary)
        temporary.replace(cache)


@torch.no_grad()
def probe_category(model, category: str, train: dict, test: dict, args, predictor_loss: float) -> dict:
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
        "predictor_loss": predictor_loss,
    }
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
    parser = S.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="synthloco-cpu", help="training config (a file or a built-in name)")
    parser.add_argument("--data_root", default="data/synthloco")
    parser.add_argument("--categories", nargs="+", default=None)
    parser.add_argument("--cache", default=None, help="feature cache file (default: <data_root>/../probe_features.pt)")
    parser.add_argument("--tokenizer_steps", type=int, default=400)
    parser.add_argument("--tokenizer_lr", type=float, default=None, help="default: the config's")
    parser.add_argument("--predictor_steps", type=int, default=150)
    parser.add_argument("--predictor_lr", type=float, default=None, help="default: the config's")
    parser.add_argument("--batch_size", type=int, default=None, help="both stages (default: the config's)")
    parser.add_argument("--predictor_batch_size", type=int, default=None, help="default: --batch_size")
    parser.add_argument("--tokenizer_cache", default=None,
                        help="reuse a tokenizer trained with the same settings (saved here after training)")
    parser.add_argument("--num_masks", type=int, default=10)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config settings, as in train.py")
    parser.add_argument("--shift_copies", type=int, default=0,
                        help="translated copies of each training image added to the predictor's training set")
    parser.add_argument("--max_shift", type=int, default=8, help="largest translation of a copy, in input pixels")
    parser.add_argument("--tiny", action="store_true", help="generate --small data and run a few steps (tests)")
    args = parser.parse_args(argv)
    if args.shift_copies < 0 or args.max_shift < 0:
        parser.error("--shift_copies and --max_shift must be 0 or more")
    # The uncalibrated-category warning is expected here; in-process callers (tests) get their
    # logging back afterwards.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return _probe(args)
    finally:
        logging.disable(previous)


def _probe(args) -> dict:
    S.use_threads(args.threads)
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
                          "model.score_num_masked": 4, "model.score_min_block": 1,
                          "model.logical_retrieval_num_masked": 4, "model.logical_retrieval_min_block": 2,
                          "model.logical_retrieval_rank": 4})
    workdir = workdir or tempfile.TemporaryDirectory()  # the training run's folder: checkpoints, stages
    settings = load_settings(args.config, {"data_root": args.data_root, "categories": args.categories, **overrides,
                                           **stage_overrides(args), "output_dir": str(Path(workdir.name) / "run")})
    settings.log_with = None
    run = open_run(settings, resume=False)
    categories = run.categories
    torch.manual_seed(args.seed)
    model = build_model(settings, categories).eval()
    model.config.logical_pose_step = 0  # the probe scores cached features: the image as it is
    S.predictor_alone(model)  # the probe studies the trained predictor
    cache_path = Path(args.cache) if args.cache else Path(settings.data_root).resolve().parent / f"probe_features_{Path(settings.data_root).name}.pt"
    if args.tiny:
        cache_path = Path(workdir.name) / "features.pt"
    started = time.time()
    cache = cached_features(model, settings, categories, cache_path)
    # Training's feature cache: stage 2 also encodes "validation/<category>" (it never trains on it);
    # the training features stand in for it.
    stage_cache = {f"{split}/{c}": cache[f"train/{c}"]["features"] for c in categories for split in ("train", "validation")}
    trained_tokenizer(run, model, stage_cache, settings, args, categories)
    train_features = torch.cat([stage_cache[f"train/{c}"] for c in categories])
    class_ids = torch.cat([torch.full((len(stage_cache[f"train/{c}"]),), i) for i, c in enumerate(categories)])
    reconstruction = reconstruction_loss(model.tokenizer, train_features, class_ids)
    if args.shift_copies > 0:
        for c in categories:
            moved = shifted_features(model, find_layout(settings.data_root).paths(c, "train"), args.shift_copies,
                                     args.max_shift, args.seed)
            stage_cache[f"train/{c}"] = torch.cat([stage_cache[f"train/{c}"], moved])
    train_predictors(run, model, stage_cache)
    per_category = {}
    for c in categories:
        name = "shared" if model.config.shared_predictor else c
        loss = run.summary[f"predictor/{name}"]["final_loss"]  # per step: summed over the batch, or its mean
        if model.predictors[name].config.loss_reduction == "sum":
            loss /= min(settings.predictor.batch_size, len(train_features if name == "shared" else stage_cache[f"train/{c}"]))
        per_category[c] = probe_category(model, c, cache[f"train/{c}"], cache[f"test/{c}"], args, loss)
    keys = ["structural", "structural_no_ot", "position_prior_logical", "global_histogram_logical", "logical", "logical_l1",
            "logical_mmd", "logical_on_structural", "defect_mask_logical"]
    mean = {k: float(np.nanmean([per_category[c][k] for c in categories])) for k in keys}
    result = {"categories": per_category, "mean": mean, "tokenizer_reconstruction_loss": reconstruction,
              "tokenizer_steps": args.tokenizer_steps,
              "predictor_training_grids": {c: len(stage_cache[f"train/{c}"]) for c in categories},
              "shift_copies": args.shift_copies, "max_shift": args.max_shift, "predictor_steps": args.predictor_steps, "num_masks": args.num_masks,
              "predictor_batch_size": settings.predictor.batch_size,
              "stages": {"tokenizer": settings.tokenizer.__dict__, "predictor": settings.predictor.__dict__},
              "predictor_loss_type": model.config.predictor_config.loss_type,
              "histogram_distance": model.config.histogram_distance,
              "overrides": overrides, "seconds": round(time.time() - started, 1)}
    summary = (f"quality probe: logical {mean['logical']:.3f} (L1 {mean['logical_l1']:.3f}, kernel distance {mean['logical_mmd']:.3f}; defect-placed mask "
          f"{mean['defect_mask_logical']:.3f}; oracles: position prior {mean['position_prior_logical']:.3f}, "
          f"global histogram {mean['global_histogram_logical']:.3f}), structural {mean['structural']:.3f} "
          f"(no OT {mean['structural_no_ot']:.3f}), reconstruction loss {reconstruction:.3f}, {result['seconds']} s")
    S.report(summary, result)
    workdir.cleanup()
    return result


if __name__ == "__main__":
    main()
