"""Effect of the feature cache on stage-2 (predictor) training time, at the synthloco-cpu sizes.

Training (`ladmim_hf.training.train`) computes the frozen backbone features once per image and the
frozen tokenizer's codes once per image, then trains the predictors from that cache
(method.md 3.6). This script compares one predictor training step from the cache with the same step
recomputing backbone + tokenizer codes for the batch (what a loop without the cache does). Both steps
draw training masks, run `predictor(features, masks, labels=codes)`, backward, `clip_grad_norm_(1.0)`
and fused AdamW, as `run_stage` does. Random images stand in for the data; JPEG decoding and resizing,
which an uncached loop would also repeat every step, are not included (so the gain is a lower bound).

Each round times one cached and one uncached step (the order alternates between rounds); `speedup`
= median over rounds of uncached / cached step time (`speedup_cpu_time`: the same with process CPU
time). `cache_build_in_steps` is the one-off cost of building the cache for `--images` images,
in cached steps.

    python benchmarks/feature_cache.py          # synthloco-cpu sizes, batch 32
    python benchmarks/feature_cache.py --tiny

Last stdout line: JSON with speedup, cached_steps_per_s, uncached_steps_per_s, ...
"""

from __future__ import annotations

import copy

import numpy as np
import torch

import _common as C


def main(argv=None) -> None:
    parser = C.base_parser(__doc__.split("\n\n")[0], sizes="synthloco")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--images", type=int, default=64, help="training images in the (random) data set")
    parser.add_argument("--rounds", type=int, default=None, help="default 4 (3 with --tiny)")
    args = parser.parse_args(argv)
    C.apply_threads(args)
    config_name = args.config or ("tiny" if args.tiny else "synthloco")
    rounds = args.rounds or (3 if args.tiny else 4)
    model = C.build_detector(C.CONFIGS[config_name](), seed=args.seed)
    tokenizer = model.tokenizer.eval()
    size = model.config.tokenizer_config.image_size
    images = C.random_images(args.images, size, args.seed)
    batch = min(args.batch_size, args.images)

    def encode(pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            features = tokenizer.extract_features(pixel_values)
            return features, tokenizer.encode(features=features, category=C.CATEGORY)

    # The cache, as training builds it (feature_batch_size 16).
    def build_cache():
        parts = [encode(images[i:i + 16]) for i in range(0, len(images), 16)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    encode(images[:2])  # warm-up
    build_seconds, (cached_features, cached_codes) = C.timed(build_cache)

    predictors = {"cached": model.predictor_for(C.CATEGORY)}
    predictors["uncached"] = copy.deepcopy(predictors["cached"])
    optimizers = {name: torch.optim.AdamW(p.parameters(), lr=5e-4, weight_decay=0.05, fused=True)
                  for name, p in predictors.items()}
    mask_generator = model.mask_generator(training=True)
    order = torch.Generator().manual_seed(args.seed)

    def step(name: str, step_index: int) -> float:
        index = torch.randperm(len(images), generator=order)[:batch]
        if name == "cached":
            features, codes = cached_features[index], cached_codes[index]
        else:
            features, codes = encode(images[index])
        seeds = [int(np.random.SeedSequence([args.seed, step_index, 0, i]).generate_state(1)[0]) for i in range(batch)]
        masks = mask_generator(batch, seed=seeds)
        predictor, optimizer = predictors[name], optimizers[name]
        predictor.train()
        loss = predictor(model.predictor_inputs(features), masks, labels=codes).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(predictor.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for name in predictors:  # warm-up (AdamW state, allocator)
        step(name, 0)
    times = {name: [] for name in predictors}
    cpu_times = {name: [] for name in predictors}
    for r in range(rounds):
        for name in (("uncached", "cached") if r % 2 == 0 else ("cached", "uncached")):  # ABBA against load drift
            seconds, cpu, _ = C.timed_cpu(lambda: step(name, 1 + r))
            times[name].append(seconds)
            cpu_times[name].append(cpu)
        C.log(f"[feature_cache] round {r + 1}/{rounds}: cached {times['cached'][-1]:.3f} s, "
              f"uncached {times['uncached'][-1]:.3f} s")
    cached_s, uncached_s = C.median(times["cached"]), C.median(times["uncached"])
    result = C.comparison(
        "feature_cache", config_name, C.ratios(times["uncached"], times["cached"]),
        C.ratios(cpu_times["uncached"], cpu_times["cached"]), batch_size=batch,
        cached_steps_per_s=round(1.0 / cached_s, 4), uncached_steps_per_s=round(1.0 / uncached_s, 4),
        cache_build_in_steps=round(build_seconds / cached_s, 2), cache_images=args.images, rounds=rounds,
        excluded="image decoding and resizing (an uncached loop would also repeat them)")
    C.emit(f"feature cache ({config_name}, batch {batch}): cached {1 / cached_s:.3f} steps/s, uncached "
           f"{1 / uncached_s:.3f} steps/s, speedup x{result['speedup']:.2f}", result)

if __name__ == "__main__":
    main()
