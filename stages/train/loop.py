"""The step loop of `stages.train.run`, over the `Training` state that `run` builds: one optimiser
step (batch, noise draws of (seed, step), ε-MSE, update, EMA), and logging, validation (loss on
held-out pairs, preview images) and checkpoints on their schedules; resuming restores that state."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from stages.core import io
from stages.core.batching import ProgressFn
from stages.core.errors import InputError
from stages.train import checkpoint as ckpt
from stages.train import data, distributed, monitor, step
from stages.train.model import Denoiser, Parts
from stages.triplets import TripletSet

if TYPE_CHECKING:
    from stages.train import Config

log = logging.getLogger("nvf")


@dataclass
class Training:
    """What the step loop works on, built by `stages.train._setup`: data, model and optimisation state."""

    cfg: Config
    dist: distributed.DistInfo
    precision: str
    triplets: TripletSet
    clip_dim: int
    parts: Parts
    train_table: data.PairTable
    val_table: data.PairTable
    sampler: data.PersonAwareSampler
    cache: data.LatentCache
    denoiser: Denoiser
    trained: torch.nn.Module  # the denoiser, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.AdamW
    lr_scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    ema: step.EMA | None


class _Rate:
    """Steps per second since the previous reading."""

    def __init__(self, at_step: int) -> None:
        self.time, self.step = time.perf_counter(), at_step

    def __call__(self, at_step: int) -> float:
        now = time.perf_counter()
        rate = (at_step - self.step) / max(now - self.time, 1e-9)
        self.time, self.step = now, at_step
        return rate


def resume(t: Training, which: str, out: Path) -> int:
    """Restore the training state of checkpoint `which` (`latest` or a folder) into `t`; its step."""
    found = ckpt.find_checkpoint(which, out)
    start, sampler_state = ckpt.load_training_state(
        found,
        unet=t.parts.unet,
        projection=t.parts.projection,
        optimizer=t.optimizer,
        lr_scheduler=t.lr_scheduler,
        scaler=t.scaler,
        ema=t.ema,
    )
    t.sampler.load_state_dict(sampler_state)
    log.info("train: resumed from %s (step %d)", found, start)
    return start


def run_steps(t: Training, out: Path, start: int, progress: ProgressFn | None) -> Path | None:
    """Steps `start` to `--max-steps`, logging, validating and checkpointing on their schedules;
    returns the last checkpoint written (None on ranks other than 0)."""
    cfg, dist = t.cfg, t.dist
    logger = monitor.RunLogger(out, wandb=cfg.wandb, config=dataclasses.asdict(cfg)) if dist.is_main else None
    dropout = step.Dropout(cfg.drop_clip, cfg.drop_image, cfg.drop_both)
    params = list(t.trained.parameters())
    last_saved: Path | None = None
    rate = _Rate(start)
    try:
        for current in range(start, cfg.max_steps):
            loss, lr, grad_norm = _train_step(t, current, dropout, params)
            done = current + 1
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                _log_step(t, logger, done, loss, lr, grad_norm, rate)
            if cfg.validate_every and (done % cfg.validate_every == 0 or done == cfg.max_steps):
                if dist.is_main and logger is not None:
                    _validate(done, cfg, t.denoiser, t.parts, t.val_table, t.train_table, t.cache, t.triplets,
                              t.clip_dim, dist.device, t.precision, logger)  # fmt: skip
                distributed.barrier(dist)
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                if dist.is_main:
                    last_saved = _save_checkpoint(t, out, done)
                distributed.barrier(dist)
            if progress is not None:
                progress(done, cfg.max_steps)
    finally:
        if logger is not None:
            logger.close()
    return last_saved


def _train_step(
    t: Training, current: int, dropout: step.Dropout, params: list[torch.nn.Parameter]
) -> tuple[torch.Tensor, float, float]:
    """Step `current` (0-based): next batch, the draws of (seed, step), ε-MSE, optimiser step, EMA;
    returns (loss, the learning rate this step used, the gradient norm before clipping)."""
    cfg, parts, device = t.cfg, t.parts, t.dist.device
    _, positions = t.sampler.next()
    batch = data.make_batch(
        t.train_table, positions, t.cache, t.triplets.image_path, t.dist.rank * cfg.batch_size, t.sampler.global_batch
    )
    draws = step.draw_noise(cfg.seed, current, batch, int(parts.noise_scheduler.config.num_train_timesteps))
    scaling = float(parts.vae.config.scaling_factor)
    inputs = step.model_inputs(batch, draws, parts.noise_scheduler, scaling, t.clip_dim, dropout, device)
    loss = step.diffusion_loss(t.trained, inputs, device, t.precision)
    if not torch.isfinite(loss):
        raise InputError(
            f"the loss became {float(loss)} at step {current}: lower --learning-rate or use --precision fp32/bf16"
        )
    lr = t.optimizer.param_groups[0]["lr"]  # the rate this step uses
    grad_norm = step.optimizer_step(loss, params, t.optimizer, t.lr_scheduler, t.scaler, cfg.max_grad_norm)
    if t.ema is not None:
        t.ema.update(t.denoiser)
    return loss, lr, grad_norm


def _log_step(
    t: Training,
    logger: monitor.RunLogger | None,
    done: int,
    loss: torch.Tensor,
    lr: float,
    grad_norm: float,
    rate: _Rate,
) -> None:
    """Log the loss (mean over ranks), learning rate, speed and gradient norm after step `done`."""
    mean_loss = distributed.mean_over_ranks(loss, t.dist)
    it_per_s = rate(done)
    if logger is not None:
        logger.scalars(
            done,
            {"train/loss": mean_loss, "train/lr": lr, "train/it_per_s": it_per_s, "train/grad_norm": grad_norm},
        )
        log.info("step %d/%d  loss %.4f  lr %.3g  %.2f it/s", done, t.cfg.max_steps, mean_loss, lr, it_per_s)


def _save_checkpoint(t: Training, out: Path, done: int) -> Path:
    """Write the checkpoint of step `done` (rank 0), keeping the newest `--keep-checkpoints`."""
    return ckpt.save_checkpoint(
        out,
        done,
        unet=t.parts.unet,
        projection=t.parts.projection,
        optimizer=t.optimizer,
        lr_scheduler=t.lr_scheduler,
        sampler_state=t.sampler.state_dict(),
        scaler=t.scaler,
        ema=t.ema,
        keep=t.cfg.keep_checkpoints,
    )


def val_positions(table: data.PairTable, n: int) -> np.ndarray:
    """`n` pair positions spread evenly over a table (deterministic)."""
    if len(table) == 0 or n <= 0:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, len(table) - 1, min(n, len(table))).round().astype(np.int64))


@torch.no_grad()
def validation_loss(
    denoiser: torch.nn.Module,
    parts: Parts,
    table: data.PairTable,
    cache: data.LatentCache,
    image_path: Callable[[int], Path],
    positions: np.ndarray,
    batch_size: int,
    clip_dim: int,
    device: torch.device,
    precision: str,
    seed: int,
) -> float:
    """Mean ε-MSE over `positions` with fixed draws per batch and no CFG dropout."""
    was_training = denoiser.training
    denoiser.eval()
    losses, weights = [], []
    scaling = float(parts.vae.config.scaling_factor)
    n_t = int(parts.noise_scheduler.config.num_train_timesteps)
    for k, start in enumerate(range(0, len(positions), batch_size)):
        chunk = positions[start : start + batch_size]
        batch = data.make_batch(table, chunk, cache, image_path, 0, len(chunk))
        draws = step.draw_noise(seed, k, batch, n_t, salt=1)
        inputs = step.model_inputs(batch, draws, parts.noise_scheduler, scaling, clip_dim, None, device)
        losses.append(float(step.diffusion_loss(denoiser, inputs, device, precision)))
        weights.append(len(chunk))
    denoiser.train(was_training)
    return float(np.average(losses, weights=weights)) if losses else math.nan


def _validate(
    done: int,
    cfg: Config,
    denoiser: Denoiser,
    parts: Parts,
    val_table: data.PairTable,
    train_table: data.PairTable,
    cache: data.LatentCache,
    triplets: TripletSet,
    clip_dim: int,
    device: torch.device,
    precision: str,
    logger: monitor.RunLogger,
) -> None:
    table, split = (val_table, "val") if len(val_table) else (train_table, "train")
    positions = val_positions(table, cfg.val_batches * cfg.batch_size)
    loss = validation_loss(
        denoiser,
        parts,
        table,
        cache,
        triplets.image_path,
        positions,
        cfg.batch_size,
        clip_dim,
        device,
        precision,
        cfg.seed,
    )
    logger.scalars(done, {f"{split}/loss": loss})
    log.info("step %d  %s loss %.4f (%d pairs)", done, split, loss, len(positions))
    if cfg.preview_images <= 0:
        return
    chosen = val_positions(table, cfg.preview_images)
    source_paths = [triplets.image_path(int(r)) for r in table.source[chosen]]
    target_paths = [triplets.image_path(int(r)) for r in table.target[chosen]]
    source_pixels = torch.stack([data.preprocess_image(io.read_image(p), cfg.resolution) for p in source_paths])
    target_pixels = torch.stack([data.preprocess_image(io.read_image(p), cfg.resolution) for p in target_paths])
    moments = cache.get(source_paths).to(device)
    c = moments.shape[1] // 2
    denoiser.eval()
    generated = monitor.preview(
        denoiser,
        parts.vae,
        parts.scheduler_config,
        source_pixels,
        moments[:, :c],
        torch.from_numpy(table.z_cond[chosen]).to(device),
        clip_dim,
        float(parts.vae.config.scaling_factor),
        steps=cfg.preview_steps,
        guidance=cfg.guidance,
        seed=cfg.seed,
    )
    denoiser.train()
    logger.image(
        done, f"{split}/source-generated-target", monitor.image_grid([source_pixels, generated, target_pixels])
    )
