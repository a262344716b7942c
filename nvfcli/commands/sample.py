"""`nvf sample`: novel views of one photo with a trained run (DDIM + classifier-free guidance, Eq. 9)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Json, Overwrite
from stages import sample as stage
from stages.core.errors import InputError


def _angles(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise InputError(f"{option} takes degrees separated by commas (e.g. 0,30,60), got '{text}'") from None
    if not values:
        raise InputError(f"{option} is empty: give degrees separated by commas (e.g. 0,30,60)")
    return values


def sample(
    model: Annotated[
        Path,
        typer.Argument(
            help="Run folder of nvf train (its latest checkpoint) or a checkpoint folder.",
            show_default=False,
            metavar="RUN",
        ),
    ],  # fmt: skip
    image: Annotated[
        Path, typer.Option("--image", "-i", help="The photo (any size; framed by --crop).", show_default=False)
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (views/, transforms.json).", show_default=False)
    ],
    mask: Annotated[
        Optional[Path], typer.Option(help="Subject mask of the photo (white = keep); background -> white.")
    ] = None,
    preset: Annotated[str, typer.Option(help="paper (DDIM 30, w 5), fast (DPM++ 15) or tiny (tests).")] = "paper",
    orbit: Annotated[Optional[str], typer.Option(help="ring13, 16, 36 or 6x16.")] = None,
    azimuths: Annotated[Optional[str], typer.Option(help="Target azimuths in degrees, e.g. -60,-30,30,60.")] = None,
    elevations: Annotated[
        Optional[str], typer.Option(help="Target elevations in degrees (grid with the azimuths).")
    ] = None,
    radius: Annotated[Optional[float], typer.Option(help="Camera distance in transforms.json units.")] = None,
    input_azimuth: Annotated[Optional[float], typer.Option(help="The photo's azimuth [default: 0, frontal].")] = None,
    input_elevation: Annotated[Optional[float], typer.Option(help="The photo's elevation [default: 0].")] = None,
    fov: Annotated[Optional[float], typer.Option(help="Field of view in degrees [default: Zero123's 49.1].")] = None,
    scheduler: Annotated[Optional[stage.Scheduler], typer.Option(help="ddim, ddpm, dpm++ or euler.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps.")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="w of Eq. 9 (diffusers' guidance_scale = 1 + w).")] = None,
    strength: Annotated[
        Optional[float], typer.Option(help="1 = start from noise; < 1 = from the noised photo.")
    ] = None,
    pose_radius: Annotated[
        Optional[float], typer.Option(help="Camera distance in training's normalised units.")
    ] = None,
    clip_model: Annotated[Optional[str], typer.Option(help="CLIP model for the photo [default: the run's].")] = None,
    ema: Annotated[Optional[bool], typer.Option("--ema/--no-ema", help="Use the run's EMA weights.")] = None,
    precision: Annotated[Optional[stage.Precision], typer.Option(help="auto, fp32, fp16 or bf16.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Views per batch (default: fit free memory).")] = None,
    seed: Annotated[
        Optional[int], typer.Option(help="View k uses seed + k; the same seed gives the same views.")
    ] = None,
    crop: Annotated[
        Optional[str], typer.Option(help="face (dlib, nvf[face]), center, none (pad) [default: face, else center].")
    ] = None,
    crop_scale: Annotated[
        Optional[float], typer.Option(help="Face crop side in dlib face boxes [default: 2.5].")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Sample novel views of PHOTO with the model of a run into OUT/views/, with their poses.

    Writes OUT/views/NNN.png (000 = the photo), OUT/transforms.json (ready for `nvf reconstruct
    OUT`) and OUT/contact_sheet.png.

    Examples: `nvf sample run --image face.jpg --out views`; `nvf sample run --image face.jpg --out views
    --orbit 36 --scheduler dpm++ --steps 20`; `nvf sample run -i face.png --mask face_mask.png -o views
    --azimuths -60,-30,30,60 --elevations 0,20`.
    """
    if preset not in stage.PRESETS:
        raise InputError(f"unknown --preset '{preset}': choose one of {', '.join(stage.PRESETS)}")
    given = {"orbit": orbit, "azimuths": _angles(azimuths, "--azimuths"),
             "elevations": _angles(elevations, "--elevations"), "radius": radius, "input_azimuth": input_azimuth,
             "input_elevation": input_elevation, "fov_deg": fov, "scheduler": scheduler, "steps": steps,
             "guidance": guidance, "strength": strength, "pose_radius": pose_radius, "clip_model": clip_model,
             "use_ema": ema, "precision": precision, "batch_size": batch_size, "seed": seed, "crop": crop,
             "crop_scale": crop_scale}  # fmt: skip
    cfg = dataclasses.replace(stage.PRESETS[preset], **{k: v for k, v in given.items() if v is not None})
    with progress_bar("sample") as progress:
        written = stage.run(model, image, out, cfg, mask=mask, device=device, overwrite=overwrite, progress=progress)
    print_paths(written, json_out)
