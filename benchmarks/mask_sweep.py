"""Scoring time against the number of test-time masks.

Timing: each round scores the same `--images` images with `LadmimForAnomalyDetection(...,
num_masks=m)` for every m in `--masks` (default 1, 5, 10, 20, 50, the sweep method.md 4.1
recommends); `relative_time[m]` is the median over rounds of time(m) / time(1 mask). Random weights
and images at the paper's sizes by default; with `--model DIR` the trained model is timed instead.

What the mask count does to the AUROCs of a trained model is a quality question:
`experiments/mask_count.py`.

`extra_mask_cost` is (relative_time[last] - relative_time[first]) / (masks[last] - masks[first]): the
cost of one more mask (one more predictor sequence) in units of the time to score with the first count.

    python benchmarks/mask_sweep.py                          # timing, paper size
    python benchmarks/mask_sweep.py --model outputs/synthloco/model --images 4
    python benchmarks/mask_sweep.py --tiny

Last stdout line: JSON with num_masks, relative_time, extra_mask_cost, ...
"""

from __future__ import annotations

import _common as C


def main(argv=None) -> None:
    parser = C.base_parser(__doc__.split("\n\n")[0], sizes="paper")
    parser.add_argument("--masks", default="1,5,10,20,50", help="comma-separated mask counts")
    parser.add_argument("--images", type=int, default=1, help="images per timed forward")
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (2 with --tiny)")
    parser.add_argument("--model", default=None, help="trained model folder (or Hub id) to time instead")
    args = parser.parse_args(argv)
    C.apply_threads(args)
    counts = [int(m) for m in args.masks.split(",")]
    rounds = args.rounds or (2 if args.tiny else 3)
    if args.model:
        from ladmim_hf import LadmimForAnomalyDetection

        model = LadmimForAnomalyDetection.from_pretrained(args.model).eval()
        config_name = f"model:{args.model}"
    else:
        config_name = args.config or ("tiny" if args.tiny else "paper")
        model = C.build_detector(C.CONFIGS[config_name](), seed=args.seed)
    category = model.categories[0]
    size = model.config.tokenizer_config.image_size
    images = C.random_images(args.images, size, args.seed)
    seeds = [args.seed * 1000 + i for i in range(args.images)]

    def score(m: int):
        return model(images, category=category, num_masks=m, seed=seeds)

    score(1)  # warm-up
    times = {m: [] for m in counts}
    for r in range(rounds):
        for m in (counts if r % 2 == 0 else counts[::-1]):  # alternate the order against load drift
            seconds, _ = C.timed(lambda: score(m))
            times[m].append(seconds)
        C.log(f"[mask_sweep] round {r + 1}/{rounds}: " + ", ".join(f"{m}: {t[-1]:.2f} s" for m, t in times.items()))
    base = counts[0]
    relative = [round(C.median([t / b for t, b in zip(times[m], times[base])]), 3) for m in counts]
    result = {
        "benchmark": "mask_sweep",
        "config": config_name,
        "num_masks": counts,
        "relative_time": relative,
        "relative_to": base,
        "images": args.images,
        "rounds": rounds,
        "extra_mask_cost": round((relative[-1] - relative[0]) / max(1, counts[-1] - counts[0]), 3),
    }
    summary = "mask sweep (" + config_name + "): time relative to " + str(base) + " mask: " + ", ".join(
        f"{m}: x{r:.2f}" for m, r in zip(counts, relative))
    C.emit(summary, result)


if __name__ == "__main__":
    main()
