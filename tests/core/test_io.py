"""Round trips and error paths of every on-disk format in stages.core.io."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from stages.core import geometry, io
from stages.core.errors import InputError, RecordError


def _poses(n: int = 4) -> dict[str, np.ndarray]:
    R, T = geometry.ring_pose(np.linspace(-45, 45, n), np.zeros(n), 3.0)
    K = np.tile(np.array([[100.0, 0, 32], [0, 100.0, 32], [0, 0, 1]]), (n, 1, 1))
    size = np.full(n, 64, dtype=np.int32)
    return {"R": R, "T": T, "K": K, "width": size, "height": size}


def _cameras(n: int = 4) -> io.CameraSet:
    p = _poses(n)
    return io.CameraSet([f"v{i}.png" for i in range(n)], p["R"], p["T"], p["K"], p["width"], p["height"])


# -- atomic writes ---------------------------------------------------------------------------------


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "out.json"
    io.write_json(target, {"a": np.float32(1.5), "b": np.arange(3)})
    assert json.loads(target.read_text()) == {"a": 1.5, "b": [0, 1, 2]}
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


# -- records ---------------------------------------------------------------------------------------


def test_record_round_trip_keeps_values_and_metadata(tmp_path):
    tensors = _poses()
    path = io.save_record(
        tmp_path / "poses.safetensors", tensors, kind="poses", stage="poses", capture="001_01_01_00",
        names=[f"v{i}.png" for i in range(4)], config={"mapper": "incremental"}, inputs_hash="abc",
        extra={"camera_ids": json.dumps(["110", "120", "090", "080"])},
    )  # fmt: skip
    record = io.load_record(path, kind="poses", capture="001_01_01_00")
    for key, value in tensors.items():
        np.testing.assert_array_equal(record[key], value)
        assert record[key].dtype == value.dtype
    assert record.names == ["v0.png", "v1.png", "v2.png", "v3.png"]
    assert record.config == {"mapper": "incremental"}
    assert record.inputs_hash == "abc" and record.stage == "poses" and record.kind == "poses"
    assert json.loads(record.extra["camera_ids"]) == ["110", "120", "090", "080"]
    assert "opencv_w2c" in record.extra["pose_convention"]
    assert record.nvf_version


def test_long_name_lists_go_into_tensors_and_load_back(tmp_path, monkeypatch):
    names = [f"session01/multiview/{i:03d}/01/05_1/ü{i}.png" for i in range(50)]
    tensors = {"R": np.zeros((50, 3, 3)), "T": np.zeros((50, 3)), "K": np.zeros((50, 3, 3)),
               "width": np.zeros(50, np.int32), "height": np.zeros(50, np.int32)}  # fmt: skip
    small = io.save_record(tmp_path / "small.safetensors", tensors, kind="poses", stage="s", capture="c", names=names)
    assert "names_storage" not in io.read_record_metadata(small)  # fits: as before, in the header
    monkeypatch.setattr(io.records, "NAMES_IN_HEADER_MAX", 100)  # as a 2M-image index would exceed 100 MB
    path = io.save_record(tmp_path / "big.safetensors", tensors, kind="poses", stage="s", capture="c", names=names)
    meta = io.read_record_metadata(path)
    assert meta["names_storage"] == "tensors" and meta["names"] == "[]"
    record = io.load_record(path, kind="poses")
    assert record.names == names and sorted(record.tensors) == sorted(tensors) and len(record) == 50
    assert io.load_record(small).names == names
    assert io.read_record_names(path) == io.read_record_names(small) == names  # without loading the tensors


def test_record_accepts_torch_tensors(tmp_path):
    torch = pytest.importorskip("torch")
    depth = torch.rand(2, 5, 7)
    path = io.save_record(tmp_path / "d.safetensors", {"depth": depth}, kind="depth", stage="depth",
                          capture="c", names=["a", "b"])  # fmt: skip
    np.testing.assert_array_equal(io.load_record(path, kind="depth")["depth"], depth.numpy())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.pop("K"), "missing tensor 'K'"),
        (lambda t: t.update(T=np.zeros((4, 4))), "tensor 'T' has shape [4, 4], expected [4, 3]"),
        (lambda t: t.update(R=np.zeros((3, 3, 3))), "tensor 'R' has shape [3, 3, 3], expected [4, 3, 3]"),
    ],
)
def test_record_shape_errors_name_the_tensor(tmp_path, mutate, message):
    tensors = _poses()
    mutate(tensors)
    with pytest.raises(RecordError, match=message.replace("[", r"\[").replace("]", r"\]")):
        io.save_record(tmp_path / "p.safetensors", tensors, kind="poses", stage="poses", capture="c",
                       names=[str(i) for i in range(4)])  # fmt: skip
    assert not (tmp_path / "p.safetensors").exists()


def test_record_symbolic_dims_must_agree(tmp_path):
    schema = {"a": ("N", "H"), "b": ("N", "H")}
    path = tmp_path / "x.safetensors"
    io.save_record(path, {"a": np.zeros((2, 3)), "b": np.zeros((2, 4))}, kind="other", stage="s", capture="c",
                   names=["p", "q"])  # fmt: skip
    with pytest.raises(RecordError, match=r"tensor 'b' has shape \[2, 4\], expected \[2, 3\]"):
        io.load_record(path, schema=schema)


def test_record_wrong_kind_capture_stage(tmp_path):
    path = io.save_record(tmp_path / "p.safetensors", _poses(), kind="poses", stage="synth", capture="001_01_01_00",
                          names=list("abcd"))  # fmt: skip
    with pytest.raises(RecordError, match="holds a 'poses' record where a 'depth' record was expected"):
        io.load_record(path, kind="depth")
    with pytest.raises(RecordError, match="belongs to capture '001_01_01_00', not '002_01_01_00'"):
        io.load_record(path, capture="002_01_01_00")
    with pytest.raises(RecordError, match="written by stage 'synth', expected 'poses'"):
        io.load_record(path, stage="poses")


def test_record_missing_and_corrupt_files(tmp_path):
    with pytest.raises(RecordError, match="record not found"):
        io.load_record(tmp_path / "nope.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(RecordError, match="not a readable safetensors file"):
        io.load_record(bad)
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(RecordError, match="not an nvf record"):
        io.load_record(tmp_path / "foreign.safetensors")


def test_hash_inputs_is_stable_and_content_based(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    assert io.hash_inputs(a, {"x": 1}) == io.hash_inputs(b, {"x": 1})
    assert io.hash_inputs(a, {"x": 1}) != io.hash_inputs(a, {"x": 2})
    assert len(io.hash_inputs("anything")) == 16


# -- images ----------------------------------------------------------------------------------------


def test_image_round_trip_png(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    path = io.write_image(tmp_path / "a.png", image)
    np.testing.assert_array_equal(io.read_image(path), image)
    assert io.image_size(path) == (7, 5)


def test_image_exif_orientation_is_applied(tmp_path):
    image = np.zeros((16, 24, 3), dtype=np.uint8)
    image[:4, :, 0] = 255  # top rows red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.fromarray(image).save(tmp_path / "r.jpg", exif=exif, quality=100)
    shown = io.read_image(tmp_path / "r.jpg")
    assert shown.shape == (24, 16, 3)
    assert shown[:, -2:, 0].mean() > 200 and shown[:, :8, 0].mean() < 30  # the red rows are now the right columns
    assert io.image_size(tmp_path / "r.jpg") == (16, 24)


def test_read_gray_reduces_by_box_averages_and_decodes_jpeg_at_scale(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (8, 12), dtype=np.uint8)
    path = io.write_image(tmp_path / "g.png", np.repeat(grey[..., None], 3, axis=2))
    np.testing.assert_allclose(io.read_gray(path), grey / 255, atol=1e-7)
    boxes = grey.reshape(4, 2, 6, 2).mean(axis=(1, 3)) / 255
    np.testing.assert_allclose(io.read_gray(path, reduce=2), boxes, atol=0.6 / 255)  # uint8 rounding
    assert io.read_gray(path, reduce=3).shape == (3, 4)  # partial boxes at the edges, as PIL's reduce
    smooth = np.kron(rng.integers(0, 256, (30, 40)), np.ones((8, 8))).astype(np.uint8)  # [240, 320]
    Image.fromarray(smooth).save(tmp_path / "s.jpg", quality=95)
    half = io.read_gray(tmp_path / "s.jpg", reduce=2)  # decoded at 1/2 scale by the JPEG decoder
    assert half.shape == (120, 160) and half.dtype == np.float32
    full = io.read_gray(tmp_path / "s.jpg")
    assert np.abs(half - full.reshape(120, 2, 160, 2).mean(axis=(1, 3))).mean() < 3 / 255
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "s.jpg").read_bytes()[:-200])
    with pytest.raises(InputError, match="cut.jpg: corrupt or unreadable image"):  # the scaled decode reads it all
        io.read_gray(tmp_path / "cut.jpg", reduce=2)
    with pytest.raises(InputError, match="nothing.png: image not found"):
        io.read_gray(tmp_path / "nothing.png")


def test_corrupt_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(InputError, match="broken.png: corrupt or unreadable image"):
        io.read_image(bad)
    truncated = tmp_path / "trunc.png"
    io.write_image(truncated, np.zeros((64, 64, 3), np.uint8) + 7)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(InputError, match="trunc.png"):
        io.read_image(truncated)


# -- PLY -------------------------------------------------------------------------------------------


def test_ply_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    points = rng.normal(size=(100, 3))
    colors = rng.integers(0, 256, (100, 3), dtype=np.uint8)
    normals = rng.normal(size=(100, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    path = io.write_ply(tmp_path / "c.ply", points, colors, normals)
    cloud = io.read_ply(path)
    np.testing.assert_allclose(cloud.points, points, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cloud.colors * 255, colors, atol=0.51)
    np.testing.assert_allclose(cloud.normals, normals, atol=1e-12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.ply"]


def test_ply_is_written_without_open3d_as_open3d_writes_it(tmp_path, monkeypatch):
    """numpy writes the PLY (a GPU box without Open3D can run synth and cloud's writer): same header
    properties and the same bytes after the header as Open3D's own writer, float colours included."""
    import open3d as o3d

    rng = np.random.default_rng(2)
    points, normals = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    colors = rng.uniform(size=(50, 3))
    colors[:3] = [[0.0, 1.0, 0.5], [0.499 / 255, 254.5 / 255, 1.0], [0.2, 0.4, 0.6]]
    reference = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points))
    reference.normals, reference.colors = o3d.utility.Vector3dVector(normals), o3d.utility.Vector3dVector(colors)
    o3d.io.write_point_cloud(str(tmp_path / "open3d.ply"), reference, write_ascii=False)
    monkeypatch.setitem(__import__("sys").modules, "open3d", None)  # `import open3d` fails while writing
    ours = io.write_ply(tmp_path / "nvf.ply", points, colors, normals).read_bytes()
    monkeypatch.undo()
    theirs = (tmp_path / "open3d.ply").read_bytes()
    split = b"end_header\n"

    def properties(data: bytes) -> list[bytes]:
        return [line for line in data.split(split)[0].splitlines() if line.startswith((b"element", b"property"))]

    assert properties(ours) == properties(theirs)
    assert ours.split(split, 1)[1] == theirs.split(split, 1)[1]
    with pytest.raises(ValueError, match="normals|nx"):
        io.write_ply(tmp_path / "bad.ply", points, None, normals[:10])


def test_ply_missing_is_input_error(tmp_path):
    with pytest.raises(InputError, match="point cloud not found"):
        io.read_ply(tmp_path / "none.ply")


# -- transforms.json -------------------------------------------------------------------------------


def test_transforms_round_trip_shared_intrinsics(tmp_path):
    cameras = _cameras()
    path = io.write_transforms(tmp_path / "transforms.json", cameras)
    doc = json.loads(path.read_text())
    assert doc["fl_x"] == 100.0 and "fl_x" not in doc["frames"][0]
    assert doc["frames"][0]["file_path"] == "images/v0.png"
    back = io.read_transforms(path)
    np.testing.assert_allclose(back.R, cameras.R, atol=1e-12)
    np.testing.assert_allclose(back.T, cameras.T, atol=1e-12)
    np.testing.assert_allclose(back.K, cameras.K)
    assert back.names == cameras.names


def test_transforms_carry_opencv_distortion_and_read_it_back(tmp_path):
    base = _cameras()
    distortion = np.zeros((len(base.names), 4))
    distortion[:, 0] = -0.05  # SIMPLE_RADIAL's k shared by the views
    cameras = dataclasses.replace(base, distortion=distortion)
    doc = json.loads(io.write_transforms(tmp_path / "t.json", cameras).read_text())
    assert doc["camera_model"] == "OPENCV" and doc["k1"] == -0.05 and doc["k2"] == doc["p1"] == doc["p2"] == 0.0
    np.testing.assert_array_equal(io.read_transforms(tmp_path / "t.json").distortion, distortion)
    distortion[1] = [0.01, -0.002, 0.0005, -0.0003]  # one camera differs: per-frame intrinsics
    doc = json.loads(io.write_transforms(tmp_path / "t2.json", cameras).read_text())
    assert "k1" not in doc and doc["frames"][1]["k2"] == -0.002
    np.testing.assert_array_equal(io.read_transforms(tmp_path / "t2.json").distortion, distortion)
    # pinhole cameras: zeros written, None read back
    assert io.read_transforms(io.write_transforms(tmp_path / "t3.json", base)).distortion is None


@pytest.mark.parametrize("model,params,expected", [
    ("SIMPLE_PINHOLE", [300, 128, 128], [0, 0, 0, 0]),
    ("PINHOLE", [300, 310, 128, 120], [0, 0, 0, 0]),
    ("SIMPLE_RADIAL", [300, 128, 128, -0.04], [-0.04, 0, 0, 0]),
    ("RADIAL", [300, 128, 128, -0.04, 0.01], [-0.04, 0.01, 0, 0]),
    ("OPENCV", [300, 310, 128, 120, -0.04, 0.01, 0.001, -0.002], [-0.04, 0.01, 0.001, -0.002]),
])  # fmt: skip
def test_opencv_distortion_of_colmap_models(model, params, expected):
    np.testing.assert_array_equal(io.opencv_distortion(model, params), expected)


def test_opencv_distortion_refuses_other_models():
    with pytest.raises(ValueError, match="OPENCV_FISHEYE"):
        io.opencv_distortion("OPENCV_FISHEYE", [300, 300, 128, 128, 0.1, 0, 0, 0])


def test_colmap_cameras_distortion_follows_each_views_source(caplog):
    sfm = {"model": "SIMPLE_RADIAL", "params": [300.0, 128.0, 128.0, -0.03]}
    cameras = {"a.png": sfm, "b.png": {**sfm, "from": "a.png"},  # interpolated: the nearest SfM view's
               "c.png": {"model": "PINHOLE", "from": "rig", "camera": "051"},  # through the rig: pinhole
               "d.png": {"model": "OPENCV_FISHEYE", "params": [300.0, 300.0, 128.0, 128.0, 0.1, 0.0, 0.0, 0.0]}}  # fmt: skip
    found = io.colmap_cameras_distortion(cameras, ["a.png", "b.png", "c.png", "d.png", "e.png"])
    np.testing.assert_array_equal(found[:, 0], [-0.03, -0.03, 0.0, 0.0, 0.0])
    assert "OPENCV_FISHEYE" in caplog.text  # said, not silently dropped
    assert io.colmap_cameras_distortion({"c.png": cameras["c.png"]}, ["c.png"]) is None


def test_transforms_per_frame_intrinsics_when_cameras_differ(tmp_path):
    cameras = _cameras()
    cameras.K[2, 0, 0] = 120.0
    doc = json.loads(io.write_transforms(tmp_path / "t.json", cameras).read_text())
    assert "fl_x" not in doc
    assert [f["fl_x"] for f in doc["frames"]] == [100.0, 100.0, 120.0, 100.0]
    np.testing.assert_allclose(io.read_transforms(tmp_path / "t.json").K, cameras.K)


def test_transforms_camera_centre_is_opengl_c2w_translation(tmp_path):
    cameras = _cameras()
    doc = json.loads(io.write_transforms(tmp_path / "t.json", cameras).read_text())
    c2w = np.array(doc["frames"][1]["transform_matrix"])
    np.testing.assert_allclose(c2w[:3, 3], geometry.camera_centers(cameras.R[1], cameras.T[1]), atol=1e-12)
    # OpenGL looks down -z: the camera's -z axis in world points at the origin the ring looks at
    forward = -c2w[:3, 2]
    np.testing.assert_allclose(forward, -c2w[:3, 3] / np.linalg.norm(c2w[:3, 3]), atol=1e-12)


def test_transforms_load_in_nerfstudio_dataparser(tmp_path):
    pytest.importorskip("nerfstudio")
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    cameras = _cameras(6)
    (tmp_path / "images").mkdir()
    for name in cameras.names:
        io.write_image(tmp_path / "images" / name, np.full((64, 64, 3), 128, np.uint8))
    io.write_transforms(tmp_path / "transforms.json", cameras)
    parser = NerfstudioDataParserConfig(data=tmp_path, eval_mode="all", auto_scale_poses=False,
                                        center_method="none", orientation_method="none").setup()  # fmt: skip
    outputs = parser.get_dataparser_outputs(split="train")
    assert len(outputs.image_filenames) == 6
    assert float(outputs.cameras.fx[0]) == 100.0
    # with no re-orientation, re-centring or scaling, nerfstudio's c2w equals ours
    c2w = geometry.opencv_w2c_to_opengl_c2w(cameras.R, cameras.T)[:, :3, :]
    np.testing.assert_allclose(outputs.cameras.camera_to_worlds.numpy(), c2w, atol=1e-5)


# -- COLMAP text -----------------------------------------------------------------------------------


def test_colmap_text_loads_in_pycolmap(tmp_path):
    pycolmap = pytest.importorskip("pycolmap")
    cameras = _cameras(5)
    points = np.random.default_rng(2).normal(size=(10, 3))
    folder = io.write_colmap_text(tmp_path / "sparse", cameras, points)
    reconstruction = pycolmap.Reconstruction(str(folder))
    assert reconstruction.num_images() == 5 and reconstruction.num_points3D() == 10
    assert reconstruction.num_cameras() == 1
    for image in reconstruction.images.values():
        i = cameras.names.index(image.name)
        cam_from_world = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        matrix = cam_from_world.matrix()
        np.testing.assert_allclose(matrix[:, :3], cameras.R[i], atol=1e-9)
        np.testing.assert_allclose(matrix[:, 3], cameras.T[i], atol=1e-9)


def test_colmap_text_tracks_and_camera_models_load_in_pycolmap(tmp_path):
    pycolmap = pytest.importorskip("pycolmap")
    cameras = _cameras(3)
    points = np.random.default_rng(3).normal(scale=0.3, size=(5, 3))
    offsets, rows, uv = [0], [], []
    for p, point in enumerate(points):  # point p is seen by every camera but the one at p % 3
        for i in range(3):
            if i != p % 3:
                projected, _z = geometry.project(point[None], cameras.K[i], cameras.R[i], cameras.T[i])
                rows.append(i)
                uv.append(projected[0])
        offsets.append(len(rows))
    models = [None, ("SIMPLE_RADIAL", [100.0, 32.0, 32.0, 0.0]), None]
    folder = io.write_colmap_text(tmp_path / "sparse", cameras, points, errors_n=np.arange(5) / 10,
                                  track_offsets=np.array(offsets), track_images=np.array(rows),
                                  track_uv=np.array(uv), camera_models=models)  # fmt: skip
    reconstruction = pycolmap.Reconstruction(str(folder))
    assert reconstruction.num_cameras() == 2 and reconstruction.compute_num_observations() == 10
    by_name = {image.name: image for image in reconstruction.images.values()}
    assert reconstruction.cameras[by_name["v1.png"].camera_id].model.name == "SIMPLE_RADIAL"
    for p in range(5):
        track = reconstruction.points3D[p + 1].track
        seen = sorted(reconstruction.images[e.image_id].name for e in track.elements)
        assert seen == [f"v{i}.png" for i in range(3) if i != p % 3]
        for e in track.elements:
            image = reconstruction.images[e.image_id]
            point2d = image.points2D[e.point2D_idx]
            assert point2d.point3D_id == p + 1
            # the observations are the projections: COLMAP reprojects them to within rounding
            np.testing.assert_allclose(image.project_point(points[p]), point2d.xy, atol=1e-9)
        assert reconstruction.points3D[p + 1].error == pytest.approx(p / 10)


def test_sparse_record_csr_tracks_are_checked(tmp_path):
    tensors = {
        "points": np.zeros((3, 3)), "colors": np.zeros((3, 3), np.uint8), "error": np.zeros(3),
        "track_offsets": np.array([0, 2, 4, 5]), "track_images": np.array([0, 1, 0, 2, 1]),
        "track_uv": np.zeros((5, 2)),
    }  # fmt: skip
    path = io.save_record(tmp_path / "s.safetensors", tensors, kind="sparse", stage="poses", capture="c",
                          names=["a", "b", "c"])  # fmt: skip
    assert io.load_record(path, kind="sparse")["track_offsets"].tolist() == [0, 2, 4, 5]
    tensors["track_offsets"] = np.array([0, 2, 5])
    with pytest.raises(RecordError, match=r"tensor 'track_offsets' has shape \[3\], expected \[4\]"):
        io.save_record(tmp_path / "s.safetensors", tensors, kind="sparse", stage="poses", capture="c",
                       names=["a", "b", "c"])  # fmt: skip


def test_records_are_byte_identical_when_saved_twice(tmp_path):
    meta = {"kind": "poses", "stage": "poses", "capture": "c", "names": list("abcd"), "config": {"b": 1, "a": 2},
            "extra": {f"key{i}": str(i) for i in range(20)}}  # fmt: skip
    first = io.save_record(tmp_path / "1.safetensors", _poses(), **meta).read_bytes()
    second = io.save_record(tmp_path / "2.safetensors", _poses(), **meta).read_bytes()
    assert first == second
    record = io.load_record(tmp_path / "2.safetensors", kind="poses")
    np.testing.assert_array_equal(record["R"], _poses()["R"])
    assert record.extra["key19"] == "19"


# -- contracts between stages ----------------------------------------------------------------------


def test_pose_source_tags_are_one_table_under_every_name():
    from stages import evaluate, poses, triplets

    assert io.POSE_SOURCES == {"sfm": 0, "rig": 1, "interp": 2}
    assert poses.SOURCES is io.POSE_SOURCES and triplets.POSE_SOURCES is io.POSE_SOURCES
    assert evaluate.POSE_SOURCES is io.POSE_SOURCES
    assert io.GROUNDTRUTH_STAGE == "groundtruth"


def test_depth_kind_reads_the_metadata_and_names_the_file_when_unknown(tmp_path):
    def saved(name, kind="depth", extra=None):
        tensors = {"depth": np.ones((2, 4, 4), np.float32)}
        if kind == "aligned":
            tensors.update(scale=np.ones(2), shift=np.zeros(2), residual_rms=np.zeros(2), inliers=np.ones(2))
        path = io.save_record(tmp_path / name, tensors, kind=kind, stage="t", capture="c", names=["a", "b"],
                              extra=extra)  # fmt: skip
        return io.load_record(path)

    assert io.DEPTH_KINDS == ("depth", "disparity")
    assert io.depth_kind(saved("plain.safetensors")) == "depth"  # no depth_kind: z-depth
    assert io.depth_kind(saved("z.safetensors", extra={"depth_kind": "depth"})) == "depth"
    assert io.depth_kind(saved("d.safetensors", extra={"depth_kind": "disparity"})) == "disparity"
    assert io.depth_kind(saved("al.safetensors", "aligned", {"source_depth_kind": "disparity"})) == "depth"
    odd = saved("odd.safetensors", extra={"depth_kind": "inverse"})
    with pytest.raises(InputError, match=r"odd\.safetensors: depth_kind 'inverse' is not one of depth, disparity"):
        io.depth_kind(odd)


def test_z_cond_layout_widths_order_and_joins():
    assert io.POSE_CODES == {"pose_code": 12, "zero123_code": 4}
    assert io.POSE_CODE_DIMS == {"paper": 12, "zero123": 4, "both": 16}
    assert io.POSE_LAYOUTS["both"] == ("zero123_code", "pose_code")  # Zero123's 4 first: [CLIP ‖ 4 ‖ 12]
    assert io.CONDITIONING_LAYOUTS == {"paper": "paper", "zero123": "both"}
    assert io.z_cond_dim(512, "paper") == 524 and io.z_cond_dim(768, "zero123") == 772
    assert io.z_cond_dim(768, "both") == 784
    codes = {"pose_code": np.arange(24.0).reshape(2, 12), "zero123_code": -np.arange(8.0).reshape(2, 4)}
    pose = io.pose_part(codes, "both")
    assert pose.shape == (2, 16) and pose[1, :4].tolist() == [-4, -5, -6, -7] and pose[1, 4] == 12
    clip = np.full((2, 3), 0.5)
    z = io.join_z_cond(clip, pose)
    assert z.dtype == np.float32 and z.shape == (2, 3 + 16) and z[0, :4].tolist() == [0.5, 0.5, 0.5, 0.0]
    np.testing.assert_array_equal(z[:, :3], clip)
    np.testing.assert_array_equal(z[:, 3:], pose)


def test_z_cond_of_torch_tensors_stays_torch():
    torch = pytest.importorskip("torch")
    clip, pose = torch.ones(2, 3, dtype=torch.float16), torch.zeros(2, 12, dtype=torch.float16)
    z = io.join_z_cond(clip, pose)
    assert isinstance(z, torch.Tensor) and z.dtype == torch.float16 and tuple(z.shape) == (2, 15)
    assert torch.equal(z[:, 3:], pose)


def test_without_clip_zeroes_the_clip_part_of_the_dropped_rows_only():
    torch = pytest.importorskip("torch")
    z = torch.arange(1.0, 11.0).reshape(2, 5)  # CLIP 3 + pose 2
    null = io.without_clip(z, 3)
    assert null.tolist() == [[0, 0, 0, 4, 5], [0, 0, 0, 9, 10]]
    kept = io.without_clip(z, 3, keep=torch.tensor([True, False]))
    assert kept.tolist() == [[1, 2, 3, 4, 5], [0, 0, 0, 9, 10]]
    assert z[0, 0] == 1  # the input is not changed
