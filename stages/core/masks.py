"""Head masks: the label mapping of face-parsing models and the ``masks`` record consumers read.

Convention: a masks record (``WORK/<capture>/masks.safetensors``, kind ``masks``, written by
`nvf masks`) holds ``classes`` [V, H, W] uint8, one of `CLASSES` per pixel at image resolution
(pixel centres at +0.5 as everywhere), and ``image_hw`` [V, 2] (each view's image size; views of a
capture whose images differ in size are stored at the first view's size). Metadata: ``classes``
(JSON id -> name), ``label_classes`` (JSON model label -> class name), ``model`` and
``model_fingerprint``. The *head mask* consumers use is head ∪ hair (`head_mask`); background,
neck and clothes are outside it.

Label mapping (`label_classes`), by the model's ``id2label`` names (case and separators ignored):
face parts, ears and earrings, glasses -> head; hair and hat -> hair (a hat sits where the hair
would be and belongs to the head's silhouette as photographed); neck, necklace, clothes, background
and any name not listed -> background. A model none of whose labels maps to head is refused.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import io, worktree
from stages.core.errors import InputError, RecordError

KIND = "masks"
CLASSES: dict[int, str] = {0: "background", 1: "head", 2: "hair"}
CLASS_IDS: dict[str, int] = {name: cid for cid, name in CLASSES.items()}

_HEAD = {
    "skin", "face", "nose", "eye_g", "eyeglasses", "glasses", "l_eye", "r_eye", "left_eye", "right_eye", "eye",
    "eyes", "l_brow", "r_brow", "left_eyebrow", "right_eyebrow", "brow", "eyebrow", "eyebrows", "l_ear", "r_ear",
    "left_ear", "right_ear", "ear", "ears", "ear_r", "earring", "mouth", "inner_mouth", "u_lip", "l_lip",
    "upper_lip", "lower_lip", "lip", "lips", "teeth", "head",
}  # fmt: skip
_HAIR = {"hair", "hat", "headwear", "beard", "facial_hair"}


def _normalise(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.strip().lower()).strip("_")


def label_classes(id2label: Mapping[Any, str]) -> np.ndarray:
    """[L] uint8: the class (`CLASSES`) of each label id 0..L-1 of a model's ``id2label``.

    InputError when the ids are not 0..L-1 or when no label maps to head (not a face-parsing model).
    """
    ids = sorted(int(key) for key in id2label)
    if ids != list(range(len(ids))) or not ids:
        raise InputError(f"the model's labels are not numbered 0..L-1 (got ids {ids[:5]}...); not a segmentation model")
    labels = {int(key): str(value) for key, value in id2label.items()}
    table = np.zeros(len(ids), dtype=np.uint8)
    for lid, label in labels.items():
        name = _normalise(label)
        table[lid] = CLASS_IDS["head"] if name in _HEAD else CLASS_IDS["hair"] if name in _HAIR else 0
    if not (table == CLASS_IDS["head"]).any():
        raise InputError(
            f"none of the model's {len(ids)} labels ({', '.join(list(labels.values())[:6])}, ...) is a face part: "
            "pass a face-parsing model (e.g. jonathandinu/face-parsing) to --model"
        )
    return table


def label_map_json(id2label: Mapping[Any, str], table: np.ndarray) -> str:
    """``{label name: class name}`` as JSON, for the record's metadata."""
    names = {int(key): str(value) for key, value in id2label.items()}
    return json.dumps({names[i]: CLASSES[int(c)] for i, c in enumerate(table)})


def classes_from_logits(logits_blhw: Any, table_l: Any, out_hw: tuple[int, int]) -> Any:
    """Class maps [B, H, W] uint8 (torch) from label logits [B, L, h, w]: each image's logits are
    resampled bilinearly to `out_hw` (align_corners False: pixel centres line up), the argmax taken
    over labels, and the label mapped through `table_l` [L] (a torch uint8 tensor)."""
    import torch

    out = torch.empty((logits_blhw.shape[0], *out_hw), dtype=torch.uint8, device=logits_blhw.device)
    for i in range(logits_blhw.shape[0]):  # one at a time: L x H x W floats per image, not per batch
        up = torch.nn.functional.interpolate(logits_blhw[i : i + 1].float(), size=out_hw, mode="bilinear",
                                             align_corners=False)  # fmt: skip
        out[i] = table_l[up[0].argmax(dim=0)]
    return out


def head_mask(classes_vhw: np.ndarray) -> np.ndarray:
    """[V, H, W] bool: head ∪ hair."""
    return np.asarray(classes_vhw) > 0


def masks_path(work: str | os.PathLike, capture: str) -> Path:
    """``WORK/<capture>/masks.safetensors``."""
    return worktree.record_path(work, capture, KIND)


def load_masks(path: str | os.PathLike, capture: str | None = None) -> io.Record:
    """A masks record, checked: kind, capture, shapes, and every value a class of `CLASSES`."""
    record = io.load_record(path, kind=KIND, capture=capture)
    classes = record["classes"]
    if classes.dtype != np.uint8 or (classes.size and int(classes.max()) >= len(CLASSES)):
        raise RecordError(f"{path}: 'classes' must hold uint8 values 0..{len(CLASSES) - 1} "
                          f"(got {classes.dtype}); the record is damaged: delete it and rerun nvf masks")  # fmt: skip
    return record


def resample_nearest(mask_vhw: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Masks [V, h, w] resampled nearest to [V, H, W], pixel centre to pixel centre."""
    height, width = mask_vhw.shape[1:]
    rows = ((np.arange(shape_hw[0]) + 0.5) * height / shape_hw[0]).astype(np.int64)
    cols = ((np.arange(shape_hw[1]) + 0.5) * width / shape_hw[1]).astype(np.int64)
    return mask_vhw[:, rows][:, :, cols]


def view_head_masks(record: io.Record, names: Sequence[str], shape_hw: tuple[int, int] | None = None) -> np.ndarray:
    """[V, H, W] bool head masks of `names` (in that order) from a masks record, resampled nearest to
    `shape_hw` (None: as stored). InputError when a view has no mask."""
    row = {name: i for i, name in enumerate(record.names)}
    missing = [name for name in names if name not in row]
    if missing:
        raise InputError(f"{record.path}: no mask for {len(missing)} view(s) (e.g. {missing[0]}); "
                         "rerun `nvf masks DATA --out WORK --overwrite` on the same images")  # fmt: skip
    masks = head_mask(record["classes"][[row[name] for name in names]])
    return masks if shape_hw is None else resample_nearest(masks, tuple(shape_hw))


def work_head_masks(
    work: str | os.PathLike, capture: str, names: Sequence[str], shape_hw: tuple[int, int] | None = None
) -> tuple[np.ndarray, Path] | None:
    """(head masks [V, H, W] bool, record path) of a capture's views when ``WORK/<capture>/masks.safetensors``
    exists, else None. A record that exists but is damaged or lacks a view is an error, never ignored."""
    path = masks_path(work, capture)
    if not path.is_file():
        return None
    return view_head_masks(load_masks(path, capture), names, shape_hw), path
