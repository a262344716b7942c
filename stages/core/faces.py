"""Faces offline: dlib's HOG detector, 5-point landmarks and 128-D ResNet identity descriptors.

The optional extra ``nvf[face]`` brings `dlib-bin` and `face-recognition-models` (the model files:
``shape_predictor_5_face_landmarks.dat``, ``dlib_face_recognition_resnet_model_v1.dat``); no model
hub is involved. `unavailable_reason()` says in one line what is missing and how to install it.

Convention:
    - Images are uint8 RGB [H, W, 3] (float images in [0, 1] are converted).
    - Boxes are ``(x0, y0, x1, y1)`` in pixels of the image given, dlib's integer corners; landmarks
      [5, 2] are dlib's pixel coordinates (x, y) in the order of its 5-point model: right eye outer,
      right eye inner, left eye outer, left eye inner (the subject's right/left), nose base.
    - Descriptors are dlib's 128-D vectors (norm ~1.3-1.5, not unit). Identity is their Euclidean
      distance: dlib's same-person threshold is `SAME_PERSON_DISTANCE` = 0.6 (99.38% on LFW).
      `cosine` is also given, to sit beside CLIP and ArcFace, whose natural measure it is.
    - A descriptor is computed on dlib's own aligned 150x150 chip (5-point similarity, padding 0.25).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core.errors import ModelError

SAME_PERSON_DISTANCE = 0.6
INSTALL_HINT = "install it with pip install 'nvf[face]' (dlib-bin and face-recognition-models)"
MODELS_ENV = "NVF_DLIB_MODELS"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
BACKBONE = "dlib face descriptor v1 (ResNet, 29 conv layers; 128-D; HOG detector, 5-point alignment)"


def models_folder() -> Path | None:
    """Folder holding dlib's model files: $NVF_DLIB_MODELS, else face-recognition-models' package data.

    The package is located without importing it (its __init__ needs pkg_resources, gone from new setuptools).
    """
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV])
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def unavailable_reason() -> str | None:
    """Why dlib face identity cannot run here (one line with the fix), or None when it can."""
    if importlib.util.find_spec("dlib") is None:
        return f"dlib face identity: dlib is not installed; {INSTALL_HINT}"
    folder = models_folder()
    if folder is None:
        return f"dlib face identity: the face-recognition-models package is not installed; {INSTALL_HINT}"
    missing = [name for name in (LANDMARKS_FILE, RECOGNITION_FILE) if not (folder / name).is_file()]
    if missing:
        return f"dlib face identity: {', '.join(missing)} not in {folder}; {INSTALL_HINT} (or set ${MODELS_ENV})"
    return None


@dataclass(frozen=True)
class Face:
    """One detected face: box (x0, y0, x1, y1) px, detector score, landmarks [5, 2] px."""

    box: tuple[int, int, int, int]
    score: float
    landmarks_52: np.ndarray

    @property
    def eye_centers_22(self) -> np.ndarray:
        """[[x, y] of the subject's right eye, [x, y] of the left eye] (mean of each eye's two corners)."""
        return np.stack([self.landmarks_52[0:2].mean(0), self.landmarks_52[2:4].mean(0)])


@functools.lru_cache(maxsize=1)
def _models() -> tuple[Any, Any, Any]:
    reason = unavailable_reason()
    if reason is not None:
        raise ModelError(reason)
    import dlib

    folder = models_folder()
    try:
        return (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(folder / LANDMARKS_FILE)),
                dlib.face_recognition_model_v1(str(folder / RECOGNITION_FILE)))  # fmt: skip
    except RuntimeError as exc:  # a truncated or foreign .dat file
        raise ModelError(f"dlib face identity: cannot load the models in {folder} ({exc}); {INSTALL_HINT}") from None


def _uint8(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"faces: expected an RGB image [H, W, 3], got shape {list(array.shape)}")
    return np.ascontiguousarray(array)


def detect(image_hw3: Any, upsample: int = 1) -> list[Face]:
    """Faces of an image, best detector score first (`upsample` 1 finds faces down to ~40 px)."""
    detector, predictor, _ = _models()
    image = _uint8(image_hw3)
    boxes, scores, _kinds = detector.run(image, upsample, 0.0)
    faces = []
    for box, score in zip(boxes, scores):
        shape = predictor(image, box)
        points = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float64)
        faces.append(Face((box.left(), box.top(), box.right(), box.bottom()), float(score), points))
    return sorted(faces, key=lambda f: -f.score)


def best_face(image_hw3: Any, upsample: int = 1) -> Face | None:
    """The face with the highest detector score, or None."""
    faces = detect(image_hw3, upsample)
    return faces[0] if faces else None


def descriptor(image_hw3: Any, face: Face) -> np.ndarray:
    """dlib's 128-D identity descriptor [128] of `face` in the image (on its aligned 150 px chip)."""
    import dlib

    _, predictor, recogniser = _models()
    image = _uint8(image_hw3)
    x0, y0, x1, y1 = face.box
    shape = predictor(image, dlib.rectangle(int(x0), int(y0), int(x1), int(y1)))
    return np.asarray(recogniser.compute_face_descriptor(image, shape), dtype=np.float64)


@dataclass(frozen=True)
class Described:
    """Per image: found [N] bool, descriptors [N, 128] (NaN rows where no face), faces (None where none)."""

    found_n: np.ndarray
    descriptors_n128: np.ndarray
    faces: list[Face | None]


def describe(images: Sequence[Any], upsample: int = 1) -> Described:
    """Detect the best face of each image and describe it."""
    rows, faces = [], []
    for image in images:
        face = best_face(image, upsample)
        faces.append(face)
        rows.append(descriptor(image, face) if face is not None else np.full(128, np.nan))
    found = np.array([f is not None for f in faces], dtype=bool)
    return Described(found, np.stack(rows) if rows else np.zeros((0, 128)), faces)


def distance(a_d: np.ndarray, b_nd: np.ndarray) -> np.ndarray:
    """Euclidean distances [N] between a descriptor [128] and rows [N, 128] (< 0.6: same person)."""
    return np.linalg.norm(np.asarray(b_nd) - np.asarray(a_d)[None], axis=-1)


def cosine(a_d: np.ndarray, b_nd: np.ndarray) -> np.ndarray:
    """Cosine similarities [N] between a descriptor [128] and rows [N, 128]."""
    a, b = np.asarray(a_d), np.asarray(b_nd)
    return (b @ a) / np.maximum(np.linalg.norm(b, axis=-1) * np.linalg.norm(a), 1e-12)


def pairwise(desc_n128: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distances, cosines) of every pair i < j of rows [N, 128], each [N (N - 1) / 2]."""
    desc = np.asarray(desc_n128)
    i, j = np.triu_indices(len(desc), k=1)
    dist = np.linalg.norm(desc[i] - desc[j], axis=-1)
    cos = np.sum(desc[i] * desc[j], axis=-1) / np.maximum(
        np.linalg.norm(desc[i], axis=-1) * np.linalg.norm(desc[j], axis=-1), 1e-12
    )
    return dist, cos
