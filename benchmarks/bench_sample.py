"""nvf sample's batched classifier-free guidance vs the two-pass loop, same model, views and noise.

Model: a Zero123-shaped UNet with random weights built locally (no download), small enough for a
CPU yet big enough that the UNet forward dominates the step: 8 -> 4 channels, block widths
(64, 128, 256), two layers per block, cross-attention in the first two levels (width 256, 8 heads
of 32), a 32x32 latent (256 px through a /8 VAE); about 19 M parameters. The VAE is never run
(denoising only). 4 views, DDIM 5 steps, w = 5.

- candidate: `stages.sample.denoise` (cond and uncond in one UNet call on 2B rows);
- baseline: the same loop with `two_pass=True` (one UNet call per branch, B rows each).
The results agree to float rounding (checked here too: max |difference| is reported).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from benchmarks.harness import Result, Side, compare

N_VIEWS = 4
STEPS = 5
LATENT = 32
CLIP_DIM, POSE_DIM = 512, 12


def build_model() -> SimpleNamespace:
    """What `denoise` reads of a TrainedModel: unet, projection, scheduler config, scaling, null_z_cond."""
    from diffusers import UNet2DConditionModel

    from stages.train.model import ConditioningProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=8, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
    ).eval()  # fmt: skip
    projection = ConditioningProjection("paper", CLIP_DIM + POSE_DIM, 256, CLIP_DIM, POSE_DIM).eval()
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}  # fmt: skip
    model = SimpleNamespace(unet=unet, projection=projection, scheduler_config=config, scaling_factor=0.18215)
    model.null_z_cond = lambda z: torch.cat([torch.zeros_like(z[:, :CLIP_DIM]), z[:, CLIP_DIM:]], dim=1)
    return model


def run() -> list[Result]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from stages import sample
    from stages.core import batching

    device = batching.choose_device("auto")
    model = build_model()
    model.unet.to(device)
    model.projection.to(device)
    g = torch.Generator().manual_seed(0)
    source = torch.randn(1, 4, LATENT, LATENT, generator=g).to(device)
    z_cond = torch.randn(N_VIEWS, CLIP_DIM + POSE_DIM, generator=g).to(device)
    cfg = sample.Config(steps=STEPS, guidance=5.0)

    def generators() -> list[torch.Generator]:
        return [torch.Generator().manual_seed(k) for k in range(1, N_VIEWS + 1)]

    def batched() -> torch.Tensor:
        out = sample.denoise(model, source, z_cond, generators(), cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    def two_pass() -> torch.Tensor:
        out = sample.denoise(model, source, z_cond, generators(), cfg, two_pass=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    difference = float((batched() - two_pass()).abs().max())
    n_params = sum(p.numel() for p in model.unet.parameters())
    result = compare(
        "sample-cfg", Side("batched CFG (one 2B forward)", batched), Side("two-pass CFG (two B forwards)", two_pass),
        repeats=3, warmup=1, goal="<= 0.6",
        extra={"device": str(device), "views": N_VIEWS, "steps": STEPS, "latent": LATENT,
               "unet_params_M": n_params / 1e6, "max_abs_diff": difference, "threads": torch.get_num_threads()},
    )  # fmt: skip
    return [result]
