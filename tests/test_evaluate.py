"""Stage `evaluate`: known answers for poses and depth, and the full report on a synthetic capture."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from stages import evaluate, synth
from stages.core import geometry, io
from stages.core.errors import InputError


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.standard_normal(4)
    return geometry.quat_to_rotmat(q / np.linalg.norm(q))


def _rot_z(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    synth.run(root, synth.Config(subjects=1, resolution=40, elevated=False, surface_points=1500))
    return root


@pytest.fixture(scope="module")
def gt(data):
    [folder] = list((data / "groundtruth").iterdir())
    return folder


def _pose_set(names, R, T, source=None) -> evaluate.PoseSet:
    return evaluate.PoseSet(list(names), R, T, source or ["sfm"] * len(names), "test")


def test_poses_under_random_similarity_have_zero_error(gt):
    ref = evaluate.read_pose_set(gt / "poses.safetensors")
    rng = np.random.default_rng(3)
    s, Rw, tw = 0.37, _random_rotation(rng), rng.standard_normal(3)
    # world change X' = s Rw X + tw: cameras become R' = R Rw^T, T' = s T - R' tw
    R_est = ref.R @ Rw.T
    result = evaluate.evaluate_poses(_pose_set(ref.names, R_est, s * ref.T - R_est @ tw), ref, evaluate.Config())
    assert result.summary["rotation_error_deg"]["max"] < 1e-6
    assert result.summary["center_error_rel"]["max"] < 1e-9
    assert result.scale == pytest.approx(1 / s)
    assert result.summary["fraction_registered"] == 1.0


def test_perturbed_groundtruth_gives_known_errors_split_by_source(gt):
    ref = evaluate.read_pose_set(gt / "poses.safetensors")
    n = len(ref.names)
    angles = np.linspace(0.5, 3.0, n)  # roll about each optical axis: centres stay, rotation error = angle
    R_est = np.stack([_rot_z(a) @ R for a, R in zip(angles, ref.R, strict=True)])
    T_est = -np.einsum("nij,nj->ni", R_est, geometry.camera_centers(ref.R, ref.T))
    source = ["interp" if i in (2, 7) else "sfm" for i in range(n)]
    result = evaluate.evaluate_poses(_pose_set(ref.names, R_est, T_est, source), ref, evaluate.Config())
    errors = [v["rotation_error_deg"] for v in result.per_view]
    assert np.allclose(errors, angles, atol=1e-6)
    assert max(v["center_error"] for v in result.per_view) < 1e-9
    assert result.summary["fraction_registered"] == pytest.approx((n - 2) / n)
    interp = result.summary["by_source"]["interp"]["rotation_error_deg"]
    assert interp["n"] == 2 and interp["mean"] == pytest.approx((angles[2] + angles[7]) / 2)


def test_missing_views_count_as_unregistered_and_centre_error_is_relative(gt):
    ref = evaluate.read_pose_set(gt / "poses.safetensors")
    keep = slice(0, 9)
    C = geometry.camera_centers(ref.R, ref.T)[keep] + np.array([0.1, 0.0, 0.0]) * (np.arange(9)[:, None] % 2)
    T = -np.einsum("nij,nj->ni", ref.R[keep], C)
    result = evaluate.evaluate_poses(_pose_set(ref.names[keep], ref.R[keep], T), ref, evaluate.Config())
    assert result.summary["fraction_registered"] == pytest.approx(9 / 13)
    row = result.per_view[0]
    assert row["center_error_rel"] == pytest.approx(row["center_error"] / result.summary["rig_radius"])
    assert result.summary["rig_radius"] > 1.0


def test_depth_scaled_groundtruth_is_exact_after_scale_alignment(gt):
    z = io.load_record(gt / "depth.safetensors")["depth"][6].astype(np.float64)
    for mode in ("scale", "median", "scale_shift"):
        errs = evaluate.depth_errors(evaluate.align_depth(2.5 * z, z, mode), z)
        assert errs["abs_rel"] < 1e-12 and errs["rmse"] < 1e-12 and errs["delta1"] == 1.0, mode
    raw = evaluate.depth_errors(evaluate.align_depth(2.5 * z, z, "none"), z)
    assert raw["abs_rel"] == pytest.approx(1.5) and raw["delta3"] == 0.0
    disparity = np.where(z > 0, 3.0 / np.where(z > 0, z, 1) + 0.2, 0.0)  # affine in inverse depth
    errs = evaluate.depth_errors(evaluate.align_depth(disparity, z, "scale_shift", "disparity"), z)
    assert errs["abs_rel"] < 1e-9 and errs["n"] == int((z > 0).sum())


def test_depth_errors_known_values():
    ref = np.array([[1.0, 2.0], [4.0, 0.0]])
    est = np.array([[1.1, 2.0], [2.4, 5.0]])  # last pixel invalid in the reference
    errs = evaluate.depth_errors(est, ref)
    assert errs["n"] == 3
    assert errs["abs_rel"] == pytest.approx((0.1 + 0 + 0.4) / 3)
    assert errs["rmse"] == pytest.approx(np.sqrt((0.01 + 0 + 1.6**2) / 3))
    # ratio 4 / 2.4 = 1.667: above 1.25 and 1.25² = 1.5625, below 1.25³ = 1.953
    assert errs["delta1"] == pytest.approx(2 / 3) and errs["delta2"] == pytest.approx(2 / 3) and errs["delta3"] == 1.0


def _write_views(data, gt, out, shift_every=2):
    """Generated views = GT images, every `shift_every`-th shifted by 3 px (so they score worse)."""
    ref = io.load_record(gt / "poses.safetensors")
    images = {p.name: p for p in data.rglob("*.png")}
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(ref.names):
        image = io.read_image(images[name])
        io.write_image(out / name, np.roll(image, 3, axis=1) if i % shift_every == 0 else image)
    return ref.names


def test_run_writes_report_with_figures(data, gt, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached AlexNet: LPIPS takes the skip path
    ref = io.load_record(gt / "poses.safetensors")
    R_est = np.stack([_rot_z(1.0) @ R for R in ref["R"]])
    T_est = -np.einsum("nij,nj->ni", R_est, geometry.camera_centers(ref["R"], ref["T"]))
    work = tmp_path / "work" / ref.capture
    io.save_record(work / "poses.safetensors", {"R": R_est, "T": T_est, "K": ref["K"], "width": ref["width"],
                   "height": ref["height"], "source": np.zeros(len(ref), np.int8)}, kind="poses", stage="poses",
                   capture=ref.capture, names=ref.names)  # fmt: skip
    depth = io.load_record(gt / "depth.safetensors")
    io.save_record(work / "depth.safetensors", {"depth": 2.0 * depth["depth"]}, kind="depth", stage="depth",
                   capture=ref.capture, names=depth.names, extra={"depth_kind": "depth"})  # fmt: skip
    surface = io.read_ply(gt / "surface.ply").points
    io.write_ply(work / "cloud.ply", surface[::2])
    names = _write_views(data, gt, tmp_path / "views")
    inputs = evaluate.Inputs(poses=tmp_path / "work", poses_ref=data / "groundtruth", depth=tmp_path / "work",
                             depth_ref=data / "groundtruth", cloud=tmp_path / "work", cloud_ref=data / "groundtruth",
                             views=tmp_path / "views", views_ref=data,
                             input_image=next(data.rglob("*051_00.png")))  # fmt: skip
    cfg = evaluate.PRESETS["tiny"]
    written = evaluate.evaluate(inputs, tmp_path / "report", cfg, device="cpu")
    report = tmp_path / "report"
    assert {p.name for p in written} == {"report.md", "metrics.json", "poses_top.png", "depth.png", "contact_sheet.png",
                                         "cloud_renders.png", "generated_views.png"}  # fmt: skip
    for png in (report / "figures").glob("*.png"):
        with Image.open(png) as image:
            image.verify()
    doc = json.loads((report / "metrics.json").read_text())
    fig = {(f["section"], f["metric"], f["bucket"]): f for f in doc["figures"]}
    assert fig[("poses", "rotation_error_deg", "all")]["value"] == pytest.approx(1.0, abs=1e-6)
    assert fig[("poses", "fraction_registered", "all")]["value"] == 1.0
    assert fig[("depth", "abs_rel", "all")]["value"] < 1e-6
    assert fig[("depth", "abs_rel", "all")]["protocol"]["alignment"] == "median"
    assert fig[("clouds", "chamfer", "all")]["value"] < 0.05  # half the surface vs all of it, no alignment error
    assert fig[("clouds", "precision", "all")]["value"] == 1.0  # every cloud point lies on the surface
    assert fig[("clouds", "chamfer_accuracy", "all")]["value"] < 1e-9
    # views: odd rows identical (PSNR inf, SSIM 1, CLIP to-GT 1), even rows shifted
    rows = {r["name"]: r for r in doc["views"]["per_view"]}
    assert rows[names[1]]["psnr"] is None and rows[names[1]]["ssim"] == pytest.approx(1.0)
    assert rows[names[1]]["clip_to_gt"] == pytest.approx(1.0, abs=1e-5)
    assert rows[names[0]]["psnr"] < 40 and rows[names[0]]["ssim"] < 0.99
    assert "clip_i2o" in rows[names[0]] and "clip_o2o" in doc["views"]["identity"]
    assert rows[names[0]]["bucket"] == "frontal" and rows[names[0]]["azimuth_deg"] == -90.0
    psnr_all = fig[("views", "psnr", "all")]
    assert "+inf left out" in psnr_all["note"] and psnr_all["protocol"]["masked"] is False
    assert psnr_all["protocol"]["identity_model"] == "tiny (random weights)"
    skipped = {s["metric"]: s["reason"] for s in doc["skipped"]}
    assert "alexnet-owt-7be5be79.pth" in skipped["lpips"] and "fid" in skipped and "arcface" in skipped
    md = (report / "report.md").read_text()
    assert "| rotation_error_deg | all |" in md and "figures/contact_sheet.png" in md and "## Skipped" in md
    assert "figures/cloud_renders.png" in md and "figures/generated_views.png" in md
    # unchanged inputs: up to date, nothing written
    assert evaluate.evaluate(inputs, report, cfg, device="cpu") == []


def test_compare_puts_two_runs_side_by_side(data, gt, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _write_views(data, gt, tmp_path / "a", shift_every=2)
    _write_views(data, gt, tmp_path / "b", shift_every=1)
    cfg = evaluate.Config(identity="off", resolution=None, lpips="off", arcface="off")
    evaluate.evaluate(evaluate.Inputs(views=tmp_path / "a", views_ref=data), tmp_path / "ra", cfg, device="cpu")
    evaluate.evaluate(evaluate.Inputs(views=tmp_path / "b", views_ref=data, compare=tmp_path / "ra"), tmp_path / "rb", cfg,
                 device="cpu")  # fmt: skip
    doc = json.loads((tmp_path / "rb" / "metrics.json").read_text())
    row = next(r for r in doc["compare"]["rows"] if r["metric"] == "ssim" and r["bucket"] == "all")
    assert row["delta"] < 0 and row["same_protocol"]  # every view shifted: worse than half shifted
    assert "## Comparison with" in (tmp_path / "rb" / "report.md").read_text()


def test_pairing_by_pose_finds_the_nearest_reference_camera(gt):
    ref = evaluate.read_pose_set(gt / "poses.safetensors")
    order = [5, 0, 12, 7]
    rng = np.random.default_rng(0)
    s, Rw, tw = 2.0, _random_rotation(rng), rng.standard_normal(3)
    R_gen = ref.R[order] @ Rw.T
    gen = _pose_set([f"view_{i}.png" for i in range(4)], R_gen, s * ref.T[order] - R_gen @ tw)
    pairs = evaluate.pair_views_by_pose(gen, ref)
    assert [r for _, r, _ in pairs] == [ref.names[i] for i in order]
    assert max(c for _, _, c in pairs) < 1e-6


def test_colmap_and_transforms_sources_read_back(gt, tmp_path):
    rec = io.load_record(gt / "poses.safetensors")
    cams = io.CameraSet(rec.names, rec["R"], rec["T"], rec["K"], rec["width"], rec["height"])
    io.write_colmap_text(tmp_path / "colmap", cams)
    io.write_transforms(tmp_path / "transforms.json", cams)
    ref = evaluate.read_pose_set(gt / "poses.safetensors")
    for path in (tmp_path / "colmap", tmp_path / "transforms.json"):
        est = evaluate.read_pose_set(path)
        result = evaluate.evaluate_poses(est, ref, evaluate.Config())
        assert result.summary["n_paired"] == 13 and result.summary["rotation_error_deg"]["max"] < 1e-6, path


def test_half_a_pair_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="give both"):
        evaluate.evaluate(evaluate.Inputs(poses=tmp_path), tmp_path / "r")
    with pytest.raises(InputError, match="nothing to evaluate"):
        evaluate.evaluate(evaluate.Inputs(), tmp_path / "r")


def test_json_has_no_infinity():
    assert evaluate._finite_json({"a": [math.inf, 1.0, math.nan]}) == {"a": [None, 1.0, None]}


def test_pairing_by_pose_leaves_the_input_photo_of_a_sample_folder_out(data, gt, tmp_path):
    """An `nvf sample` folder holds the input photo as views/000.png: paired by pose it would meet its
    own ground truth (PSNR +inf, SSIM 1) and lift the means. It is reported apart, not scored."""
    ref = io.load_record(gt / "poses.safetensors")
    images = {p.name: p for p in data.rglob("*.png")}
    rows = [6, 2, 4, 8, 10]  # frame 0 = the input (frontal camera 051), then four targets
    folder = tmp_path / "sampled"
    for frame, row in enumerate(rows):
        image = io.read_image(images[ref.names[row]])
        io.write_image(folder / "views" / f"{frame:03d}.png", image if frame == 0 else np.roll(image, 3, axis=1))
    names = [f"{frame:03d}.png" for frame in range(len(rows))]
    cameras = io.CameraSet(names, ref["R"][rows], ref["T"][rows], ref["K"][rows], ref["width"][rows],
                           ref["height"][rows])  # fmt: skip
    io.write_transforms(folder / "transforms.json", cameras, image_dir="views")
    io.write_json(folder / "sample.json", {"frames": [{"file": f"views/{n}", "generated": i > 0}
                                                      for i, n in enumerate(names)]})  # fmt: skip
    cfg = evaluate.Config(identity="off", resolution=None, lpips="off", arcface="off", pairing="pose")
    inputs = evaluate.Inputs(views=folder, views_ref=data, views_ref_poses=gt / "poses.safetensors")
    evaluate.evaluate(inputs, tmp_path / "report", cfg, device="cpu")
    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    scored = {r["name"]: r["reference"] for r in doc["views"]["per_view"]}
    assert scored == {names[i]: ref.names[rows[i]] for i in range(1, len(rows))}  # 000.png is not scored
    assert doc["views"]["inputs_excluded"] == ["000.png"]
    psnr = next(f for f in doc["figures"] if f["metric"] == "psnr" and f["bucket"] == "all")
    assert psnr["n"] == 4 and psnr["value"] < 40 and not psnr.get("note")  # no +inf from the input photo
