"""What scoring the logical branch at five poses (`logical_pose_step`) costs per image.

Builds the detector of `configs/synthloco-cpu.yaml` (random weights: the cost does not depend on
them; every branch that file enables, fitted on random training features) and times
`model(pixel_values, category, seed=...)` (backbone included, the config's masks) on the same images
with the file's `logical_pose_step` (6 if the file leaves it at 0) and with 0, alternating the two in
`--rounds` rounds on the same weights (`--scoring_memory_mb` sets the predictor's chunk size).
`ratio` is the median over rounds of (with poses) / (without) process CPU time per image; with `--threads 1` it does not depend on the machine's load. The
backbone and predictor run once per pose, the memory bank and global branch once.

    python benchmarks/pose_cost.py --threads 1
    python benchmarks/pose_cost.py --tiny      # seconds, for the tests

Last stdout line: JSON with `ratio`, `ratio_wall`, the seconds per image of both and the settings.
"""

from __future__ import annotations

import torch

import _common as C


def main(argv=None) -> dict:
    parser = C.cost_parser(__doc__)
    parser.add_argument("--scoring_memory_mb", type=int, default=None,
                        help="the predictor's scoring budget, which sets its chunk size (default: the config's)")
    args = parser.parse_args(argv)
    C.apply_threads(args)

    config = C.tiny_config() if args.tiny else C.synthloco_config()
    if args.scoring_memory_mb is not None:
        config.scoring_memory_mb = args.scoring_memory_mb
    if args.tiny:
        args.images, args.rounds, args.train_images = 2, 2, 8
    step = config.logical_pose_step or 6
    model = C.build_detector(config, seed=args.seed)
    model._warned_uncalibrated.update(model.categories)
    grid = config.tokenizer_config.grid_size
    train = torch.randn(args.train_images, config.tokenizer_config.feature_channels, grid, grid,
                        generator=torch.Generator().manual_seed(args.seed))
    model.fit_feature_branches(train, C.CATEGORY, seed=args.seed)
    images = C.random_images(args.images, config.tokenizer_config.image_size, args.seed + 1)

    def scorer(pose_step: int):
        def score():
            model.config.logical_pose_step = pose_step
            return model(images, category=C.CATEGORY, seed=args.seed)
        return score

    result = {
        **C.cost_ratio(scorer(step), scorer(0), args.rounds, args.images),
        "logical_pose_step": step, "poses": 5, "enabled_branches": config.enabled_branches,
        "scoring_memory_mb": config.scoring_memory_mb, "num_masks": config.num_masks, "images": args.images,
        "rounds": args.rounds, "config": "tiny" if args.tiny else "synthloco-cpu",
    }
    C.emit(f"scoring with {step} px poses / without: {result['ratio']:.3f} (CPU time), {result['ratio_wall']:.3f} (wall)",
           result)
    return result


if __name__ == "__main__":
    main()
