"""`nvf embed`: CLIP image embeddings (ViT-B/32, OpenAI weights by default) for every view, cached on disk."""

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
from stages import embed as stage


@config_options(stage.Config, {"workers": Opt(option={"min": 1})})
def embed(
    data: DataDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Work folder: writes OUT/<capture>/embed.safetensors.")],
    preset: Annotated[str, typer.Option(help=preset_help(stage))] = "paper",
    device: Device = "auto",
    shard: Shard = None,
    captures: Captures = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Embed every image of DATA with CLIP (unit-norm rows) into OUT/<capture>/embed.safetensors.

    Examples: `nvf embed data/multipie --out work`; `nvf embed data --out work --precision fp16 --shard 0/8`;
    `nvf embed data --out work --model ViT-L-14@laion2b_s32b_b82k`.
    """
    cfg = stage_preset(stage, preset, changes)
    with progress_bar("embed") as progress:
        ctx = stage_context(out, data=data, shard=shard, captures=captures, device=device, overwrite=overwrite,
                            progress=progress)  # fmt: skip
        written = stage.run(ctx, cfg)
    print_paths(written, json_out)
