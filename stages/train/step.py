"""One optimisation step: forward diffusion (Eq. 6), CFG dropout, ε-MSE (Eq. 8), clipped AdamW update.

Randomness of a step (timesteps, noise, the target-latent sample, the dropout draw) is a pure
function of (seed, step, position in the global batch): a generator seeded with (seed, step) draws
for the whole global batch and each rank keeps its slice. So a resumed run, and N processes with
batch b vs one process with batch N·b, see the very same numbers.

CFG dropout (Zero-1-to-3 / InstructPix2Pix, one uniform u per sample): u < p_clip drops the CLIP
part of z_cond (zeros; the pose stays), p_clip <= u < p_clip + p_both drops CLIP and the source
latent, the next p_image drops the source latent only (zeros). Defaults 5% / 5% / 5%. The sample
stage's unconditional branch is the "both" case: CLIP zeroed, source latent zeroed, pose kept.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.core import io
from stages.train.data import Batch


@dataclass(frozen=True)
class Dropout:
    """CFG dropout probabilities per sample (disjoint events; their sum must be <= 1)."""

    clip: float = 0.05
    image: float = 0.05
    both: float = 0.05


@dataclass
class StepNoise:
    """The random draws of one rank's batch: timesteps [B], noise and latent sample ε [B, 4, h, w], u [B]."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    latent_eps: torch.Tensor
    uniform: torch.Tensor


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    state = np.random.SeedSequence([seed, step, salt]).generate_state(2, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def draw_noise(seed: int, step: int, batch: Batch, num_train_timesteps: int, salt: int = 0) -> StepNoise:
    """Draw for the whole global batch (CPU, float32) and keep this rank's slice."""
    g = step_generator(seed, step, salt)
    size = batch.global_size
    shape = (size, *batch.target_moments.shape[1:])
    shape = (size, shape[1] // 2, *shape[2:])  # moments hold mean ‖ logvar
    timesteps = torch.randint(0, num_train_timesteps, (size,), generator=g)
    noise = torch.randn(shape, generator=g)
    latent_eps = torch.randn(shape, generator=g)
    uniform = torch.rand(size, generator=g)
    part = slice(batch.global_offset, batch.global_offset + len(batch.z_cond))
    return StepNoise(timesteps[part], noise[part], latent_eps[part], uniform[part])


def dropout_masks(uniform_b: torch.Tensor, dropout: Dropout) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_clip [B] bool, drop_image [B] bool) from one uniform draw per sample (see module doc)."""
    clip_only = uniform_b < dropout.clip
    both = (uniform_b >= dropout.clip) & (uniform_b < dropout.clip + dropout.both)
    image_only = (uniform_b >= dropout.clip + dropout.both) & (uniform_b < dropout.clip + dropout.both + dropout.image)
    return clip_only | both, image_only | both


def model_inputs(
    batch: Batch,
    draws: StepNoise,
    noise_scheduler: Any,
    scaling_factor: float,
    clip_dim: int,
    dropout: Dropout | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(UNet input [B, 8, h, w], timesteps [B], z_cond [B, D], target [B, 4, h, w]) on `device`.

    x_0 = (mean + exp(logvar / 2) ε) · scaling_factor; x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) noise
    (Eq. 6); source latent = mean, unscaled; target = noise (ε-prediction) or v.
    """
    to = {"device": device, "non_blocking": True}
    target_m, source_m = batch.target_moments.to(**to), batch.source_moments.to(**to)
    c = target_m.shape[1] // 2
    x0 = (target_m[:, :c] + torch.exp(0.5 * target_m[:, c:]) * draws.latent_eps.to(**to)) * scaling_factor
    noise, timesteps = draws.noise.to(**to), draws.timesteps.to(**to)
    x_t = noise_scheduler.add_noise(x0, noise, timesteps)
    source = source_m[:, :c]
    z_cond = batch.z_cond.to(**to)
    if dropout is not None:
        drop_clip, drop_image = (m.to(device) for m in dropout_masks(draws.uniform, dropout))
        z_cond = io.without_clip(z_cond, clip_dim, keep=~drop_clip)
        source = source * (~drop_image)[:, None, None, None]
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, timesteps)
    else:
        target = noise
    return torch.cat([x_t, source], dim=1), timesteps, z_cond, target


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """torch.autocast for `fp16`/`bf16`; a no-op for `fp32`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def diffusion_loss(
    denoiser: nn.Module, inputs: tuple[torch.Tensor, ...], device: torch.device, precision: str
) -> torch.Tensor:
    """Eq. 8: mean over the batch of ||ε - ε_θ(x_t, c, t)||² (per-element mean, in float32)."""
    latent_in, timesteps, z_cond, target = inputs
    with autocast(device, precision):
        prediction = denoiser(latent_in, timesteps, z_cond)
    return F.mse_loss(prediction.float(), target.float())


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then cosine decay to `min_ratio` at `total_steps` (Table III)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(
    unet: nn.Module, projection: nn.Module, lr: float, projection_lr_scale: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW with two groups: the UNet at `lr`, the projection at `lr * projection_lr_scale` (Zero123: 10x)."""
    groups = [
        {"params": [p for p in unet.parameters() if p.requires_grad], "lr": lr},
        {"params": list(projection.parameters()), "lr": lr * projection_lr_scale},
    ]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)


def optimizer_step(
    loss: torch.Tensor,
    parameters: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    max_grad_norm: float,
) -> float:
    """Backward, unscale, clip the global gradient norm to `max_grad_norm`, step; returns the norm before clipping."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


class EMA:
    """Exponential moving average of parameters (float32 shadows), decay warmed up as in diffusers:
    d_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, module: nn.Module, decay: float = 0.9999) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}
        self.updates = 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, param in module.named_parameters():
            self.shadow[name].mul_(d).add_(param.detach().float(), alpha=1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**self.shadow, "__updates__": torch.tensor(self.updates)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.updates = int(state["__updates__"])
        for name in self.shadow:
            self.shadow[name].copy_(state[name])
