"""Alignment of one capture (`align_views`, `align_capture`, in named steps) and the stage (`run`)."""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.align.config import QUALITY, STAGE, Config, FitSpace
from stages.align.estimators import fit_scale_shift
from stages.align.samples import (
    _image_hw,
    _load_views,
    _pad,
    _sample_mask,
    _Views,
    depth_samples,
    sparse_samples,
    view_samples,
)
from stages.core import dataset, depthmaps, io, worktree
from stages.core import masks as headmasks
from stages.core.contract import CaptureJob, Context, Write, for_each_capture
from stages.core.errors import InputError, StageFailure

log = logging.getLogger("nvf")


@dataclass(frozen=True)
class Aligned:
    """What `align_views` returns: z-depth [N, H, W] float32 and per-view figures [N]."""

    depth_nhw: np.ndarray
    scale: np.ndarray
    shift: np.ndarray
    residual_rms: np.ndarray
    inliers: np.ndarray
    nonpositive: np.ndarray
    samples: np.ndarray  # [N] reference samples of each view
    residual_rel: np.ndarray  # [N] residual_rms / the view's median reference z
    quality: np.ndarray  # [N] int8, `QUALITY`


def to_fit_space(z: np.ndarray, space: FitSpace) -> np.ndarray:
    """z-depth -> the fit's target: 1/z for disparity, z for depth."""
    with np.errstate(divide="ignore"):
        return 1.0 / z if space == "disparity" else z


def apply_fit(depth_nhw: np.ndarray, valid_nhw: np.ndarray, scale: np.ndarray, shift: np.ndarray,
              space: FitSpace) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(z-depth [N, H, W] with 0 where invalid, count [N] of valid pixels whose aligned value <= 0)."""
    with np.errstate(all="ignore"):
        value = scale[:, None, None] * depth_nhw + shift[:, None, None]
        positive = valid_nhw & np.isfinite(value) & (value > 0)
        z = np.where(positive, 1.0 / value if space == "disparity" else value, 0.0)
    nonpositive = (valid_nhw & np.isfinite(scale)[:, None, None] & ~positive).sum(axis=(1, 2))
    return z, nonpositive


def align_views(
    depth_nhw: np.ndarray,
    valid_nhw: np.ndarray,
    samples: Sequence[tuple[np.ndarray, np.ndarray]],
    space: FitSpace,
    cfg: Config = Config(),
    fixed: dict[int, tuple[float, float]] | None = None,
    x_noise: np.ndarray | None = None,
) -> Aligned:
    """Fit each view's (s, b) to its (prediction, reference z) samples and convert to z-depth.

    `fixed` gives rows whose (s, b) are already known (the reference view); their residual RMS and
    inliers are measured like any other row's, over their own samples (none: NaN and 0), and they are
    never flagged weak. `x_noise` [N] is the relative noise of the samples' predictions (for `lmeds`'
    errors-in-variables step). The residual RMS is taken in z-depth over the inlier samples;
    `quality` flags each view (`QUALITY`).
    """
    x_nm, z_nm, valid = _pad(list(samples))
    target = to_fit_space(z_nm, space)
    fit = fit_scale_shift(x_nm, target, valid & (z_nm > 0), cfg, x_noise)
    scale, shift, inliers, ok = fit.scale.copy(), fit.shift.copy(), fit.inlier_nm, fit.ok.copy()
    for row, (s, b) in (fixed or {}).items():
        scale[row], shift[row], ok[row] = s, b, True
    depth, nonpositive = apply_fit(depth_nhw, valid_nhw, scale, shift, space)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = scale[:, None] * x_nm + shift[:, None]
        z_fit = np.where(value > 0, 1.0 / value if space == "disparity" else value, np.nan)
        squared = np.where(inliers & np.isfinite(z_fit), (z_fit - z_nm) ** 2, np.nan)
        rms = np.sqrt(np.nanmean(squared, axis=1)) if squared.shape[1] else np.full(len(scale), np.nan)
        z_level = np.nanmedian(np.where(valid & (z_nm > 0), z_nm, np.nan), axis=1) if z_nm.shape[1] else rms
    counts = inliers.sum(axis=1)
    n_samples = (valid & (z_nm > 0)).sum(axis=1)
    rms = np.where(ok, rms, np.nan)
    relative = rms / np.where(np.isfinite(z_level) & (z_level > 0), z_level, np.nan)
    weak = (
        (counts < cfg.weak_inliers)
        | (counts < cfg.weak_inlier_fraction * np.maximum(n_samples, 1))
        | ~(relative <= cfg.weak_residual)
    )
    fixed_rows = np.isin(np.arange(len(scale)), list(fixed or {}))
    quality = np.where(~ok, QUALITY["failed"], np.where(weak & ~fixed_rows, QUALITY["weak"], QUALITY["good"]))
    return Aligned(depth.astype(np.float32), scale, shift, rms, counts, nonpositive, n_samples,
                   np.where(ok, relative, np.nan), quality.astype(np.int8))  # fmt: skip


def work_captures(work: Path) -> list[dataset.Capture]:
    """The captures of a work tree: its sub-folders holding a depth record (subject from its metadata)."""
    return worktree.captures_with(work, "depth", f"run `nvf depth DATA --out {work}` first")


def run(ctx: Context, cfg: Config = Config()) -> list[Path]:
    """Align the depth of every selected capture of ``ctx.work``; write ``<capture>/aligned.safetensors``.

    Returns the paths written; captures whose output is up to date are skipped unless ``ctx.overwrite``.
    """
    _check_config(cfg)
    work = Path(ctx.work)
    return for_each_capture(ctx, STAGE, work_captures(work), lambda capture: plan_capture(work, capture, cfg),
                            lambda job: _align(work, job, cfg))  # fmt: skip


def _check_config(cfg: Config) -> None:
    if cfg.reference == "view" and not cfg.reference_view:
        raise InputError("reference 'view' needs --reference-view NAME (an image name of the capture)")
    if cfg.reference == "depth" and not cfg.reference_depth:
        raise InputError("reference 'depth' needs --reference-depth PATH (a depth record or a folder of them)")
    if cfg.robust not in ("lmeds", "huber", "tukey", "ransac", "none"):
        raise InputError(f"unknown --robust {cfg.robust!r}: use lmeds, huber, tukey, ransac or none")
    if not 0 < cfg.edge_angle < 90:
        raise InputError(f"edge angle must be between 0 and 90 degrees, got {cfg.edge_angle}")
    if cfg.min_samples < 2 or cfg.max_samples < cfg.min_samples:
        raise InputError(f"need 2 <= min_samples <= max_samples, got {cfg.min_samples} and {cfg.max_samples}")


def _reference_depth_path(cfg: Config, capture: str) -> Path:
    path = Path(cfg.reference_depth or "")
    return path / capture / worktree.RECORD_FILES["depth"] if path.is_dir() else path


@dataclass(frozen=True)
class _Inputs:
    """The records one capture's alignment reads, each checked to exist."""

    files: list[Path]  # what the output's input hash covers, in order: depth, poses, sparse, reference depth
    poses: Path | None  # the poses record, when the reference needs poses
    sparse: Path | None  # the sparse record, when the reference reads it
    masks: Path | None  # the head masks record the samples are read inside (`use_masks`), when present


def align_capture(work: Path, capture: str, cfg: Config, *, overwrite: bool = False) -> Path | None:
    """Align one capture; returns the path written, or None when its output was up to date."""
    written = run(Context(Path(work), captures=[capture], overwrite=overwrite), cfg)
    return written[0] if written else None


def plan_capture(work: Path, capture: dataset.Capture, cfg: Config) -> CaptureJob[_Inputs]:
    """The capture's output and the hash of what it reads (InputError for a missing input)."""
    found = _capture_inputs(work, capture.id, cfg)
    out_path = worktree.record_path(work, capture.id, "aligned")
    inputs_hash = io.hash_inputs(STAGE, cfg, *found.files, *([found.masks] if found.masks is not None else []))
    return CaptureJob(capture, (out_path,), inputs_hash, found)


def _align(work: Path, job: CaptureJob[_Inputs], cfg: Config) -> Write:
    """Align one planned capture; returns what writes its record."""
    found, capture, out_path, inputs_hash = job.state, job.capture.id, job.outputs[0], job.inputs_hash
    record = io.load_record(found.files[0], kind="depth", capture=capture)
    space: FitSpace = io.depth_kind(record)
    views, output_valid = _prepared_views(record, found, cfg, work, capture)
    samples, fixed = _reference_samples(views, found, space, cfg, capture)
    if views.prefilter is not None:  # the noise is known once the samples are read
        _sample_noise(views)
    result = align_views(views.depth_nhw, output_valid, samples, space, cfg, fixed, views.noise)
    failed = _failed_views(result, views, samples, capture)
    sample_mask = found.masks.relative_to(work).as_posix() if found.masks is not None else "none"  # in the work tree

    def write() -> list[Path]:
        path = _save_aligned(out_path, result, views, record, cfg, capture, inputs_hash, space, sample_mask, failed)
        log.info("align: %s: %d view(s), median residual %.4g, wrote %s", capture, len(views.names),
                 float(np.nanmedian(result.residual_rms[np.isfinite(result.residual_rms)])), path)  # fmt: skip
        return [path]

    return write


def _capture_inputs(work: Path, capture: str, cfg: Config) -> _Inputs:
    """The records `cfg.reference` needs (InputError, with how to make it, for one that is missing)."""
    depth_path = worktree.record_path(work, capture, "depth")
    poses_path = worktree.record_path(work, capture, "poses")
    sparse_path = worktree.record_path(work, capture, "sparse")
    inputs: list[Path] = [depth_path]
    if cfg.reference in ("sparse", "view"):
        inputs.append(poses_path)
    if cfg.reference == "sparse" or (cfg.reference == "view" and sparse_path.is_file()):
        inputs.append(sparse_path)
    masks_path = headmasks.masks_path(work, capture)
    use_masks = cfg.use_masks and masks_path.is_file()
    if cfg.reference == "depth":
        inputs.append(_reference_depth_path(cfg, capture))
    for path in inputs:
        if not path.is_file():
            hint = (
                _HOW_TO_MAKE.get(path.name, "")
                if path in inputs[:-1] or cfg.reference != "depth"
                else ("pass --reference-depth as a depth record or a folder holding <capture>/depth.safetensors")
            )
            raise InputError(f"{path}: not found; {hint or 'check the path'}")
    return _Inputs(inputs, poses_path if poses_path in inputs else None, sparse_path if sparse_path in inputs else None,
                   masks_path if use_masks else None)  # fmt: skip


def _prepared_views(record: io.Record, found: _Inputs, cfg: Config, work: Path,
                    capture: str) -> tuple[_Views, np.ndarray]:  # fmt: skip
    """(the views to sample, with the head masks and the prefilter set up; the valid pixels the
    aligned maps cover, which the masks do not narrow)."""
    views = _load_views(record, found.poses, capture)
    output_valid = views.valid_nhw
    if found.masks is not None:
        views.valid_nhw = _sample_mask(views, work, capture)
    if cfg.prefilter:
        views.prefilter = cfg
        if cfg.reference == "depth":  # dense reads: the noise first, from its own sample of pixels
            views.noise_raw = np.array([depthmaps.estimate_noise(d, v, seed=cfg.seed)
                                        for d, v in zip(views.depth_nhw, views.valid_nhw, strict=True)])  # fmt: skip
        else:  # SfM points or a reference view: from the pixels their blocks read anyway (`read_block`)
            views.noise_raw = np.full(len(views.names), np.nan)
        views.rejected = np.zeros(len(views.names), dtype=np.int64)
    return views, output_valid


def _reference_samples(
    views: _Views, found: _Inputs, space: FitSpace, cfg: Config, capture: str
) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[int, tuple[float, float]]]:
    """(samples per view, fixed (s, b) by row) of `cfg.reference`: sparse points, a view or given depth."""
    fixed: dict[int, tuple[float, float]] = {}
    if cfg.reference == "sparse":
        samples = sparse_samples(views, io.load_record(found.sparse, kind="sparse", capture=capture), cfg)
    elif cfg.reference == "view":
        if cfg.reference_view not in views.names:
            raise InputError(f"--reference-view {cfg.reference_view}: not a view of capture {capture} "
                             f"(views: {', '.join(views.names[:5])}{', ...' * (len(views.names) > 5)})")  # fmt: skip
        row = views.names.index(cfg.reference_view)
        s, b, own = _reference_view_fit(views, row, space, cfg, found.sparse, capture)
        fixed[row] = (s, b)
        z_ref, _ = apply_fit(views.depth_nhw[row : row + 1], views.valid_nhw[row : row + 1],
                             np.array([s]), np.array([b]), space)  # fmt: skip
        samples = view_samples(views, row, z_ref[0], cfg)
        samples[row] = own  # its figures come from its own fit: the sparse points, or none
    else:
        reference = io.load_record(found.files[-1], kind="depth")
        if reference.capture and reference.capture != capture:
            raise InputError(f"{reference.path}: belongs to capture '{reference.capture}', not '{capture}'; "
                             "records of different captures cannot be combined")  # fmt: skip
        samples = depth_samples(views, reference, cfg)
    return samples, fixed


def _sample_noise(views: _Views) -> None:
    """Set `views.noise`, the relative noise of what the samples read, once their reads are done."""
    views.noise_raw = np.nan_to_num(views.noise_raw, nan=0.0)  # views without samples: not fitted anyway
    # what samples read: a 3 x 3 median, or one pixel bilinear over 4 (noise x 2/3 on average)
    median = np.array([views.reads_median(row) for row in range(len(views.names))])
    views.noise = views.noise_raw * np.where(median, depthmaps.MEDIAN_NOISE, 2.0 / 3.0)


def _failed_views(result: Aligned, views: _Views, samples: Sequence[tuple[np.ndarray, np.ndarray]],
                  capture: str) -> list[str]:  # fmt: skip
    """The names of the views that could not be fitted (StageFailure when none could); warns of
    those and of masked non-positive pixels."""
    failed = [name for name, s in zip(views.names, result.scale, strict=False) if not np.isfinite(s)]
    if len(failed) == len(views.names):
        counts = [len(x) for x, _ in samples]
        raise StageFailure(f"capture {capture}: no view could be aligned (reference samples per view: {counts}); "
                           "check the poses and sparse records, or use --reference-depth")  # fmt: skip
    if failed:
        log.warning("align: %s: %d view(s) could not be fitted (too few reference samples): %s",
                    capture, len(failed), ", ".join(failed[:5]))  # fmt: skip
    if result.nonpositive.sum():
        log.warning("align: %s: %d pixel(s) had a non-positive aligned value and were masked",
                    capture, int(result.nonpositive.sum()))  # fmt: skip
    return failed


def _save_aligned(out_path: Path, result: Aligned, views: _Views, record: io.Record, cfg: Config, capture: str,
                  inputs_hash: str, space: FitSpace, sample_mask: str, failed: list[str]) -> Path:  # fmt: skip
    """Write the aligned record (tensors and metadata as the `stages.align` docstring lists them)."""
    return io.save_record(
        out_path,
        {
            "depth": result.depth_nhw,
            "scale": result.scale.astype(np.float64),
            "shift": result.shift.astype(np.float64),
            "residual_rms": result.residual_rms.astype(np.float64),
            "inliers": result.inliers.astype(np.int64),
            "nonpositive": result.nonpositive.astype(np.int64),
            "samples": result.samples.astype(np.int64),
            "residual_rel": result.residual_rel.astype(np.float64),
            "quality": result.quality.astype(np.int8),
            **(
                {"prediction_noise": views.noise_raw.astype(np.float64), "rejected_samples": views.rejected}
                if views.prefilter is not None
                else {}
            ),
            "image_hw": _image_hw(record),
        },
        kind="aligned",
        stage=STAGE,
        capture=capture,
        names=views.names,
        config=cfg,
        inputs_hash=inputs_hash,
        extra={
            "source_depth_kind": space,
            "fit_space": space,
            "reference": cfg.reference,
            "sample_mask": sample_mask,
            "subject": record.extra.get("subject", capture),
            "failed_views": json.dumps(failed),
            "quality_levels": json.dumps(QUALITY),
            "weak_views": json.dumps(
                [n for n, q in zip(views.names, result.quality, strict=True) if q == QUALITY["weak"]]
            ),
        },  # fmt: skip
    )


_HOW_TO_MAKE = {
    "depth.safetensors": "run `nvf depth DATA --out WORK` first",
    "poses.safetensors": "run `nvf poses DATA --out WORK` first (or align with --reference-depth)",
    "sparse.safetensors": "run `nvf poses DATA --out WORK` first (it writes the sparse points), "
    "or align with --reference-view/--reference-depth",
}


def _reference_view_fit(
    views: _Views, row: int, space: FitSpace, cfg: Config, sparse_path: Path | None, capture: str
) -> tuple[float, float, tuple[np.ndarray, np.ndarray]]:
    """(s, b, samples) of the reference view: fitted to the sparse points when there are any (the
    samples it was fitted on, so its residual and inliers are reported), else identity with no
    samples (residual NaN, 0 inliers: nothing measured it)."""
    none = (np.zeros(0), np.zeros(0))
    if sparse_path is not None:
        one = _Views([views.names[row]], views.depth_nhw[row : row + 1], views.valid_nhw[row : row + 1],
                     views.K_map[row : row + 1], views.R[row : row + 1], views.T[row : row + 1])  # fmt: skip
        samples = sparse_samples(one, io.load_record(sparse_path, kind="sparse", capture=capture), cfg)
        x_nm, z_nm, valid = _pad(samples)
        fit = fit_scale_shift(x_nm, to_fit_space(z_nm, space), valid & (z_nm > 0), cfg)
        if fit.ok[0]:
            return float(fit.scale[0]), float(fit.shift[0]), samples[0]
        log.warning("align: %s: the reference view %s could not be fitted to the sparse points; using it as it is",
                    capture, views.names[row])  # fmt: skip
    return 1.0, 0.0, none
