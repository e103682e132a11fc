"""Shared helpers of the benchmark scripts: configs, fast random init, interleaved timing, the literal
reference forward of the LAViT predictor, analytic FLOP counts and the output convention.

Output convention: every script prints a one-line human summary, then, as the **last line of stdout**,
one JSON object. All figures that compare two code paths are ratios measured inside one run, with the
two paths interleaved round by round and the median taken over rounds, so that a machine shared with
other jobs (load changing from second to second) biases neither side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

CATEGORY = "pushpins"


# --------------------------------------------------------------------------------------------------
# Output and environment
# --------------------------------------------------------------------------------------------------


def environment() -> dict:
    """What the numbers were measured on (recorded in every JSON line)."""
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        load = None
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
    }


def emit(summary: str, payload: dict) -> None:
    """Print the human summary, then the JSON object as the last stdout line."""
    payload = dict(payload)
    payload.setdefault("environment", environment())
    print(summary, flush=True)
    print(json.dumps(payload, sort_keys=False), flush=True)


def log(message: str) -> None:
    """Progress messages go to stderr so stdout stays summary + JSON."""
    print(message, file=sys.stderr, flush=True)


def base_parser(description: str, sizes: str | None = None) -> argparse.ArgumentParser:
    """`--tiny`, `--seed`, `--threads`; with `sizes` (the default model sizes) also `--config`."""
    parser = argparse.ArgumentParser(description=description)
    if sizes:
        parser.add_argument("--config", choices=["paper", "synthloco", "tiny"], default=None,
                            help=f"model sizes (default {sizes}; tiny with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny config, a few seconds (used by the tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    return parser


def apply_threads(args) -> None:
    """`--threads N`, or 1 thread in `--tiny` mode: tiny ops are dominated by OpenMP barriers, which
    cost a scheduler time slice each when the machine is oversubscribed."""
    threads = getattr(args, "threads", None) or (1 if getattr(args, "tiny", False) else None)
    if threads:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# Configs and models
# --------------------------------------------------------------------------------------------------


def paper_config(categories=(CATEGORY,)):
    """The paper's sizes (configs/loco-paper.yaml): EfficientNet-B4 taps -> 384 x 24 x 24 features from
    224 px, HVQ-Trans width 256 with 4 + 4 layers and 4 levels of 512 codes, LAViT 512 x 4, 8 heads."""
    from ladmim_hf import LadmimConfig

    return LadmimConfig(
        tokenizer_config=dict(backbone="efficientnet_b4", image_size=224, grid_size=24, categories=list(categories),
                              hidden_size=256, num_encoder_layers=4, num_decoder_layers=4, num_attention_heads=8,
                              intermediate_size=1024, num_levels=4, codebook_size=512),
        predictor_config=dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, mlp_ratio=4.0),
    )


def synthloco_config(categories=(CATEGORY,)):
    """The model section of configs/synthloco-cpu.yaml, read from the file (sizes, losses and scoring as the demo trains)."""
    import yaml

    from ladmim_hf import LadmimConfig

    raw = yaml.safe_load((ROOT / "configs" / "synthloco-cpu.yaml").read_text())["model"]
    tokenizer = dict(raw["tokenizer_config"], categories=list(categories))
    rest = {k: v for k, v in raw.items() if k not in ("tokenizer_config", "predictor_config")}
    return LadmimConfig(tokenizer_config=tokenizer, predictor_config=dict(raw["predictor_config"]), **rest)


def tiny_config(categories=(CATEGORY,)):
    """The unit-test sizes (tests/conftest.py): 64 px, 4 x 4 grid, width 32, 16 codes."""
    from ladmim_hf import LadmimConfig

    return LadmimConfig(
        tokenizer_config=dict(backbone="efficientnet_lite0", backbone_taps=[2, 4], feature_channels=64, image_size=64,
                              grid_size=4, categories=list(categories), hidden_size=32, num_encoder_layers=2,
                              num_decoder_layers=2, num_attention_heads=4, intermediate_size=64, num_levels=2,
                              codebook_size=16, score_filter_size=8),
        predictor_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0),
    )


CONFIGS = {"paper": paper_config, "synthloco": synthloco_config, "tiny": tiny_config}


def _fast_trunc_normal(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
    """Truncated normal by the inverse CDF (the pre-2.x torch / timm algorithm): the same
    distribution as `torch.nn.init.trunc_normal_`, in one pass instead of a rejection loop."""
    with torch.no_grad():
        def cdf(x: float) -> float:
            return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

        low, high = cdf((a - mean) / std), cdf((b - mean) / std)
        tensor.uniform_(2 * low - 1, 2 * high - 1, generator=generator)
        tensor.erfinv_().mul_(std * math.sqrt(2.0)).add_(mean).clamp_(min=a, max=b)
    return tensor


@contextlib.contextmanager
def fast_random_init():
    """Build fresh models quickly.

    torch 2.13's `trunc_normal_` with the official +-1 std truncation (acceptance 68 %) resamples the
    whole tensor until no value is out of range: 10-15 full passes per weight, 30-100 s for the paper
    model on 2 cores. The weights are random either way, so the benchmarks draw them with the
    inverse-CDF sampler (same distribution). Only model construction is affected, never the timings.
    """
    import transformers.initialization as hf_init

    saved_torch = torch.nn.init.trunc_normal_
    saved_hf = hf_init.TORCH_INIT_FUNCTIONS.get("trunc_normal_")
    torch.nn.init.trunc_normal_ = _fast_trunc_normal
    hf_init.TORCH_INIT_FUNCTIONS["trunc_normal_"] = _fast_trunc_normal
    try:
        yield
    finally:
        torch.nn.init.trunc_normal_ = saved_torch
        if saved_hf is not None:
            hf_init.TORCH_INIT_FUNCTIONS["trunc_normal_"] = saved_hf


def build_detector(config, seed: int = 0):
    """`LadmimForAnomalyDetection` with random weights (eval mode)."""
    from ladmim_hf import LadmimForAnomalyDetection

    torch.manual_seed(seed)
    with fast_random_init():
        model = LadmimForAnomalyDetection(config)
    return model.eval()


def build_predictor(config, seed: int = 0):
    """`LadmimPredictorModel` with random weights."""
    from ladmim_hf import LadmimPredictorModel

    torch.manual_seed(seed)
    with fast_random_init():
        return LadmimPredictorModel(config)


def random_images(num: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num, 3, size, size, generator=generator)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed_cpu(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall-clock seconds, process CPU seconds (all threads) and the result of `fn()`.

    On a machine shared with other jobs the wall clock also counts the time our threads wait for a
    core; with one torch thread the CPU time counts only our own work, so CPU-time ratios measured
    with `--threads 1` do not depend on the load."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def median(values) -> float:
    values = [v for v in values if v is not None]
    return float(statistics.median(values)) if values else float("nan")


def ratios(slow, fast) -> list[float]:
    """Round-by-round ratios slow / fast of two code paths timed in the same rounds."""
    return [s / f for s, f in zip(slow, fast)]


def cost_parser(description: str) -> argparse.ArgumentParser:
    """`base_parser` plus the options of the scoring-cost scripts (`branch_cost.py`, `pose_cost.py`)."""
    parser = base_parser(description)
    parser.add_argument("--images", type=int, default=8, help="images per timed forward")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train_images", type=int, default=150, help="random training images the branches are fitted on")
    return parser


def cost_ratio(with_it: Callable[[], object], without_it: Callable[[], object], rounds: int, images: int) -> dict:
    """The cost of a scoring option: `with_it` and `without_it` (each scores `images` images) timed
    alternately in `rounds` rounds after one warm-up call each. `ratio` / `ratio_wall`: the median over
    rounds of with / without CPU time / wall clock; `cpu_s_per_image_with` / `_without`: the medians."""
    with_it(), without_it()  # warm-up: first calls allocate
    cpu_ratios, wall_ratios, per_image = [], [], {"with": [], "without": []}
    for round_index in range(rounds):
        wall_with, cpu_with, _ = timed_cpu(with_it)
        wall_without, cpu_without, _ = timed_cpu(without_it)
        cpu_ratios.append(cpu_with / cpu_without)
        wall_ratios.append(wall_with / wall_without)
        per_image["with"].append(cpu_with / images)
        per_image["without"].append(cpu_without / images)
        log(f"round {round_index + 1}: {cpu_ratios[-1]:.3f}")
    return {"ratio": round(median(cpu_ratios), 4), "ratio_wall": round(median(wall_ratios), 4),
            "cpu_s_per_image_with": round(median(per_image["with"]), 5),
            "cpu_s_per_image_without": round(median(per_image["without"]), 5)}


def comparison(benchmark: str, config: str, wall_ratios, cpu_ratios, digits: int = 3, **fields) -> dict:
    """The JSON object of a comparison of two code paths: `benchmark`, `config`, then `speedup` (median of
    the per-round wall-clock ratios), `speedup_cpu_time` (median CPU-time ratio) and `round_speedups`
    (each round's wall-clock ratio), rounded to `digits`, then the script's own `fields`."""
    return {"benchmark": benchmark, "config": config, "speedup": round(median(wall_ratios), digits),
            "speedup_cpu_time": round(median(cpu_ratios), digits),
            "round_speedups": [round(x, digits) for x in wall_ratios], **fields}


def matmul_gflops(size: int = 2048, repeats: int = 3) -> float:
    """FLOP/s (in GFLOP/s) of a `size x size` float32 `torch.matmul`, best of `repeats` calls."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.matmul(a, b)  # warm-up
    best = min(timed(lambda: torch.matmul(a, b))[0] for _ in range(repeats))
    return 2.0 * size**3 / best / 1e9


# --------------------------------------------------------------------------------------------------
# The literal reference (official LAViT / BEiT code) on the same weights
# --------------------------------------------------------------------------------------------------


def reference_attention(attn, x: torch.Tensor, training: bool = False) -> torch.Tensor:
    """BEiT's `Attention.forward`, literally: qkv bias = cat(q_bias, zeros, v_bias), q scaled,
    explicit `softmax(q k^T / sqrt(d)) v`, attention dropout on the probabilities."""
    batch, length, dim = x.shape
    heads = attn.num_heads
    head_dim = dim // heads
    scale = head_dim**-0.5
    qkv_bias = None
    if attn.q_bias is not None:
        qkv_bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias, requires_grad=False), attn.v_bias))
    qkv = F.linear(input=x, weight=attn.qkv.weight, bias=qkv_bias)
    qkv = qkv.reshape(batch, length, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q = q * scale
    weights = q @ k.transpose(-2, -1)
    weights = weights.softmax(dim=-1)
    weights = F.dropout(weights, p=attn.attention_dropout, training=training)
    out = (weights @ v).transpose(1, 2).reshape(batch, length, -1)
    return attn.proj_dropout(attn.proj(out))


def reference_predictor_logits(predictor, features: torch.Tensor, masks: torch.Tensor, training: bool = False) -> torch.Tensor:
    """The official `VisionTransformerMIM.forward` on the same weights: 1x1-conv patch embedding,
    `x * (1 - w) + mask_token * w`, [cls, hist, patches] + positions, pre-norm blocks with LayerScale
    and explicit attention, final norm, head on the hist token.

    Args:
        features: `(B, C, g, g)`; masks: `(B, N)` bool. Returns logits `(B, L, K)`.
    """
    cfg = predictor.config
    emb = predictor.embeddings
    weight = emb.patch_embeddings.weight[:, :, None, None]
    x = F.conv2d(features, weight, emb.patch_embeddings.bias).flatten(2).transpose(1, 2)
    batch, cells, _ = x.shape
    mask_tokens = emb.mask_token.expand(batch, cells, -1)
    w = masks.unsqueeze(-1).type_as(mask_tokens)
    x = x * (1 - w) + mask_tokens * w
    x = torch.cat((emb.cls_token.expand(batch, -1, -1), emb.hist_token.expand(batch, -1, -1), x), dim=1)
    x = x + emb.position_embeddings
    for layer in predictor.layers:
        attn = reference_attention(layer.attn, layer.norm1(x), training)
        x = x + (attn if layer.gamma_1 is None else layer.gamma_1 * attn)
        mlp = layer.dropout(layer.fc2(layer.act(layer.fc1(layer.norm2(x)))))
        x = x + (mlp if layer.gamma_2 is None else layer.gamma_2 * mlp)
    x = predictor.norm(x)
    return predictor.head(x[:, 1]).view(batch, cfg.num_levels, cfg.codebook_size)


def reference_mask_score(probs: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor) -> float:
    """L1 distance summed over levels between float64 predicted distributions `(L, K)` and the float64
    histogram of `codes (L, N)` under `mask (N,)`, counted cell by cell (tests/test_modeling.py)."""
    levels, size = probs.shape
    masked = torch.nonzero(mask).flatten().tolist()
    total = 0.0
    for level in range(levels):
        hist = torch.zeros(size, dtype=torch.float64)
        for cell in masked:
            hist[codes[level, cell]] += 1.0 / len(masked)
        total += (probs[level] - hist).abs().sum().item()
    return total


@torch.no_grad()
def reference_score_one_mask(model, image: torch.Tensor, mask: torch.Tensor, category: str = CATEGORY) -> float:
    """One (image, mask) pair the official way: tokenizer on this image (batch 1), predictor with batch 1
    and explicit attention, float64 softmax and histograms."""
    predictor = model.predictor_for(category)
    tokens = model.tokenizer.tokenize(image[None], category)
    logits = reference_predictor_logits(predictor, model.predictor_inputs(tokens["features"]), mask[None])[0].double()
    return reference_mask_score(logits.softmax(-1), tokens["codes"][0], mask)


# --------------------------------------------------------------------------------------------------
# Analytic FLOPs of the predictor
# --------------------------------------------------------------------------------------------------


def predictor_flops(cfg, sequences: int, images: int | None = None, hist_only: bool = True) -> dict:
    """Multiply-add FLOPs (2 per MAC) of one predictor forward over `sequences` sequences of 2 + T
    tokens (T = N cells, or N / patch_size**2 patches), as `LadmimPredictorModel.forward` runs it. The patch embedding runs once per image
    (`images`, default one per sequence); the head runs on the hist token only. With `hist_only`
    (scoring, and training with the l1 / kl losses) the last block runs for the hist token alone
    (`LadmimPredictorLayer.forward(..., query_index=1)`): keys and values of all tokens, but one query, one
    attention row and the projection and MLP of one token; `hist_only=False` counts the full last
    block (`output_hidden_states`, `token_ce`)."""
    n = cfg.num_tokens
    t = n + 2
    d = cfg.hidden_size
    hidden = cfg.intermediate_size
    images = sequences if images is None else images

    def block(queries: int) -> dict:
        """One block where `queries` of the t tokens get an output (keys and values for all t)."""
        return {
            "qkv": 2 * queries * d * d + 2 * t * d * 2 * d,
            "attention_qk": 2 * queries * t * d,
            "attention_av": 2 * queries * t * d,
            "proj": 2 * queries * d * d,
            "fc1": 2 * queries * d * hidden,
            "fc2": 2 * queries * hidden * d,
        }

    full, last = block(t), block(1 if hist_only else t)
    layers = cfg.num_hidden_layers
    parts = {name: (full[name] * (layers - 1) + last[name]) * sequences for name in full}
    parts["patch_embed"] = 2 * n * cfg.input_channels * cfg.patch_size**2 * d * images
    parts["head"] = 2 * d * cfg.num_levels * cfg.codebook_size * sequences
    parts["total"] = sum(parts.values())
    return parts
