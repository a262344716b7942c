"""`nvf depth`: batched monocular depth for every view (DPT-Large by default), cached on disk."""

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
from stages import depth as stage


@config_options(stage.Config, {
    "model": Opt(hint="(Depth-Anything-V2 Base/Large: non-commercial.)"),
    "store_dtype": Opt(("--dtype",)),
    "workers": Opt(option={"min": 1}),
})  # fmt: skip
def depth(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Work folder: writes OUT/<capture>/depth.safetensors.")],
    preset: Annotated[str, typer.Option(help=preset_help(stage))] = "paper",
    device: Device = "auto",
    shard: Shard = None,
    captures: Captures = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Predict depth for every image of DATA, batched on the GPU, into OUT/<capture>/depth.safetensors.

    Examples: `nvf depth data/multipie --out work`; `nvf depth data --out work --precision fp16 --max-res 384`;
    `nvf depth data --out work --preset fast --shard 0/8`.
    """
    cfg = stage_preset(stage, preset, changes)
    with progress_bar("depth") as progress:
        ctx = stage_context(out, data=data, shard=shard, captures=captures, device=device, overwrite=overwrite,
                            progress=progress)  # fmt: skip
        written = stage.run(ctx, cfg)
    print_paths(written, json_out)
