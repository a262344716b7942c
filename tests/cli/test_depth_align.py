"""`nvf depth` and `nvf align` as a user runs them: synth data -> depth -> align, and the error path."""

from __future__ import annotations

import dataclasses
import importlib
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from nvfcli.app import app
from stages import synth
from stages.core import io

runner = CliRunner()


def test_depth_then_align_against_groundtruth(tmp_path):
    data = tmp_path / "data"
    synth.run(data, synth.Config(subjects=1, resolution=32, elevated=False, surface_points=200))
    result = runner.invoke(
        app,
        [
            "depth",
            str(data),
            "--out",
            str(tmp_path / "work"),
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--batch-size",
            "4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    [path] = json.loads(result.stdout)
    record = io.load_record(path, kind="depth")
    assert record["depth"].shape == (13, 32, 32) and record.extra["depth_kind"] == "disparity"
    # rerun: up to date, nothing written
    again = runner.invoke(
        app, ["depth", str(data), "--out", str(tmp_path / "work"), "--preset", "tiny", "--device", "cpu"]
    )
    assert again.exit_code == 0 and again.stdout.strip() == ""
    # the tiny model's random weights predict ~0 almost everywhere: replace its maps with an affine
    # disparity of the ground truth so the alignment has something real to fit
    gt = io.load_record(data / "groundtruth" / record.capture / "depth.safetensors")
    z = gt["depth"].astype(np.float64)
    disparity = np.where(z > 0, 2.0 / np.where(z > 0, z, 1.0) - 0.1, 0.0).astype(np.float32)
    io.save_record(
        path,
        {"depth": disparity, "image_hw": record["image_hw"]},
        kind="depth",
        stage="depth",
        capture=record.capture,
        names=record.names,
        extra={"depth_kind": "disparity"},
    )
    result = runner.invoke(
        app, ["align", str(tmp_path / "work"), "--reference-depth", str(data / "groundtruth"), "--json"]
    )
    assert result.exit_code == 0, result.output
    [aligned_path] = json.loads(result.stdout)
    aligned = io.load_record(aligned_path, kind="aligned")
    np.testing.assert_allclose(aligned["scale"], 0.5, rtol=1e-4)
    np.testing.assert_allclose(aligned["depth"][z > 0], z[z > 0], rtol=1e-4)


def test_align_without_poses_is_one_clear_line(tmp_path):
    work = tmp_path / "work" / "cap"
    io.save_record(
        work / "depth.safetensors",
        {"depth": np.ones((2, 4, 4), np.float32)},
        kind="depth",
        stage="depth",
        capture="cap",
        names=["a.png", "b.png"],
        extra={"depth_kind": "disparity"},
    )
    result = runner.invoke(app, ["align", str(tmp_path / "work")])
    assert result.exit_code == 2
    assert "poses.safetensors: not found" in result.stderr and "nvf poses" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2  # one message (rich may wrap it)


@pytest.mark.parametrize("command", ["depth", "embed"])
def test_preset_names_the_stage_preset_and_options_override_it(tmp_path, monkeypatch, command):
    """`--preset` has one meaning: a stage preset (a whole Config of `PRESETS`); `--model` and the
    other options replace its fields. `nvf depth --preset fast` used to fail ("unknown preset")."""
    module = importlib.import_module(f"stages.{command}")
    seen = []
    monkeypatch.setattr(module, "run", lambda ctx, cfg: seen.append(cfg) or [])
    base = [command, str(tmp_path), "--out", str(tmp_path / "w")]
    assert runner.invoke(app, [*base, "--preset", "fast"]).exit_code == 0
    assert seen[-1] == module.PRESETS["fast"] and seen[-1].precision == "fp16"
    assert runner.invoke(app, [*base, "--preset", "fast", "--precision", "bf16", "--batch-size", "3"]).exit_code == 0
    assert seen[-1] == dataclasses.replace(module.PRESETS["fast"], precision="bf16", batch_size=3)
    assert runner.invoke(app, [*base, "--preset", "tiny"]).exit_code == 0
    assert seen[-1] == module.PRESETS["tiny"] and seen[-1].model_preset == "tiny"
    result = runner.invoke(app, [*base, "--preset", "quick"])
    assert result.exit_code == 2 and "unknown --preset 'quick': choose one of paper, tiny, fast" in result.stderr
    assert len(seen) == 3
    if command == "depth":
        assert (
            module.PRESETS["fast"].model == "depth-anything-v2-small"
            and module.PRESETS["fast"].store_dtype == "float16"
        )
