"""`nvf cloud`: fuse aligned depth into one filtered point cloud with its Table V metrics (Algorithm 2)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import Captures, Device, Json, Opt, Overwrite, Shard, config_options, preset_help, stage_context
from stages import cloud as stage


def _range(text: Optional[str]) -> Optional[tuple[float, float]]:
    if text is None:
        return None
    try:
        near, far = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--depth-range wants MIN,MAX in scene units, got {text!r}") from None
    return near, far


def _consistency(k: int) -> dict[str, Any]:
    return {"consistency": True, "consistency_views": k} if k else {"consistency": False}


@config_options(stage.Config, {
    "outlier_removal": Opt(("--outliers/--no-outliers",)),
    "outlier_std_ratio": Opt(("--outlier-std",)),
    "voxel_pixels": Opt(("--voxel",)),
    "depth_range": Opt(type=str, parse=_range, hint="Give MIN,MAX."),
    "mask_dir": Opt(type=Path, parse=str),
    "use_masks": Opt(("--masks/--no-masks",)),
    "consistency": Opt(type=int, parse=_consistency,
                       covers=("consistency_views",), option={"min": 0}, hint="Give K (0 = off) [default: 2]."),
    "smooth_px": Opt(("--smooth",), option={"min": 1}),
    "edge_filter": Opt(("--edges/--no-edges",)),
    "reference": Opt(type=Path, parse=str),
})  # fmt: skip
def cloud(
    work: Annotated[
        Path, typer.Argument(help="Work folder holding <capture>/aligned.safetensors + poses.", show_default=False)
    ],
    data: Annotated[Optional[Path], typer.Option(help="The dataset the work tree was made from (colours).")] = None,
    preset: Annotated[str, typer.Option(help=preset_help(stage, "Starting point"))] = "default",
    device: Device = "auto",
    shard: Shard = None,
    captures: Captures = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Fuse every capture's aligned depth into WORK/<capture>/cloud.ply + cloud_metrics.json.

    Examples: `nvf cloud work --data data`; `nvf cloud work --consistency 2 --no-uniformity`;
    `nvf cloud work --data data/synth --reference data/synth/groundtruth` (Chamfer and F-score).
    """
    if preset not in stage.PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose from {', '.join(stage.PRESETS)}")
    cfg = dataclasses.replace(stage.PRESETS[preset], **changes)
    with progress_bar("cloud") as progress:
        ctx = stage_context(work, data=data, shard=shard, captures=captures, device=device, overwrite=overwrite,
                            progress=progress)  # fmt: skip
        written = stage.run(ctx, cfg)
    print_paths(written, json_out)
