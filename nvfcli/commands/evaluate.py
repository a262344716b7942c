"""`nvf evaluate`: poses, depth, clouds and novel views against references; metrics.json + report.md."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Device, Json, Overwrite
from stages import evaluate as stage


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
    preset: Annotated[str, typer.Option(help="default, or tiny (random CLIP, native resolution: tests).")] = "default",
    depth_alignment: Annotated[
        Optional[stage.DepthAlignment], typer.Option(help="none, scale, scale_shift or median.")
    ] = None,
    pairing: Annotated[Optional[stage.Pairing], typer.Option(help="Pair views by name or by pose.")] = None,
    mask: Annotated[
        Optional[stage.MaskMode], typer.Option(help="none, alpha (GT alpha) or depth (GT depth > 0).")
    ] = None,
    depth_mask: Annotated[
        Optional[stage.DepthMask],
        typer.Option(help="Score depth inside the head masks beside it: auto, masks or none."),
    ] = None,
    resolution: Annotated[Optional[int], typer.Option(help="Longer side of views when scored (0: native).")] = None,
    lpips: Annotated[
        Optional[stage.LpipsChoice], typer.Option(help="auto (alex if cached), alex, vgg, squeeze, off.")
    ] = None,
    clip_model: Annotated[
        Optional[str], typer.Option(help="CLIP override: NAME@TAG, hf-hub:org/repo or folder.")
    ] = None,
    closed_loop: Annotated[
        Optional[stage.Switch],
        typer.Option(help="Re-pose --views by SfM against their transforms.json: auto, on, off."),
    ] = None,
    face_identity: Annotated[
        Optional[stage.Switch], typer.Option(help="dlib face identity of --views (nvf[face]): auto, on, off.")
    ] = None,
    label: Annotated[
        Optional[str], typer.Option(help="A line under the report's title saying what the run is.")
    ] = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Score what the pipeline made against references and write a report with figures.

    Examples: `nvf evaluate --poses work --poses-ref data/groundtruth --depth work --depth-ref data/groundtruth
    --out report`;
    `nvf evaluate --views views --views-ref data --input photo.png --out report2 --compare report`;
    `nvf evaluate --views views --out report3` (no ground truth: closed-loop cameras and identity of an nvf sample folder).
    """
    if preset not in stage.PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}: {', '.join(stage.PRESETS)}")
    changes = {"depth_alignment": depth_alignment, "pairing": pairing, "mask": mask, "depth_mask": depth_mask,
               "lpips": lpips, "clip_model": clip_model, "closed_loop": closed_loop,
               "face_identity": face_identity, "label": label}  # fmt: skip
    changes = {k: v for k, v in changes.items() if v is not None}
    if resolution is not None:
        changes["resolution"] = resolution or None
    cfg = dataclasses.replace(stage.PRESETS[preset], **changes)
    inputs = stage.Inputs(poses=poses, poses_ref=poses_ref, depth=depth, depth_ref=depth_ref, cloud=cloud,
                          cloud_ref=cloud_ref, views=views, views_ref=views_ref, views_ref_poses=views_ref_poses,
                          input_image=input_image, reconstruction=reconstruction, compare=compare)  # fmt: skip
    with progress_bar("evaluate") as progress:
        written = stage.run(inputs, out, cfg, device=device, overwrite=overwrite, progress=progress)
    print_paths(written, json_out)
