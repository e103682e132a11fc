"""What the memory-bank and global branches and the logical branch's retrieval add to the cost of scoring an image.

Builds the detector of `configs/synthloco-cpu.yaml` (random weights: the cost does not depend on
them) twice from the same weights: with the branches that file enables and with them switched off
(the logical and structural branches only, the predictor without retrieval), or with `--retrieval`
only the retrieval switched off (`logical_retrieval_neighbours: 0`), fits the branches on random training features of the
configured grid, then times `model(pixel_values, category, seed=...)` (backbone included, at `global_image_size` too, the
config's masks) on the same images, alternating the two in `--rounds` rounds. `ratio` is the median
over rounds of (with branches) / (without) process CPU time per image; with `--threads 1` it does
not depend on the machine's load.

    python benchmarks/branch_cost.py --threads 1
    python benchmarks/branch_cost.py --threads 1 --retrieval   # the retrieval alone
    python benchmarks/branch_cost.py --tiny      # seconds, for the tests

Last stdout line: JSON with `ratio`, `ratio_wall`, the seconds per image of both and the settings.
"""

from __future__ import annotations

import torch

import _common as C


def main(argv=None) -> dict:
    parser = C.cost_parser(__doc__)
    parser.add_argument("--retrieval", action="store_true",
                        help="compare with and without the retrieval only (the other branches stay on)")
    args = parser.parse_args(argv)
    C.apply_threads(args)
    from ladmim_hf import LadmimConfig

    config = C.tiny_config() if args.tiny else C.synthloco_config()
    if args.tiny:
        config = LadmimConfig.from_dict({**config.to_dict(), "memory_bank_size": 16, "global_branch": True,
                                         "global_descriptor": "part_histogram", "global_parts": 8,
                                         "logical_retrieval_neighbours": 3, "logical_retrieval_num_masked": 4,
                                         "logical_retrieval_min_block": 2, "logical_retrieval_rank": 4,
                                         "global_image_size": 128, "fused_branches": None})
        args.images, args.rounds, args.train_images = 2, 2, 8
    if args.retrieval and not config.logical_retrieval_neighbours:
        raise SystemExit("the config does not retrieve (logical_retrieval_neighbours: 0): nothing to compare")
    if config.memory_bank_size == 0 and not config.global_branch:
        raise SystemExit("the config enables neither the memory bank nor the global branch: nothing to compare")
    with_branches = C.build_detector(config, seed=args.seed)
    switched_off = {"logical_retrieval_neighbours": 0}
    if not args.retrieval:
        switched_off.update(memory_bank_size=0, global_branch=False, fused_branches=None, global_image_size=None)
    plain_config = LadmimConfig.from_dict({**config.to_dict(), **switched_off})
    without = C.build_detector(plain_config, seed=args.seed)
    dropped = ("retrieval.", "retrieval_parts.") + (() if args.retrieval else ("memory_bank.", "global_branch."))
    without.load_state_dict({k: v for k, v in with_branches.state_dict().items() if not k.startswith(dropped)})
    for model in (with_branches, without):
        model._warned_uncalibrated.update(model.categories)
    size, grid = config.tokenizer_config.image_size, config.tokenizer_config.grid_size
    train = torch.randn(args.train_images, config.tokenizer_config.feature_channels, grid, grid,
                        generator=torch.Generator().manual_seed(args.seed))
    global_grid = config.global_grid_size  # the global branch reads a larger image
    global_train = None if global_grid is None else torch.randn(
        args.train_images, config.tokenizer_config.feature_channels, global_grid, global_grid,
        generator=torch.Generator().manual_seed(args.seed + 2))
    C.log("fitting the branches")
    with_branches.fit_feature_branches(train, C.CATEGORY, seed=args.seed, global_features=global_train)
    images = C.random_images(args.images, size, args.seed + 1)
    seeds = list(range(args.images))

    def scorer(model):
        return lambda: model(images, category=C.CATEGORY, seed=seeds)

    result = {
        **C.cost_ratio(scorer(with_branches), scorer(without), args.rounds, args.images),
        "memory_bank_size": config.memory_bank_size, "global_branch": config.global_branch,
        "global_descriptor": config.global_descriptor, "global_image_size": config.global_image_size,
        "logical_retrieval_neighbours": config.logical_retrieval_neighbours, "compared": "retrieval" if args.retrieval else "branches",
        "num_masks": config.num_masks, "images": args.images, "rounds": args.rounds,
        "config": "tiny" if args.tiny else "synthloco-cpu",
    }
    what = "retrieval" if args.retrieval else "branches"
    C.emit(f"scoring with {what} / without: {result['ratio']:.3f} (CPU time), {result['ratio_wall']:.3f} (wall)", result)
    return result


if __name__ == "__main__":
    main()
