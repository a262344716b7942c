"""`nvf evaluate --reconstruction`: the held-out scores `nvf reconstruct` measured, carried into the report.

Reads ``recon_metrics.json`` (one reconstruction folder, or a tree of ``<capture>/recon_metrics.json``)
and reports nerfstudio's PSNR, SSIM and LPIPS (when it was computed) on the held-out views, per
capture then averaged over captures, with the method, iterations and eval split as the protocol.
These are the reconstruction's own figures on views it did not train on; nothing is recomputed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from stages.core import io
from stages.core.errors import InputError

METRICS_FILE = "recon_metrics.json"  # what stages.reconstruct writes (its METRICS_FILE)
_BETTER = {"psnr": ("dB", "higher"), "ssim": ("", "higher"), "lpips": ("", "lower")}


def reconstruction_section(found: dict[str, Path], figures: Any) -> dict[str, Any]:
    """{protocol, captures} from {capture: recon_metrics.json}; adds one row per metric to `figures`."""
    captures: dict[str, dict[str, Any]] = {}
    for capture, path in found.items():
        doc = io.read_json(path)
        if not isinstance(doc, dict) or not isinstance(doc.get("metrics"), dict) or "views" not in doc:
            raise InputError(
                f"{path}: not an nvf reconstruct {METRICS_FILE} (no metrics or views): rerun `nvf reconstruct`"
            )
        captures[capture] = {
            "input": str(path),
            "method": doc.get("method"),
            "iterations": doc.get("iterations"),
            "held_out": doc["views"].get("eval", []),
            "metrics": doc["metrics"],
            "metrics_source": doc.get("metrics_source"),
        }
    methods = sorted({f"{c['method']} x {c['iterations']} iterations" for c in captures.values()})
    protocol = {
        "source": f"nvf reconstruct's {METRICS_FILE} (nerfstudio's own image metrics on full renders)",
        "views": "held-out views only (the reconstruction never trained on them)",
        "method": methods,
        "lpips": "as recorded; absent where the reconstruction ran with lpips = false",
    }
    for metric, (unit, better) in _BETTER.items():
        values = [c["metrics"][metric] for c in captures.values() if isinstance(c["metrics"].get(metric), float | int)]
        if not values:
            continue
        held = sum(len(c["held_out"]) for c in captures.values())
        mean = float(sum(values) / len(values)) if all(math.isfinite(v) for v in values) else math.nan
        figures.add("reconstruction", metric, mean, protocol=protocol, n=held, unit=unit, better=better)
    return {"protocol": protocol, "captures": captures}
