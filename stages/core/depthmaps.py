"""Pixel-level checks of predicted depth maps that align and cloud share: salt, depth edges, noise.

Monocular depth models are wrong per pixel in three ways that a per-view affine fit cannot undo:
isolated gross errors ("salt"), flying pixels that bridge a silhouette or a depth edge, and
per-pixel noise. `inspect_maps` finds them from the map alone, per view:

- the median map: each valid pixel's median over its ``size`` x ``size`` window, invalid pixels
  first filled with their nearest valid value (so a silhouette does not pull the median toward 0);
- noise: sigma_v = 1.4826 MAD of the relative residual (D - median) / median over the view
  (twice: the second time without the residuals beyond ``outlier_sigmas`` x the first figure),
  divided by `_RESIDUAL_TO_NOISE` (the residual of i.i.d. noise against a 3 x 3 median is a bit
  narrower than the noise; the constant is measured on Gaussian noise), so it estimates the
  per-pixel relative noise of the prediction;
- outliers: |D - median| / median > max(``outlier_sigmas`` sigma_v, ``outlier_floor``);
- edges: the relative range (max - min) / min of the median map over a 3 x 3 window exceeds
  max(``edge_threshold``, ``edge_sigmas`` x sigma_v x `MEDIAN_NOISE`): a depth discontinuity or a
  surface seen so obliquely that a pixel spans a large depth interval; neither gives a sample a
  fit or a fused cloud can trust. `slope_threshold` turns a slope limit into that threshold for a
  camera: a surface at angle a from facing a camera of focal f pixels changes its relative depth
  by ~tan(a) / f per pixel, 2 tan(a) / f over a 3 x 3 window, so the same angle holds at any
  resolution (a fixed threshold would flag ever more of a head's rim as the images shrink).

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


def slope_threshold(focal_px: float | np.ndarray, angle_deg: float) -> float | np.ndarray:
    """Relative 3 x 3 depth range of a surface at `angle_deg` from facing a camera of focal `focal_px`."""
    return 2.0 * np.tan(np.radians(angle_deg)) / np.asarray(focal_px, dtype=np.float64)


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
    edge_threshold: float | np.ndarray = 0.05,
    edge_sigmas: float = 6.0,
) -> MapCheck:
    """Median maps, outliers, edges and noise of positive maps [V, H, W] (see the module docstring);
    `edge_threshold` is one figure or one per view [V]."""
    from scipy import ndimage

    depth = np.asarray(depth_vhw, dtype=np.float64)
    valid = np.asarray(valid_vhw, dtype=bool) & np.isfinite(depth) & (depth > 0)
    median = np.zeros_like(depth)
    outlier = np.zeros(depth.shape, dtype=bool)
    edge = np.zeros(depth.shape, dtype=bool)
    noise = np.zeros(len(depth))
    thresholds = np.broadcast_to(np.asarray(edge_threshold, dtype=np.float64), (len(depth),))
    for view, (d, ok) in enumerate(zip(depth, valid, strict=True)):
        if not ok.any():
            continue
        med = median_map(d, ok, size)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.where(ok, (d - med) / med, 0.0)
        sigma = _MAD_TO_SIGMA * float(np.median(np.abs(rel[ok]))) / _RESIDUAL_TO_NOISE
        inside = ok & (np.abs(rel) <= outlier_sigmas * sigma)  # again without the gross outliers (salt)
        if inside.any():
            sigma = _MAD_TO_SIGMA * float(np.median(np.abs(rel[inside]))) / _RESIDUAL_TO_NOISE
        noise[view] = sigma
        outlier[view] = ok & (np.abs(rel) > max(outlier_sigmas * sigma, outlier_floor))
        filled = fill_nearest(med, ok)
        high = ndimage.maximum_filter(filled, size=3, mode="nearest")
        low = ndimage.minimum_filter(filled, size=3, mode="nearest")
        with np.errstate(divide="ignore", invalid="ignore"):
            spread = (high - low) / low
        edge[view] = ok & (spread > max(float(thresholds[view]), edge_sigmas * MEDIAN_NOISE * sigma))
        median[view] = med
    return MapCheck(median, outlier, edge, noise)


def _patches(map_hw: np.ndarray, valid_hw: np.ndarray, rows: np.ndarray, cols: np.ndarray, radius: int,
             stop: int | None = None):  # fmt: skip
    """Values and validity [Q, k, k] of the windows of offsets -radius .. stop - 1 (default radius)
    around pixels (rows, cols); pixels outside the map are invalid."""
    height, width = valid_hw.shape
    offsets = np.arange(-radius, radius + 1 if stop is None else stop)
    r = rows[:, None, None] + offsets[None, :, None]
    c = cols[:, None, None] + offsets[None, None, :]
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
    r, c = np.clip(r, 0, height - 1), np.clip(c, 0, width - 1)
    return map_hw[r, c].astype(np.float64, copy=False), valid_hw[r, c] & inside


# compare-exchange pairs of a median-of-9 sorting network (Paeth; Devillard, "Fast median search")
_MEDIAN9_NETWORK = ((1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8), (0, 3), (5, 8),
                    (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2))  # fmt: skip


def _median9(values_q9: np.ndarray, ok_q9: np.ndarray) -> np.ndarray:
    """Median over the last axis (9 entries) of each window, invalid entries replaced by the
    window's valid mean (a sorting network: 19 vectorised min/max pairs)."""
    if not ok_q9.all():
        count = np.maximum(ok_q9.sum(axis=-1, keepdims=True), 1)
        mean = np.where(ok_q9, values_q9, 0.0).sum(axis=-1, keepdims=True) / count
        values_q9 = np.where(ok_q9, values_q9, mean)
    p = list(np.moveaxis(values_q9, -1, 0))
    for a, b in _MEDIAN9_NETWORK:
        p[a], p[b] = np.minimum(p[a], p[b]), np.maximum(p[a], p[b])
    return p[4]


@dataclass(frozen=True)
class PixelCheck:
    """`check_pixels`' answer for Q pixels: 3 x 3 median, outlier and edge flags [Q], and the
    view's noise figure the flags used."""

    median_q: np.ndarray
    outlier_q: np.ndarray
    edge_q: np.ndarray
    noise: float = 0.0


def estimate_noise(map_hw: np.ndarray, valid_hw: np.ndarray, *, pixels: int = 2048, outlier_sigmas: float = 4.0,
                   seed: int = 0) -> float:  # fmt: skip
    """`inspect_maps`' noise figure of one view from `pixels` random valid pixels (seeded, drawn
    with replacement), not all: the figure needs a few thousand residuals, not a whole map."""
    height, width = valid_hw.shape
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(0, height, 4 * pixels), rng.integers(0, width, 4 * pixels)  # uniform, then valid
    keep = valid_hw[rows, cols]
    rows, cols = rows[keep][:pixels], cols[keep][:pixels]
    if len(rows) < min(pixels, 64):  # a sparse mask: take its pixels themselves
        rows, cols = np.nonzero(valid_hw)
        if len(rows) > pixels:
            pick = rng.integers(0, len(rows), pixels)
            rows, cols = rows[pick], cols[pick]
    if not len(rows):
        return 0.0
    values, ok = _patches(map_hw, valid_hw, rows, cols, 1)
    median = _median9(values.reshape(-1, 9), ok.reshape(-1, 9))
    return _noise_of((values[:, 1, 1] - median) / median, outlier_sigmas)


def _noise_of(rel: np.ndarray, outlier_sigmas: float) -> float:
    """The noise figure of relative residuals against a 3 x 3 median: robust sigma, twice (the
    second time without the residuals beyond `outlier_sigmas` x the first)."""
    if not len(rel):
        return 0.0
    sigma = _MAD_TO_SIGMA * float(np.median(np.abs(rel))) / _RESIDUAL_TO_NOISE
    inside = np.abs(rel) <= outlier_sigmas * sigma
    if inside.any():
        sigma = _MAD_TO_SIGMA * float(np.median(np.abs(rel[inside]))) / _RESIDUAL_TO_NOISE
    return sigma


def check_pixels(
    map_hw: np.ndarray,
    valid_hw: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    noise: float,
    *,
    outlier_sigmas: float = 4.0,
    outlier_floor: float = 0.003,
    edge_threshold: float = 0.05,
    edge_sigmas: float = 6.0,
) -> PixelCheck:
    """`inspect_maps`' tests at a few pixels only (the 5 x 5 window around each), for a view of
    relative noise `noise`: what align needs where its samples fall, at a cost that grows with
    the samples rather than the map. Invalid neighbours count as the window's valid mean."""
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    values, ok = _patches(map_hw, valid_hw, rows, cols, 2)  # [Q, 5, 5]
    windows = np.lib.stride_tricks.sliding_window_view(values, (3, 3), axis=(1, 2))  # [Q, 3, 3, 3, 3]
    oks = np.lib.stride_tricks.sliding_window_view(ok, (3, 3), axis=(1, 2))
    medians = _median9(windows.reshape(len(rows), 9, 9), oks.reshape(len(rows), 9, 9))  # [Q, 9]
    valid_centres = ok[:, 1:4, 1:4].reshape(len(rows), 9)
    centre = medians[:, 4]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = (values[:, 2, 2] - centre) / centre
        high = np.where(valid_centres, medians, -np.inf).max(axis=1)
        low = np.where(valid_centres, medians, np.inf).min(axis=1)
        spread = (high - low) / low
    outlier = ok[:, 2, 2] & (np.abs(rel) > max(outlier_sigmas * noise, outlier_floor))
    edge = ok[:, 2, 2] & (spread > max(float(edge_threshold), edge_sigmas * MEDIAN_NOISE * noise))
    return PixelCheck(np.where(ok[:, 2, 2], centre, 0.0), outlier, edge, float(noise))


def check_blocks(
    map_hw: np.ndarray,
    valid_hw: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    noise: float | None,
    *,
    outlier_sigmas: float = 4.0,
    outlier_floor: float = 0.003,
    edge_threshold: float = 0.05,
    edge_sigmas: float = 6.0,
) -> PixelCheck:
    """`check_pixels` for the 2 x 2 blocks whose top-left pixels are (rows, cols) [Q] (what a
    bilinear read touches), sharing the work: one 6 x 6 window and 16 medians per block instead of
    four 5 x 5 windows and 36. Answers [Q, 4], corners in the order (r, c), (r, c+1), (r+1, c), (r+1, c+1).
    `noise` None: the view's noise figure comes from the blocks' own 16 Q residuals (as
    `estimate_noise`, without its separate reads; pass a figure when Q is small)."""
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    values, ok = _patches(map_hw, valid_hw, rows, cols, 2, stop=4)  # [Q, 6, 6]: rows r-2 .. r+3
    windows = np.lib.stride_tricks.sliding_window_view(values, (3, 3), axis=(1, 2))  # [Q, 4, 4, 3, 3]
    oks = np.lib.stride_tricks.sliding_window_view(ok, (3, 3), axis=(1, 2))
    medians = _median9(windows.reshape(len(rows), 16, 9), oks.reshape(len(rows), 16, 9)).reshape(-1, 4, 4)
    centre_ok = ok[:, 1:5, 1:5]  # [Q, 4, 4] validity of the pixels the medians belong to
    if noise is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            residual = (values[:, 1:5, 1:5] - medians) / medians
        noise = _noise_of(residual[centre_ok & np.isfinite(residual)], outlier_sigmas)
    corner_value = values[:, 2:4, 2:4].reshape(-1, 4)
    corner_ok = ok[:, 2:4, 2:4].reshape(-1, 4)
    corner_median = medians[:, 1:3, 1:3].reshape(-1, 4)
    spreads = []
    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):  # each corner's 3 x 3 of medians
        block = medians[:, dr : dr + 3, dc : dc + 3].reshape(-1, 9)
        good = centre_ok[:, dr : dr + 3, dc : dc + 3].reshape(-1, 9)
        with np.errstate(divide="ignore", invalid="ignore"):
            high, low = np.where(good, block, -np.inf).max(axis=1), np.where(good, block, np.inf).min(axis=1)
            spreads.append((high - low) / low)
    spread = np.stack(spreads, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = (corner_value - corner_median) / corner_median
    outlier = corner_ok & (np.abs(rel) > max(outlier_sigmas * noise, outlier_floor))
    edge = corner_ok & (spread > max(float(edge_threshold), edge_sigmas * MEDIAN_NOISE * noise))
    return PixelCheck(np.where(corner_ok, corner_median, 0.0), outlier, edge, float(noise))
