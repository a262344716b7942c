"""`nvf merge`: join the work trees of `nvf run --shard K/N` into one, checking nothing is missing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from nvfcli.options import Json
from stages import merge as stage


def merge(
    shards: Annotated[list[Path], typer.Argument(help="The shards' OUT folders.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The merged work tree.")],
    mode: Annotated[str, typer.Option(help="hardlink (falls back to copy), copy or move.")] = "hardlink",
    data: Annotated[
        Optional[Path], typer.Option(help="Dataset, to name missing captures (default: the manifests').")
    ] = None,
    json_out: Json = False,
) -> None:
    """Merge shard work trees into OUT: every capture in exactly one shard with all its outputs, no conflicts.

    Examples: `nvf merge work/shard-* --out work`; `nvf merge s0 s1 s2 --out work --mode move`;
    then `nvf run DATA work` runs the stages that need every capture (triplets, train, ...).
    """
    merged = stage.run(shards, out, mode=mode, data=data)  # type: ignore[arg-type]
    if json_out:
        typer.echo(json.dumps(merged, indent=2))
    else:
        typer.echo(f"{out}: {len(merged['captures'])} captures from {len(shards)} shard(s)")
