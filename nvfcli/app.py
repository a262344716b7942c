"""The `nvf` command line: builds the Typer app, registers one command per stage and maps errors.

One error path: a stage raises an `NvfError`; here it becomes one red line on stderr and the exit
code the error carries (2 bad input, 1 failure). ``NVF_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from nvfcli.commands import (
    align,
    cloud,
    depth,
    embed,
    evaluate,
    fetch_models,
    info,
    merge,
    poses,
    reconstruct,
    sample,
    scan,
    synth,
    train,
    triplets,
)
from nvfcli.commands import run as run_command
from nvfcli.console import err_console, setup_logging
from stages import __version__
from stages.core.errors import NvfError


class NvfGroup(TyperGroup):
    """Turns NvfError (and Ctrl-C) into one line on stderr and an exit code, for every command."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except NvfError as exc:
            if os.environ.get("NVF_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/]: finished outputs are kept, rerun to continue")
            raise typer.Exit(130) from None


app = typer.Typer(
    name="nvf",
    cls=NvfGroup,
    help="Geometry-grounded multi-view face data, view-conditioned diffusion and 3D reconstruction (NVF-360).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"nvf {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output (debug).")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")] = False,
) -> None:
    """Run `nvf COMMAND --help` for a command's options and examples."""
    setup_logging(-1 if quiet else verbose)


# In the order of the pipeline, so `nvf --help` reads like the work tree.
app.command("info")(info.info)
app.command("fetch-models")(fetch_models.fetch_models)
app.command("synth")(synth.synth)
app.command("scan")(scan.scan)
app.command("poses")(poses.poses)
app.command("depth")(depth.depth)
app.command("align")(align.align)
app.command("cloud")(cloud.cloud)
app.command("embed")(embed.embed)
app.command("triplets")(triplets.triplets)
app.command("train")(train.train)
app.command("sample")(sample.sample)
app.command("reconstruct")(reconstruct.reconstruct)
app.command("evaluate")(evaluate.evaluate)
app.command("run")(run_command.run)
app.command("merge")(merge.merge)


def run() -> None:
    """Console-script entry point."""
    app()
