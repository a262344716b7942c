"""The CLI's one rich console (stderr), its logging handler and progress bars.

stdout carries results (paths, tables, JSON) so commands pipe; everything else goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err_console = Console(stderr=True)
out_console = Console(soft_wrap=True)


def setup_logging(verbosity: int) -> None:
    """-q: errors only; default: info; -v: debug. Installs one rich handler on the 'nvf' logger."""
    level = logging.ERROR if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    logger = logging.getLogger("nvf")
    logger.handlers.clear()
    handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None]]:
    """Yield a ``progress(done, total)`` callback drawing a rich bar on stderr (hidden when not a TTY)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def print_paths(paths: Iterable[Path], as_json: bool = False) -> None:
    """A command's result on stdout: the paths it wrote, one per line, or a JSON list with --json."""
    paths = [str(p) for p in paths]
    typer.echo(json.dumps(paths, indent=2) if as_json else "\n".join(paths))
