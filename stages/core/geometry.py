"""Camera geometry: quaternions, SLERP, relative poses, back-projection, similarity alignment.

This module is the one place where nvf's geometric conventions live; every stage goes through it.

Convention:
    - Poses are world-to-camera in the OpenCV/COLMAP frame: ``x_cam = R @ x_world + T``; camera
      x right, y down, z forward. ``K`` is 3x3 in pixels. Pixel centres sit at integer + 0.5 as
      in COLMAP: the pixel in column i, row j has centre ``(u, v) = (i + 0.5, j + 0.5)``.
    - Depth is z-depth along the optical axis (the camera z coordinate), not ray length.
    - Quaternions are COLMAP's ``(w, x, y, z)``, unit, returned with ``w >= 0``.
    - nerfstudio's transforms.json uses camera-to-world in the OpenGL frame (x right, y up,
      z back); convert only with `opencv_w2c_to_opengl_c2w` / `opengl_c2w_to_opencv_w2c`.
    - World frame of synthetic and Multi-PIE rigs: world "up" is -y (OpenCV-like, y down). The
      frontal camera (azimuth 0) sits at ``(0, 0, -r)`` looking along +z; positive azimuth moves the
      camera toward +x, positive elevation moves it up (toward -y). Centre for azimuth a,
      elevation e, radius r: ``r * (sin a cos e, -sin e, -cos a cos e)``.
    - Relative pose (paper): ``R_rel = R_t R_s^-1``, ``T_rel = T_t - R_rel T_s``;
      ``code12 = flatten([R_rel | T_rel])`` row-major. Applying it to the source pose gives the
      target: ``R_t = R_rel R_s``, ``T_t = R_rel T_s + T_rel``.

Arrays are numpy float64 and batched over leading dimensions (``[..., 3, 3]``) unless stated;
`backproject`, `backproject_views` and `project` also take torch tensors and answer in kind.

>>> R, T = ring_pose(0.0, 0.0, 2.0)
>>> np.allclose(R, np.eye(3)), np.allclose(camera_centers(R, T), [0.0, 0.0, -2.0])
(True, True)
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from stages.core.errors import InputError

_FLIP_YZ = np.diag([1.0, -1.0, -1.0])  # OpenCV camera axes <-> OpenGL camera axes


def _check_shape(shape: tuple[int, ...], name: str, tail: tuple[int, ...]) -> None:
    shape = tuple(int(s) for s in shape)
    if len(shape) < len(tail) or shape[len(shape) - len(tail) :] != tail:
        want = ", ".join(["..."] + [str(t) for t in tail])
        raise InputError(f"{name} must have shape [{want}], got {list(shape)}.")


def _arr(x: Any, name: str, tail: tuple[int, ...] = ()) -> np.ndarray:
    """`x` as float64 with trailing shape `tail`, or InputError."""
    try:
        out = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be a numeric array: {exc}") from None
    _check_shape(out.shape, name, tail)
    return out


def _unit(v: np.ndarray, name: str) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    if np.any(~np.isfinite(norm)) or np.any(norm < 1e-12):
        raise InputError(f"{name} has a zero-length or non-finite vector; it cannot be normalised.")
    return v / norm


def _transpose(m: np.ndarray) -> np.ndarray:
    return np.swapaxes(m, -1, -2)


def _broadcast_pose(R: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """R [..., 3, 3] and T [..., 3] broadcast to the same leading dims."""
    lead = np.broadcast_shapes(R.shape[:-2], T.shape[:-1])
    return np.broadcast_to(R, (*lead, 3, 3)), np.broadcast_to(T, (*lead, 3))


# --- rotations ------------------------------------------------------------------------------------


def quat_to_rotmat(quat_wxyz: Any) -> np.ndarray:
    """Rotation matrices [..., 3, 3] from quaternions [..., 4] (w, x, y, z), normalised first."""
    w, x, y, z = np.moveaxis(_unit(_arr(quat_wxyz, "quat_wxyz", (4,)), "quat_wxyz"), -1, 0)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return np.stack([np.stack(row, axis=-1) for row in rows], axis=-2)


def rotmat_to_quat(rotmat: Any) -> np.ndarray:
    """Unit quaternions [..., 4] (w, x, y, z), w >= 0, from rotation matrices [..., 3, 3].

    Shepperd's method: of the four algebraically equal formulas, use the one whose divisor
    (2|w|, 2|x|, 2|y|, 2|z|) is largest, so no division ever loses precision.
    """
    m = _arr(rotmat, "rotmat", (3, 3))
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    diag4 = np.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], axis=-1
    )  # [..., 4] = 4 * (w², x², y², z²)
    two_abs = np.sqrt(np.maximum(diag4, 0.0))  # [..., 4] = 2 * |w, x, y, z|
    candidates = (
        np.stack(
            [  # [..., 4 candidates, 4 components], each scaled by 2|q_k|
                np.stack([diag4[..., 0], m21 - m12, m02 - m20, m10 - m01], axis=-1),
                np.stack([m21 - m12, diag4[..., 1], m10 + m01, m02 + m20], axis=-1),
                np.stack([m02 - m20, m10 + m01, diag4[..., 2], m12 + m21], axis=-1),
                np.stack([m10 - m01, m20 + m02, m21 + m12, diag4[..., 3]], axis=-1),
            ],
            axis=-2,
        )
        / (2.0 * np.maximum(two_abs, 1e-3))[..., None]
    )
    best = np.argmax(two_abs, axis=-1)[..., None, None]  # [..., 1, 1]
    quat = np.take_along_axis(candidates, best, axis=-2)[..., 0, :]
    return _canonical_quat(quat / np.linalg.norm(quat, axis=-1, keepdims=True))


def _canonical_quat(quat: np.ndarray) -> np.ndarray:
    return np.where(quat[..., :1] < 0, -quat, quat)


def slerp(quat0: Any, quat1: Any, t: Any) -> np.ndarray:
    """Spherical linear interpolation [..., 4] between unit quaternions along the shortest arc.

    `t` is a scalar or an array broadcasting with the leading dims; t=0 gives quat0, t=1 quat1.
    Nearly equal quaternions (dot > 0.9995) use normalised linear interpolation instead.
    """
    q0 = _unit(_arr(quat0, "quat0", (4,)), "quat0")
    q1 = _unit(_arr(quat1, "quat1", (4,)), "quat1")
    t = _arr(t, "t")[..., None]
    dot = np.sum(q0 * q1, axis=-1, keepdims=True)
    q1 = np.where(dot < 0, -q1, q1)  # q and -q are the same rotation: take the short way round
    dot = np.abs(dot)
    theta = np.arccos(np.clip(dot, -1.0, 1.0))
    sin_theta = np.maximum(np.sin(theta), 1e-12)
    w0 = np.where(dot > 0.9995, 1.0 - t, np.sin((1.0 - t) * theta) / sin_theta)
    w1 = np.where(dot > 0.9995, t, np.sin(t * theta) / sin_theta)
    out = w0 * q0 + w1 * q1
    return _canonical_quat(out / np.linalg.norm(out, axis=-1, keepdims=True))


def rotation_angle_deg(R_a: Any, R_b: Any) -> np.ndarray:
    """Geodesic angle [...] in degrees between rotations, atan2-based (accurate near 0 and 180)."""
    rel = _transpose(_arr(R_a, "R_a", (3, 3))) @ _arr(R_b, "R_b", (3, 3))
    axis_2sin = np.stack(
        [rel[..., 2, 1] - rel[..., 1, 2], rel[..., 0, 2] - rel[..., 2, 0], rel[..., 1, 0] - rel[..., 0, 1]],
        axis=-1,
    )  # |.| = 2 sin(angle)
    trace = rel[..., 0, 0] + rel[..., 1, 1] + rel[..., 2, 2]  # = 1 + 2 cos(angle)
    return np.degrees(np.arctan2(np.linalg.norm(axis_2sin, axis=-1), trace - 1.0))


# --- poses ----------------------------------------------------------------------------------------


def camera_centers(R: Any, T: Any) -> np.ndarray:
    """Camera centres [..., 3] in world coordinates: C = -R^T T."""
    R, T = _arr(R, "R", (3, 3)), _arr(T, "T", (3,))
    return -np.einsum("...ji,...j->...i", R, T)


def look_at(center: Any, target: Any, up: Any = (0.0, -1.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera (R [..., 3, 3], T [..., 3]) of cameras at `center` [..., 3] facing `target`.

    Camera z points at the target; image y (down) is aligned with -`up`, so `up` appears toward
    the top of the image (smaller v). Batched over broadcasting leading dims.
    """
    center, target = _arr(center, "center", (3,)), _arr(target, "target", (3,))
    up = _unit(_arr(up, "up", (3,)), "up")
    z = _unit(target - center, "target - center (camera centre equals target)")
    x = np.cross(z, up)
    if np.any(np.linalg.norm(x, axis=-1) < 1e-9):
        raise InputError("look_at: viewing direction is parallel to `up`; pass another `up` vector.")
    x = _unit(x, "x axis")
    y = np.cross(z, x)
    R = np.stack([x, y, z], axis=-2)  # rows: camera axes in world coordinates
    return R, -np.einsum("...ij,...j->...i", R, center)


def ring_centers(azimuth_deg: Any, elevation_deg: Any, radius: Any, target: Any = (0, 0, 0)) -> np.ndarray:
    """Camera centres [..., 3] of the rig frame: target + r (sin a cos e, -sin e, -cos a cos e)."""
    a, e = np.radians(_arr(azimuth_deg, "azimuth_deg")), np.radians(_arr(elevation_deg, "elevation_deg"))
    r = _arr(radius, "radius")
    offset = np.stack(
        np.broadcast_arrays(r * np.sin(a) * np.cos(e), -r * np.sin(e), -r * np.cos(a) * np.cos(e)), axis=-1
    )
    return _arr(target, "target", (3,)) + offset


def ring_pose(
    azimuth_deg: Any, elevation_deg: Any, radius: Any, target: Any = (0, 0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """(R, T) of a rig camera at (azimuth, elevation, radius) looking at `target`, world up = -y."""
    target = _arr(target, "target", (3,))
    return look_at(ring_centers(azimuth_deg, elevation_deg, radius, target), target)


def relative_pose(R_s: Any, T_s: Any, R_t: Any, T_t: Any) -> tuple[np.ndarray, np.ndarray]:
    """Paper's relative pose from source to target: R_rel = R_t R_s^T, T_rel = T_t - R_rel T_s."""
    R_s, T_s = _arr(R_s, "R_s", (3, 3)), _arr(T_s, "T_s", (3,))
    R_t, T_t = _arr(R_t, "R_t", (3, 3)), _arr(T_t, "T_t", (3,))
    R_rel = R_t @ _transpose(R_s)
    return R_rel, T_t - np.einsum("...ij,...j->...i", R_rel, T_s)


def pose_code12(R_rel: Any, T_rel: Any) -> np.ndarray:
    """Conditioning code [..., 12] = flatten([R_rel | T_rel]) row-major."""
    R_rel, T_rel = _arr(R_rel, "R_rel", (3, 3)), _arr(T_rel, "T_rel", (3,))
    R_rel, T_rel = _broadcast_pose(R_rel, T_rel)
    rt = np.concatenate([R_rel, T_rel[..., None]], axis=-1)  # [..., 3, 4]
    return rt.reshape(*rt.shape[:-2], 12)


def apply_relative_pose(R_rel: Any, T_rel: Any, R_s: Any, T_s: Any) -> tuple[np.ndarray, np.ndarray]:
    """Target pose from source pose and relative pose: R_t = R_rel R_s, T_t = R_rel T_s + T_rel."""
    R_rel, T_rel = _arr(R_rel, "R_rel", (3, 3)), _arr(T_rel, "T_rel", (3,))
    R_s, T_s = _arr(R_s, "R_s", (3, 3)), _arr(T_s, "T_s", (3,))
    return R_rel @ R_s, np.einsum("...ij,...j->...i", R_rel, T_s) + T_rel


def _spherical(v: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(polar from `up`, azimuth around `up`, radius) of vectors v [..., 3]; `up` is unit [3]."""
    helper = np.eye(3)[int(np.argmin(np.abs(up)))]
    e1 = _unit(helper - (helper @ up) * up, "azimuth reference")
    e2 = np.cross(up, e1)  # e1 x e2 = up: right-handed, like Zero-1-to-3's (x, y) around z
    along = v @ up
    polar = np.arctan2(np.linalg.norm(v - along[..., None] * up, axis=-1), along)
    return polar, np.arctan2(v @ e2, v @ e1), np.linalg.norm(v, axis=-1)


def zero123_pose_code(
    R_s: Any, T_s: Any, R_t: Any, T_t: Any, up: Any = (0.0, -1.0, 0.0), center: Any = (0.0, 0.0, 0.0)
) -> np.ndarray:
    """Zero-1-to-3 conditioning [..., 4] = (Δpolar, sin Δazimuth, cos Δazimuth, Δradius), radians.

    Mirrors `get_T(target, cond)` of cvlab-columbia/zero123: spherical coordinates of the camera
    centres relative to `center`, polar angle measured from `up`, azimuth right-handed around it,
    deltas target minus source, Δazimuth taken mod 2π. Their world is z-up: pass up=(0, 0, 1).
    """
    up = _unit(_arr(up, "up", (3,)), "up")
    center = _arr(center, "center", (3,))
    polar_s, azim_s, rad_s = _spherical(camera_centers(R_s, T_s) - center, up)
    polar_t, azim_t, rad_t = _spherical(camera_centers(R_t, T_t) - center, up)
    d_azim = np.mod(azim_t - azim_s, 2 * np.pi)
    return np.stack(np.broadcast_arrays(polar_t - polar_s, np.sin(d_azim), np.cos(d_azim), rad_t - rad_s), axis=-1)


# --- pixels and points ----------------------------------------------------------------------------


def pixel_grid(height: int, width: int) -> np.ndarray:
    """Pixel centres [H, W, 2] as (u, v) = (column + 0.5, row + 0.5)."""
    if int(height) <= 0 or int(width) <= 0:
        raise InputError(f"pixel_grid needs a positive height and width, got {height}x{width}.")
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    return np.stack([u, v], axis=-1)


def _xp(x: Any) -> Any:
    """The array namespace of `x`: the torch module for tensors, numpy otherwise."""
    torch = sys.modules.get("torch")
    return torch if torch is not None and isinstance(x, torch.Tensor) else np


def _float(x: Any, xp: Any, like: Any = None) -> Any:
    """`x` as a float array of namespace `xp` (dtype/device of `like` for torch)."""
    if xp is np:
        return np.asarray(x, dtype=np.float64)
    if isinstance(x, np.ndarray) and not x.flags.writeable:
        x = x.copy()  # torch warns on read-only numpy views (np.broadcast_to)
    if like is not None:
        return xp.as_tensor(x, dtype=like.dtype, device=like.device)
    x = xp.as_tensor(x)
    return x if x.is_floating_point() else x.to(xp.get_default_dtype())


def pose_code_radius(code_p12: np.ndarray, min_angle_deg: float = 5.0) -> float | None:
    """Camera-to-subject distance ρ implied by pairs' 12-D codes (median over pairs), None if none fits.

    Two cameras looking at one point X at distance ρ on both optical axes: X is (0, 0, ρ) in both
    frames and x_t = R_rel x_s + T_rel, so T_rel = ρ (e_z - R_rel e_z); least squares per pair, over
    pairs whose axes differ by more than `min_angle_deg`.
    """
    rt = np.asarray(code_p12, np.float64).reshape(-1, 3, 4)
    direction = np.array([0.0, 0.0, 1.0]) - rt[:, :, 2]  # e_z - R_rel e_z, [P, 3]
    norm2 = np.einsum("pi,pi->p", direction, direction)
    keep = norm2 > (2 * np.sin(np.radians(min_angle_deg) / 2)) ** 2
    if not keep.any():
        return None
    rho = np.einsum("pi,pi->p", rt[keep, :, 3], direction[keep]) / norm2[keep]
    rho = rho[np.isfinite(rho) & (rho > 0)]
    return float(np.median(rho)) if len(rho) else None


class ViewPoints(NamedTuple):
    """Points back-projected from a batch of depth maps, one row per valid pixel."""

    points_n3: Any  # world coordinates (float64 for numpy input; the depth's dtype for torch)
    view_n: Any  # index of the view in the batch (int64)
    pixel_n: Any  # row-major pixel index j * width + i within its view (int64)
    width: int  # depth-map width W, to split pixel_n into row and column

    @property
    def row_n(self) -> Any:
        """Pixel row j (int64); v = j + 0.5."""
        return self.pixel_n // self.width

    @property
    def col_n(self) -> Any:
        """Pixel column i (int64); u = i + 0.5."""
        return self.pixel_n % self.width


_BACKPROJECT_CHUNK = 8192  # points per numpy step: [3, 8192] float64 temporaries stay in L1/L2


def backproject_views(depth_bhw: Any, K_b33: Any, R_b33: Any, T_b3: Any, mask_bhw: Any = None) -> ViewPoints:
    """World points of every valid pixel (depth > 0, finite, mask) of B views; numpy or torch.

    X = R^T (d K^-1 (u, v, 1) - T) with (u, v) the pixel centre; rows ordered view, row, column.
    Written per view as X = d * (a[i] + b[j]) + C with a[i] = (i + 0.5) M[:, 0],
    b[j] = (j + 0.5) M[:, 1] + M[:, 2], M = R^T K^-1 and C = -R^T T the camera centre, so a pixel
    costs two gathers from [3, W] and [3, H] tables, a multiply and an add. numpy runs views on a
    thread per core (its gathers and arithmetic release the GIL), in planar chunks that stay in
    cache; torch runs the same formula on the tensors' device.
    """
    xp = _xp(depth_bhw)
    depth = _float(depth_bhw, xp) if xp is not np else np.asarray(depth_bhw)
    if xp is np and not np.issubdtype(depth.dtype, np.floating):
        depth = depth.astype(np.float64)
    if depth.ndim != 3:
        raise InputError(f"depth_bhw must have shape [B, H, W], got {list(depth.shape)}.")
    n_views, height, width = depth.shape
    like = depth if xp is not np else None
    K = _float(K_b33, xp, like)
    R = _float(R_b33, xp, like)
    T = _float(T_b3, xp, like)
    for arr, name, tail in (
        (K, "K_b33", (n_views, 3, 3)),
        (R, "R_b33", (n_views, 3, 3)),
        (T, "T_b3", (n_views, 3)),
    ):
        if tuple(arr.shape) != tail:
            raise InputError(f"{name} must have shape {list(tail)} for {n_views} depth maps, got {list(arr.shape)}.")
    valid = xp.isfinite(depth) & (depth > 0)
    if mask_bhw is not None:
        mask = np.asarray(mask_bhw, dtype=bool) if xp is np else xp.as_tensor(mask_bhw, device=depth.device).bool()
        if tuple(mask.shape) != tuple(depth.shape):
            raise InputError(f"mask_bhw must have the depth's shape {list(depth.shape)}, got {list(mask.shape)}.")
        valid = valid & mask
    M = xp.linalg.inv(K @ R)  # [B, 3, 3] = R^T K^-1: pixel (u, v, 1) -> world ray per unit z-depth
    centers = -xp.einsum("bji,bj->bi", R, T)  # [B, 3]
    if xp is np:
        return _backproject_numpy(depth, valid, M, centers)
    return _backproject_torch(depth, valid, M, centers)


def _backproject_torch(depth_bhw: Any, valid_bhw: Any, M_b33: Any, centers_b3: Any) -> ViewPoints:
    """`backproject_views` for torch: every view in one pass (one nonzero, so one host sync), with
    the numpy path's terms in its order, so both give the same points to rounding."""
    import torch

    n_views, height, width = depth_bhw.shape
    flat = torch.nonzero(valid_bhw.reshape(-1)).squeeze(1)  # [n] index into [B * H * W], view-major
    view, pixel = torch.div(flat, height * width, rounding_mode="floor"), flat % (height * width)
    row, col = torch.div(pixel, width, rounding_mode="floor"), pixel % width
    col_centers = torch.arange(width, dtype=depth_bhw.dtype, device=depth_bhw.device) + 0.5
    row_centers = torch.arange(height, dtype=depth_bhw.dtype, device=depth_bhw.device) + 0.5
    col_term_bw3 = col_centers[None, :, None] * M_b33[:, None, :, 0]  # [B, W, 3]
    row_term_bh3 = row_centers[None, :, None] * M_b33[:, None, :, 1] + M_b33[:, None, :, 2]  # [B, H, 3]
    points_n3 = col_term_bw3.reshape(-1, 3)[view * width + col]
    points_n3 += row_term_bh3.reshape(-1, 3)[view * height + row]
    points_n3 *= depth_bhw.reshape(-1)[flat][:, None]
    points_n3 += centers_b3[view]
    return ViewPoints(points_n3, view, pixel, width)


def _backproject_numpy(depth_bhw: np.ndarray, valid_bhw: np.ndarray, M_b33: np.ndarray,
                       centers_b3: np.ndarray) -> ViewPoints:  # fmt: skip
    """`backproject_views` for numpy: preallocated outputs filled view by view on a thread pool."""
    n_views, height, width = depth_bhw.shape
    counts = valid_bhw.reshape(n_views, -1).sum(axis=1)
    starts = np.concatenate([[0], np.cumsum(counts)])
    points_n3 = np.empty((int(starts[-1]), 3), dtype=np.float64)
    pixel_n = np.empty(int(starts[-1]), dtype=np.int64)

    def one_view(b: int) -> None:
        start, stop = int(starts[b]), int(starts[b + 1])
        flat = np.flatnonzero(valid_bhw[b])
        pixel_n[start:stop] = flat
        depth_flat = depth_bhw[b].reshape(-1)
        col_term_3w = np.outer(M_b33[b, :, 0], np.arange(width) + 0.5)
        row_term_3h = np.outer(M_b33[b, :, 1], np.arange(height) + 0.5) + M_b33[b, :, 2:]
        center_31 = centers_b3[b][:, None]
        for lo in range(0, len(flat), _BACKPROJECT_CHUNK):
            chunk = flat[lo : lo + _BACKPROJECT_CHUNK]
            row, col = np.divmod(chunk, width)
            points_3n = col_term_3w.take(col, axis=1)  # planar [3, n]: contiguous gathers and arithmetic
            points_3n += row_term_3h.take(row, axis=1)
            points_3n *= depth_flat.take(chunk)
            points_3n += center_31
            points_n3[start + lo : start + lo + len(chunk)] = points_3n.T

    workers = min(n_views, _cpu_count())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one_view, range(n_views)))
    else:
        for b in range(n_views):
            one_view(b)
    return ViewPoints(points_n3, np.repeat(np.arange(n_views, dtype=np.int64), counts), pixel_n, width)


def _cpu_count() -> int:
    """CPUs this process may run on (the affinity mask under SLURM/taskset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def backproject(depth_hw: Any, K: Any, R: Any, T: Any, mask_hw: Any = None) -> Any:
    """World points [N, 3] of the valid pixels (depth > 0, finite, mask) of one view; numpy or torch."""
    xp = _xp(depth_hw)
    depth = _float(depth_hw, xp)
    if depth.ndim != 2:
        raise InputError(f"depth_hw must have shape [H, W], got {list(depth.shape)}.")
    mask = None if mask_hw is None else mask_hw[None]
    return backproject_views(
        depth[None], _float(K, xp, depth)[None], _float(R, xp, depth)[None], _float(T, xp, depth)[None], mask
    ).points_n3


def project(points_n3: Any, K: Any, R: Any, T: Any) -> tuple[Any, Any]:
    """Pixel coordinates (uv [N, 2], +0.5 centre convention) and z-depth [N] of world points.

    Inverse of `backproject`; uv is meaningless where z <= 0 (behind the camera): filter on z.
    """
    xp = _xp(points_n3)
    points = _float(points_n3, xp)
    _check_shape(points.shape, "points_n3", (3,))
    K, R, T = _float(K, xp, points), _float(R, xp, points), _float(T, xp, points)
    cam = points @ R.T + T  # one matrix product each (BLAS), not einsum's loop
    pix = cam @ K.T
    return pix[:, :2] / pix[:, 2:3], cam[:, 2]


# --- alignment ------------------------------------------------------------------------------------


def umeyama(src_n3: Any, dst_n3: Any, with_scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (scale, R [3, 3], t [3]) minimising ||dst - (s R src + t)||² (Umeyama 1991).

    R is a proper rotation (det +1) even when the best orthogonal fit is a reflection.
    """
    src, dst = _arr(src_n3, "src_n3", (3,)), _arr(dst_n3, "dst_n3", (3,))
    if src.ndim != 2 or src.shape != dst.shape:
        raise InputError(
            f"umeyama needs src and dst of equal shape [N, 3], got {list(src.shape)} and {list(dst.shape)}."
        )
    if src.shape[0] < 3:
        raise InputError(f"umeyama needs at least 3 point pairs, got {src.shape[0]}.")
    if not (np.all(np.isfinite(src)) and np.all(np.isfinite(dst))):
        raise InputError("umeyama got non-finite points; drop NaN/inf rows first.")
    mu_src, mu_dst = src.mean(0), dst.mean(0)
    src_c, dst_c = src - mu_src, dst - mu_dst
    cov = dst_c.T @ src_c / len(src)
    U, S, Vt = np.linalg.svd(cov)
    if S[1] <= 1e-9 * max(S[0], 1e-300):
        raise InputError("umeyama: points are degenerate (coincident or collinear); rotation is undetermined.")
    D = np.diag([1.0, 1.0, np.sign(np.linalg.det(U) * np.linalg.det(Vt)) or 1.0])
    R = U @ D @ Vt
    scale = float(np.trace(np.diag(S) @ D) / np.mean(np.sum(src_c**2, axis=1))) if with_scale else 1.0
    return scale, R, mu_dst - scale * R @ mu_src


class PoseAlignment(NamedTuple):
    """Estimated poses mapped into the reference world by a similarity fitted on camera centres."""

    R_n33: np.ndarray  # aligned world-to-camera rotations
    T_n3: np.ndarray  # aligned translations (reference scale)
    rotation_error_deg: np.ndarray  # [N] geodesic angle to the reference rotation
    center_error: np.ndarray  # [N] distance to the reference centre, reference units
    scale: float  # similarity X_ref = scale * R_world X_est + t_world
    R_world: np.ndarray
    t_world: np.ndarray


def similarity_align_poses(R_est: Any, T_est: Any, R_ref: Any, T_ref: Any) -> PoseAlignment:
    """Align estimated poses [N] to reference poses [N] via Umeyama on camera centres (N >= 3)."""
    R_est, T_est = _arr(R_est, "R_est", (3, 3)), _arr(T_est, "T_est", (3,))
    R_ref, T_ref = _arr(R_ref, "R_ref", (3, 3)), _arr(T_ref, "T_ref", (3,))
    if not (R_est.ndim == 3 and R_est.shape == R_ref.shape and T_est.shape == T_ref.shape == R_est.shape[:2]):
        raise InputError("similarity_align_poses needs R [N, 3, 3] and T [N, 3] for both est and ref, same N.")
    C_ref = camera_centers(R_ref, T_ref)
    scale, R_w, t_w = umeyama(camera_centers(R_est, T_est), C_ref)
    R_al = R_est @ R_w.T  # world change X_est = R_w^T (X_ref - t_w) / s, camera frame scaled by s
    T_al = scale * T_est - R_al @ t_w
    return PoseAlignment(
        R_al,
        T_al,
        rotation_angle_deg(R_al, R_ref),
        np.linalg.norm(camera_centers(R_al, T_al) - C_ref, axis=-1),
        scale,
        R_w,
        t_w,
    )


# --- nerfstudio -----------------------------------------------------------------------------------


def opencv_w2c_to_opengl_c2w(R: Any, T: Any) -> np.ndarray:
    """nerfstudio camera-to-world [..., 4, 4] (OpenGL camera: y up, z back) from OpenCV (R, T)."""
    R, T = _arr(R, "R", (3, 3)), _arr(T, "T", (3,))
    R, T = _broadcast_pose(R, T)
    c2w = np.zeros((*R.shape[:-2], 4, 4))
    c2w[..., :3, :3] = _transpose(R) @ _FLIP_YZ
    c2w[..., :3, 3] = camera_centers(R, T)
    c2w[..., 3, 3] = 1.0
    return c2w


def opengl_c2w_to_opencv_w2c(c2w: Any) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV world-to-camera (R [..., 3, 3], T [..., 3]) from nerfstudio c2w [..., 4, 4] or [..., 3, 4]."""
    c2w = _arr(c2w, "c2w")
    if c2w.ndim < 2 or c2w.shape[-2:] not in ((4, 4), (3, 4)):
        raise InputError(f"c2w must have shape [..., 4, 4] or [..., 3, 4], got {list(c2w.shape)}.")
    R = _transpose(c2w[..., :3, :3] @ _FLIP_YZ)
    return R, -np.einsum("...ij,...j->...i", R, c2w[..., :3, 3])
