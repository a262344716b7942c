"""Settings of stage `cloud`: `Config`, `PRESETS`, output file names, align quality levels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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


_QUALITY_LEVEL = {"failed": 0, "weak": 1, "good": 2}  # as stages.align.QUALITY
