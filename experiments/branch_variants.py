"""Alternatives to the training-free branches, each in place of its branch in a trained model's fusion.

`fusion_sweep.py --save_scores FILE` keeps a trained model's standardised test scores per branch.
This probe fits alternatives to the memory bank or the global branch on each category's `train/good`
features, standardises them on `validation/good` as training does, and puts each in place of its
branch in the model's own fusion (its `fused_branches` and `fusion_rule`), so every row is paired with the
model's row: same logical scores, same images.

    python experiments/fusion_sweep.py --model outputs/synthloco/model --data_root data/synthloco \
        --feature_cache outputs/synthloco/cache/features.pt --variants logical+memory_bank+global:sum \
        --no_spro --save_scores z.pt
    python experiments/branch_variants.py --model outputs/synthloco/model --data_root data/synthloco \
        --feature_cache outputs/synthloco/cache/features.pt --scores z.pt \
        --variants memory_bank:grid=28 memory_bank:position=0.5 global:standardized global:code_histogram \
            global:set_cdf global:per_tap per_cell:gaussian

Variants (`branch:setting=value`, or `branch:setting`); each replaces its branch, or joins the fusion:

- `memory_bank:size=P`: a coreset of P patches (the model's grid);
- `memory_bank:grid=G`: every backbone tap resized to G x G before matching (the model's: 14 at 224 px);
- `memory_bank:image=S` / `global:image=S`: the branch (the model's settings) on the features of the
  processor's image resized to S x S pixels, at the grid of the same cell size (the package's
  `global_image_size: S`): the backbone resolves finer detail, not just more cells (`grid=`, by
  contrast, resizes the same taps);
- `memory_bank:position=A`: each patch gets its cell's (row, column) appended, scaled so that one
  cell is A times the median nearest-neighbour distance of validation patches, so a part in the
  wrong place stops matching;
- `global:standardized`: pooled features standardised per dimension before the Ledoit-Wolf fit, so
  the shrinkage pulls toward the diagonal instead of a multiple of the identity;
- `global:code_histogram`: the Mahalanobis distance of the image's code counts (per level, over the
  codebook) instead of its pooled features: counts of parts, in the tokenizer's words;
- `global:set_cdf`: the Mahalanobis distance of the image's patch *distribution* instead of its mean and
  std: per backbone tap, 128 random projections of the standardised patch features, each summarised
  by the share of the image's patches below the training patches' quintiles (a set descriptor that
  can count parts);
- `global:per_tap`: one Mahalanobis distance per backbone tap (its own pooled mean and std, its own
  Ledoit-Wolf covariance), each standardised on the validation images, summed: fewer dimensions per
  covariance than the 2 x 368 of all taps at once, for the same 150 training images;
- `global:clusters=K`: the package's `global_descriptor: part_histogram` with `global_parts: K`, the
  Mahalanobis distance of the image's share of cells in each of K k-means clusters of the category's
  standardised training cells (as CSAD counts its segmented components), soft-assigned;
  `parts:clusters=K` adds it as one more branch instead;
- `global:cooccurrence=K`: the Mahalanobis distance of how often each pair of K part clusters lies
  in side-by-side cells (right or below, either order): a part's length and what touches what, which a
  count of cells per part does not see; `parts:cooccurrence=K` adds it as one more branch instead;
- `global:tap_parts=K`: one part histogram per backbone tap (K k-means parts of that tap's channels
  alone), one Mahalanobis distance each, standardised on the validation images and summed: the
  shallow taps, a small share of the 368 channels, otherwise barely move which part a cell joins;
- `global:sqrt_parts=K`: the part histogram's square root (Hellinger) under the Gaussian, so a rare
  part's count weighs as much as a common part's (counts' spread grows with their mean);
- `global:seeds=S`: S part histograms of the model's `global_parts`, k-means seeds 0..S-1, each
  standardised on the validation images, averaged: how much of the branch is the k-means draw;
- `global:moments`: the package's `global_descriptor: moments` (per-channel mean and std), for a model
  fitted with the part histogram;
- `global:knn=K`: the mean Euclidean distance of the image's pooled features (standardised per
  dimension) to its K nearest training images, instead of one Gaussian: a multi-modal normal set;
- `per_cell:gaussian` (joins the fusion): a Gaussian per grid cell over the training images (Ledoit-Wolf
  covariance of all channels), the image's largest per-cell Mahalanobis distance; it knows where parts
  belong, for categories whose layout is fixed.

Last stdout line: JSON with `model` (the model's own fusion) and `variants`, each per category and on
average: the variant alone and fused (image AUROC, logical and structural).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import _shared as S
from ladmim_hf.models.branches_ladmim import LadmimGlobalBranch

DEFAULT_VARIANTS = ("memory_bank:size=4096", "memory_bank:grid=28", "memory_bank:position=0.5",
                    "global:standardized", "global:code_histogram", "global:set_cdf", "global:per_tap",
                    "per_cell:gaussian")
SETTINGS = {"memory_bank": ("size", "grid", "position", "image"),
            "global": ("standardized", "code_histogram", "set_cdf", "per_tap", "clusters", "knn", "moments", "cooccurrence",
                       "tap_parts", "sqrt_parts", "seeds", "image"),
            "per_cell": ("gaussian",),
            "parts": ("clusters", "cooccurrence")}
VALUED = ("size", "grid", "position", "clusters", "knn", "cooccurrence", "tap_parts", "sqrt_parts", "seeds", "image")  # settings that take a number
SET_PROJECTIONS, SET_QUANTILES = 128, 4  # per tap; the quantiles split the training patches into 5 equal shares


def parse_variant(text: str) -> tuple[str, str, float | None]:
    """`"memory_bank:grid=28"` -> `("memory_bank", "grid", 28.0)`; `"global:standardized"` -> `(..., None)`."""
    branch, _, setting = text.partition(":")
    name, _, value = setting.partition("=")
    if branch not in SETTINGS or name not in SETTINGS[branch] or (name in VALUED) != bool(value):
        raise SystemExit(f"bad variant {text!r}: use memory_bank:{{size,grid,position,image}}=VALUE, "
                         "global:{standardized,code_histogram,set_cdf,per_tap,moments}, "
                         "global:{clusters,knn,cooccurrence,tap_parts,sqrt_parts,seeds,image}=VALUE, "
                         "parts:clusters=VALUE or per_cell:gaussian")
    try:
        return branch, name, float(value) if value else None
    except ValueError:
        raise SystemExit(f"bad variant {text!r}: {value!r} is not a number") from None


def cell_rows(features: torch.Tensor, position_scale: float = 0.0) -> torch.Tensor:
    """`(B, C, g, g)` -> `(B, g*g, C [+2])` patch rows, with the cell's (row, column) times `position_scale`."""
    batch, channels, g, _ = features.shape
    rows = features.float().permute(0, 2, 3, 1)
    if position_scale:
        grid = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).float()
        rows = torch.cat([rows, (grid * position_scale)[None].expand(batch, g, g, 2)], -1)
    return rows.reshape(batch, g * g, -1)


def memory_bank_scores(train: torch.Tensor, validation: torch.Tensor, test: torch.Tensor, size: int, position: float,
                       seed: int) -> list[torch.Tensor]:
    """Validation and test scores `(N,)`: each image's largest nearest-neighbour distance to a coreset of
    `train`'s patches (features `(N, C, g, g)`)."""
    from ladmim_hf.models.branches_ladmim import greedy_coreset, nearest_distances

    scale = 0.0
    if position:  # one cell = `position` x the typical distance of a normal patch to the plain bank
        plain = cell_rows(train).flatten(0, 1)
        bank = plain[greedy_coreset(plain, min(size, len(plain)), projection_dim=128, seed=seed)]
        scale = position * float(nearest_distances(cell_rows(validation).flatten(0, 1), bank).median())
    rows = cell_rows(train, scale).flatten(0, 1)
    bank = rows[greedy_coreset(rows, min(size, len(rows)), projection_dim=128, seed=seed)]
    out = []
    for features in (validation, test):
        queries = cell_rows(features, scale)
        out.append(nearest_distances(queries.flatten(0, 1), bank).view(len(features), -1).amax(1))
    return out


def mahalanobis_scores(train: torch.Tensor, validation: torch.Tensor, test: torch.Tensor,
                       standardize: bool) -> list[torch.Tensor]:
    """Validation and test Mahalanobis distances `(N,)` of vectors `(N, D)` under a Ledoit-Wolf covariance
    of `train (n, D)`."""
    from ladmim_hf.models.branches_ladmim import ledoit_wolf_covariance

    mean, std = train.mean(0), train.std(0).clamp_min(1e-6) if standardize else torch.ones(train.shape[1])
    train = (train - mean) / std
    covariance, _ = ledoit_wolf_covariance(train)
    precision = torch.linalg.inv(covariance).float()
    out = []
    for vectors in (validation, test):
        centred = (vectors - mean) / std - train.mean(0)
        out.append(torch.einsum("bi,ij,bj->b", centred, precision, centred).clamp_min(0).sqrt())
    return out


def per_tap_global_scores(train: torch.Tensor, validation: torch.Tensor, test: torch.Tensor,
                          tap_channels: list[int]) -> list[torch.Tensor]:
    """Validation and test scores `(N,)` of features `(N, C, g, g)`: per tap, the Mahalanobis distance of its
    pooled mean and std (`mahalanobis_scores`), standardised on the validation images; summed over taps."""
    return standardized_sum([mahalanobis_scores(*(LadmimGlobalBranch.pooled(f[:, channels]) for f in (train, validation, test)),
                                                standardize=False)
                             for channels in torch.split(torch.arange(sum(tap_channels)), tap_channels)])


def set_descriptors(train: torch.Tensor, validation: torch.Tensor, test: torch.Tensor, tap_channels: list[int],
                    seed: int) -> list[torch.Tensor]:
    """Train, validation and test set descriptors `(N, taps * SET_QUANTILES * SET_PROJECTIONS)` of
    features `(N, C, g, g)`: per tap, the share of an image's patches whose random projection lies below
    each training quantile of that projection."""
    generator = torch.Generator().manual_seed(seed)
    levels = torch.linspace(0, 1, SET_QUANTILES + 2)[1:-1]
    out: list[list[torch.Tensor]] = [[], [], []]
    for channels in torch.split(torch.arange(sum(tap_channels)), tap_channels):
        rows = [f[:, channels].float().flatten(2).transpose(1, 2) for f in (train, validation, test)]  # (N, g*g, c)
        flat = rows[0].reshape(-1, len(channels))
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
        directions = torch.randn(len(channels), SET_PROJECTIONS, generator=generator) / len(channels) ** 0.5
        projected = [((r - mean) / std) @ directions for r in rows]  # (N, g*g, projections)
        edges = torch.quantile(projected[0].reshape(-1, SET_PROJECTIONS), levels, dim=0)  # (quantiles, projections)
        for descriptors, values in zip(out, projected):
            descriptors.append((values[:, :, None] <= edges).float().mean(1).flatten(1))
    return [torch.cat(parts, 1) for parts in out]


def global_branch_scores(train: torch.Tensor, validation: torch.Tensor, test: torch.Tensor, seed: int,
                         **settings) -> list[torch.Tensor]:
    """Validation and test scores `(N,)` of the package's global branch (`settings`: its `descriptor` and
    `parts`), fitted on `train` (features `(N, C, g, g)`) with k-means seed `seed`."""
    branch = LadmimGlobalBranch(1, train.shape[1], **settings)
    branch.fit(train, 0, seed=seed)
    return [branch(f, torch.zeros(len(f), dtype=torch.long), ["category"]) for f in (validation, test)]


def standardized_sum(scores: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Sum of several scores' validation and test values, each standardised on its validation values."""
    total = [torch.zeros_like(scores[0][0]), torch.zeros_like(scores[0][1])]
    for validation, test in scores:
        mean, std = validation.mean(), validation.std()
        total = [total[0] + (validation - mean) / std, total[1] + (test - mean) / std]
    return total


def per_tap_part_scores(train: torch.Tensor, validation: torch.Tensor, test: torch.Tensor, tap_channels: list[int],
                        parts: int, seed: int) -> list[torch.Tensor]:
    """Validation and test scores `(N,)`: per tap, the package's part-histogram global branch on that tap's
    channels alone, standardised on the validation images; summed over taps."""
    return standardized_sum([global_branch_scores(*(f[:, channels] for f in (train, validation, test)), seed,
                                                  descriptor="part_histogram", parts=parts)
                             for channels in torch.split(torch.arange(sum(tap_channels)), tap_channels)])


def sqrt_part_scores(train: torch.Tensor, validation: torch.Tensor, test: torch.Tensor, parts: int,
                     seed: int) -> list[torch.Tensor]:
    """Validation and test Mahalanobis distances `(N,)` of the square-rooted part histograms."""
    branch = LadmimGlobalBranch(1, train.shape[1], "part_histogram", parts)
    branch.fit(train, 0, seed=seed)
    histograms = [branch.part_histogram(f, torch.zeros(len(f), dtype=torch.long)).sqrt() for f in (train, validation, test)]
    return mahalanobis_scores(*histograms, standardize=False)


def cooccurrence_descriptors(train: torch.Tensor, validation: torch.Tensor, test: torch.Tensor, parts: int,
                             seed: int) -> list[torch.Tensor]:
    """Train, validation and test descriptors `(N, parts * (parts + 1) / 2)` of features `(N, C, g, g)`: how
    often each pair of parts (k-means clusters of the training cells, soft-assigned as the package's part
    histogram) lies in side-by-side cells, right or below, in either order."""
    branch = LadmimGlobalBranch(1, train.shape[1], "part_histogram", parts)
    branch.fit(train, 0, seed=seed)
    grid = train.shape[-1]
    upper = torch.triu_indices(parts, parts)
    out = []
    for features in (train, validation, test):
        assigned = branch.part_assignments(features, torch.zeros(len(features), dtype=torch.long))
        assigned = assigned.view(len(features), grid, grid, parts)
        pairs = (torch.einsum("bhwi,bhwj->bij", assigned[:, :, :-1], assigned[:, :, 1:])
                 + torch.einsum("bhwi,bhwj->bij", assigned[:, :-1], assigned[:, 1:])) / (2 * grid * (grid - 1))
        pairs = pairs + pairs.transpose(1, 2)
        out.append(pairs[:, upper[0], upper[1]])
    return out


def knn_image_scores(train: torch.Tensor, validation: torch.Tensor, test: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Validation and test scores `(N,)`: the mean distance of each pooled vector `(N, D)`, standardised
    with `train`'s per-dimension mean and std, to its `k` nearest training vectors."""
    from ladmim_hf.models.branches_ladmim import squared_distances

    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    reference = (train - mean) / std
    return [squared_distances((v - mean) / std, reference).sqrt().topk(k, dim=1, largest=False).values.mean(1)
            for v in (validation, test)]


def per_cell_gaussian_scores(train: torch.Tensor, validation: torch.Tensor, test: torch.Tensor) -> list[torch.Tensor]:
    """Validation and test scores `(N,)`: the largest Mahalanobis distance over cells of features
    `(N, C, g, g)`, each cell under its own Ledoit-Wolf Gaussian of `train`'s features at that cell."""
    from ladmim_hf.models.branches_ladmim import ledoit_wolf_covariance

    cells = train.float().flatten(2).permute(2, 0, 1)  # (g*g, n, C)
    means = cells.mean(1)
    precisions = torch.stack([torch.linalg.inv(ledoit_wolf_covariance(rows)[0]).float() for rows in cells])
    out = []
    for features in (validation, test):
        centred = features.float().flatten(2).permute(2, 0, 1) - means[:, None]
        squared = torch.einsum("cni,cij,cnj->nc", centred, precisions, centred)
        out.append(squared.clamp_min(0).sqrt().amax(1))
    return out


def code_counts(model, features: torch.Tensor, category: str) -> torch.Tensor:
    """`(N, C, g, g)` raw features -> `(N, levels * codebook)` counts of each code in each level."""
    size = model.config.predictor_config.codebook_size
    counts = []
    with torch.no_grad():
        for chunk in features.split(32):
            codes = model.tokenizer.tokenize(features=chunk, category=category)["codes"]  # (B, L, N)
            counts.append(F.one_hot(codes, size).float().sum(2).flatten(1))
    return torch.cat(counts)


def main(argv=None) -> None:
    parser = S.parser(__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--scores", required=True, help="the model's test z-scores: fusion_sweep.py --save_scores FILE")
    parser.add_argument("--feature_cache", default=None, help="training feature cache (OUTPUT_DIR/cache/features.pt)")
    parser.add_argument("--categories", nargs="+", default=["all"])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    args = parser.parse_args(argv)
    S.use_threads(args.threads)
    variants = {text: parse_variant(text) for text in args.variants}

    from ladmim_hf.data import evaluation_rows, find_layout, select_categories
    from ladmim_hf.evaluation import load_detector
    from ladmim_hf.metrics import loco_image_aurocs
    from ladmim_hf.models.branches_ladmim import fuse
    from ladmim_hf.scoring import extract_global_features, extract_features

    model, processor = load_detector(args.model)
    fused, rule = list(model.config.fused_branches), model.config.fusion_rule
    layout = find_layout(args.data_root)
    categories = select_categories(layout, "all" if args.categories == ["all"] else args.categories)
    saved = torch.load(args.scores, weights_only=False)
    missing = [c for c in categories if c not in saved]
    if missing:
        raise SystemExit(f"{args.scores} has no scores for {missing}: run fusion_sweep.py --save_scores on them")
    cache = torch.load(args.feature_cache, weights_only=True) if args.feature_cache else {}
    backbone = model.tokenizer.backbone
    model_grid = backbone.grid_size

    def features(split: str, category: str, grid: int, size: int | None = None) -> torch.Tensor:
        size = size or processor.size
        key = f"{split}/{category}" + ("" if grid == model_grid else f"@{grid}") + ("" if size == processor.size else f"@{size}px")
        if key not in cache:
            paths = test_paths[category] if split == "test" else layout.paths(category, split)
            if size != processor.size:  # the package's branch features at global_image_size
                saved_size, model.config.global_image_size = model.config.global_image_size, size
                try:
                    cache[key] = extract_global_features(model, processor, paths, 16, f"features {key}")
                finally:
                    model.config.global_image_size = saved_size
                return cache[key]
            backbone.grid_size = grid
            try:
                cache[key] = extract_features(model.tokenizer, processor, paths, 16, f"features {key}")
            finally:
                backbone.grid_size = model_grid
        return cache[key]

    def aurocs(scores: torch.Tensor, types: list[str]) -> dict:
        values = loco_image_aurocs(scores.double().numpy(), types)
        return {k: values[k] for k in ("auroc_logical", "auroc_structural", "auroc_mean")}

    test_paths = {c: [r["path"] for r in evaluation_rows(layout, c)] for c in categories}
    results = {"model": {}, **{text: {} for text in variants}}
    for category in categories:
        z, types = saved[category]["z"], saved[category]["types"]
        if len(types) != len(test_paths[category]):
            raise SystemExit(f"{args.scores} holds {len(types)} test images of {category}; the data root has a different test set")
        results["model"][category] = {"fused": aurocs(fuse(torch.stack([z[b] for b in fused], -1), rule), types)}
        for text, (branch, setting, value) in variants.items():
            S.progress(f"{category}: {text}")
            image_size = int(value) if setting == "image" else processor.size
            if setting == "image" and (image_size % 16 or image_size < 64):
                raise SystemExit(f"bad variant {text!r}: the image size must be a multiple of 16, at least 64")
            if branch == "memory_bank":
                grid = int(value) if setting == "grid" else image_size // 16 if setting == "image" else model_grid
                size = int(value) if setting == "size" else model.config.memory_bank_size or 2048
                position = value if setting == "position" else 0.0
                validation, test = memory_bank_scores(*(features(split, category, grid, image_size)
                                                        for split in ("train", "validation", "test")),
                                                      size, position, args.seed)
            else:  # every other variant reads the features at the model's grid (or the native grid of `image=`)
                grid = image_size // 16 if setting == "image" else model_grid
                grids = [features(split, category, grid, image_size) for split in ("train", "validation", "test")]
                if branch == "per_cell":
                    validation, test = per_cell_gaussian_scores(*grids)
                elif setting == "per_tap":
                    validation, test = per_tap_global_scores(*grids, backbone.tap_channels)
                elif setting == "moments":
                    validation, test = global_branch_scores(*grids, args.seed, descriptor="moments")
                elif setting == "cooccurrence":
                    validation, test = mahalanobis_scores(*cooccurrence_descriptors(*grids, int(value), args.seed)[:3],
                                                          standardize=False)
                elif setting == "tap_parts":
                    validation, test = per_tap_part_scores(*grids, backbone.tap_channels, int(value), args.seed)
                elif setting == "sqrt_parts":
                    validation, test = sqrt_part_scores(*grids, int(value), args.seed)
                elif setting == "seeds":
                    validation, test = standardized_sum([
                        global_branch_scores(*grids, args.seed + s, descriptor="part_histogram",
                                             parts=model.config.global_parts) for s in range(int(value))])
                elif setting == "image":
                    validation, test = global_branch_scores(*grids, args.seed, descriptor=model.config.global_descriptor,
                                                            parts=model.config.global_parts)
                elif setting == "clusters":
                    validation, test = global_branch_scores(*grids, args.seed, descriptor="part_histogram", parts=int(value))
                elif setting == "knn":
                    validation, test = knn_image_scores(*(LadmimGlobalBranch.pooled(f) for f in grids), int(value))
                else:  # a descriptor per image, under one Ledoit-Wolf Gaussian
                    if setting == "code_histogram":
                        vectors = [code_counts(model, f, category) for f in grids]
                    elif setting == "set_cdf":
                        vectors = set_descriptors(*grids, backbone.tap_channels, args.seed)
                    else:
                        vectors = [LadmimGlobalBranch.pooled(f) for f in grids]
                    validation, test = mahalanobis_scores(*vectors, standardize=setting == "standardized")
            standardized = (test - validation.mean()) / validation.std()
            parts = [standardized if b == branch else z[b] for b in fused] + ([] if branch in fused else [standardized])
            results[text][category] = {"alone": aurocs(test, types), "fused": aurocs(fuse(torch.stack(parts, -1), rule), types)}

    mean = S.category_mean

    lines = [f"fused branches of the model: {' + '.join(fused)} ({rule}); each variant replaces its branch (or joins)",
             "| variant | alone: logical / structural | fused: logical / structural / mean | fused logical per category |",
             "|---|---|---|---|"]
    for name, per in results.items():
        alone = "-" if name == "model" else f"{mean(per, 'alone', 'auroc_logical'):.3f} / {mean(per, 'alone', 'auroc_structural'):.3f}"
        lines.append(f"| {name} | {alone} | {mean(per, 'fused', 'auroc_logical'):.3f} / {mean(per, 'fused', 'auroc_structural'):.3f}"
                     f" / {mean(per, 'fused', 'auroc_mean'):.3f} | "
                     + ", ".join(f"{c} {per[c]['fused']['auroc_logical']:.3f}" for c in categories) + " |")
    S.report("\n".join(lines), {"fused_branches": fused, "fusion_rule": rule, "model": results.pop("model"),
                                "variants": results})


if __name__ == "__main__":
    main()
