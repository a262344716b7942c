"""nvf run's orchestration: configs, the manifest, reruns, versions, unavailable stages, kill -9."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stages import pipeline, synth
from stages.core import io, worktree
from stages.core.errors import InputError, StageFailure

TINY = dataclasses.replace(pipeline.PRESETS["tiny"], poses_source="groundtruth")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline-data")
    synth.run(root, dataclasses.replace(synth.PRESETS["tiny"], subjects=4, resolution=48, surface_points=2000))
    return root


def test_config_file_sets_stage_fields_and_rejects_unknown_ones(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\nuntil = "cloud"\n[stages.depth]\nmax_res = 32\n'
                    '[stages.cloud]\npreset = "raw"\ndepth_range = [0.5, 9.0]\n[stages.train]\n')  # fmt: skip
    cfg = pipeline.load_config(path, pipeline.Config())
    assert (cfg.preset, cfg.until) == ("tiny", "cloud")
    import stages.cloud
    import stages.depth

    depth_cfg = pipeline.stage_config(pipeline.step("depth"), stages.depth, cfg)
    assert (depth_cfg.model_preset, depth_cfg.max_res) == ("tiny", 32)  # the pipeline preset picks the stage's
    cloud_cfg = pipeline.stage_config(pipeline.step("cloud"), stages.cloud, cfg)
    assert cloud_cfg.depth_range == (0.5, 9.0) and cloud_cfg.uniformity is False  # raw preset + a field
    assert pipeline.enabled(pipeline.step("train"), cfg) and not pipeline.enabled(pipeline.step("sample"), cfg)
    path.write_text("[stages.depth]\nmax_resolution = 32\n")
    with pytest.raises(InputError, match="no setting 'max_resolution'.*max_res"):
        pipeline.stage_config(pipeline.step("depth"), stages.depth, pipeline.load_config(path, pipeline.Config()))
    path.write_text("[stages.warp]\n")
    with pytest.raises(InputError, match=r"\[stages.warp\] is not a stage"):
        pipeline.load_config(path, pipeline.Config())


def test_stale_temp_files_are_removed_fresh_ones_kept(tmp_path):
    folder = tmp_path / "001_01_01_00"
    folder.mkdir()
    stale = [folder / ".depth.ab12cd34.tmp.safetensors", tmp_path / ".index.x_y9z8w7.tmp.json"]
    stale_dir = folder / ".views.k3j4h5g6.tmp"
    fresh = folder / ".embed.qq12ww34.tmp.safetensors"
    keep = [folder / "depth.safetensors", folder / ".hidden"]
    for path in (*stale, fresh, *keep):
        path.write_bytes(b"x")
    stale_dir.mkdir()
    (stale_dir / "a.png").write_bytes(b"x")
    start = time.time()
    for path in (*stale, stale_dir):
        os.utime(path, (start - 60, start - 60))
    removed = worktree.clean_stale_temp(tmp_path, before=start - 1)
    assert sorted(removed) == sorted([*stale, stale_dir])
    assert fresh.exists() and all(p.exists() for p in keep)


def _statuses(manifest: dict) -> dict[str, str]:
    return {name: entry["status"] for name, entry in manifest["stages"].items()}


def test_manifest_records_what_ran_and_reruns_only_what_changed(data, tmp_path, monkeypatch):
    out = tmp_path / "work"
    first = pipeline.run(data, out, TINY, device="cpu")
    assert first == pipeline.read_manifest(out) and first["status"] == "done"
    main = ("scan", "poses", "depth", "masks", "align", "cloud", "embed", "triplets")
    assert [first["stages"][s]["status"] for s in main] == ["done"] * 8
    assert {first["stages"][s]["status"] for s in ("train", "sample", "reconstruct", "evaluate")} == {"not-configured"}
    depth_entry = first["stages"]["depth"]
    assert (
        depth_entry["files_written"] == 4
        and depth_entry["captures"] == 4
        and depth_entry["config"]["model_preset"] == "tiny"
    )
    on_disk = sum((out / c / "depth.safetensors").stat().st_size for c in first["captures"])
    assert depth_entry["bytes_written"] == depth_entry["bytes_total"] == on_disk
    assert first["versions"]["nvf"] and "torch" in first["versions"]["libraries"] and first["dataset"]["captures"] == 4
    stamp = (out / first["captures"][0] / "depth.safetensors").stat().st_mtime_ns
    assert first["stages"]["masks"]["config"]["model_preset"] == "tiny"
    metrics = io.read_json(out / first["captures"][0] / "cloud_metrics.json")  # the tiny masks reached the cloud
    assert metrics["mask"]["kind"] == "masks_record" and metrics["mask"]["path"].endswith("masks.safetensors")

    again = pipeline.run(data, out, TINY, device="cpu")
    assert [again["stages"][s]["status"] for s in main] == ["up-to-date"] * 8
    assert (out / first["captures"][0] / "depth.safetensors").stat().st_mtime_ns == stamp

    changed = dataclasses.replace(TINY, stages={"cloud": {"voxel_pixels": 2.0}})
    third = pipeline.run(data, out, changed, device="cpu")
    assert _statuses(third)["cloud"] == "done" and _statuses(third)["depth"] == "up-to-date"

    real_versions = pipeline.versions()
    monkeypatch.setattr(pipeline, "versions", lambda: {**real_versions, "hash": "another-torch"})
    fourth = pipeline.run(data, out, dataclasses.replace(changed, until="depth"), device="cpu")
    assert _statuses(fourth)["depth"] == "done" and _statuses(fourth)["masks"] == "not-run"
    assert _statuses(fourth)["align"] == "not-run"
    assert fourth["stages"]["align"]["reason"] == "after --until depth"

    unwritten = tuple(dataclasses.replace(s, module="stages.not_written_yet") if s.name == "sample" else s
                      for s in pipeline.STEPS)  # fmt: skip
    monkeypatch.setattr(pipeline, "STEPS", unwritten)
    with_sample = dataclasses.replace(changed, stages={**changed.stages, "sample": {"image": "x.png"}})
    with pytest.raises(StageFailure, match="unavailable: sample"):
        pipeline.run(data, out, with_sample, device="cpu")
    recorded = pipeline.read_manifest(out)
    assert recorded["status"] == "incomplete" and recorded["stages"]["sample"]["status"] == "unavailable"
    assert "stages.not_written_yet does not exist in this install" in recorded["stages"]["sample"]["reason"]
    # the stages --until skipped still carried the old versions: this run redid them
    assert _statuses(recorded)["embed"] == "done" and _statuses(recorded)["depth"] == "up-to-date"
    assert _statuses(recorded)["train"] == "not-configured"


def test_a_failing_stage_is_recorded_with_its_error_line(data, tmp_path):
    bad = dataclasses.replace(TINY, stages={"align": {"reference": "view"}})  # needs --reference-view
    with pytest.raises(InputError, match="reference-view"):
        pipeline.run(data, tmp_path / "w", bad, device="cpu")
    manifest = pipeline.read_manifest(tmp_path / "w")
    assert manifest["status"] == "failed" and manifest["stages"]["align"]["status"] == "failed"
    assert "reference-view" in manifest["stages"]["align"]["error"] and manifest["stages"]["depth"]["status"] == "done"


def _records(work: Path) -> list[Path]:
    return sorted(work.glob("*/depth.safetensors"))


def _nvf(*args: object) -> list[str]:
    return [sys.executable, "-c", "from nvfcli.app import run; run()", *map(str, args)]


def test_kill_9_during_depth_then_rerun_gives_the_uninterrupted_outputs(data, tmp_path):
    # every run in a fresh process: CPU float results depend on torch's thread count, which other
    # tests in this process may have changed
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    options = ["--preset", "tiny", "--device", "cpu", "--batch-size", "1", "--no-cache"]
    root = Path(__file__).resolve().parents[1]
    subprocess.run(_nvf("depth", data, "--out", clean, *options), check=True, capture_output=True, cwd=root)
    process = subprocess.Popen(_nvf("depth", data, "--out", killed, *options), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, cwd=root)  # fmt: skip
    deadline = time.time() + 120
    while not _records(killed) and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    survivors = {p: p.stat().st_mtime_ns for p in _records(killed)}
    assert 1 <= len(survivors) <= 4, process.stderr.read().decode()[-2000:]
    for path in survivors:  # what a killed run left is complete, never half-written
        assert io.load_record(path, kind="depth").tensors["depth"].shape[0] == 13
    # a kill that lands inside a write leaves its temp file; simulate one (older than the rerun)
    orphan = killed / "002_01_01_00" / ".depth.zz99yy88.tmp.safetensors"
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"half a record")
    os.utime(orphan, (time.time() - 30, time.time() - 30))

    config = tmp_path / "run.toml"
    config.write_text("[stages.depth]\nbatch_size = 1\ncache = false\n")
    subprocess.run(_nvf("run", data, killed, "--preset", "tiny", "--poses-from-groundtruth", "--until", "depth",
                        "--device", "cpu", "--config", config), check=True, capture_output=True, cwd=root)  # fmt: skip
    rerun = pipeline.read_manifest(killed)
    assert rerun["stages"]["depth"]["files_written"] == 4 - len(survivors)  # only the unfinished work
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in survivors.items())
    assert [p.relative_to(killed) for p in _records(killed)] == [p.relative_to(clean) for p in _records(clean)]
    for a, b in zip(_records(killed), _records(clean)):
        ra, rb = io.load_record(a), io.load_record(b)
        assert ra.inputs_hash == rb.inputs_hash and ra.names == rb.names
        assert ra.tensors["depth"].tobytes() == rb.tensors["depth"].tobytes(), a
        assert np.array_equal(ra.tensors["image_hw"], rb.tensors["image_hw"])
    assert not [p for p in killed.rglob("*") if worktree.TEMP_NAME.match(p.name)]


def test_every_stage_preset_a_pipeline_preset_picks_exists():
    """A pick the stage does not have is silently dropped (its default runs): catch a misspelling."""
    import importlib

    for preset, picks in pipeline.STAGE_PRESETS.items():
        for stage, name in picks.items():
            try:
                module = importlib.import_module(f"stages.{stage}")
            except ModuleNotFoundError:
                continue
            presets = getattr(module, "PRESETS", None)
            assert presets is None or name in presets, (preset, stage, name)
    assert pipeline.STAGE_PRESETS["tiny"]["align"] == "tukey"  # the tiny model's noise: see STAGE_PRESETS
