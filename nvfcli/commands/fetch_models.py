"""`nvf fetch-models`: download every default weight, check each loads offline, print the offline env."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from nvfcli.console import progress_bar
from nvfcli.options import Json
from stages import fetch as stage


def fetch_models(
    preset: Annotated[str, typer.Option(help="paper (the paper's weights) or tiny (built locally).")] = "paper",
    cache: Annotated[
        Optional[Path], typer.Option(help="Put every cache under this folder (a shared file system).")
    ] = None,
    check: Annotated[bool, typer.Option("--check/--no-check", help="Load each model offline afterwards.")] = True,
    json_out: Json = False,
) -> None:
    """Fetch the weights every stage loads into the caches, then print the environment for offline nodes.

    Examples: `nvf fetch-models`; `nvf fetch-models --cache /shared/nvf-cache` on a login node, then
    `eval "$(nvf fetch-models --cache /shared/nvf-cache)"` (cached: no network) in the job script.
    """
    with progress_bar("fetching") as progress:
        result = stage.run(preset, cache, check=check, progress=progress)
    if json_out:
        typer.echo(json.dumps({"weights": result.statuses, "checks": result.checks, "env": result.env}, indent=2))
        return
    for name, status in result.statuses.items():
        typer.echo(f"# {name}: {status}{', loads offline' if result.checks.get(name) == 'ok' else ''}", err=True)
    typer.echo("\n".join(f"export {key}={value}" for key, value in result.env.items()))
