"""nvf merge: three shards of a 6-subject synth set merge into exactly the single run's work tree."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stages import merge, pipeline, synth
from stages.core import io, worktree
from stages.core.errors import InputError

# Poses from the synth ground truth (SfM does not register 64-96 px tiny rings; align then fits
# against the ground-truth depth). Depth and embed batch each capture alone, cut by the capture and
# the config only (`batching.capture_batches`), so the auto batch size gives each capture the same
# batches in the single run and in every shard: the same bits on any CPU. No cache: each shard
# computes its own maps, none is handed over from another run.
CONFIG = dataclasses.replace(pipeline.PRESETS["tiny"], until="embed", poses_source="groundtruth", stages={
    "depth": {"cache": False},
    "embed": {"cache": False},
})  # fmt: skip
RECORDS = ("poses", "depth", "aligned", "embed")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("merge")
    data = root / "data"
    synth.run(data, dataclasses.replace(synth.PRESETS["tiny"], subjects=6, resolution=64, surface_points=2000))
    pipeline.run(data, root / "single", CONFIG, device="cpu")
    for k in range(3):
        pipeline.run(data, root / f"shard{k}", CONFIG, shard=worktree.Shard(k, 3), device="cpu")
    return {"data": data, "single": root / "single", "root": root}


def _with_batch_size(batch_size: int | None) -> pipeline.Config:
    return dataclasses.replace(
        CONFIG, stages={s: {"cache": False, "batch_size": batch_size} for s in ("depth", "embed")}
    )


def _assert_same_tree(a: Path, b: Path, captures: list[str]) -> None:
    for capture in captures:
        for kind in RECORDS:
            ra, rb = (io.load_record(worktree.record_path(t, capture, kind)) for t in (a, b))
            assert (ra.names, ra.config, ra.extra) == (rb.names, rb.config, rb.extra)
            if kind != "aligned":  # align hashes its input files' bytes, and safetensors orders its
                assert ra.inputs_hash == rb.inputs_hash  # header metadata differently at each save
            for key, value in ra.tensors.items():
                assert value.tobytes() == rb.tensors[key].tobytes(), f"{capture}/{kind}/{key} differs"
        pa, pb = (io.read_ply(t / capture / "cloud.ply") for t in (a, b))
        assert np.array_equal(np.asarray(pa.points), np.asarray(pb.points))


def test_three_shards_merge_into_the_single_run_bit_for_bit(runs, tmp_path):
    shards = [runs["root"] / f"shard{k}" for k in range(3)]
    subjects = [{c.split("_")[0] for c in pipeline.read_manifest(s)["captures"]} for s in shards]
    assert [len(s) for s in subjects] == [2, 2, 2] and not (subjects[0] & subjects[1] | subjects[1] & subjects[2])
    merged = merge.run(shards, tmp_path / "merged", mode="copy")
    single = pipeline.read_manifest(runs["single"])
    assert sorted(merged["captures"]) == sorted(single["captures"]) and len(single["captures"]) == 6
    _assert_same_tree(runs["single"], tmp_path / "merged", single["captures"])
    assert merged["stages"]["depth"]["status"] == "done" and merged["stages"]["depth"]["captures"] == 6
    assert merged["stages"]["triplets"]["status"] == "not-run"  # the global stage waits for the merge
    # the merged tree then finishes like the single run: per-capture stages up to date, triplets built
    done = pipeline.run(runs["data"], tmp_path / "merged", dataclasses.replace(CONFIG, until="triplets"), device="cpu")
    assert [done["stages"][s]["status"] for s in pipeline.CAPTURE_STEPS[:5]] == ["up-to-date"] * 5
    assert done["stages"]["triplets"]["status"] == "done"
    # a repeated merge into the same tree is a no-op, not a conflict
    merge.run(shards, tmp_path / "merged", mode="hardlink")


def test_shards_run_at_other_batch_sizes_agree_with_the_single_run_to_float_tolerance(runs, tmp_path):
    """--batch-size 3 and 4 in two shards, auto in the third, against the single run at auto: what
    the README promises for another batch size is float tolerance (and same bits at the same one)."""
    shards = []
    for k, batch_size in enumerate((3, 4, None)):
        shards.append(tmp_path / f"shard{k}")
        pipeline.run(runs["data"], shards[-1], _with_batch_size(batch_size), shard=worktree.Shard(k, 3), device="cpu")
    merged = merge.run(shards, tmp_path / "merged", mode="copy")
    assert sorted(merged["captures"]) == sorted(pipeline.read_manifest(runs["single"])["captures"])
    auto_captures = pipeline.read_manifest(shards[2])["captures"]
    for capture in merged["captures"]:
        for kind, key in (("depth", "depth"), ("embed", "embedding"), ("embed", "norm")):
            a, b = (
                io.load_record(worktree.record_path(t, capture, kind))[key]
                for t in (runs["single"], tmp_path / "merged")
            )
            if capture in auto_captures:
                assert a.tobytes() == b.tobytes(), f"{capture}/{kind}/{key} differs at the same batch size"
            else:
                np.testing.assert_allclose(
                    b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max(), err_msg=f"{capture}/{kind}/{key}"
                )


def test_merge_refuses_missing_shards_outputs_and_conflicts(runs, tmp_path):
    shards = [runs["root"] / f"shard{k}" for k in range(3)]
    with pytest.raises(InputError, match=r"shard\(s\) 2/3 missing"):
        merge.run(shards[:2], tmp_path / "a")
    copies = [tmp_path / f"s{k}" for k in range(3)]
    for source, copy in zip(shards, copies):
        shutil.copytree(source, copy)
    capture = pipeline.read_manifest(copies[1])["captures"][0]
    (copies[1] / capture / "embed.safetensors").unlink()
    with pytest.raises(InputError, match=f"{capture}/embed.safetensors"):
        merge.run(copies, tmp_path / "b")
    shutil.copy2(shards[1] / capture / "embed.safetensors", copies[1] / capture / "embed.safetensors")
    (copies[2] / "rig_01.safetensors").write_bytes(b"other")
    (copies[0] / "rig_01.safetensors").write_bytes(b"one")
    with pytest.raises(InputError, match="rig_01.safetensors.*differ.*--rig"):
        merge.run(copies, tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before anything moved
    (copies[2] / "rig_01.safetensors").unlink()
    manifest = json.loads((copies[0] / "manifest.json").read_text())
    manifest["captures"] = manifest["captures"][1:]  # a capture dropped from every shard
    (copies[0] / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="do not cover the dataset.*1 missing"):
        merge.run(copies, tmp_path / "d")
