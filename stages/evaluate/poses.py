"""The poses section of `nvf evaluate`: similarity alignment and per-view rotation and centre errors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.core import geometry
from stages.core.errors import InputError
from stages.evaluate.common import Figures, _mean, _stats, rig_radius, view_azimuth_deg
from stages.evaluate.sources import PoseSet, _paired, _tree, read_pose_set

if TYPE_CHECKING:
    from stages.evaluate import Config, Inputs


@dataclass(frozen=True)
class PoseResult:
    capture: str
    per_view: list[dict[str, Any]]
    summary: dict[str, Any]
    scale: float
    R_world: np.ndarray
    t_world: np.ndarray
    ref_centers: np.ndarray  # [M, 3] reference centres of the paired views
    est_centers_aligned: np.ndarray  # [M, 3]
    sources: list[str]


def evaluate_poses(est: PoseSet, ref: PoseSet, cfg: Config, capture: str = "") -> PoseResult:
    """Align `est` to `ref` (Umeyama on centres of the fit-source views) and score every paired view."""
    est_index = est.index()
    paired = [(name, est_index[name], j) for j, name in enumerate(ref.names) if name in est_index]
    if len(paired) < 3:
        raise InputError(f"{capture or est.origin}: only {len(paired)} views pair by name with the reference; need 3")
    names = [p[0] for p in paired]
    ie, ir = np.array([p[1] for p in paired]), np.array([p[2] for p in paired])
    R_e, T_e, R_r, T_r = est.R[ie], est.T[ie], ref.R[ir], ref.T[ir]
    sources = [est.source[i] for i in ie]
    fit = np.array([s in cfg.fit_sources or s == "given" for s in sources])
    fit_on = "fit_sources" if fit.sum() >= 3 else "all paired views (fewer than 3 with a fit source)"
    fit = fit if fit.sum() >= 3 else np.ones(len(names), dtype=bool)
    aligned = geometry.similarity_align_poses(R_e[fit], T_e[fit], R_r[fit], T_r[fit])
    s, R_w, t_w = aligned.scale, aligned.R_world, aligned.t_world
    R_al = R_e @ R_w.T  # same change of world as geometry.similarity_align_poses, applied to every view
    T_al = s * T_e - R_al @ t_w
    C_ref, C_al = geometry.camera_centers(R_r, T_r), geometry.camera_centers(R_al, T_al)
    rot_err = geometry.rotation_angle_deg(R_al, R_r)
    ctr_err = np.linalg.norm(C_al - C_ref, axis=1)
    radius = rig_radius(geometry.camera_centers(ref.R, ref.T))
    per_view = [
        {
            "name": n,
            "source": src,
            "fit": bool(f),
            "rotation_error_deg": float(re),
            "center_error": float(ce),
            "center_error_rel": float(ce / radius) if radius > 0 else math.nan,
            "azimuth_deg": view_azimuth_deg(n, R_r[k]),
        }  # fmt: skip
        for k, (n, src, f, re, ce) in enumerate(zip(names, sources, fit, rot_err, ctr_err, strict=True))
    ]
    registered = sum(1 for src in sources if src in cfg.fit_sources or src == "given")
    by_source = {}
    for tag in sorted(set(sources)):
        rows = [v for v in per_view if v["source"] == tag]
        by_source[tag] = {
            "rotation_error_deg": _stats([v["rotation_error_deg"] for v in rows]),
            "center_error": _stats([v["center_error"] for v in rows]),
            "center_error_rel": _stats([v["center_error_rel"] for v in rows]),
        }
    summary = {
        "n_reference": len(ref.names),
        "n_estimated": len(est.names),
        "n_paired": len(names),
        "fraction_registered": registered / len(ref.names),
        "rig_radius": radius,
        "scale": s,
        "fit_on": fit_on,
        "rotation_error_deg": _stats(rot_err),
        "center_error": _stats(ctr_err),
        "center_error_rel": _stats(ctr_err / radius if radius > 0 else ctr_err * math.nan),
        "by_source": by_source,
    }
    return PoseResult(capture, per_view, summary, s, R_w, t_w, C_ref, C_al, sources)


def _poses_section(inputs: Inputs, cfg: Config, figures: Figures) -> tuple[dict, dict[str, PoseResult]]:
    names = ("poses.safetensors", "transforms.json")
    pairs = _paired(_tree(inputs.poses, names, "poses"), _tree(inputs.poses_ref, names, "reference poses"), "poses")
    results = {cid: evaluate_poses(read_pose_set(e), read_pose_set(r), cfg, cid) for cid, e, r in pairs}
    protocol = {"alignment": "similarity (Umeyama) on camera centres", "fit_sources": list(cfg.fit_sources),
                "rotation_error": "geodesic angle, degrees", "center_error": "reference units; _rel: / rig radius",
                "rig_radius": "mean distance of reference centres from their centroid"}  # fmt: skip
    per_capture = {cid: {"summary": r.summary, "per_view": r.per_view, "inputs": [str(e), str(f)]}
                   for (cid, e, f), r in zip(pairs, results.values(), strict=True)}  # fmt: skip
    agg = lambda key, stat="mean": _mean(r.summary[key][stat] for r in results.values())  # noqa: E731
    n = sum(r.summary["n_paired"] for r in results.values())
    figures.add(
        "poses", "rotation_error_deg", agg("rotation_error_deg"), protocol=protocol, n=n, unit="deg", better="lower"
    )
    figures.add("poses", "rotation_error_deg_median", agg("rotation_error_deg", "median"), protocol=protocol, n=n,
                unit="deg", better="lower")  # fmt: skip
    figures.add("poses", "center_error", agg("center_error"), protocol=protocol, n=n, unit="ref units", better="lower")
    figures.add("poses", "center_error_rel", agg("center_error_rel"), protocol=protocol, n=n, unit="x rig radius",
                better="lower")  # fmt: skip
    figures.add("poses", "fraction_registered", _mean(r.summary["fraction_registered"] for r in results.values()),
                protocol=protocol, n=sum(r.summary["n_reference"] for r in results.values()),
                better="higher")  # fmt: skip
    tags = sorted({t for r in results.values() for t in r.summary["by_source"]})
    for tag in tags:
        rows = [r.summary["by_source"][tag] for r in results.values() if tag in r.summary["by_source"]]
        k = sum(row["rotation_error_deg"]["n"] for row in rows)
        figures.add("poses", "rotation_error_deg", _mean(row["rotation_error_deg"]["mean"] for row in rows),
                    protocol=protocol, bucket=f"source={tag}", n=k, unit="deg", better="lower")  # fmt: skip
        figures.add("poses", "center_error_rel", _mean(row["center_error_rel"]["mean"] for row in rows),
                    protocol=protocol, bucket=f"source={tag}", n=k, unit="x rig radius", better="lower")  # fmt: skip
    return {"protocol": protocol, "captures": per_capture}, results
