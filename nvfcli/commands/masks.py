"""`nvf masks`: batched head masks (head, hair, background) for every view (a face-parsing SegFormer)."""

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
from stages import masks as stage
from stages.core import worktree


def masks(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Work folder: writes OUT/<capture>/masks.safetensors.")],
    preset: Annotated[
        str, typer.Option(help="Stage preset: paper (jonathandinu/face-parsing), fast (fp16) or tiny (tests).")
    ] = "paper",
    model: Annotated[
        Optional[str], typer.Option(help="Hub id or local folder of a face-parsing segmentation model.")
    ] = None,
    layout: Layout = "auto",
    precision: PresetPrecision = None,
    batch_size: BatchSize = None,
    cache: Cache = True,
    workers: Workers = 4,
    device: Device = "auto",
    shard: Shard = None,
    captures: Captures = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
) -> None:
    """Predict head masks (head, hair, background) for every image of DATA into OUT/<capture>/masks.safetensors.

    align, cloud, reconstruct and evaluate use them when present. Examples: `nvf masks data --out work`;
    `nvf masks data --out work --preset tiny --batch-size 2`; `nvf masks data --out work --shard 0/8`.
    """
    cfg = stage_preset(stage, preset, dict(model=model, layout=layout, precision=precision, batch_size=batch_size,
                                           cache=cache, workers=workers))  # fmt: skip
    ids = worktree.read_capture_ids(captures) if captures else None
    with progress_bar("masks") as progress:
        written = stage.run(data, out, cfg, shard=worktree.Shard.parse(shard), capture_ids=ids, overwrite=overwrite,
                            device=device, progress=progress)  # fmt: skip
    print_paths(written, json_out)
