"""Work-tree paths, shards by subject, capture lists and the up-to-date check."""

from __future__ import annotations

import io as pyio

import numpy as np
import pytest

from stages.core import dataset, io, worktree
from stages.core.errors import InputError


def _captures(subjects=8, per_subject=3) -> list[dataset.Capture]:
    return [
        dataset.Capture(dataset.capture_id(s, 1, 1, shot), f"{s:03d}", (dataset.ImageEntry("x.png", "051"),))
        for s in range(1, subjects + 1)
        for shot in range(per_subject)
    ]


def test_shards_partition_by_subject():
    captures = _captures()
    shards = [worktree.Shard.parse(f"{k}/3").select(captures) for k in range(3)]
    assert sorted(c.id for shard in shards for c in shard) == sorted(c.id for c in captures)
    subjects = [{c.subject for c in shard} for shard in shards]
    assert all(not (a & b) for i, a in enumerate(subjects) for b in subjects[i + 1 :])
    assert [len(s) for s in subjects] == [3, 3, 2]


@pytest.mark.parametrize("text", ["3/3", "a/2", "1", "-1/2", "1/0"])
def test_bad_shard(text):
    with pytest.raises(InputError, match="bad --shard"):
        worktree.Shard.parse(text)


def test_shard_from_slurm_env(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    assert worktree.Shard.parse(None) == worktree.Shard(2, 4)
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    assert worktree.Shard.parse(None) == worktree.Shard(0, 1)


def test_capture_lists(tmp_path, monkeypatch):
    captures = _captures(3, 1)
    (tmp_path / "ids.txt").write_text("# chosen\n003_01_01_00\n\n001_01_01_00\n")
    ids = worktree.read_capture_ids(tmp_path / "ids.txt")
    assert [c.id for c in worktree.select_captures(captures, capture_ids=ids)] == ["003_01_01_00", "001_01_01_00"]
    monkeypatch.setattr("sys.stdin", pyio.StringIO("002_01_01_00\n"))
    assert worktree.read_capture_ids("-") == ["002_01_01_00"]
    with pytest.raises(InputError, match="not in the dataset, e.g. '009_01_01_00'"):
        worktree.select_captures(captures, capture_ids=["009_01_01_00"])


def test_up_to_date_follows_the_input_hash(tmp_path):
    path = worktree.record_path(tmp_path, "001_01_01_00", "depth")
    assert path == tmp_path / "001_01_01_00" / "depth.safetensors"
    assert not worktree.is_up_to_date(path, "h1")
    io.save_record(path, {"depth": np.zeros((1, 2, 2), np.float32)}, kind="depth", stage="depth",
                   capture="001_01_01_00", names=["a"], inputs_hash="h1")  # fmt: skip
    assert worktree.is_up_to_date(path, "h1") and not worktree.is_up_to_date(path, "h2")
    path.write_bytes(b"garbage")
    assert not worktree.is_up_to_date(path, "h1")


def test_recorded_image_paths(tmp_path):
    image = tmp_path / "data" / "a.png"
    image.parent.mkdir()
    image.write_bytes(b"png")
    path = worktree.record_path(tmp_path / "w", "c", "depth")
    assert worktree.recorded_image_paths(path) is None  # no record
    io.save_record(path, {"depth": np.zeros((1, 2, 2), np.float32)}, kind="depth", stage="t", capture="c",
                   names=["a.png"], extra={"image_paths": f'["{image}"]'})  # fmt: skip
    assert worktree.recorded_image_paths(path) == {"a.png": image}
    image.unlink()
    assert worktree.recorded_image_paths(path) is None  # a listed file is gone: fall back to --data
