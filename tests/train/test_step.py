from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from stages.train import data, step


def _batch(size: int, offset: int = 0, global_size: int | None = None) -> data.Batch:
    g = torch.Generator().manual_seed(offset)
    moments = torch.cat([torch.randn(size, 4, 4, 4, generator=g), torch.full((size, 4, 4, 4), -4.0)], 1)
    z = torch.arange(size * 7, dtype=torch.float32).reshape(size, 7) + 1
    return data.Batch(moments, moments.clone(), z, offset, global_size or size)


def test_dropout_splits_the_unit_interval_5_5_5():
    u = (torch.arange(10_000) + 0.5) / 10_000
    drop_clip, drop_image = step.dropout_masks(u, step.Dropout(0.05, 0.05, 0.05))
    assert int((drop_clip & ~drop_image).sum()) == 500  # CLIP only
    assert int((drop_image & ~drop_clip).sum()) == 500  # image only
    assert int((drop_clip & drop_image).sum()) == 500  # both
    clip_only, image_only = step.dropout_masks(u, step.Dropout(0.1, 0.0, 0.0))
    assert int(clip_only.sum()) == 1000 and int(image_only.sum()) == 0


def test_model_inputs_follow_eq6_and_drop_what_the_masks_say():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    batch = _batch(6)
    draws = step.draw_noise(0, 3, batch, 1000)
    draws.uniform = torch.tensor([0.01, 0.07, 0.12, 0.5, 0.9, 0.02])  # clip, both, image, -, -, clip
    latent_in, t, z, target = step.model_inputs(
        batch, draws, scheduler, 0.18215, clip_dim=4, dropout=step.Dropout(), device=torch.device("cpu")
    )
    mean = batch.target_moments[:, :4]
    x0 = (mean + torch.exp(torch.tensor(-2.0)) * draws.latent_eps) * 0.18215
    abar = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(latent_in[:, :4], abar.sqrt() * x0 + (1 - abar).sqrt() * draws.noise)
    assert torch.equal(target, draws.noise)
    kept_source = torch.tensor([1, 0, 0, 1, 1, 1], dtype=torch.bool)  # unscaled mode where not dropped
    assert torch.equal(latent_in[kept_source, 4:], batch.source_moments[kept_source, :4])
    assert torch.all(latent_in[~kept_source, 4:] == 0)
    kept_clip = torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.bool)
    assert torch.equal(z[kept_clip], batch.z_cond[kept_clip]) and torch.all(z[~kept_clip, :4] == 0)
    assert torch.equal(z[:, 4:], batch.z_cond[:, 4:])  # the pose is never dropped


def test_a_rank_draws_its_slice_of_the_global_batch():
    whole = step.draw_noise(7, 11, _batch(4), 1000)
    halves = [step.draw_noise(7, 11, _batch(2, offset=o, global_size=4), 1000) for o in (0, 2)]
    for name in ("timesteps", "noise", "latent_eps", "uniform"):
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(whole, name))
    assert not torch.equal(step.draw_noise(7, 12, _batch(4), 1000).noise, whole.noise)


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    scheduler = step.cosine_with_warmup(optimizer, warmup_steps=4, total_steps=12)
    rates = []
    for _ in range(12):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([5e-6, 1e-5, 1.5e-5, 2e-5])
    assert rates[4] == pytest.approx(2e-5) and rates[8] == pytest.approx(1e-5) and rates[11] < 1e-6
    assert all(a >= b for a, b in zip(rates[4:], rates[5:], strict=False))


def test_projection_learns_at_the_multiplied_rate_and_gradients_are_clipped():
    unet, projection = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    optimizer = step.make_optimizer(unet, projection, 2e-5, 10.0, 0.02)
    assert [g["lr"] for g in optimizer.param_groups] == [2e-5, pytest.approx(2e-4)]
    assert all(g["weight_decay"] == 0.02 for g in optimizer.param_groups)
    params = [*unet.parameters(), *projection.parameters()]
    loss = 1000 * (unet(torch.ones(1, 3)).sum() + projection(torch.ones(1, 3)).sum())
    sched = step.cosine_with_warmup(optimizer, 0, 10)
    norm = step.optimizer_step(loss, params, optimizer, sched, None, max_grad_norm=1.0)
    assert norm > 1.0 and all(p.grad is None for p in params)
