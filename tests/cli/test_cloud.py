"""`nvf cloud` as a user runs it: on ground truth, the whole chain from synth, and bad input as one line."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from nvfcli.app import app
from stages import synth
from stages.core import dataset, io
from tests.helpers import groundtruth_work

runner = CliRunner()
CAPTURE = dataset.capture_id(1, 1, 1, 0)


def _one_line_error(result, code, fragment):
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:") and fragment in result.stderr
    assert len(lines) <= 3  # one message (rich may wrap it)


def test_cloud_command_on_groundtruth_with_reference(tmp_path):
    data = tmp_path / "data"
    synth.run(data, synth.Config(subjects=1, resolution=64, elevated=False, surface_points=20_000))
    work = groundtruth_work(data, tmp_path / "work")
    args = ["cloud", str(work), "--data", str(data), "--reference", str(data / "groundtruth"), "--consistency", "1",
            "--voxel", "1.5", "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    ply, report_path = json.loads(result.stdout)
    report = io.read_json(report_path)
    assert report["config"]["consistency"] and report["config"]["voxel_pixels"] == 1.5
    assert report["reference"]["fscore_threshold"] == report["reference"]["reference_size"] * 0.01
    assert report["reference"]["chamfer"] < 0.02 * report["reference"]["reference_size"]
    assert len(io.read_ply(ply).points) == report["points"]["kept"]
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and json.loads(again.stdout) == []
    empty = runner.invoke(app, ["cloud", str(work), "--data", str(data), "--depth-range", "50,60"])
    _one_line_error(empty, 1, "the foreground filter left no point")
    _one_line_error(runner.invoke(app, ["cloud", str(tmp_path / "nowhere")]), 2, "no such work folder")
    bad = runner.invoke(app, ["cloud", str(work), "--depth-range", "near,far"])
    assert bad.exit_code == 2 and "MIN,MAX" in bad.output


def test_chain_synth_poses_depth_align_cloud(tmp_path):
    """The whole chain from the command line on a 128 px capture: synth -> poses -> depth (tiny) -> align -> cloud."""
    data, work = tmp_path / "data", tmp_path / "work"
    cfg = dataclasses.replace(synth.PRESETS["tiny"], resolution=128)
    result = runner.invoke(app, ["synth", str(data), "--preset", "tiny", "--resolution", "128"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["poses", str(data), "--out", str(work), "--colmap", "mapping.mapper.init_min_tri_angle=4"]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["depth", str(data), "--out", str(work), "--preset", "tiny", "--device", "cpu", "--json"]
    )
    assert result.exit_code == 0, result.output
    [depth_path] = json.loads(result.stdout)
    # the tiny model's random weights predict ~0 everywhere: give align something real to fit, an
    # affine disparity of the ground truth (the chain and its formats are what this test checks)
    record = io.load_record(depth_path, kind="depth")
    z = io.load_record(synth.groundtruth_dir(data, CAPTURE) / "depth.safetensors")["depth"].astype(np.float64)
    disparity = np.where(z > 0, 2.0 / np.where(z > 0, z, 1.0) - 0.1, 0.0).astype(np.float32)
    io.save_record(depth_path, {"depth": disparity, "image_hw": record["image_hw"]}, kind="depth", stage="depth",
                   capture=record.capture, names=record.names, extra={"depth_kind": "disparity"})  # fmt: skip
    result = runner.invoke(app, ["align", str(work)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["cloud", str(work), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    ply, report_path = json.loads(result.stdout)
    report = io.read_json(report_path)
    cloud = io.read_ply(ply)
    assert report["points"]["kept"] == len(cloud.points) > 1000 and cloud.colors is not None
    assert cfg.resolution == 128 and report["points"]["valid_pixels"] > 0.2 * 13 * 128 * 128
    # SfM poses aligned depth to sparse points: the views agree where they overlap
    assert report["scene"]["depth_consistency_relative"] < 0.05


def test_a_gpu_asked_for_where_none_is_visible_is_one_line_and_writes_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    data = tmp_path / "data"
    synth.run(data, synth.Config(subjects=1, resolution=32, elevated=False, surface_points=500))
    work = groundtruth_work(data, tmp_path / "work")
    _one_line_error(runner.invoke(app, ["cloud", str(work), "--device", "cuda"]), 2, "--device cpu")
    assert not list(work.rglob("cloud*"))
