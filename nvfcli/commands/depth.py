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
    Precision,
    Shard,
    Workers,
)
from stages import depth as stage
from stages.core import worktree


def depth(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Work folder: writes OUT/<capture>/depth.safetensors.")],
    preset: Annotated[str, typer.Option(help="Model preset: paper (Intel/dpt-large) or tiny (tests).")] = "paper",
    model: Annotated[
        Optional[str],
        typer.Option(
            help="Hub id, local folder or depth-anything-v2-small instead "
            "of the preset's (DA-V2 Base/Large: non-commercial)."
        ),
    ] = None,
    layout: Layout = "auto",
    precision: Precision = "fp32",
    batch_size: BatchSize = None,
    max_res: Annotated[Optional[int], typer.Option(help="Store maps with the longer side at most this.")] = None,
    interpolation: Annotated[stage.Interpolation, typer.Option(help="Resampling to the stored size.")] = "bicubic",
    store_dtype: Annotated[
        stage.StoreDtype, typer.Option("--dtype", help="Stored values: float32 or float16.")
    ] = "float32",
    depth_kind: Annotated[
        stage.DepthKind, typer.Option(help="What the model predicts (auto: from its config).")
    ] = "auto",
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
    `nvf depth data --out work --model depth-anything-v2-small --shard 0/8`.
    """
    cfg = stage.Config(preset=preset, model=model, layout=layout, precision=precision, batch_size=batch_size,
                       max_res=max_res, interpolation=interpolation, store_dtype=store_dtype, depth_kind=depth_kind,
                       cache=cache, workers=workers)  # fmt: skip
    ids = worktree.read_capture_ids(captures) if captures else None
    with progress_bar("depth") as progress:
        written = stage.run(data, out, cfg, shard=worktree.Shard.parse(shard), capture_ids=ids, overwrite=overwrite,
                            device=device, progress=progress)  # fmt: skip
    print_paths(written, json_out)
