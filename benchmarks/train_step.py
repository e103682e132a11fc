"""Predictor (LAViT) training steps/s at batch 32 against the official training step run literally.

Fast step (what `ladmim_hf.training.run_stage` runs for stage 2, through its own
`training.forward_backward`): `predictor(features, masks, labels=codes)` (SDPA attention, the last
block for the hist token only, vectorised `code_histograms` + L1 loss), backward,
`clip_grad_norm_(1.0)`, fused `AdamW.step()`. `--micro_batch N` also times the same step with
`predictor.micro_batch_size: N` (row chunks whose gradients add up to the whole batch's).

Reference step (official `train_engine` + BEiT code on the same initial weights): explicit
`softmax(q k^T / sqrt(d)) v` attention with attention dropout, qkv bias = cat(q_bias, 0, v_bias),
1x1-conv patch embedding, the L1 histogram loss summed in a Python loop over samples and levels with
float64 histograms, `clip_grad_norm_(1.0)`, the for-loop (not fused, not foreach) `AdamW.step()`.

Both models start from the same weights and train on the same inputs (random features and codes,
BEiT block masks with the training sizes: 130 of 576 cells, min block 46). After one untimed warm-up
step each on 2 samples (which also creates the AdamW state), each round times one reference step and
one fast step (the order alternates between rounds); `speedup` = median over rounds of reference
time / fast time. A paper-size step at batch 32 is ~1.3 TFLOP for the fast path (`step_gflop`,
forward + backward) and ~1.7 TFLOP for the reference (full last block), tens of seconds on 2 cores,
so the default is 2 rounds. `speedup_cpu_time` is the same ratio of process CPU time (with
`--threads 1` it does not depend on the machine's load).

    python benchmarks/train_step.py                  # paper size, batch 32
    python benchmarks/train_step.py --micro_batch 8  # also gradient accumulation over micro-batches of 8
    python benchmarks/train_step.py --tiny

Last stdout line: JSON with steps_per_s, reference_steps_per_s, speedup, initial_loss_diff, ...
"""

from __future__ import annotations

import copy

import torch

import _common as C


def reference_loss(logits: torch.Tensor, codes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Official L1 histogram loss: per sample and level, |softmax(y) - q| summed, with the target
    histogram q built in float64; summed over samples and levels."""
    probs = logits.float().softmax(-1)
    batch, levels, size = probs.shape
    loss = torch.zeros((), dtype=torch.float64)
    for b in range(batch):
        masked = codes[b][:, masks[b]]  # (L, n)
        count = masked.shape[1]
        for level in range(levels):
            hist = torch.bincount(masked[level], minlength=size).to(torch.float64) / count
            loss = loss + (probs[b, level].double() - hist).abs().sum()
    return loss


def main(argv=None) -> None:
    parser = C.base_parser(__doc__.split("\n\n")[0], sizes="paper")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 2; 3 with --tiny)")
    parser.add_argument("--micro_batch", type=int, default=None,
                        help="also time the fast step as gradient accumulation over micro-batches of this size "
                             "; same summed-loss gradient")
    args = parser.parse_args(argv)
    C.apply_threads(args)
    config_name = args.config or ("tiny" if args.tiny else "paper")
    rounds = args.rounds or (3 if args.tiny else 2)
    detector_config = C.CONFIGS[config_name]()
    cfg = detector_config.predictor_config
    fast_model = C.build_predictor(cfg, seed=args.seed)
    models = {"reference": copy.deepcopy(fast_model), "fast": fast_model}
    if args.micro_batch:
        models["micro_batch"] = copy.deepcopy(fast_model)
    optimizers = {
        name: torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                **({"fused": False, "foreach": False} if name == "reference" else {"fused": True}))
        for name, model in models.items()
    }

    from accelerate import Accelerator

    from ladmim_hf.models.masking import BlockMaskGenerator
    from ladmim_hf.training import forward_backward

    batch = args.batch_size
    generator = torch.Generator().manual_seed(args.seed)
    features = torch.randn(batch, cfg.input_channels, cfg.grid_size, cfg.grid_size, generator=generator)
    codes = torch.randint(0, cfg.codebook_size, (batch, cfg.num_levels, cfg.num_patches), generator=generator)
    mask_generator = BlockMaskGenerator(cfg.grid_size, detector_config.train_num_masked,
                                        detector_config.train_min_block, detector_config.min_aspect,
                                        patch_size=cfg.patch_size)

    def masks_for(step: int) -> torch.Tensor:
        return mask_generator(batch, seed=[args.seed * 7919 + step * batch + i for i in range(batch)])

    # Same loss on the same weights (dropout off): the reference computes what the package computes.
    with torch.no_grad():
        for model in models.values():
            model.eval()
        masks0 = masks_for(0)
        ref = reference_loss(C.reference_predictor_logits(models["reference"], features, masks0), codes, masks0)
        fast = models["fast"](features, masks0, labels=codes).loss
        initial_loss_diff = abs(float(ref) - float(fast))
        for model in models.values():
            model.train()

    accelerator = Accelerator(cpu=True)

    def step(name: str, masks: torch.Tensor, rows: int = batch) -> float:
        model, optimizer = models[name], optimizers[name]
        x, y, masks = features[:rows], codes[:rows], masks[:rows]
        if name == "reference":
            logits = C.reference_predictor_logits(model, x, masks, training=True)
            loss = reference_loss(logits, y, masks)
            loss.backward()
        else:  # the training loop's own forward + backward (row chunks for micro_batch)

            def loss_fn(module, chunk, _step, first_row, _masks=masks):
                return module(chunk[0], _masks[first_row:first_row + chunk[0].shape[0]], labels=chunk[1]).loss, {}

            micro = args.micro_batch if name == "micro_batch" else None
            loss, _ = forward_backward(accelerator, model, [x, y], 0, loss_fn, micro, cfg.loss_reduction)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=name != "reference")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for name in models:  # warm-up on 2 samples: creates the AdamW state, loads the kernels
        step(name, masks_for(1), rows=min(2, batch))
    times = {name: [] for name in models}
    cpu_times = {name: [] for name in models}
    for r in range(rounds):
        masks = masks_for(2 + r)
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):  # ABBA against load drift
            seconds, cpu, _ = C.timed_cpu(lambda: step(name, masks))
            times[name].append(seconds)
            cpu_times[name].append(cpu)
        C.log(f"[train_step] round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
    fast_s, ref_s = C.median(times["fast"]), C.median(times["reference"])
    result = C.comparison(
        "train_step", config_name, C.ratios(times["reference"], times["fast"]),
        C.ratios(cpu_times["reference"], cpu_times["fast"]), batch_size=batch, steps_per_s=round(1.0 / fast_s, 5),
        reference_steps_per_s=round(1.0 / ref_s, 5), rounds=rounds,
        initial_loss_diff=float(f"{initial_loss_diff:.3g}"), initial_loss=round(float(ref), 4),
        step_gflop=round(3 * C.predictor_flops(cfg, batch)["total"] / 1e9, 1))
    summary = (f"train step ({config_name}, batch {batch}): fast {1 / fast_s:.4f} steps/s, reference "
               f"{1 / ref_s:.4f} steps/s, speedup x{result['speedup']:.2f}")
    if "micro_batch" in models:
        result["micro_batch"] = {
            "size": args.micro_batch,
            "steps_per_s": round(1.0 / C.median(times["micro_batch"]), 5),
            "speedup_vs_fast": round(C.median(C.ratios(times["fast"], times["micro_batch"])), 3),
            "speedup_vs_fast_cpu_time": round(C.median(C.ratios(cpu_times["fast"], cpu_times["micro_batch"])), 3),
            "speedup_vs_reference": round(C.median(C.ratios(times["reference"], times["micro_batch"])), 3),
            "speedup_vs_reference_cpu_time": round(C.median(C.ratios(cpu_times["reference"], cpu_times["micro_batch"])), 3),
        }
        summary += f", micro-batch {args.micro_batch} x{result['micro_batch']['speedup_vs_fast']:.2f} vs the fast step"
    C.emit(summary, result)


if __name__ == "__main__":
    main()
