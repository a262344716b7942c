"""Geometry of a capture for the triplet index: the pose scale, the capture frame (up axis, look-at
centre, azimuth and elevation), view order, the pairs drawn inside a capture and their pose codes
(the paper's 12-D code, Zero-1-to-3's 4 numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.core import geometry
from stages.triplets.config import PairSpec


def pose_scale(R_n33: np.ndarray, T_n3: np.ndarray) -> float:
    """1 / mean distance of the camera centres from their centroid (1.0 when all centres coincide)."""
    centers = geometry.camera_centers(R_n33, T_n3)  # [N, 3]
    radius = float(np.linalg.norm(centers - centers.mean(axis=0), axis=-1).mean())
    return 1.0 / radius if radius > 1e-12 else 1.0


@dataclass(frozen=True)
class CaptureFrame:
    """A capture's rig frame estimated from its poses (world units of the poses record).

    up: unit [3], the direction most orthogonal to the cameras' x axes (see `_up_axis`); center: [3]
    the point nearest to every optical axis (least squares; the centroid of the centres when the axes are parallel);
    azimuth_deg / elevation_deg [N]: of (C_i - center) about `up`, azimuth zero at the mean
    viewing direction (the first camera's for a full orbit) and positive toward the cameras' right.
    """

    up: np.ndarray
    center: np.ndarray
    azimuth_deg: np.ndarray
    elevation_deg: np.ndarray


def capture_frame(R_n33: np.ndarray, T_n3: np.ndarray) -> CaptureFrame:
    """Estimate up, look-at centre and per-view azimuth/elevation from world-to-camera poses."""
    R = np.asarray(R_n33, dtype=np.float64)
    centers = geometry.camera_centers(R, T_n3)  # [N, 3]
    up = _up_axis(R)
    axes = R[:, 2, :]  # [N, 3] viewing directions
    projectors = np.eye(3) - axes[:, :, None] * axes[:, None, :]  # [N, 3, 3]
    A, b = projectors.sum(axis=0), np.einsum("nij,nj->i", projectors, centers)
    center = np.linalg.solve(A, b) if np.linalg.cond(A) < 1e8 else centers.mean(axis=0)
    offsets = centers - center
    along = offsets @ up
    flat = offsets - along[:, None] * up
    flat_norm = np.linalg.norm(flat, axis=-1)
    directions = flat / np.maximum(flat_norm, 1e-12)[:, None]
    mean_dir = directions.sum(axis=0)
    if np.linalg.norm(mean_dir) < 1e-6 * len(directions):  # a full orbit: start at the first view
        mean_dir = directions[0]
    mean_dir = mean_dir / max(np.linalg.norm(mean_dir), 1e-12)
    right = np.cross(up, mean_dir)  # the x axis of an upright camera looking from mean_dir
    azimuth = np.degrees(np.arctan2(flat @ right, flat @ mean_dir))
    elevation = np.degrees(np.arctan2(along, flat_norm))
    return CaptureFrame(up, center, azimuth, elevation)


def _up_axis(R_n33: np.ndarray) -> np.ndarray:
    """The world's up axis seen by upright cameras: the direction most orthogonal to every camera's
    x axis (an upright camera's x is horizontal whatever its elevation), signed against the mean
    image-down axis; the mean image-up axis itself when the x axes do not span a plane."""
    down = R_n33[:, 1, :].mean(axis=0)
    x_axes = R_n33[:, 0, :]  # [N, 3]
    eigenvalues, eigenvectors = np.linalg.eigh(x_axes.T @ x_axes)
    if eigenvalues[1] > 1e-3 * len(x_axes):
        up = eigenvectors[:, 0]
        return up if up @ down <= 0 else -up
    return -down / max(np.linalg.norm(down), 1e-12)


def view_order(azimuth_deg: np.ndarray, elevation_deg: np.ndarray) -> np.ndarray:
    """Rank [N] of each view when sorted by azimuth (-90 -> +90), then elevation, then row."""
    keys = np.lexsort((np.arange(len(azimuth_deg)), elevation_deg, azimuth_deg))
    rank = np.empty(len(keys), dtype=np.int32)
    rank[keys] = np.arange(len(keys), dtype=np.int32)
    return rank


def capture_pairs(
    azimuth_deg: np.ndarray,
    elevation_deg: np.ndarray,
    is_source: np.ndarray,
    spec: PairSpec,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) local view indices [P] of one capture, sources in azimuth order.

    Every view is a possible target; `is_source` [N] marks the views that may be sources. Targets of
    a source: `all` every other view; `adjacent` its neighbours in the azimuth order; `nearest` the
    k views nearest in (azimuth, elevation) degrees; `random` k distinct others drawn with `rng`.
    Targets of one source come in azimuth order.
    """
    n = len(azimuth_deg)
    rank = view_order(azimuth_deg, elevation_deg)
    by_rank = np.argsort(rank)
    sources_out: list[int] = []
    targets_out: list[int] = []
    for s in by_rank:
        if not is_source[s]:
            continue
        others = by_rank[by_rank != s]
        if spec.mode == "all":
            chosen = others
        elif spec.mode == "adjacent":
            chosen = by_rank[[r for r in (rank[s] - 1, rank[s] + 1) if 0 <= r < n]]
        elif spec.mode == "nearest":
            distance = np.hypot(azimuth_deg[others] - azimuth_deg[s], elevation_deg[others] - elevation_deg[s])
            nearest = others[np.lexsort((rank[others], distance))[: spec.k]]
            chosen = nearest[np.argsort(rank[nearest])]
        elif spec.mode == "random":
            if rng is None:
                raise ValueError("random pairs need a generator")
            picked = rng.choice(others, size=min(spec.k, len(others)), replace=False) if len(others) else others
            chosen = picked[np.argsort(rank[picked])]
        else:
            raise ValueError(f"unknown pair mode {spec.mode!r}")
        sources_out.extend([int(s)] * len(chosen))
        targets_out.extend(int(t) for t in chosen)
    return np.asarray(sources_out, dtype=np.int64), np.asarray(targets_out, dtype=np.int64)


def pair_codes(
    R_n33: np.ndarray, T_n3: np.ndarray, scale: float, source_p: np.ndarray, target_p: np.ndarray
) -> np.ndarray:
    """The paper's 12-D codes [P, 12] of pairs of rows, translations multiplied by `scale` first."""
    R, T = np.asarray(R_n33, np.float64), np.asarray(T_n3, np.float64) * scale
    R_rel, T_rel = geometry.relative_pose(R[source_p], T[source_p], R[target_p], T[target_p])
    return geometry.pose_code12(R_rel, T_rel).reshape(-1, 12)


def decode_code12(code_p12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R_rel [..., 3, 3], T_rel [..., 3]) back from 12-D codes [..., 12] (inverse of `pose_code12`)."""
    rt = np.asarray(code_p12, dtype=np.float64).reshape(*np.shape(code_p12)[:-1], 3, 4)
    return rt[..., :3], rt[..., 3]


def pair_zero123_codes(
    R_n33: np.ndarray, T_n3: np.ndarray, scale: float, frame: CaptureFrame, source_p: np.ndarray, target_p: np.ndarray
) -> np.ndarray:
    """Zero-1-to-3 codes [P, 4] of pairs of rows, about the capture's up axis and look-at centre, in
    the scaled world (so Δradius is in units of the mean distance of the camera centres from their
    centroid)."""
    R, T = np.asarray(R_n33, np.float64), np.asarray(T_n3, np.float64) * scale
    code = geometry.zero123_pose_code(
        R[source_p], T[source_p], R[target_p], T[target_p], up=frame.up, center=frame.center * scale
    )
    return code.reshape(-1, 4)
