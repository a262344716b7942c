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


_KILL_PRELUDE = """
import os, signal, sys
from pathlib import Path

_KILL_AT, _real_replace = sys.argv[1], os.replace


def _replace(src, dst, *args, **kwargs):  # every atomic write of nvf ends in os.replace(tmp, target)
    if Path(dst).name == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_replace(src, dst, *args, **kwargs)


os.replace = _replace
"""


def run_killed_at(name: str, code: str) -> int:
    """Run ``code`` in a fresh Python that kill -9s itself the moment it would put a file or folder
    named ``name`` in place (the rename that ends an atomic write); returns the exit status
    (-9 when it was killed, 0 when it never got there)."""
    import os
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", _KILL_PRELUDE + code, name], env=env, cwd=repo,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    if result.returncode not in (0, -9):
        raise AssertionError(f"the killed run failed otherwise ({result.returncode}):\n{result.stderr}")
    return result.returncode


def save_tiny_checkpoint(run: Path, seed: int, step: int = 4) -> Path:
    """`checkpoint.save_checkpoint` of the tiny diffusion UNet and a paper projection, their weights
    drawn from `seed`, with an AdamW optimizer: a real checkpoint folder, in seconds."""
    import torch
    from diffusers import UNet2DConditionModel

    from stages.core import models
    from stages.train import checkpoint as ckpt
    from stages.train.model import ConditioningProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(Path(models.resolve_model("diffusion", "tiny").id) / "unet")
    with torch.no_grad():
        for weight in unet.parameters():
            weight.normal_(0.0, 0.02)
    projection = ConditioningProjection("paper", 524, 32, 512, 12)
    optimizer = torch.optim.AdamW([*unet.parameters(), *projection.parameters()], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
    return ckpt.save_checkpoint(run, step, unet=unet, projection=projection, optimizer=optimizer,
                                lr_scheduler=scheduler, sampler_state={"step": step}, scaler=None, ema=None)  # fmt: skip
