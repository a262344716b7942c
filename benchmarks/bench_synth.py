"""Synthetic capture rendering: nvf's analytic ray caster vs Open3D's RaycastingScene (Embree) on a mesh.

Same 13 ring cameras at 256², same head. The baseline casts the same rays against a triangle mesh of
the head (a 512 x 256 latitude-longitude grid of the exact radius function; building the mesh and
the BVH is not timed), so it is fast but approximate: the depth error of the mesh against nvf's exact
analytic depth is reported next to the ratio. Goal of the foundation issue: a 13-view 256² capture
(depth, normals, texture, shading) in well under 5 s on 2 CPU cores.
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.harness import Result, Side, compare
from stages import synth
from stages.core import batching

SIZE = 256


def head_mesh(shape: synth.HeadShape, n_lat: int = 256, n_lon: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Vertices [V,3] and triangles [F,3] of the star-shaped head on a latitude-longitude grid."""
    theta = np.linspace(0.0, np.pi, n_lat)
    phi = np.linspace(0.0, 2 * np.pi, n_lon, endpoint=False)
    tt, pp = np.meshgrid(theta, phi, indexing="ij")
    dirs = np.stack([np.sin(tt) * np.cos(pp), np.cos(tt), np.sin(tt) * np.sin(pp)], -1).reshape(-1, 3)
    vertices = dirs * shape.radius(dirs)[:, None]
    i, j = np.meshgrid(np.arange(n_lat - 1), np.arange(n_lon), indexing="ij")
    a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
    c, d = a + n_lon, b + n_lon
    faces = np.concatenate([np.stack([a, c, b], -1), np.stack([b, c, d], -1)]).reshape(-1, 3)
    return vertices, faces.astype(np.int32)


def run() -> list[Result]:
    import open3d as o3d

    cfg = synth.Config(resolution=SIZE, elevated=False)
    shape = synth.head_shape(1, "neutral", cfg.seed)
    R, T = synth.rig_poses(cfg, synth.camera_ids(cfg))
    K = synth.intrinsics(cfg)
    origins, dirs = synth.view_rays(R, T, K, SIZE)  # dirs have camera z = 1: the ray parameter t is z-depth
    vertices, faces = head_mesh(shape)
    scene = o3d.t.geometry.RaycastingScene()
    mesh = o3d.t.geometry.TriangleMesh(o3d.core.Tensor(vertices.astype(np.float32)), o3d.core.Tensor(faces))
    scene.add_triangles(mesh)
    rays = o3d.core.Tensor(np.concatenate([origins.reshape(-1, 3), dirs.reshape(-1, 3)], -1).astype(np.float32))

    def open3d_depth() -> np.ndarray:
        return scene.cast_rays(rays)["t_hit"].numpy()

    def nvf_depth() -> np.ndarray:
        with batching.one_blas_thread():  # as render_capture runs
            return synth.trace_depth(shape, R, T, K, SIZE)

    exact = nvf_depth().reshape(-1)  # Open3D t_hit is the same ray parameter, so also z-depth
    approx = open3d_depth()
    both = np.isfinite(exact) & (exact > 0) & np.isfinite(approx)
    depth_error = float(np.median(np.abs(exact[both] - approx[both])))
    start = time.perf_counter()
    synth.render_capture(1, 1, 1, 0, cfg)
    full_render_s = time.perf_counter() - start
    return [
        compare(
            "synth ray casting, 13 views 256²",
            Side("nvf analytic trace_depth", nvf_depth),
            Side("Open3D RaycastingScene on a 131k-triangle mesh", open3d_depth),
            repeats=3,
            goal="full render well under 5 s",
            extra={
                "full_render_capture_s": full_render_s,
                "median_abs_t_difference": depth_error,
                "hit_agreement": float(np.mean(np.isfinite(exact) == np.isfinite(approx))),
            },  # fmt: skip
        )
    ]
