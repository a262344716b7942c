"""The Multi-PIE rig of a synthetic capture: camera ids, intrinsics, poses and the light of each shot."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stages.core import dataset, geometry

if TYPE_CHECKING:
    from stages.synth.config import Config


def camera_ids(cfg: Config) -> list[str]:
    """Cameras of a capture in row order: the ring by azimuth, then the elevated ones."""
    return list(dataset.RING_CAMERAS) + (list(dataset.ELEVATED_CAMERAS) if cfg.elevated else [])


def intrinsics(cfg: Config) -> np.ndarray:
    """K [3, 3] of every camera: square pixels, principal point at the image centre."""
    size = cfg.resolution
    focal = 0.5 * size / np.tan(np.radians(cfg.fov_deg) / 2)
    return np.array([[focal, 0.0, size / 2], [0.0, focal, size / 2], [0.0, 0.0, 1.0]])


def rig_poses(cfg: Config, cameras: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """World-to-camera (R [N, 3, 3], T [N, 3]) of the cameras, all looking at the head centre."""
    cameras = camera_ids(cfg) if cameras is None else cameras
    info = [dataset.MULTIPIE_CAMERAS[cam] for cam in cameras]
    return geometry.ring_pose([c.azimuth_deg for c in info], [c.elevation_deg for c in info], cfg.radius)


def light_for_shot(shot: int, cfg: Config) -> tuple[np.ndarray, float]:
    """(unit direction toward the light [3], intensity) of a shot; the same for every subject.

    Shot 0 (ambient, and every shot without lighting_change): front, above and to the subject's
    right. Shots 1-18 sweep the light across the ring like Multi-PIE's flashes, alternating in
    height, with an intensity jitter.
    """
    azimuth, elevation, intensity = -25.0, 35.0, 1.0
    if shot > 0 and cfg.lighting_change:
        rng = np.random.default_rng([cfg.seed, 7, shot])
        azimuth = -80.0 + 160.0 * ((shot - 1) % 18) / 17.0
        elevation = 10.0 if shot % 2 else 35.0
        intensity = float(rng.uniform(0.8, 1.2))
    direction = geometry.ring_centers(azimuth, elevation, 1.0)
    return direction, intensity
