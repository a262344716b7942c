"""Option aliases shared by every command, so the same option has the same name and help everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo work whose outputs already exist.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same output.")]
DataDir = Annotated[Path, typer.Argument(help="Dataset folder (Multi-PIE tree or folders of images).", show_default=False)]
OutDir = Annotated[Path, typer.Argument(help="Output folder.", show_default=False)]
