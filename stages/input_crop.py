"""The input photo of `nvf sample`, framed as the model saw faces in training (`--crop`).

Modes:
    - ``face``: dlib's detector and 5-point landmarks (`stages.core.faces`) place a square around the
      best face: side = `FACE_FRAMING` x the detector box's side, centred between the eye centres and
      the box centre, raised by `FACE_RAISE` x the side of the box (the box spans brows to chin,
      about 0.6 of the head's height, so the head's centre lies above it). 2.5 boxes put the head at
      about 2/3 of the crop's height: the framing of nvf synth's 42° renders (head 65-70% of the
      height), which the Multi-PIE centre crops resemble; an estimate, `--crop-scale` changes it.
      No in-plane rotation: the square stays axis-aligned, so the crop changes intrinsics only.
    - ``center``: the largest centred square (what training's `preprocess_image` does).
    - ``none``: the whole photo, padded to a square with white (the background training composites on).
    - ``auto`` (the default): ``face`` when a face is found (and the extra ``nvf[face]`` is there),
      else ``center``, with a log line saying why.

A square reaching past the photo is padded with white. The box is recorded as ``[x0, y0, side]``
in the photo's pixels (x0, y0 = top-left corner, may be negative). Camera mapping (pixel centres at
+0.5 on both sides, the crop resized from `side` to `S` pixels): a crop pixel u' maps to
u = x0 + u' * side / S, so the photo's intrinsics are K_photo = [[f s, 0, x0 + cx s], [0, f s, y0 + cy s],
[0, 0, 1]] with s = side / S and (f, cx, cy) the model view's intrinsics (`photo_intrinsics`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from stages.core import faces
from stages.core.errors import InputError, ModelError

log = logging.getLogger("nvf")

CropMode = Literal["auto", "face", "center", "none"]
CROP_MODES = ("auto", "face", "center", "none")
FACE_FRAMING = 2.5
FACE_RAISE = 0.1
WHITE = 255


@dataclass(frozen=True)
class Crop:
    """A square crop of the photo: `image_ss3` uint8, `box` (x0, y0, side) px, the mode used, the face box."""

    image_ss3: np.ndarray
    box: tuple[int, int, int]
    mode: str
    face_box: tuple[int, int, int, int] | None = None
    note: str = ""

    def record(self, photo_hw: tuple[int, int], K_model: np.ndarray, size: int) -> dict[str, Any]:
        """What sample.json keeps: mode, box, face box, photo size and the photo's intrinsics."""
        return {"mode": self.mode, "box_x0_y0_side": list(self.box), "face_box_xyxy": self.face_box,
                "photo_width_height": [int(photo_hw[1]), int(photo_hw[0])], "note": self.note,
                "photo_K": photo_intrinsics(K_model, self.box, size).tolist()}  # fmt: skip


def square_crop(photo_hw3: np.ndarray, box: tuple[int, int, int]) -> np.ndarray:
    """Pixels of the square (x0, y0, side); parts outside the photo are white."""
    x0, y0, side = box
    h, w = photo_hw3.shape[:2]
    out = np.full((side, side, 3), WHITE, dtype=np.uint8)
    xs, ys = max(x0, 0), max(y0, 0)
    xe, ye = min(x0 + side, w), min(y0 + side, h)
    if xe > xs and ye > ys:
        out[ys - y0 : ye - y0, xs - x0 : xe - x0] = photo_hw3[ys:ye, xs:xe]
    return out


def center_box(height: int, width: int) -> tuple[int, int, int]:
    """The largest centred square (as `stages.train.data.preprocess_image` crops)."""
    side = min(height, width)
    return ((width - side) // 2, (height - side) // 2, side)


def padded_box(height: int, width: int) -> tuple[int, int, int]:
    """The smallest centred square holding the whole photo."""
    side = max(height, width)
    return (-((side - width) // 2), -((side - height) // 2), side)


def face_box(face: faces.Face, framing: float = FACE_FRAMING) -> tuple[int, int, int]:
    """The square of `framing` face boxes around a detected face (see the module docstring)."""
    x0, y0, x1, y1 = face.box
    box_side = max(x1 - x0, y1 - y0)
    center = 0.5 * (np.array([0.5 * (x0 + x1), 0.5 * (y0 + y1)]) + face.eye_centers_22.mean(0))
    center[1] -= FACE_RAISE * box_side
    side = max(8, round(framing * box_side))
    return (round(center[0] - side / 2), round(center[1] - side / 2), side)


def photo_intrinsics(K_model: np.ndarray, box: tuple[int, int, int], size: int) -> np.ndarray:
    """K [3, 3] of the photo's own pixels for a crop `box` resized to `size` px seen with `K_model`."""
    x0, y0, side = box
    s = side / size
    K = np.asarray(K_model, dtype=np.float64)
    return np.array([[K[0, 0] * s, 0.0, x0 + K[0, 2] * s], [0.0, K[1, 1] * s, y0 + K[1, 2] * s], [0.0, 0.0, 1.0]])


def crop_photo(photo_hw3: np.ndarray, mode: str = "auto", framing: float = FACE_FRAMING) -> Crop:
    """The photo framed by `mode` (InputError for an unknown mode, `face` without a face; ModelError for
    `face` without the extra)."""
    if mode not in CROP_MODES:
        raise InputError(f"unknown --crop '{mode}': choose one of {', '.join(CROP_MODES)}")
    if not framing > 0:
        raise InputError(f"--crop-scale must be positive (face boxes per crop side), got {framing}")
    h, w = photo_hw3.shape[:2]
    if mode == "none":
        box = padded_box(h, w)
        return Crop(square_crop(photo_hw3, box), box, "none")
    note = ""
    if mode in ("auto", "face"):
        reason = faces.unavailable_reason()
        if reason is not None and mode == "face":
            raise ModelError(f"--crop face: {reason}")
        face = faces.best_face(photo_hw3) if reason is None else None
        if face is not None:
            box = face_box(face, framing)
            return Crop(square_crop(photo_hw3, box), box, "face", tuple(int(v) for v in face.box))
        if mode == "face":
            raise InputError("--crop face: no face found in the photo; pass --crop center or a photo with a face")
        note = reason or "no face found in the photo"
        log.info("sample: %s; cropping the centre square instead (--crop center)", note)
    box = center_box(h, w)
    return Crop(square_crop(photo_hw3, box), box, "center", note=note)
