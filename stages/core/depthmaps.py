"""Pixel-level checks of predicted depth maps that align and cloud share: salt, depth edges, noise.

Monocular depth models are wrong per pixel in three ways that a per-view affine fit cannot undo:
isolated gross errors ("salt"), flying pixels that bridge a silhouette or a depth edge, and
per-pixel noise. `inspect_maps` finds them from the map alone, per view:

- the median map: each valid pixel's median over its ``size`` x ``size`` window, invalid pixels
  first filled with their nearest valid value (so a silhouette does not pull the median toward 0);
- noise: sigma_v = 1.4826 MAD of the relative residual (D - median) / median over the view,
  divided by `_RESIDUAL_TO_NOISE` (the residual of i.i.d. noise against a 3 x 3 median is a bit
  narrower than the noise; the constant is measured on Gaussian noise), so it estimates the
  per-pixel relative noise of the prediction;
- outliers: |D - median| / median > max(``outlier_sigmas`` sigma_v, ``outlier_floor``);
- edges: the relative range (max - min) / min of the median map over a 3 x 3 window exceeds
  max(``edge_threshold``, ``edge_sigmas`` x sigma_v x `MEDIAN_NOISE`): a depth discontinuity or a
  surface seen so obliquely that a pixel spans a large depth interval; neither gives a sample a
  fit or a fused cloud can trust.

Values are relative, so they hold for z-depth and for disparity alike (for a relative change e,
1/(D (1 + e)) changes by ~ -e). Maps are [V, H, W]; pixels that are not valid are never flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_MAD_TO_SIGMA = 1.4826
# robust sigma (1.4826 MAD) of (D - median3x3(D)) / sigma of i.i.d. Gaussian noise (measured on 2.6e5 pixels)
_RESIDUAL_TO_NOISE = 0.865
# noise of a 3 x 3 median / noise of one pixel, i.i.d. Gaussian (sqrt(pi / 18) ~ 0.42; measured 0.41)
MEDIAN_NOISE = 0.41


@dataclass(frozen=True)
class MapCheck:
    """What `inspect_maps` found: median map [V, H, W] (0 where invalid), outlier and edge masks
    [V, H, W] bool, and the relative per-pixel noise sigma [V] of each view."""

    median_vhw: np.ndarray
    outlier_vhw: np.ndarray
    edge_vhw: np.ndarray
    noise_v: np.ndarray

    def clean(self, valid_vhw: np.ndarray) -> np.ndarray:
        """valid pixels that are neither outliers nor on an edge [V, H, W]."""
        return valid_vhw & ~self.outlier_vhw & ~self.edge_vhw


def fill_nearest(map_hw: np.ndarray, valid_hw: np.ndarray) -> np.ndarray:
    """`map_hw` with every invalid pixel set to its nearest valid pixel's value (all 0 if none valid)."""
    from scipy import ndimage

    if valid_hw.all():
        return map_hw
    if not valid_hw.any():
        return np.zeros_like(map_hw)
    _, (rows, cols) = ndimage.distance_transform_edt(~valid_hw, return_indices=True)
    return map_hw[rows, cols]


def median_map(map_hw: np.ndarray, valid_hw: np.ndarray, size: int = 3) -> np.ndarray:
    """Median over a size x size window of the nearest-filled map, 0 where invalid (float64)."""
    from scipy import ndimage

    if size <= 1:
        return np.where(valid_hw, map_hw, 0.0)
    filled = fill_nearest(np.asarray(map_hw, dtype=np.float64), valid_hw)
    return np.where(valid_hw, ndimage.median_filter(filled, size=int(size), mode="nearest"), 0.0)


def inspect_maps(
    depth_vhw: np.ndarray,
    valid_vhw: np.ndarray,
    *,
    size: int = 3,
    outlier_sigmas: float = 4.0,
    outlier_floor: float = 0.003,
    edge_threshold: float = 0.05,
    edge_sigmas: float = 6.0,
) -> MapCheck:
    """Median maps, outliers, edges and noise of positive maps [V, H, W] (see the module docstring)."""
    from scipy import ndimage

    depth = np.asarray(depth_vhw, dtype=np.float64)
    valid = np.asarray(valid_vhw, dtype=bool) & np.isfinite(depth) & (depth > 0)
    median = np.zeros_like(depth)
    outlier = np.zeros(depth.shape, dtype=bool)
    edge = np.zeros(depth.shape, dtype=bool)
    noise = np.zeros(len(depth))
    for view, (d, ok) in enumerate(zip(depth, valid, strict=True)):
        if not ok.any():
            continue
        med = median_map(d, ok, size)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(ok, (d - med) / med, 0.0)
        sigma = _MAD_TO_SIGMA * float(np.median(np.abs(rel[ok]))) / _RESIDUAL_TO_NOISE
        noise[view] = sigma
        outlier[view] = ok & (np.abs(rel) > max(outlier_sigmas * sigma, outlier_floor))
        filled = fill_nearest(med, ok)
        high = ndimage.maximum_filter(filled, size=3, mode="nearest")
        low = ndimage.minimum_filter(filled, size=3, mode="nearest")
        with np.errstate(divide="ignore", invalid="ignore"):
            spread = (high - low) / low
        edge[view] = ok & (spread > max(edge_threshold, edge_sigmas * MEDIAN_NOISE * sigma))
        median[view] = med
    return MapCheck(median, outlier, edge, noise)
