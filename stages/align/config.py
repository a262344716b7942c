"""Settings of stage `align`: `Config`, `PRESETS`, the per-view `QUALITY` flags, the literal types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

STAGE = "align"
Reference = Literal["sparse", "view", "depth"]
Robust = Literal["lmeds", "huber", "tukey", "ransac", "none"]
FitSpace = Literal["disparity", "depth"]


@dataclass(frozen=True)
class Config:
    """How depth maps are aligned."""

    reference: Reference = "sparse"
    """What to align to: `sparse` SfM points, one `view`'s depth, or given `depth` maps."""
    reference_view: str | None = None
    """Image name of the reference view (with reference = view)."""
    reference_depth: str | None = None
    """A depth record, or a folder holding <capture>/depth.safetensors (with reference = depth)."""
    robust: Robust = "lmeds"
    """`lmeds` (default): least-median-of-squares seed, biweight IRLS at a data-driven scale, then an
    errors-in-variables least squares on the inliers (see `fit_scale_shift`); `huber` (IRLS, then
    least squares on the 3-sigma inliers): survives bad reference points; `tukey` (biweight IRLS
    from a RANSAC start) and `ransac` also survive outliers in the prediction itself
    (high-leverage samples that pull Huber's fit), but at a fixed threshold; `none`: least squares."""
    prefilter: bool = True
    """Take no sample on a depth edge or flying pixel (`stages.core.depthmaps`), and read the
    prediction where it is not noise or salt: SfM points and a reference view read the 3 x 3
    median (a point is one noisy sample: the median divides the noise by 2.4 and ignores salt) when
    the view is noisy (`median_noise`); otherwise, and with a `depth` reference (a dense reference
    has the pixel's own footprint, where a median's curvature bias shows at low resolution),
    samples read the pixels themselves and skip the salt found."""
    edge_angle: float = 80.0
    """With `prefilter`, a pixel whose 3 x 3 depth range exceeds that of a surface this many degrees
    from facing the camera is a depth edge (`depthmaps.slope_threshold`; the focal length is the
    poses', or 1.2 x the map's longer side without poses)."""
    median_noise: float = 0.005
    """With `prefilter`, SfM points read the 3 x 3 median of views whose per-pixel noise is at least
    this (relative), the pixels themselves (off salt) otherwise."""
    errors_in_variables: bool = True
    """Correct the slope for the prediction's own noise (estimated from the map; `lmeds` only)."""
    weak_inliers: int = 20
    """A fitted view with fewer inlier samples than this is flagged weak."""
    weak_inlier_fraction: float = 0.5
    """A fitted view whose inliers are fewer than this fraction of its samples is flagged weak."""
    weak_residual: float = 0.03
    """A fitted view whose residual RMS exceeds this fraction of its median reference z is flagged
    weak (a smooth ±5 % bend of the prediction leaves 0.7-2.3 %, measured)."""
    huber_k: float = 1.345
    """Huber threshold in robust sigmas (1.4826 x median absolute residual)."""
    iterations: int = 20
    """IRLS iterations of the Huber fit."""
    ransac_iterations: int = 256
    """Hypotheses (pairs of samples) per view in RANSAC."""
    ransac_threshold: float = 0.03
    """RANSAC inlier threshold, relative to the view's median |target| in the fit space."""
    min_samples: int = 3
    """Fewest reference samples a view needs to be fitted."""
    max_samples: int = 50_000
    """Reference samples per view at most (dense references are subsampled, seeded)."""
    seed: int = 0
    """Seed of the subsampling and of RANSAC."""
    use_masks: bool = True
    """Sample only inside the head mask of WORK/<capture>/masks.safetensors when that record exists."""


QUALITY: dict[str, int] = {"failed": 0, "weak": 1, "good": 2}
"""Per-view quality flag of the aligned record: `failed` (not fitted: an all-zero map), `weak` (fitted
on fewer than `weak_inliers` inliers, an inlier fraction below `weak_inlier_fraction`, or a relative
residual above `weak_residual`), `good`. Later stages filter on it (cloud's `min_quality`)."""

PRESETS: dict[str, Config] = {
    "default": Config(),
    "huber": Config(robust="huber"),
    "tukey": Config(robust="tukey", prefilter=False),
    "ransac": Config(robust="ransac"),
    "evaluate": Config(reference="depth"),
}
