"""What one capture contributes to the index: its records, kept views, rows into the records,
azimuths and pairs with their codes.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import dataset, io, worktree
from stages.core.errors import RecordError
from stages.triplets.codes import capture_frame, capture_pairs, pair_codes, pair_zero123_codes, pose_scale
from stages.triplets.config import Config, DepthChoice, PairSpec


@dataclass
class _CaptureRows:
    """What one capture contributes: its records, kept views and pairs (local view indices)."""

    capture: dataset.Capture
    records: dict[str, Path]
    views: list[int]  # index into capture.images
    embed_rows: np.ndarray
    pose_rows: np.ndarray
    depth_rows: np.ndarray
    pose_source: np.ndarray
    azimuth: np.ndarray
    elevation: np.ndarray
    scale: float
    sources: np.ndarray
    targets: np.ndarray
    codes: np.ndarray
    zero123: np.ndarray | None = None
    stamp: list[Any] = field(default_factory=list)


_QUALITY_LEVEL = {"failed": 0, "weak": 1, "good": 2}  # as stages.align.QUALITY


def _select(index: dataset.DatasetIndex, cfg: Config) -> list[tuple[dataset.Capture, set[str]]]:
    """Captures with all their kept views, and per capture the names of the views that may be sources."""
    base = dataset.Filters(subjects=cfg.subjects, sessions=cfg.sessions, cameras=cfg.cameras,
                           expressions=cfg.expressions, shots=cfg.shots)  # fmt: skip
    full = dataset.apply_filters(index, base)
    if cfg.protocol is None:
        return [(capture, set(capture.names)) for capture in full.captures]
    sources = dataset.apply_filters(full, dataclasses.replace(base, protocol=cfg.protocol))
    by_id = {capture.id: capture for capture in full.captures}
    return [(by_id[capture.id], set(capture.names)) for capture in sources.captures]


def _records(work: Path, capture: str, depth: DepthChoice) -> tuple[dict[str, Path], list[str]]:
    """The records of a capture D_I refers to, and the kinds missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for kind in ("poses", "embed"):
        path = worktree.record_path(work, capture, kind)
        if path.is_file():
            found[kind] = path
        else:
            missing.append(kind)
    if depth != "none":
        kinds = ("aligned", "depth") if depth == "auto" else (depth,)
        path = next((p for k in kinds if (p := worktree.record_path(work, capture, k)).is_file()), None)
        if path is not None:
            found["depth"] = path
        elif depth != "auto":
            missing.append(depth)
    return found, missing


def _row_map(names: Sequence[str], wanted: Sequence[str], record: Path) -> np.ndarray:
    """Row of each wanted name in a record's names; RecordError naming the first one missing."""
    rows = {name: i for i, name in enumerate(names)}
    missing = [name for name in wanted if name not in rows]
    if missing:
        raise RecordError(f"{record}: has no row for view {missing[0]} ({len(missing)} missing); the dataset changed "
                          "since that record was written: rerun its stage with --overwrite")  # fmt: skip
    return np.asarray([rows[name] for name in wanted], dtype=np.int32)


def _capture_rows(
    capture: dataset.Capture, source_names: set[str], records: dict[str, Path], layout: str, cfg: Config,
    spec: PairSpec,
) -> tuple[_CaptureRows, dict[str, str]]:  # fmt: skip
    poses = io.load_record(records["poses"], kind="poses", capture=capture.id)
    embed = io.load_record(records["embed"], kind="embed", capture=capture.id)  # checked whole: training reads it
    embed_meta = {**embed.extra, "nvf_kind": embed.kind, "capture": embed.capture}
    names = capture.names
    pose_rows = _row_map(poses.names, names, poses.path)
    embed_rows = _row_map(embed.names, names, records["embed"])
    if "depth" in records:
        depth_rows = _row_map(io.read_record_names(records["depth"]), names, records["depth"])
        quality = io.read_record_tensor(records["depth"], "quality")  # aligned records since issue 17
        if quality is not None:
            low = np.asarray(quality)[depth_rows] < _QUALITY_LEVEL[cfg.min_depth_quality]
            depth_rows = np.where(low, -1, depth_rows).astype(np.int32)
    else:
        depth_rows = np.full(len(names), -1, dtype=np.int32)
    sources_all = poses.tensors.get("source")
    pose_source = (np.asarray(sources_all, np.int8)[pose_rows] if sources_all is not None
                   else np.full(len(names), io.POSE_SOURCES["rig"], np.int8))  # fmt: skip
    R, T = np.asarray(poses["R"], np.float64), np.asarray(poses["T"], np.float64)
    scale = pose_scale(R, T)
    frame = capture_frame(R, T)
    if layout == "multipie":
        azimuth = np.asarray([dataset.MULTIPIE_CAMERAS[image.camera].azimuth_deg for image in capture.images])
        elevation = np.asarray([dataset.MULTIPIE_CAMERAS[image.camera].elevation_deg for image in capture.images])
    else:
        azimuth, elevation = frame.azimuth_deg[pose_rows], frame.elevation_deg[pose_rows]
    keep = np.ones(len(names), dtype=bool)
    if cfg.exclude_interp:
        keep &= pose_source != io.POSE_SOURCES["interp"]
    views = [int(i) for i in np.flatnonzero(keep)]
    is_source = np.asarray([names[i] in source_names for i in views], dtype=bool)
    rng = np.random.default_rng([cfg.seed, zlib.crc32(capture.id.encode())])
    src_local, tgt_local = capture_pairs(azimuth[views], elevation[views], is_source, spec, rng)
    view_arr = np.asarray(views, dtype=np.int64)
    src_rows, tgt_rows = pose_rows[view_arr[src_local]], pose_rows[view_arr[tgt_local]]
    codes = pair_codes(R, T, scale, src_rows, tgt_rows)
    zero123 = pair_zero123_codes(R, T, scale, frame, src_rows, tgt_rows) if cfg.pose_code != "paper" else None
    stamp = [[kind, path.name, *_file_stamp(path)] for kind, path in sorted(records.items())]
    rows = _CaptureRows(
        capture, records, views, embed_rows[views], pose_rows[views], depth_rows[views], pose_source[views],
        azimuth[views], elevation[views], scale, src_local, tgt_local, codes, zero123, stamp,
    )  # fmt: skip
    return rows, {"model": embed_meta.get("model", ""), "pretrained": embed_meta.get("pretrained", ""),
                  "embed_dim": embed_meta.get("embed_dim", "")}  # fmt: skip


def _file_stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]
