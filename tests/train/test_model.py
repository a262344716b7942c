from __future__ import annotations

import torch

from stages.core import models
from stages.train import model
from tests.train.fixtures import tiny_zero123_base


def test_extend_linear_reproduces_the_base_whatever_the_new_inputs():
    torch.manual_seed(0)
    base = torch.nn.Linear(772, 768)
    wider = model.extend_linear(base, 12)
    x = torch.randn(5, 772)
    pose = torch.randn(5, 12) * 10
    assert wider.in_features == 784 and torch.equal(wider.weight[:, 772:], torch.zeros(768, 12))
    torch.testing.assert_close(wider(torch.cat([x, pose], 1)), base(x), rtol=0, atol=1e-5)
    wider.weight.data[:, 0] += 1  # a copy, not a view of the base
    assert not torch.equal(wider.weight[:, :772], base.weight)


def test_zero123_conditioning_starts_as_the_base_projection(tmp_path):
    folder = tiny_zero123_base(tmp_path / "base", clip_dim=512)
    parts = model.build_parts(str(folder), "zero123", 512, torch.device("cpu"))
    base = model.load_base_projection(str(folder))
    z_clip_t = torch.randn(3, 516)
    z_cond = torch.cat([z_clip_t, torch.randn(3, 12)], 1)  # [CLIP ‖ T ‖ 12-D pose]
    assert parts.projection.spec == {
        "kind": "zero123",
        "in_features": 528,
        "width": 32,
        "clip_dim": 512,
        "pose_dim": 16,
    }
    assert torch.equal(parts.projection(z_cond), base(z_clip_t)[:, None, :])
    paper = model.build_parts(str(folder), "paper", 512, torch.device("cpu"))
    assert paper.projection.spec["in_features"] == 524 and paper.projection(torch.randn(2, 524)).shape == (2, 1, 32)
    assert not any(p.requires_grad for p in paper.vae.parameters())
    assert type(paper.noise_scheduler).__name__ == "DDPMScheduler"


def test_a_4_channel_unet_is_widened_with_zero_weights():
    from diffusers import UNet2DConditionModel

    folder = models.resolve_model("diffusion", "tiny").id
    cfg = dict(UNet2DConditionModel.load_config(folder, subfolder="unet"))
    cfg["in_channels"] = 4
    unet = UNet2DConditionModel.from_config(cfg).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 1, 32)
    before = unet(x, t, encoder_hidden_states=ctx).sample
    model.expand_conv_in(unet, 8)
    after = unet(torch.cat([x, torch.randn(2, 4, 8, 8)], 1), t, encoder_hidden_states=ctx).sample
    assert unet.config.in_channels == 8
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
