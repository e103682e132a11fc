"""Convert official checkpoints into `ladmim_hf` models.

Two sources:

* **LADMIM predictor** (SkyShunsuke/LADMIM, `src/model.py`, class `VisionTransformerMIM`): the `model` state
  dict that its `utils.save_model` writes (`{"model", "optimizer", "scaler", "epoch"}`), one per category.
  :func:`convert_official_predictor` maps it onto :class:`LadmimPredictorModel` one to one; the
  architecture (input channels, grid, width, depth, MLP ratio, levels, q/v biases, LayerScale) is read from
  the tensor shapes. Two numbers are not in the shapes and are arguments: the number of attention heads
  (official run: 8) and the codebook size (512; the number of levels is the head width divided by it).
* **HVQ-Trans tokenizer** (RuiyingLu/HVQ-Trans, `models/HVQ_TR_switch(_OT).py`): the `state_dict` of its
  training checkpoints (`{"epoch", "arch", "state_dict", ...}`, usually with DDP's `module.` prefix).
  :func:`convert_official_hvq` maps it onto :class:`LadmimTokenizerModel`.

Key map of the HVQ-Trans tokenizer (theirs -> ours):

======================================================  =================================================
``enc.*`` (efficientnet-pytorch EfficientNet)            ``backbone.*`` (via ``load_reference_state_dict``;
                                                         head and blocks after the last tap are dropped)
``quantize_conv_t.{weight (E,C,1,1), bias}``             ``input_proj.{weight (E,C), bias}``
``pos_embed.row_embed.weight`` / ``col_embed.weight``    ``position_tables.row`` / ``.col``
``encoder.layers.i.self_attn.in_proj_{weight,bias}``     ``encoder.i.self_attn.{q,k,v}_proj`` (split in 3)
``encoder.layers.i.self_attn.out_proj.*``                ``encoder.i.self_attn.out_proj.*``
``encoder.layers.i.linear1/linear2.*``                   ``encoder.i.ffn.fc1/fc2.*``
``encoder.layers.i.norm1/norm2.*``                       ``encoder.i.norm1/norm2.*``
``decoder.layers.i.self_attn.*``                         ``decoder.i.self_attn.*`` (split as above)
``decoder.layers.i.multihead_attn.*``                    ``decoder.i.cross_attn.*`` (split as above)
``decoder.layers.i.linear1/linear2/norm1-3.*``           ``decoder.i.ffn.fc1/fc2``, ``decoder.i.norm1-3``
``decoder.norm.*``                                       ``decoder_norm.*``
``output_proj_list.c.{weight,bias}``                     ``output_heads.{weight,bias}[c]``
``quantize_list_N.c.{embed (D,K), embed_avg, cluster_size}``  ``top_quantizer.*[c]`` (codebooks transposed)
``quantize_list_{N-1-l}.c.*``                            ``quantizers.l.*[c]`` (l = 0: E3+top ... E0+top)
``input_proj.*``                                         dropped: defined upstream but never called
(none)                                                   ``*.restart_count`` = 0 (our dead-code counter)
======================================================  =================================================

What does not map (refused with an error naming it): the learned-query decoder layer of upstream's
`TransformerDecoderLayer` (`decoder.layers.i.learned_embed.weight`: its self-attention attends from a learned
query table to the memory, ours from the running target to itself), an encoder-level final norm
(`encoder.norm.*`), relative position biases, codebooks of different sizes per level, and decoder and encoder
feed-forward widths that differ (we have one `intermediate_size`). Pre-norm (`normalize_before=True`) layers
have the same keys as post-norm ones and cannot be told apart from a state dict: upstream HVQ-Trans uses
post-norm, as we do.

What maps but computes differently (a warning is logged and listed in the docs; the weights are exact):

* Backbone taps larger than the grid: upstream resizes every tap with fixed bilinear factors
  (`UpsamplingBilinear2d`, align_corners=True, also when shrinking 112 -> 14); `LadmimBackbone` area-averages
  taps that are larger than the grid. Taps at or below the grid size are resized identically. The converted
  tokenizer therefore sees slightly smoother features than upstream did, and its reconstruction error is not
  bit-comparable with upstream's.
* EMA codebook updates (training only): upstream updates a class's codebooks once per *sample* of the batch (its
  loop calls each quantiser per sample); ours once per batch. Irrelevant for inference and for the converted
  buffers.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any

import torch

from .models.configuration_ladmim import LOCO_CATEGORIES, LadmimConfig, LadmimPredictorConfig, LadmimTokenizerConfig
from .models.modeling_ladmim import LadmimForAnomalyDetection
from .models.modeling_ladmim_predictor import LadmimPredictorModel
from .models.modeling_ladmim_tokenizer import LadmimTokenizerModel

logger = logging.getLogger("ladmim_hf.convert")

# Class ids of HVQ-Trans' MVTec AD dataset (datasets/custom_dataset.py, `cls_list`).
MVTEC_AD_CATEGORIES = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                       "screw", "tile", "toothbrush", "transistor", "wood", "zipper"]
# EfficientNet-B4 taps giving the upstream HVQ-Trans feature widths.
B4_TAPS_BY_CHANNELS = {272: [1, 5, 9, 21], 384: [1, 5, 9, 15, 21]}


class ConversionError(ValueError):
    """A checkpoint does not fit the converter; the message lists the offending keys or shapes."""


def _listing(items, limit: int = 25) -> str:
    items = sorted(str(i) for i in items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _refuse_unsupported(state_dict: dict, unsupported, prefix: str) -> None:
    """Raise `ConversionError` (`prefix` + the reason + the keys) for the first `(pattern, reason)` of
    `unsupported` that some key matches."""
    for pattern, reason in unsupported:
        hits = [k for k in state_dict if pattern.search(k)]
        if hits:
            raise ConversionError(f"{prefix}{reason}; keys: {_listing(hits)}")


# --------------------------------------------------------------------------------------------------
# Loading checkpoints
# --------------------------------------------------------------------------------------------------


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor state dict inside a loaded checkpoint: unwraps `model` / `state_dict` / `model_state_dict` /
    `module` keys and strips a DDP `module.` prefix."""
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        for key in ("model", "state_dict", "model_state_dict", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            break
    if not isinstance(obj, dict) or not obj:
        raise ConversionError(f"{source} does not hold a state dict (found {type(obj).__name__}"
                              f"{' with keys ' + _listing(obj) if isinstance(obj, dict) else ''})")
    not_tensors = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ConversionError(f"{source}: entries that are not tensors: {_listing(not_tensors)}")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a checkpoint safely (`torch.load(..., weights_only=True)`) and return its tensor state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{path} holds Python objects besides tensors and plain containers, which the safe loader "
            f"(weights_only=True) refuses ({error}). HVQ-Trans checkpoints, for one, store their EasyDict config under "
            "'arch'. If you trust the file, re-save only its state dict and convert that: python -c \"import torch; "
            f"c = torch.load('{path}', map_location='cpu', weights_only=False); "
            "torch.save(c.get('state_dict', c.get('model', c)), 'state_dict.pt')\""
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise ConversionError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from error
    return unwrap_state_dict(obj, str(path))


def _check_and_load(model: torch.nn.Module, converted: dict[str, torch.Tensor], what: str,
                    skip: tuple[str, ...] = (), sources: dict[str, str] | None = None) -> None:
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(skip)}
    missing = sorted(set(own) - set(converted))
    extra = sorted(set(converted) - set(own))
    if missing or extra:
        raise ConversionError(f"{what}: internal key map out of date (ours without a source: {_listing(missing)}; "
                              f"mapped but unknown to our model: {_listing(extra)})")
    sources = sources or {}
    bad = [f"{sources.get(k, k)}: {tuple(v.shape)} (-> {k}) vs expected {tuple(own[k].shape)}"
           for k, v in converted.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ConversionError(f"{what}: shapes do not fit the architecture read from the checkpoint: {_listing(bad)}")
    result = model.load_state_dict(converted, strict=False)
    leftover = [k for k in result.missing_keys if not k.startswith(skip)]
    if leftover or result.unexpected_keys:
        raise ConversionError(f"{what}: load_state_dict left {_listing(leftover + list(result.unexpected_keys))}")


def _layer_indices(keys, prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _require(state_dict: dict, keys: list[str], what: str) -> None:
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise ConversionError(f"{what}: missing keys {_listing(missing)} (present: {_listing(list(state_dict)[:15])})")


# --------------------------------------------------------------------------------------------------
# LADMIM predictor (VisionTransformerMIM)
# --------------------------------------------------------------------------------------------------

_PREDICTOR_UNSUPPORTED = (
    (re.compile(r"(^|\.)(relative_position_bias_table|relative_position_index)$|^(rel_pos_bias|res_pos_bias)\."),
     "relative position biases (use_rel_pos_bias): LadmimPredictorModel uses absolute positions only"),
    (re.compile(r"^patch_embed\.codebook\."), "a code-input predictor (input_type 'code'): only feature input is supported"),
    (re.compile(r"^cls_pt_"), "VisionTransformerMIMCLS cls-pretraining heads (unused by LADMIM's main configuration)"),
)


def predictor_config_from_state_dict(state_dict: dict[str, torch.Tensor], num_attention_heads: int = 8,
                                     codebook_size: int = 512) -> LadmimPredictorConfig:
    """The `LadmimPredictorConfig` of an official `VisionTransformerMIM` state dict (architecture from shapes)."""
    what = "LADMIM predictor checkpoint"
    _require(state_dict, ["patch_embed.proj.weight", "pos_embed", "cls_token", "hist_token", "mask_token",
                          "lm_head.weight", "norm.weight"], what)
    proj = state_dict["patch_embed.proj.weight"]
    if proj.dim() != 4:
        raise ConversionError(f"{what}: patch_embed.proj.weight should be a conv weight (D, C, kh, kw), got {tuple(proj.shape)}")
    dim, channels, kh, kw = proj.shape
    if (kh, kw) != (1, 1):
        raise ConversionError(f"{what}: the patch embedding is a {kh}x{kw} convolution (input_type 'img'); only "
                              "feature-input predictors (1x1 convolution, input_type 'feature') can be converted")
    tokens = state_dict["pos_embed"].shape[1] - 2
    grid = math.isqrt(max(tokens, 0))
    if grid * grid != tokens or state_dict["pos_embed"].shape[-1] != dim:
        raise ConversionError(f"{what}: pos_embed {tuple(state_dict['pos_embed'].shape)} is not (1, 2 + g*g, {dim})")
    depth = len(_layer_indices(state_dict, "blocks."))
    if depth == 0:
        raise ConversionError(f"{what}: no transformer blocks (blocks.N.*) found")
    _require(state_dict, ["blocks.0.mlp.fc1.weight", "blocks.0.attn.qkv.weight"], what)
    hidden = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    qkv = state_dict["blocks.0.attn.qkv.weight"].shape
    if tuple(qkv) != (3 * dim, dim):
        raise ConversionError(f"{what}: attention qkv weight is {tuple(qkv)}, expected ({3 * dim}, {dim}); a custom "
                              "attn_head_dim is not supported")
    if dim % num_attention_heads:
        raise ConversionError(f"{what}: width {dim} is not divisible by num_attention_heads={num_attention_heads}")
    out = state_dict["lm_head.weight"].shape[0]
    if out % codebook_size:
        raise ConversionError(f"{what}: lm_head has {out} outputs, not a multiple of codebook_size={codebook_size}")
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:
        raise ConversionError(f"{what}: MLP width {hidden} is not expressible as width {dim} x mlp_ratio")
    return LadmimPredictorConfig(
        input_channels=int(channels), grid_size=grid, hidden_size=int(dim), num_hidden_layers=depth,
        num_attention_heads=num_attention_heads, mlp_ratio=mlp_ratio, hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.1, layer_norm_eps=1e-5,
        layer_scale_init_value=1e-4 if "blocks.0.gamma_1" in state_dict else 0.0,
        use_qv_bias="blocks.0.attn.q_bias" in state_dict, num_levels=out // codebook_size, codebook_size=codebook_size,
    )


def predictor_key_map(config: LadmimPredictorConfig) -> dict[str, str]:
    """Official `VisionTransformerMIM` key -> `LadmimPredictorModel` key."""
    mapping = {
        "patch_embed.proj.weight": "embeddings.patch_embeddings.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.bias",
        "cls_token": "embeddings.cls_token",
        "hist_token": "embeddings.hist_token",
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
        "lm_head.weight": "head.weight",
        "lm_head.bias": "head.bias",
    }
    for i in range(config.num_hidden_layers):
        theirs, ours = f"blocks.{i}.", f"layers.{i}."
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight",
                     "attn.proj.weight", "attn.proj.bias"):
            mapping[theirs + name] = ours + name
        for name in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            mapping[f"{theirs}mlp.{name}"] = ours + name
        if config.use_qv_bias:
            mapping[theirs + "attn.q_bias"] = ours + "attn.q_bias"
            mapping[theirs + "attn.v_bias"] = ours + "attn.v_bias"
        if config.layer_scale_init_value > 0:
            mapping[theirs + "gamma_1"] = ours + "gamma_1"
            mapping[theirs + "gamma_2"] = ours + "gamma_2"
    return mapping


def convert_official_predictor(state_dict: dict[str, torch.Tensor], *, num_attention_heads: int = 8,
                               codebook_size: int = 512) -> LadmimPredictorModel:
    """Build a `LadmimPredictorModel` holding the weights of an official LADMIM `VisionTransformerMIM`.

    Args:
        state_dict: the predictor's state dict (the `model` entry of an official checkpoint; a wrapping dict with
            `model`/`state_dict` and a `module.` prefix are accepted too).
        num_attention_heads: heads of the official model (not recoverable from shapes; the official run uses 8).
        codebook_size: tokenizer codes per level (512); the number of levels is the head width divided by it.

    Given the same features and masks, the result's hist logits equal the official model's
    `forward(x, bool_masked_pos, return_hist_token=True)` (reshaped to `(levels, codebook_size)`).
    Raises `ConversionError` listing unknown, missing or mis-shaped keys.
    """
    state_dict = unwrap_state_dict(state_dict, "predictor state dict")
    what = "LADMIM predictor checkpoint"
    _refuse_unsupported(state_dict, _PREDICTOR_UNSUPPORTED, f"{what}: ")
    config = predictor_config_from_state_dict(state_dict, num_attention_heads, codebook_size)
    mapping = predictor_key_map(config)
    missing = [k for k in mapping if k not in state_dict]
    unknown = [k for k in state_dict if k not in mapping]
    if missing or unknown:
        parts = ([f"missing keys: {_listing(missing)}"] if missing else []) + (
            [f"unknown keys: {_listing(unknown)}"] if unknown else [])
        raise ConversionError(f"{what} does not match a VisionTransformerMIM with {config.num_hidden_layers} blocks: "
                              + "; ".join(parts))
    converted = {}
    for theirs, ours in mapping.items():
        value = state_dict[theirs].detach().to(torch.float32)
        if theirs == "patch_embed.proj.weight":
            value = value.reshape(value.shape[0], value.shape[1])
        converted[ours] = value.clone()
    model = LadmimPredictorModel(config)
    _check_and_load(model, converted, what, sources={ours: theirs for theirs, ours in mapping.items()})
    return model.eval()


# --------------------------------------------------------------------------------------------------
# HVQ-Trans tokenizer
# --------------------------------------------------------------------------------------------------

_HVQ_UNSUPPORTED = (
    (re.compile(r"^decoder\.layers\.\d+\.learned_embed\."),
     "the learned-query decoder layer (upstream TransformerDecoderLayer): its self-attention attends from a learned "
     "query table to the memory, while LadmimDecoderLayer (= upstream Org_TransformerDecoderLayer) attends from the "
     "running target to itself; the two compute different functions"),
    (re.compile(r"^encoder\.norm\."), "a final encoder LayerNorm (upstream builds the encoder with norm=None; ours has none)"),
    (re.compile(r"relative_position"), "relative position biases (not part of HVQ-Trans' tokenizer)"),
)


def _split_attention(state_dict: dict, theirs: str, ours: str, dim: int, out: dict) -> list[str]:
    """nn.MultiheadAttention (`in_proj_weight` (3D, D), `in_proj_bias`, `out_proj`) -> q/k/v/out projections."""
    used = []
    weight = state_dict.get(theirs + "in_proj_weight")
    if weight is None:
        separate = [k for k in state_dict if k.startswith(theirs) and "proj_weight" in k and "in_proj" not in k
                    and "out_proj" not in k]
        raise ConversionError(f"HVQ-Trans checkpoint: {theirs}in_proj_weight missing"
                              + (f" (separate projections {_listing(separate)} are not supported)" if separate else ""))
    if tuple(weight.shape) != (3 * dim, dim):
        raise ConversionError(f"HVQ-Trans checkpoint: {theirs}in_proj_weight is {tuple(weight.shape)}, expected ({3 * dim}, {dim})")
    bias = state_dict.get(theirs + "in_proj_bias")
    if bias is None:
        raise ConversionError(f"HVQ-Trans checkpoint: {theirs}in_proj_bias missing (attention without bias is not supported)")
    _require(state_dict, [theirs + "out_proj.weight", theirs + "out_proj.bias"], "HVQ-Trans checkpoint")
    weight, bias = weight.detach().to(torch.float32), bias.detach().to(torch.float32)
    for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
        out[f"{ours}{name}.weight"] = weight[index * dim:(index + 1) * dim].clone()
        out[f"{ours}{name}.bias"] = bias[index * dim:(index + 1) * dim].clone()
    out[f"{ours}out_proj.weight"] = state_dict[theirs + "out_proj.weight"].detach().to(torch.float32).clone()
    out[f"{ours}out_proj.bias"] = state_dict[theirs + "out_proj.bias"].detach().to(torch.float32).clone()
    used += [theirs + "in_proj_weight", theirs + "in_proj_bias", theirs + "out_proj.weight", theirs + "out_proj.bias"]
    return used


def hvq_config_from_state_dict(state_dict: dict[str, torch.Tensor], *, categories: list[str] | None = None,
                               backbone: str = "efficientnet_b4", backbone_taps: list[int] | None = None,
                               image_size: int = 224, num_attention_heads: int = 8, dropout: float = 0.1,
                               use_ot_score: bool = True) -> LadmimTokenizerConfig:
    """The `LadmimTokenizerConfig` of an HVQ-Trans state dict (widths, depths, grid, levels and codes from shapes)."""
    what = "HVQ-Trans checkpoint"
    _require(state_dict, ["quantize_conv_t.weight", "pos_embed.row_embed.weight", "pos_embed.col_embed.weight",
                          "decoder.norm.weight"], what)
    conv = state_dict["quantize_conv_t.weight"]
    if conv.dim() != 4 or tuple(conv.shape[2:]) != (1, 1):
        raise ConversionError(f"{what}: quantize_conv_t.weight should be a 1x1 conv weight, got {tuple(conv.shape)}")
    dim, channels = int(conv.shape[0]), int(conv.shape[1])
    row, col = state_dict["pos_embed.row_embed.weight"], state_dict["pos_embed.col_embed.weight"]
    if row.shape != col.shape or row.shape[1] * 2 != dim:
        raise ConversionError(f"{what}: position tables {tuple(row.shape)} / {tuple(col.shape)} are not two equal "
                              f"(grid, {dim // 2}) tables (non-square grids are not supported)")
    grid = int(row.shape[0])
    enc_layers = _layer_indices(state_dict, "encoder.layers.")
    dec_layers = _layer_indices(state_dict, "decoder.layers.")
    if not enc_layers or not dec_layers:
        raise ConversionError(f"{what}: no encoder.layers.N / decoder.layers.N keys")
    ffn = int(state_dict["encoder.layers.0.linear1.weight"].shape[0])
    dec_ffn = int(state_dict["decoder.layers.0.linear1.weight"].shape[0])
    if dec_ffn != ffn:
        raise ConversionError(f"{what}: encoder feed-forward width {ffn} differs from the decoder's {dec_ffn}; "
                              "LadmimTokenizerConfig has a single intermediate_size")
    lists = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"quantize_list_(\d+)\.", k))})
    if len(lists) < 2 or lists != list(range(1, len(lists) + 1)):
        raise ConversionError(f"{what}: expected codebook lists quantize_list_1..N (N >= 2), found {lists}")
    counts = {n: len(_layer_indices(state_dict, f"quantize_list_{n}.")) for n in lists}
    if len(set(counts.values())) != 1:
        raise ConversionError(f"{what}: the codebook lists hold different numbers of classes: {counts}")
    num_classes = next(iter(counts.values()))
    sizes = {int(state_dict[f"quantize_list_{n}.0.embed"].shape[1]) for n in lists}
    if len(sizes) != 1:
        raise ConversionError(f"{what}: codebooks of different sizes per level ({sorted(sizes)}) are not supported")
    if categories is None:
        if num_classes == len(LOCO_CATEGORIES):
            categories = list(LOCO_CATEGORIES)
        elif num_classes == len(MVTEC_AD_CATEGORIES):
            categories = list(MVTEC_AD_CATEGORIES)
        else:
            raise ConversionError(f"{what}: {num_classes} class-switched codebook sets; pass categories= with "
                                  f"{num_classes} names in class-id order")
    if len(categories) != num_classes:
        raise ConversionError(f"{what}: {num_classes} class-switched codebook sets but {len(categories)} category names")
    if backbone_taps is None:
        if backbone == "efficientnet_b4" and channels in B4_TAPS_BY_CHANNELS:
            backbone_taps = B4_TAPS_BY_CHANNELS[channels]
        else:
            raise ConversionError(f"{what}: {channels}-channel features; pass backbone_taps= for backbone {backbone}")
    return LadmimTokenizerConfig(
        backbone=backbone, backbone_taps=list(backbone_taps), feature_channels=channels, image_size=image_size,
        grid_size=grid, categories=list(categories), hidden_size=dim, num_encoder_layers=len(enc_layers),
        num_decoder_layers=len(dec_layers), num_attention_heads=num_attention_heads, intermediate_size=ffn,
        dropout=dropout, num_levels=len(lists) - 1, codebook_size=sizes.pop(), ema_decay=0.99, ema_epsilon=1e-5,
        commitment_weight=0.25, restart_dead_codes=False, use_ot_score=use_ot_score, ot_weight=80.0,
        # upstream's OT softmax divides f . e_k by the number of codes (`1 / b.shape[1]`)
        ot_temperature=float(int(state_dict["quantize_list_1.0.embed"].shape[1])), score_filter_size=16,
    )


def convert_official_hvq(state_dict: dict[str, torch.Tensor], *, categories: list[str] | None = None,
                         backbone: str = "efficientnet_b4", backbone_taps: list[int] | None = None,
                         image_size: int = 224, num_attention_heads: int = 8, dropout: float = 0.1,
                         use_ot_score: bool = True,
                         backbone_weights: str | os.PathLike | None = None) -> LadmimTokenizerModel:
    """Build a `LadmimTokenizerModel` holding the weights of an upstream HVQ-Trans (`HVQ_TR_switch(_OT)`) model.

    Args:
        state_dict: the model state dict (a wrapping checkpoint dict and a `module.` prefix are accepted).
        categories: names of the class ids in order (default: the 5 LOCO names in LADMIM's class-id order for 5
            classes, HVQ-Trans' 15 MVTec AD names for 15).
        backbone, backbone_taps, image_size: the frozen CNN. Taps default to EfficientNet-B4 blocks giving the
            checkpoint's feature width (272: 1/5/9/21 as upstream; 384: 1/5/9/15/21 as LADMIM's LOCO setting).
        num_attention_heads: heads of encoder and decoder (not recoverable from shapes; upstream: 8).
        backbone_weights: ImageNet weights for the backbone when the checkpoint has no `enc.*` tensors.

    See the module docstring for the key map and what differs. Raises `ConversionError`.
    """
    state_dict = unwrap_state_dict(state_dict, "HVQ-Trans state dict")
    what = "HVQ-Trans checkpoint"
    _refuse_unsupported(state_dict, _HVQ_UNSUPPORTED, f"{what}: cannot convert ")
    config = hvq_config_from_state_dict(state_dict, categories=categories, backbone=backbone,
                                        backbone_taps=backbone_taps, image_size=image_size,
                                        num_attention_heads=num_attention_heads, dropout=dropout,
                                        use_ot_score=use_ot_score)
    model = LadmimTokenizerModel(config)
    dim, num_classes = config.hidden_size, config.num_categories
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    used: list[str] = []

    def take(theirs: str, ours: str, transform=None) -> None:
        if theirs not in state_dict:
            raise ConversionError(f"{what}: missing key {theirs}")
        value = state_dict[theirs].detach().to(torch.float32)
        converted[ours] = (transform(value) if transform else value).clone()
        sources[ours] = theirs
        used.append(theirs)

    take("quantize_conv_t.weight", "input_proj.weight", lambda w: w.reshape(w.shape[0], w.shape[1]))
    take("quantize_conv_t.bias", "input_proj.bias")
    take("pos_embed.row_embed.weight", "position_tables.row")
    take("pos_embed.col_embed.weight", "position_tables.col")
    for i in range(config.num_encoder_layers):
        theirs, ours = f"encoder.layers.{i}.", f"encoder.{i}."
        used += _split_attention(state_dict, theirs + "self_attn.", ours + "self_attn.", dim, converted)
        for a, b in (("linear1", "ffn.fc1"), ("linear2", "ffn.fc2"), ("norm1", "norm1"), ("norm2", "norm2")):
            take(f"{theirs}{a}.weight", f"{ours}{b}.weight")
            take(f"{theirs}{a}.bias", f"{ours}{b}.bias")
    for i in range(config.num_decoder_layers):
        theirs, ours = f"decoder.layers.{i}.", f"decoder.{i}."
        used += _split_attention(state_dict, theirs + "self_attn.", ours + "self_attn.", 2 * dim, converted)
        used += _split_attention(state_dict, theirs + "multihead_attn.", ours + "cross_attn.", 2 * dim, converted)
        for a, b in (("linear1", "ffn.fc1"), ("linear2", "ffn.fc2"), ("norm1", "norm1"), ("norm2", "norm2"),
                     ("norm3", "norm3")):
            take(f"{theirs}{a}.weight", f"{ours}{b}.weight")
            take(f"{theirs}{a}.bias", f"{ours}{b}.bias")
    take("decoder.norm.weight", "decoder_norm.weight")
    take("decoder.norm.bias", "decoder_norm.bias")

    def stacked(prefix: str, suffix: str, transform=None) -> torch.Tensor:
        values = []
        for c in range(num_classes):
            key = f"{prefix}{c}.{suffix}"
            if key not in state_dict:
                raise ConversionError(f"{what}: missing key {key}")
            value = state_dict[key].detach().to(torch.float32)
            values.append(transform(value) if transform else value)
            used.append(key)
        return torch.stack(values).clone()

    converted["output_heads.weight"] = stacked("output_proj_list.", "weight")
    converted["output_heads.bias"] = stacked("output_proj_list.", "bias")
    sources.update({"output_heads.weight": "output_proj_list.*.weight", "output_heads.bias": "output_proj_list.*.bias"})
    top = config.num_levels + 1
    targets = [("top_quantizer.", top)] + [(f"quantizers.{level}.", top - 1 - level) for level in range(config.num_levels)]
    for ours, number in targets:
        prefix = f"quantize_list_{number}."
        converted[ours + "embed"] = stacked(prefix, "embed", lambda t: t.t())
        converted[ours + "embed_avg"] = stacked(prefix, "embed_avg", lambda t: t.t())
        converted[ours + "cluster_size"] = stacked(prefix, "cluster_size")
        converted[ours + "restart_count"] = torch.zeros((), dtype=torch.long)
        sources.update({ours + name: f"{prefix}*.{name}" for name in ("embed", "embed_avg", "cluster_size")})

    backbone_keys = {k: v for k, v in state_dict.items() if k.startswith("enc.")}
    dropped = [k for k in state_dict if k.startswith("input_proj.")]
    unknown = sorted(set(state_dict) - set(used) - set(backbone_keys) - set(dropped))
    if unknown:
        raise ConversionError(f"{what}: keys the converter does not know: {_listing(unknown)}")
    if dropped:
        logger.info("dropping %s: upstream defines input_proj but never calls it (quantize_conv_t projects the input)",
                    _listing(dropped))
    # Upstream reconstructs raw backbone features: identity statistics (standardize_features stays off).
    converted["feature_mean"] = torch.zeros_like(model.feature_mean)
    converted["feature_std"] = torch.ones_like(model.feature_std)
    _check_and_load(model, converted, what, skip=("backbone.",), sources=sources)
    if backbone_keys:
        model.backbone.load_reference_state_dict({k[len("enc."):]: v for k, v in backbone_keys.items()},
                                                 style="efficientnet_pytorch")
    elif backbone_weights is not None:
        model.backbone.load_imagenet_weights(backbone_weights)
    else:
        raise ConversionError(f"{what} has no backbone tensors (enc.*): pass backbone_weights= (the ImageNet weights "
                              f"of {backbone}, e.g. efficientnet-b4-6ed6700e.pth)")
    larger = [s for s in model.backbone.tap_sizes if s > config.grid_size]
    if larger:
        logger.warning(
            "backbone taps of sizes %s are larger than the %dx%d grid: upstream HVQ-Trans shrinks them bilinearly "
            "(align_corners=True), LadmimBackbone area-averages them, so features (and reconstruction errors) differ "
            "slightly from upstream's although every weight is converted exactly", larger, config.grid_size,
            config.grid_size)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Full detector
# --------------------------------------------------------------------------------------------------


def _select_categories(tokenizer: LadmimTokenizerModel, names: list[str]) -> dict[str, torch.Tensor]:
    """The tokenizer's state dict restricted to the class-switched parts of `names` (in that order)."""
    known = tokenizer.categories
    ids = torch.tensor([known.index(n) for n in names], dtype=torch.long)
    per_category = re.compile(r"^(top_quantizer|quantizers\.\d+)\.(embed|embed_avg|cluster_size)$|^output_heads\.(weight|bias)$")
    return {k: (v.index_select(0, ids).clone() if per_category.match(k) else v)
            for k, v in tokenizer.state_dict().items()}


def build_detector(tokenizer: LadmimTokenizerModel, predictors: dict[str, LadmimPredictorModel], *,
                   num_masks: int = 10, shared_predictor: bool = False) -> LadmimForAnomalyDetection:
    """Assemble a `LadmimForAnomalyDetection` from a converted tokenizer and per-category predictors.

    The detector covers the categories in `predictors` (a subset of the tokenizer's; its class-switched codebooks
    and heads are cut down to them). Mask sizes follow the paper's fractions of the grid. The result has no
    calibration statistics: scores are not standardised until it is calibrated on normal images.
    """
    if not predictors:
        raise ConversionError("no predictors given")
    unknown = [c for c in predictors if c not in tokenizer.categories and not (shared_predictor and c == "shared")]
    if unknown:
        raise ConversionError(f"predictor categories {unknown} are not among the tokenizer's {tokenizer.categories}")
    names = tokenizer.categories if shared_predictor else list(predictors)
    first = next(iter(predictors.values())).config
    architecture = ("input_channels", "grid_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "mlp_ratio", "num_levels", "codebook_size", "use_qv_bias", "layer_scale_init_value")
    for name, predictor in predictors.items():
        differ = [a for a in architecture if getattr(predictor.config, a) != getattr(first, a)]
        if differ:
            raise ConversionError(f"predictor {name!r} differs from the others in {differ}; one architecture is needed")
    tok = tokenizer.config
    for ours, theirs in (("feature_channels", "input_channels"), ("grid_size", "grid_size"),
                         ("num_levels", "num_levels"), ("codebook_size", "codebook_size")):
        if getattr(tok, ours) != getattr(first, theirs):
            raise ConversionError(f"predictors have {theirs}={getattr(first, theirs)} but the tokenizer has "
                                  f"{ours}={getattr(tok, ours)}")
    tokenizer_config = tok.to_dict()
    tokenizer_config["categories"] = list(names)
    for key in ("transformers_version", "architectures", "_name_or_path", "model_type"):
        tokenizer_config.pop(key, None)
    predictor_config = first.to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "model_type"):
        predictor_config.pop(key, None)
    config = LadmimConfig(tokenizer_config=tokenizer_config, predictor_config=predictor_config,
                          shared_predictor=shared_predictor, num_masks=num_masks)
    model = LadmimForAnomalyDetection(config)
    model.tokenizer.load_state_dict(_select_categories(tokenizer, list(names)))
    for name, predictor in predictors.items():
        model.predictors["shared" if shared_predictor else name].load_state_dict(predictor.state_dict())
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `scripts/convert_official_checkpoint.py` and `ladmim convert`."""
    parser.add_argument("--predictor", nargs="+", default=[], metavar="[CATEGORY=]PATH",
                        help="official LADMIM predictor checkpoint(s); with --hvq give CATEGORY=PATH per category")
    parser.add_argument("--hvq", default=None, metavar="PATH", help="HVQ-Trans checkpoint (state_dict or training checkpoint)")
    parser.add_argument("--output", required=True, help="folder to write the converted model to (save_pretrained)")
    parser.add_argument("--categories", nargs="+", default=None,
                        help="names of the HVQ-Trans class ids in order (default: LOCO for 5 classes, MVTec AD for 15)")
    parser.add_argument("--backbone", default="efficientnet_b4", choices=["efficientnet_b4", "efficientnet_lite0"])
    parser.add_argument("--backbone_taps", nargs="+", type=int, default=None)
    parser.add_argument("--backbone_weights", default=None,
                        help="ImageNet weights of the backbone, when the HVQ-Trans checkpoint has no enc.* tensors")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--tokenizer_heads", type=int, default=8, help="attention heads of HVQ-Trans (upstream: 8)")
    parser.add_argument("--predictor_heads", type=int, default=8, help="attention heads of LAViT (official: 8)")
    parser.add_argument("--codebook_size", type=int, default=512, help="codes per level (official: 512)")
    parser.add_argument("--num_masks", type=int, default=10, help="default test-time masks of the assembled detector")
    parser.add_argument("--no_ot", action="store_true", help="structural map without the OT term (HVQ_TR_switch)")


def _parse_predictors(items: list[str], with_categories: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            if with_categories:
                raise ConversionError(f"with --hvq, give each predictor as CATEGORY=PATH (got {item!r})")
            name, path = "", item
        if name in out:
            raise ConversionError(f"predictor for {name!r} given twice")
        out[name] = path
    return out


def run_from_args(args: argparse.Namespace) -> int:
    from .hub import add_pipeline_to_folder
    from .models.image_processing_ladmim import LadmimImageProcessor

    output = Path(args.output)
    try:
        if output.exists() and any(output.iterdir()):
            raise ConversionError(f"{output} is not empty; pass a new or empty folder")
        if not args.hvq and not args.predictor:
            raise ConversionError("nothing to convert: pass --predictor and/or --hvq")
        paths = _parse_predictors(args.predictor, with_categories=bool(args.hvq))
        if not args.hvq and len(paths) != 1:
            raise ConversionError("without --hvq, convert one predictor at a time (one --predictor PATH)")
        predictors = {name: convert_official_predictor(load_checkpoint(path), num_attention_heads=args.predictor_heads,
                                                       codebook_size=args.codebook_size)
                      for name, path in paths.items()}
        if not args.hvq:
            predictor = next(iter(predictors.values()))
            predictor.save_pretrained(output)
            print(f"LADMIM predictor ({predictor.config.num_hidden_layers} blocks, width {predictor.config.hidden_size}, "
                  f"{predictor.config.num_levels} levels) saved to {output}")
            return 0
        tokenizer = convert_official_hvq(
            load_checkpoint(args.hvq), categories=args.categories, backbone=args.backbone,
            backbone_taps=args.backbone_taps, image_size=args.image_size, num_attention_heads=args.tokenizer_heads,
            use_ot_score=not args.no_ot, backbone_weights=args.backbone_weights,
        )
        if not predictors:
            tokenizer.save_pretrained(output)
            print(f"HVQ-Trans tokenizer ({len(tokenizer.categories)} categories) saved to {output}")
            return 0
        detector = build_detector(tokenizer, predictors, num_masks=args.num_masks)
        detector.save_pretrained(output)
        LadmimImageProcessor(size=args.image_size).save_pretrained(output)
        add_pipeline_to_folder(output)
        print(f"LADMIM detector for {', '.join(detector.categories)} saved to {output} (uncalibrated: scores are "
              "not standardised until calibrated on normal images)")
        return 0
    except (ConversionError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """`ladmim convert ARGV` (ARGV defaults to the command line's)."""
    from .cli import run_subcommand

    return run_subcommand("convert", argv)


__all__ = [
    "ConversionError",
    "MVTEC_AD_CATEGORIES",
    "add_convert_arguments",
    "build_detector",
    "convert_official_hvq",
    "convert_official_predictor",
    "hvq_config_from_state_dict",
    "load_checkpoint",
    "predictor_config_from_state_dict",
    "predictor_key_map",
    "unwrap_state_dict",
]
