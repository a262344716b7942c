"""Tests for stages/synth/: ground truth consistent with the analytic surface, determinism,
identity across sessions, the Multi-PIE file layout, and pycolmap registering a whole ring."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest

from stages import synth
from stages.core import dataset, geometry, io
from stages.core.errors import InputError

SMALL = synth.Config(resolution=96, elevated=True)  # 15 views, coarse-to-fine path (96 > 64)


@pytest.fixture(scope="module")
def neutral() -> synth.CaptureRender:
    return synth.render_capture(1, 1, 1, 0, SMALL)


def _view(render: synth.CaptureRender, camera: str) -> int:
    return render.camera_ids.index(camera)


# --- geometry of the ground truth ---------------------------------------------------------------


def test_depth_backprojects_onto_the_analytic_surface(neutral: synth.CaptureRender) -> None:
    shape = synth.head_shape(1, "neutral", SMALL.seed)
    for v in range(len(neutral.camera_ids)):
        points = geometry.backproject(neutral.depth_nhw[v], neutral.K[v], neutral.R[v], neutral.T[v])
        assert len(points) > 0.2 * SMALL.resolution**2  # the head fills a good part of every view
        radius = np.linalg.norm(points, axis=-1)
        relative_error = np.abs(shape.implicit(points)) / radius
        assert relative_error.max() < 1e-4, neutral.camera_ids[v]


def test_two_views_agree_where_they_overlap(neutral: synth.CaptureRender) -> None:
    a, b = _view(neutral, "051"), _view(neutral, "050")  # frontal and 15° to the side
    points = geometry.backproject(neutral.depth_nhw[a], neutral.K[a], neutral.R[a], neutral.T[a])
    uv, z = geometry.project(points, neutral.K[b], neutral.R[b], neutral.T[b])
    size = SMALL.resolution
    # bilinear lookup of view b's depth at the projected pixel centres, on smooth 2x2 patches only
    x, y = uv[:, 0] - 0.5, uv[:, 1] - 0.5
    i, j = np.floor(x).astype(int), np.floor(y).astype(int)
    inside = (i >= 0) & (j >= 0) & (i < size - 1) & (j < size - 1)
    i, j, x, y, z = i[inside], j[inside], x[inside], y[inside], z[inside]
    depth_b = neutral.depth_nhw[b].astype(np.float64)
    patch = np.stack([depth_b[j, i], depth_b[j, i + 1], depth_b[j + 1, i], depth_b[j + 1, i + 1]])
    valid = patch.min(axis=0) > 0
    wx, wy = x - i, y - j
    interp = (patch[0] * (1 - wx) + patch[1] * wx) * (1 - wy) + (patch[2] * (1 - wx) + patch[3] * wx) * wy
    delta = (z - interp)[valid]
    tolerance = 1e-3 + 0.25 * np.ptp(patch, axis=0)[valid]  # bilinear error grows with the depth slope
    assert valid.sum() > 0.8 * len(points)
    assert np.mean(np.abs(delta) < tolerance) > 0.95  # seen by both: the same surface point
    assert np.mean(delta < -tolerance) < 2e-3  # (almost) nothing lies in front of what view b sees


def test_frontal_centre_pixel_hits_the_face(neutral: synth.CaptureRender) -> None:
    v = _view(neutral, dataset.FRONTAL_CAMERA)
    centre = SMALL.resolution // 2
    shape = synth.head_shape(1, "neutral", SMALL.seed)
    nose_depth = SMALL.radius - shape.radius(np.array([[0.0, 0.0, -1.0]]))[0]
    assert neutral.depth_nhw[v, centre, centre] == pytest.approx(nose_depth, abs=0.02)
    background = np.round(np.array(SMALL.background) * 255)
    assert np.abs(neutral.images_nhw3[v, centre, centre] - background).max() > 10
    assert np.all(neutral.depth_nhw[:, 0, 0] == 0) and np.all(neutral.images_nhw3[:, 0, 0] == background)


def test_coarse_to_fine_tracing_matches_tracing_every_ray() -> None:
    shape = synth.head_shape(2, "smile", 0)
    cfg = synth.Config(resolution=128)
    cameras = ["110", "130", "051", "200", "191"]
    R, T = synth.rig_poses(cfg, cameras)
    K = synth.intrinsics(cfg)
    fast = np.nan_to_num(synth.trace_depth(shape, R, T, K, cfg.resolution))
    origins, dirs = synth.view_rays(R, T, K, cfg.resolution)
    full = np.nan_to_num(synth.cast_rays(shape, origins.reshape(-1, 3), dirs.reshape(-1, 3))).reshape(fast.shape)
    assert np.mean((fast > 0) != (full > 0)) < 1e-3  # at most a few grazing pixels differ
    both = (fast > 0) & (full > 0)
    assert np.abs(fast - full)[both].max() < 1e-5


def test_gradient_and_surface_cloud() -> None:
    shape = synth.head_shape(1, "scream", 0)
    rng = np.random.default_rng(0)
    points = rng.normal(size=(50, 3))
    step = 1e-6
    numeric = np.stack([(shape.implicit(points + step * e) - shape.implicit(points - step * e)) / (2 * step)
                        for e in np.eye(3)], axis=-1)  # fmt: skip
    np.testing.assert_allclose(shape.gradient(points), numeric, atol=1e-6)
    cfg = synth.Config(surface_points=2000)
    surface, colours, normals = synth.surface_cloud(1, "scream", cfg)
    assert surface.shape == normals.shape == (2000, 3) and colours.dtype == np.uint8
    assert np.abs(shape.implicit(surface)).max() < 1e-12
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0)
    outward = np.sum(normals * surface, axis=-1) / np.linalg.norm(surface, axis=-1)
    assert outward.min() > 0.2  # star-shaped: normals never face the centre


# --- identity, expressions, light, texture ------------------------------------------------------


def test_same_subject_is_deterministic_and_subjects_differ(neutral: synth.CaptureRender) -> None:
    synth.head_shape.cache_clear()  # rebuild the shape from its seed, not from the cache
    again = synth.render_capture(1, 1, 1, 0, SMALL)
    np.testing.assert_array_equal(again.images_nhw3, neutral.images_nhw3)
    np.testing.assert_array_equal(again.depth_nhw, neutral.depth_nhw)
    other = synth.render_capture(2, 1, 1, 0, SMALL)
    assert np.mean(np.abs(other.depth_nhw - neutral.depth_nhw) > 1e-3) > 0.05
    assert np.mean(np.abs(other.images_nhw3.astype(int) - neutral.images_nhw3) > 20) > 0.1
    reseeded = synth.render_capture(1, 1, 1, 0, dataclasses.replace(SMALL, seed=1))
    assert not np.array_equal(reseeded.depth_nhw, neutral.depth_nhw)


def test_sessions_keep_identity_and_expressions_move_only_the_face(neutral: synth.CaptureRender) -> None:
    session2 = synth.render_capture(1, 2, 1, 0, SMALL)  # neutral again, another session
    assert session2.expression == "neutral" and session2.capture == "001_02_01_00"
    np.testing.assert_array_equal(session2.images_nhw3, neutral.images_nhw3)
    np.testing.assert_array_equal(session2.depth_nhw, neutral.depth_nhw)
    smile = synth.render_capture(1, 1, 2, 0, SMALL)
    assert smile.expression == "smile"
    v = _view(smile, dataset.FRONTAL_CAMERA)
    changed = np.abs(smile.depth_nhw[v] - neutral.depth_nhw[v]) > 1e-3
    rows = np.nonzero(changed)[0]
    assert changed.sum() > 100 and rows.min() > 0.35 * SMALL.resolution  # the lower face, not the brow
    neutral_shape, smile_shape = synth.head_shape(1, "neutral"), synth.head_shape(1, "smile")
    dirs = synth._fibonacci_dirs(5000)
    back = dirs[:, 2] > 0.3  # the back of the head never moves
    np.testing.assert_allclose(smile_shape.radius(dirs[back]), neutral_shape.radius(dirs[back]), atol=1e-9)
    np.testing.assert_array_equal(smile_shape.albedo(dirs, 1.0), neutral_shape.albedo(dirs, 1.0))


def test_lighting_changes_per_shot_and_geometry_does_not(neutral: synth.CaptureRender) -> None:
    flash = synth.render_capture(1, 1, 1, 5, SMALL)
    np.testing.assert_array_equal(flash.depth_nhw, neutral.depth_nhw)
    assert np.mean(np.abs(flash.images_nhw3.astype(int) - neutral.images_nhw3) > 8) > 0.05
    steady = synth.render_capture(1, 1, 1, 5, dataclasses.replace(SMALL, lighting_change=False))
    np.testing.assert_array_equal(steady.images_nhw3, neutral.images_nhw3)


def _face_detail(render: synth.CaptureRender, v: int) -> float:
    """Mean grey-level step between neighbouring pixels of the central face region of view v:
    texture makes it large, smooth shading alone small."""
    size = render.images_nhw3.shape[1]
    window = slice(size // 3, 2 * size // 3)
    grey = render.images_nhw3[v, window, window].astype(float).mean(axis=-1)
    return float(np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean())


def test_texture_contrast_and_textureless_cameras(neutral: synth.CaptureRender) -> None:
    plain_front = synth.render_capture(1, 1, 1, 0, dataclasses.replace(SMALL, textureless_cameras=("051",)))
    v = _view(neutral, "051")
    assert _face_detail(plain_front, v) < 0.3 * _face_detail(neutral, v)
    others = [i for i in range(len(neutral.camera_ids)) if i != v]
    np.testing.assert_array_equal(plain_front.images_nhw3[others], neutral.images_nhw3[others])
    np.testing.assert_array_equal(plain_front.depth_nhw, neutral.depth_nhw)
    low = synth.render_capture(1, 1, 1, 0, dataclasses.replace(SMALL, texture_contrast=0.15))
    assert _face_detail(plain_front, v) < _face_detail(low, v) < _face_detail(neutral, v)


def test_presets_are_valid_and_bad_configs_are_input_errors() -> None:
    for preset in synth.PRESETS.values():
        synth.validate(preset)
    assert synth.PRESETS["lowcontrast"].texture_contrast < 0.5
    for bad in (dict(sessions=(5,)), dict(textureless_cameras=("999",)), dict(resolution=8), dict(shots=0),
                dict(texture_contrast=-1.0), dict(radius=1.0), dict(recordings="some")):  # fmt: skip
        with pytest.raises(InputError):
            synth.validate(synth.Config(**bad))
    with pytest.raises(InputError, match="recording"):
        synth.render_capture(1, 4, 3, 0, SMALL)  # session 4 has recordings 1..2


# --- the stage: files -----------------------------------------------------------------------------


def test_run_writes_the_multipie_layout_and_ground_truth(tmp_path: Path) -> None:
    cfg = synth.Config(subjects=2, sessions=(1,), resolution=32, surface_points=500)
    progress: list[tuple[int, int]] = []
    written = synth.run(tmp_path, cfg, progress=lambda done, total: progress.append((done, total)))
    assert progress == [(1, 2), (2, 2)]
    image = tmp_path / "session01/multiview/002/01/05_1/002_01_01_051_00.png"
    assert image in written and io.read_image(image).shape == (32, 32, 3)
    gt = tmp_path / "groundtruth" / "001_01_01_00"
    poses = io.load_record(gt / "poses.safetensors", kind="poses", capture="001_01_01_00")
    cameras = list(dataset.RING_CAMERAS) + list(dataset.ELEVATED_CAMERAS)
    assert poses.names == [dataset.multipie_filename(1, 1, 1, cam, 0) for cam in cameras]
    assert json.loads(poses.extra["camera_ids"]) == cameras and poses.extra["source"] == "synth-groundtruth"
    R, T = synth.rig_poses(cfg)
    np.testing.assert_allclose(poses["R"], R)
    np.testing.assert_allclose(poses["T"], T)
    assert poses["R"].dtype == np.float64 and poses["width"].dtype == np.int32 and set(poses["height"]) == {32}
    depth = io.load_record(gt / "depth.safetensors", kind="depth")
    assert depth["depth"].shape == (15, 32, 32) and depth["depth"].dtype == np.float32
    assert depth.extra["depth_kind"] == "depth" and depth.names == poses.names
    cloud = io.read_ply(gt / "surface.ply")
    assert len(cloud.points) == 500 and cloud.colors is not None and cloud.normals is not None
    assert io.read_json(tmp_path / "synth.json")["captures"] == ["001_01_01_00", "002_01_01_00"]
    index = dataset.scan(tmp_path)  # the ground truth folder is not mistaken for images
    assert [c.id for c in index.captures] == ["001_01_01_00", "002_01_01_00"]
    assert all(len(c.images) == 15 for c in index.captures)

    mtime = image.stat().st_mtime_ns
    assert synth.run(tmp_path, cfg) == [tmp_path / "synth.json"]  # complete captures are skipped
    assert image.stat().st_mtime_ns == mtime
    assert image in synth.run(tmp_path, cfg, overwrite=True)
    brighter = dataclasses.replace(cfg, ambient=0.6)  # a render setting changed: rendered again
    assert image in synth.run(tmp_path, brighter)


# --- speed and registration -----------------------------------------------------------------------


@pytest.mark.slow
def test_ring_capture_renders_and_pycolmap_registers_all_13_views(tmp_path: Path, capsys) -> None:
    pycolmap = pytest.importorskip("pycolmap")
    cfg = synth.Config(resolution=256, elevated=False)
    synth.render_capture(2, 1, 1, 0, synth.Config(resolution=64))  # warm-up (imports, caches)
    start = time.perf_counter()
    render = synth.render_capture(1, 1, 1, 0, cfg)
    render_s = time.perf_counter() - start
    images = tmp_path / "images"
    for name, image in zip(render.names, render.images_nhw3, strict=True):
        io.write_image(images / name, image)
    start = time.perf_counter()
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = "PINHOLE"
    fx, fy, cx, cy = render.K[0][0, 0], render.K[0][1, 1], render.K[0][0, 2], render.K[0][1, 2]
    reader.camera_params = f"{fx},{fy},{cx},{cy}"
    database = tmp_path / "database.db"
    pycolmap.extract_features(database, images, camera_mode=pycolmap.CameraMode.SINGLE, reader_options=reader,
                              device=pycolmap.Device.cpu)  # fmt: skip
    pycolmap.match_exhaustive(database, device=pycolmap.Device.cpu)
    options = pycolmap.IncrementalPipelineOptions()
    options.ba_refine_focal_length = options.ba_refine_principal_point = options.ba_refine_extra_params = False
    models = pycolmap.incremental_mapping(database, images, tmp_path / "sparse", options=options)
    sfm_s = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[synth] 13 views 256²: render {render_s:.2f} s; pycolmap {sfm_s:.2f} s, models "
              f"{[m.num_reg_images() for m in models.values()]}")  # fmt: skip
    assert len(models) == 1 and models[0].num_reg_images() == 13
    found = {image.name: image.cam_from_world() for image in models[0].images.values()}
    rows = [render.names.index(name) for name in found]
    aligned = geometry.similarity_align_poses(
        np.array([pose.rotation.matrix() for pose in found.values()]),
        np.array([pose.translation for pose in found.values()]),
        render.R[rows],
        render.T[rows],
    )
    assert aligned.rotation_error_deg.max() < 2.0
    assert aligned.center_error.max() < 0.03 * cfg.radius
