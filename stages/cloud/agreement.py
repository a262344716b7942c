"""Cross-view agreement: the consistency filter (step 3), confidence, depth and view consistency."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.cloud.config import Config
from stages.cloud.views import Points, Views
from stages.core import geometry


def sample_depth(depth_hw: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear z-depth at pixel positions (u, v) (+0.5 centres); NaN unless all 4 neighbours are valid."""
    height, width = depth_hw.shape
    fx, fy = u - 0.5, v - 0.5
    out = np.full(len(u), np.nan)
    inside = (fx >= 0) & (fx <= width - 1) & (fy >= 0) & (fy <= height - 1)
    if height < 2 or width < 2 or not inside.any():
        return out
    fx, fy = fx[inside], fy[inside]
    c0 = np.minimum(fx.astype(np.int64), width - 2)
    r0 = np.minimum(fy.astype(np.int64), height - 2)
    wx, wy = fx - c0, fy - r0
    d00, d01 = depth_hw[r0, c0], depth_hw[r0, c0 + 1]
    d10, d11 = depth_hw[r0 + 1, c0], depth_hw[r0 + 1, c0 + 1]
    value = (d00 * (1 - wx) + d01 * wx) * (1 - wy) + (d10 * (1 - wx) + d11 * wx) * wy
    good = (d00 > 0) & (d01 > 0) & (d10 > 0) & (d11 > 0)
    out[np.flatnonzero(inside)[good]] = value[good]
    return out


@dataclass
class Agreement:
    """How the points' depths compare with the other views' depth maps.

    For a point X of view i and another view j where X projects in front of the camera onto four
    valid depth pixels: z = z_j(X), D = the bilinear D_j at its projection, r = (D - z) / z.
    """

    agree_n: np.ndarray  # [N] other views with |r| <= tolerance
    overlap_n: np.ndarray  # [N] other views with |r| <= gate (seen, not occluded)
    pair_point: np.ndarray  # [M] point index of each overlap pair (|r| <= gate)
    pair_view: np.ndarray  # [M] view j of each pair
    depth_ratio: np.ndarray  # [M] D / z
    abs_diff: np.ndarray  # [M] |D - z|, scene units
    visible_n: np.ndarray | None = None  # [N] other views that agree or see past the point (r > tolerance)
    ratio_sum_n: np.ndarray | None = None  # [N] sum of D / z over the agreeing views
    seen_n: np.ndarray | None = None  # [N] other views where the point lands in front on valid depth


def cross_view_agreement(cloud: Points, views: Views, tolerance: float, gate: float) -> Agreement:
    """Project every point into every other view (vectorised over points, one pass per view)."""
    n = len(cloud)
    agree = np.zeros(n, dtype=np.int32)
    overlap = np.zeros(n, dtype=np.int32)
    visible = np.zeros(n, dtype=np.int32)
    seen_n = np.zeros(n, dtype=np.int32)
    ratio_sum = np.zeros(n)
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for view in range(len(views.names)):
        uv, z = geometry.project(cloud.points_n3, views.K_v33[view], views.R_v33[view], views.T_v3[view])
        index = np.flatnonzero((z > 1e-12) & (cloud.view_n != view))  # in front of another view's camera
        if not len(index):
            continue
        uv, z = uv[index], z[index]
        depth = sample_depth(views.depth_vhw[view].astype(np.float64), uv[:, 0], uv[:, 1])
        seen = np.isfinite(depth)
        index, z, depth = index[seen], z[seen], depth[seen]
        seen_n[index] += 1
        signed = (depth - z) / z
        rel = np.abs(signed)
        agreeing = rel <= tolerance
        agree[index[agreeing]] += 1
        visible[index[signed >= -tolerance]] += 1  # agrees, or view j sees past the point
        ratio_sum[index[agreeing]] += 1.0 + signed[agreeing]
        near = rel <= gate
        overlap[index[near]] += 1
        pairs.append((index[near], np.full(int(near.sum()), view), depth[near] / z[near], np.abs(depth - z)[near]))
    if pairs:
        point, view_j, ratio, diff = (np.concatenate(parts) for parts in zip(*pairs, strict=True))
    else:
        point, view_j, ratio, diff = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    return Agreement(agree, overlap, point, view_j, ratio, diff, visible, ratio_sum, seen_n)


def consistent_points(cloud: Points, views: Views, cfg: Config) -> tuple[np.ndarray, Points]:
    """(keep mask [N], the cloud with kept points fused) of the multi-view consistency filter.

    Occlusion-aware: for a point X of view i, each other view j in which X lands on valid depth
    either agrees (|D_j - z_j| <= tolerance z_j), sees past X (D_j > z_j (1 + tolerance): X
    floats in front of j's surface, evidence against X), or has its surface in front of X
    (D_j < z_j (1 - tolerance): X is occluded there, no evidence either way). X is kept when
    agree >= min(k, visible), visible = agreeing + seeing-past views, and agree >= 1 unless X
    lands on no other view's valid depth at all (`consistency_unseen`: off their maps or beyond
    their silhouettes, so no view can check it; a point behind another view's surface is checked
    and needs agreement): a point that only two views can see needs one agreeing view, however
    large k is. With `consistency_fuse`, a kept point moves along its ray (from view i's camera
    centre) to the mean of z_i and the agreeing views' depths mapped onto it (z_i D_j / z_j).
    """
    agreement = cross_view_agreement(cloud, views, cfg.consistency_tolerance, cfg.overlap_gate)
    agree, visible = agreement.agree_n, agreement.visible_n
    unseen = agreement.seen_n == 0
    keep = (agree >= np.minimum(cfg.consistency_views, visible)) & ((agree >= 1) | (cfg.consistency_unseen & unseen))
    kept = cloud.take(keep)
    if cfg.consistency_fuse and len(kept):
        factor = (1.0 + agreement.ratio_sum_n[keep]) / (1.0 + agree[keep])
        centers = views.centers_v3[kept.view_n]
        kept = Points(centers + (kept.points_n3 - centers) * factor[:, None], kept.colors_n3, kept.view_n)
    return keep, kept
