"""`nvf masks`: batched head masks (head, hair, background) for every view (a face-parsing SegFormer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from nvfcli.console import print_paths, progress_bar
from nvfcli.options import (
    Captures,
    DataDir,
    Device,
    Json,
    Opt,
    Overwrite,
    Shard,
    config_options,
    preset_help,
    stage_context,
    stage_preset,
)
from stages import masks as stage


@config_options(stage.Config, {"workers": Opt(option={"min": 1})})
def masks(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Work folder: writes OUT/<capture>/masks.safetensors.")],
    preset: Annotated[str, typer.Option(help=preset_help(stage))] = "paper",
    device: Device = "auto",
    shard: Shard = None,
    captures: Captures = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Predict head masks (head, hair, background) for every image of DATA into OUT/<capture>/masks.safetensors.

    align, cloud, reconstruct and evaluate use them when present. Examples: `nvf masks data --out work`;
    `nvf masks data --out work --preset tiny --batch-size 2`; `nvf masks data --out work --shard 0/8`.
    """
    cfg = stage_preset(stage, preset, changes)
    with progress_bar("masks") as progress:
        ctx = stage_context(out, data=data, shard=shard, captures=captures, device=device, overwrite=overwrite,
                            progress=progress)  # fmt: skip
        written = stage.run(ctx, cfg)
    print_paths(written, json_out)
