"""`nvf depth`: batched monocular depth for every view (DPT-Large by default), cached on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import (
    BatchSize,
    Cache,
    Captures,
    DataDir,
    Device,
    Json,
    Layout,
    Overwrite,
    PresetPrecision,
    Shard,
    Workers,
    stage_preset,
)
from stages import depth as stage
from stages.core import worktree


def depth(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Work folder: writes OUT/<capture>/depth.safetensors.")],
    preset: Annotated[
        str,
        typer.Option(help="Stage preset: paper (Intel/dpt-large), fast (Depth-Anything-V2-Small, fp16 maps) or tiny."),
    ] = "paper",
    model: Annotated[
        Optional[str],
        typer.Option(
            help="Hub id, local folder or depth-anything-v2-small instead "
            "of the preset's (DA-V2 Base/Large: non-commercial)."
        ),
    ] = None,
    layout: Layout = "auto",
    precision: PresetPrecision = None,
    batch_size: BatchSize = None,
    max_res: Annotated[Optional[int], typer.Option(help="Store maps with the longer side at most this.")] = None,
    interpolation: Annotated[
        Optional[stage.Interpolation], typer.Option(help="Resampling to the stored size [default: bicubic].")
    ] = None,
    store_dtype: Annotated[
        Optional[stage.StoreDtype],
        typer.Option("--dtype", help="Stored values: float32 or float16 [default: the preset's]."),
    ] = None,
    depth_kind: Annotated[
        Optional[stage.DepthKind], typer.Option(help="What the model predicts [default: auto, from its config].")
    ] = None,
    cache: Cache = True,
    workers: Workers = 4,
    device: Device = "auto",
    shard: Shard = None,
    captures: Captures = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Predict depth for every image of DATA, batched on the GPU, into OUT/<capture>/depth.safetensors.

    Examples: `nvf depth data/multipie --out work`; `nvf depth data --out work --precision fp16 --max-res 384`;
    `nvf depth data --out work --preset fast --shard 0/8`.
    """
    cfg = stage_preset(stage, preset, dict(model=model, layout=layout, precision=precision, batch_size=batch_size,
                                           max_res=max_res, interpolation=interpolation, store_dtype=store_dtype,
                                           depth_kind=depth_kind, cache=cache, workers=workers))  # fmt: skip
    ids = worktree.read_capture_ids(captures) if captures else None
    with progress_bar("depth") as progress:
        written = stage.run(data, out, cfg, shard=worktree.Shard.parse(shard), capture_ids=ids, overwrite=overwrite,
                            device=device, progress=progress)  # fmt: skip
    print_paths(written, json_out)
