"""The `nvf` command line: builds the Typer app, registers one command per stage and maps errors.

One error path: a stage raises an `NvfError`; here it becomes one red line on stderr and the exit
code the error carries (2 bad input, 1 failure). ``NVF_DEBUG=1`` shows the traceback instead.

Commands load lazily: `nvf --help` lists `COMMANDS` without importing any stage, and `nvf poses`
imports the poses stage only (torch, which most stages need, takes ~2 s to import).
"""

from __future__ import annotations

import importlib
import os
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from nvfcli.console import err_console, setup_logging
from stages import __version__
from stages.core.errors import NvfError

COMMANDS: dict[str, tuple[str, str]] = {
    "info": ("info", "Show what nvf runs on: library versions, devices (free/total memory), caches, model hub."),
    "fetch-models": ("fetch_models", "Fetch the weights every stage loads into the caches, then print the "
                     "environment for offline nodes."),
    "synth": ("synth", "Render synthetic heads from the 15 Multi-PIE cameras, with ground-truth poses, depth "
              "and surface."),
    "scan": ("scan", "Find the captures under DATA and report subjects, sessions and cameras."),
    "poses": ("poses", "Estimate camera poses of every capture under DATA (SfM, then SLERP fallback for the rest)."),
    "depth": ("depth", "Predict depth for every image of DATA, batched on the GPU, into "
              "OUT/<capture>/depth.safetensors."),
    "align": ("align", "Fit each view's depth to the reference (SfM points by default) and write "
              "WORK/<capture>/aligned.safetensors."),
    "cloud": ("cloud", "Fuse every capture's aligned depth into WORK/<capture>/cloud.ply + cloud_metrics.json."),
    "embed": ("embed", "Embed every image of DATA with CLIP (unit-norm rows) into OUT/<capture>/embed.safetensors."),
    "triplets": ("triplets", "Build WORK/triplets.safetensors (+ .csv, .images.csv) from the poses and embed "
                 "records of WORK."),
    "train": ("train", "Train on the train split of TRIPLETS; checkpoints go to OUT/checkpoints/step-N/."),
    "sample": ("sample", "Sample novel views of PHOTO with the model of a run into OUT/views/, with their poses."),
    "reconstruct": ("reconstruct", "Train nerfstudio on the views of SOURCE; write OUT/points.ply in the input's "
                    "frame and OUT/recon_metrics.json."),
    "evaluate": ("evaluate", "Score what the pipeline made against references and write a report with figures."),
    "run": ("run", "Run every stage over DATA into OUT; each stage redoes only what changed (inputs, config, "
            "versions)."),
    "merge": ("merge", "Merge shard work trees into OUT: every capture in exactly one shard with all its outputs, "
              "no conflicts."),
}  # fmt: skip
"""Command name -> (module under nvfcli.commands, the first line of its docstring), in the order of
the pipeline so that `nvf --help` reads like the work tree. The module defines the command as a
function of the same name (dashes as underscores)."""


def load_command(name: str) -> click.Command:
    """Import command ``name``'s module and build its click command as Typer would."""
    module = importlib.import_module(f"nvfcli.commands.{COMMANDS[name][0]}")
    single = typer.Typer(rich_markup_mode="rich", pretty_exceptions_enable=False, add_completion=False)
    single.command(name)(getattr(module, name.replace("-", "_")))
    command = typer.main.get_command(single)
    command.name = name
    return command


class LazyCommand(click.Command):
    """A command known by name and help line; its module is imported when it runs (or shows --help)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, help=COMMANDS[name][1])
        self._loaded: click.Command | None = None

    def loaded(self) -> click.Command:
        if self._loaded is None:
            self._loaded = load_command(self.name or "")
        return self._loaded

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:  # fmt: skip
        return self.loaded().make_context(info_name, args, parent=parent, **extra)


class NvfGroup(TyperGroup):
    """Lists `COMMANDS` lazily, and turns NvfError (and Ctrl-C) into one line on stderr and an exit
    code, for every command."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return LazyCommand(cmd_name) if cmd_name in COMMANDS else None

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


def run() -> None:
    """Console-script entry point."""
    app()
