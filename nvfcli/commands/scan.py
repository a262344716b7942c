"""`nvf scan`: list the captures of a dataset with counts and warnings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from nvfcli.console import out_console
from nvfcli.options import DataDir, Json, config_options, field_help
from stages import scan as stage
from stages.core import dataset

IdList = Optional[list[str]]


def _filter_help(field: str, hint: str = "") -> str:
    """Help of a filter option: the docstring of its `dataset.Filters` field (so that the two cannot
    drift apart), then the command-line syntax ``hint``."""
    return field_help(dataset.Filters, field, hint)


@config_options(stage.Config, exclude=("filters",))  # the filters are the options above
def scan(
    data: DataDir,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the full index as JSON here.")] = None,
    list_ids: Annotated[bool, typer.Option("--list", help="Print capture ids, one per line.")] = False,
    json_out: Json = False,
    subject: Annotated[IdList, typer.Option(help=_filter_help("subjects", "E.g. 1-10,12 (repeatable)."))] = None,
    session: Annotated[IdList, typer.Option(help=_filter_help("sessions", "E.g. 1,3."))] = None,
    camera: Annotated[IdList, typer.Option(help=_filter_help("cameras", "E.g. 051,050 or 41-51."))] = None,
    expression: Annotated[IdList, typer.Option(help=_filter_help("expressions", "E.g. neutral,smile."))] = None,
    illumination: Annotated[IdList, typer.Option(help=_filter_help("shots", "E.g. 0 or 1-18."))] = None,
    protocol: Annotated[Optional[str], typer.Option(help=_filter_help("protocol"))] = None,
    **changes: Any,
) -> None:
    """Find the captures under DATA and report subjects, sessions and cameras.

    Examples: `nvf scan data/multipie`; `nvf scan data --protocol P --list | head`;
    `nvf scan data --subject 1-20 --out index.json`.
    """
    filters = dataset.Filters(
        subjects=dataset.parse_ids(subject or [], 3, "subject"),
        sessions=dataset.parse_ids(session or [], 2, "session"),
        cameras=dataset.parse_ids(camera or [], 3, "camera"),
        expressions=tuple(e.strip() for value in expression or [] for e in value.split(",") if e.strip()),
        shots=dataset.parse_ids(illumination or [], 2, "illumination"),
        protocol=protocol.upper() if protocol else None,
    )
    cfg = stage.Config(filters=filters, **changes)
    found = stage.index(data, cfg)
    written = stage.write_index(out, found, cfg) if out else None
    if list_ids:
        typer.echo("\n".join(c.id for c in found.captures))
    elif json_out:
        typer.echo(json.dumps({"summary": found.summary(), "warnings": list(found.warnings),
                               "index": str(written) if written else None}, indent=2))  # fmt: skip
    else:
        _print_summary(found, written)


def _print_summary(found: dataset.DatasetIndex, written: Path | None) -> None:
    summary = found.summary()
    table = Table(title=f"{found.root} ({found.layout})", show_header=False)
    for key in ("captures", "images", "subjects"):
        table.add_row(key, str(summary[key]))
    for key in ("per_session", "per_camera", "cameras_per_capture"):
        if summary[key]:
            table.add_row(key.replace("_", " "), ", ".join(f"{k}: {v}" for k, v in summary[key].items()))
    out_console.print(table)
    for warning in found.warnings[:10]:
        out_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if len(found.warnings) > 10:
        out_console.print(f"[yellow]... and {len(found.warnings) - 10} more warnings (see --json or --out)[/]")
    if written:
        typer.echo(str(written))
