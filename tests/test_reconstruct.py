"""Stage `reconstruct`: nerfacto on CPU on a small synthetic capture, the frame round trip, and bad input."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stages import reconstruct, synth
from stages.core import geometry, io
from stages.core.errors import InputError, ModelError

CAPTURE = "001_01_01_00"


def seed_alexnet(torch_home: Path) -> Path:
    """A randomly initialised torchvision AlexNet where torchvision looks for the real weights (offline tests)."""
    import torch
    import torchvision

    path = torch_home / "hub" / "checkpoints" / reconstruct.ALEXNET_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def synth_capture(tmp_path_factory):
    """A 13-view 64² synthetic capture and a work folder holding its ground-truth poses as the poses record."""
    root = tmp_path_factory.mktemp("recon")
    data = root / "data"
    synth.run(data, synth.Config(subjects=1, resolution=64, elevated=False, surface_points=5000))
    work = root / "work" / CAPTURE
    work.mkdir(parents=True)
    shutil.copy(data / "groundtruth" / CAPTURE / "poses.safetensors", work / "poses.safetensors")
    return data, work


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    seed_alexnet(home)
    return home


def test_nerfacto_on_cpu_writes_checkpoint_points_in_capture_frame_and_metrics(synth_capture, torch_home, tmp_path):
    data, work = synth_capture
    out = tmp_path / "recon"
    steps: list[tuple[int, int]] = []
    cfg = reconstruct.PRESETS["test"]  # 30 iterations, 256 rays, bounded, compact nerfacto
    written = reconstruct.reconstruct(
        work, out, cfg, data=data, device="cpu", progress=lambda d, t: steps.append((d, t))
    )
    names = [p.name for p in written]
    assert names[0] == "points.ply" and "config.yml" in names and names[-1] == "recon_metrics.json"
    assert any(n.startswith("step-") and n.endswith(".ckpt") for n in names)
    assert steps[-1] == (30, 30) and len(steps) == 30

    report = json.loads((out / "recon_metrics.json").read_text())
    gt_poses = io.load_record(data / "groundtruth" / CAPTURE / "poses.safetensors")
    assert report["views"]["eval"] == [gt_poses.names[3], gt_poses.names[9]]  # eval_every 6: rows 3 and 9
    assert len(report["views"]["train"]) == 11
    assert set(report["per_view"]) == set(report["views"]["eval"])
    metrics = report["metrics"]
    # 30 iterations only: PSNR is low but a real number (the background alone gives > 10 dB)
    assert 10.0 < metrics["psnr"] < 60.0 and 0.0 < metrics["ssim"] <= 1.0 and np.isfinite(metrics["lpips"])
    assert report["seconds_per_iteration"] > 0

    # the frame: nerfstudio's training cameras, mapped back with the dataparser transform, sit exactly
    # on the ground-truth camera centres (a strict check of `to_world`, independent of training quality)
    D, scale = reconstruct.read_dataparser_transform(out / "nerfacto" / "dataparser_transforms.json")
    dataset_cams = io.read_transforms(out / "dataset" / "transforms.json")
    c2w_gl = geometry.opencv_w2c_to_opengl_c2w(dataset_cams.R, dataset_cams.T)
    centres_world = c2w_gl[:, :3, 3]
    centres_ns = scale * (centres_world @ D[:3, :3].T + D[:3, 3])
    assert np.abs(centres_ns).max() <= 1.0 + 1e-6  # auto-scaled into nerfstudio's box
    np.testing.assert_allclose(reconstruct.to_world(centres_ns, D, scale), centres_world, atol=1e-9)
    expected_centres = -np.einsum("nji,nj->ni", gt_poses["R"], gt_poses["T"])
    np.testing.assert_allclose(centres_world, expected_centres, atol=1e-9)

    # the points: in the capture's frame (head centred at the origin, ~2 units tall), not nerfstudio's
    # (scaled by ~0.25 around the focus point). After 30 CPU iterations the bounded nerfacto is still
    # nearly transparent (accumulated opacity ~0.01), so the test preset exports every pixel's
    # weight-normalised expected depth (export_opacity 0): a rough cloud where the density gathers.
    # The checks: its robust centre (median) within 0.6 units of the head centre, and its central
    # 80% overlapping the ground-truth surface's bounding box with an extent of the head's order.
    points = io.read_ply(out / "points.ply").points
    surface = io.read_ply(data / "groundtruth" / CAPTURE / "surface.ply").points
    assert len(points) > 500
    assert np.linalg.norm(np.median(points, axis=0) - surface.mean(axis=0)) < 0.6
    lo, hi = np.quantile(points, [0.1, 0.9], axis=0)
    assert np.all(lo < surface.max(axis=0)) and np.all(hi > surface.min(axis=0))
    assert np.all(hi - lo > 0.3) and np.all(hi - lo < 4.0)  # extent of the order of the head's (~2 units)

    # rerun with the same inputs: up to date, nothing written
    assert reconstruct.reconstruct(work, out, cfg, data=data, device="cpu") == []


def test_split_holds_out_every_kth_view_between_training_views():
    assert reconstruct.split_views(13, 6) == ([0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12], [3, 9])
    assert reconstruct.split_views(4, 2) == ([0, 2], [1, 3])
    with pytest.raises(InputError, match="too few views"):
        reconstruct.split_views(2, 6)  # no view held out
    with pytest.raises(InputError, match="too few views"):
        reconstruct.split_views(2, 2)  # one training view


def test_ns_overrides_parse_by_type_and_reject_unknown_keys():
    cfg = reconstruct.Config(ns=reconstruct.parse_overrides([
        "pipeline.model.num_nerf_samples_per_ray=24", "pipeline.model.disable_scene_contraction=true",
        "pipeline.model.num_proposal_samples_per_ray=[32, 16]", "optimizers.fields.optimizer.lr=0.005",
        "pipeline.model.far_plane=7"]))  # fmt: skip
    config = reconstruct.build_trainer_config(cfg, Path("ds"), Path("out"), "cpu")
    model = config.pipeline.model
    assert model.num_nerf_samples_per_ray == 24 and model.disable_scene_contraction is True
    assert model.num_proposal_samples_per_ray == (32, 16) and model.far_plane == 7.0
    assert config.optimizers["fields"]["optimizer"].lr == 0.005
    assert type(config.pipeline.datamanager).__name__ == "VanillaDataManagerConfig"  # in-process loading
    assert config.vis == "tensorboard" and config.machine.device_type == "cpu" and not config.mixed_precision
    with pytest.raises(InputError, match="num_nerf_samples_per_ray"):  # a near miss is suggested
        reconstruct.validate(reconstruct.Config(ns=(("pipeline.model.num_nerf_sample_per_ray", "8"),)))
    with pytest.raises(InputError, match="bad --ns value"):
        reconstruct.validate(reconstruct.Config(ns=(("pipeline.model.num_nerf_samples_per_ray", "many"),)))
    with pytest.raises(InputError, match="KEY=VALUE"):
        reconstruct.parse_overrides(["pipeline.model.far_plane"])


def test_missing_alexnet_weights_is_a_clear_model_error(tmp_path, monkeypatch, synth_capture):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    data, work = synth_capture
    with pytest.raises(ModelError) as info:
        reconstruct.reconstruct(work, tmp_path / "out", reconstruct.PRESETS["test"], data=data, device="cpu")
    message = str(info.value)
    assert reconstruct.ALEXNET_URL in message and str(tmp_path / "empty" / "hub" / "checkpoints") in message
    assert not (tmp_path / "out").exists()


def test_without_lpips_runs_with_no_alexnet_weights_and_says_so(tmp_path, monkeypatch, synth_capture):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # no weights: lpips = false must not need them
    data, work = synth_capture
    cfg = dataclasses.replace(reconstruct.PRESETS["test"], iterations=5, lpips=False)
    reconstruct.reconstruct(work, tmp_path / "out", cfg, data=data, device="cpu")
    report = json.loads((tmp_path / "out" / "recon_metrics.json").read_text())
    assert set(report["metrics"]) == {"psnr", "ssim"} and 5.0 < report["metrics"]["psnr"] < 60.0
    assert "LPIPS not computed" in report["metrics_source"] and report["lpips_weights"] is None
    assert not (tmp_path / "empty").exists()  # nothing fetched or cached


def test_splatfacto_on_cpu_says_it_needs_cuda(torch_home, synth_capture, tmp_path):
    data, work = synth_capture
    with pytest.raises(InputError, match="splatfacto needs a CUDA GPU"):
        reconstruct.reconstruct(
            work, tmp_path / "out", reconstruct.Config(method="splatfacto"), data=data, device="cpu"
        )


def test_bad_inputs_fail_with_one_clear_message(torch_home, synth_capture, tmp_path):
    data, work = synth_capture
    cfg = reconstruct.PRESETS["test"]
    with pytest.raises(InputError, match="no poses.safetensors and no transforms.json"):
        reconstruct.reconstruct(tmp_path, tmp_path / "out", cfg, device="cpu")
    with pytest.raises(InputError, match="pass --data DATA"):
        reconstruct.reconstruct(work, tmp_path / "out", cfg, device="cpu")  # no --data, no exported transforms.json
    other = tmp_path / "other"
    synth.run(other, synth.Config(subjects=1, resolution=16, elevated=False, surface_points=100))
    renamed = other / "renamed"
    shutil.move(other / "session01", renamed)  # same capture id, but one image is missing
    next(renamed.rglob("*_051_00.png")).unlink()
    with pytest.raises(InputError, match="1 of 13 posed views have no image"):
        reconstruct.reconstruct(work, tmp_path / "out", cfg, data=other, device="cpu")
    with pytest.raises(InputError, match="depth-nerfacto needs aligned depth"):
        reconstruct.reconstruct(
            work, tmp_path / "out", reconstruct.Config(method="depth-nerfacto"), data=data, device="cpu"
        )
    assert not (tmp_path / "out").exists()


def test_views_folder_dataset_has_split_identity_transform_and_depth_in_nerfstudio_units(synth_capture, tmp_path):
    data, _ = synth_capture
    render = synth.render_capture(1, 1, 1, 0, synth.Config(resolution=32, elevated=False, surface_points=100))
    views = tmp_path / "views"
    for name, image in zip(render.names, render.images_nhw3):
        io.write_image(views / "images" / name, image)
    n = len(render.names)
    cameras = io.CameraSet(render.names, render.R, render.T, render.K, np.full(n, 32), np.full(n, 32))
    io.write_transforms(views / "transforms.json", cameras)
    loaded = reconstruct.load_views(views)
    assert loaded.name == "views" and loaded.cameras.names == render.names
    np.testing.assert_allclose(loaded.cameras.R, render.R, atol=1e-12)

    with_depth = reconstruct.ViewSet("views", loaded.cameras, loaded.image_paths, depth_nhw=render.depth_nhw)
    split = reconstruct.write_dataset(tmp_path / "dataset", with_depth, reconstruct.Config(method="depth-nerfacto"))
    doc = json.loads((tmp_path / "dataset" / "transforms.json").read_text())
    assert doc["applied_transform"] == np.eye(4)[:3].tolist()
    assert doc["val_filenames"] == [f"images/{render.names[3]}", f"images/{render.names[9]}"] == doc["test_filenames"]
    assert len(doc["train_filenames"]) == 11 and split["eval"] == [render.names[3], render.names[9]]
    # nerfstudio's own depth reader gives back z-depth (times its scale factor, here 1)
    from nerfstudio.data.utils.data_utils import get_depth_image_from_path

    frame = doc["frames"][5]
    depth = get_depth_image_from_path(tmp_path / "dataset" / frame["depth_file_path"], 32, 32, split["depth_unit"])
    np.testing.assert_allclose(depth[..., 0].numpy(), render.depth_nhw[5], atol=split["depth_unit"])


def test_to_world_inverts_the_dataparser_transform():
    rng = np.random.default_rng(0)
    R = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    D = np.eye(4)
    D[:3, :3], D[:3, 3] = R, [0.2, -1.0, 3.0]
    world = rng.normal(size=(50, 3))
    ns = 0.25 * (world @ R.T + D[:3, 3])
    np.testing.assert_allclose(reconstruct.to_world(ns, D, 0.25), world, atol=1e-12)
