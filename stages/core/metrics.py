"""Point-cloud metrics shared by stages: nearest-neighbour spacing, uniformity, Chamfer, F-score.

Every distance is Euclidean (not squared) in the clouds' own units (for nvf clouds: the poses'
scene units). Nearest neighbours come from `scipy.spatial.cKDTree`, queried for all points at once.

Definitions (N points p_i; d_i = distance from p_i to its nearest *other* point):

- spacing: mean, median, 5th / 95th percentile (numpy's linear interpolation) of d_i;
- uniformity coefficient (coefficient of variation of the spacing): U = std(d) / mean(d), population
  std (ddof 0); 0 for a perfectly even cloud. The paper's "uniformity" and "density uniformity
  coefficient" (Table V) are this number.
- local density variation: with s_i = the mean of d_j over the k nearest points j of p_i (p_i
  included), the spacing smoothed over a neighbourhood, LDV = std(s) / mean(s). Smoothing removes
  point-to-point jitter (what U measures) and keeps the variation from region to region.
- Chamfer distance (symmetric, not squared): CD = mean_p min_q |p - q| + mean_q min_p |q - p| for
  p in the prediction, q in the reference; the two terms are reported as `accuracy` and
  `completeness`.
- F-score at threshold t: precision P = fraction of prediction points within t of the reference,
  recall R = fraction of reference points within t of the prediction, F = 2PR / (P + R) (0 if both 0).
- Component scores out of 25 (Table V): coverage 25 c for a covered fraction c, confidence 25 f for
  a confirmed fraction f, density 25 / (1 + U) (0.500 -> 16.7, the paper's pair of values).

>>> grid = np.stack(np.meshgrid(*[np.arange(3.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
>>> s = spacing_stats(grid)
>>> float(s.mean), float(s.uniformity)
(1.0, 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.core.errors import InputError

SCORE_MAX = 25.0


def _points(points_n3: Any, name: str, min_points: int = 1) -> np.ndarray:
    points = np.asarray(points_n3, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise InputError(f"{name} must have shape [N, 3], got {list(points.shape)}")
    if len(points) < min_points:
        raise InputError(f"{name} needs at least {min_points} point(s), got {len(points)}")
    if not np.all(np.isfinite(points)):
        raise InputError(f"{name} holds non-finite coordinates; drop NaN/inf rows first")
    return points


def kdtree(points_n3: Any):
    """A `scipy.spatial.cKDTree` over the points (balanced, compact)."""
    from scipy.spatial import cKDTree

    return cKDTree(_points(points_n3, "points_n3"))


def knn(points_n3: Any, k: int, tree: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Distances [N, k] and indices [N, k] of each point's k nearest *other* points, nearest first.

    The point itself is dropped (the query asks for k + 1); a duplicate point counts as a
    neighbour at distance 0. With fewer than k + 1 points, missing neighbours get distance inf.
    """
    points = _points(points_n3, "points_n3", 2)
    tree = kdtree(points) if tree is None else tree
    dist, idx = tree.query(points, k=k + 1, workers=-1)
    dist, idx = dist.reshape(len(points), k + 1), idx.reshape(len(points), k + 1)
    return dist[:, 1:], idx[:, 1:]


def nn_distances(points_n3: Any, tree: Any = None) -> np.ndarray:
    """d_i [N]: distance from each point to its nearest other point."""
    return knn(points_n3, 1, tree)[0][:, 0]


def nearest_distances(src_n3: Any, dst_n3: Any, tree: Any = None) -> np.ndarray:
    """[N_src]: distance from each source point to the nearest destination point."""
    src = _points(src_n3, "src_n3")
    tree = kdtree(dst_n3) if tree is None else tree
    return tree.query(src, k=1, workers=-1)[0]


@dataclass(frozen=True)
class SpacingStats:
    """Nearest-neighbour spacing of a cloud (cloud units) and its uniformity coefficient."""

    mean: float
    median: float
    p5: float
    p95: float
    std: float
    uniformity: float  # std / mean: the coefficient of variation (lower = more even)


def spacing_stats(points_n3: Any = None, *, nn_d: np.ndarray | None = None) -> SpacingStats:
    """Spacing statistics of a cloud, from its points or from precomputed NN distances `nn_d`."""
    d = nn_distances(points_n3) if nn_d is None else np.asarray(nn_d, dtype=np.float64)
    if len(d) == 0:
        raise InputError("spacing statistics need at least 2 points")
    mean, std = float(d.mean()), float(d.std())
    p5, median, p95 = (float(v) for v in np.percentile(d, [5, 50, 95]))
    return SpacingStats(mean, median, p5, p95, std, std / mean if mean > 0 else float("inf"))


def uniformity_coefficient(nn_d: Any) -> float:
    """U = std(d) / mean(d) of nearest-neighbour distances (population std)."""
    d = np.asarray(nn_d, dtype=np.float64)
    mean = float(d.mean())
    return float(d.std()) / mean if mean > 0 else float("inf")


def local_density_variation(points_n3: Any, k: int = 16, *, tree: Any = None, nn_d: np.ndarray | None = None) -> float:
    """LDV = std(s) / mean(s), s_i = mean of the NN distances d_j over the k nearest points of p_i (p_i included)."""
    points = _points(points_n3, "points_n3", 2)
    tree = kdtree(points) if tree is None else tree
    d = nn_distances(points, tree) if nn_d is None else np.asarray(nn_d, dtype=np.float64)
    k = max(1, min(int(k), len(points)))
    _, idx = tree.query(points, k=k, workers=-1)  # p_i itself first (distance 0)
    smoothed = d[np.asarray(idx).reshape(len(points), k)].mean(axis=1)
    return uniformity_coefficient(smoothed)


def bbox_diagonal(points_n3: Any) -> float:
    """Length of the diagonal of the axis-aligned bounding box (cloud units)."""
    points = _points(points_n3, "points_n3")
    return float(np.linalg.norm(points.max(axis=0) - points.min(axis=0)))


@dataclass(frozen=True)
class Chamfer:
    """Symmetric Chamfer distance, not squared, in cloud units: chamfer = accuracy + completeness."""

    accuracy: float  # mean over prediction points of the distance to the reference
    completeness: float  # mean over reference points of the distance to the prediction
    chamfer: float


def chamfer_distance(pred_n3: Any, ref_n3: Any) -> Chamfer:
    """mean_p min_q |p - q| + mean_q min_p |q - p| (Euclidean, not squared)."""
    acc = float(nearest_distances(pred_n3, ref_n3).mean())
    comp = float(nearest_distances(ref_n3, pred_n3).mean())
    return Chamfer(acc, comp, acc + comp)


@dataclass(frozen=True)
class FScore:
    """Precision, recall and F-score at `threshold` (cloud units)."""

    threshold: float
    precision: float
    recall: float
    fscore: float


def fscore(pred_n3: Any, ref_n3: Any, threshold: float) -> FScore:
    """P = share of prediction points within t of the reference, R = the converse, F = 2PR / (P + R)."""
    if not threshold > 0:
        raise InputError(f"the F-score threshold must be positive, got {threshold}")
    precision = float(np.mean(nearest_distances(pred_n3, ref_n3) <= threshold))
    recall = float(np.mean(nearest_distances(ref_n3, pred_n3) <= threshold))
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return FScore(float(threshold), precision, recall, f)


def fraction_score(fraction: float) -> float:
    """Coverage and confidence scores: 25 x the fraction (0..1)."""
    return SCORE_MAX * float(np.clip(fraction, 0.0, 1.0))


def density_score(uniformity: float) -> float:
    """Density score: 25 / (1 + U) for the uniformity coefficient U (U = 0.5 -> 16.67)."""
    return SCORE_MAX / (1.0 + max(float(uniformity), 0.0))
