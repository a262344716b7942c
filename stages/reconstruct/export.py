"""What `nvf reconstruct` brings back from a trained nerfstudio model: points in the input's world frame,
an optional Poisson mesh, and nerfstudio's image metrics on the held-out views."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import io
from stages.core.errors import StageFailure


def read_dataparser_transform(path: Path) -> tuple[np.ndarray, float]:
    """(D [4, 4], s) from nerfstudio's dataparser_transforms.json: x_ns = s (D x_world)."""
    doc = io.read_json(path)
    D = np.eye(4)
    D[:3] = np.asarray(doc["transform"], dtype=np.float64)[:3]
    return D, float(doc["scale"])


def to_world(points_n3: np.ndarray, D: np.ndarray, scale: float) -> np.ndarray:
    """Undo the dataparser: x_world = D^-1 (x_ns / s)."""
    points = np.asarray(points_n3, dtype=np.float64) / scale
    inverse = np.linalg.inv(D)
    return points @ inverse[:3, :3].T + inverse[:3, 3]


def render_points(pipeline: Any, max_points: int, seed: int, min_opacity: float = 0.5,
                  scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Points [P, 3] (dataparser frame) and colours [P, 3] in 0..1 from renders of the training views
    at `scale` x their resolution."""
    import torch

    model = pipeline.model
    if hasattr(model, "means") and hasattr(model, "opacities"):  # splatfacto: the Gaussians themselves
        keep = (torch.sigmoid(model.opacities).squeeze(-1) > min_opacity).detach().cpu().numpy()
        points = model.means.detach().cpu().numpy()[keep]
        colors = (0.5 + 0.28209479177387814 * model.features_dc.detach().cpu().numpy()[keep]).clip(0, 1)
        return points, colors
    cameras = copy.deepcopy(pipeline.datamanager.train_dataset.cameras).to(model.device)
    if scale != 1.0:
        cameras.rescale_output_resolution(scale)
    points, colors = [], []
    for i in range(len(cameras)):
        bundle = cameras.generate_rays(camera_indices=i, keep_shape=True)
        outputs = model.get_outputs_for_camera_ray_bundle(bundle)
        opaque = outputs["accumulation"][..., 0] > min_opacity
        depth = outputs.get("expected_depth", outputs["depth"])  # nerfacto's "depth" is the median
        xyz = bundle.origins + bundle.directions * depth
        inside = (xyz.abs() <= 1.0).all(dim=-1)
        keep = opaque & inside
        points.append(xyz[keep].detach().cpu().numpy())
        colors.append(outputs["rgb"][keep].detach().cpu().numpy())
    points_n3 = np.concatenate(points).astype(np.float64)
    colors_n3 = np.concatenate(colors).clip(0, 1).astype(np.float64)
    if len(points_n3) > max_points:
        pick = np.random.default_rng(seed).choice(len(points_n3), max_points, replace=False)
        points_n3, colors_n3 = points_n3[pick], colors_n3[pick]
    return points_n3, colors_n3


def clean_points(points_n3: np.ndarray, colors_n3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Open3D statistical outlier removal (20 neighbours, 2 sigma)."""
    if len(points_n3) < 30:
        return points_n3, colors_n3
    o3d = io.import_open3d()
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points_n3))
    _, kept = cloud.remove_statistical_outlier(nb_neighbors=20, std_ratio=2.0)
    kept = np.asarray(kept, dtype=np.int64)
    return points_n3[kept], colors_n3[kept]


def poisson_mesh(path: Path, points_n3: np.ndarray, colors_n3: np.ndarray, depth: int = 8) -> Path:
    """Screened Poisson surface of the points (normals estimated, oriented toward the cloud's outside)."""
    o3d = io.import_open3d()
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points_n3))
    cloud.colors = o3d.utility.Vector3dVector(colors_n3)
    extent = float(np.linalg.norm(points_n3.max(0) - points_n3.min(0)))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=0.05 * extent, max_nn=30))
    normals = np.asarray(cloud.normals)
    outward = np.sign(np.sum(normals * (points_n3 - points_n3.mean(0)), axis=1, keepdims=True))
    cloud.normals = o3d.utility.Vector3dVector(normals * np.where(outward == 0, 1, outward))
    mesh, density = o3d.geometry.TriangleMesh.create_from_point_cloud_poisson(cloud, depth=depth)
    density = np.asarray(density)
    mesh.remove_vertices_by_mask(density < np.quantile(density, 0.05))
    with io.atomic_path(path) as tmp:
        if not o3d.io.write_triangle_mesh(str(tmp), mesh):
            raise StageFailure(f"Open3D could not write {path}")
    return path


def evaluate_views(pipeline: Any, lpips: bool = True) -> dict[str, dict[str, float]]:
    """nerfstudio's image metrics (psnr, ssim, and lpips unless `lpips` is False) per held-out view, by file name."""
    import torch

    model = pipeline.model
    names = [Path(p).name for p in pipeline.datamanager.eval_dataset.image_filenames]
    per_view: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for camera, batch in pipeline.datamanager.fixed_indices_eval_dataloader:
            outputs = model.get_outputs_for_camera(camera)
            metrics, _ = model.get_image_metrics_and_images(outputs, batch)
            per_view[names[int(batch["image_idx"])]] = {k: float(v) for k, v in metrics.items()
                                                        if lpips or k != "lpips"}  # fmt: skip
    return per_view
