"""`stages.core.faces` (dlib, extra nvf[face]) and the identity section of `nvf evaluate --views`.

Measured on ../shared/data/astronaut.png (512 px; dlib 20.0.1): photo vs its bicubic 256 px copy
0.215 apart (cos 0.989), vs its mirror image 0.186, vs a crop around the face 0.000, vs the other
detection in the photo (a low-score box on the suit, not her face) 0.740; same person below 0.6.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from stages import evaluate
from stages.core import faces, io
from stages.core.errors import ModelError


def _dlib_ready() -> None:
    pytest.importorskip("dlib")
    reason = faces.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def astronaut(shared_data):
    _dlib_ready()
    path = shared_data / "astronaut.png"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return io.read_image(path)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def test_the_astronaut_is_found_and_matches_her_copies_not_other_faces(astronaut):
    found = faces.detect(astronaut)
    assert found and found[0].score > 1.0
    x0, y0, x1, y1 = found[0].box
    assert 150 < (x0 + x1) / 2 < 290 and 50 < (y0 + y1) / 2 < 190  # her face, upper middle of the photo
    eyes = found[0].eye_centers_22
    assert 30 < np.linalg.norm(eyes[0] - eyes[1]) < 60
    photo = faces.descriptor(astronaut, found[0])
    assert photo.shape == (128,)
    copies = faces.describe([_resize(astronaut, 256), astronaut[:, ::-1].copy(), astronaut[20:260, 100:340].copy()])
    assert copies.found_n.all()
    distances = faces.distance(photo, copies.descriptors_n128)
    assert np.all(distances < faces.SAME_PERSON_DISTANCE) and distances[0] > 0  # a real copy, not the same pixels
    assert np.all(faces.cosine(photo, copies.descriptors_n128) > 0.95)
    if len(found) > 1:  # the low-score second box of this photo is not her
        other = faces.descriptor(astronaut, found[1])
        assert faces.distance(photo, other[None])[0] > faces.SAME_PERSON_DISTANCE


def test_noise_has_no_face():
    _dlib_ready()
    noise = np.random.default_rng(0).integers(0, 256, (3, 128, 128, 3), dtype=np.uint8)
    described = faces.describe(list(noise))
    assert not described.found_n.any() and np.isnan(described.descriptors_n128).all()


def _views_folder(root, photo, generated):
    (root / "views").mkdir(parents=True)
    frames = [{"file": "views/000.png", "generated": False}]
    io.write_image(root / "views" / "000.png", photo)
    for k, image in enumerate(generated, start=1):
        io.write_image(root / "views" / f"{k:03d}.png", image)
        frames.append({"file": f"views/{k:03d}.png", "generated": True})
    (root / "sample.json").write_text(json.dumps({"frames": frames}))
    return root


def test_identity_section_rates_faces_and_identity(astronaut, tmp_path):
    photo = _resize(astronaut, 256)
    noise = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    views = _views_folder(tmp_path / "views", photo, [photo[:, ::-1].copy(), _resize(astronaut, 200), noise])
    cfg = evaluate.Config(identity="off", arcface="off", lpips="off", closed_loop="off")
    evaluate.evaluate(evaluate.Inputs(views=views), tmp_path / "report", cfg, device="cpu")
    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    rows = {(r["metric"], r["bucket"]): r for r in doc["figures"] if r["section"] == "identity"}
    assert rows[("dlib_face_rate", "all")]["value"] == pytest.approx(2 / 3)
    assert rows[("dlib_i2o_same_rate", "all")]["value"] == pytest.approx(2 / 3)  # the noise view counts as a miss
    assert rows[("dlib_i2o_distance", "all")]["value"] < 0.4 and rows[("dlib_i2o_distance", "all")]["n"] == 2
    assert rows[("dlib_o2o_distance", "all")]["value"] < 0.4
    per_view = {v["name"]: v for v in doc["identity"]["per_view"]}
    assert set(per_view) == {"001.png", "002.png", "003.png"}  # the input frame is the anchor, not a view
    assert per_view["003.png"]["face_found"] is False and "dlib_i2o_distance" not in per_view["003.png"]


def test_no_face_anywhere_is_reported_not_available(tmp_path):
    _dlib_ready()
    rng = np.random.default_rng(2)
    noise = rng.integers(0, 256, (3, 96, 96, 3), dtype=np.uint8)
    views = _views_folder(tmp_path / "views", noise[0], list(noise[1:]))
    cfg = evaluate.Config(identity="off", arcface="off", lpips="off", closed_loop="off")
    evaluate.evaluate(evaluate.Inputs(views=views), tmp_path / "report", cfg, device="cpu")
    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert "identity not available" in doc["identity"]["status"]
    rate = [r for r in doc["figures"] if r["metric"] == "dlib_face_rate" and r["bucket"] == "all"]
    assert rate[0]["value"] == 0.0
    assert not any(r["metric"].startswith("dlib_i2o_distance") for r in doc["figures"])
    assert "identity not available" in (tmp_path / "report" / "report.md").read_text()


def test_a_missing_extra_is_one_line_skipped_by_default_and_an_error_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv(faces.MODELS_ENV, str(tmp_path / "nowhere"))
    reason = faces.unavailable_reason()
    assert reason is not None and "pip install 'nvf[face]'" in reason and "\n" not in reason
    image = np.full((64, 64, 3), 128, np.uint8)
    views = _views_folder(tmp_path / "views", image, [image])
    cfg = evaluate.Config(identity="off", arcface="off", lpips="off", closed_loop="off")
    with pytest.raises(ModelError, match=r"nvf\[face\]"):
        on = dataclasses.replace(cfg, face_identity="on")
        evaluate.evaluate(evaluate.Inputs(views=views), tmp_path / "on", on, device="cpu")
    assert not (tmp_path / "on").exists()  # nothing half-written
    faces._models.cache_clear()
    with pytest.raises(ModelError, match=r"nvf\[face\]"):
        faces.detect(image)
    evaluate.evaluate(evaluate.Inputs(views=views), tmp_path / "auto", cfg, device="cpu")
    doc = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert any(s["metric"] == "dlib_identity" and "nvf[face]" in s["reason"] for s in doc["skipped"])
    faces._models.cache_clear()
