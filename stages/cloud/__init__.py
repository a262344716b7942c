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

Modules: `config` (`Config`, `PRESETS`), `views` (back-projection), `agreement` (cross-view
agreement, consistency filter), `filters` (steps 4-7), `fusion` (`build_cloud`), `scores` (Table V and
reference metrics), `loading` (records, images, masks), `stage` (`run`, `fuse_capture`). Every name
stays importable from `stages.cloud`.
"""

# ruff: noqa: F401  (re-exports: every name of the former single-file module stays reachable as cloud.X)

from __future__ import annotations

import logging

from stages.cloud.agreement import Agreement, consistent_points, cross_view_agreement, sample_depth
from stages.cloud.config import _QUALITY_LEVEL, CLOUD_FILE, METRICS_FILE, PRESETS, STAGE, Config
from stages.cloud.filters import oriented_normals, poisson_disk_thin, statistical_outliers, voxel_downsample
from stages.cloud.fusion import (
    _HOW_TO_LOOSEN,
    FilterStep,
    Fused,
    _depth_in_own_view,
    _quality_mask,
    build_cloud,
    filtered_views,
    foreground_mask,
    voxel_edge,
)
from stages.cloud.loading import image_paths, load_masks, load_views, reference_path
from stages.cloud.scores import _view_consistency, cloud_metrics, reference_metrics, visible_reference
from stages.cloud.stage import _check_config, _finite_or_none, _up_to_date, fuse_capture, run, work_captures
from stages.cloud.views import Points, Views, _fuse_on, _sample_colors, fuse_views
from stages.core import dataset, depthmaps, geometry, io, metrics, worktree
from stages.core import masks as headmasks

log = logging.getLogger("nvf")
