"""`nvf synth`: synthetic Multi-PIE-style captures with ground truth (poses, z-depth, surface)."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Json, OutDir, Overwrite, Seed
from stages import synth as stage
from stages.core import dataset
from stages.core.errors import InputError


def synth(
    out: OutDir,
    preset: Annotated[str, typer.Option(help=f"Starting point: {', '.join(stage.PRESETS)}.")] = "default",
    subjects: Annotated[Optional[int], typer.Option(help="Number of people (001, 002, ...).", min=1)] = None,
    sessions: Annotated[Optional[str], typer.Option(help="Sessions to render, e.g. 1 or 1-4.")] = None,
    expressions: Annotated[
        Optional[bool],
        typer.Option("--expressions/--neutral-only", help="Render every expression of a session, or only neutral."),
    ] = None,  # fmt: skip
    shots: Annotated[
        Optional[int], typer.Option(help="Shots per recording (lighting changes per shot).", min=1)
    ] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Image width and height in pixels.", min=16)] = None,
    elevated: Annotated[
        Optional[bool], typer.Option("--elevated/--ring-only", help="Include the elevated cameras 081 and 191.")
    ] = None,  # fmt: skip
    texture_contrast: Annotated[Optional[float], typer.Option(help="0 = nearly texture-less, 1 = rich.")] = None,
    textureless: Annotated[
        Optional[list[str]], typer.Option("--textureless", help="Camera ids to render without texture.")
    ] = None,
    seed: Seed = 0,
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Render synthetic heads from the 15 Multi-PIE cameras, with ground-truth poses, depth and surface.

    Examples: `nvf synth data/synth --subjects 3`; `nvf synth low --preset lowcontrast --resolution 128`;
    `nvf synth fallback --textureless 130,050,200` (views the poses stage must interpolate).
    """
    if preset not in stage.PRESETS:
        raise InputError(f"unknown preset '{preset}'; choose one of: {', '.join(stage.PRESETS)}")
    changes = {
        "subjects": subjects,
        "sessions": tuple(int(s) for s in dataset.parse_ids([sessions], 2, "session")) if sessions else None,
        "recordings": None if expressions is None else ("all" if expressions else "neutral"),
        "shots": shots,
        "resolution": resolution,
        "elevated": elevated,
        "texture_contrast": texture_contrast,
        "textureless_cameras": dataset.parse_ids(textureless, 3, "camera") if textureless else None,
    }
    cfg = dataclasses.replace(stage.PRESETS[preset], seed=seed, overwrite=overwrite,
                              **{k: v for k, v in changes.items() if v is not None})  # fmt: skip
    with progress_bar("rendering captures") as progress:
        written = stage.run(out, cfg, progress=progress)
    print_paths(written, json_out)
