"""Stage `train`: fine-tune a Zero123-XL-style view-conditioned diffusion model on a triplet index
(paper §IV-A, §IV-B, Eq. 6-11, Tables II-IV).

Pieces, one module each: `model` (frozen VAE, 8-channel UNet, conditioning projection), `data`
(latent cache, z_cond per pair, person-aware sampler), `step` (noise, CFG dropout, ε-MSE, AdamW),
`checkpoint` (save/resume, `load_checkpoint` for sampling), `monitor` (TensorBoard, previews),
`distributed` (torchrun/DDP). `run` below is the loop that ties them together.

Run folder layout: see `stages.train.checkpoint`. Resuming (`resume="latest"` or a checkpoint
folder) restores weights, optimizer, lr schedule, GradScaler, EMA, sampler and RNG states; since
every random draw of a step is a function of (seed, step), a resumed run on CPU in float32 gives
bitwise the weights of an uninterrupted one (tested).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from stages.core import geometry, io, models
from stages.core.batching import ProgressFn
from stages.core.errors import InputError
from stages.train import checkpoint as ckpt
from stages.train import data, distributed, monitor, step
from stages.train.checkpoint import TrainedModel, load_checkpoint
from stages.train.model import Conditioning, Denoiser, Parts, build_parts
from stages.triplets import TripletSet, load_triplets

log = logging.getLogger("nvf")

__all__ = ["Config", "PRESETS", "run", "load_checkpoint", "TrainedModel"]

STAGE = "train"
Precision = Literal["auto", "fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class Config:
    """How the model is fine-tuned (defaults: the paper's Tables II-III)."""

    preset: str = "paper"
    """Model preset for the base: `paper` (Zero123-XL in diffusers layout, kxic/zero123-xl) or `tiny` (tests)."""
    base_model: str | None = None
    """Instead of the preset's: a diffusers folder or hub id with unet/ (8 or 4 inputs), vae/, scheduler/."""
    conditioning: Conditioning = "paper"
    """`paper`: new MLP on [CLIP ‖ 12-D pose]; `zero123`: the base's cc_projection + zero-init pose columns."""
    resolution: int = 256
    """Images are centre-cropped and resized to this square size before the VAE."""
    batch_size: int = 8
    """Pairs per optimisation step and process (global batch = this x processes)."""
    max_steps: int = 50_000
    """Optimisation steps in all (not given by the paper)."""
    learning_rate: float = 2e-5
    """AdamW peak learning rate of the UNet."""
    projection_lr_scale: float = 10.0
    """The projection learns at learning_rate x this (Zero123 uses 10)."""
    weight_decay: float = 0.02
    """AdamW weight decay."""
    warmup_steps: int = 2000
    """Linear warm-up steps before the cosine decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm); 0 turns it off."""
    precision: Precision = "auto"
    """Autocast: `auto` = fp16 on CUDA (with a GradScaler), fp32 on CPU; `bf16` works on both."""
    tf32: bool = True
    """Allow TF32 matmuls/convolutions on CUDA."""
    drop_clip: float = 0.05
    """CFG dropout: probability of zeroing only the CLIP embedding."""
    drop_image: float = 0.05
    """CFG dropout: probability of zeroing only the source latent."""
    drop_both: float = 0.05
    """CFG dropout: probability of zeroing both."""
    person_aware: bool = True
    """Every batch from one person's views (Eq. 10); False: shuffled batches over all pairs."""
    steps_per_person: int = 8
    """N: consecutive steps on one person before rotating to the next."""
    shuffle_within_person: bool = False
    """Shuffle a person's pairs; False keeps the monotonic camera order -90° -> +90° (Eq. 11)."""
    seed: int = 0
    """Seed of the sampler, the noise and the projection's initialisation."""
    checkpoint_every: int = 10_000
    """Save a checkpoint every N steps (Table III: 10k); the last step is always saved."""
    keep_checkpoints: int = 3
    """Keep the newest K checkpoints (0: all)."""
    validate_every: int = 1000
    """Validation loss on the person-disjoint val split every K steps (0: never)."""
    val_batches: int = 4
    """Batches of the val split in each validation."""
    preview_images: int = 2
    """Validation pairs rendered with a few DDIM steps at each validation (0: none)."""
    preview_steps: int = 10
    """DDIM steps of those previews."""
    guidance: float = 5.0
    """w of Eq. 9 for the previews (Table III: 5.0)."""
    ema: bool = False
    """Keep an exponential moving average of the weights (saved beside them)."""
    ema_decay: float = 0.9999
    """EMA decay."""
    log_every: int = 10
    """Log loss, lr and it/s every N steps."""
    latent_cache: Path | None = None
    """Disk cache of VAE latents [default: NVF cache/latents]; memory-only when `cache_latents` is off."""
    cache_latents: bool = True
    """Keep VAE latents on disk between epochs and runs."""
    memory_cache_items: int = 4096
    """Latents kept in the in-memory LRU."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package)."""


PRESETS: dict[str, Config] = {
    "paper": Config(),
    "tiny": Config(
        preset="tiny",
        resolution=32,
        batch_size=4,
        max_steps=20,
        learning_rate=1e-3,
        warmup_steps=0,
        checkpoint_every=10,
        validate_every=10,
        val_batches=1,
        preview_images=1,
        preview_steps=2,
        log_every=1,
    ),
}


def validate(cfg: Config) -> None:
    """InputError for settings that cannot work, before any model loads."""
    if cfg.conditioning not in io.CONDITIONING_LAYOUTS:
        raise InputError(f"unknown --conditioning '{cfg.conditioning}': use paper or zero123")
    if cfg.precision not in ("auto", "fp32", "fp16", "bf16"):
        raise InputError(f"unknown --precision '{cfg.precision}': use auto, fp32, fp16 or bf16")
    drops = (cfg.drop_clip, cfg.drop_image, cfg.drop_both)
    if min(drops) < 0 or sum(drops) > 1:
        raise InputError("CFG dropout probabilities must be >= 0 and add up to at most 1")
    for name in ("batch_size", "max_steps", "steps_per_person", "checkpoint_every", "resolution", "log_every"):
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.learning_rate <= 0:
        raise InputError("--learning-rate must be positive")


def _precision(cfg: Config, device: torch.device) -> str:
    if cfg.precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return cfg.precision


def _check_resolution(parts: Parts, resolution: int) -> int:
    """The latent size; InputError when the UNet cannot take it."""
    vae_factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(parts.unet.config.block_out_channels) - 1)
    if resolution % (vae_factor * unet_factor):
        raise InputError(
            f"--resolution {resolution} must be a multiple of {vae_factor * unet_factor} for this model "
            f"(VAE /{vae_factor}, UNet /{unet_factor})"
        )
    return resolution // vae_factor


def _write_run_files(
    out: Path, cfg: Config, parts: Parts, triplets: TripletSet, clip_dim: int, pose_dim: int, projection_spec: dict
) -> None:
    rec = triplets.record
    info = {
        "nvf_stage": STAGE,
        "conditioning": cfg.conditioning,
        "resolution": cfg.resolution,
        "clip_model": {
            "id": rec.extra.get("embed_model", ""),
            "pretrained": rec.extra.get("embed_pretrained", ""),
            "dim": clip_dim,
            "normalization": "l2" if cfg.conditioning == "paper" else "none",
        },
        "clip_dim": clip_dim,
        "pose_dim": pose_dim,
        "pose_layout": "[R_rel | T_rel] 12 (row-major)"
        if cfg.conditioning == "paper"
        else "[dpolar, sin dazimuth, cos dazimuth, dradius] 4 + [R_rel | T_rel] 12",
        "pose_normalization": rec.extra.get("pose_normalization", ""),
        "projection": projection_spec,
        "base_model": parts.base_model,
        "vae_fingerprint": parts.vae_fingerprint,
        "scaling_factor": float(parts.vae.config.scaling_factor),
        "scheduler_config": {k: v for k, v in parts.scheduler_config.items() if not k.startswith("_")},
        "source_latent": "VAE mode, unscaled, concatenated to x_t (Zero123)",
        "preprocess": "centre crop to square, bicubic resize, [-1, 1]",
        "triplets": str(triplets.path),
        # camera distance in the codes' units, so sampling needs no triplet index (None: no pair fits)
        "pose_radius": geometry.pose_code_radius(rec["pose_code"]),
    }
    io.write_json(out / ckpt.MODEL_JSON, info)
    io.write_json(out / "config.json", dataclasses.asdict(cfg))
    if not (out / "vae").is_dir():
        with io.atomic_dir(out / "vae") as tmp:
            parts.vae.save_pretrained(tmp, safe_serialization=True)
    if not (out / "scheduler").is_dir():
        from diffusers import DDIMScheduler

        with io.atomic_dir(out / "scheduler") as tmp:
            DDIMScheduler.from_config(parts.scheduler_config).save_pretrained(tmp)


def run(
    triplets_path: Path,
    out: Path,
    cfg: Config = Config(),
    *,
    device: str = "auto",
    resume: str | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> list[Path]:
    """Train on the train split of `triplets_path`, writing the run folder `out`; returns
    [final checkpoint folder, out/model.json].

    `resume`: `latest` or a checkpoint folder. Without it, a folder that already holds checkpoints is
    refused unless `overwrite` (which starts over). Under torchrun every process calls this; rank 0
    writes files.
    """
    validate(cfg)
    out = Path(out)
    existing = ckpt.list_checkpoints(out)
    if existing and resume is None and not overwrite:
        raise InputError(
            f"{out} already holds checkpoints (up to {existing[-1].name}): pass --resume latest to "
            "continue, --overwrite to start over, or another --out"
        )
    dist = distributed.setup(device)
    try:
        return _train(Path(triplets_path), out, cfg, dist, resume, overwrite, progress)
    finally:
        distributed.teardown(dist)


def _train(
    triplets_path: Path,
    out: Path,
    cfg: Config,
    dist: distributed.DistInfo,
    resume: str | None,
    overwrite: bool,
    progress: ProgressFn | None,
) -> list[Path]:
    device = dist.device
    precision = _precision(cfg, device)
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    triplets = load_triplets(triplets_path)
    embeddings = triplets.embeddings(raw=cfg.conditioning == "zero123")  # Zero123 was trained on raw image_embeds
    clip_dim = int(embeddings.shape[1])
    base = cfg.base_model or models.resolve_model("diffusion", cfg.preset).id
    parts = build_parts(base, cfg.conditioning, clip_dim, device, projection_seed=cfg.seed)
    _check_resolution(parts, cfg.resolution)
    train_table = data.pair_table(triplets, "train", cfg.conditioning, embeddings)
    val_table = data.pair_table(triplets, "val", cfg.conditioning, embeddings)
    if train_table.z_cond.shape[1] != parts.projection.spec["in_features"]:
        raise InputError(
            f"z_cond has {train_table.z_cond.shape[1]} numbers but the projection takes "
            f"{parts.projection.spec['in_features']}: the embeddings do not match the base model"
        )
    sampler = data.PersonAwareSampler(
        train_table,
        cfg.batch_size,
        seed=cfg.seed,
        steps_per_person=cfg.steps_per_person,
        shuffle_within_person=cfg.shuffle_within_person,
        person_aware=cfg.person_aware,
        world_size=dist.world_size,
        rank=dist.rank,
    )
    if dist.is_main:
        if overwrite and resume is None and out.exists():
            for old in ckpt.list_checkpoints(out):
                io.remove_owned_dir(old)
            (out / monitor.METRICS_FILE).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        _write_run_files(out, cfg, parts, triplets, clip_dim, parts.projection.spec["pose_dim"], parts.projection.spec)
    distributed.barrier(dist)

    cache_root = None
    if cfg.cache_latents:
        cache_root = Path(cfg.latent_cache) if cfg.latent_cache else models.cache_dir() / "latents"
    cache = data.LatentCache(
        parts.vae, parts.vae_fingerprint, cfg.resolution, device, cache_root, capacity=cfg.memory_cache_items
    )
    rows = np.unique(np.concatenate([train_table.source, train_table.target, val_table.source, val_table.target]))
    paths = [triplets.image_path(int(r)) for r in rows]
    # with a disk cache each process encodes its share and reads the others' after the barrier
    share = paths[dist.rank :: dist.world_size] if cache_root is not None else paths
    log.info("train: encoding %d image(s) with the VAE (cached after the first time)", len(share))
    cache.prefetch(share)
    distributed.barrier(dist)

    denoiser = Denoiser(parts.unet, parts.projection)
    trained = denoiser
    if dist.active:
        trained = torch.nn.parallel.DistributedDataParallel(
            denoiser, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = step.make_optimizer(
        parts.unet, parts.projection, cfg.learning_rate, cfg.projection_lr_scale, cfg.weight_decay
    )
    lr_scheduler = step.cosine_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    ema = step.EMA(denoiser, cfg.ema_decay) if cfg.ema else None
    start = 0
    if resume is not None:
        found = ckpt.find_checkpoint(resume, out)
        start, sampler_state = ckpt.load_training_state(
            found,
            unet=parts.unet,
            projection=parts.projection,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            scaler=scaler,
            ema=ema,
        )
        sampler.load_state_dict(sampler_state)
        log.info("train: resumed from %s (step %d)", found, start)
    if start >= cfg.max_steps:
        log.info("train: %s is already at step %d >= --max-steps %d", out, start, cfg.max_steps)
        return [ckpt.find_checkpoint(out), out / ckpt.MODEL_JSON]

    logger = monitor.RunLogger(out, wandb=cfg.wandb, config=dataclasses.asdict(cfg)) if dist.is_main else None
    dropout = step.Dropout(cfg.drop_clip, cfg.drop_image, cfg.drop_both)
    scaling = float(parts.vae.config.scaling_factor)
    n_train_t = int(parts.noise_scheduler.config.num_train_timesteps)
    params = list(trained.parameters())
    last_saved: Path | None = None
    tick, tick_step = time.perf_counter(), start
    try:
        for current in range(start, cfg.max_steps):
            _, positions = sampler.next()
            batch = data.make_batch(
                train_table, positions, cache, triplets.image_path, dist.rank * cfg.batch_size, sampler.global_batch
            )
            draws = step.draw_noise(cfg.seed, current, batch, n_train_t)
            inputs = step.model_inputs(batch, draws, parts.noise_scheduler, scaling, clip_dim, dropout, device)
            loss = step.diffusion_loss(trained, inputs, device, precision)
            if not torch.isfinite(loss):
                raise InputError(
                    f"the loss became {float(loss)} at step {current}: lower --learning-rate "
                    "or use --precision fp32/bf16"
                )
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
            grad_norm = step.optimizer_step(loss, params, optimizer, lr_scheduler, scaler, cfg.max_grad_norm)
            if ema is not None:
                ema.update(denoiser)
            done = current + 1
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                mean_loss = distributed.mean_over_ranks(loss, dist)
                now = time.perf_counter()
                rate = (done - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, done
                if logger is not None:
                    logger.scalars(
                        done,
                        {"train/loss": mean_loss, "train/lr": lr, "train/it_per_s": rate, "train/grad_norm": grad_norm},
                    )
                    log.info("step %d/%d  loss %.4f  lr %.3g  %.2f it/s", done, cfg.max_steps, mean_loss, lr, rate)
            if cfg.validate_every and (done % cfg.validate_every == 0 or done == cfg.max_steps):
                if dist.is_main and logger is not None:
                    _validate(
                        done,
                        cfg,
                        denoiser,
                        parts,
                        val_table,
                        train_table,
                        cache,
                        triplets,
                        clip_dim,
                        device,
                        precision,
                        logger,
                    )
                distributed.barrier(dist)
            if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
                if dist.is_main:
                    last_saved = ckpt.save_checkpoint(
                        out,
                        done,
                        unet=parts.unet,
                        projection=parts.projection,
                        optimizer=optimizer,
                        lr_scheduler=lr_scheduler,
                        sampler_state=sampler.state_dict(),
                        scaler=scaler,
                        ema=ema,
                        keep=cfg.keep_checkpoints,
                    )
                distributed.barrier(dist)
            if progress is not None:
                progress(done, cfg.max_steps)
    finally:
        if logger is not None:
            logger.close()
    final = last_saved or ckpt.checkpoint_dir(out, cfg.max_steps)
    log.info("train: %d step(s) done -> %s", cfg.max_steps - start, final)
    return [final, out / ckpt.MODEL_JSON]


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
