"""Multi-PIE naming, the camera table, scanning, filters and protocols."""

from __future__ import annotations

import pytest

from stages.core import dataset
from stages.core.errors import InputError
from tests.helpers import make_multipie_tree, write_tiny_png


def test_camera_table_matches_the_paper():
    ring = [(cam, dataset.MULTIPIE_CAMERAS[cam].azimuth_deg) for cam in dataset.RING_CAMERAS]
    assert ring[0] == ("110", -90.0) and ring[6] == ("051", 0.0) and ring[-1] == ("240", 90.0)
    assert [a for _, a in ring] == [-90.0 + 15 * i for i in range(13)]
    assert len(dataset.MULTIPIE_CAMERAS) == 15
    assert dataset.MULTIPIE_CAMERAS["051"].folder == "05_1"
    assert all(dataset.MULTIPIE_CAMERAS[c].elevation_deg > 0 for c in dataset.ELEVATED_CAMERAS)


def test_names_and_paths():
    assert dataset.parse_multipie_name("001_02_02_051_07.png") == ("001", "02", "02", "051", "07")
    assert dataset.parse_multipie_name("001_02_02_999_07.png") is None  # unknown camera
    assert dataset.parse_multipie_name("img_0001.png") is None
    assert dataset.multipie_filename(1, 2, 2, "051", 7) == "001_02_02_051_07.png"
    assert str(dataset.multipie_relpath(1, 1, 1, "051", 0)) == "session01/multiview/001/01/05_1/001_01_01_051_00.png"
    assert dataset.capture_id(12, 3, 2, 18) == "012_03_02_18"
    assert dataset.expression_of("02", "03") == "squint"
    assert dataset.expression_of("04", "02") == "scream"


def test_scan_released_layout_groups_captures_in_camera_order(tmp_path):
    make_multipie_tree(tmp_path, subjects=(1, 2), sessions=(1, 2), recordings=(1,), shots=(0, 7))
    index = dataset.scan(tmp_path)
    assert index.layout == "multipie"
    assert len(index.captures) == 2 * 2 * 2
    capture = index.captures[0]
    assert capture.id == "001_01_01_00" and capture.expression == "neutral"
    assert capture.cameras == list(dataset.RING_CAMERAS) + list(dataset.ELEVATED_CAMERAS)
    summary = index.summary()
    assert summary["subjects"] == 2 and summary["per_camera"]["051"] == 8 and summary["cameras_per_capture"] == {15: 8}
    assert index.warnings == ()


def test_scan_paper_layout_parses_names_not_depth(tmp_path):
    # the paper's tree 001/02/05_1/<file> scans like the released one
    for camera in dataset.RING_CAMERAS:
        write_tiny_png(tmp_path / "001" / "02" / dataset.MULTIPIE_CAMERAS[camera].folder /
                       dataset.multipie_filename(1, 2, 2, camera, 7))  # fmt: skip
    index = dataset.scan(tmp_path, "multipie")
    assert [c.id for c in index.captures] == ["001_02_02_07"]
    assert index.captures[0].expression == "surprise"
    assert "2 of 15 cameras missing (081, 191)" in index.warnings[0]


def test_filters_and_protocols(tmp_path):
    make_multipie_tree(tmp_path, subjects=(1, 2, 3), sessions=(1, 2), recordings=(1, 2), shots=(0, 1, 7))
    index = dataset.scan(tmp_path)
    assert len(index.captures) == 3 * 2 * 2 * 3
    kept = dataset.apply_filters(index, dataset.Filters(subjects=("002",), cameras=("051", "050")))
    assert {c.subject for c in kept.captures} == {"002"} and all(len(c.images) == 2 for c in kept.captures)
    # E: frontal, no flash, every expression
    e = dataset.apply_filters(index, dataset.Filters(protocol="E"))
    assert {c.shot for c in e.captures} == {"00"} and all(c.cameras == ["051"] for c in e.captures)
    assert {c.expression for c in e.captures} == {"neutral", "smile", "surprise"}
    # P: 13 ring cameras, neutral; a user's illumination choice still applies
    p = dataset.apply_filters(index, dataset.Filters(protocol="P", shots=("07",)))
    assert len(p.captures) == 3 * 2 and all(len(c.images) == 13 for c in p.captures)
    assert {c.expression for c in p.captures} == {"neutral"} and {c.shot for c in p.captures} == {"07"}
    # M: flashes only; U: ambient only
    assert {c.shot for c in dataset.apply_filters(index, dataset.Filters(protocol="M")).captures} == {"01", "07"}
    assert {c.shot for c in dataset.apply_filters(index, dataset.Filters(protocol="U")).captures} == {"00"}
    # a choice outside the protocol matches nothing rather than everything
    assert dataset.apply_filters(index, dataset.Filters(protocol="U", shots=("07",))).captures == ()


def test_scan_plain_folders(tmp_path):
    for name in ("a.jpg", "b.png"):
        write_tiny_png(tmp_path / "orbit1" / name)
    write_tiny_png(tmp_path / "orbit2" / "x.png")
    index = dataset.scan(tmp_path)
    assert index.layout == "folder"
    assert [(c.id, c.names) for c in index.captures] == [("orbit1", ["a.jpg", "b.png"]), ("orbit2", ["x.png"])]
    assert "only 1 image" in index.warnings[0]


def test_parse_ids():
    assert dataset.parse_ids(["1-3,7", "010"], 3, "subject") == ("001", "002", "003", "007", "010")
    with pytest.raises(InputError, match="bad subject 'x1'"):
        dataset.parse_ids(["x1"], 3, "subject")
    with pytest.raises(InputError, match="the end is before the start"):
        dataset.parse_ids(["5-2"], 3, "subject")


@pytest.mark.parametrize(
    ("setup", "layout", "message"),
    [
        (lambda root: None, "auto", "no such folder"),
        (lambda root: root.mkdir(), "auto", "no images found"),
        (lambda root: write_tiny_png(root / "a.png"), "sideways", "unknown layout 'sideways'"),
        (lambda root: write_tiny_png(root / "001_01_01_051_0.png"), "multipie", "do not follow the Multi-PIE naming"),
    ],
)
def test_scan_bad_input(tmp_path, setup, layout, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(InputError, match=message):
        dataset.scan(root, layout)


def test_scan_mixed_names_and_duplicates(tmp_path):
    write_tiny_png(tmp_path / "a" / "001_01_01_051_00.png")
    write_tiny_png(tmp_path / "a" / "holiday.png")
    with pytest.raises(InputError, match=r"1 of 2 images do not follow .* first: a/holiday.png"):
        dataset.scan(tmp_path)
    (tmp_path / "a" / "holiday.png").unlink()
    write_tiny_png(tmp_path / "b" / "001_01_01_051_00.png")
    with pytest.raises(InputError, match="occur more than once, e.g. 001_01_01_051_00.png"):
        dataset.scan(tmp_path)
