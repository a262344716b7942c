"""Rendering one capture in memory (`render_capture`) and its dense ground-truth surface (`surface_cloud`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stages.core import batching, dataset
from stages.core.errors import InputError
from stages.synth.config import Config, validate
from stages.synth.head import _fibonacci_dirs, _unit_rows, head_shape
from stages.synth.raycast import trace_depth, view_rays
from stages.synth.rig import camera_ids, intrinsics, light_for_shot, rig_poses


@dataclass(frozen=True)
class CaptureRender:
    """One rendered capture in memory; rows ordered as `camera_ids` (ring by azimuth, then elevated)."""

    capture: str  # capture id, e.g. "001_01_01_00"
    expression: str
    images_nhw3: np.ndarray  # uint8 RGB
    depth_nhw: np.ndarray  # float32 z-depth, 0 = background
    normals_nhw3: np.ndarray  # float32 world-frame unit normals, 0 = background
    R: np.ndarray  # [N, 3, 3] float64 world-to-camera
    T: np.ndarray  # [N, 3] float64
    K: np.ndarray  # [N, 3, 3] float64
    camera_ids: list[str]
    names: list[str]  # image file names, e.g. 001_01_01_051_00.png
    light: dict[str, object] = field(default_factory=dict)  # direction (toward the light), intensity

    @property
    def mask_nhw(self) -> np.ndarray:
        """Where a pixel sees the head (bool)."""
        return self.depth_nhw > 0


def render_capture(subject: int, session: int, recording: int, shot: int, cfg: Config) -> CaptureRender:
    """Render one capture (all cameras of `cfg`) in memory, with its ground truth."""
    with batching.one_blas_thread():
        return _render_capture(subject, session, recording, shot, cfg)


def _render_capture(subject: int, session: int, recording: int, shot: int, cfg: Config) -> CaptureRender:
    validate(cfg)
    expressions = dataset.SESSION_EXPRESSIONS.get(f"{session:02d}")
    if expressions is None or not 1 <= recording <= len(expressions) or subject < 1 or not 0 <= shot < dataset.N_SHOTS:
        raise InputError(
            f"no synthetic capture subject {subject}, session {session}, recording {recording}, shot {shot}: subjects "
            f"start at 1, sessions are {', '.join(dataset.SESSION_EXPRESSIONS)}, session {session} has recordings "
            f"1..{len(expressions or ())}, shots are 0..{dataset.N_SHOTS - 1}"
        )
    expression = expressions[recording - 1]
    shape = head_shape(subject, expression, cfg.seed)
    cameras = camera_ids(cfg)
    R, T = rig_poses(cfg, cameras)
    K = intrinsics(cfg)
    size = cfg.resolution
    n_views = len(cameras)
    depth = trace_depth(shape, R, T, K, size).reshape(-1)  # [V*P]
    origins, dirs = view_rays(R, T, K, size)
    hit = np.flatnonzero(np.isfinite(depth))
    points = origins.reshape(-1, 3)[hit] + depth[hit, None] * dirs.reshape(-1, 3)[hit]
    normals = shape.normals(points)
    surface_dirs = _unit_rows(points)
    n_pixels = size * size

    light_dir, intensity = light_for_shot(shot, cfg)
    shading = intensity * (cfg.ambient + 0.6 * np.clip(normals @ light_dir, 0.0, None))  # [H]
    view_of_hit = hit // n_pixels
    plain = np.isin(np.asarray(cameras)[view_of_hit], cfg.textureless_cameras)
    albedo = np.empty((len(hit), 3), dtype=np.float32)
    albedo[~plain] = shape.albedo(surface_dirs[~plain], cfg.texture_contrast)
    albedo[plain] = shape.albedo(surface_dirs[plain], 0.0)
    colour = np.empty((n_views * n_pixels, 3), dtype=np.float32)
    colour[:] = np.asarray(cfg.background, dtype=np.float32)
    colour[hit] = albedo * shading[:, None].astype(np.float32)
    images = (np.clip(colour, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).reshape(n_views, size, size, 3)
    depth = np.nan_to_num(depth, nan=0.0).astype(np.float32)
    normal_map = np.zeros((n_views * n_pixels, 3), dtype=np.float32)
    normal_map[hit] = normals
    return CaptureRender(
        capture=dataset.capture_id(subject, session, recording, shot),
        expression=expression,
        images_nhw3=images,
        depth_nhw=depth.reshape(n_views, size, size),
        normals_nhw3=normal_map.reshape(n_views, size, size, 3),
        R=R,
        T=T,
        K=np.repeat(K[None], n_views, axis=0),
        camera_ids=cameras,
        names=[dataset.multipie_filename(subject, session, recording, cam, shot) for cam in cameras],
        light={"direction": light_dir.tolist(), "intensity": intensity},
    )


def surface_cloud(subject: int, expression: str, cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense ground-truth surface: points [N, 3], albedo colours [N, 3] uint8, unit normals [N, 3]."""
    shape = head_shape(subject, expression, cfg.seed)
    dirs = _fibonacci_dirs(cfg.surface_points)
    points = shape.surface(dirs)
    colours = (shape.albedo(dirs, cfg.texture_contrast) * 255.0 + 0.5).astype(np.uint8)
    return points, colours, shape.normals(points)
