"""Loading a capture: aligned depth with its poses and images, masks, the reference surface."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stages.cloud.config import Config
from stages.cloud.views import Views
from stages.core import dataset, io, worktree
from stages.core.errors import InputError


def load_views(work: Path, capture: str, images: Sequence[Path] | None = None) -> Views:
    """The aligned depth of a capture with its poses (and images), checked to belong together."""
    aligned_path = worktree.record_path(work, capture, "aligned")
    poses_path = worktree.record_path(work, capture, "poses")
    for path, hint in (
        (aligned_path, "run `nvf align WORK` first"),
        (poses_path, "run `nvf poses DATA --out WORK` first"),
    ):
        if not path.is_file():
            raise InputError(f"{path}: not found; {hint}")
    aligned = io.load_record(aligned_path, kind="aligned", capture=capture)
    poses = io.load_record(poses_path, kind="poses", capture=capture)
    names = list(aligned.names)
    pose_row = {name: i for i, name in enumerate(poses.names)}
    missing = [name for name in names if name not in pose_row]
    if missing:
        raise InputError(f"{aligned_path} and {poses_path} do not belong together: {len(missing)} view(s) "
                         f"without a pose (e.g. {missing[0]}); rerun nvf align after nvf poses")  # fmt: skip
    rows = [pose_row[name] for name in names]
    depth = np.asarray(aligned["depth"], dtype=np.float32)
    poses_hw = np.stack([poses["height"][rows], poses["width"][rows]], axis=1).astype(np.int64)
    image_hw = np.asarray(aligned["image_hw"], dtype=np.int64) if "image_hw" in aligned.tensors else poses_hw
    if image_hw.shape != poses_hw.shape or not np.array_equal(image_hw, poses_hw):
        bad = int(np.flatnonzero((image_hw != poses_hw).any(axis=1))[0]) if image_hw.shape == poses_hw.shape else 0
        raise InputError(f"{aligned_path} and {poses_path} do not belong together: they disagree on the size of "
                         f"{names[bad]}; rerun nvf align after nvf poses on the same images")  # fmt: skip
    map_h, map_w = depth.shape[1:]
    to_map = np.zeros((len(names), 3, 3))
    to_map[:, 0, 0] = map_w / poses_hw[:, 1]
    to_map[:, 1, 1] = map_h / poses_hw[:, 0]
    to_map[:, 2, 2] = 1.0
    K = to_map @ np.asarray(poses["K"], dtype=np.float64)[rows]
    R = np.asarray(poses["R"], dtype=np.float64)[rows]
    T = np.asarray(poses["T"], dtype=np.float64)[rows]
    pictures = None
    if images is not None:
        pictures = []
        for name, path, (h, w) in zip(names, images, poses_hw, strict=True):
            picture = io.read_image(path)
            if picture.shape[:2] != (h, w):
                raise InputError(f"{path}: image is {picture.shape[1]}x{picture.shape[0]} but the poses of {name} "
                                 f"say {w}x{h}; pass the --data the poses were made from")  # fmt: skip
            pictures.append(picture)
    quality = np.asarray(aligned["quality"]) if "quality" in aligned.tensors else None
    return Views(names, depth, K, R, T, pictures, quality)


def image_paths(
    work: Path, capture: str, names: Sequence[str], index: dataset.DatasetIndex | None
) -> list[Path] | None:
    """Where the images of `names` are: from the dataset index, else the poses record's image list,
    else the capture's transforms.json, else None."""
    if index is not None:
        found = next((c for c in index.captures if c.id == capture), None)
        if found is None:
            raise InputError(
                f"capture {capture} is not in the dataset {index.root}; pass the --data the work tree was made from"
            )
        by_name = {Path(entry.path).name: Path(index.root) / entry.path for entry in found.images}
    elif (recorded := worktree.recorded_image_paths(worktree.record_path(work, capture, "poses"))) is not None:
        by_name = recorded
    else:
        transforms = worktree.capture_dir(work, capture) / "transforms.json"
        if not transforms.is_file():
            return None
        by_name = {p.name: p for p in io.transforms_image_paths(transforms)}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise InputError(f"capture {capture}: no image for {len(missing)} view(s) (e.g. {missing[0]}) in the dataset; "
                         "pass the --data the work tree was made from")  # fmt: skip
    return [by_name[name] for name in names]


def load_masks(mask_dir: Path, names: Sequence[str], shape_hw: tuple[int, int]) -> np.ndarray:
    """[V, H, W] bool foreground masks (non-zero = keep), resampled nearest to the depth maps."""
    masks = []
    for name in names:
        candidates = [mask_dir / name, mask_dir / f"{Path(name).stem}.png"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise InputError(f"{mask_dir}: no mask for {name} (looked for {name} and {Path(name).stem}.png)")
        mask = io.read_image(path).max(axis=2) > 0
        rows = ((np.arange(shape_hw[0]) + 0.5) * mask.shape[0] / shape_hw[0]).astype(np.int64)
        cols = ((np.arange(shape_hw[1]) + 0.5) * mask.shape[1] / shape_hw[1]).astype(np.int64)
        masks.append(mask[rows][:, cols])
    return np.stack(masks)


def reference_path(cfg: Config, capture: str) -> Path | None:
    """The reference PLY of a capture: the file itself, or <folder>/<capture>/surface.ply."""
    if cfg.reference is None:
        return None
    path = Path(cfg.reference)
    path = path / capture / "surface.ply" if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"{path}: reference point cloud not found; pass a PLY or a folder of <capture>/surface.ply")
    return path
