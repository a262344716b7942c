"""nvf sample's batched classifier-free guidance vs the two-pass loop, same model, views and noise.

Model: a Zero123-shaped UNet with random weights built locally (no download), small enough for a
CPU yet big enough that the UNet forward dominates the step: 8 -> 4 channels, block widths
(64, 128, 256), two layers per block, cross-attention in the first two levels (width 256, 8 heads
of 32), a 32x32 latent (256 px through a /8 VAE); about 19 M parameters. The VAE is never run
(denoising only). 4 views, DDIM 5 steps, w = 5.

- candidate: `stages.sample.denoise` (cond and uncond in one UNet call on 2B rows);
- baseline: the same loop with `two_pass=True` (one UNet call per branch, B rows each).
The results agree to float rounding (checked here too: max |difference| is reported).

On CUDA a second result runs Zero123-XL's size (SD 1.x UNet with 8 inputs, 860 M parameters, and
SD's VAE, random weights, fp16) on 13 target views, DDIM 30 steps: batched vs two-pass, and
`sample_views` end to end (VAE encode, denoise at the automatic batch size, decode) in views/s.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import torch

from benchmarks.harness import LogCatcher, Result, Side, compare
from stages.core import io

N_VIEWS = 4
STEPS = 5
GPU_VIEWS, GPU_STEPS = 13, 30  # the CUDA run: Table III's 30 DDIM steps over a 13-camera ring
LATENT = 32
CLIP_DIM, POSE_DIM = 512, io.POSE_CODE_DIMS["paper"]


def build_model(full: bool = False, device: torch.device | str = "cpu") -> SimpleNamespace:
    """What `denoise` and `sample_views` read of a TrainedModel: unet, projection, vae, scheduler
    config, scaling, null_z_cond. `full`: Zero123-XL's UNet (Stable Diffusion 1.x's, 8 input
    channels, cross-attention 768: 860 M parameters) and SD's VAE, built on `device`; else the small
    UNet of the module docstring and a narrow VAE (also /8)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from stages.train.model import ConditioningProjection

    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: random init of 860 M parameters is slow on a CPU
        if full:
            unet = UNet2DConditionModel(sample_size=LATENT, in_channels=8, out_channels=4, cross_attention_dim=768,
                                        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                                        attention_head_dim=8).eval()  # fmt: skip
            vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
                                down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4).eval()  # fmt: skip
        else:
            unet = UNet2DConditionModel(
                sample_size=LATENT, in_channels=8, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
            ).eval()  # fmt: skip
            vae = AutoencoderKL(block_out_channels=(16,) * 4, latent_channels=4, norm_num_groups=8,
                                down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4).eval()  # fmt: skip
        width = int(unet.config.cross_attention_dim)
        projection = ConditioningProjection("paper", CLIP_DIM + POSE_DIM, width, CLIP_DIM, POSE_DIM).eval()
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}  # fmt: skip
    model = SimpleNamespace(unet=unet, projection=projection, vae=vae, scheduler_config=config, scaling_factor=0.18215)
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
    results = [result]
    if device.type == "cuda":
        del model
        results.append(_full_size_on_gpu(device))
    return results


def _full_size_on_gpu(device: torch.device) -> Result:
    """Zero123-XL's size on the GPU: 13 target views (a ring of 13 cameras), DDIM 30 steps, w = 5,
    fp16 (sample's default on CUDA): batched CFG vs two-pass, and `sample_views` end to end (VAE
    encode, denoising at the automatic batch size, VAE decode) in views/s with its peak memory."""
    from stages import sample

    model = build_model(full=True, device=device)
    model.unet.half()
    model.vae.half()
    g = torch.Generator().manual_seed(0)
    source = torch.randn(1, 4, LATENT, LATENT, generator=g).to(device)
    z_cond = torch.randn(GPU_VIEWS, CLIP_DIM + POSE_DIM, generator=g).to(device)
    cfg = sample.Config(steps=GPU_STEPS, guidance=5.0)

    def denoise(two_pass: bool) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(k) for k in range(1, GPU_VIEWS + 1)]
        out = sample.denoise(model, source, z_cond, generators, cfg, two_pass=two_pass)
        torch.cuda.synchronize()
        return out

    difference = float((denoise(False) - denoise(True)).abs().max())
    pixels = torch.rand(3, LATENT * 8, LATENT * 8, generator=g) * 2 - 1
    seeds = list(range(1, GPU_VIEWS + 1))
    sample.sample_views(model, pixels, z_cond, seeds, cfg, device)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    with LogCatcher() as caught:
        start = time.perf_counter()
        sample.sample_views(model, pixels, z_cond, seeds, cfg, device)
        torch.cuda.synchronize()
        end_to_end_s = time.perf_counter() - start
    peak_gib = torch.cuda.max_memory_allocated() / 2**30
    result = compare(
        "sample-cfg-zero123xl-gpu", Side("batched CFG (one 2B forward)", lambda: denoise(False)),
        Side("two-pass CFG (two B forwards)", lambda: denoise(True)), repeats=3, warmup=1, goal="<= 0.6",
        extra={"device": torch.cuda.get_device_name(device), "views": GPU_VIEWS, "steps": GPU_STEPS,
               "latent": LATENT, "precision": "fp16", "unet_params_M": sum(p.numel() for p in model.unet.parameters()) / 1e6,
               "max_abs_diff": difference, "sample_views_per_s": GPU_VIEWS / end_to_end_s,
               "sample_views_batch": caught.batch_sizes(), "sample_views_peak_gib": peak_gib},
    )  # fmt: skip
    result.extra["denoise_views_per_s"] = GPU_VIEWS / result.candidate_s
    result.extra.update(_where_the_time_goes(model, source, z_cond, device))
    return result


def _where_the_time_goes(model: SimpleNamespace, source: torch.Tensor, z_cond: torch.Tensor,
                         device: torch.device) -> dict[str, float]:  # fmt: skip
    """One guided UNet evaluation (one DDIM step's model call), batched and two-pass, under
    torch.profiler: wall ms per step vs the GPU's summed kernel ms per step. Kernel time close to
    wall time means the GPU is busy (batching can only save the kernels' own fixed costs); a large
    gap means launch overhead, which the batched call pays once instead of twice."""
    from torch.profiler import ProfilerActivity, profile

    from stages import sample

    x = torch.randn(len(z_cond), 4, LATENT, LATENT, device=device)
    t = torch.tensor(500, device=device)
    source_b = source.expand(len(z_cond), -1, -1, -1)
    with torch.no_grad():
        context_c = model.projection(z_cond)
        context_u = model.projection(model.null_z_cond(z_cond))
    figures = {}
    for label, two_pass in (("batched", False), ("two_pass", True)):

        def step(two_pass: bool = two_pass) -> None:
            with torch.no_grad():
                sample.guided_noise(model, x, t, source_b, context_c, context_u, 5.0, two_pass=two_pass)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        steps = 5 if device.type == "cuda" else 1
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        kernels_us = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
        figures[f"{label}_step_wall_ms"] = wall / steps * 1e3
        figures[f"{label}_step_gpu_kernel_ms"] = kernels_us / steps / 1e3
    return figures
