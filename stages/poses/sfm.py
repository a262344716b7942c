"""Structure-from-motion of one set of images with pycolmap: the fast-then-tuned passes, feature
extraction, matching (`sift_matching` where it stands in for pycolmap's matcher), mapping, the final
robust bundle adjustment, and the registered views and sparse points of a reconstruction.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import image_metrics, io
from stages.core.errors import InputError
from stages.poses import sift_matching
from stages.poses.options import (
    COLMAP_PEAK_THRESHOLD,
    FACE_CONTRAST,
    REFINE_FUNCTION_TOLERANCE,
    Config,
    _camera_params_text,
    _pycolmap,
    _set_if_present,
    build_options,
)

log = logging.getLogger("nvf")


def _quiet_colmap() -> None:
    """Keep COLMAP's own logging (glog) to errors unless nvf logs at debug level, and on stderr only:
    glog's default also writes a ``<host>.<user>.log.INFO.<time>.<pid>`` file to /tmp for every
    process that logs, which piles up over a cluster's array jobs."""
    pycolmap = _pycolmap()
    logging_ns = getattr(pycolmap, "logging", None)
    if logging_ns is not None and hasattr(logging_ns, "minloglevel"):
        logging_ns.minloglevel = 0 if log.isEnabledFor(logging.DEBUG) else 3
    if logging_ns is not None and hasattr(logging_ns, "logtostderr"):
        logging_ns.logtostderr = True


def run_sfm(root: Path, image_names: Sequence[str], cfg: Config, sizes: Sequence[tuple[int, int]],
            contrast: float | None = None, label: str = "poses", cancel: Any = None):  # fmt: skip
    """Run SfM on ``image_names`` (paths relative to ``root``) in a temp workspace; log lines start
    with ``label`` (captures are posed concurrently: `run`'s ``captures_at_once``). A cancelled
    ``cancel`` (`cancellation_token`) stops it with InterruptedError at pycolmap's next check.

    With ``cfg.fast_first`` a pass with plain SIFT (no affine shape, no domain-size pooling) runs
    first, its peak threshold scaled by the capture's ``contrast`` (`capture_contrast`; measured
    here when not given); the full settings of ``cfg`` run only when it leaves views unregistered.
    The best reconstruction is then refined (`refine_reconstruction`). Returns (the best
    reconstruction or None, the number of models of that pass).
    """
    passes = [cfg]
    if cfg.fast_first:
        if not cfg.contrast_threshold:
            contrast = None
        elif contrast is None or not math.isfinite(contrast):
            contrast = capture_contrast(root, image_names)
        passes.insert(0, fast_pass(cfg, contrast))
        log.debug("%s: fine-scale contrast %s; fast-pass SIFT peak threshold %.4f", label,
                  "not measured" if contrast is None else f"{contrast:.4f}", passes[0].peak_threshold)  # fmt: skip
    best, n_models = None, 0
    for number, pass_cfg in enumerate(passes):
        rec, models = _sfm_pass(root, image_names, pass_cfg, sizes, label, cancel)
        if rec is not None and (best is None or rec.num_reg_images() > best.num_reg_images()):
            best, n_models = rec, models
        if best is not None and best.num_reg_images() == len(image_names):
            break
        if number + 1 < len(passes):
            log.info("%s: %d of %d views registered with the fast settings; trying the tuned ones", label,
                     0 if best is None else best.num_reg_images(), len(image_names))  # fmt: skip
    if best is not None:
        refine_reconstruction(best, cfg)
    return best, n_models


def fast_pass(cfg: Config, contrast: float | None = None) -> Config:
    """``cfg`` with plain SIFT (the first, cheap pass): no affine shape and no domain-size pooling,
    which cost ~2x the extraction time and, measured on synth rings, localise keypoints no better.
    The low peak threshold stays for faces (its extra points are what make ring poses accurate);
    with a capture's `fine_contrast` it is scaled as `contrast_peak_threshold` says."""
    threshold = cfg.peak_threshold if contrast is None else contrast_peak_threshold(cfg.peak_threshold, contrast)
    return dataclasses.replace(cfg, max_features=min(cfg.max_features, 8192), affine_shape=False,
                               domain_size_pooling=False, peak_threshold=threshold)  # fmt: skip


def contrast_peak_threshold(peak_threshold: float, contrast: float) -> float:
    """``peak_threshold`` x ``contrast`` / `FACE_CONTRAST`, clipped to [peak_threshold, COLMAP's
    default]: DoG responses scale with image contrast, so this keeps the sensitivity tuned on faces
    for any contrast (the same as normalising the images' contrast), and never goes below it."""
    scaled = peak_threshold * contrast / FACE_CONTRAST
    return float(min(max(scaled, peak_threshold), max(peak_threshold, COLMAP_PEAK_THRESHOLD)))


def fine_contrast(gray_hw: np.ndarray) -> float:
    """Contrast at SIFT's base scale: the 99th percentile of |DoG| between Gaussian blurs of sigma
    0.8 and 0.8 x 2^(1/3) pixels on a grey image in 0..1 at half resolution (sigma 1.6 at full
    resolution, SIFT's first detection scale). Scales linearly with the image's contrast."""
    sigma = 0.8
    dog_hw = _gaussian_blur(gray_hw, sigma * 2 ** (1 / 3)) - _gaussian_blur(gray_hw, sigma)
    magnitude = np.abs(dog_hw).ravel()
    k = int(0.99 * (magnitude.size - 1))
    return float(np.partition(magnitude, k)[k])


def _gaussian_blur(image_hw: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (kernel radius 3 sigma, edges mirrored), float32 [H, W]."""
    radius = max(1, math.ceil(3 * sigma))
    padded = np.pad(image_hw.astype(np.float32, copy=False), radius, mode="symmetric")[None]  # [1, H+2r, W+2r]
    return image_metrics.filter_valid(padded, image_metrics.gaussian_1d(sigma, radius).astype(np.float32))[0]


def capture_contrast(root: Path, image_names: Sequence[str]) -> float:
    """Median `fine_contrast` of a capture's images (`check_capture` measures it while validating)."""
    return inspect_images(root, image_names).contrast


@dataclass(frozen=True)
class CheckedImages:
    """What decoding a capture's images measured: (width, height) per row after EXIF orientation,
    and the median `fine_contrast` (NaN when nothing was decoded)."""

    sizes: list[tuple[int, int]]
    contrast: float = math.nan


def inspect_images(root: Path, image_names: Sequence[str]) -> CheckedImages:
    """Decode every image once (a thread per core; JPEGs at half scale, see `io.read_gray`): an
    InputError names the first corrupt file; returns the sizes and the capture's contrast."""

    def inspect(name: str) -> tuple[tuple[int, int], float]:
        gray_hw = io.read_gray(root / name, reduce=2)  # decodes all of the file: validates it
        return io.image_size(root / name), fine_contrast(gray_hw)

    with ThreadPoolExecutor(max(1, min(len(image_names), os.cpu_count() or 1)), "nvf-decode") as pool:
        found = list(pool.map(inspect, image_names))
    contrast = float(np.median([c for _, c in found])) if found else math.nan
    return CheckedImages([size for size, _ in found], contrast)


def _sfm_pass(root: Path, image_names: Sequence[str], cfg: Config, sizes: Sequence[tuple[int, int]],
              label: str = "poses", cancel: Any = None):  # fmt: skip
    """One extraction-matching-mapping pass; (largest model or None, number of models).

    Models beyond the largest are not dropped silently: their views are logged, then retried by
    registering them into the largest model with relaxed thresholds; what still fails is left to
    the fallback.
    """
    pycolmap = _pycolmap()
    _quiet_colmap()
    if hasattr(pycolmap, "set_random_seed"):
        pycolmap.set_random_seed(cfg.seed)
    same_size = len(set(sizes)) == 1
    options = build_options(cfg)
    if cfg.focal_px is not None and same_size:
        options["reader"].camera_params = _camera_params_text(cfg.camera_model, cfg.focal_px, *sizes[0])
    mode = pycolmap.CameraMode.SINGLE if same_size else pycolmap.CameraMode.AUTO
    clock = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nvf-poses-") as tmp:
        work = Path(tmp)
        database = work / "database.db"
        extract_features(database, root, image_names, options, mode, cancel)
        log.debug("%s: features in %.1f s", label, time.perf_counter() - clock)
        _match(pycolmap, database, cfg, options, cancel)
        log.debug("%s: matching done at %.1f s", label, time.perf_counter() - clock)
        models_dir = work / "models"
        models_dir.mkdir()
        if cfg.mapper == "global":
            if not hasattr(pycolmap, "global_mapping"):
                raise InputError("--mapper global needs pycolmap with global_mapping (>= 3.12); use incremental")
            models = pycolmap.global_mapping(database, root, models_dir, options["mapping"])
        else:
            models = pycolmap.incremental_mapping(database, root, models_dir, options["mapping"], **_cancels(cancel))
        log.debug("%s: mapping done at %.1f s", label, time.perf_counter() - clock)
        if not models:
            return None, 0
        ranked = sorted(models.values(), key=lambda rec: rec.num_reg_images(), reverse=True)
        best = ranked[0]
        for other in ranked[1:]:
            names = sorted(Path(im.name).name for im in other.images.values() if im.has_pose)
            log.warning("%s: SfM split the views into %d models; a smaller one holds %s", label, len(ranked),
                        ", ".join(names))  # fmt: skip
        if best.num_reg_images() < len(image_names) and cfg.mapper == "incremental":
            best = _register_more(pycolmap, database, root, work, best, options["mapping"], cancel) or best
        return best, len(models)


def _match(pycolmap, database: Path, cfg: Config, options: dict[str, Any], cancel: Any = None) -> None:
    """Match and verify the extracted features: exhaustive pairs through `sift_matching` where it
    stands in for pycolmap's matcher (CPU, up to a few thousand features per image), else pycolmap's
    exhaustive or sequential matcher."""
    if cfg.matcher == "exhaustive":
        with pycolmap.Database.open(database) as db:
            counts = [db.num_keypoints_for_image(image.image_id) for image in db.read_all_images()]
        reason = sift_matching.unsupported_reason(options["matching"], counts)
        if reason is None:
            sift_matching.match_exhaustive(database, options["matching"], options["verification"], cancel)
            return
        log.debug("poses: pycolmap's matcher (%s)", reason)
    match = pycolmap.match_exhaustive if cfg.matcher == "exhaustive" else pycolmap.match_sequential
    match(database, matching_options=options["matching"], pairing_options=options["pairing"],
          verification_options=options["verification"], **_cancels(cancel))  # fmt: skip


def cancellation_token() -> Any:
    """A fresh pycolmap CancellationToken (None where this pycolmap has none): `run` cancels it on
    an error or Ctrl-C, so captures still in SfM on other threads stop at pycolmap's next check
    instead of running to their end (pycolmap checks signals on the main thread only)."""
    pycolmap = _pycolmap()
    return pycolmap.CancellationToken() if hasattr(pycolmap, "CancellationToken") else None


def _cancels(cancel: Any) -> dict[str, Any]:
    """The keyword that hands ``cancel`` to a pycolmap call (none without a token)."""
    return {} if cancel is None else {"cancellation_token": cancel}


def extract_features(database: Path, root: Path, image_names: Sequence[str], options: dict[str, Any], mode: Any,
                     cancel: Any = None) -> None:  # fmt: skip
    """SIFT features of ``image_names`` (paths relative to ``root``) into a new COLMAP ``database``,
    the images registered first in name order (`_import_images`); ``options`` from `build_options`,
    ``mode`` a pycolmap CameraMode, ``cancel`` as in `run_sfm`. COLMAP's log stays quiet."""
    pycolmap = _pycolmap()
    _quiet_colmap()
    _import_images(pycolmap, database, root, image_names, mode, options["reader"])
    pycolmap.extract_features(database, root, image_names=list(image_names), camera_mode=mode,
                              reader_options=options["reader"], extraction_options=options["extraction"],
                              **_cancels(cancel))  # fmt: skip


def _import_images(pycolmap, database: Path, root: Path, image_names: Sequence[str], mode, reader_options) -> None:
    """Register the images in the database first, on one thread (in name order): extraction then only
    adds their features. pycolmap 4's extractor numbers images in the order its threads finish
    them, and the mapper's choices follow the numbering, so the same capture gave other poses from
    run to run (up to ~1° on a 256 px ring)."""
    if not (hasattr(pycolmap, "import_images") and hasattr(pycolmap, "Database")):
        return
    with pycolmap.Database.open(database):  # import_images needs the file to exist
        pass
    pycolmap.import_images(database, root, camera_mode=mode, image_names=list(image_names), options=reader_options)


def refine_reconstruction(rec, cfg: Config) -> None:
    """Final global bundle adjustment with a robust (Cauchy) loss, then drop observations beyond
    ``cfg.refine_max_error`` pixels and, when that dropped any, adjust and filter once more (in
    place). SIFT keypoints under the strong foreshortening of a ring have heavy-tailed localisation
    errors that least squares weights fully."""
    if cfg.refine_loss_px <= 0:
        return
    pycolmap = _pycolmap()
    options = pycolmap.BundleAdjustmentOptions()
    options.refine_focal_length = cfg.refine_focal
    options.refine_extra_params = cfg.refine_focal
    _set_if_present(options, "print_summary", False)
    ceres = getattr(options, "ceres", options)  # 4.x nests the solver options
    ceres.loss_function_type = pycolmap.LossFunctionType.CAUCHY
    ceres.loss_function_scale = cfg.refine_loss_px
    # COLMAP turns Ceres' function tolerance off (0), so each solve ran to its 100-iteration cap
    # crawling in the flat Cauchy tail; Ceres' own default (1e-6 relative cost change) stops ~4x
    # sooner with the same poses (measured on 256/512 px rings and kermit: < 0.001° apart).
    _set_if_present(getattr(ceres, "solver_options", ceres), "function_tolerance", REFINE_FUNCTION_TOLERANCE)
    for _ in range(2):
        _bundle_adjust(pycolmap, rec, options)
        if not hasattr(pycolmap, "ObservationManager"):
            continue
        if not pycolmap.ObservationManager(rec).filter_all_points3D(cfg.refine_max_error, 1.0):
            break  # nothing dropped: a second solve would start at its optimum


def _bundle_adjust(pycolmap, rec, options) -> None:
    """Global bundle adjustment of every registered image, gauge fixed by two cameras: what
    ``pycolmap.bundle_adjustment`` does (same poses, bit for bit), without its resetting COLMAP's
    log level to INFO, which printed its headings on stderr after `_quiet_colmap`."""
    if not (hasattr(pycolmap, "create_default_bundle_adjuster") and hasattr(pycolmap, "BundleAdjustmentGauge")):
        pycolmap.bundle_adjustment(rec, options)
        return
    config = pycolmap.BundleAdjustmentConfig()
    for image_id in rec.reg_image_ids():
        config.add_image(image_id)
    config.fix_gauge(pycolmap.BundleAdjustmentGauge.TWO_CAMS_FROM_WORLD)
    pycolmap.create_default_bundle_adjuster(options, config, rec).solve()


def _register_more(pycolmap, database: Path, root: Path, work: Path, rec, mapping_options, cancel: Any = None):
    """Continue the incremental mapper from ``rec`` with relaxed registration thresholds."""
    start = work / "start"
    start.mkdir()
    rec.write(start)
    relaxed = type(mapping_options)(mapping_options.todict()) if hasattr(mapping_options, "todict") else mapping_options
    try:
        relaxed.mapper.abs_pose_min_num_inliers = max(8, relaxed.mapper.abs_pose_min_num_inliers // 2)
        relaxed.mapper.abs_pose_min_inlier_ratio = 0.1
        relaxed.mapper.max_reg_trials = 6
        relaxed.multiple_models = False
    except AttributeError:  # pragma: no cover - option names of another pycolmap
        return None
    out = work / "more"
    out.mkdir()
    try:
        models = pycolmap.incremental_mapping(database, root, out, relaxed, input_path=start, **_cancels(cancel))
    except InterruptedError:  # cancelled: not a failure to register
        raise
    except Exception as exc:  # pycolmap raises plain RuntimeErrors here
        log.debug("poses: registering more views failed: %s", exc)
        return None
    if not models:
        return None
    more = max(models.values(), key=lambda r: r.num_reg_images())
    return more if more.num_reg_images() > rec.num_reg_images() else None


def _cam_from_world(image) -> tuple[np.ndarray, np.ndarray]:
    pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
    return np.asarray(pose.rotation.matrix(), dtype=np.float64), np.asarray(pose.translation, dtype=np.float64)


def extract_views(rec, image_names: Sequence[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Per registered view (by name): R, T, K, size, colmap camera, reprojection error, observations;
    and the sparse points with CSR tracks indexed by position in ``image_names``."""
    row_of = {name: i for i, name in enumerate(image_names)}
    # one lookup per image, not per observation (each pycolmap attribute access builds an object)
    row_of_id = {image_id: row_of[image.name] for image_id, image in rec.images.items() if image.name in row_of}
    xy_of_id = {image_id: np.array([p.xy for p in rec.images[image_id].points2D]).reshape(-1, 2)
                for image_id in row_of_id}  # fmt: skip
    points, colors, errors, offsets, track_rows, track_uv = [], [], [], [0], [], []
    for point in rec.points3D.values():
        elements = [(row_of_id[e.image_id], xy_of_id[e.image_id][e.point2D_idx])
                    for e in point.track.elements if e.image_id in row_of_id]  # fmt: skip
        if not elements:
            continue
        points.append(point.xyz)
        colors.append(point.color)
        errors.append(point.error)
        track_rows.extend(row for row, _ in elements)
        track_uv.extend(xy for _, xy in elements)
        offsets.append(len(track_rows))
    sparse = {
        "points": np.asarray(points, dtype=np.float64).reshape(-1, 3),
        "colors": np.asarray(colors, dtype=np.uint8).reshape(-1, 3),
        "error": np.asarray(errors, dtype=np.float64),
        "track_offsets": np.asarray(offsets, dtype=np.int64),
        "track_images": np.asarray(track_rows, dtype=np.int64),
        "track_uv": np.asarray(track_uv, dtype=np.float64).reshape(-1, 2),
    }
    point_of_obs = np.repeat(np.arange(len(points)), np.diff(sparse["track_offsets"]))  # [M]
    views: dict[str, dict[str, Any]] = {}
    for image_id, row in row_of_id.items():
        image = rec.images[image_id]
        if not image.has_pose:
            continue
        camera = rec.cameras[image.camera_id]
        R, T = _cam_from_world(image)
        seen = sparse["track_images"] == row  # [M] this view's observations
        view_errors = np.zeros(0)
        if seen.any():
            cam = sparse["points"][point_of_obs[seen]] @ R.T + T
            projected = np.asarray(camera.img_from_cam(cam, check_cheirality=False))
            view_errors = np.linalg.norm(projected - sparse["track_uv"][seen], axis=1)
        views[image.name] = {
            "R": R, "T": T, "K": np.asarray(camera.calibration_matrix(), dtype=np.float64),
            "width": int(camera.width), "height": int(camera.height),
            "camera": {"model": camera.model_name if hasattr(camera, "model_name") else str(camera.model),
                       "params": [float(p) for p in camera.params]},
            "reproj_error": float(view_errors.mean()) if view_errors.size else math.nan,
            "observations": int(view_errors.size),
        }  # fmt: skip
    return views, sparse
