"""Monocular-depth corruptions (what align and cloud are measured against) and the errors they are scored by."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from stages.core import geometry
from stages.core.errors import InputError
from stages.synth.head import HeadShape


@dataclass(frozen=True)
class Corruption:
    """How exact z-depth is turned into a prediction with the failures of real monocular depth.

    Convention (per view v, on the metric disparity p = 1/z of the ground truth):

    - bend: p <- p (1 + bend g_v(u, v)), g_v a smooth field with |g_v| <= 1 on the head (peak
      exactly 1): the sum of three random plane waves of at most 0.6 cycles per image;
    - noise: p <- p (1 + noise n), n i.i.d. standard normal per pixel (multiplicative);
    - flying pixels: the pixels within `flying_px` of the silhouette (both sides) take
      p_fg a + p_bg (1 - a), a uniform in 0..1: values between the head and the background behind it;
    - salt: a fraction `salt` of all pixels is replaced by values uniform over the view's map range;
    - the background (where z = 0) is a far wall at `background_depth` x the farthest head depth;
    - the prediction D = (p - b_v) / s_v with a log-uniform per-view scale s_v in `scale_range`
      and shift b_v = u p_bg, u uniform in `shift_range` (so D > 0 everywhere, as DPT's outputs).

    ``kind = "depth"`` applies the same to z instead of 1/z (a depth-predicting model).
    """

    kind: Literal["disparity", "depth"] = "disparity"
    scale_range: tuple[float, float] = (0.2, 5.0)
    shift_range: tuple[float, float] = (-0.5, 0.5)
    noise: float = 0.0
    salt: float = 0.0
    bend: float = 0.0
    flying_px: float = 0.0
    background_depth: float = 2.0
    seed: int = 0


@dataclass(frozen=True)
class Corrupted:
    """A corrupted prediction [N, H, W] and what made it (rows as the input's views).

    ``depth_nhw`` is the prediction D; ``scale``/``shift`` [N] the true s_v, b_v (s D + b gives the
    corrupted metric value back); ``ideal_scale``/``ideal_shift`` [N] the best affine alignment
    of the prediction: least squares of the true 1/z (z for ``depth``) on the prediction without
    noise, salt and flying pixels, over the head's pixels (the true s_v, b_v when there is no
    bend); ``bend_nhw`` the factor 1 + bend g_v; ``salt_nhw`` and ``flying_nhw`` the pixels
    replaced by salt and by flying values.
    """

    depth_nhw: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    ideal_scale: np.ndarray
    ideal_shift: np.ndarray
    bend_nhw: np.ndarray
    salt_nhw: np.ndarray
    flying_nhw: np.ndarray
    kind: str

    def ideal_depth(self, *, unbend: bool = False) -> np.ndarray:
        """z-depth [N, H, W] of the ideal alignment of this prediction: (ideal_scale, ideal_shift)
        applied to it (0 where not positive). With `unbend`, the true (s_v, b_v) and the bend divided
        out: the smooth part of the corruption undone, noise, salt and flying pixels kept."""
        if unbend:
            value = (self.scale[:, None, None] * self.depth_nhw + self.shift[:, None, None]) / self.bend_nhw
        else:
            value = self.ideal_scale[:, None, None] * self.depth_nhw + self.ideal_shift[:, None, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            z = 1.0 / value if self.kind == "disparity" else value
        return np.where(np.isfinite(z) & (z > 0), z, 0.0)


def _bend_field(rng: np.random.Generator, size_hw: tuple[int, int], mask_hw: np.ndarray) -> np.ndarray:
    """A smooth field [H, W] with peak |g| = 1 over `mask_hw`: three random plane waves."""
    height, width = size_hw
    v, u = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width, indexing="ij")
    field_hw = np.zeros((height, width))
    for _ in range(3):
        angle, cycles, phase = rng.uniform(0, np.pi), rng.uniform(0.25, 0.6), rng.uniform(0, 2 * np.pi)
        field_hw += rng.uniform(0.5, 1.0) * np.cos(2 * np.pi * cycles * (u * np.cos(angle) + v * np.sin(angle)) + phase)
    peak = np.abs(field_hw[mask_hw]).max() if mask_hw.any() else np.abs(field_hw).max()
    return field_hw / max(peak, 1e-12)


def corrupt_depth(depth_nhw: np.ndarray, corruption: Corruption) -> Corrupted:
    """Corrupt exact z-depth [N, H, W] (0 = background) as `corruption` says (seeded, per view)."""
    from scipy import ndimage

    z = np.asarray(depth_nhw, dtype=np.float64)
    n_views, height, width = z.shape
    rng = np.random.default_rng([corruption.seed, 17])
    inverse = corruption.kind == "disparity"
    out = np.zeros_like(z)
    bend_all, salt_all, flying_all = np.ones_like(z), np.zeros(z.shape, bool), np.zeros(z.shape, bool)
    scales, shifts, ideal_scales, ideal_shifts = (np.zeros(n_views) for _ in range(4))
    for view in range(n_views):
        fg = z[view] > 0
        far = corruption.background_depth * (z[view][fg].max() if fg.any() else 1.0)
        metric = np.where(fg, z[view], far)
        p = 1.0 / metric if inverse else metric
        p_bg = 1.0 / far if inverse else far
        bend = 1.0 + corruption.bend * _bend_field(rng, (height, width), fg)
        p = p * np.where(fg, bend, 1.0)
        smooth = p[fg]  # the bent prediction before noise, salt and flying pixels (metric, unscaled)
        if corruption.noise > 0:
            p = p * (1.0 + corruption.noise * rng.standard_normal(p.shape))
        flying = np.zeros_like(fg)
        if corruption.flying_px > 0 and fg.any() and not fg.all():
            inside = ndimage.distance_transform_edt(fg)
            outside = ndimage.distance_transform_edt(~fg)
            flying = np.where(fg, inside, outside) <= corruption.flying_px
            # a flying pixel mixes the head's value (the nearest head pixel's, outside) with the background's
            _, (rows, cols) = ndimage.distance_transform_edt(~fg, return_indices=True)
            mix = rng.uniform(0.0, 1.0, p.shape)
            p = np.where(flying, mix * p[rows, cols] + (1 - mix) * p_bg, p)
        salt = rng.random(p.shape) < corruption.salt
        low, high = float(p.min()), float(p.max())
        p = np.where(salt, rng.uniform(low, high, p.shape), p)
        scale = float(np.exp(rng.uniform(*np.log(corruption.scale_range))))
        shift = float(rng.uniform(*corruption.shift_range) * (p_bg if inverse else low))
        out[view] = (p - shift) / scale
        scales[view], shifts[view] = scale, shift
        ideal_scales[view], ideal_shifts[view] = scale, shift
        if corruption.bend > 0 and fg.sum() >= 2:  # least squares of the truth on the bent prediction
            x, y = (smooth - shift) / scale, (1.0 / z[view][fg] if inverse else z[view][fg])
            slope = float(np.cov(x, y, bias=True)[0, 1] / np.var(x))
            ideal_scales[view], ideal_shifts[view] = slope, float(y.mean() - slope * x.mean())
        bend_all[view], salt_all[view], flying_all[view] = np.where(fg, bend, 1.0), salt, flying
    return Corrupted(out, scales, shifts, ideal_scales, ideal_shifts, bend_all, salt_all, flying_all, corruption.kind)


def alignment_error(aligned_nhw: np.ndarray, ideal_nhw: np.ndarray, mask_nhw: np.ndarray) -> float:
    """AbsRel of aligned z-depth against the ideal alignment, after one global scale (the median
    ratio ideal / aligned over every pixel of `mask_nhw` where both are positive): the error of the
    fit alone, in any scene units (e.g. SfM's). Pixels the aligner left invalid (0) are not scored."""
    both = mask_nhw & (aligned_nhw > 0) & (ideal_nhw > 0)
    if not both.any():
        raise InputError("alignment_error: no pixel is valid in both maps")
    a, b = np.asarray(aligned_nhw, np.float64)[both], np.asarray(ideal_nhw, np.float64)[both]
    g = float(np.median(b / a))
    return float(np.mean(np.abs(g * a - b) / b))


def surface_distance(
    points_n3: np.ndarray, shape: HeadShape, R_est: np.ndarray, T_est: np.ndarray, R_true: np.ndarray,
    T_true: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """Distance [N] of points in the frame of estimated poses (e.g. SfM's) from the true surface.

    The points are brought into the ground-truth frame by the similarity that best maps the
    estimated camera centres onto the true ones (`geometry.similarity_align_poses`); the distance is
    the first-order distance |f| / |grad f| to the analytic surface f = 0 (`HeadShape.implicit`),
    exact to ~1e-4 of the head size at the distances that matter here.
    """
    alignment = geometry.similarity_align_poses(R_est, T_est, R_true, T_true)
    points = alignment.scale * np.asarray(points_n3, np.float64) @ alignment.R_world.T + alignment.t_world
    value, grad = shape.implicit_and_gradient(points)
    return np.abs(value) / np.maximum(np.linalg.norm(grad, axis=-1), 1e-12)
