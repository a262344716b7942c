"""Stage `scan`: find the captures of a dataset (Multi-PIE or plain folders) and write an index.

The index lists every capture with its views in camera order; later stages take it (or the data
folder, which they scan the same way) to know what to process.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from stages import __version__
from stages.core import dataset, io
from stages.core.contract import Context, require_data


@dataclass(frozen=True)
class Config:
    layout: dataset.Layout = "auto"
    """How the data is organised: `multipie` (names like 001_01_01_051_00.png), `folder` (one capture per
    folder of images) or `auto` (Multi-PIE when the names fit)."""
    filters: dataset.Filters = field(default_factory=dataset.Filters)
    """Subjects, sessions, cameras, expressions, shots and protocol to keep."""


PRESETS = {"default": Config()}


def index(data: Path, cfg: Config) -> dataset.DatasetIndex:
    """Scan ``data`` into a filtered DatasetIndex (raises InputError on bad input)."""
    return dataset.scan(data, cfg.layout, cfg.filters)


PATHS = {"out": "index.json"}
"""Named paths `Context.paths` may set: ``out``, the index JSON (default ``WORK/index.json``)."""


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """Scan ``ctx.data`` and write the index JSON (``ctx.paths["out"]``, default ``WORK/index.json``).

    The file is replaced only when its content changed, so make-style tools and mtimes see no
    change on a rerun; returns ``[path]`` when written, else [].
    """
    path = ctx.path("out", PATHS["out"])
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.json", dir=path.parent)
    os.close(fd)
    staging = Path(name)
    try:
        write_index(staging, index(require_data(ctx, "scan"), cfg), cfg)
        if not ctx.overwrite and path.is_file() and path.read_bytes() == staging.read_bytes():
            return []
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return [path]


def write_index(out: Path, found: dataset.DatasetIndex, cfg: Config) -> Path:
    """Write a scanned index as JSON (atomically): summary, warnings and every capture."""
    doc = {"nvf_version": __version__, "config": cfg, **io.to_jsonable(found), "summary": found.summary()}
    return io.write_json(out, doc)
