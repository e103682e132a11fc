"""What the LADMIM models share: the pre-trained base class (weight init, finite-weight check) and
histogram helpers.

Shipped to the Hub next to the weights (``ladmim_hf/models/``); imports only torch, transformers and
its flat siblings, relatively.

Shapes use B = batch, M = masks per image, N = grid cells (grid_size ** 2), L = codebook levels,
K = codebook size, C = feature channels.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from .backbone_ladmim import LadmimBackbone
from .configuration_ladmim import LadmimConfig


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


def translate(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Images or maps `(..., H, W)` moved `dx` pixels right and `dy` down; what enters repeats the border."""
    pad = max(abs(dx), abs(dy))
    if pad == 0:
        return images
    height, width = images.shape[-2:]
    flat = images.reshape(-1, 1, height, width)  # replicate padding wants (N, C, H, W)
    padded = torch.nn.functional.pad(flat, (pad,) * 4, mode="replicate")
    moved = padded[..., pad - dy:pad - dy + height, pad - dx:pad - dx + width]
    return moved.reshape(images.shape)


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
    # Checking the values reads them; `ladmim export` traces with constant ids, checked before tracing.
    if not torch.compiler.is_compiling() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(categories)):
        raise ValueError(f"category ids must be in 0..{len(categories) - 1}, got {ids.tolist()}")
    return ids


@contextmanager
def _eval_mode(module: nn.Module):
    """Temporarily switch `module` to eval mode (scoring must never run dropout or EMA updates).
    A module already in eval mode is left untouched (nothing to trace when exporting)."""
    was_training = module.training
    if was_training:
        module.eval()
    try:
        yield
    finally:
        if was_training:
            module.train(True)


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
        elif hasattr(module, "init_ladmim_weights"):  # the models' own modules (position tables, heads, tokens)
            module.init_ladmim_weights(std)


__all__ = ["LadmimPreTrainedModel", "code_histograms", "kernel_histogram_distance", "resolve_category_ids"]
