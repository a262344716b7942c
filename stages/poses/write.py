"""Writing a capture's records: ``sparse.safetensors``, the exports (transforms.json, colmap/), then
``poses.safetensors`` (the completion mark).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from stages.core import dataset, io, worktree
from stages.poses.options import STAGE, CapturePoses, Config


def _absolute_image_paths(root: Path, capture: dataset.Capture, names: Sequence[str]) -> list[str]:
    """The image file of each row, absolute, so later stages find the images without --data."""
    by_name = {Path(entry.path).name: str((root / entry.path).resolve()) for entry in capture.images}
    return [by_name[name] for name in names]


def write_capture(out: Path, root: Path, capture: dataset.Capture, poses: CapturePoses, cfg: Config,
                  inputs_hash: str) -> list[Path]:  # fmt: skip
    """Write sparse, the exports, then poses (the completion mark, removed first: `io.record_set`);
    returns the paths written."""
    with io.record_set(worktree.record_path(out, capture.id, "poses")):
        return _write_capture_set(out, root, capture, poses, cfg, inputs_hash)


def _write_capture_set(out: Path, root: Path, capture: dataset.Capture, poses: CapturePoses, cfg: Config,
                       inputs_hash: str) -> list[Path]:  # fmt: skip
    folder = worktree.capture_dir(out, capture.id)
    meta = {"stage": STAGE, "capture": capture.id, "names": poses.names, "config": cfg, "inputs_hash": inputs_hash}
    written = [io.save_record(worktree.record_path(out, capture.id, "sparse"), {
        "points": poses.points_p3, "colors": poses.colors_p3, "error": poses.point_error_p,
        "track_offsets": poses.track_offsets, "track_images": poses.track_images, "track_uv": poses.track_uv,
    }, kind="sparse", **meta)]  # fmt: skip
    distortion = io.colmap_cameras_distortion(poses.colmap_cameras, poses.names)
    cameras = io.CameraSet(poses.names, poses.R, poses.T, poses.K, poses.width, poses.height, distortion)
    if "transforms" in cfg.export:
        rel = [os.path.relpath(root / entry.path, folder) for entry in capture.images]
        extra = [{"file_path": path, "nvf_source": _source_name(s), "nvf_confidence": float(c)}
                 for path, s, c in zip(rel, poses.source, poses.confidence)]  # fmt: skip
        written.append(io.write_transforms(folder / "transforms.json", cameras, extra_frames=extra))
    if "colmap" in cfg.export:
        models = [(poses.colmap_cameras[name]["model"], poses.colmap_cameras[name]["params"])
                  if source == io.POSE_SOURCES["sfm"] else None for name, source in zip(poses.names, poses.source)]  # fmt: skip
        written.append(io.write_colmap_text(folder / "colmap", cameras, poses.points_p3, poses.colors_p3,
                                            errors_n=poses.point_error_p, track_offsets=poses.track_offsets, track_images=poses.track_images,
                                            track_uv=poses.track_uv, camera_models=models))  # fmt: skip
    tensors = {"R": poses.R, "T": poses.T, "K": poses.K, "width": poses.width, "height": poses.height,
               "source": poses.source, "confidence": poses.confidence, "reproj_error": poses.reproj_error}  # fmt: skip
    unregistered = [n for n, s in zip(poses.names, poses.source) if s != io.POSE_SOURCES["sfm"]]
    written.append(io.save_record(worktree.record_path(out, capture.id, "poses"), tensors, kind="poses", extra={
        "camera_ids": json.dumps(poses.camera_ids), "sources": json.dumps(io.POSE_SOURCES),
        "colmap_cameras": json.dumps(poses.colmap_cameras), "unregistered": json.dumps(unregistered),
        "sfm_models": str(poses.models), "image_paths": json.dumps(_absolute_image_paths(root, capture, poses.names)),
    }, **meta))  # fmt: skip
    return written


def _source_name(code: int) -> str:
    return next(name for name, value in io.POSE_SOURCES.items() if value == int(code))
