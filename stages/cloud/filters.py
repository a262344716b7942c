"""Point filters: statistical outliers, voxel downsampling, Poisson-disk thinning, oriented normals."""

from __future__ import annotations

import logging

import numpy as np

from stages.cloud.views import Points, Views
from stages.core import io, metrics
from stages.core.errors import InputError

log = logging.getLogger("nvf")


def statistical_outliers(points_n3: np.ndarray, neighbors: int, std_ratio: float) -> np.ndarray:
    """Indices of the inliers of Open3D's statistical outlier removal (sorted)."""
    o3d = io.import_open3d()
    if len(points_n3) <= neighbors:
        log.warning("cloud: %d points, too few for outlier removal with %d neighbours; skipped",
                    len(points_n3), neighbors)  # fmt: skip
        return np.arange(len(points_n3))
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points_n3))
    _, index = pcd.remove_statistical_outlier(nb_neighbors=int(neighbors), std_ratio=float(std_ratio))
    return np.sort(np.asarray(index, dtype=np.int64))


def voxel_downsample(cloud: Points, voxel: float) -> Points:
    """One point per occupied voxel: the mean position and colour of its points, the first one's view.

    The grid is Open3D's (`voxel_down_sample`): origin at the cloud's minimum corner minus half a
    voxel, voxel index floor((p - origin) / voxel); output in the order of the voxels' keys.
    """
    if not voxel > 0:
        raise InputError(f"voxel size must be positive, got {voxel}")
    points = cloud.points_n3
    origin = points.min(axis=0) - voxel / 2
    cells = np.floor((points - origin) / voxel).astype(np.int64)  # [N, 3]
    dims = cells.max(axis=0) + 1
    if float(dims[0]) * float(dims[1]) * float(dims[2]) < 2**62:
        key = (cells[:, 0] * dims[1] + cells[:, 1]) * dims[2] + cells[:, 2]
        _, first, inverse, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    else:  # astronomically many voxels: unique rows instead of packed keys
        _, first, inverse, counts = np.unique(cells, axis=0, return_index=True, return_inverse=True,
                                              return_counts=True)  # fmt: skip
    inverse = inverse.reshape(-1)
    n_voxels = len(counts)

    def mean(values_nk: np.ndarray) -> np.ndarray:
        sums = [np.bincount(inverse, weights=values_nk[:, k], minlength=n_voxels) for k in range(values_nk.shape[1])]
        return np.stack(sums, axis=1) / counts[:, None]

    colors = None
    if cloud.colors_n3 is not None:
        colors = np.clip(np.round(mean(cloud.colors_n3.astype(np.float64))), 0, 255).astype(np.uint8)
    return Points(mean(points), colors, cloud.view_n[first])


def poisson_disk_thin(points_n3: np.ndarray, radius: float, seed: int = 0) -> np.ndarray:
    """Boolean keep mask [N] of a Poisson-disk subset: no two kept points within `radius`.

    Algorithm (density-uniformity optimisation): build the graph joining every pair of points
    closer than `radius` (`cKDTree.query_pairs`) and keep a maximal independent set of it, found by
    Luby's parallel rounds: every point draws a random priority (seeded); in each round, every
    undecided point whose priority beats all its undecided neighbours is kept and its neighbours
    are dropped, until no point is undecided (O(log N) rounds, each vectorised over the edges).
    Points with no neighbour within `radius` (sparse regions) are all kept, so only over-dense
    regions are thinned: afterwards every spacing is > `radius`, and every dropped point lies
    within `radius` of a kept one, so thinned regions end up with spacings in (radius, 2 radius].
    """
    n = len(points_n3)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    pairs = metrics.kdtree(points_n3).query_pairs(float(radius), output_type="ndarray")  # [E, 2]
    if not len(pairs):
        return keep
    priority = np.random.default_rng(seed).permutation(n)
    state = np.zeros(n, dtype=np.int8)  # 0 undecided, 1 kept, -1 dropped
    a, b = pairs[:, 0], pairs[:, 1]
    while True:
        live = (state[a] == 0) & (state[b] == 0)
        a, b = a[live], b[live]
        best = np.full(n, -1, dtype=np.int64)  # highest priority among undecided neighbours
        np.maximum.at(best, a, priority[b])
        np.maximum.at(best, b, priority[a])
        chosen = (state == 0) & (priority > best)
        state[chosen] = 1
        neighbours = np.concatenate([b[chosen[a]], a[chosen[b]]])
        state[neighbours] = -1
        if not len(a) or not (state == 0).any():
            break
    return state >= 0  # undecided points left have no undecided neighbour: keep them


def oriented_normals(cloud: Points, views: Views, neighbors: int) -> np.ndarray:
    """Unit normals [N, 3] (Open3D PCA over `neighbors` points), each facing its view's camera."""
    o3d = io.import_open3d()
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(cloud.points_n3))
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=max(3, int(neighbors))))
    normals = np.asarray(pcd.normals).copy()
    to_camera = views.centers_v3[cloud.view_n] - cloud.points_n3
    flip = np.einsum("ij,ij->i", normals, to_camera) < 0
    normals[flip] *= -1.0
    return normals
