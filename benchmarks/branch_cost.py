"""What the memory-bank and global branches add to the cost of scoring an image.

Builds the detector of `configs/synthloco-cpu.yaml` (random weights: the cost does not depend on
them) twice from the same weights: with the branches that file enables and with them switched off
(the logical and structural branches only), fits the branches on random training features of the
configured grid, then times `model(pixel_values, category, seed=...)` (backbone included, the
config's masks) on the same images, alternating the two in `--rounds` rounds. `ratio` is the median
over rounds of (with branches) / (without) process CPU time per image; with `--threads 1` it does
not depend on the machine's load.

    python benchmarks/branch_cost.py --threads 1
    python benchmarks/branch_cost.py --tiny      # seconds, for the tests

Last stdout line: JSON with `ratio`, `ratio_wall`, the seconds per image of both and the settings.
"""

from __future__ import annotations

import torch

import _common as C


def main(argv=None) -> dict:
    parser = C.base_parser(__doc__)
    parser.add_argument("--images", type=int, default=8, help="images per timed forward")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train_images", type=int, default=150, help="random training images the branches are fitted on")
    args = parser.parse_args(argv)
    C.apply_threads(args)
    from ladmim_hf import LadmimConfig

    config = C.tiny_config() if args.tiny else C.synthloco_config()
    if args.tiny:
        config.memory_bank_size, config.global_branch = 16, True
        config.fused_branches = config.enabled_branches
        args.images, args.rounds, args.train_images = 2, 2, 8
    if config.memory_bank_size == 0 and not config.global_branch:
        raise SystemExit("the config enables neither the memory bank nor the global branch: nothing to compare")
    with_branches = C.build_detector(config, seed=args.seed)
    plain_config = LadmimConfig.from_dict({**config.to_dict(), "memory_bank_size": 0, "global_branch": False,
                                           "fused_branches": None})
    without = C.build_detector(plain_config, seed=args.seed)
    without.load_state_dict({k: v for k, v in with_branches.state_dict().items()
                             if not k.startswith(("memory_bank.", "global_branch."))})
    for model in (with_branches, without):
        model._warned_uncalibrated.update(model.categories)
    size, grid = config.tokenizer_config.image_size, config.tokenizer_config.grid_size
    train = torch.randn(args.train_images, config.tokenizer_config.feature_channels, grid, grid,
                        generator=torch.Generator().manual_seed(args.seed))
    C.log("fitting the branches")
    with_branches.fit_feature_branches(train, C.CATEGORY, seed=args.seed)
    images = C.random_images(args.images, size, args.seed + 1)
    seeds = list(range(args.images))

    def run(model):
        return C.timed_cpu(lambda: model(images, category=C.CATEGORY, seed=seeds))

    run(with_branches), run(without)  # warm-up: first calls allocate
    ratios, wall_ratios, times = [], [], {"with": [], "without": []}
    for round_index in range(args.rounds):
        wall_with, cpu_with, _ = run(with_branches)
        wall_without, cpu_without, _ = run(without)
        ratios.append(cpu_with / cpu_without)
        wall_ratios.append(wall_with / wall_without)
        times["with"].append(cpu_with / args.images)
        times["without"].append(cpu_without / args.images)
        C.log(f"round {round_index + 1}: {ratios[-1]:.3f}")
    result = {
        "ratio": round(C.median(ratios), 4), "ratio_wall": round(C.median(wall_ratios), 4),
        "cpu_s_per_image_with": round(C.median(times["with"]), 5),
        "cpu_s_per_image_without": round(C.median(times["without"]), 5),
        "memory_bank_size": config.memory_bank_size, "global_branch": config.global_branch,
        "global_descriptor": config.global_descriptor,
        "num_masks": config.num_masks, "images": args.images, "rounds": args.rounds,
        "config": "tiny" if args.tiny else "synthloco-cpu",
    }
    C.emit(f"scoring with branches / without: {result['ratio']:.3f} (CPU time), {result['ratio_wall']:.3f} (wall)", result)
    return result


if __name__ == "__main__":
    main()
