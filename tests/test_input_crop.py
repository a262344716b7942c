"""`stages.input_crop`: the photo of `nvf sample` framed around its face, the centre or padded; the
box and the photo's intrinsics are recorded so cameras map back to the photo's pixels."""

from __future__ import annotations

import numpy as np
import pytest

from stages import input_crop
from stages.core import faces, io
from stages.core.errors import InputError, ModelError

K_MODEL = np.array([[60.0, 0.0, 32.0], [0.0, 60.0, 32.0], [0.0, 0.0, 1.0]])  # a 64 px view


def test_center_and_none_boxes_and_white_padding():
    photo = np.random.default_rng(0).integers(0, 200, (60, 100, 3), dtype=np.uint8)
    centre = input_crop.crop_photo(photo, "center")
    assert centre.box == (20, 0, 60) and np.array_equal(centre.image_ss3, photo[:, 20:80])
    whole = input_crop.crop_photo(photo, "none")
    assert whole.box == (0, -20, 100) and whole.image_ss3.shape == (100, 100, 3)
    assert (whole.image_ss3[:20] == 255).all() and np.array_equal(whole.image_ss3[20:80], photo)
    with pytest.raises(InputError, match="--crop"):
        input_crop.crop_photo(photo, "square")


def test_photo_intrinsics_map_crop_pixels_to_the_same_rays():
    box = (-7, 13, 128)
    K_photo = input_crop.photo_intrinsics(K_MODEL, box, 64)
    crop_uv = np.array([[0.5, 0.5], [10.5, 40.5], [63.5, 63.5]])
    photo_uv = np.array(box[:2]) + crop_uv * box[2] / 64  # pixel centres: u = x0 + u' side / S
    rays_crop = np.linalg.solve(K_MODEL, np.c_[crop_uv, np.ones(3)].T)
    rays_photo = np.linalg.solve(K_photo, np.c_[photo_uv, np.ones(3)].T)
    assert np.allclose(rays_crop, rays_photo, atol=1e-12)


def test_a_photo_without_a_face_falls_back_to_the_centre_unless_face_is_asked():
    pytest.importorskip("dlib")
    if faces.unavailable_reason():
        pytest.skip(faces.unavailable_reason())
    flat = np.full((80, 120, 3), 180, np.uint8)
    auto = input_crop.crop_photo(flat, "auto")
    assert auto.mode == "center" and auto.box == (20, 0, 80) and "no face" in auto.note
    with pytest.raises(InputError, match="no face found"):
        input_crop.crop_photo(flat, "face")


def test_without_the_extra_auto_crops_the_centre_and_face_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(faces.MODELS_ENV, str(tmp_path))
    faces._models.cache_clear()
    photo = np.full((50, 70, 3), 90, np.uint8)
    auto = input_crop.crop_photo(photo, "auto")
    assert auto.mode == "center" and "nvf[face]" in auto.note
    with pytest.raises(ModelError, match=r"nvf\[face\]"):
        input_crop.crop_photo(photo, "face")


def test_the_astronaut_is_framed_around_her_face(shared_data):
    pytest.importorskip("dlib")
    if faces.unavailable_reason():
        pytest.skip(faces.unavailable_reason())
    photo = io.read_image(shared_data / "astronaut.png")
    crop = input_crop.crop_photo(photo, "auto")
    assert crop.mode == "face"
    x0, y0, x1, y1 = crop.face_box
    cx, cy, side = crop.box
    assert side == round(input_crop.FACE_FRAMING * max(x1 - x0, y1 - y0))
    assert cx < x0 and cy < y0 and cx + side > x1 and cy + side > y1  # the face lies inside the square
    assert crop.image_ss3.shape == (side, side, 3)
    again = faces.best_face(crop.image_ss3)  # the framed face is found again, near the centre, same person
    assert again is not None
    middle = np.array([(again.box[0] + again.box[2]) / 2, (again.box[1] + again.box[3]) / 2]) / side
    assert np.all(np.abs(middle - 0.5) < 0.15)
    record = crop.record(photo.shape[:2], K_MODEL, 64)
    assert record["box_x0_y0_side"] == list(crop.box) and record["photo_width_height"] == [512, 512]
    assert np.allclose(np.asarray(record["photo_K"])[0, 0], 60.0 * side / 64)
