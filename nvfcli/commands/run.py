"""`nvf run`: the whole chain (scan -> poses -> depth -> align -> cloud -> embed -> triplets, then the
configured train / sample / reconstruct / evaluate) over one work tree, with OUT/manifest.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from nvfcli.console import out_console, progress_bar
from nvfcli.options import DataDir, Json, Opt, Overwrite, config_options
from stages import pipeline as stage
from stages.core import worktree


@config_options(stage.Config, {
    "until": Opt(hint=f"One of: {', '.join(stage.STEP_NAMES)}."),
    "poses_source": Opt(("--poses-from-groundtruth",), type=bool, default=False,
                        parse=lambda copy: "groundtruth" if copy else None, hint="This flag: groundtruth."),
})  # fmt: skip
def run(
    data: DataDir,
    out: Annotated[Path, typer.Argument(help="Work tree: OUT/<capture>/..., OUT/manifest.json.", show_default=False)],
    preset: Annotated[
        str, typer.Option(help="paper (the paper's models) or tiny (local tiny models: smoke runs).")
    ] = "paper",
    config: Annotated[
        Optional[Path], typer.Option(help="TOML or JSON file: top-level settings, and a stages.NAME table per stage.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    shard: Annotated[Optional[str], typer.Option(help="Shard K/N of the subjects (default: SLURM array task).")] = None,
    captures: Annotated[Optional[str], typer.Option(help="File of capture ids (one per line), or - for stdin.")] = None,
    overwrite: Overwrite = False,
    json_out: Json = False,
    **changes: Any,
) -> None:
    """Run every stage over DATA into OUT; each stage redoes only what changed (inputs, config, versions).

    Examples: `nvf run data/multipie work`; `nvf run data work --until depth`;
    `nvf run data work/shard-0 --shard 0/8` then `nvf merge work/shard-* --out work` and `nvf run data work`;
    `nvf synth s --preset tiny && nvf run s w --preset tiny --poses-from-groundtruth`.
    """
    cfg = stage.load_config(config, stage.PRESETS.get(preset, stage.Config(preset=preset)))  # type: ignore[arg-type]
    cfg = dataclasses.replace(cfg, **changes, overwrite=overwrite or cfg.overwrite)
    ids = worktree.read_capture_ids(captures) if captures else None
    with progress_bar("run") as bar:
        manifest = stage.run(data, out, cfg, shard=worktree.Shard.parse(shard), capture_ids=ids, device=device,
                             progress=lambda name: bar)  # fmt: skip
    if json_out:
        typer.echo(json.dumps(manifest, indent=2))
        return
    table = Table(title=f"{out} ({len(manifest['captures'])} captures)")
    for column in ("stage", "status", "seconds", "files", "MB"):
        table.add_column(column, justify="left" if column in ("stage", "status") else "right")
    for name, entry in manifest["stages"].items():
        mb = entry.get("bytes_written")
        table.add_row(name, entry["status"], f"{entry['seconds']:.1f}" if "seconds" in entry else "",
                      str(entry.get("files_written", "")), f"{mb / 1e6:.1f}" if mb is not None else "")  # fmt: skip
    out_console.print(table)
