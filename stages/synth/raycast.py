"""Ray casting of a `HeadShape`: sphere tracing, Newton on the analytic surface, coarse-to-fine depth."""

from __future__ import annotations

import logging

import numpy as np

from stages.core import geometry
from stages.synth.head import HeadShape

log = logging.getLogger("nvf")

_NEAR = 4e-3  # sphere tracing stops this close to the surface (implicit units ~ scene units)
_MAX_TRACE_STEPS = 400
_FINE_STEP = 2.5e-3  # fallback march for grazing rays, scene units
_FINE_SAMPLES = 40


def _sphere_hits(origins_n3: np.ndarray, dirs_n3: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Entry and exit t [N] of rays o + t v through the sphere |x| = radius (NaN where missed)."""
    a = np.sum(dirs_n3 * dirs_n3, axis=-1)
    b = np.sum(origins_n3 * dirs_n3, axis=-1)
    c = np.sum(origins_n3 * origins_n3, axis=-1) - radius**2
    disc = b * b - a * c
    root = np.sqrt(np.where(disc > 0, disc, np.nan))
    return (-b - root) / a, (-b + root) / a


def cast_rays(
    shape: HeadShape,
    origins_n3: np.ndarray,
    dirs_n3: np.ndarray,
    t_lo: np.ndarray | None = None,
    t_hi: np.ndarray | None = None,
) -> np.ndarray:
    """Parameter t [N] of the first hit of rays ``o + t v`` with the head (NaN where missed).

    Only hits in [t_lo, t_hi] (per ray, NaN = skip the ray) are looked for when those are given.

    Sphere tracing (float32) from the bounding sphere with steps ``f / (L |v|)`` never passes
    through the surface because ``L`` bounds the implicit's gradient; within `_NEAR` of it, Newton
    on the analytic surface (float64) solves the hit to ~1e-10. Grazing rays, where Newton is
    unsafe, get a fine march plus regula falsi instead. Vectorised over all rays: the loops run
    over iterations, each on the rays still active.
    """
    origins = np.asarray(origins_n3, dtype=np.float64)
    dirs = np.asarray(dirs_n3, dtype=np.float64)
    t_hit = np.full(len(origins), np.nan)
    t_in, t_out = _sphere_hits(origins, dirs, shape.r_max)
    t_in = np.maximum(t_in, 0.0)
    if t_lo is not None and t_hi is not None:
        t_in, t_out = np.maximum(t_in, t_lo), np.minimum(t_out, t_hi)  # NaN propagates: skipped
    rays = np.flatnonzero(np.isfinite(t_in) & np.isfinite(t_out) & (t_out > t_in))
    if rays.size == 0:
        return t_hit
    o32, v32 = origins[rays].astype(np.float32), dirs[rays].astype(np.float32)
    speed = np.linalg.norm(dirs[rays], axis=-1)
    t = t_in[rays].astype(np.float32)
    t_end = t_out[rays].astype(np.float32)
    inv_lip_speed = (1.0 / (shape.lipschitz * speed)).astype(np.float32)
    near = np.zeros(rays.size, dtype=bool)
    active = np.arange(rays.size)
    for _ in range(_MAX_TRACE_STEPS):
        if active.size == 0:
            break
        f = shape.implicit(o32[active] + t[active, None] * v32[active])
        close = f < _NEAR
        near[active[close]] = True
        t_next = t[active] + f * inv_lip_speed[active]
        going = ~close & (t_next < t_end[active])
        t[active[going]] = t_next[going]
        active = active[going]
    if active.size:
        log.debug("synth: %d rays still tracing after %d steps, counted as misses", active.size, _MAX_TRACE_STEPS)
    close_rows = np.flatnonzero(near)
    t_hit[rays[close_rows]] = _solve_near(
        shape, origins[rays[close_rows]], dirs[rays[close_rows]], t[close_rows].astype(np.float64)
    )
    return t_hit


def _newton(
    shape: HeadShape,
    origins: np.ndarray,
    dirs: np.ndarray,
    t0: np.ndarray,
    t_max: np.ndarray,
    t_min: np.ndarray | None = None,
    iterations: int = 6,
) -> np.ndarray:
    """Hits t [N] by Newton on the analytic implicit (float64) from t0 (near the surface).

    A ray's answer is NaN unless Newton converged (|f| < 1e-9, or a last step < 1e-8) to a t in
    [t_min, t_max] (t_min defaults to t0): Newton is only trusted close to where it started;
    callers fall back for the rest.
    """
    t = t0.astype(np.float64).copy()
    converged = np.zeros(len(t), dtype=bool)
    active = np.arange(len(t))
    for step in range(iterations + 1):
        points = origins[active] + t[active, None] * dirs[active]
        if step == iterations:
            f = shape.implicit(points)
        else:
            f, grad = shape.implicit_and_gradient(points)
        done = np.abs(f) < 1e-9
        converged[active[done]] = True
        if step == iterations:
            break
        active, f, grad = active[~done], f[~done], grad[~done]
        if active.size == 0:
            break
        slope = np.sum(grad * dirs[active], axis=-1)  # df/dt, negative when entering the head
        delta = f / np.minimum(slope, -1e-3)
        t[active] -= delta
        settled = np.abs(delta) < 1e-8  # quadratic convergence: the error left is ~1e-15
        converged[active[settled]] = True
        active = active[~settled]
        if active.size == 0:
            break
    t_min = t0 - 1e-6 / np.linalg.norm(dirs, axis=-1) if t_min is None else t_min
    good = converged & (t >= t_min) & (t <= t_max)
    return np.where(good, t, np.nan)


def _solve_near(shape: HeadShape, origins: np.ndarray, dirs: np.ndarray, t0: np.ndarray) -> np.ndarray:
    """Hits t [N] of rays that sphere tracing brought within `_NEAR` of the surface at t0.

    Newton from t0 where it converges close by; the rest (grazing rays) are marched finely from t0
    and bracketed for regula falsi; no sign change within the march means a miss (NaN).
    """
    speed = np.linalg.norm(dirs, axis=-1)
    t = _newton(shape, origins, dirs, t0, t0 + 20 * _NEAR / speed)
    rest = np.flatnonzero(np.isnan(t))
    if rest.size == 0:
        return t
    offsets = np.arange(_FINE_SAMPLES + 1) * _FINE_STEP - 1e-4  # [S+1] scene units from t0
    t_samples = t0[rest, None] + offsets / speed[rest, None]  # [R, S+1]
    points = origins[rest, None, :] + t_samples[..., None] * dirs[rest, None, :]
    inside = shape.implicit(points.reshape(-1, 3)).reshape(t_samples.shape) <= 0
    first = np.argmax(inside, axis=1)
    found = inside[np.arange(rest.size), first] & (first > 0)  # sample 0 inside: bracket lost, a miss
    if np.any(found):
        rows = np.flatnonzero(found)
        t[rest[rows]] = _regula_falsi(
            shape, origins[rest[rows]], dirs[rest[rows]], t_samples[rows, first[rows] - 1], t_samples[rows, first[rows]]
        )
    return t


def _regula_falsi(
    shape: HeadShape,
    origins: np.ndarray,
    dirs: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    iterations: int = 60,
    tol: float = 1e-10,
) -> np.ndarray:
    """Root t [N] of the implicit along rays bracketed by f(lo) > 0 >= f(hi) (Illinois, float64)."""

    def f(t, rows):
        return shape.implicit(origins[rows] + t[:, None] * dirs[rows])

    lo, hi = lo.copy(), hi.copy()
    all_rows = np.arange(len(lo))
    f_lo, f_hi = f(lo, all_rows), f(hi, all_rows)
    t = hi.copy()
    active = np.flatnonzero(np.abs(f_hi) > tol)
    side = np.zeros(len(lo), dtype=np.int8)  # which end moved last time: 1 = lo, -1 = hi
    for _ in range(iterations):
        if active.size == 0:
            break
        a, b, fa, fb = lo[active], hi[active], f_lo[active], f_hi[active]
        t_new = b - fb * (b - a) / (fb - fa)
        f_new = f(t_new, active)
        outside = f_new > 0
        # Illinois: an end that stays twice in a row gets its value halved
        f_hi[active] = np.where(outside, np.where(side[active] == 1, fb * 0.5, fb), f_new)
        f_lo[active] = np.where(outside, f_new, np.where(side[active] == -1, fa * 0.5, fa))
        lo[active] = np.where(outside, t_new, a)
        hi[active] = np.where(outside, b, t_new)
        side[active] = np.where(outside, 1, -1)
        t[active] = t_new
        active = active[(np.abs(f_new) > tol) & (hi[active] - lo[active] > tol)]
    return t


_COARSE_FACTOR = 4  # each level of `trace_depth` is this much coarser than the next
_COARSEST = 64  # images up to this size are traced directly
_DEPTH_MARGIN = 0.03  # scene units around the coarse neighbours' depth range that fine rays search
_KINK = 0.06  # largest second difference of coarse depth (scene units) still counted as one sheet
_RIM_MARGIN = 0.15  # the same in front of the range next to a silhouette, where the surface turns
_RIM_DEPTH = 0.5  # away steeply: a grazing hit lies up to ~sqrt(2 r h) behind its coarse neighbours


def view_rays(R: np.ndarray, T: np.ndarray, K: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Origins and directions [V, size*size, 3] of every pixel centre, row-major. Directions have
    camera z = 1, so a hit's ray parameter t is its z-depth."""
    pixels = geometry.pixel_grid(size, size).reshape(-1, 2)  # [P, 2]
    rays_cam = np.concatenate([pixels, np.ones((len(pixels), 1))], axis=1) @ np.linalg.inv(K).T  # [P, 3]
    dirs = rays_cam @ R  # [V, P, 3] world: R^T applied to each row
    origins = np.broadcast_to(geometry.camera_centers(R, T)[:, None, :], dirs.shape)
    return origins, dirs


def trace_depth(shape: HeadShape, R: np.ndarray, T: np.ndarray, K: np.ndarray, size: int) -> np.ndarray:
    """z-depth [V, size, size] of the head seen by V cameras sharing K (NaN where the ray misses).

    Coarse to fine: the image `_COARSE_FACTOR` times smaller is traced first (recursively); a fine
    ray then searches only within `_DEPTH_MARGIN` of the depth range of the 3x3 coarse pixels
    around it, and is a miss when all of them missed. Next to a silhouette (some of them missed)
    the surface turns away steeply, so the search spans `_RIM_MARGIN` in front to `_RIM_DEPTH` behind.
    Where the neighbourhood is one continuous sheet (all hit, small second differences of depth),
    Newton starts from the bilinearly interpolated coarse depth and no tracing is needed. The
    surface is smooth (no feature narrower than a few coarse pixels), so this finds the same
    first hit as tracing every whole ray, several times faster.
    """
    origins, dirs = view_rays(R, T, K, size)
    n_views = len(R)
    if size <= _COARSEST:
        return cast_rays(shape, origins.reshape(-1, 3), dirs.reshape(-1, 3)).reshape(n_views, size, size)
    coarse_size = -(-size // _COARSE_FACTOR)
    scale = np.diag([coarse_size / size, coarse_size / size, 1.0])
    coarse = trace_depth(shape, R, T, scale @ K, coarse_size)  # [V, c, c]
    padded = np.pad(coarse, ((0, 0), (1, 1), (1, 1)), constant_values=np.nan)
    shifts = np.stack(
        [
            padded[:, 1 + dy : 1 + dy + coarse_size, 1 + dx : 1 + dx + coarse_size]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
    )  # [9, V, c, c]
    near, far = np.fmin.reduce(shifts, axis=0), np.fmax.reduce(shifts, axis=0)  # NaN only if all miss
    rim = np.isnan(shifts).any(axis=0) & np.isfinite(near)  # [V, c, c] some but not all missed
    t_lo_c = near - np.where(rim, _RIM_MARGIN, _DEPTH_MARGIN)
    t_hi_c = far + np.where(rim, _RIM_DEPTH, _DEPTH_MARGIN)
    index = np.floor((np.arange(size) + 0.5) * coarse_size / size).astype(np.int64)  # fine -> coarse
    t_lo = t_lo_c[:, index[:, None], index[None, :]].reshape(-1)  # [V*size*size]
    t_hi = t_hi_c[:, index[:, None], index[None, :]].reshape(-1)
    # Newton is safe where the whole neighbourhood hit one continuous sheet of surface: no miss
    # and no fold (second differences of the depth stay small; an occlusion makes them jump)
    centre = shifts[4]
    kink = np.fmax.reduce([np.abs(shifts[a] - 2 * centre + shifts[8 - a]) for a in range(4)])  # 4 directions
    smooth_c = kink < _KINK  # [V, c, c]; NaN (a miss in the neighbourhood) compares False
    inner = np.flatnonzero(smooth_c[:, index[:, None], index[None, :]])
    origins, dirs = origins.reshape(-1, 3), dirs.reshape(-1, 3)
    depth = np.full(len(origins), np.nan)
    # inside the silhouette: Newton from the coarse depth interpolated, no tracing needed
    start = _upsample_bilinear(np.where(np.isnan(coarse), np.nanmean(coarse), coarse), size).reshape(-1)
    depth[inner] = _newton(shape, origins[inner], dirs[inner], start[inner], t_hi[inner], t_lo[inner])
    rest = np.flatnonzero(np.isnan(depth) & np.isfinite(t_lo))
    depth[rest] = cast_rays(shape, origins[rest], dirs[rest], t_lo[rest], t_hi[rest])
    return depth.reshape(n_views, size, size)


def _upsample_bilinear(image_vhw: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize [V, c, c] -> [V, size, size] with pixel centres aligned (+0.5 convention)."""
    coarse = image_vhw.shape[-1]
    pos = np.clip((np.arange(size) + 0.5) * coarse / size - 0.5, 0.0, coarse - 1.0)
    i0 = np.minimum(np.floor(pos).astype(np.int64), coarse - 2)
    w = pos - i0  # [size]
    rows = image_vhw[:, i0, :] * (1 - w)[:, None] + image_vhw[:, i0 + 1, :] * w[:, None]  # [V, size, c]
    return rows[:, :, i0] * (1 - w) + rows[:, :, i0 + 1] * w
