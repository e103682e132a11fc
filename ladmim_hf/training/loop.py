"""The stage loop: how one stage (the tokenizer, or one predictor) trains, checkpoints and resumes.

`run_stage` trains a module with AdamW and `lr_lambda_for`'s schedule. Every stage checkpoints with
`Accelerator.save_state` into `OUTPUT_DIR/checkpoints/<stage>/step_XXXXXXX` (written to a temporary
folder and renamed, so a killed run never leaves a half-written checkpoint) and `--resume` continues
from the latest complete one (`latest_checkpoint`) with the same data order and masks
(`_masks_for_step`), hence the same loss curve. `Progress` records finished stages in `progress.json`;
`_StopFlag` turns SIGINT/SIGTERM into a stop after the next checkpoint (`TrainingInterrupted`), and a
NaN or infinite loss raises `TrainingDivergedError`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ..io_utils import atomic_write_json
from .settings import StageSettings, TrainSettings

logger = logging.getLogger("ladmim_hf.training")


class TrainingDivergedError(RuntimeError):
    """A loss became NaN or infinite; the message names the stage, the step and likely causes."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM: the run stopped after saving a checkpoint."""


# --------------------------------------------------------------------------------------------------
# Schedules and checkpoints
# --------------------------------------------------------------------------------------------------


def lr_lambda_for(stage: StageSettings, total_steps: int):
    """Multiplier of the base learning rate at each step: linear warm-up then cosine to the minimum
    (LAViT), or a step drop at `step_fraction` (HVQ-Trans)."""
    warmup = int(round(stage.warmup_fraction * total_steps))
    floor = stage.min_learning_rate / stage.learning_rate if stage.learning_rate > 0 else 0.0

    def multiplier(step: int) -> float:
        if step < warmup:
            return floor + (1.0 - floor) * (step + 1) / warmup
        if stage.schedule == "step":
            return stage.step_gamma if step >= stage.step_fraction * total_steps else 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def latest_checkpoint(stage_dir: Path) -> tuple[Path | None, int]:
    """The newest complete `step_XXXXXXX` folder of a stage (temporary folders are ignored)."""
    if not stage_dir.is_dir():
        return None, 0
    steps = sorted(
        (int(p.name.split("_")[1]), p) for p in stage_dir.iterdir()
        if p.is_dir() and p.name.startswith("step_") and p.name.split("_")[1].isdigit()
    )
    return (steps[-1][1], steps[-1][0]) if steps else (None, 0)


class Progress:
    """`progress.json`: the finished stages of a run, written atomically."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / "progress.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"completed": [], "history": {}}

    def done(self, stage: str) -> bool:
        return stage in self.data["completed"]

    def mark(self, stage: str, summary: dict, is_main: bool) -> None:
        if stage not in self.data["completed"]:
            self.data["completed"].append(stage)
        self.data["history"][stage] = summary
        if is_main:
            atomic_write_json(self.path, self.data)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so the run stops after a checkpoint."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("signal %s received: stopping after saving a checkpoint (press again to abort)", signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _check_finite(loss: torch.Tensor, stage: str, step: int, hint: str) -> None:
    if not torch.isfinite(loss).all():
        raise TrainingDivergedError(
            f"{stage}: loss is {loss.item()} at step {step}. Likely causes: {hint}. The last good checkpoint "
            "is kept; lower the learning rate or check the data, then rerun with --resume."
        )


# --------------------------------------------------------------------------------------------------
# The stage loop
# --------------------------------------------------------------------------------------------------


def _stage_seed(seed: int, stage_name: str) -> int:
    """A 32-bit seed for one stage, stable across processes and Python runs (no `hash()`)."""
    return int(np.random.SeedSequence([seed, *stage_name.encode()]).generate_state(1)[0])


def _masks_for_step(generator_factory, num_rows: int, step: int, seed: int, process: int, first_row: int = 0) -> torch.Tensor:
    """Training masks of rows `first_row ..` of a step's batch: each row's mask depends on (seed, step,
    process, row) only, so micro-batching does not change them."""
    rows = range(first_row, first_row + num_rows)
    seeds = [int(np.random.SeedSequence([seed, step, process, i]).generate_state(1)[0]) for i in rows]
    return generator_factory(num_rows, seed=seeds)


def forward_backward(accelerator: Accelerator, model: torch.nn.Module, batch, step: int, loss_fn,
                     micro_batch_size: int | None, loss_reduction: str, stage_name: str = "", hint: str = ""):
    """Loss of one step's `batch` and its gradient (accumulated into `.grad`), in row chunks of
    `micro_batch_size` when set.

    `loss_fn(model, rows, step, first_row) -> (loss, logs)` gets the tensors of rows
    `first_row .. first_row + len(rows)` of the batch (per-sample randomness such as masks must
    depend on the row index, not on the chunk). With `loss_reduction="sum"` the chunk losses add up
    to the batch loss; with `"mean"` each is weighted by its share of the rows. Gradients are
    synchronised across processes on the last chunk only. Returns `(loss, logs)` of the whole batch.
    """
    num_rows = batch[0].shape[0]
    size = micro_batch_size or num_rows
    starts = list(range(0, num_rows, size))
    total = None
    logs: dict = {}
    for index, start in enumerate(starts):
        rows = [tensor[start:start + size] for tensor in batch]
        last = index == len(starts) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            loss, logs = loss_fn(model, rows, step, start)
            if loss_reduction == "mean" and len(starts) > 1:
                loss = loss * (rows[0].shape[0] / num_rows)
            _check_finite(loss.detach(), stage_name, step, hint)
            accelerator.backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    return total, logs


def run_stage(accelerator: Accelerator, settings: TrainSettings, stage_name: str, stage: StageSettings,
              model: torch.nn.Module, dataset: TensorDataset, loss_fn, hint: str, stop: _StopFlag,
              resume: bool, log_prefix: str, loss_reduction: str = "mean") -> dict:
    """Train `model` on `dataset` with `loss_fn(model, batch, step, first_row) -> (loss, logs)` (see
    `forward_backward`; `first_row` is 0 unless `stage.micro_batch_size` splits the batch); returns
    a summary."""
    output_dir = Path(settings.output_dir)
    stage_dir = output_dir / "checkpoints" / stage_name.replace("/", "-")
    total = stage.total_steps(len(dataset), accelerator.num_processes)
    # Bit-exact resume across stage boundaries: start every stage from RNG streams derived from
    # (seed, stage name) alone. Without this a stage that starts fresh inherits the global RNG state
    # left by the stages before it, which differs between an uninterrupted run (they trained) and a
    # resumed one (they were loaded from `stages/`), so e.g. the predictors' dropout masks diverged.
    # Mid-stage, `load_state` below restores the checkpoint's RNG states over this seed.
    set_seed(_stage_seed(settings.seed, stage_name))
    accelerator.free_memory()
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel is several times faster than the per-tensor loop on CPU as well as on GPU.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, betas=stage.betas, weight_decay=stage.weight_decay,
                                  fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_for(stage, total))
    generator = torch.Generator().manual_seed(settings.seed)
    batch_size = min(stage.batch_size, len(dataset))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=generator)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    step = 0
    if resume:
        checkpoint, step = latest_checkpoint(stage_dir)
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))
            accelerator.print(f"[{stage_name}] resumed from {checkpoint} (step {step}/{total})")
    per_epoch = len(loader)
    losses: list[float] = []
    bar = tqdm(total=total, initial=step, desc=f"{log_prefix}", unit="step", disable=not accelerator.is_local_main_process)
    model.train()

    def save(at_step: int) -> None:
        # Every process writes its part (e.g. its RNG state) into one temporary folder; the main
        # process then renames it, so `step_XXXXXXX` folders are always complete.
        target = stage_dir / f"step_{at_step:07d}"
        if target.exists():
            return
        tmp = stage_dir / f".step_{at_step:07d}.tmp"
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.replace(tmp, target)
        accelerator.wait_for_everyone()

    started = time.time()
    while step < total:
        epoch = step // per_epoch
        loader.set_epoch(epoch)
        skip = step - epoch * per_epoch
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in epoch_loader:
            with accelerator.accumulate(model):
                loss, logs = forward_backward(accelerator, model, batch, step, loss_fn, stage.micro_batch_size,
                                              loss_reduction, stage_name, hint)
                grad_norm = None
                if accelerator.sync_gradients and stage.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), stage.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            step += 1
            loss_value = loss.detach().float().item()
            losses.append(loss_value)
            lr = scheduler.get_last_lr()[0]
            record = {f"{log_prefix}/loss": loss_value, f"{log_prefix}/lr": lr, **{f"{log_prefix}/{k}": v for k, v in logs.items()}}
            if grad_norm is not None:
                record[f"{log_prefix}/grad_norm"] = float(grad_norm)
            accelerator.log(record, step=step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if step % stage.checkpoint_every == 0 or step == total or stop.requested:
                save(step)
            if stop.requested:
                bar.close()
                raise TrainingInterrupted(f"{stage_name}: stopped at step {step}/{total}; rerun with --resume to continue")
            if step >= total:
                break
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    return {"steps": total, "final_loss": float(np.mean(tail)), "seconds": round(time.time() - started, 1)}
