"""Posed cameras on disk: nerfstudio ``transforms.json`` (OpenGL camera-to-world, per-frame intrinsics
when cameras differ) and COLMAP text models (cameras.txt, images.txt, points3D.txt), with COLMAP's
distortion models in OpenCV's form."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import geometry
from stages.core.errors import InputError
from stages.core.io.atomic import atomic_dir
from stages.core.io.jsonio import read_json, write_json
from stages.core.io.records import Record

log = logging.getLogger("nvf")


@dataclass(frozen=True)
class CameraSet:
    """Posed cameras: names [N], R [N,3,3], T [N,3] (OpenCV w2c), K [N,3,3], width/height [N], and
    ``distortion`` [N, 4] OpenCV (k1, k2, p1, p2) of normalised image coordinates (None: pinhole)."""

    names: list[str]
    R: np.ndarray
    T: np.ndarray
    K: np.ndarray
    width: np.ndarray
    height: np.ndarray
    distortion: np.ndarray | None = None


COLMAP_DISTORTION_PARAMS: dict[str, tuple[int, ...]] = {
    "SIMPLE_PINHOLE": (),
    "PINHOLE": (),
    "SIMPLE_RADIAL": (3,),
    "RADIAL": (3, 4),
    "OPENCV": (4, 5, 6, 7),
}
"""COLMAP camera models with OpenCV's distortion: the params' indices of k1[, k2[, p1, p2]]."""


def opencv_distortion(model: str, params: Sequence[float]) -> np.ndarray:
    """(k1, k2, p1, p2) of a COLMAP camera model, whose radial and tangential terms are OpenCV's.

    Raises ValueError for models outside `COLMAP_DISTORTION_PARAMS` (fisheye and others)."""
    if model not in COLMAP_DISTORTION_PARAMS:
        raise ValueError(f"COLMAP camera model {model} has no OpenCV (k1, k2, p1, p2) form")
    found = np.zeros(4)
    for slot, index in enumerate(COLMAP_DISTORTION_PARAMS[model]):
        found[slot] = float(params[index])
    return found


def colmap_cameras_distortion(
    colmap_cameras: Mapping[str, Mapping[str, Any]], names: Sequence[str]
) -> np.ndarray | None:
    """[N, 4] OpenCV (k1, k2, p1, p2) per row from a poses record's ``colmap_cameras`` metadata (row
    name -> COLMAP model and params): SfM's fit for its views, the nearest SfM view's for
    interpolated ones, none for views posed through the rig (pinhole, no params). A model without
    an OpenCV form is warned about and left out. None when no row has any distortion."""
    rows = []
    for name in names:
        camera = colmap_cameras.get(name, {})
        try:
            rows.append(opencv_distortion(camera["model"], camera["params"]) if "params" in camera else np.zeros(4))
        except ValueError as exc:
            log.warning("%s: %s; taken as no distortion", name, exc)
            rows.append(np.zeros(4))
    found = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    return found if found.any() else None


def record_distortion(record: Record) -> np.ndarray | None:
    """`colmap_cameras_distortion` of a loaded poses record, in its row order."""
    return colmap_cameras_distortion(json.loads(record.extra.get("colmap_cameras", "{}")), record.names)


def write_transforms(
    path: str | os.PathLike,
    cameras: CameraSet,
    *,
    image_dir: str = "images",
    extra_frames: Sequence[Mapping[str, Any]] | None = None,
    applied_transform: np.ndarray | None = None,
) -> Path:
    """Write nerfstudio's transforms.json (camera-to-world, OpenGL frame: x right, y up, z back).

    Intrinsics (OPENCV: focal, centre, k1, k2, p1, p2 from ``cameras.distortion``, else zeros) go at
    the top level when every camera shares them, per frame otherwise; file paths
    are ``<image_dir>/<name>``. ``applied_transform`` (3x4) is recorded for dataparsers that undo it.
    """
    c2w = geometry.opencv_w2c_to_opengl_c2w(cameras.R, cameras.T)  # [N, 4, 4]
    distortion = np.zeros((len(cameras.names), 4)) if cameras.distortion is None else cameras.distortion
    intrinsics = [_intrinsics_dict(k, int(w), int(h), d)
                  for k, w, h, d in zip(cameras.K, cameras.width, cameras.height, distortion)]  # fmt: skip
    shared = all(entry == intrinsics[0] for entry in intrinsics)
    doc: dict[str, Any] = {"camera_model": "OPENCV"}
    if shared and intrinsics:
        doc.update(intrinsics[0])
    frames = []
    for i, name in enumerate(cameras.names):
        frame: dict[str, Any] = {"file_path": f"{image_dir}/{name}" if image_dir else name}
        if not shared:
            frame.update(intrinsics[i])
        frame["transform_matrix"] = c2w[i].tolist()
        if extra_frames is not None:
            frame.update(extra_frames[i])
        frames.append(frame)
    doc["frames"] = frames
    if applied_transform is not None:
        doc["applied_transform"] = np.asarray(applied_transform, dtype=float)[:3].tolist()
    return write_json(path, doc)


def _transforms_frames(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(document, frames) of a transforms.json; every frame an object with a `file_path` string."""
    doc = read_json(path)
    frames = doc.get("frames") if isinstance(doc, dict) else None
    if not isinstance(frames, list) or not frames:
        raise InputError(f"{path}: no frames in transforms.json; write it with nvf poses --export transforms")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str) or not frame["file_path"]:
            raise InputError(f"{path}: frame {i} has no file_path (the image it shows); add it or rewrite the file")
    return doc, frames


def transforms_image_paths(path: str | os.PathLike) -> list[Path]:
    """The image of each frame of a transforms.json, relative paths resolved against its folder."""
    _doc, frames = _transforms_frames(path)
    return [Path(path).parent / frame["file_path"] for frame in frames]


def read_transforms(path: str | os.PathLike) -> CameraSet:
    """Read a nerfstudio transforms.json back into OpenCV world-to-camera cameras (InputError naming
    the file and frame for a missing key, a non-number, a matrix that is not 4x4 or not finite)."""
    doc, frames = _transforms_frames(path)
    names, c2w, Ks, widths, heights, distortion = [], [], [], [], [], []
    for frame in frames:
        source = {**doc, **frame}
        try:
            K = [[float(source["fl_x"]), 0, float(source["cx"])], [0, float(source["fl_y"]), float(source["cy"])],
                 [0, 0, 1]]  # fmt: skip
            distortion.append([float(source.get(key, 0.0)) for key in ("k1", "k2", "p1", "p2")])
            widths.append(int(source["w"]))
            heights.append(int(source["h"]))
            matrix = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except KeyError as exc:
            raise InputError(f"{path}: frame {frame['file_path']} lacks {exc}; add it or rewrite the file") from None
        except (TypeError, ValueError):
            raise InputError(f"{path}: frame {frame['file_path']} holds a value that is not a number (intrinsics, "
                             "size or transform_matrix); rewrite the file") from None  # fmt: skip
        if matrix.shape not in ((4, 4), (3, 4)) or not np.isfinite(matrix).all() or not np.isfinite(K).all():
            raise InputError(f"{path}: frame {frame['file_path']}: transform_matrix must be a finite 4x4 (or 3x4) "
                             f"matrix, got shape {list(matrix.shape)}; rewrite the file")  # fmt: skip
        Ks.append(K)
        c2w.append(np.vstack([matrix[:3], [0.0, 0.0, 0.0, 1.0]]))
        names.append(Path(frame["file_path"]).name)
    R, T = geometry.opengl_c2w_to_opencv_w2c(np.asarray(c2w, dtype=np.float64))
    distortion_n4 = np.asarray(distortion, dtype=np.float64)
    return CameraSet(names, R, T, np.asarray(Ks, dtype=np.float64), np.asarray(widths), np.asarray(heights),
                     distortion_n4 if distortion_n4.any() else None)  # fmt: skip


def _intrinsics_dict(K: np.ndarray, width: int, height: int, distortion: np.ndarray) -> dict[str, Any]:
    k1, k2, p1, p2 = (float(v) for v in distortion)
    return {
        "fl_x": float(K[0, 0]),
        "fl_y": float(K[1, 1]),
        "cx": float(K[0, 2]),
        "cy": float(K[1, 2]),
        "w": width,
        "h": height,
        "k1": k1,
        "k2": k2,
        "p1": p1,
        "p2": p2,
    }


def write_colmap_text(
    folder: str | os.PathLike,
    cameras: CameraSet,
    points_n3: np.ndarray | None = None,
    colors_n3: np.ndarray | None = None,
    *,
    errors_n: np.ndarray | None = None,
    track_offsets: np.ndarray | None = None,
    track_images: np.ndarray | None = None,
    track_uv: np.ndarray | None = None,
    camera_models: Sequence[tuple[str, Sequence[float]] | None] | None = None,
) -> Path:
    """Export cameras, images and (optionally) 3D points as a COLMAP text model, atomically.

    One camera per distinct model and parameters: ``camera_models[i]`` (COLMAP model name and
    params, distortion included) where given, else PINHOLE from K. Image poses as COLMAP stores
    them (quaternion w,x,y,z and translation of world-to-camera, the same convention as nvf). With
    CSR tracks (``track_offsets`` [P+1], ``track_images`` [M] camera rows, ``track_uv`` [M, 2]
    pixels) every observation becomes a 2D point of its image and an element of its point's track;
    without them points have empty tracks. COLMAP's pixel coordinates and K use the same +0.5 pixel
    centre convention as nvf, so nothing is shifted. ``errors_n`` fills each point's mean
    reprojection error (pixels; 0 without).
    """
    n_points = 0 if points_n3 is None else len(points_n3)
    points2d: list[list[str]] = [[] for _ in cameras.names]  # per image: "u v point_id"
    tracks: list[str] = [""] * n_points  # per point: "image_id point2d_idx ..."
    if track_offsets is not None and track_images is not None and track_uv is not None:
        for p in range(n_points):
            elements = []
            for m in range(int(track_offsets[p]), int(track_offsets[p + 1])):
                row = int(track_images[m])
                elements.append(f" {row + 1} {len(points2d[row])}")
                points2d[row].append(f"{float(track_uv[m, 0])!r} {float(track_uv[m, 1])!r} {p + 1}")
            tracks[p] = "".join(elements)
    camera_ids: dict[tuple, int] = {}
    camera_lines, image_lines = [], []
    quats = geometry.rotmat_to_quat(cameras.R)
    for i, name in enumerate(cameras.names):
        K, width, height = cameras.K[i], int(cameras.width[i]), int(cameras.height[i])
        model = camera_models[i] if camera_models is not None else None
        if model is None:
            model = ("PINHOLE", (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
        key = (model[0], width, height, *(float(v) for v in model[1]))
        if key not in camera_ids:
            camera_ids[key] = len(camera_ids) + 1
            camera_lines.append(f"{camera_ids[key]} {model[0]} {width} {height} " + " ".join(repr(v) for v in key[3:]))
        qw, qx, qy, qz = (repr(float(v)) for v in quats[i])
        tx, ty, tz = (repr(float(v)) for v in cameras.T[i])
        image_lines.append(f"{i + 1} {qw} {qx} {qy} {qz} {tx} {ty} {tz} {camera_ids[key]} {name}")
        image_lines.append(" ".join(points2d[i]))
    point_lines = []
    if points_n3 is not None:
        colors = np.zeros_like(points_n3, dtype=np.uint8) if colors_n3 is None else np.asarray(colors_n3)
        colors = (np.clip(colors, 0, 1) * 255).round().astype(np.uint8) if colors.dtype != np.uint8 else colors
        errors = np.zeros(n_points) if errors_n is None else np.asarray(errors_n, dtype=float)
        for j, (point, color) in enumerate(zip(np.asarray(points_n3, dtype=float).tolist(), colors)):
            xyz = f"{point[0]!r} {point[1]!r} {point[2]!r}"  # Python floats: repr is the shortest exact text
            point_lines.append(f"{j + 1} {xyz} {color[0]} {color[1]} {color[2]} {float(errors[j])!r}{tracks[j]}")
    header = "# written by nvf\n"
    with atomic_dir(folder) as tmp:
        (tmp / "cameras.txt").write_text(header + "\n".join(camera_lines) + "\n")
        (tmp / "images.txt").write_text(header + "\n".join(image_lines) + "\n")
        (tmp / "points3D.txt").write_text(header + "\n".join(point_lines) + ("\n" if point_lines else ""))
    return Path(folder)
