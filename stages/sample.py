"""Stage `sample`: novel views of one photo from a trained view-conditioned model (paper Eq. 9, Tables III-IV).

Input: a run folder (or checkpoint folder) of `nvf train` and one photo (any size; framed by `crop`,
`stages.input_crop`: by default a square around the face found by dlib, scaled to the training
framing, else the centre square; then resized to the model's resolution as in training,
`stages.train.data.preprocess_image`; an optional mask composites the background onto white first).
sample.json records the crop box and the photo's own intrinsics under the views' camera model. Sampling straight from a base model (Zero123-XL
without an nvf run, whose conditioning differs) is not supported.

Cameras (`stages.core.geometry` rig frame: world up = -y, the subject at the origin, azimuth 0 =
frontal, positive azimuth toward +x, positive elevation up): the input is assumed frontal (azimuth 0,
elevation 0) unless `input_azimuth`/`input_elevation` say otherwise (a Multi-PIE file name gives its
camera's angles). Targets are the grid `azimuths x elevations` (elevation-major) of an orbit preset:
`ring13` (Multi-PIE ring, -90..+90 every 15°), `16` and `36` (even 360°), `6x16` (elevations -10..40
every 10° x 16 azimuths, as in P1 of related-work.md); `--azimuths`/`--elevations` replace either
list. A target at the input's own camera is not generated: the input photo is that view (frame 0).
All cameras sit at `radius` from the subject; intrinsics from `fov_deg`, default 49.1° = 2 atan(16/35),
the camera Zero123's training renders use (a model fine-tuned on `nvf synth` data saw 42°: pass it).

Pose codes: as in training (`stages.triplets`), z_cond = [CLIP(photo) ‖ pose], pose = the 12-D
flatten([R_rel | T_rel]) (conditioning `paper`) or [Zero123's 4 numbers ‖ 12-D] (`zero123`), with
translations in the *normalised* frame of training: there every capture's T was scaled so that the
mean camera distance from the centroid of the centres is 1. What the model saw is thus a camera
distance ρ to the subject in those units; the sampler scales T by ρ / radius. ρ comes from
`pose_radius` if given, else from the run's model.json (train writes the median over its pairs of
the distance implied by each code, `geometry.pose_code_radius`), else the same estimate from the
run's triplet index, else the Multi-PIE layout's value (15 cameras on a sphere: ρ = 1.298).

Sampling (the loop in `denoise` is the whole algorithm): scheduler `ddim` (default, Table III: 30
steps), `ddpm`, `dpm++` (DPMSolverMultistepScheduler) or `euler` (EulerDiscreteScheduler), all from
the run's scheduler config. Guidance, Eq. 9: ε̂ = (1 + w) ε(x_t, c) - w ε(x_t, ∅), w = 5 (Table III);
this is diffusers' ε_∅ + s (ε_c - ε_∅) with s = 1 + w (so diffusers' guidance_scale 6 = the paper's
w 5). ∅ = CLIP part of z_cond zeroed and the source latent zeroed, pose kept (as trained,
`stages.train.step`). Both branches run in one forward on a batch of 2B (the `two_pass` reference
runs them separately). UNet input [x_t ‖ source latent (VAE mode, unscaled)] (Zero123's
"image-to-image" conditioning, Table IV). `strength` in (0, 1] picks the start: 1 = pure noise
x_T = σ_max ε; below 1 the source latent is noised to the timestep `strength` of the way into the
schedule and the last round(steps · strength) steps run (diffusers img2img).

Determinism: view k (frame number k) draws its initial noise, and any per-step noise (ddpm, euler),
from its own CPU generator seeded with seed + k, so a view's random numbers do not depend on which
views share its batch. Same seed, batch size and device: bitwise the same PNGs. Another batch size
changes only float rounding inside the kernels (CPU convolutions differ by ~1e-6 between batch
sizes): at most one grey level on a few values. Batches are sized to free memory
(`stages.core.batching`) and halved on out-of-memory.

Output folder VIEWS (written in a temp folder and renamed into place; refused when it holds anything
else, replaced with `overwrite`; skipped when up to date): ``views/NNN.png`` (000 = the input as the
model saw it: cropped, resized), ``transforms.json`` (nerfstudio: OpenGL camera-to-world, frame 0 the
input, `nvf reconstruct VIEWS` takes it as is), ``contact_sheet.png`` (a grid, one row per elevation
for grid orbits) and ``sample.json`` (settings, seeds, angles and pose codes of every frame).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from stages import input_crop
from stages.core import batching, dataset, geometry, io, models
from stages.core.batching import ProgressFn
from stages.core.contract import Context
from stages.core.errors import InputError, ModelError

log = logging.getLogger("nvf")

STAGE = "sample"
Scheduler = Literal["ddim", "ddpm", "dpm++", "euler"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]

ORBITS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "ring13": (tuple(-90.0 + 15.0 * i for i in range(13)), (0.0,)),
    "16": (tuple(360.0 * i / 16 for i in range(16)), (0.0,)),
    "36": (tuple(360.0 * i / 36 for i in range(36)), (0.0,)),
    "6x16": (tuple(360.0 * i / 16 for i in range(16)), (-10.0, 0.0, 10.0, 20.0, 30.0, 40.0)),
}
"""Orbit presets: (azimuths, elevations) in degrees; the views are their grid, elevation-major."""

ZERO123_FOV_DEG = math.degrees(2 * math.atan(16 / 35))  # 49.13°: 35 mm lens on a 32 mm sensor
MULTIPIE_POSE_RADIUS = 1.298  # `triplets.pose_scale` of the 15 Multi-PIE cameras on a unit sphere
_CPU_MAX_BATCH = 8
_GPU_MAX_BATCH = 64


@dataclass(frozen=True)
class Config:
    """How views are sampled (defaults: the paper's Table III)."""

    orbit: str = "ring13"
    """Target views: `ring13` (-90..+90° every 15°), `16`, `36` (even 360°) or `6x16` (6 elevations x 16)."""
    azimuths: tuple[float, ...] | None = None
    """Instead of the orbit's azimuths (degrees; 0 = frontal, positive moves the camera toward +x, its right)."""
    elevations: tuple[float, ...] | None = None
    """Instead of the orbit's elevations (degrees, positive = camera above); views = azimuths x elevations."""
    radius: float = 4.0
    """Camera distance to the subject in the world units of transforms.json (nvf synth's default)."""
    input_azimuth: float | None = None
    """Azimuth of the photo's camera; None: 0 (frontal), or the camera of a Multi-PIE file name."""
    input_elevation: float | None = None
    """Elevation of the photo's camera; None: 0, or the camera of a Multi-PIE file name."""
    fov_deg: float = ZERO123_FOV_DEG
    """Field of view of every view in transforms.json (default: Zero123's 49.1°; nvf synth renders 42°)."""
    scheduler: Scheduler = "ddim"
    """Sampler: ddim (Table III), ddpm, dpm++ (DPM-Solver++ multistep) or euler."""
    steps: int = 30
    """Denoising steps (Table III: 30)."""
    guidance: float = 5.0
    """w of Eq. 9 (Table III: 5.0; diffusers' guidance_scale = 1 + w). 0 runs the conditional branch only."""
    strength: float = 1.0
    """Latent start: 1 = pure noise; < 1 = the source latent noised that far into the schedule (img2img)."""
    seed: int = 0
    """View k draws its noise from a generator seeded with seed + k."""
    pose_radius: float | None = None
    """Camera distance in training's normalised units; None: from the run's triplet index (else 1.298)."""
    clip_model: str | None = None
    """CLIP model for the photo's embedding instead of the run's (open_clip NAME@TAG, hf-hub:..., folder)."""
    use_ema: bool = False
    """Sample with the run's EMA weights."""
    precision: Precision = "auto"
    """Weights: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16; the latents stay float32."""
    batch_size: int | None = None
    """Views per forward pass (each costs 2 UNet rows with guidance); None: fit free memory."""
    crop: str = "auto"
    """Framing of the photo: face (dlib, nvf[face]), center (centre square), none (padded), auto (face, else center)."""
    crop_scale: float = input_crop.FACE_FRAMING
    """Side of the face crop in dlib face boxes (the training framing, see stages.input_crop)."""


PRESETS: dict[str, Config] = {
    "paper": Config(),
    "fast": Config(scheduler="dpm++", steps=15),
    "tiny": Config(steps=3, orbit="16"),
}


# --- views and their cameras ---------------------------------------------------------------------


@dataclass(frozen=True)
class ViewPlan:
    """Frames of the output: frame 0 is the input, 1.. the generated targets.

    azimuth_deg / elevation_deg [F]; `grid_shape` (elevations, azimuths) and `grid_slot` [F] (position
    in the elevation-major grid, -1 for an input off the grid) lay out the contact sheet.
    """

    azimuth_deg: np.ndarray
    elevation_deg: np.ndarray
    grid_shape: tuple[int, int]
    grid_slot: np.ndarray

    @property
    def n_frames(self) -> int:
        return len(self.azimuth_deg)


def _same_angle(a: float, b: float) -> bool:
    return abs((a - b + 180.0) % 360.0 - 180.0) < 1e-6


def input_angles(cfg: Config, image: Path | None = None) -> tuple[float, float]:
    """(azimuth, elevation) of the photo: the config's, else a Multi-PIE file name's camera, else (0, 0)."""
    azimuth, elevation = 0.0, 0.0
    parsed = dataset.parse_multipie_name(image.name) if image is not None else None
    if parsed is not None:
        camera = dataset.MULTIPIE_CAMERAS[parsed[3]]
        azimuth, elevation = camera.azimuth_deg, camera.elevation_deg
        log.info("sample: %s is Multi-PIE camera %s: input at azimuth %g, elevation %g", image.name, parsed[3],
                 azimuth, elevation)  # fmt: skip
    return (cfg.input_azimuth if cfg.input_azimuth is not None else azimuth,
            cfg.input_elevation if cfg.input_elevation is not None else elevation)  # fmt: skip


def plan_views(cfg: Config, input_azimuth: float = 0.0, input_elevation: float = 0.0) -> ViewPlan:
    """The frames: the input, then the orbit's grid (elevation-major) minus the input's own camera."""
    if cfg.orbit not in ORBITS:
        raise InputError(f"unknown --orbit '{cfg.orbit}': choose one of {', '.join(ORBITS)}, or pass --azimuths")
    azimuths = tuple(cfg.azimuths) if cfg.azimuths else ORBITS[cfg.orbit][0]
    elevations = tuple(cfg.elevations) if cfg.elevations else ORBITS[cfg.orbit][1]
    for value in (*azimuths, *elevations, input_azimuth, input_elevation):
        if not math.isfinite(value):
            raise InputError("view angles must be finite numbers (degrees)")
    if any(abs(e) >= 90.0 for e in (*elevations, input_elevation)):
        raise InputError(
            "elevations must lie strictly between -90 and 90 degrees (the rig's up axis is singular there)"
        )
    az_f, el_f, slots = [input_azimuth], [input_elevation], [-1]
    for row, elevation in enumerate(elevations):
        for col, azimuth in enumerate(azimuths):
            slot = row * len(azimuths) + col
            if _same_angle(azimuth, input_azimuth) and abs(elevation - input_elevation) < 1e-6:
                slots[0] = slot  # the photo is this view
                continue
            az_f.append(azimuth)
            el_f.append(elevation)
            slots.append(slot)
    if len(az_f) < 2:
        raise InputError("no target view left: every requested view is the input's own camera")
    return ViewPlan(np.asarray(az_f, np.float64), np.asarray(el_f, np.float64), (len(elevations), len(azimuths)),
                    np.asarray(slots, np.int64))  # fmt: skip


def plan_cameras(plan: ViewPlan, radius: float, fov_deg: float, size: int) -> io.CameraSet:
    """Pinhole cameras (OpenCV world-to-camera) of the frames, named NNN.png, all `size` px square."""
    if not radius > 0 or not 1.0 <= fov_deg <= 170.0:
        raise InputError(f"--radius must be > 0 and --fov within 1..170 degrees (got {radius}, {fov_deg})")
    R, T = geometry.ring_pose(plan.azimuth_deg, plan.elevation_deg, radius)  # [F, 3, 3], [F, 3]
    focal = 0.5 * size / math.tan(math.radians(fov_deg) / 2)
    K = np.array([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]])
    n = plan.n_frames
    return io.CameraSet([f"{i:03d}.png" for i in range(n)], R, T, np.repeat(K[None], n, 0), np.full(n, size),
                        np.full(n, size))  # fmt: skip


def pose_codes(conditioning: str, R_f33: np.ndarray, T_f3: np.ndarray, scale: float) -> np.ndarray:
    """Pose part of z_cond [F-1, P] from frame 0 (source) to frames 1.. (targets), T multiplied by `scale`.

    `paper`: the 12-D code; `zero123`: [Δpolar, sin Δazimuth, cos Δazimuth, Δradius ‖ 12-D], about the
    rig's up (-y) and the subject at the origin, as `stages.triplets` builds them.
    """
    R, T = np.asarray(R_f33, np.float64), np.asarray(T_f3, np.float64) * scale
    R_rel, T_rel = geometry.relative_pose(R[:1], T[:1], R[1:], T[1:])
    layout = io.CONDITIONING_LAYOUTS.get(conditioning)
    if layout is None:
        raise ModelError(f"the run's conditioning '{conditioning}' is unknown to this nvf: update nvf")
    codes = {"pose_code": geometry.pose_code12(R_rel, T_rel)}
    if "zero123_code" in io.POSE_LAYOUTS[layout]:
        codes["zero123_code"] = geometry.zero123_pose_code(R[:1], T[:1], R[1:], T[1:], up=(0.0, -1.0, 0.0),
                                                           center=(0.0, 0.0, 0.0))  # fmt: skip
    return io.pose_part(codes, layout).astype(np.float32)


def run_pose_radius(run_info: dict[str, Any], run_dir: Path) -> tuple[float, str]:
    """(ρ, where it came from) for a run: model.json's `pose_radius`, its triplet index, or Multi-PIE's."""
    if run_info.get("pose_radius"):
        return float(run_info["pose_radius"]), "model.json"
    recorded = run_info.get("triplets")
    for candidate in [Path(recorded), run_dir / recorded] if recorded else []:
        if candidate.is_file():
            try:
                record = io.load_record(candidate, kind="triplets")
                rho = geometry.pose_code_radius(record["pose_code"])
            except Exception as err:  # an unreadable index only costs the estimate
                log.warning("sample: cannot read the pose codes of %s (%s)", candidate, err)
                continue
            if rho is not None:
                return rho, f"estimated from {candidate}"
    return MULTIPIE_POSE_RADIUS, "Multi-PIE layout (the run's triplet index was not found)"


# --- the photo --------------------------------------------------------------------------------------


def load_photo(image: Path, mask: Path | None = None) -> np.ndarray:
    """uint8 RGB [H, W, 3]; with a mask (same size, white = subject, grey = partial) the background goes white."""
    rgb = io.read_image(image)
    if mask is None:
        return rgb
    alpha = io.read_image(mask).astype(np.float32).mean(axis=-1, keepdims=True) / 255.0  # [H, W, 1]
    if alpha.shape[:2] != rgb.shape[:2]:
        raise InputError(f"--mask {mask} is {alpha.shape[1]}x{alpha.shape[0]} but the photo is "
                         f"{rgb.shape[1]}x{rgb.shape[0]}: give a mask of the photo's size")  # fmt: skip
    return (rgb * alpha + 255.0 * (1.0 - alpha)).round().clip(0, 255).astype(np.uint8)


def pixels_to_uint8(pixels_b3ss: torch.Tensor) -> np.ndarray:
    """[-1, 1] images [B, 3, S, S] -> uint8 [B, S, S, 3]."""
    return ((pixels_b3ss.float().clamp(-1, 1).permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)


def clip_ref(run_clip: dict[str, Any], override: str | None) -> models.ModelRef:
    """The CLIP model for the photo: `override`, else the one the run's embeddings came from."""
    if override:
        return models.resolve_model("clip", override=override)
    model_id = str(run_clip.get("id") or "")
    if not model_id or model_id == "fake":
        raise ModelError("the run does not name the CLIP model its embeddings came from: pass --clip-model "
                         "(the model `nvf embed` used, e.g. ViT-B-32-quickgelu@openai)")  # fmt: skip
    return models.ModelRef("clip", model_id, pretrained=run_clip.get("pretrained") or None)


def embed_photo(photo_hw3: np.ndarray, ref: models.ModelRef, device: torch.device, expected_dim: int,
                raw: bool = False) -> torch.Tensor:  # fmt: skip
    """CLIP embedding [1, D] (CPU) of the photo, with the model's own open_clip preprocessing: unit
    norm, or with `raw` the model's output before normalising (what the run trained on, model.json)."""
    from PIL import Image

    from stages import embed  # a stage of the same floor, for its loaded-model cache

    embedder = embed.loaded_embedder(ref, embed.model_fingerprint(ref), device, "fp32")
    row = embedder.embed_with_norm(embedder.preprocess(Image.fromarray(photo_hw3))[None])  # [1, D + 1]
    vector = row[:, :-1] * row[:, -1:] if raw else row[:, :-1]
    if vector.shape[1] != expected_dim:
        raise InputError(f"CLIP model {ref.id} gives {vector.shape[1]}-D embeddings but the run was trained on "
                         f"{expected_dim}-D ones: pass the --clip-model `nvf embed` used")  # fmt: skip
    return vector


# --- sampling ------------------------------------------------------------------------------------------


def make_scheduler(name: str, scheduler_config: dict[str, Any]) -> Any:
    """A fresh diffusers scheduler of kind `name` from the run's noise-schedule config."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    kinds = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm++": DPMSolverMultistepScheduler,
             "euler": EulerDiscreteScheduler}  # fmt: skip
    if name not in kinds:
        raise InputError(f"unknown --scheduler '{name}': choose one of {', '.join(kinds)}")
    known = inspect.signature(kinds[name].__init__).parameters  # (follows diffusers' config decorator)
    return kinds[name].from_config({k: v for k, v in scheduler_config.items() if k in known})


def guided_noise(model: Any, x_in: torch.Tensor, t: torch.Tensor, source: torch.Tensor, context_c: torch.Tensor,
                 context_u: torch.Tensor | None, guidance: float, *, two_pass: bool = False) -> torch.Tensor:  # fmt: skip
    """Eq. 9: ε̂ = (1 + w) ε(x_t, c) - w ε(x_t, ∅), float32 [B, 4, h, w].

    x_in [B, 4, h, w] (scheduler-scaled x_t), source [B, 4, h, w] (zeros for ∅), contexts [B, 1, C].
    One UNet call on [cond ; uncond] (2B rows), or two calls with `two_pass` (the reference);
    `context_u` None (w = 0) runs the conditional branch only.
    """
    dtype = next(model.unet.parameters()).dtype

    def unet(latent: torch.Tensor, src: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        latent_in = torch.cat([latent, src], dim=1).to(dtype)  # [n, 8, h, w]
        return model.unet(latent_in, t, encoder_hidden_states=context.to(dtype)).sample.float()

    if context_u is None:
        return unet(x_in, source, context_c)
    if two_pass:
        eps_c = unet(x_in, source, context_c)
        eps_u = unet(x_in, torch.zeros_like(source), context_u)
    else:
        both = unet(torch.cat([x_in, x_in]), torch.cat([source, torch.zeros_like(source)]),
                    torch.cat([context_c, context_u]))  # fmt: skip
        eps_c, eps_u = both.chunk(2)
    return (1 + guidance) * eps_c - guidance * eps_u


def start_timesteps(scheduler: Any, steps: int, strength: float) -> torch.Tensor:
    """The timesteps to run: all `steps` at strength 1, the last round(steps · strength) below (img2img)."""
    n_run = max(1, min(steps, round(steps * strength)))
    start = (steps - n_run) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


@torch.no_grad()
def denoise(model: Any, source_14hw: torch.Tensor, z_cond_bd: torch.Tensor, generators: Sequence[torch.Generator],
            cfg: Config, *, two_pass: bool = False) -> torch.Tensor:  # fmt: skip
    """Sample target latents [B, 4, h, w] (diffusion scale) for B views of one source.

    source_14hw: the source's VAE mode (unscaled) [1, 4, h, w]; z_cond_bd [B, D]; one generator per view.
    """
    device = source_14hw.device
    batch = len(z_cond_bd)
    scheduler = make_scheduler(cfg.scheduler, model.scheduler_config)
    scheduler.set_timesteps(cfg.steps, device=device)
    timesteps = start_timesteps(scheduler, cfg.steps, cfg.strength)
    noise = torch.cat([torch.randn(source_14hw.shape, generator=g) for g in generators]).to(device)  # [B, 4, h, w]
    if cfg.strength >= 1.0:
        x = noise * scheduler.init_noise_sigma
    else:
        x0 = (source_14hw * model.scaling_factor).expand(batch, -1, -1, -1)
        x = scheduler.add_noise(x0, noise, timesteps[:1].repeat(batch))
    source = source_14hw.expand(batch, -1, -1, -1)
    context_c = model.projection(z_cond_bd)  # [B, 1, C]
    context_u = model.projection(model.null_z_cond(z_cond_bd)) if cfg.guidance != 0 else None
    for t in timesteps:
        x_in = scheduler.scale_model_input(x, t)
        eps = guided_noise(model, x_in, t, source, context_c, context_u, cfg.guidance, two_pass=two_pass)
        x = scheduler.step(eps, t, x, generator=list(generators)).prev_sample
    return x


@torch.no_grad()
def decode(model: Any, latents_b4hw: torch.Tensor) -> np.ndarray:
    """Diffusion latents -> uint8 images [B, S, S, 3]."""
    dtype = next(model.vae.parameters()).dtype
    return pixels_to_uint8(model.vae.decode((latents_b4hw / model.scaling_factor).to(dtype)).sample)


def bytes_per_view(model: Any, latent_hw: tuple[int, int], guidance: bool) -> int:
    """Rough peak memory one more view costs: UNet activations (x2 with guidance) plus the VAE decode.

    UNet: ~40 live maps of the widest full-resolution block plus one attention map per head
    (h·w)² (the math attention path); VAE: 8 full-resolution maps of its widest decoder block.
    """
    elem = torch.finfo(next(model.unet.parameters()).dtype).bits // 8
    h, w = latent_hw
    config = model.unet.config
    heads = config.attention_head_dim if isinstance(config.attention_head_dim, int) else max(config.attention_head_dim)
    unet = 40 * config.block_out_channels[0] * h * w + int(heads) * (h * w) ** 2
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    vae = 8 * max(model.vae.config.block_out_channels) * (h * factor) * (w * factor)
    return int(elem * ((2 if guidance else 1) * unet + vae))


def sample_views(model: Any, source_pixels_3ss: torch.Tensor, z_cond_vd: torch.Tensor, seeds: Sequence[int],
                 cfg: Config, device: torch.device, progress: ProgressFn | None = None) -> np.ndarray:  # fmt: skip
    """uint8 views [V, S, S, 3] for z_cond rows [V, D], view v from a generator seeded with seeds[v]."""
    dtype = next(model.vae.parameters()).dtype
    with torch.no_grad():
        source = model.vae.encode(source_pixels_3ss[None].to(device, dtype)).latent_dist.mode().float()  # [1, 4, h, w]
    z_cond = z_cond_vd.to(device, next(model.projection.parameters()).dtype)
    latent_hw = tuple(source.shape[-2:])
    size = batching.resolve_batch_size(
        cfg.batch_size, device, bytes_per_view(model, latent_hw, cfg.guidance != 0),
        max_batch=_GPU_MAX_BATCH if device.type == "cuda" else _CPU_MAX_BATCH,
    )  # fmt: skip

    def one_batch(rows: Sequence[int]) -> np.ndarray:
        generators = [torch.Generator().manual_seed(int(seeds[r])) for r in rows]
        return decode(model, denoise(model, source, z_cond[list(rows)], generators, cfg))

    return np.stack(batching.run_batched(one_batch, list(range(len(z_cond))), batch_size=size, progress=progress))


# --- output --------------------------------------------------------------------------------------------


def contact_sheet(images_fss3: np.ndarray, plan: ViewPlan, max_columns: int = 16) -> np.ndarray:
    """Frames on the orbit's grid (one row per elevation; the input in its own slot, or first when off
    the grid), `max_columns` at most per row, 2 px white gutters, a small label per tile."""
    from PIL import Image, ImageDraw

    n, size = len(images_fss3), images_fss3.shape[1]
    cols_a = plan.grid_shape[1]
    order = sorted(range(n), key=lambda f: int(plan.grid_slot[f]))  # an off-grid input (-1) comes first
    columns = min(cols_a, max_columns, n)
    rows = -(-n // columns)
    gap = 2
    sheet = Image.new("RGB", (columns * (size + gap) + gap, rows * (size + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for k, frame in enumerate(order):
        r, c = divmod(k, columns)
        x, y = gap + c * (size + gap), gap + r * (size + gap)
        sheet.paste(Image.fromarray(images_fss3[frame]), (x, y))
        if size >= 48:
            label = f"{frame:03d} {plan.azimuth_deg[frame]:g}/{plan.elevation_deg[frame]:g}" + (" in" * (frame == 0))
            draw.text((x + 2, y + 1), label, fill=(255, 0, 0) if frame == 0 else (0, 0, 0))
    return np.asarray(sheet)


def _inputs_hash(model: Any, image: Path, mask: Path | None, cfg: Config, angles: tuple[float, float]) -> str:
    weights = sorted(p for p in Path(model.checkpoint).rglob("*") if p.is_file())
    stamps = [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in weights]
    return io.hash_inputs(io.hash_file(image), io.hash_file(mask) if mask else "", stamps, dataclasses.asdict(cfg),
                          list(angles))  # fmt: skip


def _owned(out: Path) -> bool:
    """`out` holds nothing, or only what nvf wrote (a previous `nvf sample`, by `io.OWNED_MARK`)."""
    return not io.foreign_files(out)


def output_paths(out: Path, n_frames: int) -> list[Path]:
    return [out / "transforms.json", out / "contact_sheet.png", out / "sample.json",
            *(out / "views" / f"{i:03d}.png" for i in range(n_frames))]  # fmt: skip


def _precision(precision: str, device: torch.device) -> torch.dtype:
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise InputError(f"unknown --precision '{precision}': use auto, fp32, fp16 or bf16")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        log.warning("--precision fp16 needs a CUDA device; sampling in fp32 on %s (use bf16 for a CPU)", device)
        precision = "fp32"
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def validate(cfg: Config) -> None:
    """InputError for settings that cannot work, before any model loads."""
    if cfg.steps < 1:
        raise InputError("--steps must be at least 1")
    if not 0.0 < cfg.strength <= 1.0:
        raise InputError(f"--strength must be in (0, 1] (1 = start from pure noise), got {cfg.strength}")
    if cfg.guidance < 0 or not math.isfinite(cfg.guidance):
        raise InputError(f"--guidance (w of Eq. 9) must be >= 0, got {cfg.guidance}")
    if cfg.pose_radius is not None and not cfg.pose_radius > 0:
        raise InputError("--pose-radius must be positive")
    if cfg.crop not in input_crop.CROP_MODES or not cfg.crop_scale > 0:
        raise InputError(f"--crop must be one of {', '.join(input_crop.CROP_MODES)} and --crop-scale positive")
    if cfg.scheduler not in ("ddim", "ddpm", "dpm++", "euler"):
        raise InputError(f"unknown --scheduler '{cfg.scheduler}': choose ddim, ddpm, dpm++ or euler")
    plan_views(cfg)


PATHS = {"model": "train", "image": None, "mask": None, "out": "samples"}
"""Named paths `Context.paths` may set: the run or checkpoint ``model`` (default ``WORK/train``), the
``image`` (required), its ``mask``, and the ``out`` folder (default ``WORK/samples``)."""


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """The stage contract: `sample` from ``ctx.paths["image"]`` with the work tree's run."""
    image = ctx.given("image")
    if image is None:
        raise InputError(
            "sample needs a photo: give image = PATH (in nvf run: the [stages.sample] section of --config)"
        )
    model, out = ctx.path("model", PATHS["model"]), ctx.path("out", PATHS["out"])
    return sample(model, image, out, cfg, mask=ctx.given("mask"), device=ctx.device, overwrite=ctx.overwrite,
                  progress=ctx.progress)  # fmt: skip


def sample(model_path: Path, image: Path, out: Path, cfg: Config = Config(), *, mask: Path | None = None,
           device: str = "auto", overwrite: bool = False, progress: ProgressFn | None = None) -> list[Path]:  # fmt: skip
    """Sample the views of `cfg` from the photo `image` with the run (or checkpoint) `model_path` into `out`.

    Returns [transforms.json, contact_sheet.png, sample.json, views/000.png, ...].
    """
    from stages.train import checkpoint as ckpt
    from stages.train.data import preprocess_image

    validate(cfg)
    out, image = Path(out), Path(image)
    for path, what in ((image, "photo"), (mask, "--mask")):
        if path is not None and not Path(path).is_file():
            raise InputError(f"{path}: {what} not found; pass the path of an image file")
    angles = input_angles(cfg, image)
    plan = plan_views(cfg, *angles)
    if not _owned(out):
        raise InputError(f"{out} exists and holds other files: pick an empty or new --out folder")
    torch_device = batching.choose_device(device)
    model = ckpt.load_checkpoint(model_path, torch_device, use_ema=cfg.use_ema, dtype=_precision(cfg.precision,
                                                                                                 torch_device))  # fmt: skip
    inputs = _inputs_hash(model, image, mask, cfg, angles)
    paths = output_paths(out, plan.n_frames)
    if (out / "sample.json").is_file() and not overwrite:
        previous = io.read_json(out / "sample.json")
        if previous.get("inputs") == inputs and all(p.is_file() for p in paths):
            log.info("sample: %s is up to date (same model, photo and settings); --overwrite redoes it", out)
            return paths
        raise InputError(f"{out} already holds views from other inputs or settings: pass --overwrite to replace them")

    run_dir = ckpt.run_of(model.checkpoint)
    run_info = io.read_json(run_dir / ckpt.MODEL_JSON)
    rho, rho_source = (cfg.pose_radius, "--pose-radius") if cfg.pose_radius else run_pose_radius(run_info, run_dir)
    cameras = plan_cameras(plan, cfg.radius, cfg.fov_deg, model.resolution)
    pose = pose_codes(model.conditioning, cameras.R, cameras.T, rho / cfg.radius)  # [V, P]
    if pose.shape[1] != model.pose_dim:
        raise ModelError(f"the run expects {model.pose_dim} pose numbers, this sampler builds {pose.shape[1]} for "
                         f"conditioning '{model.conditioning}': the run and nvf disagree; retrain or update nvf")  # fmt: skip
    photo = load_photo(image, mask)
    crop = input_crop.crop_photo(photo, cfg.crop, cfg.crop_scale)
    raw = model.clip_model.get("normalization") == "none"  # zero123 conditioning: raw image_embeds
    clip = embed_photo(
        crop.image_ss3, clip_ref(model.clip_model, cfg.clip_model), torch_device, model.clip_dim, raw
    )  # [1, D]
    z_cond = io.join_z_cond(clip.expand(len(pose), -1), torch.from_numpy(pose))  # [V, D + P]
    source_pixels = preprocess_image(crop.image_ss3, model.resolution)  # [3, S, S] in [-1, 1]
    seeds = [cfg.seed + frame for frame in range(1, plan.n_frames)]
    log.info("sample: %d view(s) of %s, %s %d steps, w=%g, strength %g, pose radius %.3f (%s)", len(seeds), image.name,
             cfg.scheduler, cfg.steps, cfg.guidance, cfg.strength, rho, rho_source)  # fmt: skip
    generated = sample_views(model, source_pixels, z_cond, seeds, cfg, torch_device, progress)  # [V, S, S, 3]
    frames = np.concatenate([pixels_to_uint8(source_pixels[None]), generated])  # [F, S, S, 3]

    info = {
        "nvf_stage": STAGE, "inputs": inputs, "image": str(image), "mask": str(mask) if mask else None,
        "checkpoint": str(model.checkpoint), "step": model.step, "conditioning": model.conditioning,
        "config": dataclasses.asdict(cfg), "diffusers_guidance_scale": 1 + cfg.guidance,
        "pose_radius": rho, "pose_radius_source": rho_source, "pose_scale": rho / cfg.radius,
        "crop": crop.record(photo.shape[:2], cameras.K[0], model.resolution),
        "camera_convention": "frame 0 = input; rig frame: world up -y, subject at the origin, azimuth 0 frontal",
        "frames": [{"file": f"views/{i:03d}.png", "azimuth_deg": float(plan.azimuth_deg[i]),
                    "elevation_deg": float(plan.elevation_deg[i]), "generated": i > 0,
                    "seed": cfg.seed + i if i > 0 else None, "pose": pose[i - 1].tolist() if i > 0 else None}
                   for i in range(plan.n_frames)],
    }  # fmt: skip
    extra = [{"nvf_azimuth_deg": float(a), "nvf_elevation_deg": float(e)}
             for a, e in zip(plan.azimuth_deg, plan.elevation_deg)]  # fmt: skip
    extra[0]["nvf_crop_box_x0_y0_side"] = list(crop.box)  # the input frame: where it lies in the photo
    with io.atomic_dir(out) as tmp:
        for i, frame in enumerate(frames):
            io.write_image(tmp / "views" / f"{i:03d}.png", frame)
        io.write_transforms(tmp / "transforms.json", cameras, image_dir="views", extra_frames=extra)
        io.write_image(tmp / "contact_sheet.png", contact_sheet(frames, plan))
        io.write_json(tmp / "sample.json", info)
    log.info("sample: wrote %d frame(s) to %s", plan.n_frames, out)
    return paths
