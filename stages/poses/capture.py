"""One capture: validate its images, run SfM on it, and fill the views SfM left unregistered
(through the rig, then the ring fallback of Algorithm 1, improved: `core.pose_math.interpolate_missing`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import dataset, io
from stages.core.errors import InputError
from stages.core.pose_math import interpolate_missing, scaled_intrinsics
from stages.poses.options import CapturePoses, Config
from stages.poses.rig import Rig
from stages.poses.sfm import CheckedImages, extract_views, inspect_images, run_sfm

log = logging.getLogger("nvf")


def check_capture(root: Path, capture: dataset.Capture, decode: bool = True) -> CheckedImages:
    """Validate a capture's images (>= 2, unique names, and with `decode` decodable); returns their
    sizes and contrast when decoded (`inspect_images`), else no sizes."""
    if len(capture.images) < 2:
        raise InputError(f"capture {capture.id}: {len(capture.images)} image(s); poses need at least 2 views "
                         "of one capture (add views or leave the capture out with --captures)")  # fmt: skip
    names = capture.names
    if len(set(names)) != len(names):
        dupe = next(n for n in names if names.count(n) > 1)
        raise InputError(f"capture {capture.id}: image name {dupe} occurs twice; rename or remove the copy")
    return inspect_images(root, [entry.path for entry in capture.images]) if decode else CheckedImages([])


def order_parameter(capture: dataset.Capture, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(order [N], elevation [N]): Multi-PIE azimuths and elevations, else the row index and 0."""
    if layout == "multipie" and all(cam in dataset.MULTIPIE_CAMERAS for cam in capture.cameras):
        infos = [dataset.MULTIPIE_CAMERAS[cam] for cam in capture.cameras]
        return np.array([i.azimuth_deg for i in infos]), np.array([i.elevation_deg for i in infos])
    return np.arange(len(capture.images), dtype=np.float64), np.zeros(len(capture.images))


def estimate_capture(root: Path, capture: dataset.Capture, cfg: Config, layout: str,
                     checked: CheckedImages | None = None, rig: Rig | None = None) -> CapturePoses:  # fmt: skip
    """SfM on one capture, then the fallbacks for views it could not register (rig, then interp)."""
    return complete_capture(sfm_capture(root, capture, cfg, checked), capture, layout, rig)


def sfm_capture(root: Path, capture: dataset.Capture, cfg: Config,
                checked: CheckedImages | None = None, cancel: Any = None) -> CapturePoses:  # fmt: skip
    """SfM on one capture (``checked``: its `check_capture`, done here when not given; ``cancel``:
    see `run_sfm`); rows SfM could not register keep identity poses, zero K and source interp."""
    checked = checked if checked is not None else check_capture(root, capture)
    sizes = checked.sizes
    paths = [entry.path for entry in capture.images]
    rec, n_models = run_sfm(root, paths, cfg, sizes, checked.contrast, label=f"poses: {capture.id}", cancel=cancel)
    views, sparse = extract_views(rec, paths) if rec is not None else ({}, None)
    n = len(paths)
    R, T = np.tile(np.eye(3), (n, 1, 1)), np.zeros((n, 3))
    K = np.zeros((n, 3, 3))
    source = np.full(n, io.POSE_SOURCES["interp"], dtype=np.int8)
    confidence = np.zeros(n, dtype=np.float32)
    reproj = np.full(n, np.nan)
    cameras: dict[str, dict[str, Any]] = {}
    for i, path in enumerate(paths):
        view = views.get(path)
        if view is None:
            continue
        R[i], T[i], K[i] = view["R"], view["T"], view["K"]
        source[i] = io.POSE_SOURCES["sfm"]
        reproj[i] = view["reproj_error"]
        confidence[i] = _sfm_confidence(view["observations"], view["reproj_error"])
        cameras[capture.names[i]] = view["camera"]
    return CapturePoses(
        names=capture.names, camera_ids=capture.cameras, R=R, T=T, K=K,
        width=np.array([s[0] for s in sizes], dtype=np.int32), height=np.array([s[1] for s in sizes], dtype=np.int32),
        source=source, confidence=confidence, reproj_error=reproj,
        colmap_cameras=cameras, models=n_models, **_sparse_fields(sparse),
    )  # fmt: skip


def complete_capture(poses: CapturePoses, capture: dataset.Capture, layout: str,
                     rig: Rig | None = None) -> CapturePoses:  # fmt: skip
    """Fill the rows SfM left unregistered: through the rig where it knows the camera (source rig),
    then by interpolation along the ring (source interp). Needs >= 2 SfM views."""
    registered = poses.source == io.POSE_SOURCES["sfm"]
    n = len(poses.names)
    if registered.sum() < 2:
        raise InputError(
            f"capture {capture.id}: SfM registered {int(registered.sum())} of {n} views, too few to place the "
            "others; check the images (texture, overlap) or try --preset colmap / --colmap overrides"
        )
    R, T, K = poses.R.copy(), poses.T.copy(), poses.K.copy()
    source, confidence = poses.source.copy(), poses.confidence.copy()
    cameras = dict(poses.colmap_cameras)
    if rig is not None and not registered.all():
        placed = rig.place(poses.camera_ids, R, T, registered)
        for i, (R_i, T_i) in placed.items():
            k = rig.camera_ids.index(poses.camera_ids[i])
            R[i], T[i] = R_i, T_i
            K[i] = scaled_intrinsics(rig.K[k], int(rig.width[k]), int(rig.height[k]),
                                      int(poses.width[i]), int(poses.height[i]))  # fmt: skip
            source[i] = io.POSE_SOURCES["rig"]
            confidence[i] = rig.confidence(k)
            cameras[poses.names[i]] = {"model": "PINHOLE", "from": "rig", "camera": poses.camera_ids[i]}
        if placed:
            log.info("poses: %s: %d view(s) posed through the rig (%s)", capture.id, len(placed),
                     ", ".join(poses.names[i] for i in placed))  # fmt: skip
    known = source != io.POSE_SOURCES["interp"]
    if not known.all():
        missing = ", ".join(poses.names[i] for i in np.flatnonzero(~known))
        log.warning("poses: %s: %d of %d views unregistered (%s); their poses are interpolated (source=interp)",
                    capture.id, int((~known).sum()), n, missing)  # fmt: skip
        order, elevation = order_parameter(capture, layout)
        R, T, gap = interpolate_missing(R, T, known, order, elevation)
        rows = np.flatnonzero(known)
        step = np.median(np.diff(np.sort(order))) if n > 1 else 1.0
        for i in np.flatnonzero(~known):
            nearest = rows[np.argmin(np.abs(order[rows] - order[i]))]
            K[i] = scaled_intrinsics(K[nearest], int(poses.width[nearest]), int(poses.height[nearest]),
                                      int(poses.width[i]), int(poses.height[i]))  # fmt: skip
            confidence[i] = float(0.5 * math.exp(-(gap[i] / max(step, 1e-9) - 1.0) / 2.0)) if gap[i] > 0 else 0.5
            cameras[poses.names[i]] = {**cameras.get(poses.names[nearest], {}), "from": poses.names[nearest]}
    return dataclasses.replace(poses, R=R, T=T, K=K, source=source, colmap_cameras=cameras,
                               confidence=np.clip(confidence, 0, 1).astype(np.float32))  # fmt: skip


def _sparse_fields(sparse: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    if sparse is None:
        return {}
    return {"points_p3": sparse["points"], "colors_p3": sparse["colors"], "point_error_p": sparse["error"],
            "track_offsets": sparse["track_offsets"], "track_images": sparse["track_images"],
            "track_uv": sparse["track_uv"]}  # fmt: skip


def _sfm_confidence(observations: int, reproj_error: float) -> float:
    """1 - exp(-obs / 50), damped by the reprojection error (1 px halves it)."""
    error = reproj_error if np.isfinite(reproj_error) else 1.0
    return float((1.0 - math.exp(-observations / 50.0)) / (1.0 + error))
