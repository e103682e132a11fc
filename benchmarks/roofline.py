"""Achieved FLOP/s of the LAViT predictor during scoring, relative to a large float32 matmul.

FLOPs are counted analytically (`_common.predictor_flops`, 2 per multiply-add) for B x M sequences
of 2 + N tokens: patch embedding (once per image), qkv, attention q k^T and a v, proj, fc1, fc2 and
the head on the hist token, with the last block counted for the hist token only (keys and values of
all tokens, one query), as the model runs it when only the hist logits are needed; layer norms, GELU, softmax and adds are not counted (they are memory
bound and are part of what the efficiency measures). The predictor runs exactly as
`LadmimForAnomalyDetection.logical_scores` runs it: one forward over all masks of all images, in
inference mode.

Each round: a matmul window (a 2048 x 2048 float32 `torch.matmul` repeated for at least
`--matmul_seconds`), one predictor forward, a second matmul window. The round's efficiency is
(predictor FLOP/s) / (FLOP/s over both matmul windows), so both see the same machine load;
`efficiency` is the median over rounds.

    python benchmarks/roofline.py            # paper size, 2 images x 10 masks
    python benchmarks/roofline.py --profile  # also the time share of each op class (torch profiler)
    python benchmarks/roofline.py --chunk 4 8 --explicit_attention --rounds 8   # A/B of alternatives
    python benchmarks/roofline.py --tiny

Last stdout line: JSON with predictor_gflops, matmul_gflops, efficiency, flops, ...
"""

from __future__ import annotations

import time

import torch

import _common as C


def matmul_window(a: torch.Tensor, b: torch.Tensor, min_seconds: float) -> tuple[float, float]:
    """Repeat `a @ b` for at least `min_seconds` (and twice at least); returns (flops, seconds)."""
    flops_each = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    count, start = 0, time.perf_counter()
    while count < 2 or time.perf_counter() - start < min_seconds:
        torch.matmul(a, b)
        count += 1
    return flops_each * count, time.perf_counter() - start


def profile_breakdown(predictor, features, masks) -> dict:
    """Share of the predictor's self CPU time per op (top ops), from one profiled forward."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        predictor(features, masks)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return {e.key: round(e.self_cpu_time_total / total, 4) for e in events[:10]}


def variant_calls(predictor, features, masks, args) -> dict:
    """Alternative forwards timed against the current one (all return the hist logits)."""
    from ladmim_hf.models.modeling_ladmim_predictor import LadmimPredictorAttention

    calls = {}

    def call(chunk=None, explicit=False):
        def run():
            saved = LadmimPredictorAttention.forward

            def explicit_forward(self, x, query_index=None):
                if query_index is not None:  # the hist-token-only last block keeps its own path
                    return saved(self, x, query_index)
                return C.reference_attention(self, x, False)

            if explicit:
                LadmimPredictorAttention.forward = explicit_forward
            try:
                return predictor(features, masks, max_sequences_per_chunk=chunk).logits
            finally:
                LadmimPredictorAttention.forward = saved
        return run

    for size in args.chunk:
        calls[f"chunk{size}"] = call(chunk=size)
    if args.explicit_attention:
        calls["explicit_attention"] = call(explicit=True)
    return calls


def main(argv=None) -> None:
    parser = C.base_parser(__doc__.split("\n\n")[0], sizes="paper")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--num_masks", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (2 with --tiny)")
    parser.add_argument("--matmul_size", type=int, default=None, help="default 2048 (512 with --tiny)")
    parser.add_argument("--matmul_seconds", type=float, default=None,
                        help="length of each matmul window (default 2 s; 0.2 s with --tiny)")
    parser.add_argument("--profile", action="store_true", help="also report the time share of each op")
    parser.add_argument("--chunk", type=int, nargs="*", default=[],
                        help="also time max_sequences_per_chunk=N (one variant per N)")
    parser.add_argument("--explicit_attention", action="store_true",
                        help="also time the current forward with explicit softmax attention instead of SDPA "
                             "(all blocks but the hist-token-only last one)")
    args = parser.parse_args(argv)
    C.apply_threads(args)
    config_name = args.config or ("tiny" if args.tiny else "paper")
    args.rounds = args.rounds or (2 if args.tiny else 3)
    args.matmul_size = args.matmul_size or (512 if args.tiny else 2048)
    window = args.matmul_seconds if args.matmul_seconds is not None else (0.2 if args.tiny else 2.0)
    detector_config = C.CONFIGS[config_name]()
    cfg = detector_config.predictor_config
    predictor = C.build_predictor(cfg, seed=args.seed).eval()

    from ladmim_hf.models.masking import BlockMaskGenerator

    generator = torch.Generator().manual_seed(args.seed)
    features = torch.randn(args.images, cfg.input_channels, cfg.grid_size, cfg.grid_size, generator=generator)
    masks = BlockMaskGenerator(cfg.grid_size, detector_config.score_num_masked, detector_config.score_min_block,
                               detector_config.min_aspect, patch_size=cfg.patch_size)(args.images, args.num_masks, seed=args.seed)
    sequences = args.images * args.num_masks
    flops = C.predictor_flops(cfg, sequences, images=args.images)
    a = torch.randn(args.matmul_size, args.matmul_size, generator=generator)
    b = torch.randn(args.matmul_size, args.matmul_size, generator=generator)

    variants = variant_calls(predictor, features, masks, args)
    with torch.inference_mode():
        reference = predictor(features, masks).logits  # warm-up
        diffs = {name: float((fn() - reference).abs().max()) for name, fn in variants.items()}  # warm-up too
        matmul_window(a, b, 0.0)
        efficiencies, predictor_rates, matmul_rates = [], [], []
        variant_ratios = {name: [] for name in variants}
        for r in range(args.rounds):
            f1, s1 = matmul_window(a, b, window)
            order = list(variants) if r % 2 else []
            for name in order:  # odd rounds: variants before the current forward (ABBA against drift)
                variant_ratios[name].append(C.timed(variants[name])[0])
            seconds, _ = C.timed(lambda: predictor(features, masks))
            for name in ([] if r % 2 else list(variants)):
                variant_ratios[name].append(C.timed(variants[name])[0])
            for name in variants:
                variant_ratios[name][-1] = seconds / variant_ratios[name][-1]
            f2, s2 = matmul_window(a, b, window)
            matmul_rate = (f1 + f2) / (s1 + s2)
            rate = flops["total"] / seconds
            efficiencies.append(rate / matmul_rate)
            predictor_rates.append(rate)
            matmul_rates.append(matmul_rate)
            C.log(f"[roofline] round {r + 1}/{args.rounds}: predictor {rate / 1e9:.1f} GFLOP/s, "
                  f"matmul {matmul_rate / 1e9:.1f} GFLOP/s, efficiency {rate / matmul_rate:.2f}")
    efficiency = C.median(efficiencies)
    total = flops["total"]
    result = {
        "benchmark": "roofline",
        "config": config_name,
        "sequences": sequences,
        "tokens_per_sequence": cfg.num_tokens + 2,
        "predictor_gflop": round(total / 1e9, 2),
        "predictor_gflops": round(C.median(predictor_rates) / 1e9, 2),
        "matmul_gflops": round(C.median(matmul_rates) / 1e9, 2),
        "matmul_size": args.matmul_size,
        "efficiency": round(efficiency, 3),
        "round_efficiencies": [round(e, 3) for e in efficiencies],
        "flop_shares": {k: round(v / total, 4) for k, v in flops.items() if k != "total"},
    }
    if variants:
        result["variants"] = {
            name: {"speedup_vs_current": round(C.median(ratios), 3), "round_speedups": [round(x, 3) for x in ratios],
                   "max_abs_logit_diff": float(f"{diffs[name]:.3g}")}
            for name, ratios in variant_ratios.items()
        }
    if args.profile:
        result["time_shares"] = profile_breakdown(predictor, features, masks)
    C.emit(f"roofline ({config_name}, {sequences} sequences x {cfg.num_tokens + 2} tokens): predictor "
           f"{result['predictor_gflops']:.1f} GFLOP/s vs {args.matmul_size}^2 matmul {result['matmul_gflops']:.1f} "
           f"GFLOP/s, efficiency {efficiency:.2f}", result)


if __name__ == "__main__":
    main()
