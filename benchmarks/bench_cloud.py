"""Depth fusion: nvf's vectorised back-projection vs Open3D's `create_from_depth_image` per view + merge.

Same 13 ring views of a synthetic head at 512² (ground-truth z-depth, rendering not timed). nvf's
side (`cloud.fuse_views`) gives points, colours and per-point view ids; Open3D's gives points only
(one legacy PointCloud per view, merged with `+=`, pixel centres shifted to nvf's +0.5 convention),
so the comparison favours the baseline. Goal of issue 5: >= 5x faster (ratio <= 0.2). Extra
figures: peak traced memory of one fusion (tracemalloc, numpy buffers), process RSS high-water mark,
the largest point difference between the two sides, and the whole default pipeline's time. Where
CUDA is visible, a second result runs nvf's back-projection on the GPU (host arrays in and out).
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np

from benchmarks.harness import Result, Side, compare, peak_rss_mib
from stages import cloud, synth

SIZE = 512


def run() -> list[Result]:
    try:
        import open3d as o3d
    except ImportError:  # a bare GPU machine: nvf's GPU fusion against its CPU fusion only
        return _without_open3d()

    render, views = _ring()

    def open3d_fuse() -> np.ndarray:
        merged = o3d.geometry.PointCloud()
        for depth, K, R, T in zip(render.depth_nhw, render.K, render.R, render.T, strict=True):
            intrinsic = o3d.camera.PinholeCameraIntrinsic(SIZE, SIZE, K[0, 0], K[1, 1], K[0, 2] - 0.5, K[1, 2] - 0.5)
            extrinsic = np.eye(4)
            extrinsic[:3, :3], extrinsic[:3, 3] = R, T
            merged += o3d.geometry.PointCloud.create_from_depth_image(
                o3d.geometry.Image(depth), intrinsic, extrinsic, depth_scale=1.0, depth_trunc=1e9
            )
        return np.asarray(merged.points)

    def nvf_fuse() -> cloud.Points:
        return cloud.fuse_views(views)

    ours, theirs = nvf_fuse(), open3d_fuse()
    max_diff = float(np.abs(ours.points_n3 - theirs).max()) if ours.points_n3.shape == theirs.shape else float("nan")
    tracemalloc.start()
    nvf_fuse()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    start = time.perf_counter()
    fused = cloud.build_cloud(views, cloud.Config())
    pipeline_s = time.perf_counter() - start
    result = compare(
        f"cloud fusion, 13 views {SIZE}²",
        Side("nvf fuse_views (points+colours+view ids)", nvf_fuse),
        Side("open3d create_from_depth_image per view + merge", open3d_fuse),
        repeats=5,
        goal="ratio <= 0.2 (>= 5x faster)",
        extra={
            "points": len(ours),
            "max_point_diff": max_diff,
            "nvf_traced_peak_mib": traced_peak / 2**20,
            "peak_rss_mib": peak_rss_mib(),
            "default_pipeline_s": pipeline_s,
            "default_pipeline_kept": len(fused.kept),
        },
    )
    results = [result]
    import torch

    if torch.cuda.is_available():  # the same fusion with back-projection on the GPU (`--device cuda`)
        device = torch.device("cuda")

        def nvf_fuse_cuda() -> cloud.Points:
            fused = cloud.fuse_views(views, device=device)
            torch.cuda.synchronize()
            return fused

        torch.cuda.reset_peak_memory_stats()
        on_gpu = nvf_fuse_cuda()
        results.append(compare(
            f"cloud fusion on {torch.cuda.get_device_name()}, 13 views {SIZE}²",
            Side("nvf fuse_views --device cuda (host arrays in and out)", nvf_fuse_cuda),
            Side("open3d create_from_depth_image per view + merge", open3d_fuse),
            repeats=5,
            goal="ratio <= 0.2 (>= 5x faster)",
            extra={"max_point_diff_vs_cpu": float(np.abs(on_gpu.points_n3 - ours.points_n3).max()),
                   "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20},
        ))  # fmt: skip
    return results


def _ring() -> tuple[synth.CaptureRender, cloud.Views]:
    """The 13 ring views of one synthetic head at SIZE² with ground-truth z-depth and colours."""
    render = synth.render_capture(1, 1, 1, 0, synth.Config(resolution=SIZE, elevated=False, surface_points=1000))
    return render, cloud.Views(render.names, render.depth_nhw, render.K, render.R, render.T, list(render.images_nhw3))


def _without_open3d(device: str = "cuda") -> list[Result]:
    """Where open3d is missing (a bare GPU machine: its wheel is too large to carry), time nvf's
    `--device cuda` fusion against nvf's CPU fusion on the same machine. Open3D's time comes from a
    CPU machine's run of this benchmark (benchmarks/README.md relates the two)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the cloud benchmark needs open3d (pip install open3d) or a CUDA device")
    _, views = _ring()
    device = torch.device(device)

    def nvf_fuse_cuda() -> cloud.Points:
        fused = cloud.fuse_views(views, device=device)
        torch.cuda.synchronize()
        return fused

    on_cpu, on_gpu = cloud.fuse_views(views), nvf_fuse_cuda()
    torch.cuda.reset_peak_memory_stats()
    result = compare(
        f"cloud fusion on {torch.cuda.get_device_name()}, 13 views {SIZE}² (no open3d here)",
        Side("nvf fuse_views --device cuda (host arrays in and out)", nvf_fuse_cuda),
        Side("nvf fuse_views on this machine's CPU threads", lambda: cloud.fuse_views(views)),
        repeats=5,
        goal="vs Open3D: see benchmarks/README.md",
        extra={"points": len(on_gpu), "max_point_diff_vs_cpu": float(np.abs(on_gpu.points_n3 - on_cpu.points_n3).max()),
               "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20, "cpu_threads": torch.get_num_threads()},
    )  # fmt: skip
    return [result]
