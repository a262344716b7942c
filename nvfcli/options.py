"""Option aliases shared by every command, so the same option has the same name and help everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from stages.core.batching import Precision as _Precision
from stages.core.dataset import Layout as _Layout

Json = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Redo work whose outputs already exist.")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same output.")]
DataDir = Annotated[
    Path, typer.Argument(help="Dataset folder (Multi-PIE tree or folders of images).", show_default=False)
]
OutDir = Annotated[Path, typer.Argument(help="Output folder.", show_default=False)]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
BatchSize = Annotated[
    Optional[int], typer.Option("--batch-size", help="Images per batch, cut per capture (default: the whole capture).")
]
Shard = Annotated[
    Optional[str],
    typer.Option("--shard", help="Process shard K/N of the subjects, 0 <= K < N (default: SLURM array task)."),
]
Captures = Annotated[
    Optional[str], typer.Option("--captures", help="File of capture ids (one per line), or - for stdin.")
]
Layout = Annotated[_Layout, typer.Option("--layout", help="Dataset layout: auto, multipie or folder.")]
Precision = Annotated[_Precision, typer.Option("--precision", help="fp32, fp16 (CUDA only) or bf16.")]
PresetPrecision = Annotated[
    Optional[_Precision], typer.Option("--precision", help="fp32, fp16 (CUDA only) or bf16 [default: the preset's].")
]


def stage_preset(module: Any, name: str, changes: dict[str, Any]) -> Any:
    """The stage's Config named ``--preset NAME`` (its `PRESETS`), with the options given (not None)
    replacing its fields: `--preset` always names a stage preset."""
    import dataclasses

    from stages.core.errors import InputError

    presets = module.PRESETS
    if name not in presets:
        raise InputError(f"unknown --preset '{name}': choose one of {', '.join(presets)}")
    return dataclasses.replace(presets[name], **{k: v for k, v in changes.items() if v is not None})


Workers = Annotated[int, typer.Option("--workers", help="Image decoding/preprocessing threads.", min=1)]
Cache = Annotated[bool, typer.Option("--cache/--no-cache", help="Use the on-disk cache of computed results.")]
