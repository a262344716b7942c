"""Exhaustive SIFT matching with two-view verification, written into a COLMAP database.

What ``pycolmap.match_exhaustive`` does on a CPU, faster for captures of up to a few thousand
features per image: nearest neighbours come from one BLAS product per pair, and each pair is
matched and verified (``pycolmap.estimate_two_view_geometry``, which releases the GIL) as one task
on a thread pool, with no controller thread polling every 50 ms. Measured on a 13-view ring of ~600
features per image: 0.36 s -> 0.27 s for matching and verification (1.42 s -> 1.31 s for all of
`nvf poses`); on kermit's 2,300 features per photo, 0.94 s -> 0.88 s.

The criterion is COLMAP's CPU matcher's: squared L2 distances between the uint8 descriptors (norm
~512); a match is a mutual nearest neighbour within 512 x ``max_distance`` and nearer than
``max_ratio`` x its second nearest, in both directions. COLMAP finds those neighbours in a FAISS
index per image, exact (flat) below 512 features, where the database written here is the same bit
for bit, and approximate (IVF, 4 of 4·sqrt(n) lists probed) above, where this matcher stays exact.

The database then holds what pycolmap's matcher writes: every pair's matches (empty below
``min_num_inliers``) and its two-view geometry (an empty DEGENERATE one when not verified).
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import batching

SQ_DESCRIPTOR_NORM = np.float32(512 * 512)
"""COLMAP stores a SIFT descriptor as round(512 x unit vector) in uint8: its squared norm is ~512²."""

MAX_MEAN_FEATURES = 2500
"""Most features per image, on average over the capture, for this matcher. Its cost grows with the
product of two images' feature counts, that of pycolmap's approximate index more slowly: measured
on kermit's 11 photos, 0.88 s vs 0.94 s at 2,300 features per photo, 1.9 s vs 1.4 s at 3,200."""


def mutual_matches(desc1_nd: np.ndarray, desc2_md: np.ndarray, max_ratio: float, max_distance: float) -> np.ndarray:
    """Cross-checked ratio-test matches of two images' SIFT descriptors: [k, 2] uint32 row indices.

    ``desc*`` are float32 copies of COLMAP's uint8 descriptors; squared L2 distances between them
    are integers below 2^24, so exact in float32. As in COLMAP's CPU matcher: nearest and second
    nearest neighbour by L2 distance (ties to the lower index), a match when the nearest is within
    512 x ``max_distance`` and nearer than ``max_ratio`` x the second nearest, in both directions.
    One product and four passes over it, all along contiguous rows or as whole-row reductions.
    """
    n1, n2 = len(desc1_nd), len(desc2_md)
    if n1 == 0 or n2 == 0:
        return np.empty((0, 2), np.uint32)
    dist_nm = desc1_nd @ desc2_md.T  # [n1, n2] dot products, then squared distances in place
    dist_nm *= -2.0
    dist_nm += np.einsum("nd,nd->n", desc1_nd, desc1_nd)[:, None]
    dist_nm += np.einsum("md,md->m", desc2_md, desc2_md)[None, :]
    rows = np.arange(n1)
    best_col = dist_nm.argmin(axis=1)  # [n1] first nearest in image 2 of each feature of image 1
    row_best = dist_nm[rows, best_col]
    row_second = _min_without(dist_nm, rows, best_col, axis=1)  # [n1]
    col_best = dist_nm.min(axis=0)  # [n2]
    # mutual candidates: a row's nearest column has that row's distance as its own minimum
    cand = np.flatnonzero(row_best == col_best[best_col])
    cols = best_col[cand]
    col_second = _min_without(dist_nm, cand, cols, axis=0)[cols]  # [k]
    # a column's minimum shared by another row (rare): only the first such row is its nearest,
    # and the column's second nearest is then as near as its nearest
    for t in np.flatnonzero((col_second == row_best[cand]) | _repeated(cols)):
        first_row = np.flatnonzero(dist_nm[:, cols[t]] == row_best[cand[t]])[0]
        col_second[t] = row_best[cand[t]]
        if first_row != cand[t]:
            cand[t] = -1
    mutual = cand >= 0
    cand, cols, col_second = cand[mutual], cols[mutual], col_second[mutual]
    best, second = row_best[cand], np.minimum(row_second[cand], col_second)
    keep = (best <= SQ_DESCRIPTOR_NORM * max_distance**2) & (np.sqrt(best) < max_ratio * np.sqrt(second))
    return np.stack([cand[keep], cols[keep]], axis=1).astype(np.uint32)


def _min_without(dist_nm: np.ndarray, rows: np.ndarray, cols: np.ndarray, axis: int) -> np.ndarray:
    """``dist_nm.min(axis)`` with the entries (rows[i], cols[i]) left out (+inf when nothing is
    left); ``dist_nm`` is restored after."""
    saved = dist_nm[rows, cols]
    dist_nm[rows, cols] = np.inf
    found = dist_nm.min(axis=axis)
    dist_nm[rows, cols] = saved
    return found


def _repeated(values: np.ndarray) -> np.ndarray:
    """Whether each value occurs more than once in ``values``."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return counts[inverse] > 1


def unsupported_reason(matching_options: Any, feature_counts: list[int]) -> str | None:
    """Why this matcher cannot stand in for pycolmap's with these options (None: it can)."""
    sift = matching_options.sift
    kind = getattr(matching_options, "type", None)
    if kind is not None and getattr(kind, "name", "SIFT_BRUTEFORCE") != "SIFT_BRUTEFORCE":
        return f"matcher type {kind.name}"
    import pycolmap

    if getattr(matching_options, "use_gpu", False) or getattr(pycolmap, "has_cuda", False):
        return "GPU matching"
    if getattr(sift, "cpu_brute_force_matcher", False):
        return "COLMAP's brute-force (angle) criterion asked for"
    if not sift.cross_check:
        return "cross_check off"
    if matching_options.guided_matching:
        return "guided matching"
    if getattr(matching_options, "skip_geometric_verification", False):
        return "verification skipped"
    if getattr(matching_options, "rig_verification", False):
        return "rig verification"
    if max(feature_counts, default=0) > matching_options.max_num_matches:
        return "more features in an image than max_num_matches"
    if np.mean(feature_counts or [0]) > MAX_MEAN_FEATURES:
        return f"more than {MAX_MEAN_FEATURES} features per image"
    return None


def match_exhaustive(database: Path, matching_options: Any, verification_options: Any, cancel: Any = None) -> int:
    """Match and verify every pair of images in ``database`` (features already extracted), in
    place of ``pycolmap.match_exhaustive``. Returns the number of verified pairs. A cancelled
    ``cancel`` (pycolmap CancellationToken) raises InterruptedError before the next pair."""
    import pycolmap

    with pycolmap.Database.open(database) as db:
        images = sorted(db.read_all_images(), key=lambda image: image.image_id)
        cameras = {camera.camera_id: camera for camera in db.read_all_cameras()}
        descriptors = [np.asarray(db.read_descriptors(im.image_id).data, dtype=np.float32) for im in images]
        points = [np.asarray(db.read_keypoints(im.image_id), dtype=np.float64)[:, :2] for im in images]
    sift, min_inliers = matching_options.sift, verification_options.min_num_inliers

    def match_pair(pair: tuple[int, int]) -> tuple[np.ndarray, Any]:
        if cancel is not None and cancel.is_cancelled:  # a property in pycolmap 4.2
            raise InterruptedError("matching cancelled")
        a, b = pair
        matches = mutual_matches(descriptors[a], descriptors[b], sift.max_ratio, sift.max_distance)
        if len(matches) < min_inliers:
            return np.empty((0, 2), np.uint32), None
        geometry = pycolmap.estimate_two_view_geometry(
            cameras[images[a].camera_id], points[a], cameras[images[b].camera_id], points[b], matches,
            verification_options,
        )  # fmt: skip
        return matches, geometry if len(geometry.inlier_matches) >= min_inliers else None

    pairs = list(itertools.combinations(range(len(images)), 2))
    threads = matching_options.num_threads if matching_options.num_threads > 0 else os.cpu_count() or 1
    with batching.one_blas_thread(), ThreadPoolExecutor(max(1, min(threads, len(pairs))), "nvf-match") as pool:
        results = list(pool.map(match_pair, pairs))
    verified = 0
    with pycolmap.Database.open(database) as db:
        for (a, b), (matches, geometry) in zip(pairs, results):
            id1, id2 = images[a].image_id, images[b].image_id
            db.write_matches(id1, id2, matches)
            if geometry is None:
                geometry = pycolmap.TwoViewGeometry()
                geometry.config = pycolmap.TwoViewGeometryConfiguration.DEGENERATE
            else:
                verified += 1
            db.write_two_view_geometry(id1, id2, geometry)
    return verified
