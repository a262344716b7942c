"""Stage `scan`: find the captures of a dataset (Multi-PIE or plain folders) and write an index.

The index lists every capture with its views in camera order; later stages take it (or the data
folder, which they scan the same way) to know what to process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from stages import __version__
from stages.core import dataset, io


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


def run(data: Path, out: Path, cfg: Config) -> list[Path]:
    """Scan ``data`` and write the index JSON to ``out``; returns ``[out]``."""
    return [write_index(out, index(data, cfg), cfg)]


def write_index(out: Path, found: dataset.DatasetIndex, cfg: Config) -> Path:
    """Write a scanned index as JSON (atomically): summary, warnings and every capture."""
    doc = {"nvf_version": __version__, "config": cfg, **io.to_jsonable(found), "summary": found.summary()}
    return io.write_json(out, doc)
