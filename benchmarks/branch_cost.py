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
    parser = C.cost_parser(__doc__)
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

    def scorer(model):
        return lambda: model(images, category=C.CATEGORY, seed=seeds)

    result = {
        **C.cost_ratio(scorer(with_branches), scorer(without), args.rounds, args.images),
        "memory_bank_size": config.memory_bank_size, "global_branch": config.global_branch,
        "global_descriptor": config.global_descriptor,
        "num_masks": config.num_masks, "images": args.images, "rounds": args.rounds,
        "config": "tiny" if args.tiny else "synthloco-cpu",
    }
    C.emit(f"scoring with branches / without: {result['ratio']:.3f} (CPU time), {result['ratio_wall']:.3f} (wall)", result)
    return result


if __name__ == "__main__":
    main()
