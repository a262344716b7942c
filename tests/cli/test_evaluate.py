"""`nvf evaluate` as a user runs it: synth ground truth vs itself, --compare, and the error path."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from nvfcli.app import app
from stages import synth
from stages.core import io

runner = CliRunner()


def test_evaluate_poses_and_views_then_compare(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = tmp_path / "data"
    synth.run(data, synth.Config(subjects=1, resolution=32, elevated=False, surface_points=200))
    views = tmp_path / "views"
    for path in data.rglob("*.png"):
        io.write_image(views / path.name, np.roll(io.read_image(path), 2, axis=0))
    common = ["--views", str(views), "--views-ref", str(data), "--lpips", "off", "--resolution", "0"]
    first = runner.invoke(app, ["evaluate", "--out", str(tmp_path / "r1"), "--poses", str(data / "groundtruth"),
                                "--poses-ref", str(data / "groundtruth"), "--preset", "tiny", "--device", "cpu",
                                "--json", *common])  # fmt: skip
    assert first.exit_code == 0, first.output
    written = json.loads(first.stdout)
    assert any(p.endswith("poses_top.png") for p in written) and written[0].endswith("report.md")
    doc = json.loads((tmp_path / "r1" / "metrics.json").read_text())
    fig = {(f["section"], f["metric"], f["bucket"]): f["value"] for f in doc["figures"]}
    assert fig[("poses", "rotation_error_deg", "all")] < 1e-6
    assert fig[("views", "ssim", "all")] < 0.99  # shifted views
    second = runner.invoke(app, ["evaluate", "--out", str(tmp_path / "r2"), "--preset", "tiny", "--device", "cpu",
                                 "--compare", str(tmp_path / "r1"), *common])  # fmt: skip
    assert second.exit_code == 0, second.output
    assert "## Comparison with" in (tmp_path / "r2" / "report.md").read_text()


def test_missing_reference_is_one_line_and_exit_2(tmp_path):
    result = runner.invoke(app, ["evaluate", "--out", str(tmp_path / "r"), "--poses", str(tmp_path)])
    assert result.exit_code == 2
    assert "give both the estimate and its reference" in result.stderr
