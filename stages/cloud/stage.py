"""The stage: fuse every selected capture of a work tree (`run`: plan, then fuse, per capture through
`contract.for_each_capture`; `fuse_capture` for one)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.cloud.config import _QUALITY_LEVEL, CLOUD_FILE, METRICS_FILE, STAGE, Config
from stages.cloud.fusion import build_cloud
from stages.cloud.loading import image_paths, load_masks, load_views, reference_path
from stages.cloud.scores import cloud_metrics, reference_metrics
from stages.core import dataset, io, worktree
from stages.core import masks as headmasks
from stages.core.contract import CaptureJob, Context, Write, for_each_capture
from stages.core.errors import InputError

log = logging.getLogger("nvf")


def work_captures(work: Path) -> list[dataset.Capture]:
    """The captures of a work tree: its sub-folders holding an aligned record."""
    return worktree.captures_with(work, "aligned", f"run nvf poses, depth and `nvf align {work}` into it first")


def _check_config(cfg: Config) -> None:
    checks = [
        (cfg.consistency_views >= 1, f"--consistency needs k >= 1 other views, got {cfg.consistency_views}"),
        (cfg.min_quality in _QUALITY_LEVEL, f"--min-quality must be failed, weak or good, got {cfg.min_quality!r}"),
        (0 < cfg.edge_angle < 90, f"edge angle must be between 0 and 90 degrees, got {cfg.edge_angle}"),
        (cfg.smooth_px >= 1, f"--smooth must be >= 1 pixel, got {cfg.smooth_px}"),
        (cfg.consistency_tolerance > 0, f"consistency tolerance must be positive, got {cfg.consistency_tolerance}"),
        (cfg.outlier_neighbors >= 1, f"outlier neighbours must be >= 1, got {cfg.outlier_neighbors}"),
        (cfg.outlier_std_ratio > 0, f"outlier std ratio must be positive, got {cfg.outlier_std_ratio}"),
        (cfg.voxel_pixels >= 0, f"--voxel must be >= 0 pixel footprints, got {cfg.voxel_pixels}"),
        (cfg.voxel_size is None or cfg.voxel_size > 0, f"--voxel-size must be positive, got {cfg.voxel_size}"),
        (cfg.uniformity_radius > 0, f"uniformity radius must be positive, got {cfg.uniformity_radius}"),
        (cfg.fscore_threshold is None or cfg.fscore_threshold > 0,
         f"--fscore-threshold must be positive, got {cfg.fscore_threshold}"),
        (cfg.depth_range is None or 0 <= cfg.depth_range[0] < cfg.depth_range[1],
         f"--depth-range needs 0 <= MIN < MAX, got {cfg.depth_range}"),
    ]  # fmt: skip
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    if cfg.mask_dir is not None and not Path(cfg.mask_dir).is_dir():
        raise InputError(f"{cfg.mask_dir}: mask folder not found")


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """Fuse every selected capture of ``ctx.work``; write ``<capture>/cloud.ply`` and ``cloud_metrics.json``.

    ``ctx.device`` (auto, cpu, cuda, cuda:N) is where back-projection runs; the outputs do not depend
    on it. ``ctx.data`` is the dataset the work tree was made from (for colours); without it the
    images are found through ``<capture>/transforms.json`` when present, else the cloud has no
    colours. Returns the paths written; captures whose outputs are up to date are skipped unless
    ``ctx.overwrite``.
    """
    _check_config(cfg)
    torch_device = None
    if ctx.device.strip().lower() != "cpu":
        from stages.core.batching import choose_device

        torch_device = choose_device(ctx.device)
    work = Path(ctx.work)
    index = dataset.scan(ctx.data) if ctx.data is not None else None
    return for_each_capture(ctx, STAGE, work_captures(work), lambda capture: plan_capture(work, capture, cfg, index),
                            lambda job: _fuse(work, job, cfg, torch_device))  # fmt: skip


def fuse_capture(work: Path, capture: str, cfg: Config, *, data: Path | None = None, overwrite: bool = False,
                 device: str = "cpu") -> list[Path]:  # fmt: skip
    """Fuse one capture; returns [cloud.ply, cloud_metrics.json], or [] when they are up to date."""
    return run(Context(Path(work), data=data, captures=[capture], overwrite=overwrite, device=device), cfg)


@dataclass(frozen=True)
class _Inputs:
    """What one capture's fusion reads."""

    images: list[Path] | None  # the views' image files (colours), None when not found
    reference: Path | None  # a reference surface to score against
    mask_files: list[Path]  # a --mask-dir's files, or the masks record
    use_record: bool  # the masks record holds the masks


def plan_capture(work: Path, capture: dataset.Capture, cfg: Config,
                 index: dataset.DatasetIndex | None) -> CaptureJob[_Inputs]:  # fmt: skip
    """The capture's outputs (the metrics JSON marks the pair complete) and the hash of what it reads."""
    aligned_path = worktree.record_path(work, capture.id, "aligned")
    names = io.load_record(aligned_path, kind="aligned", capture=capture.id).names if aligned_path.is_file() else []
    images = image_paths(work, capture.id, names, index)
    reference = reference_path(cfg, capture.id)
    folder = worktree.capture_dir(work, capture.id)
    cloud_path, metrics_path = folder / CLOUD_FILE, folder / METRICS_FILE
    mask_files = sorted(Path(cfg.mask_dir).iterdir()) if cfg.mask_dir else []
    masks_record = headmasks.masks_path(work, capture.id)
    use_record = not cfg.mask_dir and cfg.use_masks and masks_record.is_file()
    if use_record:
        mask_files = [masks_record]
    inputs = [aligned_path, worktree.record_path(work, capture.id, "poses"), *(images or []), *mask_files]
    inputs_hash = io.hash_inputs(STAGE, asdict(cfg), *[p for p in inputs if p.is_file()],
                                 *([reference] if reference else []))  # fmt: skip
    return CaptureJob(capture, (cloud_path, metrics_path), inputs_hash, _Inputs(images, reference, mask_files, use_record),
                      is_current=lambda: _up_to_date(cloud_path, metrics_path, inputs_hash))  # fmt: skip


def _fuse(work: Path, job: CaptureJob[_Inputs], cfg: Config, device: Any) -> Write:
    """Fuse one planned capture; returns what writes the cloud and then its metrics (the set's mark)."""
    capture, (cloud_path, metrics_path), inputs_hash = job.capture.id, job.outputs, job.inputs_hash
    images, reference, use_record = job.state.images, job.state.reference, job.state.use_record
    views = load_views(work, capture, images)
    if images is None:
        log.warning("cloud: %s: images not found (pass --data DATA); the cloud has no colours", capture)
    masks, mask_source = None, {"kind": "none"}
    if cfg.mask_dir:
        masks = load_masks(Path(cfg.mask_dir), views.names, views.depth_vhw.shape[1:])
        mask_source = {"kind": "mask_dir", "path": str(cfg.mask_dir)}
    elif use_record:
        found = headmasks.work_head_masks(work, capture, views.names, views.depth_vhw.shape[1:])
        if found is not None:
            masks = found[0]
            mask_source = {"kind": "masks_record", "path": str(found[1]), "classes": "head+hair"}
    fused = build_cloud(views, cfg, masks, label=f"capture {capture}", device=device,
                        mask_source=mask_source.get("path"))  # fmt: skip
    report: dict[str, Any] = {"capture": capture, "stage": STAGE, "inputs": inputs_hash, "config": asdict(cfg)}
    report["mask"] = mask_source
    report.update(cloud_metrics(fused, views, cfg))
    report["filters"] = [asdict(step) for step in fused.steps]
    report["colors"] = "images" if images is not None else "none"
    if reference is not None:
        scores = reference_metrics(fused.kept.points_n3, io.read_ply(reference).points, views, cfg)
        report["reference"] = {"path": str(reference), **scores}
    from stages import __version__

    report["nvf_version"] = __version__

    def write() -> list[Path]:
        io.write_ply(cloud_path, fused.kept.points_n3, fused.kept.colors_n3, fused.normals_n3)
        io.write_json(metrics_path, _finite_or_none(report))  # last: the mark of a complete pair
        log.info("cloud: %s: %d -> %d points, wrote %s", capture, len(fused.raw), len(fused.kept), cloud_path)
        return [cloud_path, metrics_path]

    return write


def _up_to_date(cloud_path: Path, metrics_path: Path, inputs_hash: str) -> bool:
    if not cloud_path.is_file() or not metrics_path.is_file():
        return False
    try:
        return io.read_json(metrics_path).get("inputs") == inputs_hash
    except InputError:
        return False


def _finite_or_none(obj: Any) -> Any:
    """NaN / inf -> None, so the JSON stays standard."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return None
    return obj
