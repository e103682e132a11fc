"""Conversion of official checkpoints: LADMIM's VisionTransformerMIM predictor and the HVQ-Trans tokenizer.

The official code is not imported: each test restates the official forward pass in plain torch (the key names
and shapes of the official state dicts, the order [cls, hist, patches], BEiT q/v biases, the per-class HVQ-Trans
quantisers and heads) and checks our converted models against it on random weights.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from ladmim_hf.models.backbone_ladmim import LadmimBackbone
from ladmim_hf.convert import (
    ConversionError,
    build_detector,
    convert_official_hvq,
    convert_official_predictor,
    load_checkpoint,
    main as convert_main,
)

# ----------------------------------------------------------------------------------------------- predictor

C, D, DEPTH, HEADS, GRID, LEVELS, K, HIDDEN = 12, 16, 2, 4, 4, 2, 8, 40


def official_predictor_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "patch_embed.proj.weight": r(D, C, 1, 1), "patch_embed.proj.bias": r(D),
        "cls_token": r(1, 1, D), "mask_token": r(1, 1, D), "hist_token": r(1, 1, D),
        "pos_embed": r(1, GRID * GRID + 2, D),
        "norm.weight": 1 + r(D), "norm.bias": r(D),
        "lm_head.weight": r(LEVELS * K, D), "lm_head.bias": r(LEVELS * K),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": 1 + r(D), p + "norm1.bias": r(D),
            p + "attn.qkv.weight": r(3 * D, D), p + "attn.q_bias": r(D), p + "attn.v_bias": r(D),
            p + "attn.proj.weight": r(D, D), p + "attn.proj.bias": r(D),
            p + "norm2.weight": 1 + r(D), p + "norm2.bias": r(D),
            p + "mlp.fc1.weight": r(HIDDEN, D), p + "mlp.fc1.bias": r(HIDDEN),
            p + "mlp.fc2.weight": r(D, HIDDEN), p + "mlp.fc2.bias": r(D),
            p + "gamma_1": 1 + r(D), p + "gamma_2": 1 + r(D),
        })
    return sd


def official_predictor_forward(sd: dict, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VisionTransformerMIM.forward(x, bool_masked_pos, return_hist_token=True), restated: (B, LEVELS * K)."""
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]).flatten(2).transpose(1, 2)
    batch, cells, dim = h.shape
    w = mask.unsqueeze(-1).to(h.dtype)
    h = h * (1 - w) + sd["mask_token"].expand(batch, cells, -1) * w
    h = torch.cat([sd["cls_token"].expand(batch, -1, -1), sd["hist_token"].expand(batch, -1, -1), h], dim=1)
    h = h + sd["pos_embed"]
    tokens = h.shape[1]
    for i in range(DEPTH):
        p = f"blocks.{i}."
        y = F.layer_norm(h, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-5)
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(dim), sd[p + "attn.v_bias"]])
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], bias).reshape(batch, tokens, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (dim // HEADS) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        h = h + sd[p + "gamma_1"] * F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(h, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-5)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        h = h + sd[p + "gamma_2"] * y
    h = F.layer_norm(h, (dim,), sd["norm.weight"], sd["norm.bias"], 1e-5)
    return F.linear(h[:, 1], sd["lm_head.weight"], sd["lm_head.bias"])


def test_predictor_matches_official_forward_and_checkpoint_formats(tmp_path):
    sd = official_predictor_state_dict()
    model = convert_official_predictor(sd, num_attention_heads=HEADS, codebook_size=K)
    cfg = model.config
    assert (cfg.input_channels, cfg.grid_size, cfg.hidden_size, cfg.num_hidden_layers) == (C, GRID, D, DEPTH)
    assert (cfg.num_levels, cfg.codebook_size, cfg.intermediate_size, cfg.use_qv_bias) == (LEVELS, K, HIDDEN, True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, C, GRID, GRID, generator=g)
    masks = torch.rand(3, 5, GRID * GRID, generator=g) < 0.4
    with torch.no_grad():
        ours = model(x, masks).logits  # (B, M, L, K)
        for m in range(masks.shape[1]):
            expected = official_predictor_forward(sd, x, masks[:, m])
            torch.testing.assert_close(ours[:, m].reshape(3, -1), expected, rtol=1e-4, atol=1e-5)
        single = model(x, masks[:, 0]).logits
    torch.testing.assert_close(single.reshape(3, -1), official_predictor_forward(sd, x, masks[:, 0]), rtol=1e-4, atol=1e-5)

    # The official checkpoint layout (utils.save_model) with a DDP prefix loads through load_checkpoint.
    path = tmp_path / "checkpoint_999.pt"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {"state": {}, "param_groups": []},
                "scaler": {"scale": 65536.0}, "epoch": 999}, path)
    again = convert_official_predictor(load_checkpoint(path), num_attention_heads=HEADS, codebook_size=K)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)


class _NotATensor:  # pickled into a checkpoint: the safe loader must refuse it
    pass


def test_predictor_refuses_unknown_mismatched_and_unsafe(tmp_path):
    sd = official_predictor_state_dict()
    with pytest.raises(ConversionError, match=r"unknown keys: blocks\.0\.extra_scale"):
        convert_official_predictor({**sd, "blocks.0.extra_scale": torch.ones(D)}, num_attention_heads=HEADS, codebook_size=K)
    with pytest.raises(ConversionError, match="relative position biases.*relative_position_bias_table"):
        convert_official_predictor({**sd, "blocks.0.attn.relative_position_bias_table": torch.zeros(52, HEADS)},
                                   num_attention_heads=HEADS, codebook_size=K)
    with pytest.raises(ConversionError, match=r"blocks\.1\.mlp\.fc2\.weight: \(16, 7\)"):
        convert_official_predictor({**sd, "blocks.1.mlp.fc2.weight": torch.zeros(D, 7)}, num_attention_heads=HEADS,
                                   codebook_size=K)
    missing = dict(sd)
    del missing["blocks.1.attn.proj.bias"]
    with pytest.raises(ConversionError, match=r"missing keys: blocks\.1\.attn\.proj\.bias"):
        convert_official_predictor(missing, num_attention_heads=HEADS, codebook_size=K)
    with pytest.raises(ConversionError, match="16x16 convolution"):
        convert_official_predictor({**sd, "patch_embed.proj.weight": torch.zeros(D, 3, 16, 16)},
                                   num_attention_heads=HEADS, codebook_size=K)
    with pytest.raises(ConversionError, match="not a multiple of codebook_size=512"):
        convert_official_predictor(sd, num_attention_heads=HEADS)
    path = tmp_path / "unsafe.pt"
    torch.save({"model": sd, "arch": _NotATensor()}, path)
    with pytest.raises(ConversionError, match="weights_only=True"):
        load_checkpoint(path)


# ----------------------------------------------------------------------------------------------- HVQ-Trans

HC, HE, HG, HHEADS, HFFN, HK, HLEVELS, HCLASSES, HLAYERS = 64, 16, 4, 2, 24, 8, 3, 2, 3
HVQ_CATEGORIES = ["breakfast_box", "pushpins"]


def upstream_hvq_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """An upstream HVQ_TR_switch_OT state dict (small widths), with a lite0 backbone under `enc.*`."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    sd = {"quantize_conv_t.weight": r(HE, HC, 1, 1), "quantize_conv_t.bias": r(HE),
          "input_proj.weight": r(HE, HC), "input_proj.bias": r(HE),  # defined upstream, never called
          "pos_embed.row_embed.weight": torch.rand(HG, HE // 2, generator=g),
          "pos_embed.col_embed.weight": torch.rand(HG, HE // 2, generator=g),
          "decoder.norm.weight": 1 + r(2 * HE), "decoder.norm.bias": r(2 * HE)}

    def attention(prefix, dim):
        sd.update({prefix + "in_proj_weight": r(3 * dim, dim), prefix + "in_proj_bias": r(3 * dim),
                   prefix + "out_proj.weight": r(dim, dim), prefix + "out_proj.bias": r(dim)})

    def ffn_norms(prefix, dim, norms):
        sd.update({prefix + "linear1.weight": r(HFFN, dim), prefix + "linear1.bias": r(HFFN),
                   prefix + "linear2.weight": r(dim, HFFN), prefix + "linear2.bias": r(dim)})
        for n in norms:
            sd.update({f"{prefix}{n}.weight": 1 + r(dim), f"{prefix}{n}.bias": r(dim)})

    for i in range(HLAYERS):
        attention(f"encoder.layers.{i}.self_attn.", HE)
        ffn_norms(f"encoder.layers.{i}.", HE, ("norm1", "norm2"))
        attention(f"decoder.layers.{i}.self_attn.", 2 * HE)
        attention(f"decoder.layers.{i}.multihead_attn.", 2 * HE)
        ffn_norms(f"decoder.layers.{i}.", 2 * HE, ("norm1", "norm2", "norm3"))
    for c in range(HCLASSES):
        sd[f"output_proj_list.{c}.weight"] = r(HC, 2 * HE)
        sd[f"output_proj_list.{c}.bias"] = r(HC)
        for n in range(1, HLEVELS + 2):  # quantize_list_1..N, N = top (width E), the others 2E
            dim = HE if n == HLEVELS + 1 else 2 * HE
            embed = r(dim, HK, scale=1.0)
            sd[f"quantize_list_{n}.{c}.embed"] = embed
            sd[f"quantize_list_{n}.{c}.embed_avg"] = embed * 3
            sd[f"quantize_list_{n}.{c}.cluster_size"] = torch.rand(HK, generator=g) * 3
    reference = LadmimBackbone("efficientnet_lite0", [2, 4], HG, 64)
    with torch.no_grad():
        for tensor in reference.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=g) * 0.01)
    own = reference.state_dict()
    sd.update({f"enc.{theirs}": own[ours] for ours, theirs in reference.reference_key_map("efficientnet_pytorch").items()})
    return sd


def _mha(sd, prefix, query, key, value):
    dim = query.shape[-1]
    out, _ = F.multi_head_attention_forward(
        query, key, value, dim, HHEADS, sd[prefix + "in_proj_weight"], sd[prefix + "in_proj_bias"], None, None, False,
        0.0, sd[prefix + "out_proj.weight"], sd[prefix + "out_proj.bias"], training=False, need_weights=False)
    return out


def _ln(sd, prefix, x):
    return F.layer_norm(x, (x.shape[-1],), sd[prefix + "weight"], sd[prefix + "bias"], 1e-5)


def upstream_hvq_forward(sd, features, labels, image_size=64):
    """HVQ_TR_switch_OT.forward in eval mode, restated (sequence-first like upstream), from backbone features."""
    batch = features.shape[0]
    tokens = F.conv2d(features, sd["quantize_conv_t.weight"], sd["quantize_conv_t.bias"]).flatten(2).permute(2, 0, 1)
    row, col = sd["pos_embed.row_embed.weight"], sd["pos_embed.col_embed.weight"]
    pos = torch.cat([col.unsqueeze(0).expand(HG, HG, -1), row.unsqueeze(1).expand(HG, HG, -1)], -1).flatten(0, 1)
    pos = pos.unsqueeze(1).expand(-1, batch, -1)
    outputs, src = [tokens], tokens
    for i in range(HLAYERS):
        p = f"encoder.layers.{i}."
        src = _ln(sd, p + "norm1.", src + _mha(sd, p + "self_attn.", src + pos, src + pos, src))
        ffn = F.linear(F.relu(F.linear(src, sd[p + "linear1.weight"], sd[p + "linear1.bias"])), sd[p + "linear2.weight"],
                       sd[p + "linear2.bias"])
        src = _ln(sd, p + "norm2.", src + ffn)
        outputs.append(src)

    def quantize(n, x, c):  # x (L, dim) for one sample
        embed = sd[f"quantize_list_{n}.{c}.embed"]
        dist = x.pow(2).sum(1, keepdim=True) - 2 * x @ embed + embed.pow(2).sum(0, keepdim=True)
        ids = (-dist).max(1)[1]
        return embed.t()[ids], ids

    top = HLEVELS + 1
    quant_top = torch.stack([quantize(top, outputs[-1][:, b], int(labels[b]))[0] for b in range(batch)], 1)
    quantized, codes = [], []
    for j in range(1, HLEVELS + 1):
        level_in = torch.cat([outputs[-1 - j], quant_top], -1)
        qs, ids = zip(*(quantize(top - j, level_in[:, b], int(labels[b])) for b in range(batch)))
        quantized.append(torch.stack(qs, 1))
        codes.append(torch.stack(ids, 0))
    bottom_in = torch.cat([outputs[0], quant_top], -1)
    pos2 = torch.cat([pos, pos], -1)
    out = quantized[0]
    for i in range(HLAYERS):
        p, memory = f"decoder.layers.{i}.", quantized[i]
        tgt = _ln(sd, p + "norm1.", out + _mha(sd, p + "self_attn.", out + pos2, out + pos2, out))
        tgt = _ln(sd, p + "norm2.", tgt + _mha(sd, p + "multihead_attn.", tgt + pos2, memory + pos2, memory))
        ffn = F.linear(F.relu(F.linear(tgt, sd[p + "linear1.weight"], sd[p + "linear1.bias"])), sd[p + "linear2.weight"],
                       sd[p + "linear2.bias"])
        out = _ln(sd, p + "norm3.", tgt + ffn)
    dec = _ln(sd, "decoder.norm.", out)
    rec = torch.stack([F.linear(dec[:, b], sd[f"output_proj_list.{int(labels[b])}.weight"],
                                sd[f"output_proj_list.{int(labels[b])}.bias"]) for b in range(batch)], 0)
    rec = rec.transpose(1, 2).reshape(batch, HC, HG, HG)
    pred = (rec - features).pow(2).sum(1).sqrt()
    ot = []
    for b in range(batch):
        f, embed = bottom_in[:, b], sd[f"quantize_list_1.{int(labels[b])}.embed"]
        cos = F.normalize(f, dim=1) @ F.normalize(embed, dim=0)
        cond = torch.exp(f @ embed / embed.shape[1])
        cond = cond / cond.sum(1, keepdim=True)
        ot.append(((1 - cos) * cond).sum(1))
    pred = pred + 80.0 * torch.stack(ot).reshape(batch, HG, HG)
    pred = F.interpolate(pred[:, None], size=(image_size, image_size), mode="bilinear", align_corners=True)[:, 0]
    return rec, torch.stack(codes, 1), pred


def test_hvq_matches_upstream_forward(tmp_path):
    sd = upstream_hvq_state_dict()
    tokenizer = convert_official_hvq({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
                                     categories=HVQ_CATEGORIES, backbone="efficientnet_lite0", backbone_taps=[2, 4],
                                     image_size=64, num_attention_heads=HHEADS)
    cfg = tokenizer.config
    assert cfg.categories == HVQ_CATEGORIES
    assert (cfg.feature_channels, cfg.hidden_size, cfg.grid_size, cfg.num_levels, cfg.codebook_size) == (HC, HE, HG, HLEVELS, HK)
    assert (cfg.num_encoder_layers, cfg.intermediate_size, cfg.ot_temperature, cfg.restart_dead_codes) == (HLAYERS, HFFN, HK, False)
    # The backbone weights came over from enc.*.
    reference = LadmimBackbone("efficientnet_lite0", [2, 4], HG, 64)
    key_map = reference.reference_key_map("efficientnet_pytorch")
    for ours, theirs in key_map.items():
        torch.testing.assert_close(tokenizer.backbone.state_dict()[ours], sd[f"enc.{theirs}"])
    torch.testing.assert_close(tokenizer.quantizers[0].embed[1], sd[f"quantize_list_{HLEVELS}.1.embed"].t())
    torch.testing.assert_close(tokenizer.top_quantizer.cluster_size[0], sd[f"quantize_list_{HLEVELS + 1}.0.cluster_size"])

    g = torch.Generator().manual_seed(5)
    features = torch.randn(3, HC, HG, HG, generator=g)
    labels = torch.tensor([1, 0, 1])
    expected_rec, expected_codes, expected_map = upstream_hvq_forward(sd, features, labels)
    with torch.no_grad():
        out = tokenizer.eval()(features=features, category=labels)
        tokens = tokenizer.tokenize(features=features, category=labels)
    torch.testing.assert_close(out.reconstruction, expected_rec, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens["codes"], expected_codes)
    torch.testing.assert_close(tokens["structural_map"], expected_map, rtol=1e-4, atol=1e-3)


@pytest.fixture(scope="module")
def hvq_sd():
    return upstream_hvq_state_dict()


def _convert(sd, **kwargs):
    kwargs = {"categories": HVQ_CATEGORIES, "backbone": "efficientnet_lite0", "backbone_taps": [2, 4], "image_size": 64,
              "num_attention_heads": HHEADS, **kwargs}
    return convert_official_hvq(sd, **kwargs)


def test_hvq_refuses_what_does_not_map(hvq_sd):
    with pytest.raises(ConversionError, match="learned-query decoder layer.*learned_embed"):
        _convert({**hvq_sd, "decoder.layers.0.learned_embed.weight": torch.zeros(HG * HG, 2 * HE)})
    with pytest.raises(ConversionError, match=r"final encoder LayerNorm.*encoder\.norm\.weight"):
        _convert({**hvq_sd, "encoder.norm.weight": torch.ones(HE)})
    with pytest.raises(ConversionError, match=r"does not know: decoder\.layers\.0\.extra"):
        _convert({**hvq_sd, "decoder.layers.0.extra": torch.ones(1)})
    with pytest.raises(ConversionError, match=r"encoder\.layers\.1\.linear2\.weight: \(16, 5\)"):
        _convert({**hvq_sd, "encoder.layers.1.linear2.weight": torch.zeros(HE, 5)})
    with pytest.raises(ConversionError, match="2 class-switched codebook sets; pass categories="):
        _convert(hvq_sd, categories=None)
    with pytest.raises(ConversionError, match="2 class-switched codebook sets but 3 category names"):
        _convert(hvq_sd, categories=["a", "b", "c"])
    no_backbone = {k: v for k, v in hvq_sd.items() if not k.startswith("enc.")}
    with pytest.raises(ConversionError, match=r"no backbone tensors \(enc\.\*\): pass backbone_weights="):
        _convert(no_backbone, categories=HVQ_CATEGORIES)


def test_detector_assembly_and_cli(tmp_path, hvq_sd):
    from ladmim_hf import hub

    # Predictors matching the tokenizer: 64 input channels, 4x4 grid, 3 levels of 8 codes.
    predictor_sd = official_predictor_state_dict(seed=3)
    predictor_sd["patch_embed.proj.weight"] = torch.randn(D, HC, 1, 1) * 0.3
    predictor_sd["lm_head.weight"] = torch.randn(HLEVELS * HK, D) * 0.3
    predictor_sd["lm_head.bias"] = torch.randn(HLEVELS * HK) * 0.3
    hvq_path, predictor_path = tmp_path / "hvq.pt", tmp_path / "predictor.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in hvq_sd.items()}, "epoch": 1, "best_metric": 0.5}, hvq_path)
    torch.save({"model": predictor_sd, "epoch": 10}, predictor_path)

    tokenizer = _convert(hvq_sd, categories=HVQ_CATEGORIES)
    predictor = convert_official_predictor(predictor_sd, num_attention_heads=HEADS, codebook_size=HK)
    detector = build_detector(tokenizer, {"pushpins": predictor}, num_masks=4)
    assert detector.categories == ["pushpins"]  # the tokenizer was cut down to the covered category
    torch.testing.assert_close(detector.tokenizer.top_quantizer.embed[0], tokenizer.top_quantizer.embed[1])
    torch.testing.assert_close(detector.tokenizer.output_heads.weight[0], tokenizer.output_heads.weight[1])

    out_dir = tmp_path / "converted"
    argv = ["--hvq", str(hvq_path), "--predictor", f"pushpins={predictor_path}", "--output", str(out_dir),
            "--categories", *HVQ_CATEGORIES, "--backbone", "efficientnet_lite0", "--backbone_taps", "2", "4",
            "--image_size", "64", "--tokenizer_heads", str(HHEADS), "--predictor_heads", str(HEADS),
            "--codebook_size", str(HK), "--num_masks", "4"]
    assert convert_main(argv) == 0
    config = json.loads((out_dir / "config.json").read_text())
    assert config["custom_pipelines"]["image-anomaly-detection"]["impl"] == "pipeline_ladmim.LadmimAnomalyDetectionPipeline"
    loaded = hub.load_model(out_dir)
    features = torch.randn(2, HC, HG, HG)
    masks = torch.rand(2, 3, HG * HG) < 0.5
    a = loaded(features=features, category="pushpins", bool_masked_pos=masks)
    b = detector(features=features, category="pushpins", bool_masked_pos=masks)
    torch.testing.assert_close(a.pred_score, b.pred_score)
    # Refusals of the command line: non-empty output folder, predictor without a category next to --hvq.
    assert convert_main(argv) == 2
    assert convert_main(["--hvq", str(hvq_path), "--predictor", str(predictor_path), "--output",
                         str(tmp_path / "other")]) == 2
