"""LADMIM models: the HVQ-Trans tokenizer, the LAViT histogram predictor and the anomaly detector.

Shipped to the Hub next to the weights and loaded with ``trust_remote_code=True``: imports only
torch, numpy, transformers and the flat sibling files (``configuration_ladmim``, ``backbone_ladmim``,
``branches_ladmim``, ``masking``), never the rest of ``ladmim_hf``.

Shapes use B = batch, M = masks per image, N = grid cells (grid_size ** 2), L = codebook levels,
K = codebook size, C = feature channels.
"""

from __future__ import annotations

import logging
import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .backbone_ladmim import LadmimBackbone
from .branches_ladmim import LadmimGlobalBranch, LadmimMemoryBank, fuse
from .configuration_ladmim import BRANCHES, LadmimConfig, LadmimPredictorConfig, LadmimTokenizerConfig, check_calibration
from .masking import BlockMaskGenerator

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


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


@dataclass
class LadmimPredictorOutput(ModelOutput):
    """Output of [`LadmimPredictorModel.forward`].

    Args:
        loss: histogram loss (scalar) when `labels` were given.
        logits: histogram logits `(B, L, K)`, or `(B, M, L, K)` for several masks per image; their
            softmax is the predicted histogram. From the hist token, except for `loss_type="token_ce"`:
            there, the log of the mean of the per-cell code distributions over the masked cells.
        token_logits: per-cell logits `(B, N, L, K)` (only for `loss_type="token_ce"` with `labels`).
        last_hidden_state: final-norm token states `(B, 2 + N, D)` (only if requested).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    token_logits: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


@dataclass
class LadmimAnomalyOutput(ModelOutput):
    """Output of [`LadmimForAnomalyDetection.forward`] (names follow anomalib where they overlap).

    Every branch score is raw (unstandardised); `pred_score` and `anomaly_map` combine the branches
    named in `config.fused_branches`, each standardised on normal validation images, by
    `config.fusion_rule`. Branches that are switched off leave their fields `None`.

    Args:
        pred_score: fused score `(B,)`.
        pred_label: `pred_score > threshold` `(B,)` bool.
        logical_score: mean over masks of the per-mask histogram distance (`config.histogram_distance`) `(B,)`.
        structural_score: HVQ-Trans image score `(B,)`.
        memory_bank_score: largest nearest-neighbour patch distance to the category's memory bank `(B,)`.
        global_score: Mahalanobis distance of the image's pooled features `(B,)`.
        anomaly_map: fused map of the fused branches that have one `(B, S, S)`.
        logical_map: each mask's discrepancy spread over the cells it hid `(B, S, S)`.
        structural_map: HVQ-Trans reconstruction map `(B, S, S)`.
        memory_bank_map: nearest-neighbour distances, upsampled and smoothed `(B, S, S)`.
        mask_scores: per-mask histogram distance `(B, M)`.
        masks: the masks used `(B, M, N)`.
        predicted_histograms: `softmax` of the hist logits `(B, M, L, K)` (if requested).
        target_histograms: true code histograms of the masked cells `(B, M, L, K)` (if requested).
    """

    pred_score: torch.FloatTensor | None = None
    pred_label: torch.BoolTensor | None = None
    logical_score: torch.FloatTensor | None = None
    structural_score: torch.FloatTensor | None = None
    anomaly_map: torch.FloatTensor | None = None
    logical_map: torch.FloatTensor | None = None
    structural_map: torch.FloatTensor | None = None
    mask_scores: torch.FloatTensor | None = None
    masks: torch.BoolTensor | None = None
    predicted_histograms: torch.FloatTensor | None = None
    target_histograms: torch.FloatTensor | None = None
    memory_bank_score: torch.FloatTensor | None = None
    memory_bank_map: torch.FloatTensor | None = None
    global_score: torch.FloatTensor | None = None

    def branch_scores(self) -> dict[str, torch.Tensor]:
        """`{branch: raw score (B,)}` for every branch the detector computed."""
        return {name: getattr(self, f"{name}_score") for name in BRANCHES if getattr(self, f"{name}_score") is not None}

    def branch_maps(self) -> dict[str, torch.Tensor]:
        """`{branch: raw map (B, S, S)}` for every computed branch that has a map (the global one has none)."""
        return {name: getattr(self, f"{name}_map", None) for name in BRANCHES
                if getattr(self, f"{name}_map", None) is not None}


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _autocast_dtype(value) -> torch.dtype | None:
    """`None`/"fp32" -> None (no autocast); "bf16"/"fp16" or a half dtype -> that dtype."""
    if value is None or value in ("fp32", "float32", torch.float32):
        return None
    if isinstance(value, torch.dtype) and value in (torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str) and value.lower() in _AUTOCAST_DTYPES:
        return _AUTOCAST_DTYPES[value.lower()]
    raise ValueError(f"predictor_dtype must be None, 'fp32', 'bf16' or 'fp16', got {value!r}")


def kernel_histogram_distance(difference: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Sum over levels of sqrt(d^T G d) (an MMD between two histograms under the kernel G).

    Args:
        difference: predicted minus true histograms `(B, M, L, K)`.
        kernel: `(L, K, K)` for all rows, or `(B, L, K, K)` per row.

    Returns:
        `(B, M)`.
    """
    difference = difference.float()
    if kernel.dim() == 3:
        quadratic = torch.einsum("bmlk,lkj,bmlj->bml", difference, kernel.float(), difference)
    else:
        quadratic = torch.einsum("bmlk,blkj,bmlj->bml", difference, kernel.float(), difference)
    # The clamp keeps the sqrt's gradient finite where prediction and target agree.
    return quadratic.clamp(min=1e-12).sqrt().sum(-1)


def code_histograms(codes: torch.Tensor, masks: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """Normalised histograms of the codes under each mask.

    Args:
        codes: `(B, L, N)` integer codes.
        masks: `(B, N)` or `(B, M, N)` bool.

    Returns:
        `(B, L, K)` or `(B, M, L, K)` float histograms summing to 1 over K (0 where a mask is empty).
    """
    squeeze = masks.dim() == 2
    if squeeze:
        masks = masks[:, None]
    batch, num_masks, cells = masks.shape
    levels = codes.shape[1]
    weights = masks.to(torch.float32)[:, :, None, :].expand(batch, num_masks, levels, cells)
    index = codes[:, None].expand(batch, num_masks, levels, cells).long()
    hist = torch.zeros(batch, num_masks, levels, codebook_size, dtype=torch.float32, device=codes.device)
    hist.scatter_add_(-1, index, weights)
    hist = hist / masks.sum(-1).clamp(min=1).to(torch.float32)[:, :, None, None]
    return hist[:, 0] if squeeze else hist


def resolve_category_ids(categories: Sequence[str], category, batch_size: int, device=None) -> torch.Tensor:
    """Category name(s) or id(s) -> LongTensor `(B,)`, with errors naming unknown categories."""
    if isinstance(category, torch.Tensor):
        ids = category.to(device=device, dtype=torch.long).reshape(-1)
        if ids.numel() == 1 and batch_size > 1:
            ids = ids.expand(batch_size)
    else:
        names = [category] * batch_size if isinstance(category, (str, int)) else list(category)
        if len(names) != batch_size:
            raise ValueError(f"got {len(names)} categories for a batch of {batch_size} images")
        id_list = []
        for name in names:
            if isinstance(name, str):
                if name not in categories:
                    raise ValueError(f"unknown category {name!r}; this model was trained on {list(categories)}")
                id_list.append(categories.index(name))
            else:
                id_list.append(int(name))
        ids = torch.tensor(id_list, dtype=torch.long, device=device)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(categories)):
        raise ValueError(f"category ids must be in 0..{len(categories) - 1}, got {ids.tolist()}")
    return ids


@contextmanager
def _eval_mode(module: nn.Module):
    """Temporarily switch `module` to eval mode (scoring must never run dropout or EMA updates)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


# --------------------------------------------------------------------------------------------------
# Tokenizer (HVQ-Trans)
# --------------------------------------------------------------------------------------------------


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


class LadmimPreTrainedModel(PreTrainedModel):
    """Weight initialisation and Hub plumbing shared by the LADMIM models."""

    config_class = LadmimConfig
    base_model_prefix = "ladmim"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = False
    _no_split_modules = ["LadmimPredictorLayer", "LadmimEncoderLayer", "LadmimDecoderLayer"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, then `check_finite_weights` (a corrupt checkpoint fails here,
        naming the tensor, instead of scoring every image NaN)."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).check_finite_weights()
        return loaded

    @torch.no_grad()
    def check_finite_weights(self) -> None:
        """Raise `ValueError` naming the first parameter or buffer that holds NaN or inf."""
        for name, tensor in self.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"weight {name!r} holds NaN or inf values: the checkpoint is corrupt; "
                                 "retrain or download the model again")

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, LadmimBackbone):
            return  # the frozen CNN keeps its own init (or the ImageNet weights loaded into it)
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            scale = getattr(module, "_init_scale", 1.0)
            # Truncated at +-1 std, as the official LAViT init (BEiT's trunc_normal_ with a=-std, b=std).
            nn.init.trunc_normal_(module.weight, std=std * scale, a=-std * scale, b=std * scale)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, LadmimPositionTables):
            nn.init.uniform_(module.row)
            nn.init.uniform_(module.col)
        elif isinstance(module, LadmimClassSwitchedHead):
            nn.init.trunc_normal_(module.weight, std=std, a=-std, b=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, LadmimPredictorEmbeddings):
            for tensor in (module.cls_token, module.hist_token, module.mask_token, module.position_embeddings):
                nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)
        elif isinstance(module, LadmimPredictorLayer) and module.gamma_1 is not None:
            nn.init.constant_(module.gamma_1, module.layer_scale_init_value)
            nn.init.constant_(module.gamma_2, module.layer_scale_init_value)
        elif isinstance(module, LadmimPredictorAttention) and module.q_bias is not None:
            nn.init.zeros_(module.q_bias)
            nn.init.zeros_(module.v_bias)


class LadmimPositionTables(nn.Module):
    """Learned 2-D positions: a row table and a column table, each `dim / 2` wide."""

    def __init__(self, grid_size: int, dim: int):
        super().__init__()
        self.grid_size = grid_size
        self.row = nn.Parameter(torch.rand(grid_size, dim // 2))
        self.col = nn.Parameter(torch.rand(grid_size, dim // 2))

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
        features = self.standardize(features)
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
            unfitted = set(class_ids[~self.residual_fitted[class_ids]].tolist()) - self._warned_unfitted
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


# --------------------------------------------------------------------------------------------------
# Predictor (LAViT)
# --------------------------------------------------------------------------------------------------


class LadmimPredictorEmbeddings(nn.Module):
    """Patch embedding of the feature grid (one token per `patch_size x patch_size` cells; 1x1 in the
    paper), mask token, cls and hist tokens, absolute positions."""

    def __init__(self, config: LadmimPredictorConfig):
        super().__init__()
        dim = config.hidden_size
        self.grid_size, self.patch_size = config.grid_size, config.patch_size
        self.patch_embeddings = nn.Linear(config.input_channels * config.patch_size**2, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.hist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, config.num_tokens + 2, dim))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def embed_patches(self, features: torch.Tensor) -> torch.Tensor:
        """`(B, C, g, g)` or `(B, N, C)` -> patch embeddings `(B, T, D)`, T = (g / patch_size)**2."""
        if self.patch_size > 1:
            if features.dim() == 3:
                features = features.transpose(1, 2).unflatten(-1, (self.grid_size, self.grid_size))
            # (B, C * p * p, g / p, g / p): channel c * p * p + i * p + j holds cell (i, j) of a patch
            features = F.pixel_unshuffle(features, self.patch_size)
        if features.dim() == 4:
            features = features.flatten(2).transpose(1, 2)
        return self.patch_embeddings(features)

    def forward(self, patches: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Patch embeddings `(B, T, D)` and token masks `(B, M, T)` -> token sequences `(B * M, 2 + T, D)`.

        The patch embedding is computed once per image and shared by all of its masks.
        """
        batch, num_masks, length = bool_masked_pos.shape
        dim = patches.shape[-1]
        tokens = torch.where(bool_masked_pos[..., None], self.mask_token.to(patches.dtype), patches[:, None])
        tokens = tokens.reshape(batch * num_masks, length, dim)
        special = torch.cat([self.cls_token, self.hist_token], dim=1).to(patches.dtype).expand(batch * num_masks, -1, -1)
        return self.dropout(torch.cat([special, tokens], dim=1) + self.position_embeddings.to(patches.dtype))


class LadmimPredictorAttention(nn.Module):
    """BEiT attention: one bias-free qkv projection plus learnable q and v biases (k bias fixed at 0),
    computed with `scaled_dot_product_attention`."""

    def __init__(self, config: LadmimPredictorConfig, layer_index: int):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        if config.use_qv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.proj._init_scale = 1.0 / math.sqrt(2.0 * (layer_index + 1))
        self.attention_dropout = config.attention_probs_dropout_prob
        self.proj_dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, query_index: int | None = None) -> torch.Tensor:
        """Attention output `(B, T, D)`; with `query_index`, only that token's row `(B, 1, D)` (keys and
        values of all tokens, one query: exact, and cheaper when only one token's output is used)."""
        batch, length, dim = x.shape
        head_dim = dim // self.num_heads
        bias = None if self.q_bias is None else torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        if query_index is None:
            q, k, v = F.linear(x, self.qkv.weight, bias).view(batch, length, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            weight = self.qkv.weight
            q_bias, kv_bias = (None, None) if bias is None else (bias[:dim], bias[dim:])
            q = F.linear(x[:, query_index:query_index + 1], weight[:dim], q_bias).view(batch, 1, self.num_heads, head_dim).transpose(1, 2)
            k, v = F.linear(x, weight[dim:], kv_bias).view(batch, length, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attention_dropout if self.training else 0.0)
        return self.proj_dropout(self.proj(out.transpose(1, 2).reshape(batch, q.shape[2], dim)))


class LadmimPredictorLayer(nn.Module):
    """Pre-norm transformer block with LayerScale."""

    def __init__(self, config: LadmimPredictorConfig, layer_index: int):
        super().__init__()
        dim = config.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = LadmimPredictorAttention(config, layer_index)
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(dim, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, dim)
        self.fc2._init_scale = 1.0 / math.sqrt(2.0 * (layer_index + 1))
        self.act = nn.GELU() if config.hidden_act == "gelu" else nn.SiLU() if config.hidden_act in ("silu", "swish") else nn.ReLU()
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layer_scale_init_value = float(config.layer_scale_init_value)
        if config.layer_scale_init_value > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), float(config.layer_scale_init_value)))
            self.gamma_2 = nn.Parameter(torch.full((dim,), float(config.layer_scale_init_value)))
        else:
            self.gamma_1 = self.gamma_2 = None

    def forward(self, x: torch.Tensor, query_index: int | None = None) -> torch.Tensor:
        """Block output `(B, T, D)`; with `query_index`, that token's output alone `(B, 1, D)`. Exact: a
        token's output needs only its own query, attention row and MLP, plus every token's key and value."""
        attn = self.attn(self.norm1(x), query_index)
        if query_index is not None:
            x = x[:, query_index:query_index + 1]
        x = x + (attn if self.gamma_1 is None else self.gamma_1 * attn)
        mlp = self.dropout(self.fc2(self.act(self.fc1(self.norm2(x)))))
        return x + (mlp if self.gamma_2 is None else self.gamma_2 * mlp)


def masked_mean_log_probs(cell_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Log of the mean code distribution over the masked cells.

    Args:
        cell_logits: per-cell logits `(S, N, L, K)`; masks: `(S, N)` bool, at least one cell set per row.

    Returns:
        `(S, L, K)` log-probabilities: `log(mean over masked n of softmax(cell_logits[:, n]))`.
    """
    log_probs = cell_logits.float().log_softmax(-1).masked_fill(~masks[:, :, None, None], float("-inf"))
    count = masks.sum(1).clamp(min=1).to(log_probs.dtype)
    return torch.logsumexp(log_probs, dim=1) - count.log()[:, None, None]


class LadmimPredictorModel(LadmimPreTrainedModel):
    """LAViT: predicts, from the masked feature grid, the histogram of codes in the masked region.

    A BEiT-style ViT over the feature grid (one token per cell) with an extra hist token whose
    output gives `(L, K)` logits, one code distribution per codebook level. With
    `loss_type="token_ce"` every masked cell predicts its own code instead, and the histogram is the
    mean of those predictions (the hist token is then unused).
    """

    config_class = LadmimPredictorConfig
    base_model_prefix = "predictor"
    main_input_name = "features"

    def __init__(self, config: LadmimPredictorConfig):
        super().__init__(config)
        self.embeddings = LadmimPredictorEmbeddings(config)
        self.layers = nn.ModuleList([LadmimPredictorLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        # token_ce: each patch token predicts the codes of its patch_size**2 cells
        cells_per_token = config.patch_size**2 if config.loss_type == "token_ce" else 1
        self.head = nn.Linear(config.hidden_size, cells_per_token * config.num_levels * config.codebook_size)
        self.post_init()

    def inference_bytes_per_sequence(self) -> int:
        """An upper estimate of the float32 activations one (image, mask) sequence keeps alive in an
        inference forward: token states and the MLP's hidden layer, one block's attention scores, and
        the per-cell logits of `token_ce` (`(N, L, K)`, twice for their log-softmax)."""
        config = self.config
        tokens = config.num_tokens + 2
        states = tokens * config.hidden_size * (4 + config.mlp_ratio)
        attention = config.num_attention_heads * tokens * tokens
        cells = 2 * config.num_patches * config.num_levels * config.codebook_size if config.loss_type == "token_ce" else 0
        return int(4 * (states + attention + cells))

    def token_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Cell masks `(..., N)` -> token masks `(..., T)`: a patch token is masked when any of its cells
        is (so no masked cell is ever visible); identical for patch_size 1."""
        p, g = self.config.patch_size, self.config.grid_size
        if p == 1:
            return masks
        grid = masks.unflatten(-1, (g // p, p, g // p, p))
        return grid.any(-1).any(-2).flatten(-2)

    def cell_logits(self, token_hidden: torch.Tensor) -> torch.Tensor:
        """Normed patch-token states `(S, T, D)` -> per-cell code logits `(S, N, L, K)` (token_ce)."""
        config = self.config
        p, side = config.patch_size, config.grid_size // config.patch_size
        logits = self.head(token_hidden)
        if p == 1:
            return logits.unflatten(-1, (config.num_levels, config.codebook_size))
        # (S, rows, cols, i, j, L * K) -> (S, rows, i, cols, j, L * K): row-major cells of the full grid
        logits = logits.view(logits.shape[0], side, side, p, p, -1).permute(0, 1, 3, 2, 4, 5)
        return logits.reshape(logits.shape[0], config.num_patches, config.num_levels, config.codebook_size)

    def forward(self, features: torch.Tensor, bool_masked_pos: torch.Tensor, labels: torch.Tensor | None = None,
                output_hidden_states: bool = False, max_sequences_per_chunk: int | None = None,
                code_kernel: torch.Tensor | None = None) -> LadmimPredictorOutput:
        """Predict code histograms of the masked cells.

        Args:
            features: tokenizer features `(B, C, g, g)` (or `(B, N, C)`).
            bool_masked_pos: masks `(B, N)` or several per image `(B, M, N)`; True = masked.
            labels: tokenizer codes `(B, L, N)`; gives the loss against the masked-cell histograms.
            output_hidden_states: also return the final token states.
            max_sequences_per_chunk: run at most this many (image, mask) sequences at once to bound
                memory; results are identical.
            code_kernel: `(L, K, K)` or `(B, L, K, K)` codebook kernel for `loss_type="codebook_mmd"`
                ([`LadmimTokenizerModel.code_kernel`]).

        Returns:
            `LadmimPredictorOutput` with `logits (B, L, K)` (or `(B, M, L, K)`).
        """
        config = self.config
        multi = bool_masked_pos.dim() == 3
        masks = bool_masked_pos if multi else bool_masked_pos[:, None]
        masks = masks.to(torch.bool)
        batch, num_masks, cells = masks.shape
        if cells != config.num_patches:
            raise ValueError(f"bool_masked_pos has {cells} cells, the predictor expects {config.num_patches} ({config.grid_size}x{config.grid_size})")
        patches = self.embeddings.embed_patches(features)
        # token_ce predicts each masked cell's code; its histogram is the mean of those predictions.
        per_cell = config.loss_type == "token_ce"
        need_tokens = per_cell and labels is not None
        total = batch * num_masks
        chunk = max_sequences_per_chunk or total
        logits_parts, hidden_parts, token_parts = [], [], []
        flat_masks = masks.reshape(total, cells)
        hist_only = not per_cell and not output_hidden_states
        for start in range(0, total, chunk):
            stop = min(start + chunk, total)
            image_index = torch.arange(start, stop, device=masks.device) // num_masks
            hidden = self.embeddings(patches[image_index], self.token_masks(flat_masks[start:stop, None]))
            if hist_only:
                # Only the hist token's logits are used: the last block runs for that token alone
                # (21 % fewer FLOPs at paper size; benchmarks/README.md).
                for layer in self.layers[:-1]:
                    hidden = layer(hidden)
                logits_parts.append(self.head(self.norm(self.layers[-1](hidden, query_index=1))[:, 0]))
                continue
            for layer in self.layers:
                hidden = layer(hidden)
            hidden = self.norm(hidden)
            if per_cell:
                cell_logits = self.cell_logits(hidden[:, 2:])
                logits_parts.append(masked_mean_log_probs(cell_logits, flat_masks[start:stop]).flatten(1))
                if need_tokens:
                    token_parts.append(cell_logits)
            else:
                logits_parts.append(self.head(hidden[:, 1]))
            if output_hidden_states:
                hidden_parts.append(hidden)
        shape = (batch, num_masks, config.num_levels, config.codebook_size)
        logits = torch.cat(logits_parts).view(shape)
        token_logits = torch.cat(token_parts).view(batch, num_masks, cells, config.num_levels, config.codebook_size) if need_tokens else None
        loss = None
        if labels is not None:
            loss = self.histogram_loss(logits, labels, masks, token_logits, code_kernel)
        if not multi:
            logits = logits[:, 0]
            token_logits = token_logits[:, 0] if token_logits is not None else None
        last_hidden = torch.cat(hidden_parts) if output_hidden_states else None
        return LadmimPredictorOutput(loss=loss, logits=logits, token_logits=token_logits, last_hidden_state=last_hidden)

    def histogram_loss(self, logits: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                       token_logits: torch.Tensor | None = None, code_kernel: torch.Tensor | None = None) -> torch.Tensor:
        """Loss between predicted distributions `(B, M, L, K)` and the masked-cell histograms."""
        config = self.config
        target = code_histograms(labels, masks, config.codebook_size)
        if config.loss_type == "l1":
            per_sample = (logits.float().softmax(-1) - target).abs().sum((-1, -2))
        elif config.loss_type == "codebook_mmd":
            if code_kernel is None:
                raise ValueError("loss_type='codebook_mmd' needs code_kernel (tokenizer.code_kernel(category))")
            per_sample = kernel_histogram_distance(logits.float().softmax(-1) - target, code_kernel.to(logits.device))
        elif config.loss_type == "kl":
            log_probs = logits.float().log_softmax(-1)
            per_sample = (target * (target.clamp(min=1e-8).log() - log_probs)).sum((-1, -2))
        else:
            # BEiT-style cross-entropy of every masked token's code, per level.
            codes = labels.transpose(1, 2)[:, None].expand(-1, masks.shape[1], -1, -1)
            ce = F.cross_entropy(token_logits.float().flatten(0, 3), codes.reshape(-1), reduction="none")
            ce = ce.view(masks.shape + (config.num_levels,)).sum(-1)
            per_sample = (ce * masks).sum(-1) / masks.sum(-1).clamp(min=1)
        return per_sample.sum() if config.loss_reduction == "sum" else per_sample.mean()


# --------------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------------


class LadmimForAnomalyDetection(LadmimPreTrainedModel):
    """LADMIM: a class-switched tokenizer, one predictor per category, optional training-free
    branches, and calibrated fusion.

    `forward` scores images: the backbone and tokenizer run once per image (codes and structural
    map), all masks of all images go through the predictor in one batched forward, and the logical
    score is the mean over masks of the distance between predicted and true code histograms. With
    `config.memory_bank_size > 0` a PatchCore memory bank scores the same backbone features, and with
    `config.global_branch` a Mahalanobis distance of their pooled statistics; both are fitted on the
    training images (`fit_feature_branches`). Each branch is standardised with the category's
    calibration statistics (normal validation images) and the branches in `config.fused_branches`
    are combined by `config.fusion_rule`.

    Example:
        ```python
        >>> from transformers import AutoModel, AutoImageProcessor
        >>> model = AutoModel.from_pretrained("org/ladmim-loco", trust_remote_code=True)
        >>> processor = AutoImageProcessor.from_pretrained("org/ladmim-loco", trust_remote_code=True)
        >>> out = model(**processor(images), category="breakfast_box", num_masks=10, seed=0)
        >>> out.pred_score, out.pred_label, out.anomaly_map.shape
        ```
    """

    config_class = LadmimConfig
    base_model_prefix = "ladmim"

    def __init__(self, config: LadmimConfig):
        super().__init__(config)
        self.tokenizer = LadmimTokenizerModel(config.tokenizer_config)
        names = ["shared"] if config.shared_predictor else config.categories
        self.predictors = nn.ModuleDict({name: LadmimPredictorModel(config.predictor_config) for name in names})
        cats, channels = len(config.categories), config.tokenizer_config.feature_channels
        self.memory_bank = None
        if config.memory_bank_size > 0:
            self.memory_bank = LadmimMemoryBank(cats, channels, config.memory_bank_size, config.memory_bank_neighbourhood,
                                                config.memory_bank_smoothing_sigma)
        self.global_branch = LadmimGlobalBranch(cats, channels) if config.global_branch else None
        self._warned_uncalibrated: set[str] = set()
        self.post_init()

    @property
    def categories(self) -> list[str]:
        return self.config.categories

    def predictor_for(self, category: str) -> LadmimPredictorModel:
        if category not in self.categories:
            raise ValueError(f"unknown category {category!r}; this model was trained on {self.categories}")
        return self.predictors["shared" if self.config.shared_predictor else category]

    def mask_generator(self, training: bool = False) -> BlockMaskGenerator:
        config = self.config
        return BlockMaskGenerator(
            config.tokenizer_config.grid_size,
            config.train_num_masked if training else config.score_num_masked,
            config.train_min_block if training else config.score_min_block,
            config.min_aspect,
            patch_size=config.predictor_config.patch_size,
        )

    def calibration_for(self, category: str) -> dict:
        """Calibration statistics of a category: `{branch}_mean` and `{branch}_std` of every enabled
        branch and the fused `threshold` (identity statistics if it was never calibrated)."""
        stats = self.config.calibration.get(category)
        if stats is None:
            if category not in self._warned_uncalibrated:
                logger.warning("category %r has no calibration statistics; scores are not standardised", category)
                self._warned_uncalibrated.add(category)
            stats = {"threshold": self.config.default_threshold}
            for branch in self.config.enabled_branches:
                stats.update({f"{branch}_mean": 0.0, f"{branch}_std": 1.0})
            return stats
        check_calibration(category, stats)  # also when it was set after loading
        missing = [b for b in self.config.fused_branches if f"{b}_mean" not in stats or f"{b}_std" not in stats]
        if missing:
            raise ValueError(f"config.calibration[{category!r}] has no statistics for the fused branches {missing}; "
                             "recalibrate the model (training stage 3) or remove them from config.fused_branches")
        return stats

    @torch.no_grad()
    def fit_feature_branches(self, features: torch.Tensor, category: str, seed: int = 0) -> None:
        """Fit the memory-bank and global branches (those enabled) of one category from its training
        images' raw backbone features `(num_images, C, g, g)`."""
        class_id = int(self.tokenizer.category_ids(category, 1)[0])
        features = features.to(self.device)
        if self.memory_bank is not None:
            self.memory_bank.fit(features, class_id, seed=seed)
        if self.global_branch is not None:
            self.global_branch.fit(features, class_id)

    def standardized_scores(self, scores: dict[str, torch.Tensor], categories: Sequence[str]) -> dict[str, torch.Tensor]:
        """z-scores `{branch: (B, ...)}` of raw branch scores or maps `{branch: (B, ...)}` with each
        image's category (`categories`, one name per image) calibration statistics."""
        by_category = {c: self.calibration_for(c) for c in dict.fromkeys(categories)}  # checked once per category
        stats = [by_category[c] for c in categories]
        out = {}
        for branch, values in scores.items():
            shape = (-1,) + (1,) * (values.dim() - 1)
            mean = torch.tensor([float(s.get(f"{branch}_mean", 0.0)) for s in stats], device=values.device).view(shape)
            std = torch.tensor([float(s.get(f"{branch}_std", 1.0)) for s in stats], device=values.device).view(shape)
            out[branch] = (values - mean) / std.clamp(min=1e-12)
        return out

    def fuse_branches(self, z_scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """Combine standardised branches `{branch: (B, ...)}` that are in `config.fused_branches` by
        `config.fusion_rule` (branches absent from `z_scores`, e.g. the global one for maps, are skipped)."""
        present = [z_scores[b] for b in self.config.fused_branches if b in z_scores]
        if not present:
            raise ValueError(f"none of the fused branches {self.config.fused_branches} was given")
        return fuse(torch.stack(present, -1), self.config.fusion_rule)

    def logical_scores(self, features: torch.Tensor, codes: torch.Tensor, masks: torch.Tensor, category: str,
                       return_histograms: bool = False, max_sequences_per_chunk: int | None = None,
                       predictor_dtype=None):
        """Per-mask distances `(B, M)` between predicted and true histograms (`config.histogram_distance`), for one category.

        Args:
            features: `(B, C, g, g)`; codes: `(B, L, N)`; masks: `(B, M, N)` bool.
            predictor_dtype: run the predictor under `torch.autocast` with this dtype (see `forward`).
        """
        predictor = self.predictor_for(category)
        if max_sequences_per_chunk is None:  # memory follows the budget, not the number of masks
            max_sequences_per_chunk = max(1, self.config.scoring_memory_mb * 2**20 // predictor.inference_bytes_per_sequence())
        dtype = _autocast_dtype(predictor_dtype)
        with torch.autocast(features.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = predictor(features, masks, max_sequences_per_chunk=max_sequences_per_chunk).logits
        predicted = logits.float().softmax(-1)
        target = code_histograms(codes, masks, self.config.predictor_config.codebook_size)
        if self.config.histogram_distance == "codebook_mmd":
            kernel = self.tokenizer.code_kernel(category, self.config.kernel_bandwidth).to(predicted.device)
            mask_scores = kernel_histogram_distance(predicted - target, kernel)
        else:
            mask_scores = (predicted - target).abs().sum((-1, -2))
        if return_histograms:
            return mask_scores, predicted, target
        return mask_scores, None, None

    def logical_map(self, mask_scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Spread each mask's discrepancy over the cells it hid: the mean score of the masks covering
        each cell `(B, g, g)` (cells no mask covered get the image's mean score)."""
        weights = masks.to(mask_scores.dtype)
        covered = weights.sum(1)
        summed = torch.einsum("bm,bmn->bn", mask_scores, weights)
        mean = mask_scores.mean(1, keepdim=True).expand_as(summed)
        cell_map = torch.where(covered > 0, summed / covered.clamp(min=1), mean)
        g = self.config.tokenizer_config.grid_size
        return cell_map.view(-1, g, g)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor | None = None, category=None, num_masks: int | None = None,
                seed=0, bool_masked_pos: torch.Tensor | None = None, features: torch.Tensor | None = None,
                threshold: float | None = None, return_histograms: bool = False,
                max_sequences_per_chunk: int | None = None, predictor_dtype=None) -> LadmimAnomalyOutput:
        """Score images.

        Args:
            pixel_values: `(B, 3, S, S)` from [`LadmimImageProcessor`] (or give `features`).
            category: a category name for the whole batch, or one name/id per image.
            num_masks: test-time masks per image (default `config.num_masks`).
            seed: an int (default 0) scores every image with the same mask set, drawn from that seed,
                so an image's score does not depend on the batch, its position in it or the entry
                point, and images of a category are scored alike; a list gives one seed per image;
                `None` draws fresh masks.
            bool_masked_pos: explicit masks `(B, M, N)`; overrides `num_masks` and `seed`.
            features: precomputed raw backbone features `(B, C, g, g)` (`tokenizer.extract_features`).
            threshold: decision threshold on the fused score (default: the category's calibrated one).
                Refused unless it is a finite number.
            return_histograms: also return predicted and true histograms `(B, M, L, K)`.
            max_sequences_per_chunk: (image, mask) sequences per predictor call (default: as many as
                `config.scoring_memory_mb` holds).
            predictor_dtype: `"bf16"`/`"fp16"` (or a torch dtype) runs the predictor, most of the cost,
                under `torch.autocast`; the tokenizer, its codes and the histograms stay float32. On a
                CPU with AVX512-BF16, bf16 scores 1.5x faster at paper size (`benchmarks/scoring.py
                --bf16`); on a trained synthloco model logical scores moved by at most 1e-3 and the
                AUROC did not change. `None`: float32.
        """
        with _eval_mode(self):
            if category is None:
                if len(self.categories) != 1:
                    raise ValueError(f"pass category= (one of {self.categories})")
                category = self.categories[0]
            if num_masks is not None and (isinstance(num_masks, bool) or not isinstance(num_masks, numbers.Integral)
                                          or num_masks < 1):
                raise ValueError(f"num_masks must be a whole number >= 1 (None: config.num_masks), got {num_masks!r}")
            if features is None:
                if pixel_values is None:
                    raise ValueError("pass pixel_values or features")
                features = self.tokenizer.extract_features(pixel_values)
            batch = features.shape[0]
            class_ids = self.tokenizer.category_ids(category, batch)
            tokens = self.tokenizer.tokenize(features=features, category=class_ids)
            if bool_masked_pos is None:
                if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
                    seed = [int(seed)] * batch  # one mask set, shared by every image
                masks = self.mask_generator()(batch, num_masks if num_masks is not None else self.config.num_masks, seed).to(tokens["codes"].device)
            else:
                masks = bool_masked_pos.to(device=tokens["codes"].device, dtype=torch.bool)
                if masks.dim() == 2:
                    masks = masks[:, None]
            num = masks.shape[1]
            mask_scores = torch.empty(batch, num, device=masks.device)
            levels, size = self.config.predictor_config.num_levels, self.config.predictor_config.codebook_size
            predicted_all = target_all = None
            if return_histograms:
                predicted_all = torch.empty(batch, num, levels, size, device=masks.device)
                target_all = torch.empty_like(predicted_all)
            # Mixed-category batches: one predictor call per category present.
            for cid in class_ids.unique().tolist():
                rows = torch.nonzero(class_ids == cid).flatten()
                scores, predicted, target = self.logical_scores(
                    tokens["features"][rows], tokens["codes"][rows], masks[rows], self.categories[cid],
                    return_histograms, max_sequences_per_chunk, predictor_dtype,
                )
                mask_scores[rows] = scores
                if return_histograms:
                    predicted_all[rows], target_all[rows] = predicted, target
            size_px = self.config.tokenizer_config.image_size
            logical_map = F.interpolate(self.logical_map(mask_scores, masks)[:, None], size=(size_px, size_px),
                                        mode="bilinear", align_corners=True)[:, 0]
            scores = {"logical": mask_scores.mean(1), "structural": tokens["structural_score"]}
            maps = {"logical": logical_map, "structural": tokens["structural_map"]}
            if self.memory_bank is not None:
                scores["memory_bank"], maps["memory_bank"] = self.memory_bank(features, class_ids, size_px, self.categories)
            if self.global_branch is not None:
                scores["global"] = self.global_branch(features, class_ids, self.categories)
            for branch, values in scores.items():
                bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
                if bad:  # never a verdict from a non-number
                    raise ValueError(f"the {branch} score is not finite (NaN or inf) for image(s) {bad} of the batch: "
                                     "the input or the model's weights hold non-finite values")
            names = [self.categories[c] for c in class_ids.tolist()]
            pred_score = self.fuse_branches(self.standardized_scores(scores, names))
            # Maps are standardised with their branch's image-score statistics, so a cell and an image
            # at the same z are equally unusual.
            anomaly_map = self.fuse_branches(self.standardized_scores(maps, names))
            if threshold is not None:
                threshold = float(threshold)
                if not math.isfinite(threshold):
                    raise ValueError(f"threshold must be a finite number, got {threshold}")
                thresholds = torch.full_like(pred_score, threshold)
            else:
                by_category = {c: float(self.calibration_for(c)["threshold"]) for c in dict.fromkeys(names)}
                thresholds = torch.tensor([by_category[c] for c in names], device=masks.device)
            return LadmimAnomalyOutput(
                pred_score=pred_score, pred_label=pred_score > thresholds, logical_score=scores["logical"],
                structural_score=scores["structural"], anomaly_map=anomaly_map, logical_map=logical_map,
                structural_map=maps["structural"], mask_scores=mask_scores, masks=masks,
                predicted_histograms=predicted_all, target_histograms=target_all,
                memory_bank_score=scores.get("memory_bank"), memory_bank_map=maps.get("memory_bank"),
                global_score=scores.get("global"),
            )


__all__ = [
    "LadmimAnomalyOutput",
    "LadmimForAnomalyDetection",
    "LadmimPredictorModel",
    "LadmimPredictorOutput",
    "LadmimPreTrainedModel",
    "LadmimTokenizerModel",
    "LadmimTokenizerOutput",
    "code_histograms",
]
