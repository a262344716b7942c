"""`nvf evaluate`: poses, depth, clouds and novel views against references; metrics.json + report.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Device, Json, Opt, Overwrite, config_options, preset_help
from stages import evaluate as stage


@config_options(stage.Config, {
    "resolution": Opt(parse=lambda side: {"resolution": side or None}, hint="0: native."),
})  # fmt: skip
def evaluate(
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder: metrics.json, report.md, figures/.")],
    poses: Annotated[
        Optional[Path], typer.Option(help="Estimated poses: record, transforms.json, COLMAP model or WORK.")
    ] = None,
    poses_ref: Annotated[
        Optional[Path], typer.Option(help="Reference poses (same kinds; e.g. DATA/groundtruth).")
    ] = None,
    depth: Annotated[Optional[Path], typer.Option(help="Estimated depth: depth/aligned record or WORK.")] = None,
    depth_ref: Annotated[Optional[Path], typer.Option(help="Reference z-depth: record or DATA/groundtruth.")] = None,
    cloud: Annotated[Optional[Path], typer.Option(help="Cloud PLY or WORK (<capture>/cloud.ply).")] = None,
    cloud_ref: Annotated[Optional[Path], typer.Option(help="Reference surface PLY or DATA/groundtruth.")] = None,
    views: Annotated[Optional[Path], typer.Option(help="Folder of generated views (+ transforms.json).")] = None,
    views_ref: Annotated[
        Optional[Path], typer.Option(help="Folder holding the ground-truth images (searched by name).")
    ] = None,
    views_ref_poses: Annotated[Optional[Path], typer.Option(help="Poses of the ground-truth views.")] = None,
    input_image: Annotated[
        Optional[Path], typer.Option("--input", help="Photo the views came from (CLIP I2O).")
    ] = None,
    reconstruction: Annotated[
        Optional[Path], typer.Option(help="nvf reconstruct output (or a tree of them): held-out PSNR/SSIM/LPIPS.")
    ] = None,
    compare: Annotated[Optional[Path], typer.Option(help="Another report folder to show side by side.")] = None,
    preset: Annotated[str, typer.Option(help=preset_help(stage))] = "default",
    device: Device = "auto",
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Score what the pipeline made against references and write a report with figures.

    Examples: `nvf evaluate --poses work --poses-ref data/groundtruth --depth work --depth-ref data/groundtruth
    --out report`;
    `nvf evaluate --views views --views-ref data --input photo.png --out report2 --compare report`;
    `nvf evaluate --views views --out report3` (no ground truth: closed-loop cameras and identity of an nvf sample folder).
    """
    if preset not in stage.PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}: {', '.join(stage.PRESETS)}")
    cfg = dataclasses.replace(stage.PRESETS[preset], **changes)
    inputs = stage.Inputs(poses=poses, poses_ref=poses_ref, depth=depth, depth_ref=depth_ref, cloud=cloud,
                          cloud_ref=cloud_ref, views=views, views_ref=views_ref, views_ref_poses=views_ref_poses,
                          input_image=input_image, reconstruction=reconstruction, compare=compare)  # fmt: skip
    with progress_bar("evaluate") as progress:
        written = stage.evaluate(inputs, out, cfg, device=device, overwrite=overwrite, progress=progress)
    print_paths(written, json_out)
