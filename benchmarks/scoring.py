"""Scoring throughput of `LadmimForAnomalyDetection` against the official algorithm run literally.

Fast path: `model(pixel_values, category, num_masks=M, seed=...)` on a batch of images (tokenizer once
per image, all masks of all images in one predictor forward, SDPA attention, vectorised histograms).

Reference (`_common.reference_score_one_mask`): for every (image, mask) pair, the tokenizer is rerun on
that image with batch 1, the predictor runs with batch 1 and explicit `softmax(q k^T / sqrt(d)) v`
attention (the official BEiT attention on the same weights), then float64 softmax and a float64
histogram counted cell by cell.

Timing: `--rounds` rounds; each round times one fast forward over `--fast_images` images and then
the next share of the reference's (image, mask) pairs (the reference covers the first `--ref_images`
images with all M masks, spread over the rounds). The reference cost per image is extrapolated as
M x (its median time per mask), which is exact for an algorithm that processes each mask
independently. `speedup` = median over rounds of (reference s/image) / (fast s/image).
`max_abs_score_diff` compares the reference's per-mask scores with the fast path's `mask_scores` for
the same masks (and the per-image logical scores, their means).

    python benchmarks/scoring.py                 # paper size, 10 masks
    python benchmarks/scoring.py --bf16 --compile  # also bf16 autocast and torch.compile variants
    python benchmarks/scoring.py --memory        # peak RSS vs batch size and number of images
    python benchmarks/scoring.py --tiny          # seconds, for the tests

The last stdout line is a JSON object (keys: images_per_s, reference_images_per_s, speedup,
max_abs_score_diff, ...; with --memory: peak_rss_mb, grows_with_batch, grows_with_images, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config, a few seconds (used by the tests)")
    parser.add_argument("--config", choices=["paper", "synthloco", "tiny"], default=None,
                        help="model sizes (default: paper; synthloco for --memory; tiny with --tiny)")
    parser.add_argument("--num_masks", type=int, default=10)
    parser.add_argument("--fast_images", type=int, default=None, help="images per fast forward (default 4)")
    parser.add_argument("--ref_images", type=int, default=1, help="images the reference scores with all masks")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3)")
    parser.add_argument("--bf16", action="store_true", help="also time the fast path under CPU bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also time the fast path with torch.compile'd predictor")
    parser.add_argument("--proposed", action="store_true",
                        help="also time the predictor change proposed in benchmarks/README.md (hist-token-only last block)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; 1 with --tiny)")
    memory = parser.add_argument_group("memory mode")
    memory.add_argument("--memory", action="store_true", help="peak RSS of scoring, one fresh subprocess per setting")
    memory.add_argument("--memory_settings", default=None,
                        help="comma-separated BATCHxIMAGES (default 1x100,4x100,16x100,16x20)")
    memory.add_argument("--keep_maps", action="store_true",
                        help="add a control run that keeps every output map (as evaluation.evaluate does)")
    memory.add_argument("--jobs", type=int, default=2, help="memory subprocesses run at once (RSS is per process)")
    memory.add_argument("--memory_child", action="store_true", help=argparse.SUPPRESS)
    memory.add_argument("--batch_size", type=int, default=4, help=argparse.SUPPRESS)
    memory.add_argument("--num_images", type=int, default=100, help=argparse.SUPPRESS)
    return parser


# --------------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------------


def run_throughput(args) -> None:
    import torch

    import _common as C

    C.apply_threads(args)
    config_name = args.config or ("tiny" if args.tiny else "paper")
    fast_images = args.fast_images or (2 if args.tiny else 4)
    rounds = args.rounds or (2 if args.tiny else 3)
    ref_images = min(args.ref_images, fast_images)
    num_masks = args.num_masks
    build_start = time.perf_counter()
    model = C.build_detector(C.CONFIGS[config_name](), seed=args.seed)
    C.log(f"[scoring] built {config_name} model in {time.perf_counter() - build_start:.1f} s")
    size = model.config.tokenizer_config.image_size
    images = C.random_images(fast_images, size, args.seed)
    seeds = [args.seed * 1000 + i for i in range(fast_images)]

    def fast():
        return model(images, category=C.CATEGORY, num_masks=num_masks, seed=seeds)

    variants = {"fp32": fast}
    compile_info = None
    if args.proposed:
        def fast_proposed():
            with C.proposed_patch():
                return model(images, category=C.CATEGORY, num_masks=num_masks, seed=seeds)
        variants["proposed"] = fast_proposed
    if args.bf16:
        def fast_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(images, category=C.CATEGORY, num_masks=num_masks, seed=seeds)
        variants["bf16"] = fast_bf16
    if args.compile:
        compile_info = {"ok": False}
        import copy

        compiled_model = copy.deepcopy(model)
        predictor = compiled_model.predictor_for(C.CATEGORY)
        try:
            predictor.compile(dynamic=False)
            start = time.perf_counter()
            compiled_model(images, category=C.CATEGORY, num_masks=num_masks, seed=seeds)  # compiles
            compile_info.update(ok=True, compile_seconds=round(time.perf_counter() - start, 1))

            def fast_compiled():
                return compiled_model(images, category=C.CATEGORY, num_masks=num_masks, seed=seeds)
            variants["compile"] = fast_compiled
        except Exception as error:  # noqa: BLE001 - report any compile failure instead of crashing
            compile_info["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            C.log(f"[scoring] torch.compile failed: {compile_info['error']}")

    # Warm-up (allocator, oneDNN primitive caches) on both paths.
    reference_out = fast()
    masks = reference_out.masks
    C.reference_score_one_mask(model, images[0], masks[0, 0])

    pairs = [(b, m) for b in range(ref_images) for m in range(num_masks)]
    per_round = -(-len(pairs) // rounds)
    fast_times = {name: [] for name in variants}
    outputs = {}
    ref_times, ref_scores = [], {}
    round_speedups = []
    for r in range(rounds):
        for name, fn in variants.items():
            seconds, out = C.timed(fn)
            fast_times[name].append(seconds / fast_images)
            outputs[name] = out
        chunk = pairs[r * per_round:(r + 1) * per_round]
        times = []
        for b, m in chunk:
            seconds, score = C.timed(lambda: C.reference_score_one_mask(model, images[b], masks[b, m]))
            times.append(seconds)
            ref_scores[(b, m)] = score
        ref_times.extend(times)
        if times:
            round_speedups.append(C.median(times) * num_masks / fast_times["fp32"][-1])
        C.log(f"[scoring] round {r + 1}/{rounds}: fast {fast_times['fp32'][-1]:.3f} s/image, "
              f"reference {C.median(times) * num_masks:.3f} s/image ({len(times)} masks)")

    def score_diffs(out):
        mask_diff = max(abs(ref_scores[(b, m)] - float(out.mask_scores[b, m])) for b, m in ref_scores)
        image_diff = max(
            abs(sum(ref_scores[(b, m)] for m in range(num_masks)) / num_masks - float(out.logical_score[b]))
            for b in range(ref_images)
        )
        return mask_diff, image_diff

    fast_s = C.median(fast_times["fp32"])
    ref_s = C.median(ref_times) * num_masks
    mask_diff, image_diff = score_diffs(outputs["fp32"])
    speedup = C.median(round_speedups)
    result = {
        "benchmark": "scoring",
        "config": config_name,
        "num_masks": num_masks,
        "images_per_s": round(1.0 / fast_s, 4),
        "reference_images_per_s": round(1.0 / ref_s, 4),
        "speedup": round(speedup, 2),
        "speedup_pooled": round(ref_s / fast_s, 2),
        "round_speedups": [round(s, 2) for s in round_speedups],
        "max_abs_score_diff": float(f"{max(mask_diff, image_diff):.3g}"),
        "max_abs_logical_score_diff": float(f"{image_diff:.3g}"),
        "fast_images": fast_images,
        "reference_images": ref_images,
        "reference_masks_timed": len(ref_times),
        "rounds": rounds,
        "reference_extrapolation": "reference s/image = num_masks x median s/mask (each mask is independent)",
    }
    summary_extra = ""
    for name in ("proposed", "bf16", "compile"):
        if name not in variants:
            continue
        variant_s = C.median(fast_times[name])
        ratios = [f / v for f, v in zip(fast_times["fp32"], fast_times[name])]
        v_mask_diff, v_image_diff = score_diffs(outputs[name])
        ratio = C.median(ratios)
        result[name] = {
            "images_per_s": round(1.0 / variant_s, 4),
            "speedup_vs_fp32": round(ratio, 3),
            "max_abs_score_diff": float(f"{max(v_mask_diff, v_image_diff):.3g}"),
            "wins": bool(ratio > 1.0),
        }
        summary_extra += f", {name} x{ratio:.2f} vs fp32"
    if compile_info is not None:
        result["compile"] = {**compile_info, **result.get("compile", {})}
        if not compile_info["ok"]:
            result["compile"]["wins"] = False
            summary_extra += ", compile failed"
    C.emit(
        f"scoring ({config_name}, {num_masks} masks): fast {1 / fast_s:.3f} images/s, reference "
        f"{1 / ref_s:.4f} images/s, speedup x{speedup:.1f}, max |score diff| {max(mask_diff, image_diff):.2g}"
        + summary_extra,
        result,
    )


# --------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------


def run_memory_child(args) -> None:
    """One setting in a fresh process: score `num_images` images in batches and keep only the scores
    (or, with `--keep_maps`, also every output map, as `ladmim_hf.evaluation.evaluate` does).

    Records the peak RSS (`ru_maxrss`) and, after every batch, the retained RSS: the resident set
    after `gc.collect()` and `malloc_trim(0)` (free heap pages handed back), minus the same before
    the first batch. Retained memory that rises with the images scored is what a leak looks like;
    the peak alone cannot show it, because kept data first fills heap pages the batch temporaries
    left free."""
    import ctypes
    import gc
    import resource

    import _common as C

    C.apply_threads(args)
    config_name = args.config or ("tiny" if args.tiny else "synthloco")
    model = C.build_detector(C.CONFIGS[config_name](), seed=args.seed)
    size = model.config.tokenizer_config.image_size
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except OSError:  # pragma: no cover - not glibc
        trim = None
    page = os.sysconf("SC_PAGE_SIZE")

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

    def current_mb() -> float:
        gc.collect()
        if trim is not None:
            trim(0)
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * page / 2**20

    before_peak = peak_mb()
    baseline = current_mb()
    scores, kept = [], []
    retained = {}
    done = 0
    while done < args.num_images:
        count = min(args.batch_size, args.num_images - done)
        images = C.random_images(count, size, args.seed * 100_003 + done)  # decoded per batch, like a loader
        out = model(images, category=C.CATEGORY, num_masks=args.num_masks,
                    seed=[args.seed * 1_000_003 + done + i for i in range(count)])
        scores.extend(out.pred_score.tolist())
        if args.keep_maps:
            kept.append({k: getattr(out, k).clone() for k in ("anomaly_map", "logical_map", "structural_map")})
        del out, images
        done += count
        retained[done] = round(current_mb() - baseline, 1)
    print(json.dumps({"peak_rss_mb": round(peak_mb(), 1), "model_rss_mb": round(before_peak, 1),
                      "batch_size": args.batch_size, "num_images": len(scores),
                      "retained_mb_after_images": retained}), flush=True)


def _setting_name(batch: int, count: int, keep: bool) -> str:
    return f"batch{batch}_images{count}" + ("_keep_maps" if keep else "")


def run_memory(args) -> None:
    """Spawn one fresh interpreter per setting and compare their `ru_maxrss`.

    Criteria (allocator high-water marks move in steps of tens of MB between runs, so the peaks of
    two processes are compared for information only):
    * grows_with_batch: peak RSS rises with the batch size at the largest image count, by more than
      max(16 MB, 5 %) from the smallest to the largest batch, never falling by more than 8 MB.
    * grows_with_images: in a run over the largest image count, the retained RSS (after gc and
      malloc_trim, see run_memory_child) rises by more than 16 MB from the first fifth of the images
      to the end. Keeping the three 224 px maps of every image (0.6 MB) adds 48 MB over 80 images;
      `--keep_maps` runs that control.
    """
    from concurrent.futures import ThreadPoolExecutor

    config_name = args.config or ("tiny" if args.tiny else "synthloco")
    default = "1x12,4x12,4x4" if args.tiny else "1x100,4x100,16x100,16x20"
    settings = [tuple(int(v) for v in item.lower().split("x")) for item in (args.memory_settings or default).split(",")]
    runs = [(b, n, False) for b, n in settings]
    if args.keep_maps:  # the control: a loop that keeps every output map must be flagged as growing
        largest = max(b for b, _ in settings)
        runs += [(largest, n, True) for n in sorted({n for b, n in settings if b == largest})]
    num_masks = args.num_masks

    def measure(run):
        batch, count, keep = run
        command = [sys.executable, str(Path(__file__).resolve()), "--memory_child", "--config", config_name,
                   "--batch_size", str(batch), "--num_images", str(count), "--num_masks", str(num_masks),
                   "--seed", str(args.seed)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        if keep:
            command.append("--keep_maps")
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=str(HERE))
        if done.returncode != 0:
            raise RuntimeError(f"memory child {run} failed:\n{done.stderr[-3000:]}")
        out = json.loads(done.stdout.strip().splitlines()[-1])
        out["seconds"] = round(time.perf_counter() - start, 1)
        return run, out

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = dict(pool.map(measure, runs))

    def analyse(keep: bool) -> dict:
        mine = {(b, n): results[(b, n, k)] for b, n, k in runs if k == keep}
        most = max(n for _, n in mine)
        batches = sorted(b for b, n in mine if n == most)
        series = [(b, mine[(b, most)]["peak_rss_mb"]) for b in batches]
        retained_growth = {}
        for (b, n), out in mine.items():
            if n != most:
                continue
            trajectory = {int(k): v for k, v in out["retained_mb_after_images"].items()}
            early = min(trajectory, key=lambda k: abs(k - n / 5))
            retained_growth[f"{_setting_name(b, n, keep)}_from_{early}"] = round(trajectory[n] - trajectory[early], 1)
        peak_deltas = {}
        for b in sorted({b for b, _ in mine}):
            counts = sorted(n for bb, n in mine if bb == b)
            if len(counts) >= 2:
                lo, hi = counts[0], counts[-1]
                peak_deltas[f"batch{b}_images{lo}->{hi}"] = round(mine[(b, hi)]["peak_rss_mb"] - mine[(b, lo)]["peak_rss_mb"], 1)
        growth = series[-1][1] - series[0][1] if len(series) >= 2 else 0.0
        monotone = all(x[1] <= y[1] + 8.0 for x, y in zip(series, series[1:]))
        return {
            "peak_rss_mb": {_setting_name(b, n, keep): mine[(b, n)]["peak_rss_mb"] for b, n in mine},
            "scoring_working_mb": {_setting_name(b, n, keep): round(mine[(b, n)]["peak_rss_mb"] - mine[(b, n)]["model_rss_mb"], 1)
                                   for b, n in mine},
            "peak_delta_images_mb": peak_deltas,
            "retained_mb": {_setting_name(b, n, keep): list(out["retained_mb_after_images"].values())[-1]
                            for (b, n), out in mine.items()},
            "retained_growth_mb": retained_growth,
            "mb_per_image_in_batch": round(growth / (series[-1][0] - series[0][0]), 2) if len(series) >= 2 else None,
            "grows_with_batch": bool(len(series) >= 2 and monotone and growth > max(16.0, 0.05 * series[0][1])),
            "grows_with_images": bool(any(v > 16.0 for v in retained_growth.values())),
        }

    payload = {"benchmark": "scoring_memory", "config": config_name, "num_masks": num_masks, **analyse(False)}
    if args.keep_maps:
        payload["control_keep_maps"] = analyse(True)
    payload["method"] = ("peak: resource.getrusage(RUSAGE_SELF).ru_maxrss of a fresh interpreter per setting; images are "
                         "generated per batch and only scores are kept; retained: RSS after gc + malloc_trim; "
                         "criteria in run_memory's docstring")
    import _common as C  # only for emit/environment, after the children ran

    series = ", ".join(f"{k} {v:.0f} MB" for k, v in payload["peak_rss_mb"].items())
    summary = (f"scoring memory ({config_name}, {num_masks} masks): {series}; grows with batch: "
               f"{payload['grows_with_batch']}, grows with images: {payload['grows_with_images']}")
    if args.keep_maps:
        summary += f" (control keeping all maps: grows with images: {payload['control_keep_maps']['grows_with_images']})"
    C.emit(summary, payload)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    sys.path.insert(0, str(HERE))
    if args.memory_child:
        run_memory_child(args)
    elif args.memory:
        run_memory(args)
    else:
        run_throughput(args)


if __name__ == "__main__":
    main()
