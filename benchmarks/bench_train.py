"""nvf train's step vs a bare UNet training step on the same batch, and the data path's throughput.

- candidate: one step of `stages.train` as the loop runs it: person-aware sampler -> batch from the
  (warm) latent cache -> noise/CFG-dropout draws -> projection + UNet forward, ε-MSE -> backward,
  clip, AdamW, lr schedule;
- baseline: `unet(x, t, context).sample` MSE -> backward -> AdamW on tensors already on the device
  (the same shapes), i.e. what any trainer must pay. A forward+backward-only figure is in `extra`.
- data: batches per second of sampler + cache gather + draws alone (pairs/s in `extra`).

UNet: on CUDA the Zero123-XL / SD-1.x config (320-640-1280-1280, cross-attention 768, 8 inputs) at
256² (latent 32²), batch 8, fp16 autocast, random weights; on CPU a small 2-level UNet at 64 px so
the run stays short. The latent cache is filled in memory with random moments (as after epoch 1).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import Result, Side, compare

PERSONS, VIEWS = 8, 13


def _unet(full: bool):
    from diffusers import UNet2DConditionModel

    if full:
        return UNet2DConditionModel(
            sample_size=32,
            in_channels=8,
            out_channels=4,
            cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            attention_head_dim=8,
        )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=8,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=64,
        attention_head_dim=8,
    )


def run() -> list[Result]:
    from diffusers import DDPMScheduler

    from stages.core import io
    from stages.train import data, model, step

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = device.type == "cuda"
    batch_size, latent = (8, 32) if full else (4, 16)
    precision = "fp16" if full else "fp32"
    if full:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tmp = Path(tempfile.mkdtemp(prefix="nvf-bench-train-"))
    try:
        paths = [
            io.write_image(tmp / f"{i:04d}.png", np.full((4, 4, 3), i % 256, np.uint8)) for i in range(PERSONS * VIEWS)
        ]
        cache = data.LatentCache(torch.nn.Identity(), "bench", latent * 8, device, None, capacity=10_000)
        g = torch.Generator().manual_seed(0)
        for p in paths:  # warm cache: distinct bytes per image row
            cache.memory[cache.key(p)] = torch.randn(8, latent, latent, generator=g)
        src, tgt, subj = [], [], []
        for person in range(PERSONS):
            for i in range(VIEWS):
                for j in (i - 1, i + 1):
                    if 0 <= j < VIEWS:
                        src.append(person * VIEWS + i)
                        tgt.append(person * VIEWS + j)
                        subj.append(person)
        src, tgt, subj = np.array(src), np.array(tgt), np.array(subj)
        az = np.tile(np.linspace(-90, 90, VIEWS), PERSONS).astype(np.float32)
        z = np.random.default_rng(0).normal(size=(len(src), 524)).astype(np.float32)
        table = data.PairTable(np.arange(len(src)), src, tgt, subj, az[src], az[tgt], z)
        sampler = data.PersonAwareSampler(table, batch_size, steps_per_person=8)
        image_path = paths.__getitem__

        unet = _unet(full).to(device).train()
        width = int(unet.config.cross_attention_dim)
        projection = model.ConditioningProjection("paper", 524, width, 512, 12).to(device)
        denoiser = model.Denoiser(unet, projection)
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
        optimizer = step.make_optimizer(unet, projection, 2e-5, 10.0, 0.02)
        lr_sched = step.cosine_with_warmup(optimizer, 2000, 50_000)
        scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        params = list(denoiser.parameters())
        dropout = step.Dropout()
        counter = iter(range(10**9))

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        def nvf_step() -> None:
            n = next(counter)
            _, positions = sampler.next()
            batch = data.make_batch(table, positions, cache, image_path, 0, batch_size)
            draws = step.draw_noise(0, n, batch, 1000)
            inputs = step.model_inputs(batch, draws, scheduler, 0.18215, 512, dropout, device)
            loss = step.diffusion_loss(denoiser, inputs, device, precision)
            step.optimizer_step(loss, params, optimizer, lr_sched, scaler, 1.0)
            sync()

        x = torch.randn(batch_size, 8, latent, latent, device=device)
        t = torch.randint(0, 1000, (batch_size,), device=device)
        ctx = torch.randn(batch_size, 1, width, device=device)
        eps = torch.randn(batch_size, 4, latent, latent, device=device)
        bare_opt = torch.optim.AdamW(unet.parameters(), lr=2e-5, weight_decay=0.02)

        def bare(optimise: bool) -> None:
            with step.autocast(device, precision):
                pred = unet(x, t, encoder_hidden_states=ctx).sample
            loss = torch.nn.functional.mse_loss(pred.float(), eps)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if optimise:
                if scaler is not None:
                    scaler.step(bare_opt)
                    scaler.update()
                else:
                    bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)
            sync()

        repeats = 10 if full else 5
        if full:
            torch.cuda.reset_peak_memory_stats()
        result = compare(
            "train step vs bare UNet step",
            Side("nvf train step", nvf_step),
            Side("bare UNet fwd+bwd+AdamW", lambda: bare(True)),
            repeats=repeats,
            warmup=2,
            goal="ratio <= 1.10",
        )
        fb = compare(
            "fwd+bwd",
            Side("bare fwd+bwd", lambda: bare(False)),
            Side("bare fwd+bwd", lambda: bare(False)),
            repeats=repeats,
            warmup=1,
        )
        data_start, n_batches = time.perf_counter(), 200
        for k in range(n_batches):
            _, positions = sampler.next()
            batch = data.make_batch(table, positions, cache, image_path, 0, batch_size)
            step.draw_noise(0, k, batch, 1000)
        data_s = (time.perf_counter() - data_start) / n_batches
        result.extra = {
            "device": str(torch.cuda.get_device_name(0) if full else "cpu"),
            "unet_params_M": sum(p.numel() for p in unet.parameters()) / 1e6,
            "batch": batch_size,
            "resolution": latent * 8,
            "precision": precision,
            "it_per_s": 1.0 / result.candidate_s,
            "bare_fwd_bwd_s": fb.candidate_s,
            "ratio_vs_fwd_bwd": result.candidate_s / fb.candidate_s,
            "data_batch_ms": data_s * 1e3,
            "data_pairs_per_s": batch_size / data_s,
        }
        if full:
            result.extra["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        return [result]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
