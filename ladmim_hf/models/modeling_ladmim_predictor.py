"""The LAViT predictor: sees the feature grid with blocks masked and predicts the code histograms under the mask.

Shipped to the Hub next to the weights (``ladmim_hf/models/``); imports only torch, transformers and
its flat siblings, relatively.

Shapes use B = batch, M = masks per image, N = grid cells (grid_size ** 2), L = codebook levels,
K = codebook size, C = feature channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .configuration_ladmim import LadmimPredictorConfig
from .modeling_ladmim_utils import LadmimPreTrainedModel, code_histograms, kernel_histogram_distance


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


    def init_ladmim_weights(self, std: float) -> None:
        for tensor in (self.cls_token, self.hist_token, self.mask_token, self.position_embeddings):
            nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)

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


    def init_ladmim_weights(self, std: float) -> None:
        if self.q_bias is not None:
            nn.init.zeros_(self.q_bias)
            nn.init.zeros_(self.v_bias)

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


    def init_ladmim_weights(self, std: float) -> None:
        if self.gamma_1 is not None:
            nn.init.constant_(self.gamma_1, self.layer_scale_init_value)
            nn.init.constant_(self.gamma_2, self.layer_scale_init_value)

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


__all__ = ["LadmimPredictorModel", "LadmimPredictorOutput"]
