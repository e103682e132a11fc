"""Model tests in the transformers ModelTester spirit: tiny configs, shapes, hand-computed values,
round trips and determinism."""

from __future__ import annotations

import math
import copy

import numpy as np
import pytest
import torch

from conftest import TINY_CATEGORIES, tiny_config, tiny_predictor_kwargs, tiny_tokenizer_kwargs
from ladmim_hf import (
    LadmimConfig,
    LadmimForAnomalyDetection,
    LadmimPredictorConfig,
    LadmimPredictorModel,
    LadmimTokenizerConfig,
    LadmimTokenizerModel,
    code_histograms,
)


class LadmimModelTester:
    """Builds tiny inputs and checks outputs, like transformers' ModelTester helpers."""

    batch_size = 3
    image_size = 64
    grid = 4

    def __init__(self, config: LadmimConfig | None = None):
        self.config = config or tiny_config()

    def prepare_inputs(self, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch_size, 3, self.image_size, self.image_size, generator=generator)

    def check_tokenizer(self, tokenizer: LadmimTokenizerModel, pixel_values):
        cfg = tokenizer.config
        tokenizer.train()
        out = tokenizer(pixel_values, category=["breakfast_box", "pushpins", "pushpins"])
        cells = cfg.grid_size**2
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert out.codes.shape == (self.batch_size, cfg.num_levels, cells)
        assert out.codes.dtype == torch.long and int(out.codes.max()) < cfg.codebook_size
        assert out.features.shape == (self.batch_size, cfg.feature_channels, cfg.grid_size, cfg.grid_size)
        assert out.reconstruction.shape == out.features.shape
        assert out.codebook_perplexity.shape == (cfg.num_levels + 1,)
        assert out.anomaly_map is None  # maps are an eval-mode output
        tokenizer.eval()
        out = tokenizer(pixel_values, category="pushpins")
        assert out.anomaly_map.shape == (self.batch_size, cfg.image_size, cfg.image_size)
        assert out.pred_score.shape == (self.batch_size,)
        torch.testing.assert_close(
            tokenizer.encode(pixel_values, category="pushpins"), out.codes, rtol=0, atol=0
        )


@pytest.fixture
def tester():
    return LadmimModelTester()


def test_tokenizer_shapes_and_loss_backward(tester):
    torch.manual_seed(0)
    tokenizer = LadmimTokenizerModel(LadmimTokenizerConfig(**tiny_tokenizer_kwargs()))
    pixel_values = tester.prepare_inputs()
    tester.check_tokenizer(tokenizer, pixel_values)
    tokenizer.train()
    out = tokenizer(pixel_values, category="pushpins")
    out.loss.backward()
    assert tokenizer.input_proj.weight.grad is not None
    assert all(p.grad is None for p in tokenizer.backbone.parameters()), "the backbone is frozen"
    expected = out.reconstruction_loss + 0.25 * out.commitment_loss
    torch.testing.assert_close(out.loss, expected)



def test_feature_standardisation_statistics_and_equivalence(tmp_path):
    torch.manual_seed(0)
    standardised = LadmimTokenizerModel(LadmimTokenizerConfig(**tiny_tokenizer_kwargs(standardize_features=True))).eval()
    plain = LadmimTokenizerModel(LadmimTokenizerConfig(**tiny_tokenizer_kwargs())).eval()
    plain.load_state_dict(standardised.state_dict())
    # Channel c has mean c and std 1 + c / 10.
    channels = standardised.config.feature_channels
    scale = 1 + torch.arange(channels, dtype=torch.float32) / 10
    raw = torch.randn(200, channels, 4, 4) * scale[None, :, None, None] + torch.arange(channels, dtype=torch.float32)[None, :, None, None]
    assert torch.equal(standardised.standardize(raw), raw), "identity until statistics are set"
    standardised.set_feature_statistics(raw)
    torch.testing.assert_close(standardised.feature_mean, raw.mean((0, 2, 3)), rtol=0, atol=1e-4)
    torch.testing.assert_close(standardised.feature_std, raw.transpose(0, 1).reshape(channels, -1).std(1), rtol=1e-5, atol=0)
    assert torch.equal(plain.standardize(raw), raw), "standardize_features=False never changes features"
    batch = raw[:3]
    by_hand = (batch - raw.mean((0, 2, 3))[None, :, None, None]) / standardised.feature_std[None, :, None, None]
    assert by_hand.flatten(1).std(1).sub(1).abs().max() < 0.5
    # The standardising tokenizer on raw features == the plain one on standardised features.
    assert torch.equal(standardised.encode(features=batch, category="pushpins"), plain.encode(features=by_hand, category="pushpins"))
    ours, reference = standardised.tokenize(features=batch, category="pushpins"), plain.tokenize(features=by_hand, category="pushpins")
    torch.testing.assert_close(ours["features"], by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["structural_score"], reference["structural_score"], rtol=1e-5, atol=1e-5)
    # The statistics are saved with the weights.
    standardised.save_pretrained(tmp_path)
    loaded = LadmimTokenizerModel.from_pretrained(tmp_path)
    assert loaded.config.standardize_features
    assert torch.equal(loaded.feature_std, standardised.feature_std)

def test_cell_channel_residual_normalisation_by_hand(tmp_path, caplog):
    torch.manual_seed(0)
    tokenizer = LadmimTokenizerModel(LadmimTokenizerConfig(**tiny_tokenizer_kwargs(
        residual_normalization="cell_channel", residual_variance_floor=0.2, use_ot_score=False)))
    plain = LadmimTokenizerModel(LadmimTokenizerConfig(**tiny_tokenizer_kwargs(use_ot_score=False))).eval()
    plain.load_state_dict(tokenizer.state_dict(), strict=False)
    channels = tokenizer.config.feature_channels
    train, test = torch.randn(7, channels, 4, 4), torch.randn(3, channels, 4, 4)
    # unfitted: the identity statistics give the plain map scaled by 1 / sqrt(1 + floor), with a warning
    unfitted = tokenizer.eval().tokenize(features=test, category="pushpins")
    torch.testing.assert_close(unfitted["structural_map"] * math.sqrt(1.2), plain.tokenize(features=test, category="pushpins")["structural_map"],
                               rtol=1e-5, atol=1e-5)
    assert "no residual statistics for categories ['pushpins']" in caplog.text
    tokenizer.train()
    codebooks = tokenizer.quantizers[0].embed.clone()
    tokenizer.fit_residual_statistics(train, "pushpins", batch_size=3)
    assert tokenizer.training and torch.equal(tokenizer.quantizers[0].embed, codebooks), "no EMA updates, mode restored"
    tokenizer.eval()
    pushpins = tokenizer.categories.index("pushpins")
    assert tokenizer.residual_fitted.tolist() == [c == "pushpins" for c in tokenizer.categories]
    with torch.no_grad():
        out = tokenizer(features=train, category="pushpins", return_maps=False)
        residual = out.reconstruction - out.features
    torch.testing.assert_close(tokenizer.residual_mean[pushpins], residual.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tokenizer.residual_var[pushpins], residual.var(0), rtol=1e-4, atol=1e-6)
    # the map, by hand: per cell sqrt(sum_c (r - mean)^2 / (var + 0.2 * mean var)), then upsampled
    with torch.no_grad():
        out = tokenizer(features=test, category="pushpins", return_maps=False)
    mean, var = residual.mean(0), residual.var(0)
    grid = ((out.reconstruction - out.features - mean).pow(2) / (var + 0.2 * var.mean())).sum(1).sqrt()
    expected = torch.nn.functional.interpolate(grid[:, None], size=(64, 64), mode="bilinear", align_corners=True)[:, 0]
    tokens = tokenizer.tokenize(features=test, category="pushpins")
    torch.testing.assert_close(tokens["structural_map"], expected, rtol=1e-4, atol=1e-5)
    # other categories keep their own (identity) statistics in a mixed batch
    mixed = tokenizer.tokenize(features=test, category=["pushpins", "breakfast_box", "pushpins"])
    torch.testing.assert_close(mixed["structural_map"][[0, 2]], tokens["structural_map"][[0, 2]], rtol=1e-5, atol=1e-5)
    alone = tokenizer.tokenize(features=test[1:2], category="breakfast_box")["structural_map"]
    torch.testing.assert_close(mixed["structural_map"][1:2], alone, rtol=1e-5, atol=1e-5)
    # saved with the weights
    tokenizer.save_pretrained(tmp_path)
    loaded = LadmimTokenizerModel.from_pretrained(tmp_path).eval()
    assert loaded.config.residual_normalization == "cell_channel" and loaded.residual_fitted[pushpins]
    torch.testing.assert_close(loaded.tokenize(features=test, category="pushpins")["structural_map"], tokens["structural_map"])
    with pytest.raises(ValueError, match="residual_normalization must be"):
        LadmimTokenizerConfig(residual_normalization="z")
    with pytest.raises(ValueError, match="needs config.residual_normalization"):
        plain.fit_residual_statistics(train, "pushpins")


def test_ema_codebooks_unchanged_in_eval_and_updated_in_training(tester):
    torch.manual_seed(0)
    tokenizer = LadmimTokenizerModel(LadmimTokenizerConfig(**tiny_tokenizer_kwargs()))
    pixel_values = tester.prepare_inputs()
    before = {k: v.clone() for k, v in tokenizer.state_dict().items() if "quantizer" in k}
    tokenizer.eval()
    tokenizer(pixel_values, category="pushpins")
    tokenizer.tokenize(pixel_values, category="pushpins")
    tokenizer.train()
    tokenizer(pixel_values, category="pushpins", update_codebooks=False)
    for key, value in tokenizer.state_dict().items():
        if key in before:
            assert torch.equal(value, before[key]), f"{key} changed without an EMA update"
    tokenizer(pixel_values, category="pushpins")
    after = tokenizer.state_dict()
    # The pushpins codebook (id 1) moves; the absent breakfast_box codebook (id 0) must not.
    assert not torch.equal(after["top_quantizer.embed"][1], before["top_quantizer.embed"][1])
    assert torch.equal(after["top_quantizer.embed"][0], before["top_quantizer.embed"][0])


def test_ema_update_matches_hand_computation():
    from ladmim_hf.models.modeling_ladmim_tokenizer import LadmimVectorQuantizer

    quantizer = LadmimVectorQuantizer(1, 2, 1, decay=0.5, epsilon=0.0, dead_code_threshold=0.0, restart_dead_codes=False)
    quantizer.embed.copy_(torch.tensor([[[0.0], [10.0]]]))
    quantizer.embed_avg.copy_(quantizer.embed)
    quantizer.cluster_size.fill_(1.0)
    quantizer.train()
    x = torch.tensor([[[1.0], [2.0], [9.0]]])
    _, indices, commitment, _ = quantizer(x, torch.tensor([0]), update=True)
    assert indices.tolist() == [[0, 0, 1]]
    # cluster sizes: 0.5 * 1 + 0.5 * [2, 1] = [1.5, 1.0]; sums: 0.5 * [0, 10] + 0.5 * [3, 9] = [1.5, 9.5]
    torch.testing.assert_close(quantizer.cluster_size, torch.tensor([[1.5, 1.0]]))
    torch.testing.assert_close(quantizer.embed, torch.tensor([[[1.0], [9.5]]]))
    torch.testing.assert_close(commitment, torch.tensor((1 + 4 + 1) / 3))


def test_dead_code_restart_revives_unused_codes(tester):
    torch.manual_seed(0)
    tokenizer = LadmimTokenizerModel(LadmimTokenizerConfig(**tiny_tokenizer_kwargs(dead_code_threshold=0.5)))
    quantizer = tokenizer.quantizers[0]
    # Park every code of category 1 far away: nothing is assigned to them, so all would be dead.
    quantizer.embed[1] = 1e4
    quantizer.embed_avg[1] = 1e4
    tokenizer.train()
    out = tokenizer(tester.prepare_inputs(), category="pushpins")
    assert out.dead_codes_restarted > 0
    assert int(quantizer.restart_count) > 0
    assert quantizer.embed[1].abs().max() < 1e3, "dead codes were restarted from encoder outputs"
    # After the restart the codes are used again.
    tokenizer.eval()
    codes = tokenizer.encode(tester.prepare_inputs(1), category="pushpins")
    assert codes[:, 0].unique().numel() > 1


def test_code_histograms_against_loop():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 5, (2, 3, 9), generator=generator)
    masks = torch.rand(2, 4, 9, generator=generator) > 0.5
    masks[0, 0] = False  # an empty mask gives an all-zero histogram
    hist = code_histograms(codes, masks, 5)
    for b in range(2):
        for m in range(4):
            for level in range(3):
                expected = np.zeros(5)
                chosen = codes[b, level][masks[b, m]].tolist()
                for code in chosen:
                    expected[code] += 1.0 / len(chosen)
                np.testing.assert_allclose(hist[b, m, level].numpy(), expected, atol=1e-6)


def test_predictor_loss_against_hand_computed_histogram():
    config = LadmimPredictorConfig(**tiny_predictor_kwargs(input_channels=8, grid_size=2, num_levels=2, codebook_size=4))
    predictor = LadmimPredictorModel(config)
    logits = torch.zeros(1, 1, 2, 4)  # uniform predictions: 0.25 per code
    labels = torch.tensor([[[0, 0, 1, 3], [2, 2, 2, 2]]])
    masks = torch.tensor([[[True, True, True, False]]])
    # level 0: target [2/3, 1/3, 0, 0] -> |.25-.667| + |.25-.333| + .25 + .25 = 1.0
    # level 1: target [0, 0, 1, 0]     -> .25 + .25 + .75 + .25 = 1.5
    assert predictor.histogram_loss(logits, labels, masks).item() == pytest.approx(2.5, abs=1e-6)
    # "sum" reduction adds samples; "mean" averages them.
    two = predictor.histogram_loss(logits.repeat(2, 1, 1, 1), labels.repeat(2, 1, 1), masks.repeat(2, 1, 1))
    assert two.item() == pytest.approx(5.0, abs=1e-6)
    predictor.config.loss_reduction = "mean"
    assert predictor.histogram_loss(logits.repeat(2, 1, 1, 1), labels.repeat(2, 1, 1), masks.repeat(2, 1, 1)).item() == pytest.approx(2.5, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["l1", "kl", "token_ce"])
def test_predictor_forward_shapes_and_losses(loss_type):
    config = LadmimPredictorConfig(**tiny_predictor_kwargs(input_channels=8, grid_size=4, num_levels=2, codebook_size=16, loss_type=loss_type))
    torch.manual_seed(0)
    predictor = LadmimPredictorModel(config)
    features = torch.randn(3, 8, 4, 4)
    masks = torch.zeros(3, 16, dtype=torch.bool)
    masks[:, :6] = True
    labels = torch.randint(0, 16, (3, 2, 16))
    out = predictor(features, masks, labels=labels)
    assert out.logits.shape == (3, 2, 16)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    assert predictor.embeddings.mask_token.grad is not None
    multi = predictor(features, masks[:, None].repeat(1, 5, 1))
    assert multi.logits.shape == (3, 5, 2, 16)


def test_token_ce_histogram_is_the_mean_of_the_masked_cells_distributions():
    config = LadmimPredictorConfig(**tiny_predictor_kwargs(input_channels=8, grid_size=4, num_levels=2, codebook_size=16, loss_type="token_ce"))
    torch.manual_seed(0)
    predictor = LadmimPredictorModel(config).eval()
    features = torch.randn(3, 8, 4, 4)
    masks = torch.rand(3, 16) < 0.4
    masks[:, 0] = True
    labels = torch.randint(0, 16, (3, 2, 16))
    out = predictor(features, masks, labels=labels, output_hidden_states=True)
    cell_probs = predictor.head(out.last_hidden_state[:, 2:]).view(3, 16, 2, 16).softmax(-1)
    for b in range(3):
        expected = cell_probs[b, masks[b]].mean(0)  # (L, K), by hand
        torch.testing.assert_close(out.logits[b].softmax(-1), expected, rtol=1e-5, atol=1e-6)
        ce = -sum(cell_probs[b, n, l, labels[b, l, n]].log() for n in masks[b].nonzero()[:, 0] for l in range(2))
        torch.testing.assert_close(out.token_logits[b].softmax(-1), cell_probs[b])
        assert (ce / masks[b].sum()).item() == pytest.approx(
            predictor(features[b:b + 1], masks[b:b + 1], labels=labels[b:b + 1]).loss.item(), rel=1e-5)
    # several masks per image and chunking give the same histograms as one mask at a time
    multi = predictor(features, torch.stack([masks, masks.flip(-1)], 1), max_sequences_per_chunk=4).logits
    torch.testing.assert_close(multi[:, 0], out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(multi[:, 1], predictor(features, masks.flip(-1)).logits, rtol=1e-5, atol=1e-5)


def test_predictor_paper_size_parameter_count():
    config = LadmimPredictorConfig()  # 384 in, width 512, depth 4, 8 heads, 24x24, 4 x 512 codes
    with torch.device("meta"):
        predictor = LadmimPredictorModel(config)
    count = sum(p.numel() for p in predictor.parameters())
    assert abs(count - 14.16e6) < 0.05e6, count


def test_predictor_masked_positions_use_mask_token_and_chunking_is_exact():
    config = LadmimPredictorConfig(**tiny_predictor_kwargs(input_channels=8, grid_size=4, num_levels=2, codebook_size=16, attention_probs_dropout_prob=0.0))
    torch.manual_seed(0)
    predictor = LadmimPredictorModel(config).eval()
    features = torch.randn(2, 8, 4, 4)
    masks = torch.rand(2, 6, 16) > 0.5
    full = predictor(features, masks).logits
    chunked = predictor(features, masks, max_sequences_per_chunk=5).logits
    torch.testing.assert_close(full, chunked, rtol=1e-5, atol=1e-6)
    # Masked cells carry no information about their features.
    changed = features.clone().flatten(2)
    changed[0, :, masks[0, 0]] += 100.0
    again = predictor(changed.view_as(features), masks[:, :1]).logits
    torch.testing.assert_close(again[0, 0], full[0, 0], rtol=1e-5, atol=1e-5)



def test_hist_token_only_last_block_equals_the_full_forward():
    """The fast path runs the last block for the hist token alone; logits and gradients must equal
    those of the full forward (forced here by `output_hidden_states=True`)."""
    config = LadmimPredictorConfig(**tiny_predictor_kwargs(input_channels=8, grid_size=4, num_levels=2, codebook_size=16,
                                                          attention_probs_dropout_prob=0.0, layer_scale_init_value=0.5))
    torch.manual_seed(0)
    predictor = LadmimPredictorModel(config)
    features = torch.randn(3, 8, 4, 4)
    masks = torch.rand(3, 2, 16) > 0.5
    labels = torch.randint(0, 16, (3, 2, 16))
    grads = []
    for full in (False, True):
        predictor.zero_grad()
        out = predictor(features, masks, labels=labels, output_hidden_states=full)
        out.loss.backward()
        grads.append([p.grad.clone() for p in predictor.parameters()])
        if full:
            assert out.last_hidden_state.shape == (6, 18, config.hidden_size)
            torch.testing.assert_close(predictor.head(out.last_hidden_state[:, 1]).view_as(fast_logits), fast_logits,
                                       rtol=1e-5, atol=1e-6)
        else:
            fast_logits = out.logits.detach()
    for fast, reference in zip(*grads):
        torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-6)

def slow_reference_scores(model: LadmimForAnomalyDetection, pixel_values, category: str, masks: torch.Tensor,
                          channels: list[int] | None = None):
    """The official algorithm, literally: one predictor pass per mask with batch 1, the tokenizer codes
    recomputed per mask, float64 softmax and histograms counted in a Python loop. `channels`: the feature
    channels the predictor reads (default: all)."""
    scores = torch.zeros(masks.shape[:2], dtype=torch.float64)
    predictor = model.predictor_for(category)
    cfg = model.config.predictor_config
    with torch.no_grad():
        for b in range(masks.shape[0]):
            for m in range(masks.shape[1]):
                image = pixel_values[b:b + 1]
                tokens = model.tokenizer.tokenize(image, category)
                features = tokens["features"] if channels is None else tokens["features"][:, channels]
                logits = predictor(features, masks[b:b + 1, m]).logits[0].double()
                probs = logits.softmax(-1)
                total = 0.0
                masked = torch.nonzero(masks[b, m]).flatten().tolist()
                for level in range(cfg.num_levels):
                    hist = torch.zeros(cfg.codebook_size, dtype=torch.float64)
                    for cell in masked:
                        hist[tokens["codes"][0, level, cell]] += 1.0 / len(masked)
                    total += (probs[level] - hist).abs().sum().item()
                scores[b, m] = total
    return scores


def test_batched_scoring_equals_slow_per_mask_loop(tiny_model, pixel_values):
    out = tiny_model(pixel_values, category="pushpins", num_masks=4, seed=3)
    reference = slow_reference_scores(tiny_model, pixel_values, "pushpins", out.masks)
    torch.testing.assert_close(out.mask_scores.double(), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logical_score.double(), reference.mean(1), rtol=0, atol=1e-5)


def test_detector_output_shapes_and_mixed_categories(tiny_model, pixel_values):
    out = tiny_model(pixel_values, category=["pushpins", "breakfast_box", "pushpins"], num_masks=3, seed=0, return_histograms=True)
    assert out.pred_score.shape == out.logical_score.shape == out.structural_score.shape == (3,)
    assert out.pred_label.dtype == torch.bool
    for name in ("anomaly_map", "logical_map", "structural_map"):
        assert getattr(out, name).shape == (3, 64, 64), name
    assert out.mask_scores.shape == (3, 3) and out.masks.shape == (3, 3, 16)
    assert out.predicted_histograms.shape == out.target_histograms.shape == (3, 3, 2, 16)
    torch.testing.assert_close(out.predicted_histograms.sum(-1), torch.ones(3, 3, 2))
    assert ((out.logical_score >= 0) & (out.logical_score <= 4)).all()  # L1 of L distributions is in [0, 2L]
    # Each image is scored by its own category's predictor: same image, same masks, other predictor.
    single = tiny_model(pixel_values[1:2], category="breakfast_box", bool_masked_pos=out.masks[1:2])
    torch.testing.assert_close(single.mask_scores[0], out.mask_scores[1], rtol=1e-5, atol=1e-6)


def test_seeded_scoring_is_deterministic_and_batch_independent(tiny_model, pixel_values):
    a = tiny_model(pixel_values, category="pushpins", seed=[5, 6, 7])
    b = tiny_model(pixel_values, category="pushpins", seed=[5, 6, 7])
    torch.testing.assert_close(a.pred_score, b.pred_score, rtol=0, atol=0)
    alone = tiny_model(pixel_values[2:], category="pushpins", seed=[7])
    torch.testing.assert_close(alone.logical_score[0], a.logical_score[2], rtol=1e-5, atol=1e-6)


def test_calibrated_fusion_and_threshold(tiny_model, pixel_values):
    raw = tiny_model(pixel_values, category="pushpins", seed=0)
    tiny_model.config.calibration = {"pushpins": {"logical_mean": 1.0, "logical_std": 2.0, "structural_mean": 0.5,
                                                  "structural_std": 0.25, "threshold": 0.0}}
    out = tiny_model(pixel_values, category="pushpins", seed=0)
    expected = (raw.logical_score - 1.0) / 2.0 + (raw.structural_score - 0.5) / 0.25
    torch.testing.assert_close(out.pred_score, expected)
    assert torch.equal(out.pred_label, expected > 0.0)
    forced = tiny_model(pixel_values, category="pushpins", seed=0, threshold=1e9)
    assert not forced.pred_label.any()


def test_set_scoring_checks_the_settings_and_needs_every_category(tiny_model):
    from ladmim_hf.calibration import set_scoring

    config = tiny_model.config
    both = ["breakfast_box", "pushpins"]
    before = (list(config.fused_branches), config.fusion_rule, config.logical_pose_step)
    set_scoring(tiny_model, [])  # nothing asked: nothing changes, no category needed
    assert (config.fused_branches, config.fusion_rule, config.logical_pose_step) == before
    with pytest.raises(ValueError, match=r"fused_branches and fusion_rule.*\['pushpins'\] would keep the old ones.*--categories all"):
        set_scoring(tiny_model, ["breakfast_box"], ["logical"], "max")
    with pytest.raises(ValueError, match=r"logical_pose_step changes.*\['pushpins'\]"):
        set_scoring(tiny_model, ["breakfast_box"], logical_pose_step=4)
    with pytest.raises(ValueError, match="lists a branch twice"):
        set_scoring(tiny_model, both, ["logical", "logical"])
    with pytest.raises(ValueError, match="fusion_rule must be one of"):
        set_scoring(tiny_model, both, fusion_rule="median")
    with pytest.raises(ValueError, match="logical_pose_step must be a whole number of pixels in 0..31"):
        set_scoring(tiny_model, both, ["structural"], logical_pose_step=40)
    assert (config.fused_branches, config.fusion_rule, config.logical_pose_step) == before, "a refusal changes nothing"
    set_scoring(tiny_model, both, ["structural"], "max")
    assert (config.fused_branches, config.fusion_rule, config.logical_pose_step) == (["structural"], "max", 0)
    set_scoring(tiny_model, both, logical_pose_step=4)
    assert (config.fused_branches, config.fusion_rule, config.logical_pose_step) == (["structural"], "max", 4)


def test_scoring_runs_in_eval_mode_and_restores_training_mode(tiny_model, pixel_values):
    tiny_model.train()
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    first = tiny_model(pixel_values, category="pushpins", seed=1)
    second = tiny_model(pixel_values, category="pushpins", seed=1)
    torch.testing.assert_close(first.pred_score, second.pred_score, rtol=0, atol=0)  # no dropout
    assert tiny_model.training
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unknown_category_is_a_clear_error(tiny_model, pixel_values):
    with pytest.raises(ValueError, match=r"unknown category 'screw_bag'.*breakfast_box"):
        tiny_model(pixel_values, category="screw_bag")


def test_save_and_load_round_trip(tmp_path, tiny_model, pixel_values):
    tiny_model.config.calibration = {"pushpins": {"logical_mean": 1.0, "logical_std": 2.0, "structural_mean": 0.5,
                                                  "structural_std": 0.25, "threshold": 0.1}}
    tiny_model.save_pretrained(tmp_path)
    saved = sorted(p.name for p in tmp_path.iterdir())
    for name in ("config.json", "model.safetensors", "configuration_ladmim.py", "modeling_ladmim.py",
                 "backbone_ladmim.py", "masking.py"):
        assert name in saved, saved
    import json

    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_ladmim.LadmimForAnomalyDetection"
    assert config["auto_map"]["AutoConfig"] == "configuration_ladmim.LadmimConfig"
    loaded = LadmimForAnomalyDetection.from_pretrained(tmp_path).eval()
    assert loaded.config.calibration == tiny_model.config.calibration
    assert loaded.config.categories == TINY_CATEGORIES
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    a = tiny_model(pixel_values, category="pushpins", seed=0)
    b = loaded(pixel_values, category="pushpins", seed=0)
    for name in ("pred_score", "logical_score", "structural_score", "anomaly_map"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)


def test_shared_predictor_option(pixel_values):
    torch.manual_seed(0)
    model = LadmimForAnomalyDetection(tiny_config(shared_predictor=True)).eval()
    assert list(model.predictors) == ["shared"]
    assert model.predictor_for("pushpins") is model.predictor_for("breakfast_box")
    assert model(pixel_values, category="pushpins", num_masks=2, seed=0).pred_score.shape == (3,)


def test_predictor_dtype_autocasts_the_predictor_only(tiny_model):
    torch.manual_seed(3)
    pixels = torch.rand(2, 3, tiny_model.config.tokenizer_config.image_size, tiny_model.config.tokenizer_config.image_size)
    full = tiny_model(pixels, category=tiny_model.categories[0], num_masks=4, seed=[0, 1], return_histograms=True)
    half = tiny_model(pixels, category=tiny_model.categories[0], num_masks=4, seed=[0, 1], return_histograms=True,
                      predictor_dtype="bf16")
    # The tokenizer ran in float32: same codes (hence targets), same masks, same structural branch.
    assert torch.equal(full.masks, half.masks) and torch.equal(full.target_histograms, half.target_histograms)
    assert torch.equal(full.structural_score, half.structural_score)
    # The predictor ran in bf16 (8-bit mantissa): close to, but not bit-equal with, float32.
    assert half.predicted_histograms.dtype == torch.float32
    assert not torch.equal(full.predicted_histograms, half.predicted_histograms)
    torch.testing.assert_close(half.mask_scores, full.mask_scores, atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match="predictor_dtype must be"):
        tiny_model(pixels, category=tiny_model.categories[0], num_masks=1, predictor_dtype="int8")


def test_code_kernel_and_kernel_distance_by_hand(tiny_model):
    from ladmim_hf.models.modeling_ladmim_utils import kernel_histogram_distance

    tokenizer = tiny_model.tokenizer
    category = tiny_model.categories[0]
    class_id = int(tokenizer.category_ids(category, 1)[0])
    levels, size = tokenizer.config.num_levels, tokenizer.config.codebook_size
    with torch.no_grad():  # codes 0 and 1 identical, code j at distance j from them along one axis
        for quantizer in tokenizer.quantizers:
            book = torch.zeros_like(quantizer.embed[class_id])
            book[2:, 0] = torch.arange(2, size, dtype=book.dtype)
            quantizer.embed[class_id] = book
    kernel = tokenizer.code_kernel(category, bandwidth=2.0)
    assert kernel.shape == (levels, size, size)
    squared = torch.tensor([0.0, 0.0] + list(range(2, size)), dtype=torch.float64)
    squared = (squared[:, None] - squared[None, :]) ** 2
    expected = torch.exp(-squared / (2.0 * squared[squared > 0].median()))
    torch.testing.assert_close(kernel[0].double(), expected, atol=1e-6, rtol=1e-5)

    # Mass moved between the twin codes 0 and 1 costs nothing; moved to code 2 it costs sqrt(d^T G d).
    twins = torch.zeros(1, 1, levels, size)
    twins[..., 0], twins[..., 1] = 0.5, -0.5
    assert float(kernel_histogram_distance(twins, kernel)) == pytest.approx(0.0, abs=1e-5)
    moved = torch.zeros(1, 1, levels, size)
    moved[..., 0], moved[..., 2] = 0.5, -0.5
    by_hand = levels * math.sqrt(0.25 + 0.25 - 2 * 0.25 * float(expected[0, 2]))
    assert float(kernel_histogram_distance(moved, kernel)) == pytest.approx(by_hand, rel=1e-5)
    # With the identity kernel it is the L2 norm per level; per-row kernels give the same as shared.
    eye = torch.eye(size).expand(levels, size, size)
    assert float(kernel_histogram_distance(moved, eye)) == pytest.approx(levels * math.sqrt(0.5), rel=1e-6)
    torch.testing.assert_close(kernel_histogram_distance(moved, kernel[None]), kernel_histogram_distance(moved, kernel))


def test_codebook_mmd_loss_and_scoring_use_the_kernel_distance(tiny_model):
    from ladmim_hf import LadmimForAnomalyDetection
    from ladmim_hf.models.modeling_ladmim_predictor import LadmimPredictorModel
    from ladmim_hf.models.modeling_ladmim_utils import code_histograms, kernel_histogram_distance

    category = tiny_model.categories[0]
    config = tiny_model.config.predictor_config
    torch.manual_seed(1)
    predictor = LadmimPredictorModel(type(config)(**{**config.to_dict(), "loss_type": "codebook_mmd"}))
    features = torch.randn(3, config.input_channels, config.grid_size, config.grid_size)
    codes = torch.randint(0, config.codebook_size, (3, config.num_levels, config.num_patches))
    masks = torch.zeros(3, config.num_patches, dtype=torch.bool)
    masks[:, :5] = True
    kernel = tiny_model.tokenizer.code_kernel(category)
    out = predictor(features, masks, labels=codes, code_kernel=kernel)
    difference = out.logits.softmax(-1)[:, None] - code_histograms(codes, masks, config.codebook_size)[:, None]
    assert float(out.loss.detach()) == pytest.approx(float(kernel_histogram_distance(difference.detach(), kernel).sum()), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in predictor.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="code_kernel"):
        predictor(features, masks, labels=codes)

    # Scoring with histogram_distance="codebook_mmd": same predictions, kernel distance per mask.
    mmd_model = LadmimForAnomalyDetection(type(tiny_model.config)(**{**tiny_model.config.to_dict(),
                                                                      "histogram_distance": "codebook_mmd"})).eval()
    mmd_model.load_state_dict(tiny_model.state_dict())
    pixels = torch.rand(2, 3, tiny_model.config.tokenizer_config.image_size, tiny_model.config.tokenizer_config.image_size)
    got = mmd_model(pixels, category=category, num_masks=3, seed=[0, 1], return_histograms=True)
    difference = got.predicted_histograms - got.target_histograms
    torch.testing.assert_close(got.mask_scores, kernel_histogram_distance(difference, mmd_model.tokenizer.code_kernel(category)))
    plain = tiny_model(pixels, category=category, num_masks=3, seed=[0, 1], return_histograms=True)
    torch.testing.assert_close(plain.predicted_histograms, got.predicted_histograms)
    assert not torch.allclose(plain.mask_scores, got.mask_scores)
    with pytest.raises(ValueError, match="histogram_distance"):
        type(tiny_model.config)(histogram_distance="l2")


# --------------------------------------------------------------------------------------------------
# Patch tokens (predictor_config.patch_size > 1)
# --------------------------------------------------------------------------------------------------


def _patch_predictor(loss_type: str = "token_ce", patch_size: int = 2) -> LadmimPredictorModel:
    config = LadmimPredictorConfig(**tiny_predictor_kwargs(input_channels=8, grid_size=4, num_levels=2, codebook_size=16,
                                                           loss_type=loss_type, patch_size=patch_size,
                                                           attention_probs_dropout_prob=0.0))
    torch.manual_seed(0)
    return LadmimPredictorModel(config).eval()


def test_patch_tokens_embed_exactly_their_cells():
    predictor = _patch_predictor()
    assert predictor.config.num_tokens == 4 and predictor.config.num_patches == 16
    features = torch.randn(2, 8, 4, 4)
    tokens = predictor.embeddings.embed_patches(features)
    assert tokens.shape == (2, 4, 32)
    # the (B, N, C) layout gives the same tokens
    torch.testing.assert_close(predictor.embeddings.embed_patches(features.flatten(2).transpose(1, 2)), tokens)
    # by hand: token (r, c) reads cells (2r + i, 2c + j), channel-major within the patch
    weight, bias = predictor.embeddings.patch_embeddings.weight, predictor.embeddings.patch_embeddings.bias
    for r in range(2):
        for c in range(2):
            patch = features[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(2, -1)  # (B, C * 2 * 2)
            torch.testing.assert_close(tokens[:, 2 * r + c], patch @ weight.T + bias, rtol=1e-5, atol=1e-5)


def test_patch_tokens_predict_each_of_their_cells():
    predictor = _patch_predictor()
    features = torch.randn(2, 8, 4, 4)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[:, [0, 1, 4, 5, 10, 11, 14, 15]] = True  # patches (0, 0) and (1, 1)
    labels = torch.randint(0, 16, (2, 2, 16))
    out = predictor(features, masks, labels=labels, output_hidden_states=True)
    assert out.last_hidden_state.shape == (2, 2 + 4, 32)
    head = predictor.head(out.last_hidden_state[:, 2:]).view(2, 4, 4, 2, 16)  # (B, token, cell in patch, L, K)
    for cell in range(16):
        row, col = divmod(cell, 4)
        token, inside = (row // 2) * 2 + col // 2, (row % 2) * 2 + col % 2
        torch.testing.assert_close(out.token_logits[:, cell], head[:, token, inside])
    expected = out.token_logits.softmax(-1)[:, masks[0]].mean(1)  # the histogram is the mean over masked cells
    torch.testing.assert_close(out.logits.softmax(-1), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["l1", "token_ce"])
def test_patch_tokens_never_see_a_masked_cell(loss_type):
    """A patch with any masked cell is a mask token, so even a mask that splits a patch hides all of
    that cell's features."""
    predictor = _patch_predictor(loss_type)
    features = torch.randn(2, 8, 4, 4)
    masks = torch.zeros(2, 3, 16, dtype=torch.bool)
    masks[:, 0, 5] = True  # one cell of patch (0, 0)
    masks[:, 1, [10, 11, 14, 15]] = True  # all of patch (1, 1)
    masks[:, 2, [2, 3, 8]] = True  # half of patch (0, 1), a quarter of patch (1, 0)
    base = predictor(features, masks).logits
    for m in range(3):
        changed = features.clone().flatten(2)
        changed[:, :, masks[0, m]] += 100.0
        torch.testing.assert_close(predictor(changed.view_as(features), masks[:, m]).logits, base[:, m], rtol=1e-5, atol=1e-5)
    # a visible cell of the same patch as a masked one is hidden too (the whole patch is a mask token)
    changed = features.clone().flatten(2)
    changed[:, :, 0] += 100.0  # cell 0 shares patch (0, 0) with the masked cell 5
    torch.testing.assert_close(predictor(changed.view_as(features), masks[:, 0]).logits, base[:, 0], rtol=1e-5, atol=1e-5)
    assert predictor.token_masks(masks).tolist()[0] == [[True, False, False, False], [False, False, False, True],
                                                       [False, True, True, False]]


def test_patch_masks_cover_whole_patches_and_config_checks_sizes():
    from ladmim_hf.models.masking import BlockMaskGenerator

    generator = BlockMaskGenerator(8, 24, min_block=8, patch_size=2)
    masks = generator(5, 4, seed=0)
    assert masks.shape == (5, 4, 64) and (masks.sum(-1) == 24).all()
    patches = masks.view(5, 4, 4, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(5, 4, 16, 4)
    assert (patches.all(-1) == patches.any(-1)).all(), "every 2x2 patch is fully masked or fully visible"
    with pytest.raises(ValueError, match="num_masked .* multiple of patch_size"):
        BlockMaskGenerator(8, 22, min_block=8, patch_size=2)
    with pytest.raises(ValueError, match="patch_size must divide"):
        BlockMaskGenerator(8, 24, patch_size=3)
    with pytest.raises(ValueError, match="score_min_block .* multiple of predictor_config.patch_size"):
        tiny_config(predictor={"patch_size": 2}, train_num_masked=4, train_min_block=4, score_num_masked=8, score_min_block=6)
    with pytest.raises(ValueError, match="patch_size .* must divide grid_size"):
        tiny_config(predictor={"patch_size": 3})
    # unset mask sizes keep the paper's fractions of 576 cells in whole 4-cell patches: 64 * (130, 46, 230, 92) / 576
    # = 14.4, 5.1, 25.6, 10.2 cells = 3.6, 1.3, 6.4, 2.6 patches -> 4, 1, 6, 3 patches
    config = tiny_config(tokenizer={"grid_size": 8}, predictor={"patch_size": 2})
    assert [config.train_num_masked, config.train_min_block, config.score_num_masked, config.score_min_block] == [16, 4, 24, 12]


def test_patch_predictor_detector_scores_and_round_trips(tmp_path, pixel_values):
    from ladmim_hf import LadmimForAnomalyDetection

    torch.manual_seed(0)
    model = LadmimForAnomalyDetection(tiny_config(predictor={"patch_size": 2, "loss_type": "token_ce"},
                                                  train_num_masked=4, train_min_block=4, score_num_masked=8,
                                                  score_min_block=4)).eval()
    out = model(pixel_values, category="pushpins", num_masks=3, seed=[0, 1, 2])
    assert out.mask_scores.shape == (3, 3) and torch.isfinite(out.pred_score).all()
    assert (out.masks.view(3, 3, 2, 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(3, 3, 4, 4).float().mean(-1) % 1 == 0).all()
    model.save_pretrained(tmp_path)
    loaded = LadmimForAnomalyDetection.from_pretrained(tmp_path).eval()
    assert loaded.config.predictor_config.patch_size == 2
    again = loaded(pixel_values, category="pushpins", num_masks=3, seed=[0, 1, 2])
    torch.testing.assert_close(again.pred_score, out.pred_score)


def test_predictor_taps_select_their_channels_and_round_trip(tmp_path, pixel_values):
    """`predictor_taps` feeds the predictors only those taps' channels (Lite0 taps 2 and 4 have 24 and 40):
    the config sizes the predictor, scores match the slow reference on the hand-picked channels, and the
    choice survives save and load."""
    from ladmim_hf import LadmimConfig

    config = tiny_config(tokenizer={"backbone_taps": [2, 4, 10], "feature_channels": 176}, predictor_taps=[10, 2])
    assert config.predictor_taps == [2, 10] and config.predictor_config.input_channels == 24 + 112
    assert LadmimConfig.from_dict(config.to_dict()).predictor_config.input_channels == 136
    torch.manual_seed(0)
    model = LadmimForAnomalyDetection(config).eval()
    assert model.predictor_channel_ranges == [(0, 24), (64, 176)]
    channels = list(range(24)) + list(range(64, 176))
    out = model(pixel_values, category="pushpins", num_masks=2, seed=1)
    reference = slow_reference_scores(model, pixel_values, "pushpins", out.masks, channels=channels)
    torch.testing.assert_close(out.mask_scores.double(), reference, rtol=0, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = LadmimForAnomalyDetection.from_pretrained(tmp_path).eval()
    assert loaded.config.predictor_taps == [2, 10]
    torch.testing.assert_close(loaded(pixel_values, category="pushpins", num_masks=2, seed=1).pred_score, out.pred_score,
                               rtol=0, atol=0)
    for bad in ([14], [], [2, 2], "2"):
        with pytest.raises(ValueError, match=r"predictor_taps must be a non-empty list of distinct taps from "
                                             r"tokenizer_config.backbone_taps \[2, 4, 10\]"):
            tiny_config(tokenizer={"backbone_taps": [2, 4, 10], "feature_channels": 176}, predictor_taps=bad)


def test_predictor_config_object_must_follow_the_tokenizer():
    """Given as an object, the predictor config is checked against the tokenizer's shared fields (a dict is
    filled in from them)."""
    from ladmim_hf import LadmimConfig, LadmimPredictorConfig

    from conftest import tiny_predictor_kwargs, tiny_tokenizer_kwargs

    tokenizer = tiny_tokenizer_kwargs()
    matching = LadmimPredictorConfig(input_channels=64, grid_size=4, num_levels=2, codebook_size=16, **tiny_predictor_kwargs())
    assert LadmimConfig(tokenizer_config=tokenizer, predictor_config=matching).predictor_config.grid_size == 4
    other = LadmimPredictorConfig(input_channels=64, grid_size=8, num_levels=2, codebook_size=32, **tiny_predictor_kwargs())
    with pytest.raises(ValueError, match=r"must follow tokenizer_config, but has grid_size 8 \(tokenizer: 4\), "
                                         r"codebook_size 32 \(tokenizer: 16\)"):
        LadmimConfig(tokenizer_config=tokenizer, predictor_config=other)
