"""Small helpers shared by the sections of `nvf evaluate`: statistics, JSON safety, the figure list, azimuths."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.core import dataset, io

if TYPE_CHECKING:
    from stages.evaluate import Config


def _stats(values: Any) -> dict[str, float | int]:
    """mean/median/max/n of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": math.nan, "median": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "max": float(v.max()), "n": int(len(v))}


def _mean(values: Any) -> float:
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def _finite_json(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no inf/NaN)."""
    obj = io.to_jsonable(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_json(v) for v in obj]
    return obj


@dataclass
class Figures:
    """Flat list of figures; each carries its section, bucket and the protocol it was measured under."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, section: str, metric: str, value: float, *, protocol: dict, bucket: str = "all",
            n: int = 0, unit: str = "", better: str = "", note: str = "") -> None:  # fmt: skip
        row = {"section": section, "metric": metric, "bucket": bucket, "value": value, "n": n, "unit": unit,
               "better": better, "protocol": protocol}  # fmt: skip
        if note:
            row["note"] = note
        self.rows.append(row)


def rig_radius(centers_n3: np.ndarray) -> float:
    """Mean distance of camera centres from their centroid (the rig's size, reference units)."""
    return float(np.linalg.norm(centers_n3 - centers_n3.mean(0), axis=1).mean())


def view_azimuth_deg(name: str, R: np.ndarray | None = None) -> float | None:
    """Azimuth of a view: Multi-PIE camera table by name, else from the viewing direction (nvf rig frame)."""
    parsed = dataset.parse_multipie_name(name)
    if parsed is not None:
        return dataset.MULTIPIE_CAMERAS[parsed[3]].azimuth_deg
    if R is None:
        return None
    d = np.asarray(R)[2]  # camera +z (viewing direction) in world coordinates
    return float(np.degrees(np.arctan2(-d[0], d[2])))


def _bucket(azimuth: float | None, cfg: Config) -> str | None:
    if azimuth is None:
        return None
    return "frontal" if abs(azimuth) <= cfg.frontal_max_azimuth else "back"
