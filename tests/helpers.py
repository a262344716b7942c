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
