"""nvf train's step vs a bare UNet training step on the same batch, and the data path's throughput.

- candidate: one step of `stages.train` as the loop runs it: person-aware sampler -> batch from the
  (warm) latent cache -> noise/CFG-dropout draws -> projection + UNet forward, ε-MSE -> backward,
  clip, AdamW, lr schedule;
- baseline: `unet(x, t, context).sample` MSE -> backward -> AdamW on tensors already on the device
  (the same shapes), i.e. what any trainer must pay. A forward+backward-only figure is in `extra`.
- data: batches per second of sampler + cache gather + draws alone (pairs/s in `extra`).

UNet: on CUDA the Zero123-XL / SD-1.x config (320-640-1280-1280, cross-attention 768, 8 inputs) at
256² (latent 32²), batch 8, bf16 and fp16 autocast, random weights, then the largest power-of-two
bf16 batch that fits with its it/s; model FLOP utilisation = forward+backward FLOPs (torch's
FlopCounterMode) / step time / the card's dense bf16 peak. On CPU a small 2-level UNet at 128 px
(batch 4, fp32) so the run stays short. The latent cache is filled in memory with random moments
(as after epoch 1).
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import Result, Side, compare

PERSONS, VIEWS = 8, 13
GPU_LATENT, CPU_LATENT = 32, 16  # 256 px and 128 px through a /8 VAE
DATA_BATCHES = 200  # batches timed for the data path alone


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


BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense bf16 tensor-core peak by NVIDIA's datasheets (SXM)


def run() -> list[Result]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = device.type == "cuda"
    if full:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    tmp = Path(tempfile.mkdtemp(prefix="nvf-bench-train-"))
    try:
        if not full:
            return [_step_vs_bare(_Bench(tmp, device, full, "fp32", 4, persons=PERSONS), repeats=5)]
        results = []
        for precision in ("bf16", "fp16"):
            bench = _Bench(tmp, device, full, precision, 8, persons=PERSONS)
            results.append(_step_vs_bare(bench, repeats=10))
            del bench
            torch.cuda.empty_cache()
        results.append(_largest_batch(tmp, device))
        return results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Bench:
    """One training setup: the nvf step and the bare UNet step on the same shapes."""

    def __init__(self, tmp: Path, device: torch.device, full: bool, precision: str, batch_size: int, persons: int,
                 unet: torch.nn.Module | None = None) -> None:  # fmt: skip
        from diffusers import DDPMScheduler

        from stages.core import io
        from stages.train import data, model, step

        self.device, self.full, self.precision, self.batch_size = device, full, precision, batch_size
        latent = GPU_LATENT if full else CPU_LATENT
        paths = [io.write_image(tmp / f"{i:04d}.png", np.full((4, 4, 3), i % 256, np.uint8))
                 for i in range(persons * VIEWS)]  # fmt: skip
        cache = data.LatentCache(torch.nn.Identity(), "bench", latent * 8, device, None, capacity=100_000)
        g = torch.Generator().manual_seed(0)
        for p in paths:  # warm cache: distinct bytes per image row
            cache.store.put(cache.key(p), torch.randn(8, latent, latent, generator=g).numpy())
        src, tgt, subj = [], [], []
        for person in range(persons):
            for i in range(VIEWS):
                for j in (i - 1, i + 1):
                    if 0 <= j < VIEWS:
                        src.append(person * VIEWS + i)
                        tgt.append(person * VIEWS + j)
                        subj.append(person)
        src, tgt, subj = np.array(src), np.array(tgt), np.array(subj)
        az = np.tile(np.linspace(-90, 90, VIEWS), persons).astype(np.float32)
        z = np.random.default_rng(0).normal(size=(len(src), 524)).astype(np.float32)
        table = data.PairTable(np.arange(len(src)), src, tgt, subj, az[src], az[tgt], z)
        sampler = data.PersonAwareSampler(table, batch_size, steps_per_person=8)
        if unet is None:
            with torch.device(device):  # random init of 860 M parameters is slow on a CPU
                unet = _unet(full)
        self.unet = unet
        self.unet.train()
        width = int(self.unet.config.cross_attention_dim)
        projection = model.ConditioningProjection("paper", 524, width, 512, 12).to(device)
        denoiser = model.Denoiser(self.unet, projection)
        scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
        optimizer = step.make_optimizer(self.unet, projection, 2e-5, 10.0, 0.02)
        lr_sched = step.cosine_with_warmup(optimizer, 2000, 50_000)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
        params = list(denoiser.parameters())
        dropout = step.Dropout()
        counter = iter(range(10**9))

        def nvf_step() -> None:
            n = next(counter)
            _, positions = sampler.next()
            batch = data.make_batch(table, positions, cache, paths.__getitem__, 0, batch_size)
            draws = step.draw_noise(0, n, batch, 1000)
            inputs = step.model_inputs(batch, draws, scheduler, 0.18215, 512, dropout, device)
            loss = step.diffusion_loss(denoiser, inputs, device, precision)
            step.optimizer_step(loss, params, optimizer, lr_sched, self.scaler, 1.0)
            self.sync()

        def data_only(k: int) -> None:
            _, positions = sampler.next()
            batch = data.make_batch(table, positions, cache, paths.__getitem__, 0, batch_size)
            step.draw_noise(0, k, batch, 1000)

        self.nvf_step, self.data_only = nvf_step, data_only
        self.x = torch.randn(batch_size, 8, latent, latent, device=device)
        self.t = torch.randint(0, 1000, (batch_size,), device=device)
        self.ctx = torch.randn(batch_size, 1, width, device=device)
        self.eps = torch.randn(batch_size, 4, latent, latent, device=device)
        self.bare_opt = torch.optim.AdamW(self.unet.parameters(), lr=2e-5, weight_decay=0.02)
        self.latent = latent

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def bare(self, optimise: bool) -> None:
        """`unet(x, t, context)` MSE -> backward (-> AdamW): what any trainer pays for this batch."""
        from stages.train import step

        with step.autocast(self.device, self.precision):
            pred = self.unet(self.x, self.t, encoder_hidden_states=self.ctx).sample
        loss = torch.nn.functional.mse_loss(pred.float(), self.eps)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if optimise:
            if self.scaler is not None:
                self.scaler.step(self.bare_opt)
                self.scaler.update()
            else:
                self.bare_opt.step()
        self.bare_opt.zero_grad(set_to_none=True)
        self.sync()

    def flops_per_step(self) -> float:
        """FLOPs of one bare forward + backward (torch's FlopCounterMode: matmuls, convolutions, attention)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.bare(False)
        return float(counter.get_total_flops())


def _step_vs_bare(bench: _Bench, repeats: int) -> Result:
    """nvf's step vs the bare UNet step (and vs forward + backward alone) at the bench's batch."""
    if bench.full:
        torch.cuda.reset_peak_memory_stats()
    result = compare(f"train step vs bare UNet step ({bench.precision}, batch {bench.batch_size})",
                     Side("nvf train step", bench.nvf_step), Side("bare UNet fwd+bwd+AdamW", lambda: bench.bare(True)),
                     repeats=repeats, warmup=2, goal="ratio <= 1.10")  # fmt: skip
    fb = compare("fwd+bwd", Side("bare fwd+bwd", lambda: bench.bare(False)),
                 Side("bare fwd+bwd", lambda: bench.bare(False)), repeats=repeats, warmup=1)  # fmt: skip
    data_start, n_batches = time.perf_counter(), DATA_BATCHES
    for k in range(n_batches):
        bench.data_only(k)
    data_s = (time.perf_counter() - data_start) / n_batches
    result.extra = {
        "device": str(torch.cuda.get_device_name(0) if bench.full else "cpu"),
        "unet_params_M": sum(p.numel() for p in bench.unet.parameters()) / 1e6,
        "batch": bench.batch_size,
        "resolution": bench.latent * 8,
        "precision": bench.precision,
        "it_per_s": 1.0 / result.candidate_s,
        "bare_fwd_bwd_s": fb.candidate_s,
        "ratio_vs_fwd_bwd": result.candidate_s / fb.candidate_s,
        "data_batch_ms": data_s * 1e3,
        "data_pairs_per_s": bench.batch_size / data_s,
    }
    if bench.full:
        result.extra["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        result.extra.update(_utilisation(bench, result.candidate_s))
    return result


def _utilisation(bench: _Bench, step_s: float) -> dict:
    """Model FLOP utilisation of nvf's step: forward + backward FLOPs / step time / the card's bf16 peak."""
    flops = bench.flops_per_step()
    name = torch.cuda.get_device_name(0)
    peak = next((tflops for key, tflops in BF16_PEAK_TFLOPS.items() if key in name), None)
    figures = {"fwd_bwd_tflop_per_step": flops / 1e12, "achieved_tflops": flops / step_s / 1e12}
    if peak is not None:
        figures.update(bf16_peak_tflops=peak, mfu=flops / step_s / (peak * 1e12))
    return figures


def _largest_batch(
    tmp: Path, device: torch.device, start: int = 8, limit: int = 512, precision: str = "bf16"
) -> Result:
    """The largest power-of-two batch (from `start`, at most `limit`) whose nvf step runs, and its it/s."""
    with torch.device(device):
        unet = _unet(True)
    fits, size, out_of_memory_at = 0, start, None

    def attempt(batch_size: int) -> _Bench:
        bench = _Bench(tmp, device, True, precision, batch_size, persons=max(PERSONS, batch_size // 8), unet=unet)
        bench.nvf_step()
        bench.nvf_step()
        return bench

    while size <= limit:
        ran = False
        try:
            attempt(size)
            ran = True
        except torch.cuda.OutOfMemoryError:
            out_of_memory_at = size
        gc.collect()  # the attempt's optimizer state and activations, before the next one
        torch.cuda.empty_cache()
        if not ran:
            break
        fits, size = size, size * 2
    if not fits:
        raise RuntimeError(f"the training step does not fit at batch {start}")
    bench = attempt(fits)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        bench.nvf_step()
        times.append(time.perf_counter() - start)
    step_s = sorted(times)[1]
    extra = {"batch": fits, "out_of_memory_at": out_of_memory_at, "tried_up_to": limit, "it_per_s": 1 / step_s,
             "samples_per_s": fits / step_s, "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30,
             **_utilisation(bench, step_s)}  # fmt: skip
    return Result(f"train step at the largest batch ({precision}, {fits})", "nvf train step", "(figures only)", step_s,
                  step_s, 3, goal="figures", extra=extra)  # fmt: skip
