"""Stage `reconstruct`: hand a posed view set to nerfstudio and bring back geometry and scores.

Input is one of
    - a capture folder of the work tree, ``WORK/<capture>/`` with ``poses.safetensors`` (images from
      ``data``, the dataset folder `nvf poses` read, else from the capture's exported
      ``transforms.json``); ``aligned.safetensors`` gives depth maps to ``depth-nerfacto`` and
      ``cloud.ply`` initial points to ``splatfacto`` when present;
    - a folder holding ``transforms.json`` and its images (what `nvf sample` writes, nerfstudio's
      convention, the input photo as frame 0).

Writes into ``out``:
    - ``dataset/``: a nerfstudio dataset (``images/`` hard-linked or copied, ``transforms.json`` with
      ``applied_transform`` = identity because the poses are written in nvf's world frame as they are,
      explicit ``train_filenames``/``val_filenames``/``test_filenames``, optional ``depths/`` 16-bit
      PNGs and ``points.ply``; with ``use_masks`` and ``WORK/<capture>/masks.safetensors`` present,
      ``masks/<stem>.png`` per frame (nerfstudio's convention: one channel, the image's size,
      255 = head ∪ hair, train on it; 0 = ignore) named by each frame's ``mask_path``);
    - ``<method>/``: nerfstudio's run folder (``config.yml``, ``nerfstudio_models/step-*.ckpt``,
      ``dataparser_transforms.json``, tensorboard events); ``nerfstudio.log`` holds its console output;
    - ``points.ply``: the reconstruction as coloured points in the input's own world frame;
      ``mesh.ply`` on request (Poisson on those points, Open3D);
    - ``recon_metrics.json`` (written last: it marks the run as complete and carries the input hash).

Convention:
    - Held-out views: rows ``i`` with ``i % eval_every == eval_every // 2`` in the input's row order
      (capture order: the ring by azimuth; sample order: frame 0 first), so held-out views lie between
      training views (interpolation). 13 ring views with ``eval_every=6`` hold out rows 3 and 9.
    - nerfstudio's dataparser maps the world to its own frame: x_ns = s (D x_world) with D the 3x4
      ``transform`` and s the ``scale`` of ``dataparser_transforms.json`` (applied_transform being
      identity, D is that file's transform). Exports are mapped back with x_world = D^-1 (x_ns / s).
    - Points: every training view is rendered at full resolution; a pixel whose accumulated opacity
      exceeds ``export_opacity`` (0.5, as nerfstudio's exporter) gives the point origin + t direction
      (t = nerfacto's ``expected_depth``, the weight-normalised ray distance, meaningful at any
      opacity; nerfstudio's exporter uses the median ``depth``), kept when inside the dataparser's
      [-1, 1]^3 box (nerfstudio's exporter default), then Open3D's statistical outlier removal.
      (nerfstudio's ``generate_point_cloud`` samples random training rays but loops until it has
      ``num_points`` opaque points: forever on an under-trained model.) Splatfacto exports the
      Gaussian centres whose opacity exceeds ``export_opacity``.
    - Metrics: nerfstudio's own ``Model.get_image_metrics_and_images`` per held-out view, on full
      renders: PSNR (torchmetrics, data range 1), SSIM and LPIPS (AlexNet, torchmetrics, inputs in
      0..1), ground truth blended with the model's background as nerfstudio does.

Offline: nothing is fetched at run time. nerfstudio builds LPIPS (torchvision AlexNet) with every
model; its weights must already be in the torch hub cache (`alexnet_weights_path`), else a
ModelError says how to provide them. depth-nerfacto without depth maps would fetch ZoeDepth from
torch hub: nvf requires ``aligned.safetensors`` instead. Training runs in-process with the viewer
off (``vis=tensorboard``) and nerfstudio's in-process VanillaDataManager (the ParallelDataManager
nerfacto defaults to spawns worker processes, a poor fit on CPU and inside other programs).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.core import batching, io, worktree
from stages.core import masks as headmasks
from stages.core.errors import InputError, ModelError, StageFailure

log = logging.getLogger("nvf")

STAGE = "reconstruct"
Method = Literal["nerfacto", "depth-nerfacto", "splatfacto"]
METHODS: tuple[str, ...] = typing.get_args(Method)
MIN_TRAIN_VIEWS = 2
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"
DEPTH_PNG_MAX = 65000  # largest 16-bit depth code used (headroom below 65535)
METRICS_FILE = "recon_metrics.json"


@dataclass(frozen=True)
class Config:
    """How a view set is reconstructed. nerfstudio's own defaults apply unless a field says otherwise."""

    method: Method = "nerfacto"
    """nerfstudio method: nerfacto, depth-nerfacto (needs aligned depth) or splatfacto (needs CUDA)."""
    iterations: int = 30000
    """Training iterations (nerfstudio's default; a few thousand already give a usable model)."""
    rays_per_batch: int | None = None
    """Rays per training batch (None: the method's default, 4096 for nerfacto); fewer is faster."""
    eval_every: int = 6
    """Hold out every k-th view (rows i with i % k == k // 2) for the metrics; k >= 2."""
    center: Literal["focus", "poses", "none"] = "focus"
    """Dataparser centring: `focus` (where the cameras look: the head of a ring), `poses` (mean camera
    centre, nerfstudio's default, off-centre for a half ring), `none`."""
    bounded: bool = False
    """Treat the scene as an object inside the dataparser's [-1, 1]^3 box (no scene contraction, far
    plane 3): right for plain backgrounds (synthetic captures, generated views), converges sooner.
    False keeps nerfstudio's unbounded scene, which also models a real background."""
    compact: bool = False
    """A smaller nerfacto for CPU: hash tables of 2^15 entries, finest resolution 512, 64+32 proposal
    and 32 NeRF samples per ray (nerfstudio: 2^19, 2048, 256+96, 48); enough for images <= 256 px."""
    export_opacity: float = 0.5
    """A rendered pixel gives a point when its accumulated opacity exceeds this (nerfstudio's exporter: 0.5);
    lower keeps more of an under-trained model's points."""
    export_points: int = 200_000
    """Most points in points.ply (a seeded subset when more pixels are opaque)."""
    export_scale: float = 1.0
    """Render the training views at this fraction of their resolution to export points (0.25: 16x fewer
    rays, for CPU runs; the held-out metrics always render at full resolution)."""
    mesh: bool = False
    """Also write mesh.ply: Poisson surface (Open3D) of the exported points with estimated normals."""
    use_masks: bool = True
    """A work capture with masks.safetensors (`nvf masks`): give nerfstudio each view's head mask
    (``mask_path``), so rays off the head (background, neck, clothes) are not trained on."""
    init_points: bool = True
    """splatfacto: start from WORK/<capture>/cloud.ply when present (else nerfstudio's random init)."""
    ns: tuple[tuple[str, str], ...] = ()
    """nerfstudio config overrides as (dotted path from TrainerConfig, value), applied last, e.g.
    ("pipeline.model.num_nerf_samples_per_ray", "32")."""
    seed: int = 42
    """Seed of nerfstudio's training (machine.seed) and of the point subset."""
    lpips: bool = True
    """Score held-out views with LPIPS as well (AlexNet weights from the torch hub cache, never
    downloaded). False: PSNR and SSIM only, LPIPS recorded as not computed (machines without the weights)."""


PRESETS: dict[str, Config] = {
    "default": Config(),
    "quick": Config(iterations=3000),
    "cpu": Config(iterations=2000, rays_per_batch=1024, compact=True),
    "object": Config(bounded=True),
    "test": Config(
        iterations=30, rays_per_batch=256, bounded=True, compact=True, export_opacity=0.0, export_points=20_000
    ),  # 30 CPU iterations leave nerfacto nearly transparent (opacity ~0.01)
}


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
# Offline checks
# ----------------------------------------------------------------------------------------------


def alexnet_weights_path() -> Path:
    """Where torchvision looks for AlexNet's weights: ``$TORCH_HOME/hub/checkpoints/alexnet-owt-7be5be79.pth``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def check_offline_assets() -> Path:
    """Raise ModelError unless the AlexNet weights LPIPS needs are cached (nvf never downloads them)."""
    path = alexnet_weights_path()
    if not path.is_file():
        raise ModelError(
            f"nerfstudio's LPIPS metric needs torchvision's AlexNet weights at {path} and nvf does not download "
            f"at run time: run `nvf fetch-models` where the network is reachable (or download {ALEXNET_URL} into "
            f"{path.parent}), or set TORCH_HOME to a torch cache that has hub/checkpoints/{ALEXNET_FILE}"
        )
    return path


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


# ----------------------------------------------------------------------------------------------
# nerfstudio configuration
# ----------------------------------------------------------------------------------------------


def build_trainer_config(cfg: Config, dataset_dir: Path, out: Path, device: str, depth_unit: float | None = None):
    """nerfstudio's TrainerConfig for ``cfg.method`` with nvf's settings, then ``cfg.ns`` overrides."""
    from nerfstudio.configs.method_configs import method_configs
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig

    config = copy.deepcopy(method_configs[cfg.method])
    config.output_dir = Path(out)
    config.experiment_name = ""
    config.timestamp = ""  # run folder: out/<method>
    config.method_name = cfg.method
    config.vis = "tensorboard"  # headless; the viewer would block after training
    config.viewer.quit_on_train_completion = True
    config.max_num_iterations = cfg.iterations
    config.steps_per_save = cfg.iterations
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 0
    config.logging.profiler = "none"
    config.machine.seed = cfg.seed
    config.machine.device_type = device
    if device == "cpu":
        config.mixed_precision = False
    manager = config.pipeline.datamanager
    if type(manager).__name__ == "ParallelDataManagerConfig":  # in-process loading (see module doc)
        shared = {f.name: getattr(manager, f.name) for f in dataclasses.fields(VanillaDataManagerConfig)
                  if f.name != "_target"}  # fmt: skip
        manager = config.pipeline.datamanager = VanillaDataManagerConfig(**shared)
    manager.data = Path(dataset_dir)
    manager.dataparser.data = Path(dataset_dir)
    manager.dataparser.center_method = cfg.center
    if depth_unit is not None:
        manager.dataparser.depth_unit_scale_factor = depth_unit
    if cfg.rays_per_batch is not None and hasattr(manager, "train_num_rays_per_batch"):
        manager.train_num_rays_per_batch = cfg.rays_per_batch
        manager.eval_num_rays_per_batch = cfg.rays_per_batch
    if device == "cpu" and hasattr(config.pipeline.model, "eval_num_rays_per_chunk"):
        config.pipeline.model.eval_num_rays_per_chunk = 4096  # bounds RAM of full-image renders
    apply_overrides(config, _method_settings(cfg))
    apply_overrides(config, cfg.ns)
    return config


BOUNDED_SETTINGS = (("pipeline.model.disable_scene_contraction", "true"), ("pipeline.model.far_plane", "3.0"))
COMPACT_SETTINGS = (("pipeline.model.log2_hashmap_size", "15"), ("pipeline.model.max_res", "512"),
                    ("pipeline.model.num_proposal_samples_per_ray", "[64, 32]"),
                    ("pipeline.model.num_nerf_samples_per_ray", "32"))  # fmt: skip


def _method_settings(cfg: Config) -> tuple[tuple[str, str], ...]:
    """The nerfstudio settings `bounded` and `compact` stand for (NeRF methods only)."""
    if cfg.method == "splatfacto":
        return ()
    return (BOUNDED_SETTINGS if cfg.bounded else ()) + (COMPACT_SETTINGS if cfg.compact else ())


def parse_overrides(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``["a.b=1", ...]`` -> ``(("a.b", "1"), ...)``; InputError for an item without '='."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"bad --ns '{item}': use KEY=VALUE with a dotted nerfstudio config path, e.g. "
                             "pipeline.model.num_nerf_samples_per_ray=32")  # fmt: skip
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def apply_overrides(config: Any, pairs: Sequence[tuple[str, str]]) -> None:
    """Set dotted paths on a nerfstudio config (dataclass attributes and dict keys).

    The value is parsed after the current one's type (bool, int, float, str, Path, tuple; YAML
    when the current value is None). Unknown keys and unparsable values are InputErrors.
    """
    import difflib

    for key, text in pairs:
        parent: Any = config
        parts = key.split(".")
        for depth, part in enumerate(parts):
            fields = _child_names(parent)
            if part not in fields:
                where = ".".join(parts[:depth]) or "the trainer config"
                close = difflib.get_close_matches(part, fields, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; it has: {', '.join(sorted(fields))}"
                raise InputError(f"unknown --ns key '{key}': {where} has no '{part}'{hint}")
            if depth == len(parts) - 1:
                current = parent[part] if isinstance(parent, dict) else getattr(parent, part)
                value = _parse_value(key, current, text)
                if isinstance(parent, dict):
                    parent[part] = value
                else:
                    setattr(parent, part, value)
            else:
                parent = parent[part] if isinstance(parent, dict) else getattr(parent, part)


def _child_names(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [str(k) for k in obj]
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj) if not f.name.startswith("_")]
    return []


def _parse_value(key: str, current: Any, text: str) -> Any:
    import yaml

    try:
        if isinstance(current, bool):
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes", "on")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, Path):
            return Path(text)
        if isinstance(current, str):
            return text
        if isinstance(current, (tuple, list)):
            parsed = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
            return type(current)(parsed)
        if dataclasses.is_dataclass(current) or isinstance(current, dict):
            raise ValueError("a group of options")
        return yaml.safe_load(text)
    except (ValueError, TypeError, yaml.YAMLError) as exc:
        raise InputError(f"bad --ns value for '{key}': '{text}' ({exc}); the current value is {current!r}") from None


# ----------------------------------------------------------------------------------------------
# Training (in-process)
# ----------------------------------------------------------------------------------------------


def train(config: Any, log_path: Path, progress: Callable[[int, int], None] | None = None):
    """Run nerfstudio's Trainer in this process; returns (trainer, seconds per iteration).

    nerfstudio's console output goes to ``log_path`` (stdout stays for results). Training errors
    become StageFailure; the run folder must hold config.yml, a checkpoint and the dataparser
    transform afterwards (nerfstudio can finish "successfully" without them).
    """
    import random

    import torch
    from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation
    from nerfstudio.utils import writer

    stamps: list[float] = []
    total = config.max_num_iterations

    def on_step(step: int) -> None:
        stamps.append(time.perf_counter())
        if progress is not None:
            progress(step + 1, total)

    random.seed(config.machine.seed)
    np.random.seed(config.machine.seed)
    torch.manual_seed(config.machine.seed)
    writer.EVENT_WRITERS.clear()
    writer.EVENT_STORAGE.clear()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as log_file, contextlib.redirect_stdout(log_file):
        try:
            config.save_config()
            trainer = config.setup(local_rank=0, world_size=1)
            trainer.setup()
            trainer.callbacks.append(TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], on_step,
                                                      update_every_num_iters=1))  # fmt: skip
            trainer.train()
        except torch.cuda.OutOfMemoryError:
            raise StageFailure("nerfstudio ran out of GPU memory; lower --rays-per-batch (or use "
                               "--ns pipeline.model.eval_num_rays_per_chunk=4096)") from None  # fmt: skip
        except (KeyboardInterrupt, SystemExit) as exc:
            if isinstance(exc, SystemExit) and exc.code in (0, None):
                raise StageFailure(f"nerfstudio exited before training finished; see {log_path}") from None
            raise
        except Exception as exc:
            raise StageFailure(f"nerfstudio training failed: {type(exc).__name__}: {exc} (log: {log_path})") from exc
        finally:
            _close_writers(writer)
    base = config.get_base_dir()
    missing = [p for p in (base / "config.yml", base / "dataparser_transforms.json") if not p.is_file()]
    if not missing and not list((base / "nerfstudio_models").glob("step-*.ckpt")):
        missing.append(base / "nerfstudio_models" / "step-*.ckpt")
    if missing:
        raise StageFailure(f"nerfstudio finished without writing {missing[0]}; see {log_path}")
    per_iteration = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return trainer, per_iteration


def _close_writers(writer: Any) -> None:
    for event_writer in writer.EVENT_WRITERS:
        tb = getattr(event_writer, "tb_writer", None)
        if tb is not None:
            tb.close()
    writer.EVENT_WRITERS.clear()
    writer.EVENT_STORAGE.clear()


# ----------------------------------------------------------------------------------------------
# Export and metrics
# ----------------------------------------------------------------------------------------------


def read_dataparser_transform(path: Path) -> tuple[np.ndarray, float]:
    """(D [4, 4], s) from nerfstudio's dataparser_transforms.json: x_ns = s (D x_world)."""
    doc = io.read_json(path)
    D = np.eye(4)
    D[:3] = np.asarray(doc["transform"], dtype=np.float64)[:3]
    return D, float(doc["scale"])


def to_world(points_n3: np.ndarray, D: np.ndarray, scale: float) -> np.ndarray:
    """Undo the dataparser: x_world = D^-1 (x_ns / s)."""
    points = np.asarray(points_n3, dtype=np.float64) / scale
    inverse = np.linalg.inv(D)
    return points @ inverse[:3, :3].T + inverse[:3, 3]


def render_points(pipeline: Any, max_points: int, seed: int, min_opacity: float = 0.5,
                  scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Points [P, 3] (dataparser frame) and colours [P, 3] in 0..1 from renders of the training views
    at `scale` x their resolution."""
    import torch

    model = pipeline.model
    if hasattr(model, "means") and hasattr(model, "opacities"):  # splatfacto: the Gaussians themselves
        keep = (torch.sigmoid(model.opacities).squeeze(-1) > min_opacity).detach().cpu().numpy()
        points = model.means.detach().cpu().numpy()[keep]
        colors = (0.5 + 0.28209479177387814 * model.features_dc.detach().cpu().numpy()[keep]).clip(0, 1)
        return points, colors
    cameras = copy.deepcopy(pipeline.datamanager.train_dataset.cameras).to(model.device)
    if scale != 1.0:
        cameras.rescale_output_resolution(scale)
    points, colors = [], []
    for i in range(len(cameras)):
        bundle = cameras.generate_rays(camera_indices=i, keep_shape=True)
        outputs = model.get_outputs_for_camera_ray_bundle(bundle)
        opaque = outputs["accumulation"][..., 0] > min_opacity
        depth = outputs.get("expected_depth", outputs["depth"])  # nerfacto's "depth" is the median
        xyz = bundle.origins + bundle.directions * depth
        inside = (xyz.abs() <= 1.0).all(dim=-1)
        keep = opaque & inside
        points.append(xyz[keep].detach().cpu().numpy())
        colors.append(outputs["rgb"][keep].detach().cpu().numpy())
    points_n3 = np.concatenate(points).astype(np.float64)
    colors_n3 = np.concatenate(colors).clip(0, 1).astype(np.float64)
    if len(points_n3) > max_points:
        pick = np.random.default_rng(seed).choice(len(points_n3), max_points, replace=False)
        points_n3, colors_n3 = points_n3[pick], colors_n3[pick]
    return points_n3, colors_n3


def clean_points(points_n3: np.ndarray, colors_n3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Open3D statistical outlier removal (20 neighbours, 2 sigma)."""
    if len(points_n3) < 30:
        return points_n3, colors_n3
    o3d = io.import_open3d()
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points_n3))
    _, kept = cloud.remove_statistical_outlier(nb_neighbors=20, std_ratio=2.0)
    kept = np.asarray(kept, dtype=np.int64)
    return points_n3[kept], colors_n3[kept]


def poisson_mesh(path: Path, points_n3: np.ndarray, colors_n3: np.ndarray, depth: int = 8) -> Path:
    """Screened Poisson surface of the points (normals estimated, oriented toward the cloud's outside)."""
    o3d = io.import_open3d()
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points_n3))
    cloud.colors = o3d.utility.Vector3dVector(colors_n3)
    extent = float(np.linalg.norm(points_n3.max(0) - points_n3.min(0)))
    cloud.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=0.05 * extent, max_nn=30))
    normals = np.asarray(cloud.normals)
    outward = np.sign(np.sum(normals * (points_n3 - points_n3.mean(0)), axis=1, keepdims=True))
    cloud.normals = o3d.utility.Vector3dVector(normals * np.where(outward == 0, 1, outward))
    mesh, density = o3d.geometry.TriangleMesh.create_from_point_cloud_poisson(cloud, depth=depth)
    density = np.asarray(density)
    mesh.remove_vertices_by_mask(density < np.quantile(density, 0.05))
    with io.atomic_path(path) as tmp:
        if not o3d.io.write_triangle_mesh(str(tmp), mesh):
            raise StageFailure(f"Open3D could not write {path}")
    return path


@contextlib.contextmanager
def without_lpips() -> Iterator[None]:
    """Models built inside get a stand-in for torchmetrics' LPIPS, so that building them loads no
    AlexNet weights; its score is NaN, and `evaluate_views(..., lpips=False)` drops it."""
    import torch
    from torchmetrics.image import lpip

    class NotComputed(torch.nn.Module):
        def forward(self, *_: Any, **__: Any) -> torch.Tensor:
            return torch.tensor(float("nan"))

    real = lpip.LearnedPerceptualImagePatchSimilarity
    lpip.LearnedPerceptualImagePatchSimilarity = lambda *_, **__: NotComputed()
    try:
        yield
    finally:
        lpip.LearnedPerceptualImagePatchSimilarity = real


def evaluate_views(pipeline: Any, lpips: bool = True) -> dict[str, dict[str, float]]:
    """nerfstudio's image metrics (psnr, ssim, and lpips unless `lpips` is False) per held-out view, by file name."""
    import torch

    model = pipeline.model
    names = [Path(p).name for p in pipeline.datamanager.eval_dataset.image_filenames]
    per_view: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for camera, batch in pipeline.datamanager.fixed_indices_eval_dataloader:
            outputs = model.get_outputs_for_camera(camera)
            metrics, _ = model.get_image_metrics_and_images(outputs, batch)
            per_view[names[int(batch["image_idx"])]] = {k: float(v) for k, v in metrics.items()
                                                        if lpips or k != "lpips"}  # fmt: skip
    return per_view


# ----------------------------------------------------------------------------------------------
# Stage entry point
# ----------------------------------------------------------------------------------------------


def validate(cfg: Config) -> None:
    """Reject bad settings before any work (method, counts, --ns keys)."""
    if cfg.method not in METHODS:
        raise InputError(f"unknown method '{cfg.method}'; choose one of: {', '.join(METHODS)}")
    if cfg.iterations < 1:
        raise InputError(f"--iterations must be >= 1, got {cfg.iterations}")
    if cfg.eval_every < 2:
        raise InputError(f"--eval-every must be >= 2 (hold out every k-th view), got {cfg.eval_every}")
    if cfg.rays_per_batch is not None and cfg.rays_per_batch < 1:
        raise InputError(f"--rays-per-batch must be >= 1, got {cfg.rays_per_batch}")
    if not 0.0 <= cfg.export_opacity < 1.0:
        raise InputError(f"export opacity must be in [0, 1), got {cfg.export_opacity}")
    if cfg.export_points < 1:
        raise InputError(f"export_points must be >= 1, got {cfg.export_points}")
    if not 0.0 < cfg.export_scale <= 1.0:
        raise InputError(f"export_scale must be in (0, 1], got {cfg.export_scale}")
    build_trainer_config(cfg, Path("."), Path("."), "cpu")  # unknown --ns keys fail here


def _device_type(device: str, method: str) -> str:
    chosen = batching.choose_device(device)
    if method == "splatfacto" and chosen.type != "cuda":
        raise InputError("splatfacto needs a CUDA GPU (gsplat rasterises with CUDA kernels only) and none is in use: "
                         "run on a GPU machine, or use --method nerfacto (or depth-nerfacto) on CPU")  # fmt: skip
    if chosen.type == "cuda" and (chosen.index or 0) != 0:
        raise InputError(f"nerfstudio trains on cuda:0 of the visible GPUs; to use {chosen}, set "
                         f"CUDA_VISIBLE_DEVICES={chosen.index} and pass --device cuda")  # fmt: skip
    return chosen.type


def inputs_hash(views: ViewSet, cfg: Config) -> str:
    """Hash of the image bytes, the poses (and depth, cloud) and the config."""
    cams = views.cameras
    arrays = [np.asarray(a, dtype=np.float64).round(9).tolist() for a in (cams.R, cams.T, cams.K, cams.width,
                                                                         cams.height)]  # fmt: skip
    extra: list[Any] = [io.hash_inputs(views.depth_nhw.tobytes())] if views.depth_nhw is not None else []
    if views.cloud_path is not None and cfg.method == "splatfacto" and cfg.init_points:
        extra.append(views.cloud_path)
    if views.masks_path is not None:
        extra.append(views.masks_path)
    return io.hash_inputs(dataclasses.asdict(cfg), cams.names, arrays, *views.image_paths, *extra)


def run(
    source: Path,
    out: Path,
    cfg: Config = Config(),
    *,
    data: Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Reconstruct the views of ``source`` (WORK/<capture> or a transforms.json folder) into ``out``.

    Returns the paths written: points.ply (+ mesh.ply), the run's config.yml and checkpoint, and
    recon_metrics.json; [] when ``out`` is up to date (same input hash) and not ``overwrite``.
    ``progress(done, total)`` reports training iterations.
    """
    validate(cfg)
    device_type = _device_type(device, cfg.method)
    # the input first: its errors are the user's
    views = load_views(Path(source), data=data, method=cfg.method, use_masks=cfg.use_masks)
    split_views(len(views.cameras.names), cfg.eval_every)  # too few views: fail before writing
    if cfg.lpips:
        check_offline_assets()
    out = Path(out)
    digest = inputs_hash(views, cfg)
    metrics_path = out / METRICS_FILE
    if not overwrite and _up_to_date(out, metrics_path, digest, cfg):
        log.info("reconstruct: %s up to date, skipped", out)
        return []
    if metrics_path.exists():
        metrics_path.unlink()  # the completion mark goes first, so a failed rerun never looks complete
    run_dir = out / cfg.method
    io.remove_owned_dir(run_dir)  # nerfstudio's previous run, in the folder nvf made for it; nothing else
    io.claim_dir(run_dir)
    split = write_dataset(out / "dataset", views, cfg)
    config = build_trainer_config(cfg, out / "dataset", out, device_type, split["depth_unit"])
    log.info("reconstruct: %s: %s for %d iterations on %s (%d train, %d held-out views)", views.name, cfg.method,
             cfg.iterations, device_type, len(split["train"]), len(split["eval"]))  # fmt: skip
    started = time.perf_counter()
    with contextlib.nullcontext() if cfg.lpips else without_lpips():
        trainer, per_iteration = train(config, out / "nerfstudio.log", progress)
    train_seconds = time.perf_counter() - started
    base = config.get_base_dir()
    pipeline = trainer.pipeline
    pipeline.eval()
    D, scale = read_dataparser_transform(base / "dataparser_transforms.json")
    with open(out / "nerfstudio.log", "a", encoding="utf-8") as log_file, contextlib.redirect_stdout(log_file):
        points_ns, colors = render_points(pipeline, cfg.export_points, cfg.seed, cfg.export_opacity, cfg.export_scale)
        per_view = evaluate_views(pipeline, lpips=cfg.lpips)
    points, colors = clean_points(to_world(points_ns, D, scale), colors)
    if len(points) == 0:
        raise StageFailure(f"the trained model has no opaque points to export (after {cfg.iterations} iterations); "
                           "train longer (--iterations) or lower --export-opacity")  # fmt: skip
    written = [io.write_ply(out / "points.ply", points, colors)]
    if cfg.mesh:
        written.append(poisson_mesh(out / "mesh.ply", points, colors))
    checkpoint = sorted((base / "nerfstudio_models").glob("step-*.ckpt"))[-1]
    written += [base / "config.yml", checkpoint]
    metrics = {k: float(np.mean([v[k] for v in per_view.values()])) for k in next(iter(per_view.values()))}
    report = {
        "stage": STAGE,
        "input": views.source,
        "name": views.name,
        "method": cfg.method,
        "iterations": cfg.iterations,
        "device": device_type,
        "seconds_per_iteration": finite_or_none(per_iteration),
        "train_seconds": train_seconds,
        "views": {"train": split["train"], "eval": split["eval"]},
        "eval_split": f"rows i with i % {cfg.eval_every} == {cfg.eval_every // 2} held out (input row order)",
        "metrics": metrics,
        "per_view": per_view,
        "metrics_source": "nerfstudio Model.get_image_metrics_and_images on full renders of the held-out views "
        + (
            "(PSNR data range 1, SSIM, LPIPS AlexNet from the torch hub cache)"
            if cfg.lpips
            else "(PSNR data range 1, SSIM; LPIPS not computed: lpips = false)"
        ),  # fmt: skip
        "lpips_weights": {"path": str(alexnet_weights_path()), "sha256": io.hash_file(alexnet_weights_path())}
        if cfg.lpips
        else None,
        "masks": str(views.masks_path) if views.masks_path is not None else "none",
        "export": {
            "points": int(len(points)),
            "frame": "the input's world frame (dataparser transform undone)",
            "mesh": bool(cfg.mesh),
        },
        "dataparser": {"transform": D[:3].tolist(), "scale": scale},
        "run_dir": str(base),
        "checkpoint": str(checkpoint),
        "config": cfg,
        "inputs": digest,
    }
    written.append(io.write_json(metrics_path, report))
    return written


def _up_to_date(out: Path, metrics_path: Path, digest: str, cfg: Config) -> bool:
    if (
        not metrics_path.is_file()
        or not (out / "points.ply").is_file()
        or (cfg.mesh and not (out / "mesh.ply").is_file())
    ):
        return False
    try:
        return json.loads(metrics_path.read_text()).get("inputs") == digest
    except (OSError, ValueError, AttributeError):
        return False


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: None for a non-finite figure."""
    return value if math.isfinite(value) else None
