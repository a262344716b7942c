"""The inputs of `nvf reconstruct`: a posed view set from a work capture or a transforms.json folder,
the train / held-out split, and the nerfstudio dataset folder written from them."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.core import io, worktree
from stages.core import masks as headmasks
from stages.core.errors import InputError, StageFailure

if TYPE_CHECKING:
    from stages.reconstruct import Config

log = logging.getLogger("nvf")

MIN_TRAIN_VIEWS = 2
DEPTH_PNG_MAX = 65000  # largest 16-bit depth code used (headroom below 65535)


@dataclass(frozen=True)
class ViewSet:
    """Posed views to reconstruct, in input row order."""

    name: str  # capture id or folder name
    cameras: io.CameraSet
    image_paths: list[Path]
    depth_nhw: np.ndarray | None = None  # z-depth in the poses' units, 0 = invalid
    cloud_path: Path | None = None
    source: str = ""  # what the views came from (for the metrics file)
    masks: list[np.ndarray] | None = None  # per view: head mask [h, w] bool at the image's size
    masks_path: Path | None = None  # the masks record they came from


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def load_views(source: Path, *, data: Path | None = None, method: str = "nerfacto", use_masks: bool = True) -> ViewSet:
    """The posed views of a capture folder (poses.safetensors) or of a folder with transforms.json;
    a capture folder's head masks (masks.safetensors) come along with `use_masks`."""
    source = Path(source)
    if not source.is_dir():
        raise InputError(f"{source}: no such folder; pass WORK/<capture> (with poses.safetensors) or a folder "
                         "with transforms.json and its images")  # fmt: skip
    if (source / worktree.RECORD_FILES["poses"]).is_file():
        views = _capture_views(source, data, method)
        return _with_masks(views, source) if use_masks else views
    if (source / "transforms.json").is_file():
        return _transforms_views(source)
    raise InputError(f"{source}: no poses.safetensors and no transforms.json: run `nvf poses` first, or pass a "
                     "folder written by `nvf sample`")  # fmt: skip


def _capture_views(folder: Path, data: Path | None, method: str) -> ViewSet:
    record = io.load_record(folder / worktree.RECORD_FILES["poses"], kind="poses")
    names = list(record.names)
    cameras = io.CameraSet(names, record["R"], record["T"], record["K"], record["width"], record["height"],
                           io.record_distortion(record))  # fmt: skip
    paths = _capture_image_paths(folder, record.capture, names, data)
    depth = None
    aligned_path = folder / worktree.RECORD_FILES["aligned"]
    if method == "depth-nerfacto":
        if not aligned_path.is_file():
            raise InputError(f"{aligned_path}: depth-nerfacto needs aligned depth maps; run `nvf depth` and "
                             "`nvf align` first, or use --method nerfacto")  # fmt: skip
        aligned = io.load_record(aligned_path, kind="aligned", capture=record.capture)
        depth = _rows_by_name(aligned["depth"], aligned.names, names, aligned_path)
    cloud = folder / "cloud.ply"
    return ViewSet(record.capture or folder.name, cameras, paths, depth, cloud if cloud.is_file() else None,
                   source=str(folder))  # fmt: skip


def _with_masks(views: ViewSet, folder: Path) -> ViewSet:
    """`views` with each view's head mask at its image size, when the capture has a masks record."""
    path = folder / worktree.RECORD_FILES["masks"]
    if not path.is_file():
        return views
    record = headmasks.load_masks(path, views.name)
    masks_vhw = headmasks.view_head_masks(record, views.cameras.names)
    sizes = zip(np.asarray(views.cameras.height).astype(int), np.asarray(views.cameras.width).astype(int), strict=True)
    masks = [headmasks.resample_nearest(m[None], (h, w))[0] for m, (h, w) in zip(masks_vhw, sizes, strict=True)]
    empty = [n for n, m in zip(views.cameras.names, masks, strict=True) if not m.any()]
    if empty:
        log.warning("reconstruct: %s: %d view(s) have an empty head mask (nerfstudio trains nothing on them): %s",
                    views.name, len(empty), ", ".join(empty[:5]))  # fmt: skip
    return dataclasses.replace(views, masks=masks, masks_path=path)


def _capture_image_paths(folder: Path, capture: str, names: list[str], data: Path | None) -> list[Path]:
    """Image files of the poses' rows: from the dataset ``data``, else the poses record's image list,
    else the capture's transforms.json."""
    found: dict[str, Path] = {}
    where = ""
    if data is not None:
        from stages.core import dataset

        index = dataset.scan(data)
        match = [c for c in index.captures if c.id == capture]
        if not match:
            raise InputError(f"{data}: has no capture '{capture}' (the poses record's capture); pass the dataset "
                             "folder that `nvf poses` read")  # fmt: skip
        found = {Path(e.path).name: Path(data) / e.path for e in match[0].images}
        where = str(data)
    elif (recorded := worktree.recorded_image_paths(folder / worktree.RECORD_FILES["poses"])) is not None:
        found, where = recorded, "the poses record's image list"
    elif (folder / "transforms.json").is_file():
        found = {p.name: p for p in io.transforms_image_paths(folder / "transforms.json")}
        where = str(folder / "transforms.json")
    else:
        raise InputError(f"{folder}: the poses record does not say where the images are; pass --data DATA (the "
                         "dataset folder `nvf poses` read) or rerun `nvf poses --export transforms`")  # fmt: skip
    missing = [n for n in names if n not in found or not found[n].is_file()]
    if missing:
        raise InputError(f"{len(missing)} of {len(names)} posed views have no image in {where} (e.g. {missing[0]}); "
                         "the names must match the poses record: pass the dataset `nvf poses` read")  # fmt: skip
    return [found[n] for n in names]


def _rows_by_name(array: np.ndarray, have: Sequence[str], want: Sequence[str], path: Path) -> np.ndarray:
    index = {name: i for i, name in enumerate(have)}
    missing = [n for n in want if n not in index]
    if missing:
        raise InputError(f"{path}: no rows for {len(missing)} posed views (e.g. {missing[0]}); rerun `nvf align`")
    return array[[index[n] for n in want]]


def _transforms_views(folder: Path) -> ViewSet:
    cameras = io.read_transforms(folder / "transforms.json")
    paths = io.transforms_image_paths(folder / "transforms.json")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"{folder / 'transforms.json'}: {len(missing)} of {len(paths)} frames have no image "
                         f"(e.g. {missing[0]})")  # fmt: skip
    if len(set(cameras.names)) != len(cameras.names):
        raise InputError(f"{folder / 'transforms.json'}: frames share file names; give every view its own name")
    return ViewSet(folder.name, cameras, paths, source=str(folder))


def split_views(n_views: int, eval_every: int) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): rows i with i % eval_every == eval_every // 2 are held out."""
    held = [i for i in range(n_views) if i % eval_every == eval_every // 2]
    train = [i for i in range(n_views) if i % eval_every != eval_every // 2]
    if len(train) < MIN_TRAIN_VIEWS or not held:
        raise InputError(f"too few views to reconstruct: {n_views} views give {len(train)} for training and "
                         f"{len(held)} held out (eval every {eval_every}); need >= {MIN_TRAIN_VIEWS} and >= 1: "
                         "add views or change --eval-every")  # fmt: skip
    return train, held


# ----------------------------------------------------------------------------------------------
# The nerfstudio dataset
# ----------------------------------------------------------------------------------------------


def write_dataset(folder: Path, views: ViewSet, cfg: Config) -> dict[str, Any]:
    """Write a nerfstudio dataset folder (atomically); returns what the trainer config needs."""
    train, held = split_views(len(views.cameras.names), cfg.eval_every)
    names = views.cameras.names
    extra: list[dict[str, Any]] = [{} for _ in names]
    depth_unit = None
    with io.atomic_dir(folder) as tmp:
        (tmp / "images").mkdir()
        for name, path in zip(names, views.image_paths):
            _link_or_copy(path, tmp / "images" / name)
        if views.depth_nhw is not None:
            depth_unit = _write_depths(tmp / "depths", names, views.depth_nhw)
            for row, name in enumerate(names):
                extra[row]["depth_file_path"] = f"depths/{Path(name).stem}.png"
        if views.masks is not None:
            _write_masks(tmp / "masks", names, views.masks)
            for row, name in enumerate(names):
                extra[row]["mask_path"] = f"masks/{Path(name).stem}.png"
        io.write_transforms(tmp / "transforms.json", views.cameras, image_dir="images", extra_frames=extra,
                            applied_transform=np.eye(4)[:3])  # fmt: skip
        doc = io.read_json(tmp / "transforms.json")
        doc["train_filenames"] = [f"images/{names[i]}" for i in train]
        doc["val_filenames"] = doc["test_filenames"] = [f"images/{names[i]}" for i in held]
        if cfg.method == "splatfacto" and cfg.init_points and views.cloud_path is not None:
            _write_init_points(tmp / "points.ply", views.cloud_path)
            doc["ply_file_path"] = "points.ply"
        if depth_unit is not None:
            doc["nvf_depth_unit"] = depth_unit
        io.write_json(tmp / "transforms.json", doc)
    return {"train": [names[i] for i in train], "eval": [names[i] for i in held], "depth_unit": depth_unit}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _write_depths(folder: Path, names: Sequence[str], depth_nhw: np.ndarray) -> float:
    """16-bit PNG depth maps: code = round(z / unit), unit chosen so the deepest value fits; returns unit.

    nerfstudio reads them with OpenCV and multiplies by ``depth_unit_scale_factor`` (set to unit).
    """
    import cv2

    folder.mkdir()
    depth_nhw = np.nan_to_num(np.asarray(depth_nhw, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    depth_nhw = np.where(depth_nhw > 0, depth_nhw, 0.0)
    peak = float(depth_nhw.max())
    if not peak > 0:
        raise InputError("the aligned depth maps hold no valid depth (all <= 0); check `nvf align`'s output")
    unit = peak / DEPTH_PNG_MAX
    for name, depth_hw in zip(names, depth_nhw):
        codes_hw = np.clip(np.round(depth_hw / unit), 0, 65535).astype(np.uint16)
        if not cv2.imwrite(str(folder / f"{Path(name).stem}.png"), codes_hw):
            raise StageFailure(f"could not write depth map {folder / Path(name).stem}.png")
    return unit


def _write_masks(folder: Path, names: Sequence[str], masks: Sequence[np.ndarray]) -> None:
    """Single-channel 8-bit PNG masks, nerfstudio's convention: 255 = use the pixel, 0 = ignore it."""
    import cv2

    folder.mkdir()
    for name, mask_hw in zip(names, masks, strict=True):
        if not cv2.imwrite(str(folder / f"{Path(name).stem}.png"), np.where(mask_hw, 255, 0).astype(np.uint8)):
            raise StageFailure(f"could not write mask {folder / Path(name).stem}.png")


def _write_init_points(path: Path, cloud_path: Path) -> None:
    """Copy the cloud stage's points (nvf world = the dataset frame), with colours as splatfacto needs."""
    cloud = io.read_ply(cloud_path)
    colors = cloud.colors if cloud.colors is not None else np.full_like(cloud.points, 0.5)
    io.write_ply(path, cloud.points, colors)
