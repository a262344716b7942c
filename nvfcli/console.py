"""The CLI's one rich console (stderr), its logging handler and progress bars.

stdout carries results (paths, tables, JSON) so commands pipe; everything else goes to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.logging import RichHandler
from rich.padding import Padding
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

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


class _OptionsTable(Table):
    """Typer's options table laid out for reading: each option's names and type in one cell, its help
    beside it in the rest of the width, or under it (indented) where the names are long. Typer's own
    five-column table squeezes help into a column of a few words at 80 characters."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._nvf_rows: list[tuple[Text, RenderableType]] = []

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        *labels, help_cell = (Text(c) if isinstance(c, str) else c for c in cells)
        if len(labels) == 6:  # typer's required marker first
            required, *labels = labels
        else:
            required = Text("")
        long, short, negative, negative_short, kind = labels
        label = Text(", ").join(p for p in (long, short) if p.plain)
        negatives = Text(", ").join(p for p in (negative, negative_short) if p.plain)
        if negatives.plain:
            label.append_text(Text("/") + negatives)
        if required.plain:
            label = required + Text(" ") + label
        if kind.plain and kind.plain != "<bool>":  # a flag's type says nothing
            label.append_text(Text(" ") + kind)
        self._nvf_rows.append((label, help_cell))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        widest = max((label.cell_len for label, _ in self._nvf_rows), default=0)
        column = min(widest, max(16, width - 52))  # help keeps at least ~50 columns beside the names
        rows: list[RenderableType] = []
        for label, help_cell in self._nvf_rows:
            if label.cell_len <= column:
                grid = Table.grid(padding=(0, 2))
                grid.add_column(width=column, no_wrap=True)
                grid.add_column(ratio=1)
                grid.add_row(label, help_cell)
                rows.append(grid)
            else:
                rows.append(Group(label, Padding(help_cell, (0, 0, 0, min(column + 2, 8)))))
        yield Group(*rows)


def readable_help() -> None:
    """Lay out every command's options panels with `_OptionsTable` (typer builds them with ``Table``)."""
    from typer import rich_utils

    original = getattr(rich_utils, "_print_options_panel", None)
    if original is None or getattr(original, "nvf_readable", False):
        return

    def print_options_panel(*args: Any, **kwargs: Any) -> None:
        rich_utils.Table = _OptionsTable
        try:
            original(*args, **kwargs)
        finally:
            rich_utils.Table = Table

    print_options_panel.nvf_readable = True  # type: ignore[attr-defined]
    rich_utils._print_options_panel = print_options_panel
