"""Stage `align`: per-view scale and shift of monocular depth against a reference (paper Eq. 5).

For each view i, (s_i, b_i) = argmin sum_p (s_i D_i(p) + b_i - Dbar(p))^2 over the reference
samples p of that view (Algorithm 2, first half). The reference Dbar is, by `Config.reference`:

- ``sparse`` (default): the SfM points of ``sparse.safetensors`` whose track includes view i,
  projected into view i with its pose from ``poses.safetensors``; Dbar = their z in view i.
- ``view``: one chosen view's depth (aligned to the sparse points first when a sparse record
  exists, else taken as it is), back-projected to 3D and projected into every other view, keeping
  the nearest point per pixel (a z-buffer) so that surfaces the reference sees behind others drop out.
- ``depth``: given z-depth maps (a depth record, e.g. synthetic ground truth), pixel by pixel: for
  evaluating the fit or the depth model.

Convention: a ``disparity`` record (relative inverse depth: DPT, Depth Anything) is fitted in
disparity space, target 1/z (MiDaS's scale-and-shift-invariant fit), and converted with
z = 1 / (s D + b); a ``depth`` record is fitted to z directly, z = s D + b. Pixels whose aligned
value is not positive become 0 (invalid) and are counted per view in ``nonpositive``. Output
``aligned.safetensors``: ``depth`` [N, H, W] float32 z-depth in the poses' units (0 = invalid),
``scale``/``shift`` [N] (in the fit space), ``residual_rms`` [N] (z-depth residual of the inlier
reference samples, poses' units: the view's quality figure), ``inliers`` [N], ``nonpositive`` [N],
``samples`` [N] (reference samples used), ``residual_rel`` [N] (residual_rms / median reference z),
``quality`` [N] int8 (`QUALITY`: failed 0, weak 1, good 2; cloud filters on it), and with
``prefilter`` ``prediction_noise`` [N] (relative per-pixel noise of the prediction) and
``rejected_samples`` [N] (samples dropped on depth edges or salt, `stages.core.depthmaps`).
The default estimator (``lmeds``) is robust to gross errors in the prediction, the regressor:
see `fit_scale_shift`.
Head masks: with ``use_masks`` and ``WORK/<capture>/masks.safetensors`` present (`nvf masks`), samples
are read only inside each view's head mask (head ∪ hair, resampled nearest to the map), so SfM
points and reference pixels on the background, neck or clothes do not pull the fit; the aligned
maps themselves cover every valid pixel as before. A view whose head mask holds no valid pixel is
sampled unmasked (with a warning). The record's ``sample_mask`` metadata names the masks used.
A view that cannot be fitted (too few samples, all equal) gets NaN scale/shift/residual, 0 inliers
and an all-zero map, with a warning. Depth maps stored smaller than the images (``--max-res``)
are handled by scaling K to the map: u_map = u_image * W_map / W_image (pixel centres at +0.5).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from stages.core import dataset, depthmaps, geometry, io, worktree
from stages.core import masks as headmasks
from stages.core.batching import ProgressFn
from stages.core.errors import InputError, StageFailure

log = logging.getLogger("nvf")

STAGE = "align"
Reference = Literal["sparse", "view", "depth"]
Robust = Literal["lmeds", "huber", "tukey", "ransac", "none"]
FitSpace = Literal["disparity", "depth"]

_MAD_TO_SIGMA = 1.4826  # sigma of a normal distribution from its median absolute deviation
_TUKEY_C = 4.685  # Tukey biweight cut-off in sigmas (95% efficiency under Gaussian noise)


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


_BLOCKS_FOR_NOISE = 16  # a view's noise from its sample blocks' own 16 residuals each needs this many blocks

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


# ----------------------------------------------------------------------------------------------
# The fit (vectorised over views)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fit:
    """Per-view affine fit y ~ s x + b: scale [N], shift [N], inlier mask [N, M], ok [N]."""

    scale: np.ndarray
    shift: np.ndarray
    inlier_nm: np.ndarray
    ok: np.ndarray


def solve_normal_equations(
    x_nm: np.ndarray, y_nm: np.ndarray, w_nm: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares of y ~ s x + b per row: (s [N], b [N], ok [N]).

    The 2x2 normal equations [[Σwx², Σwx], [Σwx, Σw]] (s, b) = (Σwxy, Σwy), solved by Cramer's
    rule in centred form (det = Σw · Σw(x - x̄)², the same solution without the cancellation).
    A row with det <= 1e-12 Σw Σwx² (fewer than 2 distinct x, or no weight) is not ok: NaN s, b.
    Entries with weight 0 are ignored even when x or y are not finite.
    """
    w = np.where(w_nm > 0, w_nm, 0.0)
    x = np.where(w > 0, x_nm, 0.0)
    y = np.where(w > 0, y_nm, 0.0)
    sum_w = w.sum(axis=1)
    safe_w = np.where(sum_w > 0, sum_w, 1.0)
    x_mean = (w * x).sum(axis=1) / safe_w
    y_mean = (w * y).sum(axis=1) / safe_w
    dx = np.where(w > 0, x - x_mean[:, None], 0.0)
    sxx = (w * dx * dx).sum(axis=1)
    sxy = (w * dx * (y - y_mean[:, None])).sum(axis=1)
    det = sum_w * sxx
    ok = (sum_w > 0) & (det > 1e-12 * sum_w * (w * x * x).sum(axis=1)) & (det > 0)
    scale = np.where(ok, sxy / np.where(ok, sxx, 1.0), np.nan)
    shift = np.where(ok, y_mean - scale * x_mean, np.nan)
    return scale, shift, ok


def _robust_sigma(residual_nm: np.ndarray, valid_nm: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """1.4826 x median |residual| over the valid entries of each row, at least `floor` [N]."""
    return np.maximum(_MAD_TO_SIGMA * _row_median(np.abs(residual_nm), valid_nm), floor)


def _row_median(values_nm: np.ndarray, valid_nm: np.ndarray) -> np.ndarray:
    """Median [N] of each row's valid entries (0 for a row without any): one sort, not nanmedian."""
    counts = valid_nm.sum(axis=1)
    ordered = np.sort(np.where(valid_nm, values_nm, np.inf), axis=1)
    if not ordered.shape[1]:
        return np.zeros(len(counts))
    low = ordered[np.arange(len(counts)), np.maximum(counts - 1, 0) // 2]
    high = ordered[np.arange(len(counts)), np.maximum(counts, 1) // 2 - (counts == 0)]
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, np.where(counts % 2 == 1, low, 0.5 * (low + high)), 0.0)


def fit_scale_shift(
    x_nm: np.ndarray,
    y_nm: np.ndarray,
    valid_nm: np.ndarray,
    cfg: Config = Config(),
    x_noise: np.ndarray | None = None,
) -> Fit:
    """Fit y ~ s x + b per row over the valid entries, robustly as `cfg.robust` says.

    x_nm, y_nm [N, M] float64 (padding anywhere `valid_nm` is False); `x_noise` [N]: the relative
    noise sigma of each row's x (x_i has noise ~ x_noise x_i), for the errors-in-variables step.

    `lmeds` (the default) is built for monocular predictions, where the gross errors sit in x, the
    regressor: a salt pixel or a flying pixel is a leverage point, which pulls least squares and
    Huber's M-estimator (both bound only the influence of the residual, not of x) and flattens the
    scale toward 0. Three steps:

    1. least median of squares (Rousseeuw): of `ransac_iterations` pair hypotheses, the one whose
       median squared residual is least. It needs no threshold and breaks down only beyond 50 %
       outliers, leverage points included (a leverage point cannot lower the median).
    2. a data-driven scale: sigma = 1.4826 (1 + 5 / (m - 2)) sqrt(median r²) of that fit (the
       LMedS scale), inliers |r| <= 2.5 sigma; then `iterations` of Tukey's biweight IRLS from the
       least squares of those inliers, sigma re-estimated (MAD) each time: efficient under the
       noise, and redescending, so no gross error keeps any weight.
    3. errors in variables on the 3-sigma inliers: x is noisy too, which biases least squares
       toward a flatter slope by var(noise) / var(x) (regression dilution). With the noise known
       from the map (`stages.core.depthmaps`), the slope is the method-of-moments estimate
       s = S_xy / (S_xx - sum sigma_x²) (Fuller, Measurement Error Models, 1987), the correction
       capped at half of S_xx; b = mean(y) - s mean(x).

    A symmetric fit (orthogonal or geometric-mean regression) would need the ratio of the two
    noises, and the reference (SfM points, or given depth) is far less noisy than a prediction, so
    correcting the attenuation of the plain fit is the better-posed choice.

    `none`: least squares, every valid sample an inlier. `huber`: IRLS with weights min(1, k sigma / |r|), sigma re-estimated
    from the median absolute residual each step, then least squares on |r| <= 3 sigma. `ransac`:
    the pair hypothesis with the most samples within `ransac_threshold` x median|y|, refitted by
    least squares on its inliers (twice). A view with fewer than `min_samples` valid samples, or a
    degenerate / non-positive scale, is not ok.
    """
    x = np.asarray(x_nm, dtype=np.float64)
    y = np.asarray(y_nm, dtype=np.float64)
    valid = np.asarray(valid_nm, dtype=bool) & np.isfinite(x) & np.isfinite(y)
    if x.shape[1] == 0:  # no view has a sample (e.g. every one rejected by the prefilter): none is fitted
        nothing = np.full(len(x), np.nan)
        return Fit(nothing, nothing.copy(), valid, np.zeros(len(x), dtype=bool))
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y_level = np.nan_to_num(np.nanmedian(np.where(valid, np.abs(y), np.nan), axis=1), nan=1.0)
    floor = 1e-9 * np.maximum(y_level, 1e-30)  # a noise-free fit must not divide by a zero sigma
    if cfg.robust == "none":
        scale, shift, ok = solve_normal_equations(x, y, valid.astype(np.float64))
        inliers = valid
    elif cfg.robust == "lmeds":
        scale, shift, inliers, ok = _lmeds(x, y, valid, floor, cfg)
        for _ in range(cfg.iterations):
            residual = _residual(x, y, scale, shift)
            sigma = _robust_sigma(residual, valid, floor)[:, None]
            with np.errstate(over="ignore", invalid="ignore"):
                weights = valid * np.clip(1.0 - (residual / (_TUKEY_C * sigma)) ** 2, 0.0, None) ** 2
            scale, shift, ok = solve_normal_equations(x, y, weights)
        residual = _residual(x, y, scale, shift)
        inliers = valid & (np.abs(residual) <= 3.0 * _robust_sigma(residual, valid, floor)[:, None])
        weights = inliers.astype(np.float64)
        if cfg.errors_in_variables and x_noise is not None:
            scale, shift, ok = solve_errors_in_variables(x, y, weights, np.asarray(x_noise, np.float64))
        else:
            scale, shift, ok = solve_normal_equations(x, y, weights)
    elif cfg.robust in ("huber", "tukey"):
        if cfg.robust == "huber":  # convex: plain least squares is as good a start as any
            scale, shift, ok = solve_normal_equations(x, y, valid.astype(np.float64))
        else:  # redescending: start from RANSAC's fit, near the majority
            scale, shift, _, ok = _ransac(x, y, valid, y_level, cfg)
        for _ in range(cfg.iterations):
            residual = _residual(x, y, scale, shift)
            sigma = _robust_sigma(residual, valid, floor)[:, None]
            if cfg.robust == "huber":
                weights = valid * np.minimum(1.0, cfg.huber_k * sigma / np.maximum(np.abs(residual), 1e-300))
            else:
                with np.errstate(over="ignore", invalid="ignore"):
                    weights = valid * np.clip(1.0 - (residual / (_TUKEY_C * sigma)) ** 2, 0.0, None) ** 2
            scale, shift, ok = solve_normal_equations(x, y, weights)
        residual = _residual(x, y, scale, shift)
        inliers = valid & (np.abs(residual) <= 3.0 * _robust_sigma(residual, valid, floor)[:, None])
        scale, shift, ok = solve_normal_equations(x, y, inliers.astype(np.float64))
    elif cfg.robust == "ransac":
        scale, shift, inliers, ok = _ransac(x, y, valid, y_level, cfg)
    else:
        raise InputError(f"unknown robust mode {cfg.robust!r}: use lmeds, huber, tukey, ransac or none")
    counts = valid.sum(axis=1)
    ok = ok & (counts >= max(2, cfg.min_samples)) & (scale > 0)
    inliers = inliers & ok[:, None]
    return Fit(np.where(ok, scale, np.nan), np.where(ok, shift, np.nan), inliers, ok)


def _residual(x: np.ndarray, y: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.nan_to_num(scale[:, None] * x + shift[:, None] - y, nan=np.inf)


def solve_errors_in_variables(
    x_nm: np.ndarray, y_nm: np.ndarray, w_nm: np.ndarray, x_noise: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted y ~ s x + b per row with x noisy (relative sigma `x_noise` [N]): (s, b, ok).

    s = S_xy / (S_xx - sum w (x_noise x)²), the attenuation correction of the least-squares slope,
    capped so the denominator stays >= S_xx / 2; rows not ok as in `solve_normal_equations`.
    """
    scale, shift, ok = solve_normal_equations(x_nm, y_nm, w_nm)
    w = np.where(w_nm > 0, w_nm, 0.0)
    x = np.where(w > 0, x_nm, 0.0)
    y = np.where(w > 0, y_nm, 0.0)
    sum_w = np.where(ok, w.sum(axis=1), 1.0)
    x_mean, y_mean = (w * x).sum(axis=1) / sum_w, (w * y).sum(axis=1) / sum_w
    dx = np.where(w > 0, x - x_mean[:, None], 0.0)
    sxx = (w * dx * dx).sum(axis=1)
    sxy = (w * dx * (y - y_mean[:, None])).sum(axis=1)
    noise = (w * (np.nan_to_num(x_noise)[:, None] * x) ** 2).sum(axis=1)
    corrected = np.where(ok, sxy / np.where(ok, np.maximum(sxx - noise, 0.5 * sxx), 1.0), np.nan)
    return corrected, np.where(ok, y_mean - corrected * x_mean, np.nan), ok


def _pair_hypotheses(
    x: np.ndarray, y: np.ndarray, valid: np.ndarray, cfg: Config, probes: int = 2000
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scale_h [N, H], shift_h [N, H], usable [N, H], probe [N, E]): lines through random sample
    pairs (positive slope) and up to `probes` random samples per row to score them on (seeded)."""
    rng = np.random.default_rng(cfg.seed)
    n_rows = len(x)
    counts = valid.sum(axis=1)
    order = np.argsort(~valid, axis=1, kind="stable")  # valid entries first, in order
    rows = np.arange(n_rows)[:, None]

    def draw(k: int) -> np.ndarray:  # [N, k] positions of valid samples, uniform per row
        return order[rows, (rng.random((n_rows, k)) * np.maximum(counts, 1)[:, None]).astype(np.int64)]

    first, second = draw(cfg.ransac_iterations), draw(cfg.ransac_iterations)  # [N, H]
    dx = x[rows, first] - x[rows, second]
    with np.errstate(all="ignore"):
        scale_h = (y[rows, first] - y[rows, second]) / dx
        shift_h = y[rows, first] - scale_h * x[rows, first]
    usable = np.isfinite(scale_h) & (scale_h > 0) & (np.abs(dx) > 0)
    return scale_h, shift_h, usable, draw(min(probes, max(1, int(counts.max(initial=1)))))


_LMEDS_PROBES = 1000  # samples per view that rank LMedS hypotheses


def _lmeds(
    x: np.ndarray, y: np.ndarray, valid: np.ndarray, floor: np.ndarray, cfg: Config
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scale, shift, inliers, ok): least median of squares over pair hypotheses, its inliers
    (|r| <= 2.5 x the LMedS scale) refitted by least squares.

    Hypotheses are ranked on the median over _LMEDS_PROBES random samples of a view, in float32: the
    median of 1000 residuals is within ~4 % of the full one (its standard error is 1.25 σ / √E),
    enough to rank lines whose medians differ by far more; the final scale comes from the refit."""
    n_rows = len(x)
    rows = np.arange(n_rows)[:, None]
    scale_h, shift_h, usable, probe = _pair_hypotheses(x, y, valid, cfg, probes=_LMEDS_PROBES)
    x_probe, y_probe = x[rows, probe].astype(np.float32), y[rows, probe].astype(np.float32)  # [N, E]
    with np.errstate(all="ignore"):
        residual = np.abs(
            scale_h.astype(np.float32)[:, :, None] * x_probe[:, None, :]
            + shift_h.astype(np.float32)[:, :, None]
            - y_probe[:, None, :]
        )  # [N, H, E] float32
    half = (residual.shape[2] - 1) // 2  # the lower median (one partition, not np.median's two)
    median = np.where(usable, np.partition(residual, half, axis=2)[:, :, half], np.inf)  # [N, H]
    best = median.argmin(axis=1)
    pick = np.arange(n_rows)
    scale, shift = scale_h[pick, best], shift_h[pick, best]
    m = np.maximum(valid.sum(axis=1), 3)
    sigma = np.maximum(_MAD_TO_SIGMA * (1.0 + 5.0 / (m - 2)) * median[pick, best], floor)
    ok = np.isfinite(median[pick, best])
    inliers = valid & (np.abs(_residual(x, y, scale, shift)) <= 2.5 * sigma[:, None]) & ok[:, None]
    scale, shift, ok = solve_normal_equations(x, y, inliers.astype(np.float64))
    return scale, shift, inliers, ok


def _ransac(
    x: np.ndarray, y: np.ndarray, valid: np.ndarray, y_level: np.ndarray, cfg: Config
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scale, shift, inliers, ok): pair hypotheses scored on up to 2000 samples per view."""
    n_rows = len(x)
    rows = np.arange(n_rows)[:, None]
    scale_h, shift_h, usable, probe = _pair_hypotheses(x, y, valid, cfg)  # [N, H] x3, [N, E]
    threshold = cfg.ransac_threshold * y_level  # [N]
    with np.errstate(all="ignore"):
        residual = np.abs(
            scale_h[:, :, None] * x[rows, probe][:, None, :] + shift_h[:, :, None] - y[rows, probe][:, None, :]
        )
    score = np.where(usable, (residual <= threshold[:, None, None]).sum(axis=2), -1)  # [N, H]
    best = score.argmax(axis=1)
    scale, shift = scale_h[np.arange(n_rows), best], shift_h[np.arange(n_rows), best]
    ok = score[np.arange(n_rows), best] > 0
    inliers = valid
    for _ in range(2):
        inliers = valid & (np.abs(_residual(x, y, scale, shift)) <= threshold[:, None]) & ok[:, None]
        scale, shift, ok = solve_normal_equations(x, y, inliers.astype(np.float64))
    return scale, shift, inliers, ok


# ----------------------------------------------------------------------------------------------
# Samples: (prediction, reference z) pairs per view
# ----------------------------------------------------------------------------------------------


@dataclass
class _Views:
    """The views of one capture in depth-record order (only those with what the reference needs)."""

    names: list[str]
    depth_nhw: np.ndarray  # float64 prediction
    valid_nhw: np.ndarray  # bool: finite, > 0, inside the foreground mask
    K_map: np.ndarray | None  # [N, 3, 3] K scaled to the depth map, when poses are used
    R: np.ndarray | None
    T: np.ndarray | None
    prefilter: Config | None = None  # the config whose prefilter applies; None: samples read raw pixels
    noise_raw: np.ndarray | None = None  # [N] relative per-pixel noise of the prediction (with prefilter)
    noise: np.ndarray | None = None  # [N] relative noise of what samples read
    rejected: np.ndarray | None = None  # [N] samples the prefilter dropped (edges, salt)

    def read_at(self, row: int, lines: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prediction [Q], usable [Q]) of view `row` at integer pixels: the raw value where valid,
        or with the prefilter (`stages.core.depthmaps.check_pixels`) never on a depth edge, and the
        3 x 3 median (SfM points, a reference view) or the raw value off salt (a `depth` reference)."""
        depth, valid = self.depth_nhw[row], self.valid_nhw[row]
        usable = valid[lines, cols]
        if self.prefilter is None or not len(lines):
            return depth[lines, cols], usable
        check = depthmaps.check_pixels(depth, valid, lines, cols, float(self.noise_raw[row]),
                                       edge_threshold=self.edge_threshold(row))  # fmt: skip
        if self.reads_median(row):
            return check.median_q, usable & ~check.edge_q
        return depth[lines, cols], usable & ~check.edge_q & ~check.outlier_q

    def read_block(self, row: int, lines: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`read_at` for the 2 x 2 blocks at (lines, cols) (top-left; the next line and column are
        clipped to the map): values and usable [Q, 4], corners (r, c), (r, c+1), (r+1, c), (r+1, c+1)."""
        depth, valid = self.depth_nhw[row], self.valid_nhw[row]
        height, width = valid.shape
        r1, c1 = np.minimum(lines + 1, height - 1), np.minimum(cols + 1, width - 1)
        pick_r, pick_c = np.stack([lines, lines, r1, r1], 1), np.stack([cols, c1, cols, c1], 1)
        usable = valid[pick_r, pick_c]
        if self.prefilter is None or not len(lines) or height < 2 or width < 2:
            return depth[pick_r, pick_c], usable
        known = bool(np.isfinite(self.noise_raw[row]))
        if not known and len(lines) < _BLOCKS_FOR_NOISE:  # too few blocks to tell the noise: read more pixels
            self.noise_raw[row] = depthmaps.estimate_noise(depth, valid, seed=self.prefilter.seed)
            known = True
        check = depthmaps.check_blocks(depth, valid, lines, cols, float(self.noise_raw[row]) if known else None,
                                       edge_threshold=self.edge_threshold(row))  # fmt: skip
        self.noise_raw[row] = check.noise
        if self.reads_median(row):
            return check.median_q, usable & ~check.edge_q
        return depth[pick_r, pick_c], usable & ~check.edge_q & ~check.outlier_q

    def edge_threshold(self, row: int) -> float:
        """`depthmaps.slope_threshold` of view `row` at the prefilter's `edge_angle`."""
        if self.K_map is not None:
            focal = float(np.sqrt(self.K_map[row, 0, 0] * self.K_map[row, 1, 1]))
        else:
            focal = 1.2 * max(self.depth_nhw.shape[1:])
        return float(depthmaps.slope_threshold(focal, self.prefilter.edge_angle))

    def reads_median(self, row: int) -> bool:
        """Whether samples of view `row` read the 3 x 3 median: SfM points or a reference view on a
        prediction noisier than `median_noise` (below it, the median's curvature bias outweighs)."""
        cfg = self.prefilter
        return cfg is not None and cfg.reference != "depth" and float(self.noise_raw[row]) >= cfg.median_noise

    def count_rejected(self, row: int, before: int, after: int) -> None:
        if self.rejected is not None:
            self.rejected[row] += before - after


def _pad(samples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-view (x [m], z [m]) pairs -> x [N, M], z [N, M], valid [N, M] (M = the longest)."""
    width = max((len(x) for x, _ in samples), default=0)
    x_nm = np.zeros((len(samples), width))
    z_nm = np.zeros((len(samples), width))
    valid = np.zeros((len(samples), width), dtype=bool)
    for row, (x, z) in enumerate(samples):
        x_nm[row, : len(x)], z_nm[row, : len(z)], valid[row, : len(x)] = x, z, True
    return x_nm, z_nm, valid


def _subsample(index: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return index if len(index) <= limit else np.sort(rng.choice(index, size=limit, replace=False))


def _sample_points(views: _Views, row: int, points_n3: np.ndarray, *, zbuffer: bool) -> tuple[np.ndarray, np.ndarray]:
    """(prediction x, reference z) where world points project into view `row`.

    The prediction is read bilinearly at the projected position (pixel centres at +0.5), and only
    where all four neighbouring pixels are valid, so points on a silhouette drop out. Points behind
    the camera or off the map are dropped; with `zbuffer`, so is every point more than 1% behind
    the nearest point landing in the same pixel.
    """
    height, width = views.depth_nhw.shape[1:]
    uv, z = geometry.project(points_n3, views.K_map[row], views.R[row], views.T[row])
    fx, fy = uv[:, 0] - 0.5, uv[:, 1] - 0.5  # continuous pixel-index coordinates
    inside = (z > 0) & (fx >= 0) & (fx <= width - 1) & (fy >= 0) & (fy <= height - 1)
    fx, fy, z = fx[inside], fy[inside], z[inside]
    if zbuffer and len(z):
        pixel = np.round(fy).astype(np.int64) * width + np.round(fx).astype(np.int64)
        nearest = np.full(height * width, np.inf)
        np.minimum.at(nearest, pixel, z)
        front = z <= nearest[pixel] * 1.01
        fx, fy, z = fx[front], fy[front], z[front]
    c0 = np.minimum(np.floor(fx).astype(np.int64), width - 2) if width > 1 else np.zeros(len(fx), np.int64)
    r0 = np.minimum(np.floor(fy).astype(np.int64), height - 2) if height > 1 else np.zeros(len(fy), np.int64)
    c1, r1 = np.minimum(c0 + 1, width - 1), np.minimum(r0 + 1, height - 1)
    wx, wy = fx - c0, fy - r0
    value, usable = views.read_block(row, r0, c0)  # [n, 4]: (r0, c0), (r0, c1), (r1, c0), (r1, c1)
    d00, d01, d10, d11 = value.T
    good = usable.all(axis=1)
    valid = views.valid_nhw[row]
    raw_good = valid[r0, c0] & valid[r0, c1] & valid[r1, c0] & valid[r1, c1]
    views.count_rejected(row, int(raw_good.sum()), int(good.sum()))
    x = (d00 * (1 - wx) + d01 * wx) * (1 - wy) + (d10 * (1 - wx) + d11 * wx) * wy
    return x[good], z[good]


def sparse_samples(views: _Views, sparse: io.Record, cfg: Config) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per view: the SfM points whose track includes it, projected with its pose."""
    points = np.asarray(sparse["points"], dtype=np.float64)
    if len(points) == 0:
        raise InputError(f"{sparse.path}: no sparse points; rerun nvf poses, or align with --reference-depth")
    offsets = np.asarray(sparse["track_offsets"], dtype=np.int64)
    track_point = np.repeat(np.arange(len(points)), np.diff(offsets))  # [M] point of each observation
    track_image = np.asarray(sparse["track_images"], dtype=np.int64)
    sparse_row = {name: i for i, name in enumerate(sparse.names)}
    rng = np.random.default_rng(cfg.seed)
    samples, observed = [], 0
    for row, name in enumerate(views.names):
        seen = np.unique(track_point[track_image == sparse_row.get(name, -1)])
        observed += len(seen)
        samples.append(_sample_points(views, row, points[_subsample(seen, cfg.max_samples, rng)], zbuffer=False))
    if not observed:  # (observed points that every map's prefilter rejects leave their views unfitted instead)
        raise InputError(
            f"{sparse.path}: none of its {len(points)} points is observed in a view of the depth record "
            "(no names in common?); rerun nvf poses on the same images"
        )
    return samples


def view_samples(
    views: _Views, reference_row: int, z_ref_hw: np.ndarray, cfg: Config
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per view: the reference view's z-depth back-projected and projected in, nearest per pixel."""
    rng = np.random.default_rng(cfg.seed)
    height, width = z_ref_hw.shape
    good = np.flatnonzero(np.isfinite(z_ref_hw) & (z_ref_hw > 0))
    chosen = np.zeros(height * width, dtype=bool)
    chosen[_subsample(good, cfg.max_samples, rng)] = True
    points = geometry.backproject(
        z_ref_hw,
        views.K_map[reference_row],
        views.R[reference_row],
        views.T[reference_row],
        chosen.reshape(height, width),
    )
    points = np.asarray(points, dtype=np.float64)
    return [
        (np.zeros(0), np.zeros(0)) if row == reference_row else _sample_points(views, row, points, zbuffer=True)
        for row in range(len(views.names))
    ]


def depth_samples(views: _Views, reference: io.Record, cfg: Config) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per view: the reference z-depth pixel by pixel (resampled nearest to the prediction's size)."""
    if reference.extra.get("depth_kind", "depth") != "depth":
        raise InputError(f"{reference.path}: a reference must hold z-depth, not {reference.extra['depth_kind']}")
    ref_row = {name: i for i, name in enumerate(reference.names)}
    missing = [name for name in views.names if name not in ref_row]
    if missing:
        raise InputError(f"{reference.path}: no reference depth for view(s) {', '.join(missing[:3])}; "
                         "pass the reference record of the same capture")  # fmt: skip
    ref = np.asarray(reference["depth"], dtype=np.float64)[[ref_row[name] for name in views.names]]
    height, width = views.depth_nhw.shape[1:]
    lines = ((np.arange(height) + 0.5) * ref.shape[1] / height).astype(np.int64)  # nearest, centre to centre
    cols = ((np.arange(width) + 0.5) * ref.shape[2] / width).astype(np.int64)
    ref = ref[:, lines][:, :, cols]  # [N, H, W]
    rng = np.random.default_rng(cfg.seed)
    samples = []
    for row in range(len(views.names)):
        flat = np.flatnonzero(views.valid_nhw[row] & np.isfinite(ref[row]) & (ref[row] > 0))
        flat = _subsample(flat, cfg.max_samples, rng)
        value, usable = views.read_at(row, flat // width, flat % width)
        views.count_rejected(row, len(flat), int(usable.sum()))
        samples.append((value[usable], ref[row].reshape(-1)[flat[usable]]))
    return samples


# ----------------------------------------------------------------------------------------------
# Alignment of one capture
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Aligned:
    """What `align_views` returns: z-depth [N, H, W] float32 and per-view figures [N]."""

    depth_nhw: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    residual_rms: np.ndarray
    inliers: np.ndarray
    nonpositive: np.ndarray
    samples: np.ndarray  # [N] reference samples of each view
    residual_rel: np.ndarray  # [N] residual_rms / the view's median reference z
    quality: np.ndarray  # [N] int8, `QUALITY`


def to_fit_space(z: np.ndarray, space: FitSpace) -> np.ndarray:
    """z-depth -> the fit's target: 1/z for disparity, z for depth."""
    with np.errstate(divide="ignore"):
        return 1.0 / z if space == "disparity" else z


def apply_fit(depth_nhw: np.ndarray, valid_nhw: np.ndarray, scale: np.ndarray, shift: np.ndarray,
              space: FitSpace) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(z-depth [N, H, W] with 0 where invalid, count [N] of valid pixels whose aligned value <= 0)."""
    with np.errstate(all="ignore"):
        value = scale[:, None, None] * depth_nhw + shift[:, None, None]
        positive = valid_nhw & np.isfinite(value) & (value > 0)
        z = np.where(positive, 1.0 / value if space == "disparity" else value, 0.0)
    nonpositive = (valid_nhw & np.isfinite(scale)[:, None, None] & ~positive).sum(axis=(1, 2))
    return z, nonpositive


def align_views(
    depth_nhw: np.ndarray,
    valid_nhw: np.ndarray,
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    space: FitSpace,
    cfg: Config = Config(),
    fixed: dict[int, tuple[float, float]] | None = None,
    x_noise: np.ndarray | None = None,
) -> Aligned:
    """Fit each view's (s, b) to its (prediction, reference z) samples and convert to z-depth.

    `fixed` gives rows whose (s, b) are already known (the reference view); their residual RMS and
    inliers are measured like any other row's, over their own samples (none: NaN and 0), and they are
    never flagged weak. `x_noise` [N] is the relative noise of the samples' predictions (for `lmeds`'
    errors-in-variables step). The residual RMS is taken in z-depth over the inlier samples;
    `quality` flags each view (`QUALITY`).
    """
    x_nm, z_nm, valid = _pad(list(samples))
    target = to_fit_space(z_nm, space)
    fit = fit_scale_shift(x_nm, target, valid & (z_nm > 0), cfg, x_noise)
    scale, shift, inliers, ok = fit.scale.copy(), fit.shift.copy(), fit.inlier_nm, fit.ok.copy()
    for row, (s, b) in (fixed or {}).items():
        scale[row], shift[row], ok[row] = s, b, True
    depth, nonpositive = apply_fit(depth_nhw, valid_nhw, scale, shift, space)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = scale[:, None] * x_nm + shift[:, None]
        z_fit = np.where(value > 0, 1.0 / value if space == "disparity" else value, np.nan)
        squared = np.where(inliers & np.isfinite(z_fit), (z_fit - z_nm) ** 2, np.nan)
        rms = np.sqrt(np.nanmean(squared, axis=1)) if squared.shape[1] else np.full(len(scale), np.nan)
        z_level = np.nanmedian(np.where(valid & (z_nm > 0), z_nm, np.nan), axis=1) if z_nm.shape[1] else rms
    counts = inliers.sum(axis=1)
    n_samples = (valid & (z_nm > 0)).sum(axis=1)
    rms = np.where(ok, rms, np.nan)
    relative = rms / np.where(np.isfinite(z_level) & (z_level > 0), z_level, np.nan)
    weak = (
        (counts < cfg.weak_inliers)
        | (counts < cfg.weak_inlier_fraction * np.maximum(n_samples, 1))
        | ~(relative <= cfg.weak_residual)
    )
    fixed_rows = np.isin(np.arange(len(scale)), list(fixed or {}))
    quality = np.where(~ok, QUALITY["failed"], np.where(weak & ~fixed_rows, QUALITY["weak"], QUALITY["good"]))
    return Aligned(depth.astype(np.float32), scale, shift, rms, counts, nonpositive, n_samples,
                   np.where(ok, relative, np.nan), quality.astype(np.int8))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def work_captures(work: Path) -> list[dataset.Capture]:
    """The captures of a work tree: its sub-folders holding a depth record (subject from its metadata)."""
    work = Path(work)
    if not work.is_dir():
        raise InputError(f"{work}: no such work folder; run `nvf depth DATA --out {work}` first")
    found = []
    for record in sorted(work.glob(f"*/{worktree.RECORD_FILES['depth']}")):
        try:
            subject = io.read_record_metadata(record).get("subject") or record.parent.name
        except Exception:  # unreadable: load_record will say so when the capture is aligned
            subject = record.parent.name
        found.append(dataset.Capture(record.parent.name, subject, ()))
    if not found:
        raise InputError(f"{work}: no <capture>/depth.safetensors in it; run `nvf depth DATA --out {work}` first")
    return found


def run(
    work: Path,
    cfg: Config = Config(),
    *,
    shard: worktree.Shard = worktree.Shard(),
    capture_ids: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> list[Path]:
    """Align the depth of every selected capture of `work`; write ``<capture>/aligned.safetensors``.

    Returns the paths written; captures whose output is up to date are skipped unless `overwrite`.
    """
    _check_config(cfg)
    captures = worktree.select_captures(work_captures(work), shard=shard, capture_ids=capture_ids)
    written = []
    if progress is not None:
        progress(0, len(captures))
    for done, capture in enumerate(captures, start=1):
        path = align_capture(Path(work), capture.id, cfg, overwrite=overwrite)
        if path is not None:
            written.append(path)
        if progress is not None:
            progress(done, len(captures))
    return written


def _check_config(cfg: Config) -> None:
    if cfg.reference == "view" and not cfg.reference_view:
        raise InputError("reference 'view' needs --reference-view NAME (an image name of the capture)")
    if cfg.reference == "depth" and not cfg.reference_depth:
        raise InputError("reference 'depth' needs --reference-depth PATH (a depth record or a folder of them)")
    if cfg.robust not in ("lmeds", "huber", "tukey", "ransac", "none"):
        raise InputError(f"unknown --robust {cfg.robust!r}: use lmeds, huber, tukey, ransac or none")
    if not 0 < cfg.edge_angle < 90:
        raise InputError(f"edge angle must be between 0 and 90 degrees, got {cfg.edge_angle}")
    if cfg.min_samples < 2 or cfg.max_samples < cfg.min_samples:
        raise InputError(f"need 2 <= min_samples <= max_samples, got {cfg.min_samples} and {cfg.max_samples}")


def _reference_depth_path(cfg: Config, capture: str) -> Path:
    path = Path(cfg.reference_depth or "")
    return path / capture / worktree.RECORD_FILES["depth"] if path.is_dir() else path


def align_capture(work: Path, capture: str, cfg: Config, *, overwrite: bool = False) -> Path | None:
    """Align one capture; returns the path written, or None when its output was up to date."""
    depth_path = worktree.record_path(work, capture, "depth")
    poses_path = worktree.record_path(work, capture, "poses")
    sparse_path = worktree.record_path(work, capture, "sparse")
    inputs: list[Path] = [depth_path]
    if cfg.reference in ("sparse", "view"):
        inputs.append(poses_path)
    if cfg.reference == "sparse" or (cfg.reference == "view" and sparse_path.is_file()):
        inputs.append(sparse_path)
    masks_path = headmasks.masks_path(work, capture)
    use_masks = cfg.use_masks and masks_path.is_file()
    if cfg.reference == "depth":
        inputs.append(_reference_depth_path(cfg, capture))
    for path in inputs:
        if not path.is_file():
            hint = (
                _HOW_TO_MAKE.get(path.name, "")
                if path in inputs[:-1] or cfg.reference != "depth"
                else ("pass --reference-depth as a depth record or a folder holding <capture>/depth.safetensors")
            )
            raise InputError(f"{path}: not found; {hint or 'check the path'}")
    out_path = worktree.record_path(work, capture, "aligned")
    inputs_hash = io.hash_inputs(STAGE, cfg, *inputs, *([masks_path] if use_masks else []))
    if not overwrite and worktree.is_up_to_date(out_path, inputs_hash):
        log.debug("align: %s is up to date, skipped", capture)
        return None

    record = io.load_record(depth_path, kind="depth", capture=capture)
    space: FitSpace = "disparity" if record.extra.get("depth_kind") == "disparity" else "depth"
    views = _load_views(record, poses_path if poses_path in inputs else None, capture)
    output_valid = views.valid_nhw
    if use_masks:
        views.valid_nhw = _sample_mask(views, work, capture)
    if cfg.prefilter:
        views.prefilter = cfg
        if cfg.reference == "depth":  # dense reads: the noise first, from its own sample of pixels
            views.noise_raw = np.array([depthmaps.estimate_noise(d, v, seed=cfg.seed)
                                        for d, v in zip(views.depth_nhw, views.valid_nhw, strict=True)])  # fmt: skip
        else:  # SfM points or a reference view: from the pixels their blocks read anyway (`read_block`)
            views.noise_raw = np.full(len(views.names), np.nan)
        views.rejected = np.zeros(len(views.names), dtype=np.int64)
    fixed: dict[int, tuple[float, float]] = {}
    if cfg.reference == "sparse":
        samples = sparse_samples(views, io.load_record(sparse_path, kind="sparse", capture=capture), cfg)
    elif cfg.reference == "view":
        if cfg.reference_view not in views.names:
            raise InputError(f"--reference-view {cfg.reference_view}: not a view of capture {capture} "
                             f"(views: {', '.join(views.names[:5])}{', ...' * (len(views.names) > 5)})")  # fmt: skip
        row = views.names.index(cfg.reference_view)
        s, b, own = _reference_view_fit(views, row, space, cfg, sparse_path if sparse_path in inputs else None, capture)
        fixed[row] = (s, b)
        z_ref, _ = apply_fit(views.depth_nhw[row : row + 1], views.valid_nhw[row : row + 1],
                             np.array([s]), np.array([b]), space)  # fmt: skip
        samples = view_samples(views, row, z_ref[0], cfg)
        samples[row] = own  # its figures come from its own fit: the sparse points, or none
    else:
        reference = io.load_record(inputs[-1], kind="depth")
        if reference.capture and reference.capture != capture:
            raise InputError(f"{reference.path}: belongs to capture '{reference.capture}', not '{capture}'; "
                             "records of different captures cannot be combined")  # fmt: skip
        samples = depth_samples(views, reference, cfg)
    if views.prefilter is not None:  # the noise is known once the samples are read
        views.noise_raw = np.nan_to_num(views.noise_raw, nan=0.0)  # views without samples: not fitted anyway
        # what samples read: a 3 x 3 median, or one pixel bilinear over 4 (noise x 2/3 on average)
        median = np.array([views.reads_median(row) for row in range(len(views.names))])
        views.noise = views.noise_raw * np.where(median, depthmaps.MEDIAN_NOISE, 2.0 / 3.0)
    result = align_views(views.depth_nhw, output_valid, samples, space, cfg, fixed, views.noise)
    failed = [name for name, s in zip(views.names, result.scale, strict=False) if not np.isfinite(s)]
    if len(failed) == len(views.names):
        counts = [len(x) for x, _ in samples]
        raise StageFailure(f"capture {capture}: no view could be aligned (reference samples per view: {counts}); "
                           "check the poses and sparse records, or use --reference-depth")  # fmt: skip
    if failed:
        log.warning("align: %s: %d view(s) could not be fitted (too few reference samples): %s",
                    capture, len(failed), ", ".join(failed[:5]))  # fmt: skip
    if result.nonpositive.sum():
        log.warning("align: %s: %d pixel(s) had a non-positive aligned value and were masked",
                    capture, int(result.nonpositive.sum()))  # fmt: skip
    path = io.save_record(
        out_path,
        {
            "depth": result.depth_nhw,
            "scale": result.scale.astype(np.float64),
            "shift": result.shift.astype(np.float64),
            "residual_rms": result.residual_rms.astype(np.float64),
            "inliers": result.inliers.astype(np.int64),
            "nonpositive": result.nonpositive.astype(np.int64),
            "samples": result.samples.astype(np.int64),
            "residual_rel": result.residual_rel.astype(np.float64),
            "quality": result.quality.astype(np.int8),
            **(
                {"prediction_noise": views.noise_raw.astype(np.float64), "rejected_samples": views.rejected}
                if views.prefilter is not None
                else {}
            ),
            "image_hw": _image_hw(record),
        },
        kind="aligned",
        stage=STAGE,
        capture=capture,
        names=views.names,
        config=cfg,
        inputs_hash=inputs_hash,
        extra={
            "source_depth_kind": space,
            "fit_space": space,
            "reference": cfg.reference,
            "sample_mask": masks_path.relative_to(work).as_posix() if use_masks else "none",  # in the work tree
            "subject": record.extra.get("subject", capture),
            "failed_views": json.dumps(failed),
            "quality_levels": json.dumps(QUALITY),
            "weak_views": json.dumps(
                [n for n, q in zip(views.names, result.quality, strict=True) if q == QUALITY["weak"]]
            ),
        },  # fmt: skip
    )
    log.info("align: %s: %d view(s), median residual %.4g, wrote %s", capture, len(views.names),
             float(np.nanmedian(result.residual_rms[np.isfinite(result.residual_rms)])), path)  # fmt: skip
    return path


def _sample_mask(views: _Views, work: Path, capture: str) -> np.ndarray:
    """[N, H, W] bool: the valid pixels inside each view's head mask (a view whose head mask holds
    no valid pixel keeps all its valid pixels, with a warning)."""
    found = headmasks.work_head_masks(work, capture, views.names, views.depth_nhw.shape[1:])
    if found is None:
        return views.valid_nhw
    inside = views.valid_nhw & found[0]
    empty = ~inside.any(axis=(1, 2))
    if empty.any():
        log.warning("align: %s: %d view(s) have no valid pixel in their head mask and are sampled unmasked: %s",
                    capture, int(empty.sum()), ", ".join(np.asarray(views.names)[empty][:5]))  # fmt: skip
        inside[empty] = views.valid_nhw[empty]
    return inside


_HOW_TO_MAKE = {
    "depth.safetensors": "run `nvf depth DATA --out WORK` first",
    "poses.safetensors": "run `nvf poses DATA --out WORK` first (or align with --reference-depth)",
    "sparse.safetensors": "run `nvf poses DATA --out WORK` first (it writes the sparse points), "
    "or align with --reference-view/--reference-depth",
}


def _image_hw(record: io.Record) -> np.ndarray:
    """Each view's image size [N, 2] (the depth record's image_hw, else the map size)."""
    if "image_hw" in record.tensors:
        return np.asarray(record["image_hw"], dtype=np.int64)
    return np.tile(np.asarray(record["depth"].shape[1:], dtype=np.int64), (len(record.names), 1))


def _load_views(record: io.Record, poses_path: Path | None, capture: str) -> _Views:
    """The depth record's views, checked (NaN, all invalid), with their poses when asked."""
    depth = np.asarray(record["depth"], dtype=np.float64)  # [N, H, W]
    nan_views = [name for name, view in zip(record.names, depth, strict=False) if np.isnan(view).any()]
    if nan_views:
        raise InputError(f"{record.path}: NaN in the depth of {len(nan_views)} view(s) (e.g. {nan_views[0]}); "
                         "rerun nvf depth with --overwrite (and --precision fp32)")  # fmt: skip
    valid = np.isfinite(depth) & (depth > 0)
    if "mask" in record.tensors:  # a foreground mask stored with the depth
        valid &= np.asarray(record["mask"]).astype(bool).reshape(depth.shape)
    if not valid.any():
        raise InputError(f"{record.path}: every depth pixel is invalid (<= 0 or not finite); rerun nvf depth")
    image_hw = _image_hw(record)
    names = list(record.names)
    if poses_path is None:
        return _Views(names, depth, valid, None, None, None)
    poses = io.load_record(poses_path, kind="poses", capture=capture)
    pose_row = {name: i for i, name in enumerate(poses.names)}
    keep = [i for i, name in enumerate(names) if name in pose_row]
    if not keep:
        raise InputError(f"{poses_path}: none of the {len(names)} depth views has a pose (names differ); "
                         "run nvf poses and nvf depth on the same images")  # fmt: skip
    if len(keep) < len(names):
        log.warning("align: %s: %d view(s) without a pose are left out", capture, len(names) - len(keep))
    rows = [pose_row[names[i]] for i in keep]
    poses_hw = np.stack([poses["height"][rows], poses["width"][rows]], axis=1).astype(np.int64)
    if not np.array_equal(poses_hw, image_hw[keep]):
        bad = int(np.flatnonzero((poses_hw != image_hw[keep]).any(axis=1))[0])
        raise InputError(
            f"{record.path} and {poses_path} disagree on the size of {names[keep[bad]]} "
            f"({image_hw[keep][bad][1]}x{image_hw[keep][bad][0]} vs {poses_hw[bad][1]}x{poses_hw[bad][0]}); "
            "they were made from different images: rerun the stage with the stale output"
        )
    map_h, map_w = depth.shape[1:]
    to_map = np.zeros((len(keep), 3, 3))
    to_map[:, 0, 0] = map_w / poses_hw[:, 1]
    to_map[:, 1, 1] = map_h / poses_hw[:, 0]
    to_map[:, 2, 2] = 1.0
    K_map = to_map @ np.asarray(poses["K"], dtype=np.float64)[rows]
    return _Views([names[i] for i in keep], depth[keep], valid[keep], K_map,
                  np.asarray(poses["R"], dtype=np.float64)[rows],
                  np.asarray(poses["T"], dtype=np.float64)[rows])  # fmt: skip


def _reference_view_fit(
    views: _Views, row: int, space: FitSpace, cfg: Config, sparse_path: Path | None, capture: str
) -> tuple[float, float, tuple[np.ndarray, np.ndarray]]:
    """(s, b, samples) of the reference view: fitted to the sparse points when there are any (the
    samples it was fitted on, so its residual and inliers are reported), else identity with no
    samples (residual NaN, 0 inliers: nothing measured it)."""
    none = (np.zeros(0), np.zeros(0))
    if sparse_path is not None:
        one = _Views([views.names[row]], views.depth_nhw[row : row + 1], views.valid_nhw[row : row + 1],
                     views.K_map[row : row + 1], views.R[row : row + 1], views.T[row : row + 1])  # fmt: skip
        samples = sparse_samples(one, io.load_record(sparse_path, kind="sparse", capture=capture), cfg)
        x_nm, z_nm, valid = _pad(samples)
        fit = fit_scale_shift(x_nm, to_fit_space(z_nm, space), valid & (z_nm > 0), cfg)
        if fit.ok[0]:
            return float(fit.scale[0]), float(fit.shift[0]), samples[0]
        log.warning("align: %s: the reference view %s could not be fitted to the sparse points; using it as it is",
                    capture, views.names[row])  # fmt: skip
    return 1.0, 0.0, none
