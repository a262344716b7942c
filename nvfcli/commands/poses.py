"""`nvf poses`: camera poses per capture by SfM (pycolmap), with a tagged SLERP fallback."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Captures, DataDir, Json, Opt, Overwrite, Shard, config_options, preset_help, stage_context
from stages import poses as stage
from stages.core.errors import InputError


@config_options(stage.Config, {
    "camera_model": Opt(type=str, hint="One of SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV."),
    "focal_px": Opt(("--focal",)),
    "refine_focal": Opt(("--fixed-focal",), type=bool, default=False, parse=lambda fixed: False if fixed else None,
                        hint="--fixed-focal turns it off."),
    "matcher": Opt(type=str, hint="exhaustive or sequential."),
    "mapper": Opt(type=str, hint="incremental or global."),
    "colmap": Opt(type=list[str], parse=lambda items: stage.parse_overrides(items) or None,
                  hint="Give KEY=VALUE (repeatable), e.g. extraction.sift.peak_threshold=0.001."),
    "export": Opt(type=str, parse=lambda text: tuple(e.strip() for e in text.split(",") if e.strip()) or None,
                  hint="Comma separated."),
})  # fmt: skip
def poses(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Work tree: writes OUT/<capture>/poses.safetensors.")],
    preset: Annotated[str, typer.Option(help=preset_help(stage, "Starting point"))] = "default",
    shard: Shard = None,
    captures: Captures = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Estimate camera poses of every capture under DATA (SfM, then SLERP fallback for the rest).

    Examples: `nvf poses data/multipie --out work`; `nvf poses data --out work --export transforms,colmap`;
    `nvf poses data --out work --colmap mapping.mapper.init_min_tri_angle=8 --shard 0/4`;
    `nvf poses data --out work2 --rig work/rig_01.safetensors`.
    """
    if preset not in stage.PRESETS:
        raise InputError(f"unknown preset '{preset}'; choose one of: {', '.join(stage.PRESETS)}")
    choices = {"camera_model": stage.CAMERA_MODELS, "matcher": ("exhaustive", "sequential"),
               "mapper": ("incremental", "global")}  # fmt: skip
    for name, allowed in choices.items():
        if name in changes and changes[name] not in allowed:
            raise InputError(
                f"unknown --{name.replace('_', '-')} '{changes[name]}'; choose one of: {', '.join(allowed)}"
            )
    cfg = dataclasses.replace(stage.PRESETS[preset], **changes)
    with progress_bar("posing captures") as progress:
        written = stage.run(stage_context(out, data=data, shard=shard, captures=captures, overwrite=overwrite,
                                          progress=progress), cfg)  # fmt: skip
    print_paths(written, json_out)
