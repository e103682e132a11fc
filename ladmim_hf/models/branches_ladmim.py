"""The detector's training-free branches and the fusion of branch scores.

Shipped to the Hub next to the weights (``trust_remote_code=True``): imports only torch and the flat
sibling ``configuration_ladmim``.

- **Memory bank** (PatchCore, Roth et al., CVPR 2022): per category, a greedy k-center coreset of
  the training images' patch features; a test cell's score is the Euclidean distance to its nearest
  bank patch, the map is that grid upsampled and Gaussian-smoothed, the image score its maximum.
- **Global**: per category, the Mahalanobis distance of an image descriptor under a Ledoit-Wolf
  shrinkage covariance fitted on the training images: the per-channel mean and standard deviation of
  the grid (a PUAD-style global score, Sugawara et al. 2024), or a soft histogram of the cells over
  k-means part clusters (the counting idea of CSAD, Hsieh and Lai 2024). It sees counts and
  combinations that no single patch shows.
- **Retrieval** (beside the trained predictor in the logical branch): per mask, the training images
  whose visible cells hold the most similar parts; the hidden cells are compared with the closest of
  theirs.
- **Fusion**: each branch standardised on normal validation images (a z-score), then combined by a
  rule (`fuse`).

Shapes: B = batch, C = feature channels, g = grid side, P = bank patches per category, D = descriptor size.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_ladmim import FUSION_RULES, GLOBAL_DESCRIPTORS

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Nearest neighbours and coresets
# --------------------------------------------------------------------------------------------------


def squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between the rows of `a (..., n, C)` and `b (..., m, C)`, `(..., n, m)`,
    clamped at 0 (leading dimensions batch alike)."""
    d = (a * a).sum(-1, keepdim=True) - 2.0 * (a @ b.transpose(-1, -2)) + (b * b).sum(-1).unsqueeze(-2)
    return d.clamp_min_(0.0)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk_size: int = 4096,
                      bank_chunk_size: int = 65536) -> torch.Tensor:
    """Euclidean distance of each query row `(n, C)` to its nearest bank row `(m, C)`, `(n,)`, computed
    in `(chunk_size x bank_chunk_size)` blocks so memory stays bounded whatever the bank size."""
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"feature dims differ: queries have {queries.shape[1]}, the bank has {bank.shape[1]}")
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty")
    if chunk_size < 1 or bank_chunk_size < 1:
        raise ValueError("chunk sizes must be >= 1")
    if queries.shape[0] <= chunk_size and bank.shape[0] <= bank_chunk_size:  # one block: no buffer to fill
        return squared_distances(queries, bank).min(dim=1).values.sqrt()
    out = torch.empty(queries.shape[0], dtype=queries.dtype, device=queries.device)
    for i in range(0, queries.shape[0], chunk_size):
        q = queries[i:i + chunk_size]
        best = torch.full((q.shape[0],), float("inf"), dtype=q.dtype, device=q.device)
        for j in range(0, bank.shape[0], bank_chunk_size):
            best = torch.minimum(best, squared_distances(q, bank[j:j + bank_chunk_size]).min(dim=1).values)
        out[i:i + chunk_size] = best.sqrt()
    return out


def greedy_coreset(rows: torch.Tensor, n_select: int, projection_dim: int | None = 128, seed: int = 0,
                   start_index: int | None = None, chunk_size: int = 65536) -> torch.Tensor:
    """Greedy k-center coreset (PatchCore): indices of `n_select` of the rows `(M, C)`, in selection order.

    Each step adds the row farthest from every row selected so far. With `projection_dim` smaller
    than C, distances are taken after a seeded Gaussian random projection (Johnson-Lindenstrauss);
    `seed` also draws the first row unless `start_index` is given.
    """
    m, c = rows.shape
    if not 1 <= n_select <= m:
        raise ValueError(f"n_select must be in 1..{m}, got {n_select}")
    generator = torch.Generator().manual_seed(int(seed))
    x = rows.float()
    if projection_dim is not None and projection_dim < c:
        projection = torch.randn(c, projection_dim, generator=generator) / math.sqrt(projection_dim)
        x = x @ projection.to(x.device)
    first = int(torch.randint(m, (1,), generator=generator)) if start_index is None else int(start_index)
    if not 0 <= first < m:
        raise ValueError(f"start_index {first} out of range 0..{m - 1}")
    selected = torch.empty(n_select, dtype=torch.long)
    selected[0] = first
    min_distance = torch.full((m,), float("inf"), device=x.device)
    last = x[first:first + 1]
    for k in range(1, n_select):
        for j in range(0, m, chunk_size):
            block = squared_distances(x[j:j + chunk_size], last)[:, 0]
            min_distance[j:j + chunk_size] = torch.minimum(min_distance[j:j + chunk_size], block)
        chosen = int(torch.argmax(min_distance))
        selected[k] = chosen
        last = x[chosen:chosen + 1]
    return selected


def kmeans(rows: torch.Tensor, clusters: int, seed: int = 0, iterations: int = 30) -> torch.Tensor:
    """Centres `(clusters, C)` of rows `(M, C)`: k-means++ seeding drawn from `seed`, then Lloyd iterations
    (a centre that loses all its rows stays where it is)."""
    m = rows.shape[0]
    if not 1 <= clusters <= m:
        raise ValueError(f"clusters must be in 1..{m}, got {clusters}")
    generator = torch.Generator().manual_seed(int(seed))
    x = rows.float()
    norms = (x * x).sum(1)  # once: every distance below is norms - 2 x.c + |c|^2

    def to_centre(centre: torch.Tensor) -> torch.Tensor:
        return (norms - 2.0 * (x @ centre) + centre @ centre).clamp_min(0.0)

    centres = torch.empty(clusters, x.shape[1], device=x.device)
    centres[0] = x[int(torch.randint(m, (1,), generator=generator))]
    nearest = to_centre(centres[0])
    for k in range(1, clusters):
        weights = nearest.double().cpu()
        index = int(torch.multinomial(weights / weights.sum(), 1, generator=generator)) if weights.sum() > 0 else k % m
        centres[k] = x[index]
        nearest = torch.minimum(nearest, to_centre(centres[k]))
    for _ in range(iterations):
        assignment = ((centres * centres).sum(1)[None, :] - 2.0 * (x @ centres.T)).argmin(1)
        counts = torch.bincount(assignment, minlength=clusters)
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centres)
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of `(B, H, W)` maps, as `scipy.ndimage.gaussian_filter(mode="mirror")`
    (radius 4 sigma), which PatchCore applies to its upsampled maps. `sigma <= 0`: unchanged."""
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = maps[:, None]
    # reflect padding needs pad < size; very small maps fall back to replicate
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return x[:, 0]


# --------------------------------------------------------------------------------------------------
# Shrinkage covariance
# --------------------------------------------------------------------------------------------------


def ledoit_wolf_covariance(samples: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Ledoit-Wolf shrunk covariance of `samples (n, D)` and its shrinkage in [0, 1] (float64).

    `(1 - s) S + s (trace(S) / D) I` with S the maximum-likelihood covariance and s the
    Ledoit-Wolf (2004) estimate of the optimal shrinkage; with fewer samples than dimensions S is
    singular, the shrunk matrix is not.
    """
    x = samples.double()
    n, d = x.shape
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    x = x - x.mean(0, keepdim=True)
    covariance = x.T @ x / n
    mu = covariance.diagonal().sum() / d
    squared = x * x
    beta_sum = (squared.T @ squared).sum()                   # sum_k ||x_k||^4 terms, pairwise over dims
    delta_sum = covariance.pow(2).sum()                      # ||S||_F^2
    beta = (beta_sum / n - delta_sum) / (d * n)
    delta = (delta_sum - 2.0 * mu * covariance.diagonal().sum() + d * mu * mu) / d
    shrinkage = 0.0 if float(delta) == 0.0 else float(torch.clamp(beta, max=delta) / delta)
    shrinkage = min(max(shrinkage, 0.0), 1.0)
    shrunk = (1.0 - shrinkage) * covariance
    shrunk.diagonal().add_(shrinkage * mu)
    return shrunk, shrinkage


# --------------------------------------------------------------------------------------------------
# Branch modules
# --------------------------------------------------------------------------------------------------


class _PerCategoryBranch(nn.Module):
    """Per-category buffers that are filled by `fit` (training stage 3) and saved with the weights."""

    name = "branch"

    def __init__(self, num_categories: int):
        super().__init__()
        self.register_buffer("fitted", torch.zeros(num_categories, dtype=torch.bool))
        self._warned: set[int] = set()

    def _check_fitted(self, class_ids: torch.Tensor, categories: list[str]) -> None:
        if torch.compiler.is_compiling():  # reads values; `ladmim export` checks before tracing
            return
        unfitted = set(class_ids[~self.fitted[class_ids]].tolist()) - self._warned
        if unfitted:
            logger.warning("the %s branch was never fitted for categories %s; its scores there are meaningless",
                           self.name, [categories[i] for i in sorted(unfitted)])
            self._warned.update(unfitted)


class LadmimMemoryBank(_PerCategoryBranch):
    """PatchCore memory bank per category: `bank (categories, P, C)` (fp16 storage).

    Args:
        num_categories, channels: buffer shapes; bank_size: P, patches kept per category.
        neighbourhood: side of the mean filter over each cell's neighbourhood before matching (PatchCore's
            local aggregation; 1 = the cell alone).
        smoothing_sigma: Gaussian sigma, in pixels, of the upsampled map.
        projection_dim: random projection used only to select the coreset.
    """

    name = "memory_bank"

    def __init__(self, num_categories: int, channels: int, bank_size: int, neighbourhood: int = 1,
                 smoothing_sigma: float = 4.0, projection_dim: int = 128):
        super().__init__(num_categories)
        self.neighbourhood = neighbourhood
        self.smoothing_sigma = smoothing_sigma
        self.projection_dim = projection_dim
        self.register_buffer("bank", torch.zeros(num_categories, bank_size, channels, dtype=torch.float16))

    def patch_features(self, features: torch.Tensor) -> torch.Tensor:
        """`(B, C, g, g)` -> `(B, g, g, C)` patch features after the neighbourhood mean."""
        if self.neighbourhood > 1:
            features = F.avg_pool2d(features, self.neighbourhood, stride=1, padding=self.neighbourhood // 2,
                                    count_include_pad=False)
        return features.permute(0, 2, 3, 1)

    @torch.no_grad()
    def fit(self, features: torch.Tensor, class_id: int, seed: int = 0) -> None:
        """Fill one category's bank from its training features `(num_images, C, g, g)`.

        Keeps a greedy k-center coreset of P of the patches; a category with fewer patches keeps
        them all and repeats the first (duplicates change no nearest-neighbour distance)."""
        rows = self.patch_features(features.float()).reshape(-1, features.shape[1])
        size = self.bank.shape[1]
        if rows.shape[0] <= size:
            index = torch.arange(rows.shape[0])
            index = torch.cat([index, index.new_zeros(size - rows.shape[0])])
        else:
            index = greedy_coreset(rows, size, projection_dim=self.projection_dim, seed=seed)
        self.bank[class_id] = rows[index.to(rows.device)].to(self.bank)
        self.fitted[class_id] = True

    def forward(self, features: torch.Tensor, class_ids: torch.Tensor, image_size: int,
                categories: list[str], groups: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores `(B,)` (the largest cell distance) and maps `(B, S, S)` for raw features `(B, C, g, g)`.
        `groups`: the distinct values of `class_ids`, if the caller knows them."""
        self._check_fitted(class_ids, categories)
        patches = self.patch_features(features.float())
        batch, g = patches.shape[0], patches.shape[1]
        groups = class_ids.unique().tolist() if groups is None else groups
        if len(groups) == 1:  # one category: no gather or scatter (and a static graph to export)
            cells = nearest_distances(patches.reshape(-1, patches.shape[-1]), self.bank[groups[0]].float()).view(batch, -1)
        else:
            cells = torch.empty(batch, g * g, device=features.device)
            for cid in groups:
                rows = torch.nonzero(class_ids == cid).flatten()
                queries = patches[rows].reshape(-1, patches.shape[-1])
                cells[rows] = nearest_distances(queries, self.bank[cid].float()).view(len(rows), -1)
        grid = cells.view(batch, g, g)
        full = F.interpolate(grid[:, None], size=(image_size, image_size), mode="bilinear", align_corners=False)[:, 0]
        return cells.amax(1), gaussian_blur(full, self.smoothing_sigma)


class LadmimGlobalBranch(_PerCategoryBranch):
    """Mahalanobis distance of an image descriptor per category: `mean (categories, D)` and
    `precision (categories, D, D)` under a Ledoit-Wolf covariance of the training images' descriptors.

    Descriptors (`descriptor`):
        `"moments"`: per-channel mean and standard deviation over the grid, D = 2C (PUAD-style).
        `"part_histogram"`: the share of the image's cells in each of D = `parts` part clusters, a
            k-means of the category's standardised training cells; each cell is soft-assigned with
            `softmax(-squared distance / temperature)`, the temperature being the median squared distance
            of a training cell to its nearest centre. A missing, extra or resized part changes how many
            cells look like it, wherever it lies (CSAD counts segmented components the same way).
    """

    name = "global"

    def __init__(self, num_categories: int, channels: int, descriptor: str = "moments", parts: int = 128):
        super().__init__(num_categories)
        if descriptor not in GLOBAL_DESCRIPTORS:
            raise ValueError(f"global descriptor must be one of {GLOBAL_DESCRIPTORS}, got {descriptor!r}")
        self.descriptor_kind = descriptor
        dim = 2 * channels if descriptor == "moments" else parts
        self.register_buffer("mean", torch.zeros(num_categories, dim))
        self.register_buffer("precision", torch.eye(dim).repeat(num_categories, 1, 1))
        self.register_buffer("shrinkage", torch.zeros(num_categories))
        if descriptor == "part_histogram":
            self.register_buffer("cell_mean", torch.zeros(num_categories, channels))
            self.register_buffer("cell_std", torch.ones(num_categories, channels))
            self.register_buffer("part_centres", torch.zeros(num_categories, parts, channels))
            self.register_buffer("temperature", torch.ones(num_categories))

    @staticmethod
    def pooled(features: torch.Tensor) -> torch.Tensor:
        """`(B, C, g, g)` -> `(B, 2C)`: per-channel mean and standard deviation over the grid."""
        flat = features.float().flatten(2)
        return torch.cat([flat.mean(-1), flat.std(-1, unbiased=False)], dim=1)

    def part_assignments(self, features: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """`(B, C, g, g)` -> `(B, g*g, parts)`: each cell's soft assignment to its category's part centres
        (`"part_histogram"` only)."""
        cells = features.float().flatten(2).transpose(1, 2)  # (B, g*g, C)
        cells = (cells - self.cell_mean[class_ids][:, None]) / self.cell_std[class_ids][:, None]
        squared = squared_distances(cells, self.part_centres[class_ids])  # (B, g*g, parts)
        return torch.softmax(-squared / self.temperature[class_ids][:, None, None], dim=-1)

    def part_histogram(self, features: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """`(B, C, g, g)` -> `(B, parts)`: each image's mean soft assignment of its cells to the part centres."""
        return self.part_assignments(features, class_ids).mean(1)

    def part_kernel(self, class_id: int) -> torch.Tensor:
        """`(parts, parts)` RBF similarity of a category's part centres, the bandwidth the median squared
        distance between two centres (`"part_histogram"` only)."""
        centres = self.part_centres[class_id].float()
        squared = squared_distances(centres, centres)
        return torch.exp(-squared / squared[squared > 0].median().clamp_min(1e-12))

    def descriptor(self, features: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """`(B, C, g, g)` raw features -> `(B, D)` descriptors."""
        if self.descriptor_kind == "moments":
            return self.pooled(features)
        return self.part_histogram(features, class_ids)

    @torch.no_grad()
    def fit(self, features: torch.Tensor, class_id: int, seed: int = 0) -> None:
        """Fit one category from its training features `(num_images, C, g, g)`; `seed` seeds the k-means."""
        if self.descriptor_kind == "part_histogram":
            cells = features.float().flatten(2).transpose(1, 2).reshape(-1, features.shape[1])
            parts = self.part_centres.shape[1]
            if cells.shape[0] < parts:
                raise ValueError(f"global_parts ({parts}) exceeds the {cells.shape[0]} training cells of category "
                                 f"{class_id}; lower global_parts or add training images")
            mean, std = cells.mean(0), cells.std(0).clamp_min(1e-6)
            standardized = (cells - mean) / std
            centres = kmeans(standardized, parts, seed=seed)
            self.cell_mean[class_id], self.cell_std[class_id] = mean, std
            self.part_centres[class_id] = centres
            self.temperature[class_id] = squared_distances(standardized, centres).amin(1).median().clamp_min(1e-6)
        ids = torch.full((features.shape[0],), class_id, dtype=torch.long, device=features.device)
        descriptors = self.descriptor(features, ids)
        covariance, shrinkage = ledoit_wolf_covariance(descriptors)
        self.mean[class_id] = descriptors.double().mean(0).to(self.mean)
        self.precision[class_id] = torch.linalg.inv(covariance).to(self.precision)
        self.shrinkage[class_id] = shrinkage
        self.fitted[class_id] = True

    def forward(self, features: torch.Tensor, class_ids: torch.Tensor, categories: list[str]) -> torch.Tensor:
        """Mahalanobis distances `(B,)` for raw features `(B, C, g, g)`."""
        self._check_fitted(class_ids, categories)
        centred = self.descriptor(features, class_ids) - self.mean[class_ids]
        squared = torch.einsum("bi,bij,bj->b", centred, self.precision[class_ids], centred)
        return squared.clamp_min(0).sqrt()


def kernel_embedding(kernel: torch.Tensor, rank: int) -> torch.Tensor:
    """`(parts, rank)`: the top `rank` eigenvectors of a positive semi-definite `kernel (parts, parts)`, each
    scaled by the square root of its eigenvalue, so that for histograms `h`, `|h1 E - h2 E|` is the kernel
    distance `sqrt((h1 - h2)^T K (h1 - h2))` (exactly at full rank)."""
    values, vectors = torch.linalg.eigh(kernel.double())  # ascending: the top `rank` are the last
    return (vectors[:, -rank:] * values[-rank:].clamp_min(0.0).sqrt()).to(kernel.dtype)


class LadmimRetrieval(_PerCategoryBranch):
    """Retrieval beside the trained predictor: the training images whose visible cells look most like the
    image's say what its hidden cells should hold.

    Per category, every kept training image's cells are stored as embeddings `cells (categories, I, N, rank)`
    (fp16): a cell's soft part assignment (the global branch's parts) times `projection (categories, parts,
    rank)`, the top eigenvectors of the kernel over the part centres scaled by the square roots of their
    eigenvalues. The Euclidean distance between two cell sets' mean embeddings is then the kernel distance
    between their part histograms (exactly at full rank). For each mask, the `neighbours` training images
    whose visible cells' mean embedding is closest are retrieved; the mask's score is the distance from
    the image's hidden cells' mean embedding to the closest of theirs. Categories with fewer than I
    training images pad the rest (`count` says how many are real); padded rows are never retrieved.

    Args:
        num_categories, cells (N = g * g), parts, images (I), rank: buffer shapes.
    """

    name = "retrieval"

    def __init__(self, num_categories: int, cells: int, parts: int, images: int, rank: int):
        super().__init__(num_categories)
        if rank > parts:
            raise ValueError(f"logical_retrieval_rank ({rank}) cannot exceed the parts ({parts}) it embeds")
        self.register_buffer("cells", torch.zeros(num_categories, images, cells, rank, dtype=torch.float16))
        self.register_buffer("count", torch.zeros(num_categories, dtype=torch.long))
        self.register_buffer("projection", torch.zeros(num_categories, parts, rank))

    @torch.no_grad()
    def fit(self, assignments: torch.Tensor, kernel: torch.Tensor, class_id: int) -> None:
        """Store one category from its training cells' part assignments `(num_images, N, parts)` and the
        kernel over its parts `(parts, parts)`; more images than the buffer holds keep an evenly spaced subset."""
        rank, images = self.projection.shape[2], self.cells.shape[1]
        projection = kernel_embedding(kernel, rank).to(self.projection)
        count = min(len(assignments), images)
        index = torch.linspace(0, len(assignments) - 1, count).round().long().to(assignments.device)
        self.cells[class_id].zero_()
        self.cells[class_id, :count] = (assignments[index].float() @ projection).to(self.cells)
        self.count[class_id] = count
        self.projection[class_id] = projection
        self.fitted[class_id] = True

    def forward(self, assignments: torch.Tensor, class_ids: torch.Tensor, masks: torch.Tensor, neighbours: int,
                categories: list[str], groups: list[int] | None = None) -> torch.Tensor:
        """Per-mask scores `(B, M)` for part assignments `(B, N, parts)`, hidden cells `masks (M, N)` bool
        (one set for every image) and `neighbours` retrieved images per mask."""
        self._check_fitted(class_ids, categories)
        weights = masks.to(self.projection.dtype)
        hidden = weights / weights.sum(1, keepdim=True).clamp_min(1.0)  # (M, N): the mean over hidden cells
        visible = (1.0 - weights) / (1.0 - weights).sum(1, keepdim=True).clamp_min(1.0)
        groups = class_ids.unique().tolist() if groups is None else groups
        scores = torch.empty(assignments.shape[0], masks.shape[0], device=assignments.device)
        for cid in groups:
            rows = None if len(groups) == 1 else torch.nonzero(class_ids == cid).flatten()
            embedded = (assignments if rows is None else assignments[rows]).float() @ self.projection[cid]  # (b, N, r)
            bank = self.cells[cid].float()  # (I, N, r)
            padded = torch.arange(bank.shape[0], device=bank.device) >= self.count[cid]
            image_visible = torch.einsum("bnr,mn->mbr", embedded, visible)
            image_hidden = torch.einsum("bnr,mn->mbr", embedded, hidden)
            bank_visible = torch.einsum("inr,mn->mir", bank, visible)
            bank_hidden = torch.einsum("inr,mn->mir", bank, hidden)
            far = torch.finfo(bank.dtype).max
            context = squared_distances(image_visible, bank_visible).sqrt().masked_fill(padded, far)  # (M, b, I)
            chosen = context.topk(min(neighbours, bank.shape[0]), dim=-1, largest=False).indices
            content = squared_distances(image_hidden, bank_hidden).sqrt().masked_fill(padded, far)
            best = content.gather(-1, chosen).amin(-1).transpose(0, 1)  # (b, M)
            if rows is None:
                scores = best
            else:
                scores[rows] = best
        return scores


# --------------------------------------------------------------------------------------------------
# Fusion
# --------------------------------------------------------------------------------------------------


def fuse(z_scores: torch.Tensor, rule: str) -> torch.Tensor:
    """Combine standardised branch scores `(..., branches)` into one `(...)`.

    `"sum"`: the sum of the z-scores (the paper's rule for its two branches). `"max"`: the largest
    z-score, so a defect that only one branch sees is not diluted by the others. `"max_mean"`: the
    largest plus the mean, so evidence spread over several branches still adds up while a defect one
    branch alone sees keeps its full z-score.
    """
    if rule == "sum":
        return z_scores.sum(-1)
    if rule == "max":
        return z_scores.amax(-1)
    if rule == "max_mean":
        return z_scores.amax(-1) + z_scores.mean(-1)
    raise ValueError(f"fusion rule must be one of {FUSION_RULES}, got {rule!r}")


__all__ = [
    "FUSION_RULES",
    "GLOBAL_DESCRIPTORS",
    "LadmimGlobalBranch",
    "LadmimMemoryBank",
    "LadmimRetrieval",
    "fuse",
    "gaussian_blur",
    "greedy_coreset",
    "kernel_embedding",
    "kmeans",
    "ledoit_wolf_covariance",
    "nearest_distances",
    "squared_distances",
]
