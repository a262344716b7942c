"""The `nvf` command line: builds the Typer app, registers one command per stage and maps errors.

One error path: a stage raises an `NvfError`; here it becomes one red line on stderr and the exit
code the error carries (2 bad input, 1 failure). ``NVF_DEBUG=1`` shows the traceback instead.

Commands load lazily: `nvf --help` lists `COMMANDS` with their docstrings' first lines, read without importing any stage, and `nvf poses`
imports the poses stage only (torch, which most stages need, takes ~2 s to import).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.markup import escape
from typer.core import TyperGroup

from nvfcli.console import err_console, readable_help, setup_logging
from stages import __version__
from stages.core.errors import NvfError

COMMANDS: tuple[str, ...] = (
    "info", "fetch-models", "synth", "scan", "poses", "depth", "masks", "align", "cloud", "embed", "triplets", "train",
    "sample", "reconstruct", "evaluate", "run", "merge",
)  # fmt: skip
"""Command names in the order of the pipeline, so that `nvf --help` reads like the work tree. Command
``fetch-models`` is the function ``fetch_models`` of module ``nvfcli.commands.fetch_models``."""


def _attribute(name: str) -> str:
    return name.replace("-", "_")


def help_line(name: str) -> str:
    """The first line of command ``name``'s docstring, read from its source without importing it
    (importing would import its stage, and most stages import torch)."""
    spec = importlib.util.find_spec(f"nvfcli.commands.{_attribute(name)}")
    if spec is None or not str(spec.origin).endswith(".py"):  # no source shipped: import it after all
        return (load_command(name).help or "").splitlines()[0]
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == _attribute(name))
    return (ast.get_docstring(function) or "").splitlines()[0]


def load_command(name: str) -> click.Command:
    """Import command ``name``'s module and build its click command as Typer would."""
    module = importlib.import_module(f"nvfcli.commands.{_attribute(name)}")
    single = typer.Typer(rich_markup_mode="rich", pretty_exceptions_enable=False, add_completion=False)
    single.command(name)(getattr(module, _attribute(name)))
    command = typer.main.get_command(single)
    command.name = name
    return command


class LazyCommand(click.Command):
    """A command known by name and help line; its module is imported when it runs (or shows --help)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, help=help_line(name))
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
            # the message is plain text: escape it, or rich eats brackets such as nvf[face] as markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/]: finished outputs are kept, rerun to continue")
            raise typer.Exit(130) from None


readable_help()

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
