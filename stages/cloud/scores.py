"""Table V metrics of a fused capture (`cloud_metrics`) and scores against a reference surface."""

from __future__ import annotations

from typing import Any

import numpy as np

from stages.cloud.agreement import Agreement, cross_view_agreement, sample_depth
from stages.cloud.config import Config
from stages.cloud.fusion import Fused
from stages.cloud.views import Points, Views
from stages.core import geometry, metrics
from stages.core.errors import InputError


def cloud_metrics(fused: Fused, views: Views, cfg: Config = Config()) -> dict[str, Any]:
    """Every Table V figure of a fused capture (distances in scene units, the poses' units).

    Let R be the fused cloud (every foreground pixel back-projected: "raw"), P the kept cloud,
    d_i the nearest-neighbour distance of a point within its own cloud (see `stages.core.metrics`).

    - points: valid_pixels = pixels with finite z > 0 in the aligned maps; raw = |R| (after the
      foreground mask); kept = |P|; removed_percent = 100 (raw - kept) / raw.
    - uniformity raw -> kept: U = std(d) / mean(d) of R and of P (lower = more even).
    - spacing of P: mean d, 5th and 95th percentile of d; density_uniformity_coefficient = U(P);
      local_density_variation = std(s) / mean(s), s_i = mean of d over the `density_neighbors`
      nearest points of p_i.
    - sampling: points_per_valid_pixel = kept / valid_pixels.
    - coverage_percent = 100 x the fraction of R within `coverage_radius` x median d(P) of a point of
      P: how much of the observed surface the kept cloud still represents.
    - confidence: the fraction f of P confirmed by another view: projected into some other view j,
      the bilinear depth there agrees, |D_j - z_j| <= `consistency_tolerance` z_j.
    - component scores out of 25: coverage 25 x coverage fraction; confidence 25 f; density
      25 / (1 + U(P)).
    - view_consistency (std / mean): for each view v, rho_v = median of D_j / z_j over the overlap
      pairs (|D_j - z_j| <= `overlap_gate` z_j, j != v) of the points of P from view v; the figure
      is std(rho) / mean(rho) over views with at least 10 pairs: 0 when all views agree in scale.
    - scene_scale: the bounding-box diagonal of P.
    - depth_consistency: median |D_j - z_j| over all overlap pairs of P, scene units (lower = the
      views agree better where they overlap); depth_consistency_relative: median |D_j - z_j| / z_j.
    Figures that cannot be computed (too few points or pairs) are None.
    """
    raw, kept = fused.raw.points_n3, fused.kept.points_n3
    out: dict[str, Any] = {
        "points": {
            "valid_pixels": fused.valid_pixels,
            "raw": len(raw),
            "kept": len(kept),
            "removed_percent": 100.0 * (len(raw) - len(kept)) / len(raw) if len(raw) else None,
        }
    }
    raw_u = metrics.spacing_stats(raw).uniformity if len(raw) >= 2 else None
    spacing = metrics.spacing_stats(kept) if len(kept) >= 2 else None
    out["uniformity"] = {"raw": raw_u, "kept": spacing.uniformity if spacing else None}
    tree = metrics.kdtree(kept)
    ldv = metrics.local_density_variation(kept, cfg.density_neighbors, tree=tree) if spacing else None
    out["spacing"] = {
        "mean_nn_distance": spacing.mean if spacing else None,
        "p5_nn_distance": spacing.p5 if spacing else None,
        "p95_nn_distance": spacing.p95 if spacing else None,
        "median_nn_distance": spacing.median if spacing else None,
        "density_uniformity_coefficient": spacing.uniformity if spacing else None,
        "local_density_variation": ldv,
    }
    out["sampling"] = {
        "points_per_valid_pixel": len(kept) / fused.valid_pixels if fused.valid_pixels else None,
        "valid_pixels": fused.valid_pixels,
    }
    coverage = None
    if spacing is not None:
        covered = metrics.nearest_distances(raw, kept, tree) <= cfg.coverage_radius * spacing.median
        coverage = float(covered.mean())
    agreement = cross_view_agreement(fused.kept, views, cfg.consistency_tolerance, cfg.overlap_gate)
    confirmed = float(np.mean(agreement.agree_n >= 1))
    out["scores"] = {
        "coverage_score": metrics.fraction_score(coverage) if coverage is not None else None,
        "confidence_score": metrics.fraction_score(confirmed),
        "density_score": metrics.density_score(spacing.uniformity) if spacing else None,
        "coverage_percent": 100.0 * coverage if coverage is not None else None,
        "confirmed_percent": 100.0 * confirmed,
        "view_consistency": _view_consistency(fused.kept, agreement),
    }
    out["scene"] = {
        "scene_scale": metrics.bbox_diagonal(kept),
        "depth_consistency": float(np.median(agreement.abs_diff)) if len(agreement.abs_diff) else None,
        "depth_consistency_relative": (
            float(np.median(np.abs(agreement.depth_ratio - 1.0))) if len(agreement.depth_ratio) else None
        ),
        "overlap_pairs": len(agreement.abs_diff),
        "units": "scene units (the poses')",
    }
    return out


def _view_consistency(kept: Points, agreement: Agreement, min_pairs: int = 10) -> float | None:
    source_view = kept.view_n[agreement.pair_point]
    medians = [
        float(np.median(agreement.depth_ratio[source_view == view]))
        for view in np.unique(source_view)
        if np.count_nonzero(source_view == view) >= min_pairs
    ]
    if len(medians) < 2:
        return None
    return float(np.std(medians) / np.mean(medians))


def visible_reference(reference_n3: np.ndarray, views: Views, gate: float) -> np.ndarray:
    """[M] bool: reference points some view sees: they project in front of a camera onto four
    valid depth pixels and lie no more than `gate` x z behind the depth there (not occluded)."""
    seen = np.zeros(len(reference_n3), dtype=bool)
    for view in range(len(views.names)):
        uv, z = geometry.project(reference_n3, views.K_v33[view], views.R_v33[view], views.T_v3[view])
        depth = np.full(len(z), np.nan)
        front = z > 1e-12
        depth[front] = sample_depth(views.depth_vhw[view].astype(np.float64), uv[front, 0], uv[front, 1])
        with np.errstate(invalid="ignore"):
            seen |= np.isfinite(depth) & (z <= depth * (1.0 + gate))
    return seen


def reference_metrics(kept_n3: np.ndarray, reference_n3: np.ndarray, views: Views, cfg: Config) -> dict[str, Any]:
    """Chamfer (symmetric, not squared, scene units) and F-score of the kept cloud against a reference.

    reference_size = bounding-box diagonal of the whole reference (the head's size); with
    `reference_crop`, only the reference points some view sees (`visible_reference`) are scored,
    since no camera constrains the rest. Default F-score threshold: `fscore_relative` x reference_size.
    """
    size = metrics.bbox_diagonal(reference_n3)
    scored = reference_n3
    if cfg.reference_crop:
        scored = reference_n3[visible_reference(reference_n3, views, cfg.overlap_gate)]
        if not len(scored):
            raise InputError("no reference point is seen by any view: is the reference in the poses' frame and units?")
    threshold = cfg.fscore_threshold if cfg.fscore_threshold is not None else cfg.fscore_relative * size
    chamfer = metrics.chamfer_distance(kept_n3, scored)
    f = metrics.fscore(kept_n3, scored, threshold)
    return {
        "chamfer": chamfer.chamfer,
        "accuracy": chamfer.accuracy,
        "completeness": chamfer.completeness,
        "chamfer_relative": chamfer.chamfer / size if size > 0 else None,
        "squared": False,
        "fscore": f.fscore,
        "precision": f.precision,
        "recall": f.recall,
        "fscore_threshold": f.threshold,
        "reference_size": size,
        "reference_points": len(reference_n3),
        "reference_points_scored": len(scored),
        "units": "scene units (the poses'); chamfer = accuracy + completeness, Euclidean, not squared",
    }
