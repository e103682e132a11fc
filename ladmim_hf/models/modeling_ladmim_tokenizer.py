"""The HVQ-Trans tokenizer: frozen CNN features -> encoder -> hierarchical class-switched VQ -> decoder.

Shipped to the Hub next to the weights (``ladmim_hf/models/``); imports only torch, transformers and
its flat siblings, relatively.

Shapes use B = batch, M = masks per image, N = grid cells (grid_size ** 2), L = codebook levels,
K = codebook size, C = feature channels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .backbone_ladmim import LadmimBackbone
from .configuration_ladmim import LadmimTokenizerConfig
from .modeling_ladmim_utils import LadmimPreTrainedModel, _eval_mode, resolve_category_ids

logger = logging.getLogger(__name__)


@dataclass
class LadmimTokenizerOutput(ModelOutput):
    """Output of [`LadmimTokenizerModel.forward`].

    Args:
        loss: feature MSE + `commitment_weight` x summed commitment losses (scalar).
        reconstruction_loss: MSE between reconstructed and backbone features (scalar).
        commitment_loss: commitment losses summed over the top and lower levels (scalar).
        codes: code indices of the lower levels `(B, L, N)`.
        features: the (standardised, see `standardize`) backbone features it reconstructs `(B, C, g, g)`.
        reconstruction: decoder output `(B, C, g, g)`.
        anomaly_map: structural map at input resolution `(B, S, S)` (eval mode only).
        pred_score: structural image score `(B,)` (eval mode only).
        codebook_perplexity: perplexity of the batch's codes per level, top level last `(L + 1,)`.
        codebook_usage: fraction of codes used in the batch per level, top level last `(L + 1,)`.
        dead_codes_restarted: codes restarted during this step (training mode only).
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    features: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None
    pred_score: torch.FloatTensor | None = None
    codebook_perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    dead_codes_restarted: int | None = None


class LadmimAttention(nn.Module):
    """Multi-head attention with separate query/key/value inputs (positions are added by the caller)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        batch, length, dim = query.shape
        heads = self.num_heads

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, heads, dim // heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(
            split(self.q_proj(query)), split(self.k_proj(key)), split(self.v_proj(value)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))


class LadmimFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class LadmimEncoderLayer(nn.Module):
    """Post-norm transformer encoder layer; positions are added to queries and keys only (DETR style)."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.self_attn = LadmimAttention(dim, heads, dropout)
        self.ffn = LadmimFeedForward(dim, hidden, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        qk = x + pos
        x = self.norm1(x + self.dropout(self.self_attn(qk, qk, x)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class LadmimDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention on the target, cross-attention to one quantised level."""

    def __init__(self, dim: int, heads: int, hidden: int, dropout: float):
        super().__init__()
        self.self_attn = LadmimAttention(dim, heads, dropout)
        self.cross_attn = LadmimAttention(dim, heads, dropout)
        self.ffn = LadmimFeedForward(dim, hidden, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, target: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        qk = target + pos
        target = self.norm1(target + self.dropout(self.self_attn(qk, qk, target)))
        target = self.norm2(target + self.dropout(self.cross_attn(target + pos, memory + pos, memory)))
        return self.norm3(target + self.dropout(self.ffn(target)))


class LadmimVectorQuantizer(nn.Module):
    """Class-switched EMA vector quantiser: one `(K, D)` codebook per category.

    Codebooks are buffers trained by an exponential moving average of the vectors assigned to them
    (not by gradients); EMA updates and dead-code restarts run only when `update=True` is passed
    in training mode.
    """

    def __init__(self, num_categories: int, codebook_size: int, dim: int, decay: float, epsilon: float,
                 dead_code_threshold: float, restart_dead_codes: bool):
        super().__init__()
        self.codebook_size = codebook_size
        self.dim = dim
        self.decay = decay
        self.epsilon = epsilon
        self.dead_code_threshold = dead_code_threshold
        self.restart_dead_codes = restart_dead_codes
        embed = torch.randn(num_categories, codebook_size, dim)
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("cluster_size", torch.zeros(num_categories, codebook_size))
        self.register_buffer("restart_count", torch.zeros((), dtype=torch.long))

    def codebooks(self, class_ids: torch.Tensor) -> torch.Tensor:
        """Codebook of each sample `(B, K, D)`."""
        return self.embed.index_select(0, class_ids)

    def nearest(self, x: torch.Tensor, class_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes by squared Euclidean distance: `x (B, N, D)` -> indices `(B, N)`, vectors `(B, N, D)`."""
        books = self.codebooks(class_ids)
        distances = (
            x.pow(2).sum(-1, keepdim=True)
            - 2 * torch.bmm(x, books.transpose(1, 2))
            + books.pow(2).sum(-1)[:, None, :]
        )
        indices = distances.argmin(-1)
        vectors = torch.gather(books, 1, indices[..., None].expand(-1, -1, books.shape[-1]))
        return indices, vectors

    def forward(self, x: torch.Tensor, class_ids: torch.Tensor, update: bool = False):
        """Quantise `x (B, N, D)`.

        Returns:
            straight-through quantised vectors `(B, N, D)`, indices `(B, N)`, commitment loss (scalar)
            and the number of restarted codes.
        """
        indices, vectors = self.nearest(x.detach().float(), class_ids)
        vectors = vectors.to(x.dtype)
        restarted = 0
        if update and self.training:
            restarted = self._ema_update(x.detach().float(), indices, class_ids)
        commitment = F.mse_loss(x, vectors.detach())
        quantized = x + (vectors - x).detach()
        return quantized, indices, commitment, restarted

    @torch.no_grad()
    def _ema_update(self, x: torch.Tensor, indices: torch.Tensor, class_ids: torch.Tensor) -> int:
        num_categories, size, dim = self.embed.shape
        flat_index = (class_ids[:, None] * size + indices).reshape(-1)
        flat_x = x.reshape(-1, dim)
        counts = torch.zeros(num_categories * size, device=x.device).index_add_(0, flat_index, torch.ones_like(flat_index, dtype=torch.float32))
        sums = torch.zeros(num_categories * size, dim, device=x.device).index_add_(0, flat_index, flat_x)
        counts = counts.view(num_categories, size)
        sums = sums.view(num_categories, size, dim)
        present = torch.zeros(num_categories, dtype=torch.bool, device=x.device)
        present[class_ids] = True
        # Only categories in the batch decay: an absent category's codebook must not drift.
        decay = torch.where(present, torch.full_like(present, self.decay, dtype=torch.float32), torch.ones_like(present, dtype=torch.float32))
        self.cluster_size.mul_(decay[:, None]).add_((1 - decay)[:, None] * counts)
        self.embed_avg.mul_(decay[:, None, None]).add_((1 - decay)[:, None, None] * sums)
        total = self.cluster_size.sum(-1, keepdim=True)
        smoothed = (self.cluster_size + self.epsilon) / (total + size * self.epsilon) * total
        self.embed.copy_(torch.where(present[:, None, None], self.embed_avg / smoothed.clamp(min=1e-12)[..., None], self.embed))
        if not self.restart_dead_codes:
            return 0
        restarted = 0
        for category in torch.nonzero(present).flatten().tolist():
            dead = torch.nonzero(self.cluster_size[category] < self.dead_code_threshold).flatten()
            if dead.numel() == 0:
                continue
            pool = x[class_ids == category].reshape(-1, dim)
            pick = torch.randint(0, pool.shape[0], (dead.numel(),), device=x.device)
            self.embed[category, dead] = pool[pick]
            self.embed_avg[category, dead] = pool[pick]
            self.cluster_size[category, dead] = 1.0
            restarted += dead.numel()
        self.restart_count.add_(restarted)
        return restarted


def _perplexity_and_usage(indices: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.bincount(indices.reshape(-1), minlength=codebook_size).float()
    probs = counts / counts.sum().clamp(min=1)
    entropy = -(probs * probs.clamp(min=1e-12).log()).sum()
    return entropy.exp(), (counts > 0).float().mean()


class LadmimPositionTables(nn.Module):
    """Learned 2-D positions: a row table and a column table, each `dim / 2` wide."""

    def __init__(self, grid_size: int, dim: int):
        super().__init__()
        self.grid_size = grid_size
        self.row = nn.Parameter(torch.rand(grid_size, dim // 2))
        self.col = nn.Parameter(torch.rand(grid_size, dim // 2))


    def init_ladmim_weights(self, std: float) -> None:
        nn.init.uniform_(self.row)
        nn.init.uniform_(self.col)

    def forward(self) -> torch.Tensor:
        """Positions `(1, N, dim)` in row-major order."""
        g = self.grid_size
        pos = torch.cat([self.col[None, :, :].expand(g, g, -1), self.row[:, None, :].expand(g, g, -1)], dim=-1)
        return pos.reshape(1, g * g, -1)


class LadmimClassSwitchedHead(nn.Module):
    """One `Linear(in_dim -> out_dim)` per category, chosen per sample."""

    def __init__(self, num_categories: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_categories, out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(num_categories, out_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)


    def init_ladmim_weights(self, std: float) -> None:
        nn.init.trunc_normal_(self.weight, std=std, a=-std, b=std)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """`x (B, N, in_dim)` -> `(B, N, out_dim)`."""
        return torch.baddbmm(self.bias[class_ids][:, None, :], x, self.weight[class_ids].transpose(1, 2))


class LadmimTokenizerModel(LadmimPreTrainedModel):
    """HVQ-Trans tokenizer: frozen CNN features -> encoder -> hierarchical class-switched VQ -> decoder.

    It turns an image into `num_levels` grids of discrete codes (the predictor's targets) and
    reconstructs the CNN features; the reconstruction error is the structural anomaly map.
    """

    config_class = LadmimTokenizerConfig
    base_model_prefix = "tokenizer"

    def __init__(self, config: LadmimTokenizerConfig):
        super().__init__(config)
        if config.num_levels > config.num_encoder_layers:
            raise ValueError(f"num_levels ({config.num_levels}) cannot exceed num_encoder_layers ({config.num_encoder_layers})")
        self.backbone = LadmimBackbone(config.backbone, config.backbone_taps, config.grid_size, config.image_size)
        if config.feature_channels is None:
            config.feature_channels = self.backbone.out_channels
        if self.backbone.out_channels != config.feature_channels:
            raise ValueError(
                f"feature_channels={config.feature_channels} but backbone {config.backbone} with taps "
                f"{config.backbone_taps} gives {self.backbone.out_channels} channels"
            )
        dim, channels, cats = config.hidden_size, config.feature_channels, config.num_categories
        self.input_proj = nn.Linear(channels, dim)
        self.position_tables = LadmimPositionTables(config.grid_size, dim)
        self.encoder = nn.ModuleList([
            LadmimEncoderLayer(dim, config.num_attention_heads, config.intermediate_size, config.dropout)
            for _ in range(config.num_encoder_layers)
        ])
        vq_args = (config.codebook_size,)
        vq_kwargs = dict(decay=config.ema_decay, epsilon=config.ema_epsilon,
                         dead_code_threshold=config.dead_code_threshold, restart_dead_codes=config.restart_dead_codes)
        self.top_quantizer = LadmimVectorQuantizer(cats, *vq_args, dim, **vq_kwargs)
        self.quantizers = nn.ModuleList([
            LadmimVectorQuantizer(cats, *vq_args, 2 * dim, **vq_kwargs) for _ in range(config.num_levels)
        ])
        self.decoder = nn.ModuleList([
            LadmimDecoderLayer(2 * dim, config.num_attention_heads, config.intermediate_size, config.dropout)
            for _ in range(config.num_decoder_layers)
        ])
        self.decoder_norm = nn.LayerNorm(2 * dim)
        self.output_heads = LadmimClassSwitchedHead(cats, 2 * dim, channels)
        # Identity until `set_feature_statistics` (training stage 0) fills them in.
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("feature_std", torch.ones(channels))
        if config.residual_normalization == "cell_channel":
            # Identity until `fit_residual_statistics` fills a category in.
            grid = (cats, channels, config.grid_size, config.grid_size)
            self.register_buffer("residual_mean", torch.zeros(grid))
            self.register_buffer("residual_var", torch.ones(grid))
            self.register_buffer("residual_fitted", torch.zeros(cats, dtype=torch.bool))
        self._warned_unfitted: set[int] = set()
        self.post_init()

    @property
    def categories(self) -> list[str]:
        return list(self.config.categories)

    def category_ids(self, category, batch_size: int) -> torch.Tensor:
        return resolve_category_ids(self.config.categories, category, batch_size, device=self.device)

    @torch.no_grad()
    def code_kernel(self, category, bandwidth: float = 1.0) -> torch.Tensor:
        """RBF kernel between one category's codebook vectors, per level `(L, K, K)`:
        exp(-|e_i - e_j|^2 / (bandwidth * median of the level's nonzero squared distances)).
        The similarity behind `loss_type="codebook_mmd"` and `histogram_distance="codebook_mmd"`."""
        class_id = self.category_ids(category, 1)
        kernels = []
        for quantizer in self.quantizers:
            codes = quantizer.codebooks(class_id)[0].float()
            squared = torch.cdist(codes, codes).pow(2)
            positive = squared[squared > 0]
            scale = positive.median() if positive.numel() else squared.new_tensor(1.0)
            kernels.append(torch.exp(-squared / (bandwidth * scale)))
        return torch.stack(kernels)

    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen multi-scale CNN features `(B, 3, S, S)` -> `(B, C, g, g)`."""
        with torch.no_grad():
            return self.backbone(pixel_values)

    @torch.no_grad()
    def set_feature_statistics(self, features: torch.Tensor) -> None:
        """Per-channel mean and std of raw backbone features `(num_images, C, g, g)` of the training
        images (used when `config.standardize_features`)."""
        flat = features.transpose(0, 1).reshape(features.shape[1], -1).double()
        self.feature_mean.copy_(flat.mean(1).to(self.feature_mean))
        self.feature_std.copy_(flat.std(1).clamp(min=1e-6).to(self.feature_std))

    @torch.no_grad()
    def fit_residual_statistics(self, features: torch.Tensor, category, batch_size: int = 64) -> None:
        """Per cell and channel mean and variance of the reconstruction error on one category's normal
        images (raw backbone features `(num_images, C, g, g)`), for
        `config.residual_normalization="cell_channel"`. Codebooks are not updated."""
        if self.config.residual_normalization != "cell_channel":
            raise ValueError("fit_residual_statistics needs config.residual_normalization='cell_channel'")
        if len(features) < 2:
            raise ValueError(f"fit_residual_statistics needs at least 2 images, got {len(features)}")
        class_id = int(self.category_ids(category, 1)[0])
        total = total_sq = None
        with _eval_mode(self):
            for chunk in features.split(batch_size):
                chunk = chunk.to(self.device)
                out = self(features=chunk, category=class_id, update_codebooks=False, return_maps=False)
                # float64 sums on the CPU: exact enough for many images, and MPS has no float64
                residual = (out.reconstruction - out.features).to("cpu", torch.float64)
                total = residual.sum(0) if total is None else total + residual.sum(0)
                total_sq = residual.pow(2).sum(0) if total_sq is None else total_sq + residual.pow(2).sum(0)
        count = len(features)
        mean = total / count
        variance = ((total_sq - count * mean.pow(2)) / (count - 1)).clamp(min=0)
        self.residual_mean[class_id] = mean.to(self.residual_mean)
        self.residual_var[class_id] = variance.to(self.residual_var)
        self.residual_fitted[class_id] = True

    def standardize(self, features: torch.Tensor) -> torch.Tensor:
        """Raw backbone features `(B, C, g, g)` -> what the tokenizer reconstructs and the predictor
        reads: per-channel standardised when `config.standardize_features`, else unchanged."""
        if not self.config.standardize_features:
            return features
        shape = (1, -1, 1, 1)
        return (features - self.feature_mean.view(shape).to(features.dtype)) / self.feature_std.view(shape).to(features.dtype)

    def _quantize(self, features: torch.Tensor, class_ids: torch.Tensor, update: bool):
        """Encoder + hierarchical VQ. Returns quantised lower levels (L x `(B, N, 2E)`), codes
        `(B, L, N)`, top codes `(B, N)`, the pre-quantisation bottom-level vectors, commitment sum
        and the number of restarted codes."""
        tokens = features.flatten(2).transpose(1, 2)
        pos = self.position_tables()
        hidden = self.input_proj(tokens)
        encoded = [hidden]
        for layer in self.encoder:
            hidden = layer(hidden, pos)
            encoded.append(hidden)
        top, top_codes, commitment, restarted = self.top_quantizer(encoded[-1], class_ids, update)
        quantized, codes, bottom_input = [], [], None
        depth = len(encoded) - 1
        for level, quantizer in enumerate(self.quantizers):
            level_input = torch.cat([encoded[depth - 1 - level], top], dim=-1)
            q, idx, c, r = quantizer(level_input, class_ids, update)
            quantized.append(q)
            codes.append(idx)
            commitment = commitment + c
            restarted += r
            bottom_input = level_input
        return quantized, torch.stack(codes, 1), top_codes, bottom_input, commitment, restarted

    def _decode(self, quantized: list[torch.Tensor], class_ids: torch.Tensor) -> torch.Tensor:
        pos = self.position_tables().repeat(1, 1, 2)
        target = quantized[0]
        for i, layer in enumerate(self.decoder):
            target = layer(target, quantized[i % len(quantized)], pos)
        out = self.output_heads(self.decoder_norm(target), class_ids)
        g = self.config.grid_size
        return out.transpose(1, 2).reshape(out.shape[0], -1, g, g)

    def encode(self, pixel_values: torch.Tensor | None = None, category=None,
               features: torch.Tensor | None = None) -> torch.LongTensor:
        """Code indices of the lower levels `(B, L, N)` (row-major grid cells). No EMA updates."""
        if features is None:
            features = self.extract_features(pixel_values)
        return self.encode_standardized(self.standardize(features), category)

    def encode_standardized(self, features: torch.Tensor, category=None) -> torch.LongTensor:
        """`encode` of features already standardised (`standardize`): codes `(B, L, N)`. No EMA updates."""
        class_ids = self.category_ids(category, features.shape[0])
        _, codes, _, _, _, _ = self._quantize(features, class_ids, update=False)
        return codes

    def ot_map(self, bottom_input: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """OT-style term `(B, N)`: expected cosine dissimilarity between each bottom-level vector and
        the codebook, weighted by a softmax over codes of `f . e_k / ot_temperature`."""
        books = self.quantizers[-1].codebooks(class_ids)
        logits = torch.bmm(bottom_input, books.transpose(1, 2)) / self.config.ot_temperature
        cosine = torch.bmm(F.normalize(bottom_input, dim=-1), F.normalize(books, dim=-1).transpose(1, 2))
        return (logits.softmax(-1) * (1 - cosine)).sum(-1)

    def structural_maps(self, features: torch.Tensor, reconstruction: torch.Tensor,
                        bottom_input: torch.Tensor | None = None, class_ids: torch.Tensor | None = None,
                        use_ot: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Structural anomaly map at input resolution `(B, S, S)` and image score `(B,)`.

        The map is the per-cell L2 norm of the reconstruction error (normalised per cell and channel
        with `residual_normalization="cell_channel"`; plus `ot_weight` x the OT term when enabled),
        bilinearly upsampled; the score is the max of its `score_filter_size` mean
        filter.
        """
        config = self.config
        residual = reconstruction - features
        if config.residual_normalization == "cell_channel":
            if class_ids is None:
                raise ValueError("residual_normalization='cell_channel' needs class_ids")
            # reads values: skipped while `ladmim export` traces (it checks before tracing)
            unfitted = set() if torch.compiler.is_compiling() else (
                set(class_ids[~self.residual_fitted[class_ids]].tolist()) - self._warned_unfitted)
            if unfitted:
                logger.warning("no residual statistics for categories %s (fit_residual_statistics); their structural "
                               "maps are not normalised", [self.categories[i] for i in sorted(unfitted)])
                self._warned_unfitted.update(unfitted)
            mean, variance = self.residual_mean[class_ids], self.residual_var[class_ids]
            floor = config.residual_variance_floor * variance.mean((1, 2, 3), keepdim=True)
            grid = ((residual - mean).pow(2) / (variance + floor)).sum(1).sqrt()
        else:
            grid = residual.pow(2).sum(1).sqrt()
        use_ot = config.use_ot_score if use_ot is None else use_ot
        if use_ot and bottom_input is not None:
            grid = grid + config.ot_weight * self.ot_map(bottom_input, class_ids).view_as(grid)
        size = config.image_size
        full = F.interpolate(grid[:, None], size=(size, size), mode="bilinear", align_corners=True)
        kernel = min(config.score_filter_size, size)
        score = F.avg_pool2d(full, kernel_size=kernel, stride=1).flatten(1).amax(-1)
        return full[:, 0], score

    def forward(self, pixel_values: torch.Tensor | None = None, category=None,
                features: torch.Tensor | None = None, update_codebooks: bool = True,
                return_maps: bool | None = None) -> LadmimTokenizerOutput:
        """Reconstruct the backbone features and compute the HVQ-Trans loss.

        Args:
            pixel_values: images `(B, 3, S, S)` (ImageNet-normalised); or give `features`.
            category: category name(s) or ids `(B,)` selecting each sample's codebooks and head.
            features: precomputed raw backbone features `(B, C, g, g)` (`extract_features`).
            update_codebooks: EMA codebook updates and dead-code restarts (training mode only).
            return_maps: compute the structural map and score (default: in eval mode).
        """
        if features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or features")
            features = self.extract_features(pixel_values)
        features = self.standardize(features)
        class_ids = self.category_ids(category, features.shape[0])
        quantized, codes, top_codes, bottom_input, commitment, restarted = self._quantize(
            features, class_ids, update=update_codebooks and self.training
        )
        reconstruction = self._decode(quantized, class_ids)
        reconstruction_loss = F.mse_loss(reconstruction, features)
        loss = reconstruction_loss + self.config.commitment_weight * commitment
        anomaly_map = score = None
        if return_maps if return_maps is not None else not self.training:
            anomaly_map, score = self.structural_maps(features, reconstruction.detach(), bottom_input.detach(), class_ids)
        with torch.no_grad():
            stats = [_perplexity_and_usage(codes[:, level], self.config.codebook_size) for level in range(codes.shape[1])]
            stats.append(_perplexity_and_usage(top_codes, self.config.codebook_size))
        return LadmimTokenizerOutput(
            loss=loss, reconstruction_loss=reconstruction_loss, commitment_loss=commitment, codes=codes,
            features=features, reconstruction=reconstruction, anomaly_map=anomaly_map, pred_score=score,
            codebook_perplexity=torch.stack([s[0] for s in stats]), codebook_usage=torch.stack([s[1] for s in stats]),
            dead_codes_restarted=restarted,
        )

    @torch.no_grad()
    def tokenize(self, pixel_values: torch.Tensor | None = None, category=None, features: torch.Tensor | None = None,
                 use_ot: bool | None = None) -> dict[str, torch.Tensor]:
        """Everything scoring needs in one pass, without EMA updates or dropout.

        Returns:
            dict with `features (B, C, g, g)` (standardised: the predictor's input), `codes (B, L, N)`, `structural_map (B, S, S)` and
            `structural_score (B,)`.
        """
        with _eval_mode(self):
            if features is None:
                features = self.extract_features(pixel_values)
            features = self.standardize(features)
            class_ids = self.category_ids(category, features.shape[0])
            quantized, codes, _, bottom_input, _, _ = self._quantize(features, class_ids, update=False)
            reconstruction = self._decode(quantized, class_ids)
            structural_map, structural_score = self.structural_maps(features, reconstruction, bottom_input, class_ids, use_ot)
        return {"features": features, "codes": codes, "structural_map": structural_map, "structural_score": structural_score}


__all__ = ["LadmimTokenizerModel", "LadmimTokenizerOutput"]
