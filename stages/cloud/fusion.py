"""Fusion of one capture: steps 1-7 of the pipeline in order (`build_cloud`), each recorded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stages.cloud.agreement import consistent_points
from stages.cloud.config import _QUALITY_LEVEL, Config
from stages.cloud.filters import oriented_normals, poisson_disk_thin, statistical_outliers, voxel_downsample
from stages.cloud.views import Points, Views, fuse_views
from stages.core import depthmaps, metrics
from stages.core.errors import StageFailure


@dataclass
class FilterStep:
    """One step of the pipeline as recorded in the metrics: what it did to the point count."""

    name: str
    enabled: bool
    before: int
    after: int
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fused:
    """The result of `build_cloud`: the fused (raw) and the kept cloud, normals and the steps."""

    raw: Points
    kept: Points
    normals_n3: np.ndarray
    valid_pixels: int
    steps: list[FilterStep]


def foreground_mask(views: Views, cfg: Config, masks_vhw: np.ndarray | None = None) -> np.ndarray:
    """[V, H, W] bool: valid depth, inside the depth range and the masks."""
    depth = views.depth_vhw
    keep = np.isfinite(depth) & (depth > 0)
    if cfg.depth_range is not None:
        near, far = cfg.depth_range
        keep &= (depth >= near) & (depth <= far)
    if masks_vhw is not None:
        keep &= masks_vhw
    return keep


def build_cloud(views: Views, cfg: Config = Config(), masks_vhw: np.ndarray | None = None,
                label: str = "capture", device: Any = None, mask_source: str | None = None) -> Fused:  # fmt: skip
    """Steps 1-7 of the `stages.cloud` docstring, in that order; StageFailure when a step leaves no point.

    `device`: where step 1 (back-projection) runs, as in `fuse_views`; the filters run on the CPU.
    `mask_source` names where `masks_vhw` came from (recorded in the foreground step; default `mask_dir`).
    """
    valid_pixels = int(np.count_nonzero(np.isfinite(views.depth_vhw) & (views.depth_vhw > 0)))
    if valid_pixels == 0:
        raise StageFailure(f"{label}: no valid depth pixel in any view; rerun nvf align (or check its warnings)")
    steps: list[FilterStep] = []

    def record(name: str, enabled: bool, before: int, after: int, **params: Any) -> None:
        steps.append(FilterStep(name, enabled, before, after, params))
        if enabled and after == 0:
            raise StageFailure(f"{label}: the {name} filter left no point ({before} before); "
                               f"loosen it ({_HOW_TO_LOOSEN[name]})")  # fmt: skip

    quality = _quality_mask(views, cfg)
    valid_vhw = np.isfinite(views.depth_vhw) & (views.depth_vhw > 0)
    record("quality", cfg.min_quality != "failed", valid_pixels, int(np.count_nonzero(valid_vhw[quality])),
           min_quality=cfg.min_quality, views_dropped=[n for n, q in zip(views.names, quality, strict=True) if not q])  # fmt: skip
    foreground = foreground_mask(views, cfg, masks_vhw) & quality[:, None, None]
    views, foreground, edge_params = filtered_views(views, foreground, cfg)
    raw = fuse_views(views, foreground, device)
    record("foreground", cfg.depth_range is not None or masks_vhw is not None or cfg.edge_filter, valid_pixels,
           len(raw), depth_range=cfg.depth_range, mask_dir=cfg.mask_dir,
           mask=mask_source or (cfg.mask_dir if masks_vhw is not None else None), **edge_params)  # fmt: skip
    kept = raw
    n_views = int(np.count_nonzero(quality))
    if cfg.consistency and n_views >= 3:
        before = len(kept)
        _, kept = consistent_points(kept, views, cfg)
        record("consistency", True, before, len(kept), views=cfg.consistency_views,
               tolerance=cfg.consistency_tolerance, fuse=cfg.consistency_fuse)  # fmt: skip
    else:
        record("consistency", False, len(kept), len(kept), posed_views=n_views)
    voxel = voxel_edge(raw, views, cfg)
    if voxel > 0:
        before, kept = len(kept), voxel_downsample(kept, voxel)
        record("voxel", True, before, len(kept), voxel_size=voxel, voxel_pixels=cfg.voxel_pixels)
    else:
        record("voxel", False, len(kept), len(kept))
    if cfg.outlier_removal:
        before = len(kept)
        kept = kept.take(statistical_outliers(kept.points_n3, cfg.outlier_neighbors, cfg.outlier_std_ratio))
        record("outliers", True, before, len(kept), neighbors=cfg.outlier_neighbors, std_ratio=cfg.outlier_std_ratio)
    else:
        record("outliers", False, len(kept), len(kept))
    if cfg.uniformity and len(kept) >= 2:
        radius = cfg.uniformity_radius * float(np.median(metrics.nn_distances(kept.points_n3)))
        before = len(kept)
        kept = kept.take(poisson_disk_thin(kept.points_n3, radius, cfg.seed))
        record("uniformity", True, before, len(kept), radius=radius, radius_spacings=cfg.uniformity_radius)
    else:
        record("uniformity", False, len(kept), len(kept))
    normals = oriented_normals(kept, views, cfg.normal_neighbors) if len(kept) >= 3 else np.zeros((len(kept), 3))
    return Fused(raw, kept, normals, valid_pixels, steps)


def _quality_mask(views: Views, cfg: Config) -> np.ndarray:
    """[V] bool: views whose align quality flag reaches `min_quality` (all, without flags)."""
    if views.quality_v is None:
        return np.ones(len(views.names), dtype=bool)
    return np.asarray(views.quality_v) >= _QUALITY_LEVEL[cfg.min_quality]


def filtered_views(views: Views, foreground_vhw: np.ndarray, cfg: Config) -> tuple[Views, np.ndarray, dict[str, Any]]:
    """(views with filtered depth, foreground without the dropped pixels, figures) before fusion.

    With `edge_filter`, pixels on depth edges (flying pixels) and salt outliers are dropped
    (`stages.core.depthmaps.inspect_maps`, on the foreground only, so a silhouette is not an
    edge); with `smooth_px` > 1 each map becomes its median over the kept pixels of a
    `smooth_px` window. The returned views carry the filtered depth (0 where dropped), which the
    consistency filter reads too.
    """
    if not cfg.edge_filter and cfg.smooth_px <= 1:
        return views, foreground_vhw, {}
    depth = np.where(foreground_vhw, views.depth_vhw, 0.0)
    keep = foreground_vhw.copy()
    edges = outliers = 0
    margin = 3 + cfg.smooth_px  # beyond the reach of every window: the crop changes no result
    for view, fg in enumerate(foreground_vhw):
        rows, cols = np.flatnonzero(fg.any(axis=1)), np.flatnonzero(fg.any(axis=0))
        if not len(rows):
            continue
        box = (
            slice(max(rows[0] - margin, 0), rows[-1] + margin + 1),
            slice(max(cols[0] - margin, 0), cols[-1] + margin + 1),
        )
        sub, sub_fg = depth[view][box], fg[box]
        sub_keep = sub_fg.copy()
        if cfg.edge_filter:
            focal = float(np.sqrt(views.K_v33[view, 0, 0] * views.K_v33[view, 1, 1]))
            threshold = float(depthmaps.slope_threshold(focal, cfg.edge_angle))
            check = depthmaps.inspect_maps(sub[None], sub_fg[None], edge_threshold=threshold)
            sub_keep &= ~check.edge_vhw[0] & ~check.outlier_vhw[0]
            edges, outliers = edges + int(check.edge_vhw.sum()), outliers + int(check.outlier_vhw.sum())
        if cfg.smooth_px > 1:
            depth[view][box] = depthmaps.median_map(sub, sub_keep, cfg.smooth_px)
        keep[view][box] = sub_keep
    params: dict[str, Any] = {}
    if cfg.edge_filter:
        params = {"edge_pixels": edges, "outlier_pixels": outliers, "edge_angle": cfg.edge_angle}
    if cfg.smooth_px > 1:
        params["smooth_px"] = cfg.smooth_px
    depth = np.where(keep, depth, 0.0).astype(np.float32)
    filtered = Views(views.names, depth, views.K_v33, views.R_v33, views.T_v3, views.images, views.quality_v)
    return filtered, keep, params


_HOW_TO_LOOSEN = {
    "quality": "use --min-quality failed, or fix the alignment (see nvf align's warnings)",
    "foreground": "widen --depth-range or check the masks",
    "consistency": "lower --consistency or raise --consistency-tolerance; are the depths aligned?",
    "outliers": "raise --outlier-std or use --no-outliers",
    "voxel": "use a smaller --voxel",
    "uniformity": "use --no-uniformity",
}


def voxel_edge(raw: Points, views: Views, cfg: Config) -> float:
    """Voxel edge in scene units: `voxel_size`, else `voxel_pixels` x median(z / f) of the fused points."""
    if cfg.voxel_size is not None:
        return float(cfg.voxel_size)
    if cfg.voxel_pixels <= 0 or not len(raw):
        return 0.0
    _, z = _depth_in_own_view(raw, views)
    focal = np.sqrt(views.K_v33[:, 0, 0] * views.K_v33[:, 1, 1])[raw.view_n]
    return float(cfg.voxel_pixels * np.median(z / focal))


def _depth_in_own_view(cloud: Points, views: Views) -> tuple[np.ndarray, np.ndarray]:
    cam = np.einsum("nij,nj->ni", views.R_v33[cloud.view_n], cloud.points_n3) + views.T_v3[cloud.view_n]
    return cam, cam[:, 2]
