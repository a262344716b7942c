"""Small builders shared by tests (data trees, images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_png(path: Path, value: int = 0) -> Path:
    """A 4x4 grey PNG: enough for layout tests that never look at pixels."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(path)
    return path


def make_multipie_tree(root: Path, subjects=(1, 2), sessions=(1,), recordings=(1,), shots=(0,), cameras=None) -> Path:
    """Empty-image Multi-PIE tree in the released layout (sessionNN/multiview/SUBJECT/RECORDING/CAM/...)."""
    from stages.core import dataset

    cameras = cameras or list(dataset.MULTIPIE_CAMERAS)
    for subject in subjects:
        for session in sessions:
            for recording in recordings:
                for shot in shots:
                    for camera in cameras:
                        write_tiny_png(root / dataset.multipie_relpath(subject, session, recording, camera, shot))
    return root


def groundtruth_work(data: Path, work: Path, capture: str = "001_01_01_00") -> Path:
    """WORK/<capture>/{poses,aligned}.safetensors from synth ground truth (aligned: scale 1, shift 0)."""
    from stages import synth
    from stages.core import io, worktree

    gt = synth.groundtruth_dir(data, capture)
    poses = io.load_record(gt / "poses.safetensors", kind="poses")
    depth = io.load_record(gt / "depth.safetensors", kind="depth")
    meta = {"stage": "test", "capture": capture, "names": poses.names}
    io.save_record(worktree.record_path(work, capture, "poses"), poses.tensors, kind="poses", **meta)
    n, z = len(depth.names), depth["depth"]
    io.save_record(worktree.record_path(work, capture, "aligned"), {
        "depth": z, "scale": np.ones(n), "shift": np.zeros(n), "residual_rms": np.zeros(n),
        "inliers": (z > 0).sum(axis=(1, 2)), "image_hw": np.stack([poses["height"], poses["width"]], 1),
    }, kind="aligned", **meta)  # fmt: skip
    return work
