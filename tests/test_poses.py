"""Stage `poses`: SfM on synthetic rings (with ground truth) and kermit, fallback, records, bad input.

The SfM runs are the heavy part: each synthetic capture is reconstructed once per module.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from stages import poses, synth
from stages.core import dataset, geometry, io, worktree
from stages.core.contract import Context
from stages.core.errors import InputError
from stages.poses import sift_matching
from tests.helpers import write_tiny_png

RADIUS = synth.Config().radius


def _synth(root: Path, **changes) -> tuple[Path, str]:
    cfg = dataclasses.replace(synth.PRESETS["default"], subjects=1, elevated=False, surface_points=2000, **changes)
    synth.run(root, cfg)
    return root, dataset.capture_id(1, 1, 1, 0)


def _ground_truth(data: Path, capture: str, names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    gt = io.load_record(synth.groundtruth_dir(data, capture) / "poses.safetensors", kind="poses")
    rows = [gt.names.index(name) for name in names]
    return gt["R"][rows], gt["T"][rows], gt["K"][rows]


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    """A 512 px ring posed with the default (uncalibrated) config, exported both ways.

    512 px because ring poses are noise-limited at 256 px: Gaussian 0.2 px noise on the same
    tracks already costs ~0.12° (simulated), and the free focal length settles 3-5% low there.
    """
    data, capture = _synth(tmp_path_factory.mktemp("ring-data"), resolution=512)
    cfg = poses.Config(export=("transforms", "colmap"))
    work = tmp_path_factory.mktemp("ring-work")
    written = poses.run(Context(work, data=data), cfg)
    return data, work, capture, cfg, written


@pytest.fixture(scope="module")
def textureless(tmp_path_factory):
    """A 192 px ring whose cameras 130, 050 and 200 see no texture (default config)."""
    data, capture = _synth(
        tmp_path_factory.mktemp("tl-data"), resolution=192, textureless_cameras=("130", "050", "200")
    )
    work = tmp_path_factory.mktemp("tl-work")
    poses.run(Context(work, data=data), poses.Config())
    return data, work, capture


# -- SfM on synthetic rings ------------------------------------------------------------------------


def test_ring_registers_every_view_accurately(ring):
    data, work, capture, _cfg, written = ring
    assert [p.name for p in written] == ["sparse.safetensors", "transforms.json", "colmap", "poses.safetensors"]
    record = poses.load_poses(work, capture)
    assert len(record) == 13 and np.all(record["source"] == poses.SOURCES["sfm"])
    R_gt, T_gt, K_gt = _ground_truth(data, capture, record.names)
    aligned = geometry.similarity_align_poses(record["R"], record["T"], R_gt, T_gt)
    # measured on subjects 1-3: max 0.10-0.16° and 0.09-0.17% of the radius, focal within 1.4%
    assert aligned.rotation_error_deg.max() < 0.2
    assert aligned.center_error.max() < 0.005 * RADIUS
    np.testing.assert_allclose(record["K"][:, 0, 0], K_gt[:, 0, 0], rtol=0.02)
    assert np.all(record["reproj_error"] < 1.0) and np.all(record["confidence"] > 0.3)
    assert json.loads(record.extra["camera_ids"]) == list(dataset.RING_CAMERAS)
    assert json.loads(record.extra["sources"]) == poses.SOURCES
    assert record.extra["unregistered"] == "[]"
    # later stages find the images from the record, without --data
    recorded = worktree.recorded_image_paths(worktree.record_path(work, capture, "poses"))
    assert list(recorded) == record.names and all(p.is_absolute() and p.is_file() for p in recorded.values())


def test_ring_sparse_points_reproject_onto_their_tracks(ring):
    _data, work, capture, _cfg, _written = ring
    record = poses.load_poses(work, capture)
    sparse = io.load_record(worktree.record_path(work, capture, "sparse"), kind="sparse", capture=capture)
    assert sparse.names == record.names and len(sparse["points"]) > 200
    offsets, rows, uv = sparse["track_offsets"], sparse["track_images"], sparse["track_uv"]
    assert offsets[0] == 0 and offsets[-1] == len(rows) and np.all(np.diff(offsets) >= 2)
    errors = []
    for p in range(0, len(sparse["points"]), 7):
        for m in range(offsets[p], offsets[p + 1]):
            i = rows[m]
            projected, z = geometry.project(sparse["points"][p : p + 1], record["K"][i], record["R"][i], record["T"][i])
            assert z[0] > 0
            errors.append(np.linalg.norm(projected[0] - uv[m]))
    assert np.median(errors) < 0.5 and np.max(errors) < 1.5  # tracks filtered at 1 px after the last BA


def test_ring_transforms_load_in_nerfstudio(ring):
    pytest.importorskip("nerfstudio")
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    _data, work, capture, _cfg, _written = ring
    folder = worktree.capture_dir(work, capture)
    doc = json.loads((folder / "transforms.json").read_text())
    assert {f["nvf_source"] for f in doc["frames"]} == {"sfm"}
    parser = NerfstudioDataParserConfig(data=folder, eval_mode="all", auto_scale_poses=False,
                                        center_method="none", orientation_method="none").setup()  # fmt: skip
    outputs = parser.get_dataparser_outputs(split="train")
    assert len(outputs.image_filenames) == 13 and all(Path(p).is_file() for p in outputs.image_filenames)
    record = poses.load_poses(work, capture)
    order = [record.names.index(Path(p).name) for p in outputs.image_filenames]
    c2w = geometry.opencv_w2c_to_opengl_c2w(record["R"], record["T"])[order, :3, :]
    np.testing.assert_allclose(outputs.cameras.camera_to_worlds.numpy(), c2w, atol=1e-4)
    # SfM's SIMPLE_RADIAL k goes along as OpenCV k1 (the images are not undistorted)
    k = json.loads(record.extra["colmap_cameras"])[record.names[0]]["params"][3]
    assert k != 0 and doc["camera_model"] == "OPENCV" and doc["k1"] == k
    np.testing.assert_allclose(outputs.cameras.distortion_params.numpy()[:, 0], k, rtol=1e-6)
    np.testing.assert_array_equal(io.record_distortion(record)[:, 0], k)
    from stages import reconstruct

    views = reconstruct._capture_views(folder, _data, "nerfacto")  # what `nvf reconstruct` trains on
    np.testing.assert_array_equal(views.cameras.distortion, io.record_distortion(record))


def test_ring_colmap_export_loads_in_pycolmap(ring):
    import pycolmap

    _data, work, capture, _cfg, _written = ring
    record = poses.load_poses(work, capture)
    reconstruction = pycolmap.Reconstruction(str(worktree.capture_dir(work, capture) / "colmap"))
    assert reconstruction.num_images() == 13 and reconstruction.num_points3D() > 200
    # the tracks come along, with SfM's own camera model (distortion included): they reproject
    sparse = io.load_record(worktree.record_path(work, capture, "sparse"), kind="sparse")
    assert reconstruction.compute_num_observations() == len(sparse["track_images"])
    residuals = [np.linalg.norm(image.project_point(point.xyz) - image.points2D[e.point2D_idx].xy)
                 for point in reconstruction.points3D.values() for e in point.track.elements
                 for image in [reconstruction.images[e.image_id]]]  # fmt: skip
    assert np.median(residuals) < 0.5 and np.max(residuals) < 1.5  # pixels; tracks were filtered at 1 px
    assert 0 < reconstruction.compute_mean_reprojection_error() < 0.5  # SfM's own per-point errors
    assert {camera.model.name for camera in reconstruction.cameras.values()} == {"SIMPLE_RADIAL"}
    for image in reconstruction.images.values():
        i = record.names.index(image.name)
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        np.testing.assert_allclose(pose.matrix()[:, :3], record["R"][i], atol=1e-9)


def test_ring_resume_skips_then_overwrite_redoes(ring):
    data, work, capture, cfg, _written = ring
    before = worktree.record_path(work, capture, "poses").stat().st_mtime_ns
    assert poses.run(Context(work, data=data), cfg) == []
    assert worktree.record_path(work, capture, "poses").stat().st_mtime_ns == before
    # a changed config is a different input hash: the capture is redone (no export asked: 2 files)
    changed = dataclasses.replace(cfg, export=(), mapper="incremental", min_inliers=16)
    assert [p.name for p in poses.run(Context(work, data=data), changed)] == ["sparse.safetensors", "poses.safetensors"]


def test_uncalibrated_low_contrast_ring_registers_with_the_face_defaults(tmp_path):
    data, capture = _synth(tmp_path / "low", resolution=192, texture_contrast=0.15)
    poses.run(Context(tmp_path / "work", data=data), poses.Config())
    record = poses.load_poses(tmp_path / "work", capture)
    assert np.all(record["source"] == poses.SOURCES["sfm"])
    R_gt, T_gt, _ = _ground_truth(data, capture, record.names)
    aligned = geometry.similarity_align_poses(record["R"], record["T"], R_gt, T_gt)
    assert aligned.rotation_error_deg.max() < 5.0  # focal length is free here: ~1-3° (see report)
    # COLMAP's own SIFT settings register only part of this ring (or nothing)
    try:
        poses.run(Context(tmp_path / "colmap", data=data), poses.PRESETS["colmap"])
        by_sfm = int((poses.load_poses(tmp_path / "colmap", capture)["source"] == poses.SOURCES["sfm"]).sum())
    except InputError as exc:
        assert capture in str(exc)
        by_sfm = 0
    assert by_sfm < 13


# -- fallback --------------------------------------------------------------------------------------


def test_textureless_views_are_interpolated_within_3_degrees(textureless):
    data, work, capture = textureless
    record = poses.load_poses(work, capture)
    cams = json.loads(record.extra["camera_ids"])
    interp = [cams.index(c) for c in ("130", "050", "200")]
    assert [int(s) for s in record["source"][interp]] == [poses.SOURCES["interp"]] * 3
    assert int((record["source"] == poses.SOURCES["sfm"]).sum()) == 10
    assert np.all(np.isnan(record["reproj_error"][interp]))
    assert record["confidence"][interp].max() < record["confidence"][record["source"] == 0].min()
    assert sorted(json.loads(record.extra["unregistered"])) == sorted(record.names[i] for i in interp)
    R_gt, T_gt, K_gt = _ground_truth(data, capture, record.names)
    aligned = geometry.similarity_align_poses(record["R"], record["T"], R_gt, T_gt)
    assert aligned.rotation_error_deg[interp].max() < 3.0
    assert aligned.center_error[interp].max() < 0.05 * RADIUS
    np.testing.assert_allclose(record["K"][interp], record["K"][interp[0] - 1][None].repeat(3, 0))


def _ring_poses(azimuths: np.ndarray, radius: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    return geometry.ring_pose(azimuths, np.zeros_like(azimuths), radius)


def test_interpolate_missing_recovers_a_ring_exactly():
    azimuths = np.arange(-90.0, 91.0, 15.0)
    R, T = _ring_poses(azimuths)
    registered = np.ones(13, bool)
    registered[[0, 4, 7, 8, 12]] = False  # both ends, a single gap and a double gap
    R_in, T_in = R.copy(), T.copy()
    R_in[~registered], T_in[~registered] = np.eye(3), 0.0
    R_out, T_out, gap = poses.interpolate_missing(R_in, T_in, registered, azimuths)
    assert geometry.rotation_angle_deg(R_out, R).max() < 1e-6
    np.testing.assert_allclose(geometry.camera_centers(R_out, T_out), geometry.camera_centers(R, T), atol=1e-9)
    assert list(gap[~registered]) == [15.0, 15.0, 15.0, 15.0, 15.0] and np.all(gap[registered] == 0)


def test_interpolated_centres_follow_the_circle_not_the_chord():
    azimuths = np.array([-60.0, -30.0, 0.0, 30.0, 60.0])
    R, T = _ring_poses(azimuths)
    registered = np.array([True, True, False, True, True])
    R_out, T_out, _ = poses.interpolate_missing(R, T, registered, azimuths)
    center = geometry.camera_centers(R_out[2], T_out[2])
    np.testing.assert_allclose(center, [0.0, 0.0, -4.0], atol=1e-9)
    blended = 0.5 * (geometry.camera_centers(R[1], T[1]) + geometry.camera_centers(R[3], T[3]))
    assert np.linalg.norm(blended) < 3.5  # a straight blend cuts the chord, 13% inside the ring


def test_fit_circle_and_degenerate_points():
    angles = np.radians([0, 50, 100, 170])
    points = np.stack([2 + 3 * np.cos(angles), np.full(4, 1.0), 3 * np.sin(angles)], axis=1)
    center, normal, radius, _e1, _e2 = poses.fit_circle(points)
    np.testing.assert_allclose(center, [2, 1, 0], atol=1e-9)
    assert radius == pytest.approx(3.0) and abs(normal[1]) == pytest.approx(1.0)
    assert poses.fit_circle(points[:2]) is None
    assert poses.fit_circle(np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2.0]])) is None


def test_fewer_than_two_registered_views_names_the_capture(tmp_path, monkeypatch):
    data = tmp_path / "data" / "cap"
    for i in range(3):
        io.write_image(data / f"v{i}.png", np.full((32, 32, 3), 40 * i, np.uint8))
    monkeypatch.setattr(poses.capture, "run_sfm", lambda *args, **kwargs: (None, 0))
    with pytest.raises(InputError, match=r"capture cap: SfM registered 0 of 3 views"):
        poses.run(Context(tmp_path / "work", data=tmp_path / "data"), poses.Config())
    assert not (tmp_path / "work" / "cap").exists()


# -- options ---------------------------------------------------------------------------------------


def test_colmap_overrides_set_nested_options_by_type():
    cfg = poses.Config(colmap=poses.parse_overrides([
        "extraction.sift.peak_threshold=0.001", "mapping.mapper.init_min_num_inliers=50",
        "matching.guided_matching=true", "extraction.sift.normalization=L2"]))  # fmt: skip
    options = poses.build_options(cfg)
    assert options["extraction"].sift.peak_threshold == 0.001
    assert options["mapping"].mapper.init_min_num_inliers == 50
    assert options["matching"].guided_matching is True
    assert options["extraction"].sift.normalization.name == "L2"


@pytest.mark.parametrize("item, message", [
    ("extraction.sift.peak_treshold=1", "has no option 'peak_treshold'"),
    ("sift.peak_threshold=1", "must start with one of"),
    ("mapping.mapper.init_min_num_inliers=many", "bad --colmap value"),
    ("noequals", "use KEY=VALUE"),
])  # fmt: skip
def test_bad_colmap_overrides_are_input_errors(item, message):
    with pytest.raises(InputError, match=message):
        poses.validate(poses.Config(colmap=poses.parse_overrides([item])))


def test_global_mapper_options_build():
    options = poses.build_options(poses.Config(mapper="global", refine_focal=False))
    assert type(options["mapping"]).__name__ == "GlobalPipelineOptions"


def test_images_are_numbered_in_name_order_whatever_thread_finishes_first(textureless):
    import pycolmap

    data, _work, _capture = textureless
    names = [str(p.relative_to(data)) for p in sorted(data.rglob("*.png")) if "groundtruth" not in p.parts][::-1]
    cfg = poses.fast_pass(poses.Config())
    options = poses.build_options(cfg)
    assert options["mapping"].num_threads == 1  # deterministic by default
    assert poses.build_options(poses.Config(deterministic=False))["mapping"].num_threads == cfg.num_threads
    for attempt in range(2):
        database = data.parent / f"ids{attempt}.db"
        poses.extract_features(database, data, names, options, pycolmap.CameraMode.SINGLE)
        with pycolmap.Database.open(database) as db:
            by_id = {image.image_id: image.name for image in db.read_all_images()}
            assert all(db.read_keypoints(image_id).shape[0] > 0 for image_id in by_id)
        assert [by_id[i] for i in sorted(by_id)] == sorted(names)  # the reader's (sorted) order, every time


def test_a_rerun_gives_the_same_poses_bit_for_bit(textureless, tmp_path):
    data, work, capture = textureless
    poses.run(Context(tmp_path / "again", data=data), poses.Config())
    first, again = poses.load_poses(work, capture), poses.load_poses(tmp_path / "again", capture)
    for key in ("R", "T", "K", "source", "reproj_error"):
        np.testing.assert_array_equal(again[key], first[key])


def test_fine_contrast_is_linear_in_image_contrast():
    rng = np.random.default_rng(1)
    texture = np.kron(rng.random((24, 32)), np.ones((4, 4))).astype(np.float32)  # [96, 128] blobs
    full = poses.fine_contrast(texture)
    assert full > 0.01
    # an offset cancels in the DoG; a contrast factor scales it
    assert poses.fine_contrast(0.3 + 0.25 * texture) == pytest.approx(0.25 * full, rel=1e-4)
    assert poses.fine_contrast(np.full((96, 128), 0.5, np.float32)) == pytest.approx(0.0, abs=1e-6)


def test_contrast_scales_the_peak_threshold_between_the_face_and_colmap_values():
    face, colmap_default = poses.Config().peak_threshold, poses.COLMAP_PEAK_THRESHOLD
    assert poses.contrast_peak_threshold(face, 0.5 * poses.FACE_CONTRAST) == face  # never below the face value
    assert poses.contrast_peak_threshold(face, 2 * poses.FACE_CONTRAST) == pytest.approx(2 * face)
    assert poses.contrast_peak_threshold(face, 100 * poses.FACE_CONTRAST) == pytest.approx(colmap_default)
    assert poses.contrast_peak_threshold(0.01, 100.0) == 0.01  # a user's threshold above COLMAP's stays


@pytest.mark.parametrize("scaled", [True, False])
def test_only_the_fast_pass_takes_the_contrast_scaled_threshold(monkeypatch, scaled):
    passes = []
    monkeypatch.setattr(poses.sfm, "capture_contrast", lambda root, names: 2 * poses.FACE_CONTRAST)
    monkeypatch.setattr(poses.sfm, "_sfm_pass", lambda root, names, cfg, *_: (passes.append(cfg), (None, 0))[1])
    cfg = poses.Config(contrast_threshold=scaled)
    assert poses.run_sfm(Path("."), ["a.png", "b.png"], cfg, [(64, 64)] * 2) == (None, 0)
    fast, tuned = passes  # nothing registered, so the tuned pass ran too
    assert fast.peak_threshold == pytest.approx(2 * cfg.peak_threshold if scaled else cfg.peak_threshold)
    assert not fast.affine_shape and not fast.domain_size_pooling
    assert tuned == cfg  # escalation keeps the full face settings: most sensitive threshold, affine, DSP
    passes.clear()  # a contrast measured while validating is used as it is
    poses.run_sfm(Path("."), ["a.png", "b.png"], cfg, [(64, 64)] * 2, contrast=3 * poses.FACE_CONTRAST)
    assert passes[0].peak_threshold == pytest.approx(3 * cfg.peak_threshold if scaled else cfg.peak_threshold)


def test_ring_contrast_keeps_the_face_threshold(ring):
    data, _work, _capture, _cfg, _written = ring
    images = sorted(data.rglob("*.png"))
    images = [p.relative_to(data) for p in images if "groundtruth" not in p.parts]
    contrast = poses.capture_contrast(data, images)
    assert 0.005 < contrast <= poses.FACE_CONTRAST  # measured 0.0150 (subject 1, 512 px)
    assert poses.fast_pass(poses.Config(), contrast).peak_threshold == poses.Config().peak_threshold


@pytest.mark.parametrize("dropped, solves", [(0, 1), (7, 2)])
def test_final_adjustment_stops_on_convergence_and_skips_a_needless_second_solve(monkeypatch, dropped, solves):
    import pycolmap

    seen = []
    monkeypatch.setattr(poses.sfm, "_bundle_adjust", lambda pycolmap, rec, options: seen.append(options))

    class Filter:
        def __init__(self, rec):
            pass

        def filter_all_points3D(self, max_error, min_angle):
            return dropped

    monkeypatch.setattr(pycolmap, "ObservationManager", Filter)
    poses.refine_reconstruction(object(), poses.Config())
    assert len(seen) == solves  # the second solve only when the filter dropped observations
    ceres = seen[0].ceres
    assert ceres.loss_function_type == pycolmap.LossFunctionType.CAUCHY
    # COLMAP's 0 would run every solve to its iteration cap (~4x the time, same poses)
    assert ceres.solver_options.function_tolerance == poses.REFINE_FUNCTION_TOLERANCE > 0


def test_final_adjustment_matches_pycolmaps_and_keeps_colmap_quiet(tmp_path):
    import pycolmap

    options = pycolmap.SyntheticDatasetOptions()
    options.num_rigs, options.num_frames_per_rig, options.num_points3D = 1, 6, 200
    noise = pycolmap.SyntheticNoiseOptions()
    noise.point2D_stddev = 0.5
    pycolmap.set_random_seed(0)
    ours = pycolmap.synthesize_dataset(options)
    pycolmap.synthesize_noise(noise, ours)
    theirs = pycolmap.Reconstruction(ours)
    adjustment = pycolmap.BundleAdjustmentOptions()
    poses._quiet_colmap()
    assert pycolmap.logging.logtostderr  # glog writes no log files to /tmp
    for level in (pycolmap.logging.Level.INFO, pycolmap.logging.Level.WARNING, pycolmap.logging.Level.ERROR):
        pycolmap.logging.set_log_destination(level, str(tmp_path / "glog."))  # its files go here, not /tmp
    pycolmap.bundle_adjustment(theirs, adjustment)  # resets COLMAP's log level to INFO (0), and to files
    poses._quiet_colmap()
    assert pycolmap.logging.minloglevel == 3 and pycolmap.logging.logtostderr
    poses._bundle_adjust(pycolmap, ours, adjustment)
    assert pycolmap.logging.minloglevel == 3  # no "=== Global bundle adjustment ===" on stderr
    for image_id, image in ours.images.items():
        np.testing.assert_array_equal(
            image.cam_from_world().matrix(), theirs.images[image_id].cam_from_world().matrix()
        )


# -- bad input -------------------------------------------------------------------------------------


def test_empty_folder_is_an_input_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images found"):
        poses.run(Context(tmp_path / "work", data=tmp_path / "empty"), poses.Config())
    assert not (tmp_path / "work").exists()


def test_one_image_is_an_input_error(tmp_path):
    write_tiny_png(tmp_path / "data" / "solo" / "a.png")
    with pytest.raises(InputError, match="capture solo: 1 image"):
        poses.run(Context(tmp_path / "work", data=tmp_path / "data"), poses.Config())


def test_corrupt_image_names_the_file_and_writes_nothing(tmp_path):
    for name in ("a.png", "b.png"):
        write_tiny_png(tmp_path / "data" / "good" / name)
    write_tiny_png(tmp_path / "data" / "zbad" / "a.png")
    (tmp_path / "data" / "zbad" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputError, match=r"zbad/b\.png: corrupt or unreadable image"):
        poses.run(Context(tmp_path / "work", data=tmp_path / "data"), poses.Config())
    assert not (tmp_path / "work").exists()  # validated before the good capture was processed


def test_duplicate_names_are_an_input_error(tmp_path):
    from tests.helpers import make_multipie_tree

    root = make_multipie_tree(tmp_path / "mp", subjects=(1,), cameras=["051", "050"])
    copy = root / "extra" / "001_01_01_051_00.png"
    write_tiny_png(copy)
    with pytest.raises(InputError, match="occur more than once"):
        poses.run(Context(tmp_path / "work", data=root), poses.Config())


def test_rig_on_a_folder_layout_is_an_input_error_and_auto_falls_back(tmp_path):
    for name in ("a.png", "b.png"):
        write_tiny_png(tmp_path / "data" / "cap" / name)
    with pytest.raises(InputError, match="needs a fixed camera rig"):
        poses.run(Context(tmp_path / "work", data=tmp_path / "data"), poses.Config(rig="on"))
    assert poses.resolve_rig(poses.Config(rig="auto"), "folder") == ("off", None)
    assert not (tmp_path / "work").exists()


def test_rig_on_with_a_single_capture_session_is_an_input_error(tmp_path):
    from tests.helpers import make_multipie_tree

    root = make_multipie_tree(tmp_path / "mp", subjects=(1,), cameras=["051", "050", "140"])
    with pytest.raises(InputError, match=r"session 01 has only capture 001_01_01_00"):
        poses.run(Context(tmp_path / "work", data=root), poses.Config(rig="on"))
    assert not (tmp_path / "work").exists()


def test_rig_file_that_is_not_a_rig_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such rig file"):
        poses.resolve_rig(poses.Config(rig=str(tmp_path / "nope.safetensors")), "multipie")
    other = io.save_record(tmp_path / "poses.safetensors", {"R": np.eye(3)[None], "T": np.zeros((1, 3)),
                           "K": np.eye(3)[None], "width": np.ones(1), "height": np.ones(1)}, kind="poses",
                           stage="poses", capture="x", names=["a.png"])  # fmt: skip
    with pytest.raises(InputError, match="not a usable rig record"):
        poses.resolve_rig(poses.Config(rig=str(other)), "multipie")


def test_unknown_export_is_an_input_error():
    with pytest.raises(InputError, match="unknown export 'ply'"):
        poses.validate(poses.Config(export=("ply",)))


# -- rig mode --------------------------------------------------------------------------------------

RIG_TEXTURELESS = ("130", "050")


@pytest.fixture(scope="module")
def rig_session(tmp_path_factory):
    """Three 192 px subjects of one session; subject 2's cameras 130 and 050 see no texture."""
    data = tmp_path_factory.mktemp("rig-data")
    cfg = dataclasses.replace(synth.PRESETS["default"], subjects=3, elevated=False, surface_points=2000, resolution=192)
    synth.run(data, cfg)
    smooth = synth.render_capture(2, 1, 1, 0, dataclasses.replace(cfg, textureless_cameras=RIG_TEXTURELESS))
    for name, image in zip(smooth.names, smooth.images_nhw3):
        io.write_image(next(data.rglob(name)), image)
    work = tmp_path_factory.mktemp("rig-work")
    written = poses.run(Context(work, data=data), poses.Config(rig="auto"))
    return data, work, written


def _errors_through_sfm_alignment(data: Path, work: Path, capture: str) -> tuple[io.Record, np.ndarray, np.ndarray]:
    """Rotation (deg) and centre errors of every row, with the similarity fitted on the SfM rows only."""
    record = poses.load_poses(work, capture)
    R_gt, T_gt, _ = _ground_truth(data, capture, record.names)
    sfm = record["source"] == poses.SOURCES["sfm"]
    fit = geometry.similarity_align_poses(record["R"][sfm], record["T"][sfm], R_gt[sfm], T_gt[sfm])
    R_all, T_all = poses.transform_pose(record["R"], record["T"], fit.scale, fit.R_world, fit.t_world)
    rotation = geometry.rotation_angle_deg(R_all, R_gt)
    centre = np.linalg.norm(geometry.camera_centers(R_all, T_all) - geometry.camera_centers(R_gt, T_gt), axis=-1)
    return record, rotation, centre


def test_captures_posed_at_once_equal_captures_posed_one_by_one(rig_session, tmp_path):
    data, work, _written = rig_session  # posed 2 captures at a time (the default)
    poses.run(Context(tmp_path, data=data), dataclasses.replace(poses.Config(rig="auto"), captures_at_once=1))
    for capture in [c.id for c in dataset.scan(data).captures]:
        one_by_one, at_once = poses.load_poses(tmp_path, capture), poses.load_poses(work, capture)
        for key in ("R", "T", "K", "source", "reproj_error"):
            np.testing.assert_array_equal(at_once[key], one_by_one[key])


def test_rig_mode_poses_every_camera_of_every_capture(rig_session):
    data, work, written = rig_session
    assert written[0] == poses.rig_path(work, "01") and sum(p.name == "poses.safetensors" for p in written) == 3
    smooth = dataset.capture_id(2, 1, 1, 0)
    for subject in (1, 2, 3):
        capture = dataset.capture_id(subject, 1, 1, 0)
        record, rotation, centre = _errors_through_sfm_alignment(data, work, capture)
        cams = json.loads(record.extra["camera_ids"])
        via_rig = [cams.index(c) for c in RIG_TEXTURELESS] if capture == smooth else []
        expected = np.full(13, poses.SOURCES["sfm"])
        expected[via_rig] = poses.SOURCES["rig"]
        assert record["source"].tolist() == expected.tolist()  # nothing interpolated
        assert rotation.max() < 1.0 and centre.max() < 0.01 * RADIUS  # 192 px SfM: measured <= 0.66°, 0.56%
        if via_rig:
            # measured 0.10° / 0.14° and 0.24% / 0.25% of the radius
            assert rotation[via_rig].max() < 0.4 and centre[via_rig].max() < 0.006 * RADIUS
            assert np.all(np.isnan(record["reproj_error"][via_rig]))
            sfm_conf = record["confidence"][record["source"] == poses.SOURCES["sfm"]]
            assert 0 < record["confidence"][via_rig].max() < sfm_conf.min()


def test_rig_record_holds_every_camera_and_loads_back(rig_session):
    _data, work, _written = rig_session
    rig = poses.Rig.load(poses.rig_path(work, "01"))
    assert sorted(rig.camera_ids) == sorted(dataset.RING_CAMERAS)
    counts = dict(zip(rig.camera_ids, rig.captures.tolist()))
    assert all(counts[c] == (2 if c in RIG_TEXTURELESS else 3) for c in rig.camera_ids)
    assert np.median(rig.spread_deg) < 0.5 and rig.K.shape == (13, 3, 3) and set(rig.width.tolist()) == {192}
    # the rig frame is one of a ring: centres on a circle, every camera looking at its middle
    centres = geometry.camera_centers(rig.R, rig.T)
    middle, _normal, radius, _e1, _e2 = poses.fit_circle(centres)
    assert np.abs(np.linalg.norm(centres - middle, axis=1) - radius).max() < 0.01 * radius
    axes = rig.R[:, 2, :]  # optical axes in the rig frame
    towards = (middle - centres) / np.linalg.norm(middle - centres, axis=1, keepdims=True)
    assert np.degrees(np.arccos(np.clip((axes * towards).sum(1), -1, 1))).max() < 5.0


def test_rig_file_is_reused_for_a_capture_posed_alone(rig_session, tmp_path):
    data, work, _written = rig_session
    smooth = dataset.capture_id(2, 1, 1, 0)
    rig_file = str(poses.rig_path(work, "01"))
    written = poses.run(Context(tmp_path / "work", data=data, captures=[smooth]), poses.Config(rig=rig_file))
    assert [p.name for p in written] == ["sparse.safetensors", "poses.safetensors"]
    record, rotation, centre = _errors_through_sfm_alignment(data, tmp_path / "work", smooth)
    assert int((record["source"] == poses.SOURCES["rig"]).sum()) == 2
    assert rotation.max() < 1.0 and centre.max() < 0.01 * RADIUS


def test_fit_pose_similarity_recovers_a_known_similarity_from_two_views():
    R, T = _ring_poses(np.array([-30.0, 45.0, 90.0]))
    R_w = geometry.quat_to_rotmat(np.array([0.9, 0.1, -0.3, 0.2]) / np.linalg.norm([0.9, 0.1, -0.3, 0.2]))
    t_w, scale = np.array([0.5, -1.0, 2.0]), 2.5
    R_b, T_b = poses.transform_pose(R, T, scale, R_w, t_w)
    got_scale, got_R, got_t = poses.fit_pose_similarity(R[:2], T[:2], R_b[:2], T_b[:2])
    assert got_scale == pytest.approx(scale) and np.allclose(got_R, R_w) and np.allclose(got_t, t_w)
    R_3, T_3 = poses.transform_pose(R[2], T[2], got_scale, got_R, got_t)
    assert np.allclose(R_3, R_b[2]) and np.allclose(T_3, T_b[2])


# -- real photos -----------------------------------------------------------------------------------


def _read_bundle(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bundler v0.3 cameras: (R [N,3,3] OpenCV w2c, T [N,3], registered [N]); Bundler looks down -Z."""
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    n_cams = int(lines[0].split()[0])
    flip = np.diag([1.0, -1.0, -1.0])
    Rs, Ts, ok = [], [], []
    for c in range(n_cams):
        block = np.array([[float(v) for v in lines[1 + 5 * c + k].split()] for k in range(5)])
        f, R, t = block[0, 0], block[1:4], block[4]
        Rs.append(flip @ R)
        Ts.append(flip @ t)
        ok.append(f > 0 and np.any(R != 0))
    return np.array(Rs), np.array(Ts), np.array(ok)


def test_kermit_registers_at_least_10_of_11_and_agrees_with_bundler(shared_data, tmp_path):
    kermit = shared_data / "kermit"
    if not kermit.is_dir():
        pytest.skip(f"{kermit} is absent")
    import shutil

    data = tmp_path / "kermit"
    data.mkdir()
    for image in sorted(kermit.glob("*.jpg")):
        shutil.copy(image, data / image.name)
    contrast = poses.capture_contrast(data, sorted(p.name for p in data.glob("*.jpg")))
    assert 0.025 < contrast < 0.045  # measured 0.033: textured, so a fast pass at threshold ~0.0044
    poses.run(Context(tmp_path / "work", data=data), poses.Config())
    record = poses.load_poses(tmp_path / "work", "kermit")
    assert int((record["source"] == poses.SOURCES["sfm"]).sum()) >= 10
    R_b, T_b, ok = _read_bundle(kermit / "results.example" / "bundle.out")
    both = ok & (record["source"] == poses.SOURCES["sfm"])
    assert both.sum() >= 8
    aligned = geometry.similarity_align_poses(record["R"][both], record["T"][both], R_b[both], T_b[both])
    spread = np.linalg.norm(geometry.camera_centers(R_b[both], T_b[both]).std(0))
    R_est, R_ref = record["R"][both], R_b[both]
    relative = geometry.rotation_angle_deg(R_est[:, None] @ np.swapaxes(R_est[None], -1, -2),
                                           R_ref[:, None] @ np.swapaxes(R_ref[None], -1, -2))  # fmt: skip
    assert relative.max() < 1.5  # measured ~1.0°: the pairwise rotations agree with Bundler's
    # the centre-only similarity of a short arc leaves a common tilt (~4.5° measured), hence 6°
    assert aligned.rotation_error_deg.max() < 6.0
    assert aligned.center_error.max() < 0.1 * spread  # measured ~6.6% of the centres' spread
    assert math.isfinite(float(record["reproj_error"].max()))


# -- cancellation ------------------------------------------------------------------------------------


def test_a_cancelled_token_stops_sfm_and_matching(textureless, tmp_path):
    import pycolmap

    data, _work, capture = textureless
    cancel = poses.cancellation_token()
    if cancel is None:
        pytest.skip("this pycolmap has no CancellationToken")
    cancel.cancel()
    names = sorted(str(p.relative_to(data)) for p in data.rglob("*.png") if "groundtruth" not in p.parts)
    with pytest.raises(InterruptedError):
        poses.run_sfm(data, names, poses.Config(), [(192, 192)] * len(names), cancel=cancel)
    # the matcher checks before each pair
    options = poses.build_options(poses.fast_pass(poses.Config()))
    database = tmp_path / "features.db"
    poses.extract_features(database, data, names, options, pycolmap.CameraMode.SINGLE)
    with pytest.raises(InterruptedError):
        sift_matching.match_exhaustive(database, options["matching"], options["verification"], cancel)


def test_an_error_cancels_the_captures_still_in_sfm(textureless, tmp_path, monkeypatch):
    data, _work, _capture = textureless
    tokens, make_token = [], poses.cancellation_token

    def token():
        tokens.append(make_token())
        return tokens[-1]

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(poses.entry, "cancellation_token", token)
    monkeypatch.setattr(poses.entry, "complete_capture", fail)
    with pytest.raises(RuntimeError, match="boom"):
        poses.run(Context(tmp_path, data=data), poses.Config())
    assert len(tokens) == 1 and (tokens[0] is None or tokens[0].is_cancelled)
