"""Stage `cloud`: fuse a capture's aligned depth into one coloured, oriented point cloud (Algorithm 2).

Reads ``WORK/<capture>/poses.safetensors`` and ``aligned.safetensors`` (and the images, for colours)
and writes ``WORK/<capture>/cloud.ply`` (points, colours, normals) and ``cloud_metrics.json``
(every Table V figure, the filters applied and what each removed; see `cloud_metrics`).

Pipeline (Fig. 5, plus two optional filters), each step switchable in `Config` and recorded:

1. foreground: a pixel counts when its aligned z-depth is finite and > 0, inside ``depth_range``
   and inside the view's mask, its view's align quality reaches ``min_quality``,
   and it is neither a depth-edge (flying) pixel nor a salt outlier (``edge_filter``); each map is
   then median-filtered over its kept pixels (``smooth_px``, `filtered_views`);
2. back-projection of every foreground pixel of every view, X = R^T (d K^-1 p~ - T), vectorised
   per view (`fuse_views`); each point keeps its colour (the image pixel at the same centre) and
   the index of the view it came from;
3. multi-view consistency (on by default for captures with >= 3 views): keep points whose depth
   agrees with at least ``consistency_views`` other views, occlusion-aware, and move each to the
   mean of the agreeing depths (`consistent_points`);
4. voxel downsampling: one point per occupied voxel, the mean of its points (Open3D's grid and
   averaging, done in numpy so each point keeps a view id: that of the voxel's first point);
5. statistical outlier removal (Open3D): drop points whose mean distance to their
   ``outlier_neighbors`` nearest neighbours exceeds the mean of that figure by ``outlier_std_ratio`` std.
   The paper removes outliers before downsampling; nvf downsamples first (as Open3D's own
   tutorial does) because the fused cloud's density varies ~10x between frontal and grazing
   views, and on it SOR removes sparse but genuine grazing regions rather than outliers (on a
   synthetic head: 4% of the points, the top of the head seen by the profile cameras);
6. density-uniformity optimisation (`poisson_disk_thin`): thins over-dense regions to a target
   spacing, evening out local density (§V-A);
7. normals: Open3D PCA normals over ``normal_neighbors`` points, each turned to face the camera
   of the point's view.

Masks: ``mask_dir`` (user PNGs) when given; else, with ``use_masks``, the head mask (head ∪ hair)
of ``WORK/<capture>/masks.safetensors`` (`nvf masks`) when that record exists; else none.
``cloud_metrics.json`` names the source under ``mask`` (kind ``mask_dir``, ``masks_record`` or ``none``).

Units are the poses' (scene units); z-depth as in `stages.core.geometry`. Depth maps stored
smaller than the images use K scaled to the map (u_map = u_image W_map / W_image).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.core import dataset, depthmaps, geometry, io, metrics, worktree
from stages.core import masks as headmasks
from stages.core.batching import ProgressFn
from stages.core.errors import InputError, StageFailure

log = logging.getLogger("nvf")

STAGE = "cloud"
CLOUD_FILE = "cloud.ply"
METRICS_FILE = "cloud_metrics.json"


@dataclass(frozen=True)
class Config:
    """How depth maps are fused and filtered, and how the cloud is scored."""

    depth_range: tuple[float, float] | None = None
    """Foreground z-depth range (min, max) in scene units; None keeps every valid depth."""
    mask_dir: str | None = None
    """Folder of foreground masks, one per image (same file name, or the stem + .png); non-zero = keep.
    Wins over the masks record."""
    use_masks: bool = True
    """Without `mask_dir`, keep only the head mask (head ∪ hair) of WORK/<capture>/masks.safetensors
    (`nvf masks`) when that record exists."""
    min_quality: Literal["failed", "weak", "good"] = "weak"
    """Fuse only views whose align quality flag is at least this (`stages.align.QUALITY`)."""
    edge_filter: bool = True
    """Before fusion, drop the pixels on depth edges (flying pixels) and the salt outliers that
    `stages.core.depthmaps.inspect_maps` finds in each aligned map."""
    edge_angle: float = 80.0
    """A pixel whose 3 x 3 depth range exceeds that of a surface this many degrees from facing its
    camera is a depth edge (`depthmaps.slope_threshold`, from the view's focal length)."""
    smooth_px: int = 5
    """Window (pixels) of the median filter applied to each aligned map before fusion, over its
    clean pixels only (per-pixel noise; 1 = off)."""
    consistency: bool = True
    """Keep only points whose depth agrees with at least `consistency_views` other views
    (occlusion-aware, see `consistent_points`); applied to captures with >= 3 views."""
    consistency_views: int = 2
    """How many other views must agree (k); a point that fewer views can see needs all of them."""
    consistency_tolerance: float = 0.02
    """Agreement: |D_j(π_j(X)) - z_j(X)| <= tolerance x z_j(X), relative z-depth difference in view j.
    The defaults (k = 2, 0.02, `smooth_px` 5, `edge_angle` 80°) scored best of those tried on
    `synth.corrupt_depth` (salt, noise + salt, bend + noise, flying pixels; seeds 0-2, SfM-posed
    256 px ring): worst mean distance 0.42 % of the head's size, worst p95 1.08 %."""
    consistency_unseen: bool = True
    """Keep the points that land on no other view's valid depth (off their maps, beyond their
    silhouettes): no view can check them."""
    consistency_fuse: bool = True
    """Move each kept point along its ray to the mean of its depth and the agreeing views' depths."""
    outlier_removal: bool = True
    """Statistical outlier removal (Open3D)."""
    outlier_neighbors: int = 20
    """Neighbours whose mean distance is compared."""
    outlier_std_ratio: float = 2.0
    """Points beyond mean + ratio x std of the mean neighbour distance are dropped."""
    voxel_pixels: float = 1.0
    """Voxel edge in pixel footprints: the median z / f of the fused points (the world size of one
    pixel at the median depth). 0 = no voxel downsampling."""
    voxel_size: float | None = None
    """Voxel edge in scene units; overrides `voxel_pixels` when set."""
    uniformity: bool = True
    """Density-uniformity optimisation (Poisson-disk thinning of over-dense regions)."""
    uniformity_radius: float = 0.75
    """Target spacing of the thinning, as a multiple of the median nearest-neighbour distance."""
    normal_neighbors: int = 20
    """Neighbours of the PCA normal estimate."""
    overlap_gate: float = 0.05
    """A projection into another view whose relative depth difference exceeds this is an occlusion,
    not an overlap: it is left out of the depth and view consistency figures."""
    density_neighbors: int = 16
    """k of the local density variation (spacing smoothed over k neighbours)."""
    coverage_radius: float = 2.0
    """A fused point is covered when a kept point lies within this many median spacings of the kept cloud."""
    reference: str | None = None
    """A reference PLY, or a folder holding <capture>/surface.ply, for Chamfer and F-score."""
    reference_crop: bool = True
    """Score only reference points some view sees (see `visible_reference`)."""
    fscore_threshold: float | None = None
    """F-score distance threshold in scene units; None: `fscore_relative` x the reference's size."""
    fscore_relative: float = 0.01
    """Default F-score threshold as a fraction of the reference's bounding-box diagonal."""
    seed: int = 0
    """Seed of the thinning's random priorities."""


PRESETS: dict[str, Config] = {
    "default": Config(),
    "paper": Config(consistency=False, edge_filter=False, smooth_px=1),  # Algorithm 2 + Fig. 5
    "strict": Config(consistency=True, consistency_views=3),
    "raw": Config(
        outlier_removal=False,
        voxel_pixels=0.0,
        uniformity=False,
        consistency=False,
        edge_filter=False,
        smooth_px=1,
        min_quality="failed",
    ),  # fmt: skip
    "legacy": Config(consistency=False, edge_filter=False, smooth_px=1, min_quality="failed"),
}


# ----------------------------------------------------------------------------------------------
# Views and points
# ----------------------------------------------------------------------------------------------


@dataclass
class Views:
    """The views of one capture, depth-record order: z-depth maps, K scaled to them, poses, images."""

    names: list[str]
    depth_vhw: np.ndarray  # float32 z-depth, 0 = invalid
    K_v33: np.ndarray  # intrinsics of the depth map
    R_v33: np.ndarray  # world-to-camera
    T_v3: np.ndarray
    images: list[np.ndarray] | None = None  # RGB uint8 [h, w, 3] per view (any size), or None
    quality_v: np.ndarray | None = None  # align's per-view quality flag (None: every view good)

    @property
    def centers_v3(self) -> np.ndarray:
        return geometry.camera_centers(self.R_v33, self.T_v3)


@dataclass
class Points:
    """A cloud with per-point attributes: coordinates, colours (uint8, or None) and source view."""

    points_n3: np.ndarray  # float64 world coordinates
    colors_n3: np.ndarray | None  # uint8 RGB
    view_n: np.ndarray  # int32 index into Views

    def __len__(self) -> int:
        return len(self.points_n3)

    def take(self, index: np.ndarray) -> Points:
        """The subset at `index` (integer indices or a boolean mask)."""
        return Points(self.points_n3[index], None if self.colors_n3 is None else self.colors_n3[index],
                      self.view_n[index])  # fmt: skip


def fuse_views(views: Views, mask_vhw: np.ndarray | None = None, device: Any = None) -> Points:
    """Back-project every valid pixel (depth > 0, finite, mask) of every view into one cloud.

    X = R^T (d K^-1 (u, v, 1) - T) with (u, v) the pixel centre (+0.5), by
    `geometry.backproject_views`; rows are ordered view, row, column; colours sample the image at
    the pixel centre (nearest). `device`: a CUDA `torch.device` back-projects there in float64
    (same points to ~1e-15) and brings the cloud back; None (or the CPU) uses numpy threads.
    """
    if device is not None and device.type != "cpu":
        return _fuse_on(device, views, mask_vhw)
    height, width = views.depth_vhw.shape[1:]
    found = geometry.backproject_views(views.depth_vhw, views.K_v33, views.R_v33, views.T_v3, mask_vhw)
    colors = None
    if views.images is not None:
        colors = np.empty((len(found.pixel_n), 3), dtype=np.uint8)
        bounds = np.searchsorted(found.view_n, np.arange(len(views.depth_vhw) + 1))
        for view, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            colors[start:stop] = _sample_colors(views.images[view], found.pixel_n[start:stop], height, width)
    return Points(found.points_n3, colors, found.view_n.astype(np.int32))


def _fuse_on(device: Any, views: Views, mask_vhw: np.ndarray | None) -> Points:
    """`fuse_views` on a torch device: back-projection in float64 and colour sampling run there,
    and only what the cloud keeps comes back (points [n, 3] float64, colours [n, 3] uint8); view ids
    are rebuilt on the host from per-view counts, so no per-point index crosses the bus."""
    import torch

    def put(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)

    n_views, height, width = views.depth_vhw.shape
    depth = put(views.depth_vhw).double()
    mask = None if mask_vhw is None else put(mask_vhw)
    found = geometry.backproject_views(depth, put(views.K_v33), put(views.R_v33), put(views.T_v3), mask)
    counts = torch.bincount(found.view_n, minlength=n_views).cpu().numpy()
    view_n = np.repeat(np.arange(n_views, dtype=np.int32), counts)
    colors = None
    if views.images is not None:
        shapes = {image.shape for image in views.images}
        if len(shapes) == 1:  # one upload; the gather below is `_sample_colors` in torch
            images_vhw3 = put(np.stack(views.images))
            img_h, img_w = images_vhw3.shape[1:3]
            row, col = found.row_n, found.pixel_n % width
            if (img_h, img_w) != (height, width):
                row = ((row.double() + 0.5) * img_h / height).long().clamp_(max=img_h - 1)
                col = ((col.double() + 0.5) * img_w / width).long().clamp_(max=img_w - 1)
            colors = images_vhw3.reshape(-1, 3)[(found.view_n * img_h + row) * img_w + col].cpu().numpy()
        else:  # images of several sizes: sample on the host, view by view
            pixel_n = found.pixel_n.cpu().numpy()
            colors = np.empty((len(pixel_n), 3), dtype=np.uint8)
            bounds = np.concatenate([[0], np.cumsum(counts)])
            for view, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
                colors[start:stop] = _sample_colors(views.images[view], pixel_n[start:stop], height, width)
    return Points(found.points_n3.cpu().numpy(), colors, view_n)


def _sample_colors(image_hw3: np.ndarray, flat: np.ndarray, height: int, width: int) -> np.ndarray:
    """Image pixels [n, 3] at the centres of depth-map pixels `flat` (nearest; any image size)."""
    img_h, img_w = image_hw3.shape[:2]
    if (img_h, img_w) == (height, width):
        return image_hw3.reshape(-1, 3).take(flat, axis=0)
    rows = ((flat // width + 0.5) * img_h / height).astype(np.int64)
    cols = ((flat % width + 0.5) * img_w / width).astype(np.int64)
    return image_hw3[np.minimum(rows, img_h - 1), np.minimum(cols, img_w - 1)]


# ----------------------------------------------------------------------------------------------
# Cross-view agreement (consistency filter, confidence, depth and view consistency)
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Filters
# ----------------------------------------------------------------------------------------------


def statistical_outliers(points_n3: np.ndarray, neighbors: int, std_ratio: float) -> np.ndarray:
    """Indices of the inliers of Open3D's statistical outlier removal (sorted)."""
    o3d = io.import_open3d()
    if len(points_n3) <= neighbors:
        log.warning("cloud: %d points, too few for outlier removal with %d neighbours; skipped",
                    len(points_n3), neighbors)  # fmt: skip
        return np.arange(len(points_n3))
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points_n3))
    _, index = pcd.remove_statistical_outlier(nb_neighbors=int(neighbors), std_ratio=float(std_ratio))
    return np.sort(np.asarray(index, dtype=np.int64))


def voxel_downsample(cloud: Points, voxel: float) -> Points:
    """One point per occupied voxel: the mean position and colour of its points, the first one's view.

    The grid is Open3D's (`voxel_down_sample`): origin at the cloud's minimum corner minus half a
    voxel, voxel index floor((p - origin) / voxel); output in the order of the voxels' keys.
    """
    if not voxel > 0:
        raise InputError(f"voxel size must be positive, got {voxel}")
    points = cloud.points_n3
    origin = points.min(axis=0) - voxel / 2
    cells = np.floor((points - origin) / voxel).astype(np.int64)  # [N, 3]
    dims = cells.max(axis=0) + 1
    if float(dims[0]) * float(dims[1]) * float(dims[2]) < 2**62:
        key = (cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2]
        _, first, inverse, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    else:  # astronomically many voxels: unique rows instead of packed keys
        _, first, inverse, counts = np.unique(cells, axis=0, return_index=True, return_inverse=True,
                                              return_counts=True)  # fmt: skip
    inverse = inverse.reshape(-1)
    n_voxels = len(counts)

    def mean(values_nk: np.ndarray) -> np.ndarray:
        sums = [np.bincount(inverse, weights=values_nk[:, k], minlength=n_voxels) for k in range(values_nk.shape[1])]
        return np.stack(sums, axis=1) / counts[:, None]

    colors = None
    if cloud.colors_n3 is not None:
        colors = np.clip(np.round(mean(cloud.colors_n3.astype(np.float64))), 0, 255).astype(np.uint8)
    return Points(mean(points), colors, cloud.view_n[first])


def poisson_disk_thin(points_n3: np.ndarray, radius: float, seed: int = 0) -> np.ndarray:
    """Boolean keep mask [N] of a Poisson-disk subset: no two kept points within `radius`.

    Algorithm (density-uniformity optimisation): build the graph joining every pair of points
    closer than `radius` (`cKDTree.query_pairs`) and keep a maximal independent set of it, found by
    Luby's parallel rounds: every point draws a random priority (seeded); in each round, every
    undecided point whose priority beats all its undecided neighbours is kept and its neighbours
    are dropped, until no point is undecided (O(log N) rounds, each vectorised over the edges).
    Points with no neighbour within `radius` (sparse regions) are all kept, so only over-dense
    regions are thinned: afterwards every spacing is > `radius`, and every dropped point lies
    within `radius` of a kept one, so thinned regions end up with spacings in (radius, 2 radius].
    """
    n = len(points_n3)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    pairs = metrics.kdtree(points_n3).query_pairs(float(radius), output_type="ndarray")  # [E, 2]
    if not len(pairs):
        return keep
    priority = np.random.default_rng(seed).permutation(n)
    state = np.zeros(n, dtype=np.int8)  # 0 undecided, 1 kept, -1 dropped
    a, b = pairs[:, 0], pairs[:, 1]
    while True:
        live = (state[a] == 0) & (state[b] == 0)
        a, b = a[live], b[live]
        best = np.full(n, -1, dtype=np.int64)  # highest priority among undecided neighbours
        np.maximum.at(best, a, priority[b])
        np.maximum.at(best, b, priority[a])
        chosen = (state == 0) & (priority > best)
        state[chosen] = 1
        neighbours = np.concatenate([b[chosen[a]], a[chosen[b]]])
        state[neighbours] = -1
        if not len(a) or not (state == 0).any():
            break
    return state >= 0  # undecided points left have no undecided neighbour: keep them


def oriented_normals(cloud: Points, views: Views, neighbors: int) -> np.ndarray:
    """Unit normals [N, 3] (Open3D PCA over `neighbors` points), each facing its view's camera."""
    o3d = io.import_open3d()
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(cloud.points_n3))
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=max(3, int(neighbors))))
    normals = np.asarray(pcd.normals).copy()
    to_camera = views.centers_v3[cloud.view_n] - cloud.points_n3
    flip = np.einsum("ij,ij->i", normals, to_camera) < 0
    normals[flip] *= -1.0
    return normals


# ----------------------------------------------------------------------------------------------
# Fusion of one capture
# ----------------------------------------------------------------------------------------------


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
    """Steps 1-7 of the module docstring, in that order; StageFailure when a step leaves no point.

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


_QUALITY_LEVEL = {"failed": 0, "weak": 1, "good": 2}  # as stages.align.QUALITY


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


# ----------------------------------------------------------------------------------------------
# Table V metrics
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Loading a capture
# ----------------------------------------------------------------------------------------------


def load_views(work: Path, capture: str, images: Sequence[Path] | None = None) -> Views:
    """The aligned depth of a capture with its poses (and images), checked to belong together."""
    aligned_path = worktree.record_path(work, capture, "aligned")
    poses_path = worktree.record_path(work, capture, "poses")
    for path, hint in (
        (aligned_path, "run `nvf align WORK` first"),
        (poses_path, "run `nvf poses DATA --out WORK` first"),
    ):
        if not path.is_file():
            raise InputError(f"{path}: not found; {hint}")
    aligned = io.load_record(aligned_path, kind="aligned", capture=capture)
    poses = io.load_record(poses_path, kind="poses", capture=capture)
    names = list(aligned.names)
    pose_row = {name: i for i, name in enumerate(poses.names)}
    missing = [name for name in names if name not in pose_row]
    if missing:
        raise InputError(f"{aligned_path} and {poses_path} do not belong together: {len(missing)} view(s) "
                         f"without a pose (e.g. {missing[0]}); rerun nvf align after nvf poses")  # fmt: skip
    rows = [pose_row[name] for name in names]
    depth = np.asarray(aligned["depth"], dtype=np.float32)
    poses_hw = np.stack([poses["height"][rows], poses["width"][rows]], axis=1).astype(np.int64)
    image_hw = np.asarray(aligned["image_hw"], dtype=np.int64) if "image_hw" in aligned.tensors else poses_hw
    if image_hw.shape != poses_hw.shape or not np.array_equal(image_hw, poses_hw):
        bad = int(np.flatnonzero((image_hw != poses_hw).any(axis=1))[0]) if image_hw.shape == poses_hw.shape else 0
        raise InputError(f"{aligned_path} and {poses_path} do not belong together: they disagree on the size of "
                         f"{names[bad]}; rerun nvf align after nvf poses on the same images")  # fmt: skip
    map_h, map_w = depth.shape[1:]
    to_map = np.zeros((len(names), 3, 3))
    to_map[:, 0, 0] = map_w / poses_hw[:, 1]
    to_map[:, 1, 1] = map_h / poses_hw[:, 0]
    to_map[:, 2, 2] = 1.0
    K = to_map @ np.asarray(poses["K"], dtype=np.float64)[rows]
    R = np.asarray(poses["R"], dtype=np.float64)[rows]
    T = np.asarray(poses["T"], dtype=np.float64)[rows]
    pictures = None
    if images is not None:
        pictures = []
        for name, path, (h, w) in zip(names, images, poses_hw, strict=True):
            picture = io.read_image(path)
            if picture.shape[:2] != (h, w):
                raise InputError(f"{path}: image is {picture.shape[1]}x{picture.shape[0]} but the poses of {name} "
                                 f"say {w}x{h}; pass the --data the poses were made from")  # fmt: skip
            pictures.append(picture)
    quality = np.asarray(aligned["quality"]) if "quality" in aligned.tensors else None
    return Views(names, depth, K, R, T, pictures, quality)


def image_paths(
    work: Path, capture: str, names: Sequence[str], index: dataset.DatasetIndex | None
) -> list[Path] | None:
    """Where the images of `names` are: from the dataset index, else the poses record's image list,
    else the capture's transforms.json, else None."""
    if index is not None:
        found = next((c for c in index.captures if c.id == capture), None)
        if found is None:
            raise InputError(
                f"capture {capture} is not in the dataset {index.root}; pass the --data the work tree was made from"
            )
        by_name = {Path(entry.path).name: Path(index.root) / entry.path for entry in found.images}
    elif (recorded := worktree.recorded_image_paths(worktree.record_path(work, capture, "poses"))) is not None:
        by_name = recorded
    else:
        transforms = worktree.capture_dir(work, capture) / "transforms.json"
        if not transforms.is_file():
            return None
        by_name = {p.name: p for p in io.transforms_image_paths(transforms)}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise InputError(f"capture {capture}: no image for {len(missing)} view(s) (e.g. {missing[0]}) in the dataset; "
                         "pass the --data the work tree was made from")  # fmt: skip
    return [by_name[name] for name in names]


def load_masks(mask_dir: Path, names: Sequence[str], shape_hw: tuple[int, int]) -> np.ndarray:
    """[V, H, W] bool foreground masks (non-zero = keep), resampled nearest to the depth maps."""
    masks = []
    for name in names:
        candidates = [mask_dir / name, mask_dir / f"{Path(name).stem}.png"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise InputError(f"{mask_dir}: no mask for {name} (looked for {name} and {Path(name).stem}.png)")
        mask = io.read_image(path).max(axis=2) > 0
        rows = ((np.arange(shape_hw[0]) + 0.5) * mask.shape[0] / shape_hw[0]).astype(np.int64)
        cols = ((np.arange(shape_hw[1]) + 0.5) * mask.shape[1] / shape_hw[1]).astype(np.int64)
        masks.append(mask[rows][:, cols])
    return np.stack(masks)


def reference_path(cfg: Config, capture: str) -> Path | None:
    """The reference PLY of a capture: the file itself, or <folder>/<capture>/surface.ply."""
    if cfg.reference is None:
        return None
    path = Path(cfg.reference)
    path = path / capture / "surface.ply" if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"{path}: reference point cloud not found; pass a PLY or a folder of <capture>/surface.ply")
    return path


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def work_captures(work: Path) -> list[dataset.Capture]:
    """The captures of a work tree: its sub-folders holding an aligned record."""
    work = Path(work)
    if not work.is_dir():
        raise InputError(f"{work}: no such work folder; run nvf poses, depth and align into it first")
    found = [dataset.Capture(p.parent.name, _subject(p), ()) for p in sorted(work.glob("*/aligned.safetensors"))]
    if not found:
        raise InputError(f"{work}: no <capture>/aligned.safetensors in it; run `nvf align {work}` first")
    return found


def _subject(path: Path) -> str:
    try:
        return io.read_record_metadata(path).get("subject") or path.parent.name
    except Exception:  # unreadable: load_record says so when the capture is fused
        return path.parent.name


def _check_config(cfg: Config) -> None:
    checks = [
        (cfg.consistency_views >= 1, f"--consistency needs k >= 1 other views, got {cfg.consistency_views}"),
        (cfg.min_quality in _QUALITY_LEVEL, f"--min-quality must be failed, weak or good, got {cfg.min_quality!r}"),
        (0 < cfg.edge_angle < 90, f"edge angle must be between 0 and 90 degrees, got {cfg.edge_angle}"),
        (cfg.smooth_px >= 1, f"--smooth must be >= 1 pixel, got {cfg.smooth_px}"),
        (cfg.consistency_tolerance > 0, f"consistency tolerance must be positive, got {cfg.consistency_tolerance}"),
        (cfg.outlier_neighbors >= 1, f"outlier neighbours must be >= 1, got {cfg.outlier_neighbors}"),
        (cfg.outlier_std_ratio > 0, f"outlier std ratio must be positive, got {cfg.outlier_std_ratio}"),
        (cfg.voxel_pixels >= 0, f"--voxel must be >= 0 pixel footprints, got {cfg.voxel_pixels}"),
        (cfg.voxel_size is None or cfg.voxel_size > 0, f"--voxel-size must be positive, got {cfg.voxel_size}"),
        (cfg.uniformity_radius > 0, f"uniformity radius must be positive, got {cfg.uniformity_radius}"),
        (cfg.fscore_threshold is None or cfg.fscore_threshold > 0,
         f"--fscore-threshold must be positive, got {cfg.fscore_threshold}"),
        (cfg.depth_range is None or 0 <= cfg.depth_range[0] < cfg.depth_range[1],
         f"--depth-range needs 0 <= MIN < MAX, got {cfg.depth_range}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    if cfg.mask_dir is not None and not Path(cfg.mask_dir).is_dir():
        raise InputError(f"{cfg.mask_dir}: mask folder not found")


def run(
    work: Path,
    cfg: Config = Config(),
    *,
    data: Path | None = None,
    shard: worktree.Shard = worktree.Shard(),
    capture_ids: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    device: str = "cpu",
) -> list[Path]:
    """Fuse every selected capture of `work`; write ``<capture>/cloud.ply`` and ``cloud_metrics.json``.

    `device` (auto, cpu, cuda, cuda:N) is where back-projection runs; the outputs do not depend on it.

    `data` is the dataset the work tree was made from (for colours); without it the images are
    found through ``<capture>/transforms.json`` when present, else the cloud has no colours.
    Returns the paths written; captures whose outputs are up to date are skipped unless `overwrite`.
    """
    _check_config(cfg)
    torch_device = None
    if device.strip().lower() != "cpu":
        from stages.core.batching import choose_device

        torch_device = choose_device(device)
    captures = worktree.select_captures(work_captures(work), shard=shard, capture_ids=capture_ids)
    index = dataset.scan(data) if data is not None else None
    written: list[Path] = []
    if progress is not None:
        progress(0, len(captures))
    for done, capture in enumerate(captures, start=1):
        written.extend(fuse_capture(Path(work), capture.id, cfg, index=index, overwrite=overwrite,
                                    device=torch_device))  # fmt: skip
        if progress is not None:
            progress(done, len(captures))
    return written


def fuse_capture(work: Path, capture: str, cfg: Config, *, index: dataset.DatasetIndex | None = None,
                 overwrite: bool = False, device: Any = None) -> list[Path]:  # fmt: skip
    """Fuse one capture; returns [cloud.ply, cloud_metrics.json], or [] when they are up to date."""
    aligned_path = worktree.record_path(work, capture, "aligned")
    names = io.load_record(aligned_path, kind="aligned", capture=capture).names if aligned_path.is_file() else []
    images = image_paths(work, capture, names, index)
    reference = reference_path(cfg, capture)
    folder = worktree.capture_dir(work, capture)
    cloud_path, metrics_path = folder / CLOUD_FILE, folder / METRICS_FILE
    mask_files = sorted(Path(cfg.mask_dir).iterdir()) if cfg.mask_dir else []
    masks_record = headmasks.masks_path(work, capture)
    use_record = not cfg.mask_dir and cfg.use_masks and masks_record.is_file()
    if use_record:
        mask_files = [masks_record]
    inputs = [aligned_path, worktree.record_path(work, capture, "poses"), *(images or []), *mask_files]
    inputs_hash = io.hash_inputs(STAGE, asdict(cfg), *[p for p in inputs if p.is_file()],
                                 *([reference] if reference else []))  # fmt: skip
    if not overwrite and _up_to_date(cloud_path, metrics_path, inputs_hash):
        log.debug("cloud: %s is up to date, skipped", capture)
        return []
    views = load_views(work, capture, images)
    if images is None:
        log.warning("cloud: %s: images not found (pass --data DATA); the cloud has no colours", capture)
    masks, mask_source = None, {"kind": "none"}
    if cfg.mask_dir:
        masks = load_masks(Path(cfg.mask_dir), views.names, views.depth_vhw.shape[1:])
        mask_source = {"kind": "mask_dir", "path": str(cfg.mask_dir)}
    elif use_record:
        found = headmasks.work_head_masks(work, capture, views.names, views.depth_vhw.shape[1:])
        if found is not None:
            masks = found[0]
            mask_source = {"kind": "masks_record", "path": str(found[1]), "classes": "head+hair"}
    fused = build_cloud(views, cfg, masks, label=f"capture {capture}", device=device,
                        mask_source=mask_source.get("path"))  # fmt: skip
    report: dict[str, Any] = {"capture": capture, "stage": STAGE, "inputs": inputs_hash, "config": asdict(cfg)}
    report["mask"] = mask_source
    report.update(cloud_metrics(fused, views, cfg))
    report["filters"] = [asdict(step) for step in fused.steps]
    report["colors"] = "images" if images is not None else "none"
    if reference is not None:
        scores = reference_metrics(fused.kept.points_n3, io.read_ply(reference).points, views, cfg)
        report["reference"] = {"path": str(reference), **scores}
    from stages import __version__

    report["nvf_version"] = __version__
    with io.record_set(metrics_path):  # the metrics mark the cloud complete: removed first, written last
        io.write_ply(cloud_path, fused.kept.points_n3, fused.kept.colors_n3, fused.normals_n3)
        io.write_json(metrics_path, _finite_or_none(report))
    log.info("cloud: %s: %d -> %d points, wrote %s", capture, len(fused.raw), len(fused.kept), cloud_path)
    return [cloud_path, metrics_path]


def _up_to_date(cloud_path: Path, metrics_path: Path, inputs_hash: str) -> bool:
    if not cloud_path.is_file() or not metrics_path.is_file():
        return False
    try:
        return io.read_json(metrics_path).get("inputs") == inputs_hash
    except InputError:
        return False


def _finite_or_none(obj: Any) -> Any:
    """NaN / inf -> None, so the JSON stays standard."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj
