"""`nvf evaluate`'s reconstruction section, cloud renders and generated-views sheet."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stages import evaluate, synth
from stages.core import io
from stages.core.errors import InputError
from stages.evaluate import plots as evaluate_plots
from stages.evaluate import recon as evaluate_recon


def test_splat_points_keeps_the_nearest_point_of_each_pixel_and_drops_what_is_behind():
    K = np.array([[10.0, 0, 5], [0, 10.0, 5], [0, 0, 1]])
    R, T = np.eye(3), np.zeros(3)
    points = np.array([[0.0, 0, 2], [0.0, 0, 1], [0.2, 0.2, 1], [0.0, 0, -1]])  # far, near (same pixel), off, behind
    colors = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.5]])
    image = evaluate_plots.splat_points(points, colors, K, R, T, 10, 10, radius=0)
    np.testing.assert_array_equal(image[5, 5], [0, 1, 0])  # (u, v) = (5.5, 5.5): the near point wins
    np.testing.assert_array_equal(image[7, 7], [0, 0, 1])  # 10 * 0.2 / 1 + 5 = 7
    assert (image.reshape(-1, 3) == 1.0).all(axis=1).sum() == 98  # everything else stays white
    wide = evaluate_plots.splat_points(points[:2], colors[:2], K, R, T, 10, 10, radius=1)
    np.testing.assert_array_equal(wide[4:7, 4:7].reshape(-1, 3), np.tile([0.0, 1, 0], (9, 1)))


def test_cloud_renders_show_the_cloud_from_its_capture_cameras(tmp_path):
    data = tmp_path / "data"
    synth.run(data, synth.Config(subjects=1, resolution=64, elevated=False, surface_points=4000))
    [gt] = list((data / "groundtruth").iterdir())
    work = tmp_path / "work" / gt.name
    work.mkdir(parents=True)
    (work / "poses.safetensors").write_bytes((gt / "poses.safetensors").read_bytes())
    surface = io.read_ply(gt / "surface.ply")
    io.write_ply(work / "cloud.ply", surface.points, np.full_like(surface.points, 0.2))
    renders = evaluate_plots.cloud_renders({gt.name: work / "cloud.ply"})
    assert len(renders) == 2 and "(+0°)" in renders[0][1]  # the frontal camera, then the one nearest 60°
    for _, view, image in renders:
        covered = (image < 1.0).any(axis=2).mean()
        assert 0.1 < covered < 0.9, (view, covered)  # the head fills part of the frame, not none or all of it
    path = evaluate_plots.plot_cloud_renders(renders, tmp_path / "renders.png")
    assert path.stat().st_size > 1000


def _recon_metrics(folder, psnr, lpips=None):
    metrics = {"psnr": psnr, "ssim": 0.5} | ({"lpips": lpips} if lpips is not None else {})
    io.write_json(folder / "recon_metrics.json", {"method": "nerfacto", "iterations": 30, "metrics": metrics,
                                                  "views": {"train": ["a"] * 11, "eval": ["b", "c"]}})  # fmt: skip


def test_reconstruction_section_averages_captures_and_report_shows_it_under_the_label(tmp_path):
    for capture, psnr in (("001_01_01_00", 20.0), ("002_01_01_00", 30.0)):
        (tmp_path / "recon" / capture).mkdir(parents=True)
        _recon_metrics(tmp_path / "recon" / capture, psnr)
    cfg = evaluate.Config(label="smoke run: nothing here means anything")
    evaluate.evaluate(evaluate.Inputs(reconstruction=tmp_path / "recon"), tmp_path / "report", cfg, device="cpu")
    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    rows = {(f["section"], f["metric"]): f for f in doc["figures"]}
    assert rows[("reconstruction", "psnr")]["value"] == 25.0 and rows[("reconstruction", "psnr")]["n"] == 4
    assert ("reconstruction", "lpips") not in rows  # not computed: not reported
    md = (tmp_path / "report" / "report.md").read_text()
    assert "**smoke run: nothing here means anything**" in md and "## Reconstruction (held-out views)" in md


def test_a_file_that_is_not_recon_metrics_is_one_clear_error(tmp_path):
    (tmp_path / "recon").mkdir()
    io.write_json(tmp_path / "recon" / "recon_metrics.json", {"psnr": 3})
    with pytest.raises(InputError, match="not an nvf reconstruct recon_metrics.json"):
        evaluate_recon.reconstruction_section({"x": tmp_path / "recon" / "recon_metrics.json"}, evaluate.Figures())
    assert not (tmp_path / "report").exists()
