"""`nvf poses`: camera poses per capture by SfM (pycolmap), with a tagged SLERP fallback."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Captures, DataDir, Json, Layout, Overwrite, Shard
from stages import poses as stage
from stages.core import worktree
from stages.core.errors import InputError


def poses(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Work tree: writes OUT/<capture>/poses.safetensors.")],
    preset: Annotated[str, typer.Option(help=f"Starting point: {', '.join(stage.PRESETS)}.")] = "default",
    layout: Layout = "auto",
    camera_model: Annotated[
        Optional[str], typer.Option(help="COLMAP camera model, e.g. SIMPLE_RADIAL, SIMPLE_PINHOLE.")
    ] = None,
    focal: Annotated[Optional[float], typer.Option(help="Prior focal length in pixels.")] = None,
    fixed_focal: Annotated[bool, typer.Option("--fixed-focal", help="Keep --focal fixed (a calibration).")] = False,
    matcher: Annotated[Optional[str], typer.Option(help="exhaustive or sequential.")] = None,
    mapper: Annotated[Optional[str], typer.Option(help="incremental or global.")] = None,
    colmap: Annotated[
        Optional[list[str]],
        typer.Option(help="COLMAP option KEY=VALUE (repeatable), e.g. extraction.sift.peak_threshold=0.001."),
    ] = None,  # fmt: skip
    rig: Annotated[
        str,
        typer.Option(
            help="Rig mode: auto (Multi-PIE: solve each session's rig, pose views SfM "
            "missed through it), on, off, or a saved WORK/rig_<session>.safetensors to reuse."
        ),
    ] = "auto",
    export: Annotated[Optional[str], typer.Option(help="Extra outputs, comma separated: transforms,colmap.")] = None,
    captures_at_once: Annotated[
        int, typer.Option(min=1, help="Captures in SfM at a time: one's single-threaded mapping overlaps another's.")
    ] = 2,
    shard: Shard = None,
    captures: Captures = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Estimate camera poses of every capture under DATA (SfM, then SLERP fallback for the rest).

    Examples: `nvf poses data/multipie --out work`; `nvf poses data --out work --export transforms,colmap`;
    `nvf poses data --out work --colmap mapping.mapper.init_min_tri_angle=8 --shard 0/4`;
    `nvf poses data --out work2 --rig work/rig_01.safetensors`.
    """
    if preset not in stage.PRESETS:
        raise InputError(f"unknown preset '{preset}'; choose one of: {', '.join(stage.PRESETS)}")
    choices = {"camera_model": (camera_model, stage.CAMERA_MODELS), "matcher": (matcher, ("exhaustive", "sequential")),
               "mapper": (mapper, ("incremental", "global"))}  # fmt: skip
    for name, (value, allowed) in choices.items():
        if value is not None and value not in allowed:
            raise InputError(f"unknown --{name.replace('_', '-')} '{value}'; choose one of: {', '.join(allowed)}")
    changes = {"layout": layout, "camera_model": camera_model, "focal_px": focal, "matcher": matcher, "mapper": mapper,
               "rig": rig, "colmap": stage.parse_overrides(colmap or []) or None,
               "export": tuple(e.strip() for e in export.split(",") if e.strip()) if export else None,
               "refine_focal": False if fixed_focal else None}  # fmt: skip
    cfg = dataclasses.replace(stage.PRESETS[preset], **{k: v for k, v in changes.items() if v is not None})
    ids = worktree.read_capture_ids(captures) if captures else None
    with progress_bar("posing captures") as progress:
        written = stage.run(data, out, cfg, shard=worktree.Shard.parse(shard), captures=ids, overwrite=overwrite,
                            progress=progress, captures_at_once=captures_at_once)  # fmt: skip
    print_paths(written, json_out)
