"""Scoring throughput of `LadmimForAnomalyDetection` against the official algorithm run literally.

Fast path: `model(pixel_values, category, num_masks=M, seed=...)` on a batch of images (tokenizer once
per image, all masks of all images in one predictor forward, SDPA attention, vectorised histograms).

Reference (`_common.reference_score_one_mask`): for every (image, mask) pair, the tokenizer is rerun on
that image with batch 1, the predictor runs with batch 1 and explicit `softmax(q k^T / sqrt(d)) v`
attention (the official BEiT attention on the same weights), then float64 softmax and a float64
histogram counted cell by cell.

Timing: `--rounds` rounds (default 5); each round times the next share of the reference's
(image, mask) pairs (the reference covers the first `--ref_images` images with all M masks, spread
over the rounds: 2 masks per round by default) and then one fast forward over `--fast_images` images
(default 4). The reference cost per image is extrapolated as M x (its median time per mask), which is
exact for an algorithm that processes each mask independently. `speedup` = median over rounds of
(reference s/image) / (fast s/image); `speedup_cpu_time` is the same ratio of process CPU time (with
`--threads 1` it does not depend on the machine's load). `max_abs_score_diff` compares the
reference's per-mask scores with the fast path's `mask_scores` for the same masks, and the per-image
logical scores (their means). About 90 s on a quiet 2-core CPU.

    python benchmarks/scoring.py                   # paper size, 10 masks
    python benchmarks/scoring.py --bf16 --compile  # also bf16 autocast and torch.compile variants
    python benchmarks/scoring.py --chunk 4 8 --breakdown  # chunked predictor, component costs
    python benchmarks/scoring.py --memory [--keep_maps]  # peak RSS vs batch size and number of images
    python benchmarks/scoring.py --tiny            # seconds, for the tests

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
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; 2 with --tiny)")
    parser.add_argument("--chunk", type=int, nargs="*", default=[],
                        help="also time the fast path with max_sequences_per_chunk=N (one variant per N)")
    parser.add_argument("--bf16", action="store_true", help="also time the fast path under CPU bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also time the fast path with torch.compile'd predictor")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the components (tokenizer, predictor; batched and batch 1) in predictor-sequence units")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's; 1 with --tiny)")
    memory = parser.add_argument_group("memory mode")
    memory.add_argument("--memory", action="store_true", help="peak RSS of scoring, one fresh subprocess per setting")
    memory.add_argument("--memory_settings", default=None,
                        help="comma-separated BATCHxIMAGES (default 1x16,4x16,16x16,16x100)")
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
    rounds = args.rounds or (2 if args.tiny else 5)
    ref_images = min(args.ref_images, fast_images)
    num_masks = args.num_masks
    build_start = time.perf_counter()
    model = C.build_detector(C.CONFIGS[config_name](), seed=args.seed)
    model.config.logical_pose_step = 0  # the reference scores the image as it is; pose_cost.py times the poses
    C.log(f"[scoring] built {config_name} model in {time.perf_counter() - build_start:.1f} s")
    size = model.config.tokenizer_config.image_size
    images = C.random_images(fast_images, size, args.seed)
    seeds = [args.seed * 1000 + i for i in range(fast_images)]

    def fast():
        return model(images, category=C.CATEGORY, num_masks=num_masks, seed=seeds)

    variants = {"fp32": fast}
    compile_info = None
    for size_ in args.chunk:
        def fast_chunked(size_=size_):
            return model(images, category=C.CATEGORY, num_masks=num_masks, seed=seeds, max_sequences_per_chunk=size_)
        variants[f"chunk{size_}"] = fast_chunked
    if args.bf16:
        def fast_bf16():  # the predictor under bf16 autocast; tokenizer and codes in float32
            return model(images, category=C.CATEGORY, num_masks=num_masks, seed=seeds, predictor_dtype="bf16")
        variants["bf16"] = fast_bf16
    if args.compile:
        import copy

        compile_info = {"ok": False}
        compiled_model = copy.deepcopy(model)
        try:
            compiled_model.predictor_for(C.CATEGORY).compile(dynamic=False)
            start = time.perf_counter()
            compiled_model(images, category=C.CATEGORY, num_masks=num_masks, seed=seeds)  # compiles
            compile_info.update(ok=True, compile_seconds=round(time.perf_counter() - start, 1))

            def fast_compiled():
                return compiled_model(images, category=C.CATEGORY, num_masks=num_masks, seed=seeds)
            variants["compile"] = fast_compiled
        except Exception as error:  # noqa: BLE001 - report any compile failure instead of crashing
            compile_info["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            C.log(f"[scoring] torch.compile failed: {compile_info['error']}")

    # Warm-up (allocator, oneDNN primitive caches) on both paths; fixes the masks both paths score.
    masks = fast().masks
    C.reference_score_one_mask(model, images[0], masks[0, 0])

    pairs = [(b, m) for b in range(ref_images) for m in range(num_masks)]
    per_round = -(-len(pairs) // rounds)
    fast_wall = {name: [] for name in variants}
    fast_cpu = {name: [] for name in variants}
    outputs = {}
    ref_wall, ref_cpu, ref_scores = [], [], {}
    ratios_wall, ratios_cpu = [], []
    for r in range(rounds):
        chunk = pairs[r * per_round:(r + 1) * per_round]
        wall, cpu = [], []
        for b, m in chunk:
            w, c, score = C.timed_cpu(lambda: C.reference_score_one_mask(model, images[b], masks[b, m]))
            wall.append(w)
            cpu.append(c)
            ref_scores[(b, m)] = score
        for name, fn in variants.items():
            w, c, out = C.timed_cpu(fn)
            fast_wall[name].append(w / fast_images)
            fast_cpu[name].append(c / fast_images)
            outputs[name] = out
        ref_wall.extend(wall)
        ref_cpu.extend(cpu)
        if wall:
            ratios_wall.append(C.median(wall) * num_masks / fast_wall["fp32"][-1])
            ratios_cpu.append(C.median(cpu) * num_masks / fast_cpu["fp32"][-1])
        C.log(f"[scoring] round {r + 1}/{rounds}: fast {fast_wall['fp32'][-1]:.3f} s/image, reference "
              f"{C.median(wall) * num_masks:.3f} s/image ({len(wall)} masks); wall ratio {ratios_wall[-1]:.2f}, "
              f"cpu ratio {ratios_cpu[-1]:.2f}")

    def score_diffs(out):
        mask_diff = max(abs(ref_scores[(b, m)] - float(out.mask_scores[b, m])) for b, m in ref_scores)
        image_diff = max(
            abs(sum(ref_scores[(b, m)] for m in range(num_masks)) / num_masks - float(out.logical_score[b]))
            for b in range(ref_images)
        )
        return mask_diff, image_diff

    fast_s = C.median(fast_wall["fp32"])
    ref_s = C.median(ref_wall) * num_masks
    mask_diff, image_diff = score_diffs(outputs["fp32"])
    result = C.comparison(
        "scoring", config_name, ratios_wall, ratios_cpu, digits=2, num_masks=num_masks,
        images_per_s=round(1.0 / fast_s, 4), reference_images_per_s=round(1.0 / ref_s, 4),
        speedup_pooled=round(ref_s / fast_s, 2), max_abs_score_diff=float(f"{max(mask_diff, image_diff):.3g}"),
        max_abs_logical_score_diff=float(f"{image_diff:.3g}"), fast_images=fast_images, reference_images=ref_images,
        reference_masks_timed=len(ref_wall), rounds=rounds,
        reference_extrapolation="reference s/image = num_masks x median s/mask (each mask is independent)")
    summary_extra = ""
    for name in variants:
        if name == "fp32":
            continue
        ratios = [f / v for f, v in zip(fast_wall["fp32"], fast_wall[name])]
        v_mask_diff, v_image_diff = score_diffs(outputs[name])
        ratio = C.median(ratios)
        result[name] = {
            "images_per_s": round(1.0 / C.median(fast_wall[name]), 4),
            "speedup_vs_fp32": round(ratio, 3),
            "speedup_vs_fp32_cpu_time": round(C.median([f / v for f, v in zip(fast_cpu["fp32"], fast_cpu[name])]), 3),
            "speedup_vs_reference": round(C.median([ref_s / v for v in fast_wall[name]]), 2),
            "max_abs_score_diff": float(f"{max(v_mask_diff, v_image_diff):.3g}"),
            "wins": bool(ratio > 1.0),
        }
        summary_extra += f", {name} x{ratio:.2f} vs fp32"
    if compile_info is not None:
        result["compile"] = {**compile_info, **result.get("compile", {})}
        if not compile_info["ok"]:
            result["compile"]["wins"] = False
            summary_extra += ", compile failed"
    if args.breakdown:
        result["breakdown"] = breakdown(model, images, masks, num_masks, rounds=max(2, rounds // 2))
    C.emit(
        f"scoring ({config_name}, {num_masks} masks): fast {1 / fast_s:.3f} images/s, reference "
        f"{1 / ref_s:.4f} images/s, speedup x{result['speedup']:.1f} (cpu time x{result['speedup_cpu_time']:.1f}), "
        f"max |score diff| {max(mask_diff, image_diff):.2g}" + summary_extra,
        result,
    )


def breakdown(model, images, masks, num_masks: int, rounds: int) -> dict:
    """Where the time goes, in units of one fast predictor sequence (P), interleaved over rounds:
    fast tokenizer per image (batch of images), reference tokenizer per mask (batch 1), reference
    predictor per mask (batch 1, explicit attention) and the package predictor at batch 1 (SDPA).
    The ratio these give, M (T1 + R1) / (TB + M), is the speedup the fast path can reach: it still
    runs one full predictor sequence per mask."""
    import torch

    import _common as C

    predictor = model.predictor_for(C.CATEGORY)
    batch = images.shape[0]
    rows = {k: [] for k in ("fast_tokenizer_per_image", "reference_tokenizer_per_mask",
                            "reference_predictor_per_mask", "sdpa_predictor_batch1_per_mask")}
    with torch.inference_mode():
        for _ in range(rounds):
            tb, _, tokens = C.timed_cpu(lambda: model.tokenizer.tokenize(images, C.CATEGORY))
            p, _, _ = C.timed_cpu(lambda: predictor(model.predictor_inputs(tokens["features"]), masks))
            t1, _, one = C.timed_cpu(lambda: model.tokenizer.tokenize(images[:1], C.CATEGORY))
            r1, _, _ = C.timed_cpu(lambda: C.reference_predictor_logits(predictor, model.predictor_inputs(one["features"]), masks[:1, 0]))
            s1, _, _ = C.timed_cpu(lambda: predictor(model.predictor_inputs(one["features"]), masks[:1, 0]))
            unit = p / (batch * num_masks)
            rows["fast_tokenizer_per_image"].append(tb / batch / unit)
            rows["reference_tokenizer_per_mask"].append(t1 / unit)
            rows["reference_predictor_per_mask"].append(r1 / unit)
            rows["sdpa_predictor_batch1_per_mask"].append(s1 / unit)
    out = {k: round(C.median(v), 2) for k, v in rows.items()}
    t_b, t_1, r_1 = out["fast_tokenizer_per_image"], out["reference_tokenizer_per_mask"], out["reference_predictor_per_mask"]
    out["unit"] = "seconds of one fast predictor sequence"
    out["modelled_speedup"] = round(num_masks * (t_1 + r_1) / (t_b + num_masks), 2)
    out["modelled_speedup_if_predictor_cost_per_mask_were_zero"] = round(num_masks * (t_1 + r_1) / t_b, 2)
    return out


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
                    seed=args.seed)
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
    * grows_with_batch: peak RSS rises with the batch size at the image count run with the most batch
      sizes, by more than max(16 MB, 5 %) from the smallest to the largest batch, never falling by
      more than 8 MB.
    * grows_with_images: in a run over the largest image count, the retained RSS (after gc and
      malloc_trim, see run_memory_child) rises by more than 16 MB from the first fifth of the images
      to the end. Keeping the three 224 px maps of every image (0.6 MB) adds 48 MB over 80 images;
      `--keep_maps` runs that control.
    """
    from concurrent.futures import ThreadPoolExecutor

    config_name = args.config or ("tiny" if args.tiny else "synthloco")
    # Batch sizes are compared on a short run each; one long run shows whether memory grows with images.
    default = "1x12,4x12,4x4" if args.tiny else "1x16,4x16,16x16,16x100"
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
        counts = sorted({n for _, n in mine})
        widest = max(counts, key=lambda n: (sum(1 for _, m in mine if m == n), n))  # most batch sizes
        batches = sorted(b for b, n in mine if n == widest)
        series = [(b, mine[(b, widest)]["peak_rss_mb"]) for b in batches]
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
    if args.memory_child:
        run_memory_child(args)
    elif args.memory:
        run_memory(args)
    else:
        run_throughput(args)


if __name__ == "__main__":
    main()
