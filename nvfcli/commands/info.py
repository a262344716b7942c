"""`nvf info`: versions, devices with free memory, cache folders and whether the model hub answers."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from nvfcli.console import out_console
from nvfcli.options import Json
from stages.core import environment


def info(json_out: Json = False) -> None:
    """Show what nvf runs on: library versions, devices (free/total memory), caches, model hub.

    Example: `nvf info --json > env.json` to record a cluster node's setup.
    """
    report = environment.report()
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(show_header=False, title=f"nvf {report['nvf']}")
    table.add_row("python", report["python"])
    for name, version in report["libraries"].items():
        table.add_row(name, version or "[red]not installed[/]")
    for device in report["devices"]:
        table.add_row(device["name"], f"{device['free_gib']:.1f} GiB free of {device['total_gib']:.1f} GiB")
    for name, path in report["caches"].items():
        table.add_row(name, path)
    hub = report["hub"]
    table.add_row("model hub", f"{hub['endpoint']}: " + ("offline mode" if hub["offline"] else
                  "reachable" if hub["reachable"] else "[yellow]not reachable[/] (use cached or --preset tiny)"))  # fmt: skip
    out_console.print(table)
