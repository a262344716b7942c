"""Pose geometry of a set of cameras: a circle through camera centres, the ring fallback that fills
unregistered views (SLERP + circle, Algorithm 1 improved), the similarity between two worlds posing
the same cameras, and intrinsics rescaled to another image size. Poses are world-to-camera (OpenCV)."""

from __future__ import annotations

import math

import numpy as np

from stages.core import geometry


def fit_circle(points_n3: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray] | None:
    """Least-squares circle through 3D points: (centre [3], unit normal [3], radius, e1, e2), or None
    when the points are too few or collinear. ``e1, e2`` span the plane; angles are atan2 in them."""
    points = np.asarray(points_n3, dtype=np.float64)
    if len(points) < 3:
        return None
    mean = points.mean(0)
    _, sing, vt = np.linalg.svd(points - mean)
    if sing[1] <= 1e-6 * max(sing[0], 1e-12):
        return None
    e1, e2, normal = vt[0], vt[1], vt[2]
    xy = np.stack([(points - mean) @ e1, (points - mean) @ e2], axis=1)
    # Kasa fit: x² + y² = 2 a x + 2 b y + c
    A = np.column_stack([2 * xy, np.ones(len(xy))])
    (a, b, c), *_ = np.linalg.lstsq(A, (xy**2).sum(1), rcond=None)
    radius = math.sqrt(max(c + a * a + b * b, 0.0))
    if not np.isfinite(radius) or radius <= 0:
        return None
    return mean + a * e1 + b * e2, normal, radius, e1, e2


def interpolate_missing(
    R: np.ndarray, T: np.ndarray, registered: np.ndarray, order_n: np.ndarray, elevation_n: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill the poses of unregistered views (Algorithm 1, improved).

    ``R`` [N,3,3], ``T`` [N,3] (rows of unregistered views are ignored), ``registered`` [N] bool,
    ``order_n`` [N] the ordering parameter (azimuth in degrees, or the row index), ``elevation_n``
    [N] optional (views of a different elevation are kept off each other's circle). Rotations are
    SLERPed between the nearest registered neighbours in order (extrapolated from the two nearest
    on one side at the ends); centres are placed on a circle fitted to the registered centres at an
    angle interpolated linearly in ``order_n`` (blended centres when no circle fits). Returns (R, T,
    gap) where gap [N] is the distance in ``order_n`` to the nearest registered view (0 if registered).
    """
    R, T = np.array(R, dtype=np.float64), np.array(T, dtype=np.float64)
    order = np.asarray(order_n, dtype=np.float64)
    registered = np.asarray(registered, dtype=bool)
    elevation = np.zeros(len(order)) if elevation_n is None else np.asarray(elevation_n, dtype=np.float64)
    known = np.flatnonzero(registered)
    if len(known) < 2:
        raise ValueError("interpolate_missing needs at least 2 registered views")
    quats = geometry.rotmat_to_quat(R)
    centers = geometry.camera_centers(R, T)
    gap = np.zeros(len(order))
    for row in np.flatnonzero(~registered):
        same = known[np.abs(elevation[known] - elevation[row]) < 1e-6]
        pool = same if len(same) >= 2 else known
        lo, hi = _bracket(order, pool, order[row])
        t = (order[row] - order[lo]) / (order[hi] - order[lo]) if order[hi] != order[lo] else 0.5
        quat = geometry.slerp(quats[lo], quats[hi], t)
        R[row] = geometry.quat_to_rotmat(quat)
        center = _circle_center(centers[pool], order[pool], order[row])
        if center is None:
            center = (1 - t) * centers[lo] + t * centers[hi]
        T[row] = -R[row] @ center
        gap[row] = float(np.min(np.abs(order[known] - order[row])))
    return R, T, gap


def _bracket(order: np.ndarray, pool: np.ndarray, value: float) -> tuple[int, int]:
    """The registered rows just below and above ``value`` in order; at an end, the two nearest."""
    below = pool[order[pool] < value]
    above = pool[order[pool] > value]
    if len(below) and len(above):
        return int(below[np.argmax(order[below])]), int(above[np.argmin(order[above])])
    side = below if len(below) else above
    nearest = side[np.argsort(np.abs(order[side] - value))][:2]
    if len(nearest) < 2:  # one registered view on this side only: pair it with the far side
        others = pool[pool != nearest[0]]
        nearest = np.array([nearest[0], others[np.argmin(np.abs(order[others] - value))]])
    return int(nearest[0]), int(nearest[1])


def _circle_center(centers_k3: np.ndarray, order_k: np.ndarray, value: float) -> np.ndarray | None:
    """A point on the circle fitted to ``centers_k3`` at the angle linear in order (least squares)."""
    circle = fit_circle(centers_k3)
    if circle is None:
        return None
    mid, _normal, radius, e1, e2 = circle
    rel = centers_k3 - mid
    angles = np.unwrap(np.arctan2(rel @ e2, rel @ e1)[np.argsort(order_k)])
    sorted_order = np.sort(order_k)
    if np.ptp(sorted_order) <= 0:
        return None
    slope, intercept = np.polyfit(sorted_order, angles, 1)
    angle = slope * value + intercept
    return mid + radius * (math.cos(angle) * e1 + math.sin(angle) * e2)


def fit_pose_similarity(R_src: np.ndarray, T_src: np.ndarray, R_dst: np.ndarray,
                        T_dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:  # fmt: skip
    """Similarity X_dst = s R_w X_src + t_w between two worlds posing the same cameras (N >= 2).

    Uses the rotations as well as the centres, so two views suffice: R_w is the chordal mean of
    R_dst^T R_src, then s and t_w solve the centres in least squares.
    """
    M = np.einsum("nji,njk->ik", R_dst, R_src)  # sum of R_dst^T R_src
    U, _, Vt = np.linalg.svd(M)
    R_w = U @ np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))]) @ Vt
    C_src = geometry.camera_centers(R_src, T_src) @ R_w.T
    C_dst = geometry.camera_centers(R_dst, T_dst)
    src_c, dst_c = C_src - C_src.mean(0), C_dst - C_dst.mean(0)
    scale = float((src_c * dst_c).sum() / max((src_c**2).sum(), 1e-18))
    return scale, R_w, C_dst.mean(0) - scale * C_src.mean(0)


def transform_pose(R: np.ndarray, T: np.ndarray, scale: float, R_w: np.ndarray,
                   t_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Cameras (R [...,3,3], T [...,3]) of world A expressed in world B, where X_B = scale R_w X_A + t_w."""
    R_b = np.asarray(R, dtype=np.float64) @ R_w.T
    center = scale * geometry.camera_centers(R, T) @ R_w.T + t_w
    return R_b, -np.einsum("...ij,...j->...i", R_b, center)


def scaled_intrinsics(K: np.ndarray, width: int, height: int, new_width: int, new_height: int) -> np.ndarray:
    """``K`` of a ``width`` x ``height`` image, for the same camera at ``new_width`` x ``new_height``."""
    scale = np.diag([new_width / width, new_height / height, 1.0])
    return scale @ K
