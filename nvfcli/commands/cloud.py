"""`nvf cloud`: fuse aligned depth into one filtered point cloud with its Table V metrics (Algorithm 2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Captures, Device, Json, Overwrite, Shard
from stages import cloud as stage
from stages.core import worktree


def _range(text: Optional[str]) -> Optional[tuple[float, float]]:
    if text is None:
        return None
    try:
        near, far = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--depth-range wants MIN,MAX in scene units, got {text!r}") from None
    return near, far


def cloud(
    work: Annotated[
        Path, typer.Argument(help="Work folder holding <capture>/aligned.safetensors + poses.", show_default=False)
    ],
    data: Annotated[Optional[Path], typer.Option(help="The dataset the work tree was made from (colours).")] = None,
    preset: Annotated[str, typer.Option(help=f"Starting point: {', '.join(stage.PRESETS)}.")] = "default",
    outliers: Annotated[
        Optional[bool], typer.Option("--outliers/--no-outliers", help="Statistical outlier removal.")
    ] = None,
    outlier_neighbors: Annotated[Optional[int], typer.Option(help="Neighbours of the outlier test.")] = None,
    outlier_std: Annotated[
        Optional[float], typer.Option(help="Outlier threshold in std of the mean neighbour distance.")
    ] = None,
    voxel: Annotated[Optional[float], typer.Option(help="Voxel edge in pixel footprints (0 = off).")] = None,
    voxel_size: Annotated[Optional[float], typer.Option(help="Voxel edge in scene units (overrides --voxel).")] = None,
    uniformity: Annotated[
        Optional[bool], typer.Option("--uniformity/--no-uniformity", help="Poisson-disk thinning of dense regions.")
    ] = None,
    uniformity_radius: Annotated[Optional[float], typer.Option(help="Thinning radius in median spacings.")] = None,
    depth_range: Annotated[Optional[str], typer.Option(help="Foreground z-depth range MIN,MAX (scene units).")] = None,
    mask_dir: Annotated[Optional[Path], typer.Option(help="Folder of foreground masks named like the images.")] = None,
    masks: Annotated[
        Optional[bool],
        typer.Option("--masks/--no-masks", help="Keep the head mask of WORK/<capture>/masks.safetensors when present."),
    ] = None,
    consistency: Annotated[
        Optional[int],
        typer.Option(help="Keep points whose depth agrees with >= K other views (0 = off) [default: 2].", min=0),
    ] = None,
    min_quality: Annotated[
        Optional[str], typer.Option(help="Fuse views whose align quality is at least: failed, weak or good.")
    ] = None,
    smooth: Annotated[Optional[int], typer.Option(help="Median window (pixels) before fusion; 1 = off.", min=1)] = None,
    edges: Annotated[
        Optional[bool], typer.Option("--edges/--no-edges", help="Drop depth-edge (flying) and salt pixels.")
    ] = None,
    consistency_tolerance: Annotated[
        Optional[float], typer.Option(help="Relative depth tolerance of agreement.")
    ] = None,
    reference: Annotated[
        Optional[Path], typer.Option(help="Reference PLY, or a folder of <capture>/surface.ply: Chamfer, F-score.")
    ] = None,
    fscore_threshold: Annotated[
        Optional[float], typer.Option(help="F-score threshold, scene units [default: 1% of the reference's size].")
    ] = None,
    device: Device = "auto",
    shard: Shard = None,
    captures: Captures = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Fuse every capture's aligned depth into WORK/<capture>/cloud.ply + cloud_metrics.json.

    Examples: `nvf cloud work --data data`; `nvf cloud work --consistency 2 --no-uniformity`;
    `nvf cloud work --data data/synth --reference data/synth/groundtruth` (Chamfer and F-score).
    """
    if preset not in stage.PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {', '.join(stage.PRESETS)}")
    changes = {
        "outlier_removal": outliers, "outlier_neighbors": outlier_neighbors, "outlier_std_ratio": outlier_std,
        "voxel_pixels": voxel, "voxel_size": voxel_size, "uniformity": uniformity,
        "uniformity_radius": uniformity_radius,
        "depth_range": _range(depth_range), "mask_dir": str(mask_dir) if mask_dir else None,
        "use_masks": masks,
        "consistency": None if consistency is None else consistency > 0, "consistency_views": consistency or None,
        "min_quality": min_quality, "smooth_px": smooth, "edge_filter": edges,
        "consistency_tolerance": consistency_tolerance, "reference": str(reference) if reference else None,
        "fscore_threshold": fscore_threshold,
    }  # fmt: skip
    cfg = dataclasses.replace(stage.PRESETS[preset], **{k: v for k, v in changes.items() if v is not None})
    ids = worktree.read_capture_ids(captures) if captures else None
    with progress_bar("cloud") as progress:
        written = stage.run(work, cfg, data=data, shard=worktree.Shard.parse(shard), capture_ids=ids,
                            overwrite=overwrite, progress=progress, device=device)  # fmt: skip
    print_paths(written, json_out)
