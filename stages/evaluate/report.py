"""The markdown report of `nvf evaluate` and the side-by-side comparison with another report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stages.core import io
from stages.core.errors import InputError
from stages.evaluate.generated import SECTION_TITLES


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if math.isnan(value):
            return "—"
        return f"{value:.4g}"
    return str(value)


def _figure_key(row: dict) -> tuple[str, str, str]:
    return (row["section"], row["metric"], row["bucket"])


def compare_rows(this: list[dict], other: list[dict]) -> list[dict]:
    """Side-by-side rows for figures present in either run, with the difference (this - other)."""
    theirs = {_figure_key(r): r for r in other}
    mine = {_figure_key(r): r for r in this}
    rows = []
    for key in list(mine) + [k for k in theirs if k not in mine]:
        a, b = mine.get(key, {}).get("value"), theirs.get(key, {}).get("value")
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        same_protocol = key in mine and key in theirs and mine[key]["protocol"] == theirs[key]["protocol"]
        rows.append({"section": key[0], "metric": key[1], "bucket": key[2], "this": a, "other": b, "delta": delta,
                     "better": (mine.get(key) or theirs.get(key)).get("better", ""),
                     "same_protocol": same_protocol})  # fmt: skip
    return rows


def render_report(doc: dict, figure_files: dict[str, str]) -> str:
    """The markdown report: inputs, one table per section with its protocol, figures, skips, comparison."""
    lines = ["# nvf evaluation report", ""]
    if doc["config"].get("label"):
        lines += [f"**{doc['config']['label']}**", ""]
    lines += [f"nvf {doc['nvf_version']}; inputs:", ""]
    lines += [f"- {k}: `{v}`" for k, v in doc["inputs"].items() if v]
    by_section: dict[str, list[dict]] = {}
    for row in doc["figures"]:
        by_section.setdefault(row["section"], []).append(row)
    titles = {"poses": "Poses", "depth": "Depth", "clouds": "Point clouds", "views": "Novel views",
              "reconstruction": "Reconstruction (held-out views)",
              **SECTION_TITLES}  # fmt: skip
    for section, rows in by_section.items():
        lines += ["", f"## {titles.get(section, section)}", "", "| metric | bucket | value | n | unit | better |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for row in rows:
            value = _fmt(row["value"]) + (f" ({row['note']})" if row.get("note") else "")
            lines.append(
                f"| {row['metric']} | {row['bucket']} | {value} | {row['n']} | {row['unit']} | {row['better']} |"
            )
        protocol = doc[section]["protocol"]
        if doc[section].get("status", "ok") != "ok":
            lines += ["", f"**{doc[section]['status']}**"]
        lines += ["", "Protocol: " + "; ".join(f"{k} = {_fmt(v)}" for k, v in protocol.items() if v is not None)]
        if section in figure_files:
            lines += ["", f"![{section}]({figure_files[section]})"]
    if doc["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- **{s['metric']}**: {s['reason']}" for s in doc["skipped"]]
    if doc.get("compare"):
        lines += ["", f"## Comparison with `{doc['compare']['other']}`", "",
                  "| section | metric | bucket | this | other | this − other | better | same protocol |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in doc["compare"]["rows"]:
            lines.append(f"| {row['section']} | {row['metric']} | {row['bucket']} | {_fmt(row['this'])} | "
                         f"{_fmt(row['other'])} | {_fmt(row['delta'])} | {row['better']} | "
                         f"{'yes' if row['same_protocol'] else 'NO'} |")  # fmt: skip
    lines += ["", "## Conventions", ""] + [f"- {k}: {v}" for k, v in doc["conventions"].items()]
    return "\n".join(lines) + "\n"


def compare_section(compare: Path, rows: list[dict]) -> dict:
    """{other, rows}: `rows` (this run's figures, JSON-safe) side by side with the report at `compare`
    (a report folder or its metrics.json)."""
    other_path = compare / "metrics.json" if compare.is_dir() else compare
    other = io.read_json(other_path)
    if not isinstance(other, dict) or "figures" not in other:
        raise InputError(f"{other_path}: not an nvf evaluate metrics.json (no 'figures'); pass a report folder")
    return {"other": str(other_path.parent), "rows": compare_rows(rows, other["figures"])}
