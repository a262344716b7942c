"""Stage `train`: fine-tune a Zero123-XL-style view-conditioned diffusion model on a triplet index
(paper §IV-A, §IV-B, Eq. 6-11, Tables II-IV).

Pieces, one module each: `model` (frozen VAE, 8-channel UNet, conditioning projection), `data`
(latent cache, z_cond per pair, person-aware sampler), `step` (noise, CFG dropout, ε-MSE, AdamW),
`checkpoint` (save/resume, `load_checkpoint` for sampling), `monitor` (TensorBoard, previews),
`distributed` (torchrun/DDP), `loop` (the step loop: logging, validation, checkpoints). `train` below
loads the data and the model and hands them to the loop; `run` is the stage contract
(`stages.core.contract`) over a work tree.

Run folder layout: see `stages.train.checkpoint`. Resuming (`resume="latest"` or a checkpoint
folder) restores weights, optimizer, lr schedule, GradScaler, EMA, sampler and RNG states; since
every random draw of a step is a function of (seed, step), a resumed run on CPU in float32 gives
bitwise the weights of an uninterrupted one (tested).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from stages.core import geometry, io, models
from stages.core.batching import ProgressFn
from stages.core.contract import Context
from stages.core.errors import InputError
from stages.train import checkpoint as ckpt
from stages.train import data, distributed, loop, monitor, step
from stages.train.checkpoint import TrainedModel, load_checkpoint
from stages.train.loop import val_positions, validation_loss  # noqa: F401 - re-exported, as before the split
from stages.train.model import Conditioning, Denoiser, Parts, build_parts
from stages.triplets import TripletSet, load_triplets

log = logging.getLogger("nvf")

__all__ = ["Config", "PRESETS", "run", "train", "load_checkpoint", "TrainedModel"]

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


PATHS = {"triplets": "triplets.safetensors", "out": "train", "resume": None}
"""Named paths `Context.paths` may set: the ``triplets`` index (default ``WORK/triplets.safetensors``),
the run folder ``out`` (default ``WORK/train``), and ``resume`` (`latest` or a checkpoint folder)."""


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """The stage contract: `train` on ``ctx``'s triplet index into its run folder.

    A rerun continues from the run's latest checkpoint (``ctx.paths["resume"]`` names another) unless
    ``ctx.overwrite``, which starts over.
    """
    out = ctx.path("out", PATHS["out"])
    triplets = ctx.path("triplets", PATHS["triplets"])
    resume = str(ctx.given("resume")) if ctx.given("resume") is not None else None
    if resume is None and not ctx.overwrite and ckpt.list_checkpoints(out):
        resume = "latest"
    return train(triplets, out, cfg, device=ctx.device, resume=resume, overwrite=ctx.overwrite, progress=ctx.progress)


def train(
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
    """`run` after the checks, in every process: set up, resume if asked, run the steps left."""
    t = _setup(triplets_path, out, cfg, dist, resume, overwrite)
    start = 0 if resume is None else loop.resume(t, resume, out)
    if start >= cfg.max_steps:
        log.info("train: %s is already at step %d >= --max-steps %d", out, start, cfg.max_steps)
        return [ckpt.find_checkpoint(out), out / ckpt.MODEL_JSON]
    last_saved = loop.run_steps(t, out, start, progress)
    final = last_saved or ckpt.checkpoint_dir(out, cfg.max_steps)
    log.info("train: %d step(s) done -> %s", cfg.max_steps - start, final)
    return [final, out / ckpt.MODEL_JSON]


def _setup(
    triplets_path: Path, out: Path, cfg: Config, dist: distributed.DistInfo, resume: str | None, overwrite: bool
) -> loop.Training:
    """Load the triplets and the model, prepare the run folder (rank 0) and the latent cache, and
    build the optimiser, lr schedule, GradScaler and EMA of a fresh run."""
    device = dist.device
    precision = _precision(cfg, device)
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    triplets, clip_dim, parts, train_table, val_table = _load_model_and_pairs(triplets_path, cfg, device)
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
        _prepare_run_folder(out, cfg, parts, triplets, clip_dim, resume, overwrite)
    distributed.barrier(dist)
    cache = _latent_cache(cfg, dist, parts, triplets, train_table, val_table)

    denoiser = Denoiser(parts.unet, parts.projection)
    trained: torch.nn.Module = denoiser
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
    return loop.Training(cfg=cfg, dist=dist, precision=precision, triplets=triplets, clip_dim=clip_dim,
                         parts=parts, train_table=train_table, val_table=val_table, sampler=sampler, cache=cache,
                         denoiser=denoiser, trained=trained, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         scaler=scaler, ema=ema)  # fmt: skip


def _load_model_and_pairs(
    triplets_path: Path, cfg: Config, device: torch.device
) -> tuple[TripletSet, int, Parts, data.PairTable, data.PairTable]:
    """(triplets, CLIP embedding size, model parts, train pairs, val pairs); InputError when the
    resolution or the embeddings do not fit the base model."""
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
    return triplets, clip_dim, parts, train_table, val_table


def _prepare_run_folder(
    out: Path, cfg: Config, parts: Parts, triplets: TripletSet, clip_dim: int, resume: str | None, overwrite: bool
) -> None:
    """Create `out` (emptied of checkpoints and metrics on `overwrite` without `resume`) and write
    its run files; rank 0 only."""
    if overwrite and resume is None and out.exists():
        for old in ckpt.list_checkpoints(out):
            io.remove_owned_dir(old)
        (out / monitor.METRICS_FILE).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_run_files(out, cfg, parts, triplets, clip_dim, parts.projection.spec["pose_dim"], parts.projection.spec)


def _latent_cache(
    cfg: Config,
    dist: distributed.DistInfo,
    parts: Parts,
    triplets: TripletSet,
    train_table: data.PairTable,
    val_table: data.PairTable,
) -> data.LatentCache:
    """The VAE latent cache, holding the latents of the images of every train and val pair."""
    cache_root = None
    if cfg.cache_latents:
        cache_root = Path(cfg.latent_cache) if cfg.latent_cache else models.cache_dir() / "latents"
    cache = data.LatentCache(
        parts.vae, parts.vae_fingerprint, cfg.resolution, dist.device, cache_root, capacity=cfg.memory_cache_items
    )
    rows = np.unique(np.concatenate([train_table.source, train_table.target, val_table.source, val_table.target]))
    paths = [triplets.image_path(int(r)) for r in rows]
    # with a disk cache each process encodes its share and reads the others' after the barrier
    share = paths[dist.rank :: dist.world_size] if cache_root is not None else paths
    log.info("train: encoding %d image(s) with the VAE (cached after the first time)", len(share))
    cache.prefetch(share)
    distributed.barrier(dist)
    return cache
