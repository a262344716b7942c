"""`nvf reconstruct` as a user runs it: a views folder (transforms.json) on CPU, and the error path."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from nvfcli.app import app
from stages import synth
from stages.core import io
from tests.test_reconstruct import seed_alexnet

runner = CliRunner()


def _views_folder(root, resolution=48):
    """A folder as `nvf sample` writes it: images/ + transforms.json (13 ring views of a synthetic head)."""
    render = synth.render_capture(1, 1, 1, 0, synth.Config(resolution=resolution, elevated=False, surface_points=100))
    for name, image in zip(render.names, render.images_nhw3):
        io.write_image(root / "images" / name, image)
    n = len(render.names)
    size = np.full(n, resolution)
    io.write_transforms(root / "transforms.json", io.CameraSet(render.names, render.R, render.T, render.K, size, size))
    return root


def test_reconstruct_views_folder_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    seed_alexnet(tmp_path / "torch")
    views = _views_folder(tmp_path / "views")
    out = tmp_path / "recon"
    result = runner.invoke(app, ["reconstruct", str(views), "--out", str(out), "--preset", "test", "--iterations", "3",
                                 "--export-opacity", "0",
                                 "--ns", "pipeline.model.num_nerf_samples_per_ray=24", "--device", "cpu", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    written = json.loads(result.stdout)
    assert written[0] == str(out / "points.ply") and written[-1] == str(out / "recon_metrics.json")
    report = json.loads((out / "recon_metrics.json").read_text())
    assert report["iterations"] == 3 and report["name"] == "views"
    assert ["pipeline.model.num_nerf_samples_per_ray", "24"] in report["config"]["ns"]
    assert "num_nerf_samples_per_ray: 24" in (out / "nerfacto" / "config.yml").read_text()


def test_reconstruct_errors_are_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    seed_alexnet(tmp_path / "torch")
    result = runner.invoke(app, ["reconstruct", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 2 and "no poses.safetensors and no transforms.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    views = _views_folder(tmp_path / "views", resolution=16)
    result = runner.invoke(
        app, ["reconstruct", str(views), "--out", str(tmp_path / "o"), "--ns", "pipeline.model.nope=1"]
    )
    assert result.exit_code == 2 and "unknown --ns key 'pipeline.model.nope'" in result.stderr
    result = runner.invoke(app, ["reconstruct", str(views), "--out", str(tmp_path / "o"), "--method", "splatfacto",
                                 "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 2 and "splatfacto needs a CUDA GPU" in result.stderr
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    result = runner.invoke(app, ["reconstruct", str(views), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 1 and "alexnet-owt-7be5be79.pth" in result.stderr
    assert not (tmp_path / "o").exists()
