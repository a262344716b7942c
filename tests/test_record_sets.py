"""Record sets are written as a set (`io.record_set`): the completion mark is removed first and
written last, so a kill -9 at any point never leaves a mark beside a member of another run. Each
test kills a real process (SIGKILL, from a hook on the rename that ends an atomic write) in the
middle of a rewrite, then checks what a rerun sees."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from stages import cloud, poses, synth
from stages.core import dataset, io, worktree
from tests.helpers import groundtruth_work, run_killed_at, save_tiny_checkpoint

CAPTURE = "001_01_01_00"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sets") / "data"
    synth.run(root, synth.Config(subjects=1, resolution=48, elevated=False, surface_points=400))
    return root


@pytest.mark.parametrize("kill_at", ["cloud.ply", "cloud_metrics.json"])
def test_cloud_killed_mid_rewrite_never_pairs_new_and_stale(data, tmp_path, kill_at):
    work = groundtruth_work(data, tmp_path / "work", CAPTURE)
    first = cloud.Config(outlier_removal=False)
    ply, metrics = cloud.fuse_capture(work, CAPTURE, first)
    originals, first_inputs = (_digest(ply), _digest(metrics)), io.read_json(metrics)["inputs"]
    code = f"""
import dataclasses
from pathlib import Path
from stages import cloud
cloud.fuse_capture(Path({str(work)!r}), {CAPTURE!r}, cloud.Config(outlier_removal=True, voxel_pixels=3.0))
"""
    assert run_killed_at(kill_at, code) == -9
    assert not metrics.exists()  # the mark went first: nothing claims the set is complete
    if kill_at == "cloud_metrics.json":
        assert _digest(ply) != originals[0]  # the new cloud was in place without its mark
    # a rerun of the first settings redoes the capture (not "up to date") and rebuilds its set exactly
    assert cloud.fuse_capture(work, CAPTURE, first) == [ply, metrics]
    assert _digest(ply) == originals[0]
    report = io.read_json(metrics)
    assert report["inputs"] == first_inputs and report["points"]["kept"] == len(io.read_ply(ply).points)


def _groundtruth_poses(data: Path) -> tuple[dataset.Capture, poses.CapturePoses]:
    capture = next(c for c in dataset.scan(data).captures if c.id == CAPTURE)
    gt = io.load_record(synth.groundtruth_dir(data, CAPTURE) / "poses.safetensors", kind="poses")
    rows = [gt.names.index(name) for name in capture.names]
    n = len(rows)
    return capture, poses.CapturePoses(
        names=capture.names, camera_ids=list(capture.cameras), R=gt["R"][rows], T=gt["T"][rows], K=gt["K"][rows],
        width=gt["width"][rows], height=gt["height"][rows], source=np.full(n, poses.SOURCES["sfm"], np.int8),
        confidence=np.ones(n, np.float32), reproj_error=np.zeros(n), points_p3=np.zeros((1, 3)),
        colors_p3=np.zeros((1, 3), np.uint8), point_error_p=np.zeros(1), track_offsets=np.array([0, 0]),
        colmap_cameras={name: {"model": "PINHOLE", "params": [float(K[0, 0]), float(K[1, 1]), float(K[0, 2]),
                                                               float(K[1, 2])]} for name, K in zip(capture.names, gt["K"][rows])},
    )  # fmt: skip


def test_poses_killed_mid_rewrite_never_pairs_new_and_stale(data, tmp_path):
    work = tmp_path / "work"
    capture, posed = _groundtruth_poses(data)
    cfg = poses.Config(export=("transforms", "colmap"))
    poses.write_capture(work, data, capture, posed, cfg, "first")
    poses_path, sparse_path = (worktree.record_path(work, CAPTURE, k) for k in ("poses", "sparse"))
    old_sparse = _digest(sparse_path)
    assert worktree.is_up_to_date(poses_path, "first")
    code = f"""
import dataclasses
import numpy as np
from pathlib import Path
from stages import poses
from tests.test_record_sets import _groundtruth_poses
capture, posed = _groundtruth_poses(Path({str(data)!r}))
posed = dataclasses.replace(posed, points_p3=np.ones((1, 3)))  # another run's sparse points
poses.write_capture(Path({str(work)!r}), Path({str(data)!r}), capture, posed, poses.Config(export=("transforms", "colmap")), "second")
"""
    for kill_at in ("sparse.safetensors", "transforms.json", "colmap", "poses.safetensors"):
        assert run_killed_at(kill_at, code) == -9, kill_at
        assert not poses_path.exists(), kill_at  # removed first: a rerun of "first" is not up to date
        assert not worktree.is_up_to_date(poses_path, "first")
    assert _digest(sparse_path) != old_sparse  # the new sparse was in place, with no poses beside it
    assert poses.write_capture(work, data, capture, posed, cfg, "first")[-1] == poses_path
    assert _digest(sparse_path) == old_sparse and worktree.is_up_to_date(poses_path, "first")


def _tree(root: Path) -> dict[str, str]:
    return {q.relative_to(root).as_posix(): _digest(q) for q in sorted(root.rglob("*")) if q.is_file()}


def test_a_checkpoint_resave_keeps_the_old_one_until_the_new_one_is_whole(tmp_path):
    from stages.train import checkpoint as ckpt

    run = tmp_path / "run"
    step2, step4 = save_tiny_checkpoint(run, seed=1, step=2), save_tiny_checkpoint(run, seed=1, step=4)
    old2, old4 = _tree(step2), _tree(step4)
    code = f"""
import os, signal
from pathlib import Path
import safetensors.torch
from tests.helpers import save_tiny_checkpoint

real_save = safetensors.torch.save_file
def save_file(tensors, filename, metadata=None):
    if os.environ.get("KILL_IN_STATE") and filename.endswith("trainer_state.safetensors"):
        os.kill(os.getpid(), signal.SIGKILL)  # the new checkpoint's last file, half way
    return real_save(tensors, filename, metadata=metadata)
safetensors.torch.save_file = save_file
save_tiny_checkpoint(Path({str(run)!r}), seed=2, step=4)  # a re-save of step 4 with other weights
"""
    os.environ["KILL_IN_STATE"] = "1"
    try:
        assert run_killed_at("never", code) == -9  # killed while the new step 4 is being written
    finally:
        del os.environ["KILL_IN_STATE"]
    assert _tree(step4) == old4 and _tree(step2) == old2  # the old one is whole, untouched
    assert run_killed_at(step4.name, code) == -9  # killed as the new folder is renamed in
    assert not step4.exists() and ckpt.list_checkpoints(run) == [step2] and _tree(step2) == old2
    save_tiny_checkpoint(run, seed=2, step=4)  # the re-save completes
    new4 = _tree(step4)
    assert new4["unet/diffusion_pytorch_model.safetensors"] != old4["unet/diffusion_pytorch_model.safetensors"]
    assert new4.keys() == old4.keys()  # nothing of the old folder is left in the new one
    assert io.foreign_files(step4) == [] and ckpt.list_checkpoints(run) == [step2, step4]
