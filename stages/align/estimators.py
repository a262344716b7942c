"""The fit of y ~ s x + b per view, vectorised over views: least squares, LMedS, Huber/Tukey IRLS,
RANSAC, errors in variables (`fit_scale_shift`)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from stages.align.config import Config
from stages.core.errors import InputError

_MAD_TO_SIGMA = 1.4826  # sigma of a normal distribution from its median absolute deviation
_TUKEY_C = 4.685  # Tukey biweight cut-off in sigmas (95% efficiency under Gaussian noise)


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
        scale, shift, inliers, ok = _fit_lmeds(x, y, valid, floor, cfg, x_noise)
    elif cfg.robust in ("huber", "tukey"):
        scale, shift, inliers, ok = _fit_irls(x, y, valid, floor, y_level, cfg)
    elif cfg.robust == "ransac":
        scale, shift, inliers, ok = _ransac(x, y, valid, y_level, cfg)
    else:
        raise InputError(f"unknown robust mode {cfg.robust!r}: use lmeds, huber, tukey, ransac or none")
    counts = valid.sum(axis=1)
    ok = ok & (counts >= max(2, cfg.min_samples)) & (scale > 0)
    inliers = inliers & ok[:, None]
    return Fit(np.where(ok, scale, np.nan), np.where(ok, shift, np.nan), inliers, ok)


def _fit_lmeds(
    x: np.ndarray, y: np.ndarray, valid: np.ndarray, floor: np.ndarray, cfg: Config, x_noise: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scale, shift, inliers, ok) of `lmeds` (steps 1-3 of `fit_scale_shift`): the LMedS seed, biweight
    IRLS, then errors in variables (or least squares) on the 3-sigma inliers."""
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
    return scale, shift, inliers, ok


def _fit_irls(
    x: np.ndarray, y: np.ndarray, valid: np.ndarray, floor: np.ndarray, y_level: np.ndarray, cfg: Config
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(scale, shift, inliers, ok) of `huber` (IRLS from least squares) or `tukey` (biweight IRLS from
    RANSAC), then least squares on the 3-sigma inliers."""
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
    return scale, shift, inliers, ok


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
