"""Rig mode (beyond the paper): a fixed camera rig solved from several captures' SfM views
(generalised Procrustes), saved as a ``rig`` record and used to pose views SfM missed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core import geometry, io
from stages.core.errors import InputError
from stages.core.pose_math import fit_pose_similarity, scaled_intrinsics, transform_pose
from stages.poses.options import STAGE, CapturePoses, Config

RIG_SCHEMA: dict[str, tuple[int | str, ...]] = {
    "R": ("C", 3, 3), "T": ("C", 3), "K": ("C", 3, 3), "width": ("C",), "height": ("C",),
    "captures": ("C",), "spread_deg": ("C",),
}  # fmt: skip
"""Tensors of a rig record (kind ``rig``, rows = physical cameras, names = camera ids)."""
RIG_CONVENTION = "R, T: cam_from_rig (OpenCV world-to-camera, rig frame as world)"


@dataclass(frozen=True)
class Rig:
    """A fixed camera rig: each camera's pose in the rig frame and its intrinsics.

    ``R`` [C,3,3], ``T`` [C,3] are cam_from_rig (world-to-camera with the rig frame as world,
    OpenCV); ``K`` [C,3,3] at ``width``/``height`` [C]; ``captures`` [C] how many captures' SfM
    posed the camera; ``spread_deg`` [C] the RMS rotation disagreement between those captures
    after alignment (a quality figure). The rig frame is that of the reference capture (the one
    SfM posed most completely), its scale included.
    """

    camera_ids: list[str]
    R: np.ndarray
    T: np.ndarray
    K: np.ndarray
    width: np.ndarray
    height: np.ndarray
    captures: np.ndarray
    spread_deg: np.ndarray

    def confidence(self, row: int) -> float:
        """0.6 for a camera seen by many captures that agree, less for few or disagreeing ones."""
        support = 1.0 - math.exp(-float(self.captures[row]) / 2.0)
        return float(0.6 * support / (1.0 + float(self.spread_deg[row])))

    def place(self, camera_ids: Sequence[str], R: np.ndarray, T: np.ndarray,
              registered: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
        """Poses (in the capture's SfM world) of the unregistered rows whose camera the rig knows.

        The capture's world is tied to the rig by a similarity fitted on its registered views that
        the rig knows (>= 2 needed; none placed otherwise).
        """
        index = {cam: k for k, cam in enumerate(self.camera_ids)}
        common = [i for i in np.flatnonzero(registered) if camera_ids[i] in index]
        if len(common) < 2:
            return {}
        rig_rows = [index[camera_ids[i]] for i in common]
        scale, R_w, t_w = fit_pose_similarity(self.R[rig_rows], self.T[rig_rows], R[common], T[common])
        placed = {}
        for i in np.flatnonzero(~np.asarray(registered, dtype=bool)):
            k = index.get(camera_ids[i])
            if k is not None:
                placed[int(i)] = transform_pose(self.R[k], self.T[k], scale, R_w, t_w)
        return placed

    def save(self, path: Path, session: str, cfg: Config, inputs_hash: str = "") -> Path:
        tensors = {"R": self.R, "T": self.T, "K": self.K, "width": self.width.astype(np.int32),
                   "height": self.height.astype(np.int32), "captures": self.captures.astype(np.int32),
                   "spread_deg": self.spread_deg.astype(np.float64)}  # fmt: skip
        return io.save_record(path, tensors, kind="rig", stage=STAGE, capture=f"rig_{session}", names=self.camera_ids,
                              config=cfg, inputs_hash=inputs_hash,
                              extra={"rig_convention": RIG_CONVENTION})  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike) -> Rig:
        """Read a rig record (``WORK/rig_<session>.safetensors``); InputError when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"--rig {path}: no such rig file; use auto, off, or a rig_<session>.safetensors that "
                             "an earlier `nvf poses --rig auto` wrote")  # fmt: skip
        try:
            record = io.load_record(path, kind="rig", schema=RIG_SCHEMA)
        except Exception as exc:  # RecordError: wrong kind, corrupt file
            raise InputError(f"--rig {path}: not a usable rig record ({exc})") from None
        return cls(record.names, record["R"], record["T"], record["K"], record["width"], record["height"],
                   record["captures"], record["spread_deg"])  # fmt: skip


def rig_path(work: Path, session: str) -> Path:
    """Where the rig solved from a session's captures is saved: ``WORK/rig_<session>.safetensors``."""
    return Path(work) / f"rig_{session or 'all'}.safetensors"


def solve_rig(captures: Sequence[CapturePoses], iterations: int = 4) -> Rig:
    """The rig from the SfM views of several captures of the same cameras (generalised Procrustes).

    Each capture's SfM world is tied to the current rig by a similarity on the cameras both know;
    every camera's pose is then the mean over captures (chordal mean rotation, mean centre). The
    rig starts from the capture SfM posed most completely, and is refined ``iterations`` times.
    Cameras no capture registered are left out of the rig.
    """
    sfm = [c.source == io.POSE_SOURCES["sfm"] for c in captures]
    ref = int(np.argmax([m.sum() for m in sfm]))
    poses_by_cam: dict[str, tuple[np.ndarray, np.ndarray]] = {
        captures[ref].camera_ids[i]: (captures[ref].R[i], captures[ref].T[i]) for i in np.flatnonzero(sfm[ref])
    }
    for _ in range(iterations):
        gathered: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, int, int]]] = {}
        for capture, mask in zip(captures, sfm):
            rows = [i for i in np.flatnonzero(mask) if capture.camera_ids[i] in poses_by_cam]
            if len(rows) < 2:
                continue
            R_rig = np.array([poses_by_cam[capture.camera_ids[i]][0] for i in rows])
            T_rig = np.array([poses_by_cam[capture.camera_ids[i]][1] for i in rows])
            scale, R_w, t_w = fit_pose_similarity(capture.R[rows], capture.T[rows], R_rig, T_rig)
            for i in np.flatnonzero(mask):
                R_i, T_i = transform_pose(capture.R[i], capture.T[i], scale, R_w, t_w)
                K_i = capture.K[i]
                gathered.setdefault(capture.camera_ids[i], []).append(
                    (R_i, T_i, K_i, int(capture.width[i]), int(capture.height[i]))
                )
        updated = {}
        for cam, items in gathered.items():
            Rs = np.array([item[0] for item in items])
            U, _, Vt = np.linalg.svd(Rs.sum(0))
            R_mean = U @ np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))]) @ Vt
            center = geometry.camera_centers(Rs, np.array([item[1] for item in items])).mean(0)
            updated[cam] = (R_mean, -R_mean @ center)
        poses_by_cam = updated
    cams = [cam for cam in dict.fromkeys(c for capture in captures for c in capture.camera_ids) if cam in gathered]
    R = np.array([poses_by_cam[cam][0] for cam in cams])
    T = np.array([poses_by_cam[cam][1] for cam in cams])
    K, width, height, counts, spread = [], [], [], [], []
    for k, cam in enumerate(cams):
        items = gathered[cam]
        w, h = items[0][3], items[0][4]
        Ks = np.array([scaled_intrinsics(item[2], item[3], item[4], w, h) for item in items])
        K.append(np.median(Ks, axis=0))
        width.append(w)
        height.append(h)
        counts.append(len(items))
        angles = geometry.rotation_angle_deg(np.array([item[0] for item in items]), R[k][None])
        spread.append(float(np.sqrt(np.mean(np.square(angles)))))
    return Rig(cams, R, T, np.array(K), np.array(width), np.array(height), np.array(counts), np.array(spread))
