"""What a run reports: TensorBoard (always), W&B (when asked and installed), a JSON-lines log, and
preview samples (a few DDIM steps with classifier-free guidance, Eq. 9) of validation pairs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.core import io
from stages.core.errors import InputError

log = logging.getLogger("nvf")

METRICS_FILE = "metrics.jsonl"


class RunLogger:
    """Scalars and images to TensorBoard (RUN/logs), W&B when `wandb`, and scalars to RUN/metrics.jsonl."""

    def __init__(self, run: Path, *, wandb: bool = False, config: dict[str, Any] | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        self.tb = SummaryWriter(log_dir=str(run / "logs"))
        self.metrics = open(run / METRICS_FILE, "a")  # noqa: SIM115 - closed in close()
        self.wandb = None
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise InputError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None
            self.wandb = wandb_module.init(project="nvf", dir=str(run), config=config or {}, resume="allow")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.tb.add_scalar(name, value, step)
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def image(self, step: int, name: str, image_hw3: np.ndarray) -> None:
        self.tb.add_image(name, image_hw3, step, dataformats="HWC")
        io.write_image(self.run / "samples" / f"{name.replace('/', '-')}-{step:08d}.png", image_hw3)
        if self.wandb is not None:
            import wandb as wandb_module

            self.wandb.log({name: wandb_module.Image(image_hw3)}, step=step)

    def close(self) -> None:
        self.tb.close()
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run: Path) -> list[dict[str, float]]:
    """The rows of RUN/metrics.jsonl (one per logged step)."""
    path = Path(run) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


@torch.no_grad()
def preview(
    denoiser: torch.nn.Module,
    vae: Any,
    scheduler_config: dict[str, Any],
    source_pixels: torch.Tensor,
    source_mean: torch.Tensor,
    z_cond: torch.Tensor,
    clip_dim: int,
    scaling_factor: float,
    *,
    steps: int,
    guidance: float,
    seed: int,
) -> torch.Tensor:
    """Generated targets [B, 3, S, S] in [-1, 1]: DDIM with `steps` steps and Eq. 9,
    ε̂ = (1 + w) ε(x_t, c) - w ε(x_t, ∅), ∅ = CLIP zeroed and source latent zeroed (pose kept)."""
    from diffusers import DDIMScheduler

    device = source_mean.device
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps, device=device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(source_mean.shape, generator=g).to(device) * scheduler.init_noise_sigma
    null = io.without_clip(z_cond, clip_dim)
    both_cond = torch.cat([z_cond, null])
    both_source = torch.cat([source_mean, torch.zeros_like(source_mean)])
    for t in scheduler.timesteps:
        latent_in = torch.cat([scheduler.scale_model_input(torch.cat([x, x]), t), both_source], dim=1)
        eps_c, eps_u = denoiser(latent_in, t.expand(len(latent_in)), both_cond).chunk(2)
        x = scheduler.step((1 + guidance) * eps_c - guidance * eps_u, t, x).prev_sample
    return vae.decode(x / scaling_factor).sample.clamp(-1, 1)


def image_grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Columns of images [B, 3, S, S] in [-1, 1] side by side, one row per sample -> uint8 [B·S, k·S, 3]."""
    tiles = torch.cat([torch.cat(list(column.float().cpu()), dim=1) for column in rows], dim=2)  # [3, B·S, k·S]
    return ((tiles.permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).round().astype(np.uint8)
