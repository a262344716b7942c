"""The trainable parts: a frozen VAE, an 8-channel UNet and the conditioning projection (paper §IV-A d).

Convention (Zero-1-to-3, cvlab-columbia/zero123 `ddpm.py` and kxhit/zero123-hf `train_zero1to3.py`):

- target latent x_0 = VAE.encode(target).latent_dist.sample() * scaling_factor (the diffusion variable);
- source latent = VAE.encode(source).latent_dist.mode(), **unscaled**, concatenated to the noisy
  target along channels: UNet input [B, 8, h, w] = [x_t ‖ source latent] (the paper's
  "image-to-image latent initialisation", Table IV). nvf keeps this convention so a Zero123-XL UNet
  starts from what it was trained on;
- context = projection(z_cond) as one token [B, 1, C] fed to every cross-attention layer (Eq. 7),
  z_cond = [CLIP(source) ‖ pose] (Eq. in §IV-A d: 512 + 12 = 524 for ViT-B/32).

Two projections (`--conditioning`):

- `paper`: a fresh two-layer MLP (Linear D_in -> C, SiLU, Linear C -> C) from [CLIP ‖ 12-D pose];
- `zero123`: the base model's `cc_projection` Linear(772 -> 768) on [CLIP ViT-L/14 ‖ 4-number T]
  kept as is, widened to [CLIP ‖ T ‖ 12-D pose] with zero-initialised columns for the 12 new inputs,
  so at step 0 the model is exactly the base model (`extend_linear`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from stages.core import io, models
from stages.core.errors import InputError, ModelError

log = logging.getLogger("nvf")

Conditioning = Literal["paper", "zero123"]
POSE_DIM = io.POSE_CODES["pose_code"]  # the 12-D [R_rel | T_rel] code
_PROJECTION_FOLDERS = ("cc_projection", "clip_camera_projection")
_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


class ConditioningProjection(nn.Module):
    """z_cond [B, D_in] -> context [B, 1, C] for the UNet's cross-attention.

    kind `paper`: Linear(D_in, C) -> SiLU -> Linear(C, C). kind `zero123`: one Linear(D_in, C)
    (the base's cc_projection widened by `extend_linear`). `spec` (JSON-able) rebuilds the module.
    """

    def __init__(self, kind: Conditioning, in_features: int, width: int, clip_dim: int, pose_dim: int) -> None:
        super().__init__()
        self.spec = {
            "kind": kind,
            "in_features": in_features,
            "width": width,
            "clip_dim": clip_dim,
            "pose_dim": pose_dim,
        }
        if kind == "paper":
            self.net: nn.Module = nn.Sequential(nn.Linear(in_features, width), nn.SiLU(), nn.Linear(width, width))
        elif kind == "zero123":
            self.net = nn.Linear(in_features, width)
        else:
            raise InputError(f"unknown conditioning '{kind}': use paper or zero123")

    @property
    def clip_dim(self) -> int:
        return int(self.spec["clip_dim"])

    def forward(self, z_cond_bd: torch.Tensor) -> torch.Tensor:
        return self.net(z_cond_bd)[:, None, :]  # [B, 1, C]


def extend_linear(base: nn.Linear, extra_in: int) -> nn.Linear:
    """A Linear with `extra_in` more inputs appended, their weight columns zero: same output as `base`
    on [x ‖ anything] at initialisation. Weights are copied (not shared)."""
    wider = nn.Linear(base.in_features + extra_in, base.out_features, bias=base.bias is not None)
    with torch.no_grad():
        wider.weight.zero_()
        wider.weight[:, : base.in_features] = base.weight
        if base.bias is not None:
            wider.bias.copy_(base.bias)
    return wider.to(base.weight.dtype)


def load_base_projection(source: str) -> nn.Linear:
    """The `cc_projection/` (kxhit layout) or `clip_camera_projection/` Linear of a Zero123 folder/hub repo."""
    folder = _base_folder(source)
    for name in _PROJECTION_FOLDERS:
        for weight in _WEIGHT_FILES:
            path = folder / name / weight
            if path.is_file():
                state = _read_weights(path)
                weight_t = next(v for k, v in state.items() if k.endswith("weight"))
                bias_t = next((v for k, v in state.items() if k.endswith("bias")), None)
                linear = nn.Linear(weight_t.shape[1], weight_t.shape[0], bias=bias_t is not None)
                with torch.no_grad():
                    linear.weight.copy_(weight_t)
                    if bias_t is not None:
                        linear.bias.copy_(bias_t)
                return linear
    raise InputError(
        f"--conditioning zero123 needs the base model's camera projection, and {source} has no "
        f"{' or '.join(_PROJECTION_FOLDERS)}/ folder: use --conditioning paper, or a Zero123 base"
    )


def _base_folder(source: str) -> Path:
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                source, allow_patterns=[f"{n}/*" for n in _PROJECTION_FOLDERS], local_files_only=models.hub_offline()
            )
        )
    except Exception as err:  # offline, missing repo, no network: one clear error
        raise ModelError(f"cannot fetch the camera projection of {source!r}: {err}") from err


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def expand_conv_in(unet: Any, in_channels: int = 8) -> None:
    """Give a 4-channel UNet (Stable Diffusion) the 8 inputs Zero123 needs, new channels zero-initialised
    (InstructPix2Pix's trick): the widened UNet ignores the source latent at step 0."""
    conv = unet.conv_in
    if conv.in_channels == in_channels:
        return
    if conv.in_channels > in_channels:
        raise ModelError(f"the base UNet takes {conv.in_channels} input channels, more than {in_channels}")
    wider = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
    with torch.no_grad():
        wider.weight.zero_()
        wider.weight[:, : conv.in_channels] = conv.weight
        wider.bias.copy_(conv.bias)
    unet.conv_in = wider.to(conv.weight.dtype)
    unet.register_to_config(in_channels=in_channels)
    log.info("widened the UNet's conv_in from %d to %d channels (new ones zero)", conv.in_channels, in_channels)


@dataclass
class Parts:
    """What training holds: trainable `unet` + `projection`, frozen `vae`, the DDPM `noise_scheduler`
    (Eq. 6, built from the base's scheduler config) and the base's ids for provenance."""

    unet: Any
    vae: Any
    projection: ConditioningProjection
    noise_scheduler: Any
    scheduler_config: dict[str, Any]
    base_model: str
    vae_fingerprint: str


def build_parts(
    base_model: str, conditioning: Conditioning, clip_dim: int, device: torch.device, *, projection_seed: int = 0
) -> Parts:
    """Load the base (UNet, VAE, scheduler) and build the projection for `conditioning`.

    The VAE is frozen (eval, no grad); UNet and projection stay float32 (mixed precision autocasts).
    """
    from diffusers import DDPMScheduler

    if conditioning not in io.CONDITIONING_LAYOUTS:
        raise InputError(f"unknown conditioning '{conditioning}': use paper or zero123")
    layout = io.CONDITIONING_LAYOUTS[conditioning]
    ref = models.ModelRef("diffusion", base_model)
    loaded = models.load_diffusion_parts(ref, device="cpu", dtype=torch.float32)
    unet, vae = loaded["unet"], loaded["vae"]
    expand_conv_in(unet, 8)
    if unet.config.out_channels != vae.config.latent_channels:
        raise ModelError(
            f"{base_model}: the UNet predicts {unet.config.out_channels} channels but the VAE's latent "
            f"has {vae.config.latent_channels}; pick a matching diffusers folder"
        )
    width = int(unet.config.cross_attention_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(projection_seed)
        if conditioning == "paper":
            projection = ConditioningProjection(
                "paper", io.z_cond_dim(clip_dim, layout), width, clip_dim, io.POSE_CODE_DIMS[layout]
            )
        else:  # the base's [CLIP ‖ 4] -> C, widened by the 12-D code ([CLIP ‖ 4 ‖ 12], `io.POSE_LAYOUTS`)
            base = load_base_projection(base_model)
            if base.out_features != width or base.in_features != io.z_cond_dim(clip_dim, "zero123"):
                raise InputError(
                    f"the base cc_projection maps {base.in_features} -> {base.out_features} numbers but this run "
                    f"has {clip_dim}-D CLIP embeddings + 4 (T) -> {width}: embed with the CLIP model the base was "
                    "trained on (Zero123-XL: ViT-L/14, `nvf embed --model ViT-L-14@openai`) or use "
                    "--conditioning paper"
                )
            projection = ConditioningProjection(
                "zero123", io.z_cond_dim(clip_dim, layout), width, clip_dim, io.POSE_CODE_DIMS[layout]
            )
            projection.net = extend_linear(base, POSE_DIM)
    vae.requires_grad_(False)
    scheduler_config = dict(loaded["scheduler"].config)
    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    return Parts(
        unet.to(device).train(),
        vae.to(device).eval(),
        projection.to(device).train(),
        noise_scheduler,
        scheduler_config,
        base_model,
        vae_fingerprint(vae),
    )


def vae_fingerprint(vae: nn.Module) -> str:
    """A short id of the VAE's weights (config + names, shapes, sums and a strided sample of every tensor)."""
    digest = hashlib.sha256(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().float().cpu().flatten()
        digest.update(f"{name}{tuple(tensor.shape)}{float(flat.sum()):.9e}".encode())
        digest.update(flat[:: max(1, flat.numel() // 64)].numpy().tobytes())
    return digest.hexdigest()[:16]


class Denoiser(nn.Module):
    """projection + UNet as one module (what DDP wraps): ε̂ = UNet([x_t ‖ source], t, projection(z_cond))."""

    def __init__(self, unet: nn.Module, projection: ConditioningProjection) -> None:
        super().__init__()
        self.unet = unet
        self.projection = projection

    def forward(self, latent_in_b8hw: torch.Tensor, timesteps_b: torch.Tensor, z_cond_bd: torch.Tensor) -> torch.Tensor:
        context = self.projection(z_cond_bd)  # [B, 1, C]
        return self.unet(latent_in_b8hw, timesteps_b, encoder_hidden_states=context).sample  # [B, 4, h, w]
