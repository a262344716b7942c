"""Stage `poses`: camera poses per capture by structure-from-motion (pycolmap), with a tagged fallback.

Paper §IV (Eq. 1-2, Algorithm 1): SIFT features, exhaustive (or sequential) matching, incremental
(or global) mapping with bundle adjustment and RANSAC, then a fallback for views SfM could not
register. nvf improves the fallback: cameras are ordered by azimuth (the Multi-PIE table, else
their order in the capture), rotations are SLERPed between the nearest registered neighbours,
centres are placed on a circle fitted to the registered centres (not a blend of T), intrinsics come
from the neighbours, and every view says where its pose came from. On a CPU, exhaustive matching
goes through `sift_matching` (exact nearest neighbours by BLAS, pairs matched and verified on a
thread pool) while captures have up to ~2,500 features per image; pycolmap's matcher otherwise.

Rig mode (beyond the paper, ``rig="auto"`` on Multi-PIE layouts): the 13-15 cameras are the same
for every subject, so the captures of a session are posed together. Each capture's SfM poses are
tied to a common rig frame by a similarity (rotations and centres, >= 2 shared views), the rig
(cam_from_rig and intrinsics per physical camera) is their generalised-Procrustes mean, saved as
``WORK/rig_<session>.safetensors`` (kind ``rig``, `RIG_SCHEMA`) and reusable with ``rig=FILE``; a
view SfM could not register in one capture is then posed through the rig (source ``rig``).
pycolmap's own rig support (RigConfig, apply_rig_config) models one rig moving through one static
scene: frames are registered from shared 3D points, and frames of different faces share none, so
its mapper makes one model per subject (measured with pycolmap 4.2.1, even with the rig poses
given). Pooling therefore happens here, on the per-capture reconstructions.

Writes per capture (``WORK/<capture>/``):
    - ``poses.safetensors`` (kind ``poses``): R [N,3,3] float64 world-to-camera (OpenCV), T [N,3],
      K [N,3,3], width/height [N], source [N] int8 (`SOURCES`), confidence [N] in 0..1,
      reproj_error [N] pixels (NaN when not from SfM); metadata: names, camera_ids (Multi-PIE camera
      or file stem per row), colmap_cameras (model and parameters, distortion included), sources
      mapping, unregistered views;
    - ``sparse.safetensors`` (kind ``sparse``): the SfM points with colours, errors and CSR tracks
      (row indices into the poses' names, pixel uv), the reference `align` uses;
    - on request (``export``): ``transforms.json`` (nerfstudio; file paths relative to the capture
      folder) and ``colmap/`` (COLMAP text model: SfM's camera models, poses, and the sparse
      points with their tracks, so COLMAP's tools and nerfstudio's colmap loader can use it).

Convention: COLMAP's ``cam_from_world`` is world-to-camera with the +0.5 pixel-centre convention,
the same as nvf's, so poses and K are copied without change (the SfM world frame is arbitrary:
compare with a similarity, `geometry.similarity_align_poses`). ``poses.safetensors`` is written
last and carries the input hash (image bytes + config), so it marks a capture as complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import math
import os
import tempfile
import time
import typing
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages import sift_matching
from stages.core import batching, dataset, digests, geometry, image_metrics, io, worktree
from stages.core.errors import InputError, StageFailure

log = logging.getLogger("nvf")

STAGE = "poses"
SOURCES: dict[str, int] = {"sfm": 0, "rig": 1, "interp": 2}
"""Where a view's pose came from, as stored in the ``source`` tensor (int8)."""
EXPORTS = ("transforms", "colmap")
CameraModel = Literal["SIMPLE_PINHOLE", "PINHOLE", "SIMPLE_RADIAL", "RADIAL", "OPENCV"]
CAMERA_MODELS: tuple[str, ...] = typing.get_args(CameraModel)
COLMAP_ROOTS = ("reader", "extraction", "matching", "pairing", "verification", "mapping")
REFINE_FUNCTION_TOLERANCE = 1e-6
"""Relative cost change that ends each solve of the final robust bundle adjustment (Ceres' default)."""
COLMAP_PEAK_THRESHOLD = 0.02 / 3
"""COLMAP's default SIFT peak threshold (Lowe's 0.02 over 3 scales per octave), for images in 0..1."""
FACE_CONTRAST = 0.015
"""Fine-scale contrast (`fine_contrast`) up to which `Config.peak_threshold` applies unscaled: the
512 px synthetic rings it was tuned and is tested on measure 0.012-0.015 (subjects 1-3); smaller
renders of the same faces up to 0.019 (so at most 0.0025, as accurate on 256 px rings); kermit's
textured photos 0.033, a studio portrait 0.039."""


@dataclass(frozen=True)
class Config:
    """How poses are estimated. Defaults are tuned for smooth, low-contrast faces (see `PRESETS`)."""

    layout: Literal["auto", "multipie", "folder"] = "auto"
    """Dataset layout, as in `nvf scan`."""
    camera_model: CameraModel = "SIMPLE_RADIAL"
    """COLMAP camera model shared by the views of a capture (one camera per capture and image size)."""
    focal_px: float | None = None
    """Prior focal length in pixels; None guesses 1.2 x the larger image side (COLMAP's default)."""
    refine_focal: bool = True
    """Let bundle adjustment refine the focal length (turn off when `focal_px` is a calibration)."""
    peak_threshold: float = 0.002
    """SIFT peak threshold (COLMAP's default 0.0067 finds too few features on smooth skin)."""
    max_features: int = 16384
    """Most SIFT features per image."""
    affine_shape: bool = True
    """Affine-covariant SIFT (better under the strong foreshortening of a 180° ring)."""
    domain_size_pooling: bool = True
    """Domain-size pooling of SIFT descriptors (more distinctive on low texture)."""
    matcher: Literal["exhaustive", "sequential"] = "exhaustive"
    """Pairing: every pair (rings of ~15 views), or neighbours in name order (long orbits)."""
    mapper: Literal["incremental", "global"] = "incremental"
    """pycolmap's incremental mapper, or its global (GLOMAP) mapper."""
    min_inliers: int = 15
    """Fewest inlier matches for a pair, an initial pair's half of it, and a registration."""
    max_reproj_error: float = 1.5
    """Observations beyond this reprojection error (pixels) are dropped from tracks; COLMAP uses 4,
    which keeps drifting silhouette features that bias poses by ~1° on faces."""
    refine_loss_px: float = 0.5
    """Scale (pixels) of the Cauchy loss of a final global bundle adjustment; 0 skips it."""
    refine_max_error: float = 1.0
    """Observations beyond this reprojection error (pixels) are dropped before the last adjustment."""
    colmap: tuple[tuple[str, str], ...] = ()
    """Pass-through options as (dotted key, value): roots reader, extraction, matching, pairing,
    verification, mapping, e.g. ("extraction.sift.edge_threshold", "5")."""
    rig: str = "auto"
    """Rig mode: off (each capture alone); auto (Multi-PIE layouts: a session with >= 2 captures
    solves its rig from their SfM views and poses every view SfM missed through it); on (as auto,
    but an error where no rig can be solved); or the path of a saved rig record to reuse."""
    export: tuple[str, ...] = ()
    """Extra outputs: transforms (nerfstudio transforms.json), colmap (COLMAP text model)."""
    fast_first: bool = True
    """Try COLMAP's faster SIFT settings first and escalate to the settings above only when views
    stay unregistered (textured captures finish fast, smooth faces still get the tuned pass)."""
    contrast_threshold: bool = True
    """In that fast pass, scale `peak_threshold` with the capture's fine-scale contrast above
    `FACE_CONTRAST` (up to COLMAP's default), as if every capture were normalised to a face's
    contrast: textured captures keep the same detections per unit of contrast with fewer weak
    features to match (kermit: threshold 0.0044, 3,200 -> 2,300 features per photo, same poses)."""
    seed: int = 0
    """Seed of COLMAP's random sampling (RANSAC, mapper), for repeatable runs."""
    deterministic: bool = True
    """Same images, same poses: the mapper runs on one thread (on several, its choices changed from
    run to run: kermit flipped between two solutions ~1° apart). Measured no slower on captures of
    11-15 views, whose bundle adjustments COLMAP runs single-threaded anyway; turn off for long
    orbits, where multi-threaded adjustment pays."""
    num_threads: int = -1
    """CPU threads for COLMAP (-1: all)."""


PRESETS: dict[str, Config] = {
    "default": Config(),
    "colmap": Config(
        peak_threshold=COLMAP_PEAK_THRESHOLD,
        max_features=8192,
        affine_shape=False,
        domain_size_pooling=False,
        max_reproj_error=4.0,
        fast_first=False,
        refine_loss_px=0.0,
    ),  # fmt: skip
    "thorough": Config(fast_first=False),
    "calibrated": Config(camera_model="SIMPLE_PINHOLE", refine_focal=False),
}


@dataclass(frozen=True)
class CapturePoses:
    """Poses of one capture in capture row order (what `poses.safetensors` holds)."""

    names: list[str]
    camera_ids: list[str]
    R: np.ndarray  # [N, 3, 3] world-to-camera
    T: np.ndarray  # [N, 3]
    K: np.ndarray  # [N, 3, 3]
    width: np.ndarray  # [N] int32
    height: np.ndarray  # [N] int32
    source: np.ndarray  # [N] int8, see SOURCES
    confidence: np.ndarray  # [N] float32 in 0..1
    reproj_error: np.ndarray  # [N] float64 pixels, NaN when not SfM
    colmap_cameras: dict[str, dict[str, Any]] = field(default_factory=dict)  # row name -> model, params
    points_p3: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)))
    colors_p3: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.uint8))
    point_error_p: np.ndarray = field(default_factory=lambda: np.zeros(0))
    track_offsets: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    track_images: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    track_uv: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    models: int = 0  # how many models SfM made before merging


# ----------------------------------------------------------------------------------------------
# pycolmap options (detect features, not versions)
# ----------------------------------------------------------------------------------------------


def _pycolmap():
    try:
        import pycolmap
    except ImportError as exc:  # pragma: no cover - pycolmap is a dependency
        raise StageFailure(f"pycolmap is not installed ({exc}); pip install pycolmap") from None
    return pycolmap


def _set_if_present(obj: Any, name: str, value: Any) -> None:
    """Set an option where this pycolmap has it (names moved between 0.x and 4.x)."""
    if hasattr(obj, name):
        setattr(obj, name, value)
    else:
        log.debug("poses: pycolmap has no option %s.%s; left at its default", type(obj).__name__, name)


def build_options(cfg: Config) -> dict[str, Any]:
    """pycolmap option objects by root name (see `COLMAP_ROOTS`), with `cfg` and its overrides applied.

    Raises InputError for an unknown ``--colmap`` key or a value of the wrong type.
    """
    pycolmap = _pycolmap()
    reader = pycolmap.ImageReaderOptions()
    reader.camera_model = cfg.camera_model
    extraction = pycolmap.FeatureExtractionOptions()
    extraction.num_threads = cfg.num_threads
    sift = extraction.sift
    sift.peak_threshold = cfg.peak_threshold
    sift.max_num_features = cfg.max_features
    _set_if_present(sift, "estimate_affine_shape", cfg.affine_shape)
    _set_if_present(sift, "domain_size_pooling", cfg.domain_size_pooling)
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = cfg.num_threads
    pairing = (
        pycolmap.ExhaustivePairingOptions() if cfg.matcher == "exhaustive" else pycolmap.SequentialPairingOptions()
    )
    verification = pycolmap.TwoViewGeometryOptions()
    verification.min_num_inliers = cfg.min_inliers
    _set_if_present(verification.ransac, "random_seed", cfg.seed)
    if cfg.mapper == "incremental":
        mapping = pycolmap.IncrementalPipelineOptions()
        mapping.min_model_size = 3
        mapping.min_num_matches = cfg.min_inliers
        mapping.ba_refine_focal_length = cfg.refine_focal
        mapper = mapping.mapper
        mapper.init_min_num_inliers = max(2 * cfg.min_inliers, 30)
        mapper.init_min_tri_angle = 4.0  # rings step 15°: COLMAP's 16° rejects every neighbour pair
        mapper.abs_pose_min_num_inliers = cfg.min_inliers
        mapper.abs_pose_refine_focal_length = cfg.refine_focal
        mapper.filter_max_reproj_error = cfg.max_reproj_error
        _set_if_present(mapper, "random_seed", cfg.seed)
        tri = mapping.triangulation
        tri.complete_max_reproj_error = cfg.max_reproj_error
        tri.merge_max_reproj_error = cfg.max_reproj_error
    else:
        mapping = pycolmap.GlobalPipelineOptions()
        mapping.min_model_size = 3
        mapping.min_num_matches = cfg.min_inliers
        _set_if_present(mapping.mapper.bundle_adjustment, "refine_focal_length", cfg.refine_focal)
        _set_if_present(mapping.mapper, "random_seed", cfg.seed)
    _set_if_present(mapping, "random_seed", cfg.seed)
    mapping.num_threads = 1 if cfg.deterministic else cfg.num_threads
    options = {"reader": reader, "extraction": extraction, "matching": matching, "pairing": pairing,
               "verification": verification, "mapping": mapping}  # fmt: skip
    for key, value in cfg.colmap:
        _apply_override(options, key, value)
    return options


def _camera_params_text(model: str, focal: float, width: int, height: int | None = None) -> str:
    """COLMAP's camera_params string for a prior focal and a centred principal point."""
    height = width if height is None else height
    cx, cy = width / 2, height / 2
    return {
        "SIMPLE_PINHOLE": f"{focal},{cx},{cy}",
        "PINHOLE": f"{focal},{focal},{cx},{cy}",
        "SIMPLE_RADIAL": f"{focal},{cx},{cy},0",
        "RADIAL": f"{focal},{cx},{cy},0,0",
        "OPENCV": f"{focal},{focal},{cx},{cy},0,0,0,0",
    }[model]


def parse_overrides(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``["mapping.mapper.init_min_tri_angle=8"]`` -> ``(("mapping.mapper.init_min_tri_angle", "8"),)``."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"bad --colmap '{item}': use KEY=VALUE, e.g. extraction.sift.peak_threshold=0.001")
        pairs.append((key.strip(), value.strip()))
    return tuple(pairs)


def _apply_override(options: dict[str, Any], key: str, text: str) -> None:
    root, *parts = key.split(".")
    if root not in options or not parts:
        raise InputError(f"unknown --colmap key '{key}': it must start with one of {', '.join(COLMAP_ROOTS)} "
                         "and name an option, e.g. extraction.sift.peak_threshold=0.001")  # fmt: skip
    obj = options[root]
    for depth, part in enumerate(parts):
        if part.startswith("_") or not hasattr(obj, part) or callable(getattr(obj, part)) and depth == len(parts) - 1:
            known = sorted(k for k in dir(obj) if not k.startswith("_") and not callable(getattr(obj, k)))
            raise InputError(f"unknown --colmap key '{key}': {type(obj).__name__} has no option '{part}'; "
                             f"it has: {', '.join(known)}")  # fmt: skip
        if depth < len(parts) - 1:
            obj = getattr(obj, part)
    current = getattr(obj, parts[-1])
    try:
        setattr(obj, parts[-1], _parse_value(current, text))
    except (TypeError, ValueError) as exc:
        raise InputError(f"bad --colmap value {key}={text}: {exc}") from None


def _parse_value(current: Any, text: str) -> Any:
    """Parse ``text`` to the type of an option's current value."""
    if isinstance(current, bool):
        if text.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ValueError("expected true or false")
        return text.lower() in ("1", "true", "yes", "on")
    if isinstance(current, int) and not isinstance(current, enum.Enum) and not hasattr(current, "name"):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    if isinstance(current, os.PathLike):  # e.g. reader.mask_path
        return Path(text)
    members = getattr(type(current), "__members__", None)
    if members:
        if text not in members:
            raise ValueError(f"expected one of {', '.join(members)}")
        return members[text]
    raise ValueError(f"options of type {type(current).__name__} cannot be set from the command line")


# ----------------------------------------------------------------------------------------------
# SfM
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Fallback (Algorithm 1, improved)
# ----------------------------------------------------------------------------------------------


def fit_circle(points_n3: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray, np.ndarray] | None:
    """Least-squares circle through 3D points: (centre [3], unit normal [3], radius, e1, e2), or None
    when the points are too few or collinear. ``e1, e2`` span the plane; angles are atan2 in them."""
    points = np.asarray(points_n3, dtype=np.float64)
    if len(points) < 3:
        return None
    mean = points.mean(0)
    _, sing, vt = np.linalg.svd(points - mean)
    if sing[1] <= 1e-6 * max(sing[0], 1e-12):
        return None
    e1, e2, normal = vt[0], vt[1], vt[2]
    xy = np.stack([(points - mean) @ e1, (points - mean) @ e2], axis=1)
    # Kasa fit: x² + y² = 2 a x + 2 b y + c
    A = np.column_stack([2 * xy, np.ones(len(xy))])
    (a, b, c), *_ = np.linalg.lstsq(A, (xy**2).sum(1), rcond=None)
    radius = math.sqrt(max(c + a * a + b * b, 0.0))
    if not np.isfinite(radius) or radius <= 0:
        return None
    return mean + a * e1 + b * e2, normal, radius, e1, e2


def interpolate_missing(
    R: np.ndarray, T: np.ndarray, registered: np.ndarray, order_n: np.ndarray, elevation_n: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill the poses of unregistered views (Algorithm 1, improved).

    ``R`` [N,3,3], ``T`` [N,3] (rows of unregistered views are ignored), ``registered`` [N] bool,
    ``order_n`` [N] the ordering parameter (azimuth in degrees, or the row index), ``elevation_n``
    [N] optional (views of a different elevation are kept off each other's circle). Rotations are
    SLERPed between the nearest registered neighbours in order (extrapolated from the two nearest
    on one side at the ends); centres are placed on a circle fitted to the registered centres at an
    angle interpolated linearly in ``order_n`` (blended centres when no circle fits). Returns (R, T,
    gap) where gap [N] is the distance in ``order_n`` to the nearest registered view (0 if registered).
    """
    R, T = np.array(R, dtype=np.float64), np.array(T, dtype=np.float64)
    order = np.asarray(order_n, dtype=np.float64)
    registered = np.asarray(registered, dtype=bool)
    elevation = np.zeros(len(order)) if elevation_n is None else np.asarray(elevation_n, dtype=np.float64)
    known = np.flatnonzero(registered)
    if len(known) < 2:
        raise ValueError("interpolate_missing needs at least 2 registered views")
    quats = geometry.rotmat_to_quat(R)
    centers = geometry.camera_centers(R, T)
    gap = np.zeros(len(order))
    for row in np.flatnonzero(~registered):
        same = known[np.abs(elevation[known] - elevation[row]) < 1e-6]
        pool = same if len(same) >= 2 else known
        lo, hi = _bracket(order, pool, order[row])
        t = (order[row] - order[lo]) / (order[hi] - order[lo]) if order[hi] != order[lo] else 0.5
        quat = geometry.slerp(quats[lo], quats[hi], t)
        R[row] = geometry.quat_to_rotmat(quat)
        center = _circle_center(centers[pool], order[pool], order[row])
        if center is None:
            center = (1 - t) * centers[lo] + t * centers[hi]
        T[row] = -R[row] @ center
        gap[row] = float(np.min(np.abs(order[known] - order[row])))
    return R, T, gap


def _bracket(order: np.ndarray, pool: np.ndarray, value: float) -> tuple[int, int]:
    """The registered rows just below and above ``value`` in order; at an end, the two nearest."""
    below = pool[order[pool] < value]
    above = pool[order[pool] > value]
    if len(below) and len(above):
        return int(below[np.argmax(order[below])]), int(above[np.argmin(order[above])])
    side = below if len(below) else above
    nearest = side[np.argsort(np.abs(order[side] - value))][:2]
    if len(nearest) < 2:  # one registered view on this side only: pair it with the far side
        others = pool[pool != nearest[0]]
        nearest = np.array([nearest[0], others[np.argmin(np.abs(order[others] - value))]])
    return int(nearest[0]), int(nearest[1])


def _circle_center(centers_k3: np.ndarray, order_k: np.ndarray, value: float) -> np.ndarray | None:
    """A point on the circle fitted to ``centers_k3`` at the angle linear in order (least squares)."""
    circle = fit_circle(centers_k3)
    if circle is None:
        return None
    mid, _normal, radius, e1, e2 = circle
    rel = centers_k3 - mid
    angles = np.unwrap(np.arctan2(rel @ e2, rel @ e1)[np.argsort(order_k)])
    sorted_order = np.sort(order_k)
    if np.ptp(sorted_order) <= 0:
        return None
    slope, intercept = np.polyfit(sorted_order, angles, 1)
    angle = slope * value + intercept
    return mid + radius * (math.cos(angle) * e1 + math.sin(angle) * e2)


# ----------------------------------------------------------------------------------------------
# Rig mode (beyond the paper)
# ----------------------------------------------------------------------------------------------

RIG_SCHEMA: dict[str, tuple[int | str, ...]] = {
    "R": ("C", 3, 3), "T": ("C", 3), "K": ("C", 3, 3), "width": ("C",), "height": ("C",),
    "captures": ("C",), "spread_deg": ("C",),
}  # fmt: skip
"""Tensors of a rig record (kind ``rig``, rows = physical cameras, names = camera ids)."""
RIG_CONVENTION = "R, T: cam_from_rig (OpenCV world-to-camera, rig frame as world)"


@dataclass(frozen=True)
class Rig:
    """A fixed camera rig: each camera's pose in the rig frame and its intrinsics.

    ``R`` [C,3,3], ``T`` [C,3] are cam_from_rig (world-to-camera with the rig frame as world,
    OpenCV); ``K`` [C,3,3] at ``width``/``height`` [C]; ``captures`` [C] how many captures' SfM
    posed the camera; ``spread_deg`` [C] the RMS rotation disagreement between those captures
    after alignment (a quality figure). The rig frame is that of the reference capture (the one
    SfM posed most completely), its scale included.
    """

    camera_ids: list[str]
    R: np.ndarray
    T: np.ndarray
    K: np.ndarray
    width: np.ndarray
    height: np.ndarray
    captures: np.ndarray
    spread_deg: np.ndarray

    def confidence(self, row: int) -> float:
        """0.6 for a camera seen by many captures that agree, less for few or disagreeing ones."""
        support = 1.0 - math.exp(-float(self.captures[row]) / 2.0)
        return float(0.6 * support / (1.0 + float(self.spread_deg[row])))

    def place(self, camera_ids: Sequence[str], R: np.ndarray, T: np.ndarray,
              registered: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
        """Poses (in the capture's SfM world) of the unregistered rows whose camera the rig knows.

        The capture's world is tied to the rig by a similarity fitted on its registered views that
        the rig knows (>= 2 needed; none placed otherwise).
        """
        index = {cam: k for k, cam in enumerate(self.camera_ids)}
        common = [i for i in np.flatnonzero(registered) if camera_ids[i] in index]
        if len(common) < 2:
            return {}
        rig_rows = [index[camera_ids[i]] for i in common]
        scale, R_w, t_w = fit_pose_similarity(self.R[rig_rows], self.T[rig_rows], R[common], T[common])
        placed = {}
        for i in np.flatnonzero(~np.asarray(registered, dtype=bool)):
            k = index.get(camera_ids[i])
            if k is not None:
                placed[int(i)] = transform_pose(self.R[k], self.T[k], scale, R_w, t_w)
        return placed

    def save(self, path: Path, session: str, cfg: Config, inputs_hash: str = "") -> Path:
        tensors = {"R": self.R, "T": self.T, "K": self.K, "width": self.width.astype(np.int32),
                   "height": self.height.astype(np.int32), "captures": self.captures.astype(np.int32),
                   "spread_deg": self.spread_deg.astype(np.float64)}  # fmt: skip
        return io.save_record(path, tensors, kind="rig", stage=STAGE, capture=f"rig_{session}", names=self.camera_ids,
                              config=cfg, inputs_hash=inputs_hash,
                              extra={"rig_convention": RIG_CONVENTION})  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike) -> Rig:
        """Read a rig record (``WORK/rig_<session>.safetensors``); InputError when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"--rig {path}: no such rig file; use auto, off, or a rig_<session>.safetensors that "
                             "an earlier `nvf poses --rig auto` wrote")  # fmt: skip
        try:
            record = io.load_record(path, kind="rig", schema=RIG_SCHEMA)
        except Exception as exc:  # RecordError: wrong kind, corrupt file
            raise InputError(f"--rig {path}: not a usable rig record ({exc})") from None
        return cls(record.names, record["R"], record["T"], record["K"], record["width"], record["height"],
                   record["captures"], record["spread_deg"])  # fmt: skip


def rig_path(work: Path, session: str) -> Path:
    """Where the rig solved from a session's captures is saved: ``WORK/rig_<session>.safetensors``."""
    return Path(work) / f"rig_{session or 'all'}.safetensors"


def fit_pose_similarity(R_src: np.ndarray, T_src: np.ndarray, R_dst: np.ndarray,
                        T_dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:  # fmt: skip
    """Similarity X_dst = s R_w X_src + t_w between two worlds posing the same cameras (N >= 2).

    Uses the rotations as well as the centres, so two views suffice: R_w is the chordal mean of
    R_dst^T R_src, then s and t_w solve the centres in least squares.
    """
    M = np.einsum("nji,njk->ik", R_dst, R_src)  # sum of R_dst^T R_src
    U, _, Vt = np.linalg.svd(M)
    R_w = U @ np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))]) @ Vt
    C_src = geometry.camera_centers(R_src, T_src) @ R_w.T
    C_dst = geometry.camera_centers(R_dst, T_dst)
    src_c, dst_c = C_src - C_src.mean(0), C_dst - C_dst.mean(0)
    scale = float((src_c * dst_c).sum() / max((src_c**2).sum(), 1e-18))
    return scale, R_w, C_dst.mean(0) - scale * C_src.mean(0)


def transform_pose(R: np.ndarray, T: np.ndarray, scale: float, R_w: np.ndarray,
                   t_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Cameras (R [...,3,3], T [...,3]) of world A expressed in world B, where X_B = scale R_w X_A + t_w."""
    R_b = np.asarray(R, dtype=np.float64) @ R_w.T
    center = scale * geometry.camera_centers(R, T) @ R_w.T + t_w
    return R_b, -np.einsum("...ij,...j->...i", R_b, center)


def solve_rig(captures: Sequence[CapturePoses], iterations: int = 4) -> Rig:
    """The rig from the SfM views of several captures of the same cameras (generalised Procrustes).

    Each capture's SfM world is tied to the current rig by a similarity on the cameras both know;
    every camera's pose is then the mean over captures (chordal mean rotation, mean centre). The
    rig starts from the capture SfM posed most completely, and is refined ``iterations`` times.
    Cameras no capture registered are left out of the rig.
    """
    sfm = [c.source == SOURCES["sfm"] for c in captures]
    ref = int(np.argmax([m.sum() for m in sfm]))
    poses_by_cam: dict[str, tuple[np.ndarray, np.ndarray]] = {
        captures[ref].camera_ids[i]: (captures[ref].R[i], captures[ref].T[i]) for i in np.flatnonzero(sfm[ref])
    }
    for _ in range(iterations):
        gathered: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, int, int]]] = {}
        for capture, mask in zip(captures, sfm):
            rows = [i for i in np.flatnonzero(mask) if capture.camera_ids[i] in poses_by_cam]
            if len(rows) < 2:
                continue
            R_rig = np.array([poses_by_cam[capture.camera_ids[i]][0] for i in rows])
            T_rig = np.array([poses_by_cam[capture.camera_ids[i]][1] for i in rows])
            scale, R_w, t_w = fit_pose_similarity(capture.R[rows], capture.T[rows], R_rig, T_rig)
            for i in np.flatnonzero(mask):
                R_i, T_i = transform_pose(capture.R[i], capture.T[i], scale, R_w, t_w)
                K_i = capture.K[i]
                gathered.setdefault(capture.camera_ids[i], []).append(
                    (R_i, T_i, K_i, int(capture.width[i]), int(capture.height[i]))
                )
        updated = {}
        for cam, items in gathered.items():
            Rs = np.array([item[0] for item in items])
            U, _, Vt = np.linalg.svd(Rs.sum(0))
            R_mean = U @ np.diag([1.0, 1.0, np.sign(np.linalg.det(U @ Vt))]) @ Vt
            center = geometry.camera_centers(Rs, np.array([item[1] for item in items])).mean(0)
            updated[cam] = (R_mean, -R_mean @ center)
        poses_by_cam = updated
    cams = [cam for cam in dict.fromkeys(c for capture in captures for c in capture.camera_ids) if cam in gathered]
    R = np.array([poses_by_cam[cam][0] for cam in cams])
    T = np.array([poses_by_cam[cam][1] for cam in cams])
    K, width, height, counts, spread = [], [], [], [], []
    for k, cam in enumerate(cams):
        items = gathered[cam]
        w, h = items[0][3], items[0][4]
        Ks = np.array([_scaled_intrinsics(item[2], item[3], item[4], w, h) for item in items])
        K.append(np.median(Ks, axis=0))
        width.append(w)
        height.append(h)
        counts.append(len(items))
        angles = geometry.rotation_angle_deg(np.array([item[0] for item in items]), R[k][None])
        spread.append(float(np.sqrt(np.mean(np.square(angles)))))
    return Rig(cams, R, T, np.array(K), np.array(width), np.array(height), np.array(counts), np.array(spread))


# ----------------------------------------------------------------------------------------------
# One capture
# ----------------------------------------------------------------------------------------------


def check_capture(root: Path, capture: dataset.Capture, decode: bool = True) -> CheckedImages:
    """Validate a capture's images (>= 2, unique names, and with `decode` decodable); returns their
    sizes and contrast when decoded (`inspect_images`), else no sizes."""
    if len(capture.images) < 2:
        raise InputError(f"capture {capture.id}: {len(capture.images)} image(s); poses need at least 2 views "
                         "of one capture (add views or leave the capture out with --captures)")  # fmt: skip
    names = capture.names
    if len(set(names)) != len(names):
        dupe = next(n for n in names if names.count(n) > 1)
        raise InputError(f"capture {capture.id}: image name {dupe} occurs twice; rename or remove the copy")
    return inspect_images(root, [entry.path for entry in capture.images]) if decode else CheckedImages([])


def order_parameter(capture: dataset.Capture, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(order [N], elevation [N]): Multi-PIE azimuths and elevations, else the row index and 0."""
    if layout == "multipie" and all(cam in dataset.MULTIPIE_CAMERAS for cam in capture.cameras):
        infos = [dataset.MULTIPIE_CAMERAS[cam] for cam in capture.cameras]
        return np.array([i.azimuth_deg for i in infos]), np.array([i.elevation_deg for i in infos])
    return np.arange(len(capture.images), dtype=np.float64), np.zeros(len(capture.images))


def estimate_capture(root: Path, capture: dataset.Capture, cfg: Config, layout: str,
                     checked: CheckedImages | None = None, rig: Rig | None = None) -> CapturePoses:  # fmt: skip
    """SfM on one capture, then the fallbacks for views it could not register (rig, then interp)."""
    return complete_capture(sfm_capture(root, capture, cfg, checked), capture, layout, rig)


def sfm_capture(root: Path, capture: dataset.Capture, cfg: Config,
                checked: CheckedImages | None = None, cancel: Any = None) -> CapturePoses:  # fmt: skip
    """SfM on one capture (``checked``: its `check_capture`, done here when not given; ``cancel``:
    see `run_sfm`); rows SfM could not register keep identity poses, zero K and source interp."""
    checked = checked if checked is not None else check_capture(root, capture)
    sizes = checked.sizes
    paths = [entry.path for entry in capture.images]
    rec, n_models = run_sfm(root, paths, cfg, sizes, checked.contrast, label=f"poses: {capture.id}", cancel=cancel)
    views, sparse = extract_views(rec, paths) if rec is not None else ({}, None)
    n = len(paths)
    R, T = np.tile(np.eye(3), (n, 1, 1)), np.zeros((n, 3))
    K = np.zeros((n, 3, 3))
    source = np.full(n, SOURCES["interp"], dtype=np.int8)
    confidence = np.zeros(n, dtype=np.float32)
    reproj = np.full(n, np.nan)
    cameras: dict[str, dict[str, Any]] = {}
    for i, path in enumerate(paths):
        view = views.get(path)
        if view is None:
            continue
        R[i], T[i], K[i] = view["R"], view["T"], view["K"]
        source[i] = SOURCES["sfm"]
        reproj[i] = view["reproj_error"]
        confidence[i] = _sfm_confidence(view["observations"], view["reproj_error"])
        cameras[capture.names[i]] = view["camera"]
    return CapturePoses(
        names=capture.names, camera_ids=capture.cameras, R=R, T=T, K=K,
        width=np.array([s[0] for s in sizes], dtype=np.int32), height=np.array([s[1] for s in sizes], dtype=np.int32),
        source=source, confidence=confidence, reproj_error=reproj,
        colmap_cameras=cameras, models=n_models, **_sparse_fields(sparse),
    )  # fmt: skip


def complete_capture(poses: CapturePoses, capture: dataset.Capture, layout: str,
                     rig: Rig | None = None) -> CapturePoses:  # fmt: skip
    """Fill the rows SfM left unregistered: through the rig where it knows the camera (source rig),
    then by interpolation along the ring (source interp). Needs >= 2 SfM views."""
    registered = poses.source == SOURCES["sfm"]
    n = len(poses.names)
    if registered.sum() < 2:
        raise InputError(
            f"capture {capture.id}: SfM registered {int(registered.sum())} of {n} views, too few to place the "
            "others; check the images (texture, overlap) or try --preset colmap / --colmap overrides"
        )
    R, T, K = poses.R.copy(), poses.T.copy(), poses.K.copy()
    source, confidence = poses.source.copy(), poses.confidence.copy()
    cameras = dict(poses.colmap_cameras)
    if rig is not None and not registered.all():
        placed = rig.place(poses.camera_ids, R, T, registered)
        for i, (R_i, T_i) in placed.items():
            k = rig.camera_ids.index(poses.camera_ids[i])
            R[i], T[i] = R_i, T_i
            K[i] = _scaled_intrinsics(rig.K[k], int(rig.width[k]), int(rig.height[k]),
                                      int(poses.width[i]), int(poses.height[i]))  # fmt: skip
            source[i] = SOURCES["rig"]
            confidence[i] = rig.confidence(k)
            cameras[poses.names[i]] = {"model": "PINHOLE", "from": "rig", "camera": poses.camera_ids[i]}
        if placed:
            log.info("poses: %s: %d view(s) posed through the rig (%s)", capture.id, len(placed),
                     ", ".join(poses.names[i] for i in placed))  # fmt: skip
    known = source != SOURCES["interp"]
    if not known.all():
        missing = ", ".join(poses.names[i] for i in np.flatnonzero(~known))
        log.warning("poses: %s: %d of %d views unregistered (%s); their poses are interpolated (source=interp)",
                    capture.id, int((~known).sum()), n, missing)  # fmt: skip
        order, elevation = order_parameter(capture, layout)
        R, T, gap = interpolate_missing(R, T, known, order, elevation)
        rows = np.flatnonzero(known)
        step = np.median(np.diff(np.sort(order))) if n > 1 else 1.0
        for i in np.flatnonzero(~known):
            nearest = rows[np.argmin(np.abs(order[rows] - order[i]))]
            K[i] = _scaled_intrinsics(K[nearest], int(poses.width[nearest]), int(poses.height[nearest]),
                                      int(poses.width[i]), int(poses.height[i]))  # fmt: skip
            confidence[i] = float(0.5 * math.exp(-(gap[i] / max(step, 1e-9) - 1.0) / 2.0)) if gap[i] > 0 else 0.5
            cameras[poses.names[i]] = {**cameras.get(poses.names[nearest], {}), "from": poses.names[nearest]}
    return dataclasses.replace(poses, R=R, T=T, K=K, source=source, colmap_cameras=cameras,
                               confidence=np.clip(confidence, 0, 1).astype(np.float32))  # fmt: skip


def _sparse_fields(sparse: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    if sparse is None:
        return {}
    return {"points_p3": sparse["points"], "colors_p3": sparse["colors"], "point_error_p": sparse["error"],
            "track_offsets": sparse["track_offsets"], "track_images": sparse["track_images"],
            "track_uv": sparse["track_uv"]}  # fmt: skip


def _sfm_confidence(observations: int, reproj_error: float) -> float:
    """1 - exp(-obs / 50), damped by the reprojection error (1 px halves it)."""
    error = reproj_error if np.isfinite(reproj_error) else 1.0
    return float((1.0 - math.exp(-observations / 50.0)) / (1.0 + error))


def _scaled_intrinsics(K: np.ndarray, width: int, height: int, new_width: int, new_height: int) -> np.ndarray:
    scale = np.diag([new_width / width, new_height / height, 1.0])
    return scale @ K


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _absolute_image_paths(root: Path, capture: dataset.Capture, names: Sequence[str]) -> list[str]:
    """The image file of each row, absolute, so later stages find the images without --data."""
    by_name = {Path(entry.path).name: str((root / entry.path).resolve()) for entry in capture.images}
    return [by_name[name] for name in names]


def write_capture(out: Path, root: Path, capture: dataset.Capture, poses: CapturePoses, cfg: Config,
                  inputs_hash: str) -> list[Path]:  # fmt: skip
    """Write sparse, the exports, then poses (the completion mark, removed first: `io.record_set`);
    returns the paths written."""
    with io.record_set(worktree.record_path(out, capture.id, "poses")):
        return _write_capture_set(out, root, capture, poses, cfg, inputs_hash)


def _write_capture_set(out: Path, root: Path, capture: dataset.Capture, poses: CapturePoses, cfg: Config,
                       inputs_hash: str) -> list[Path]:  # fmt: skip
    folder = worktree.capture_dir(out, capture.id)
    meta = {"stage": STAGE, "capture": capture.id, "names": poses.names, "config": cfg, "inputs_hash": inputs_hash}
    written = [io.save_record(worktree.record_path(out, capture.id, "sparse"), {
        "points": poses.points_p3, "colors": poses.colors_p3, "error": poses.point_error_p,
        "track_offsets": poses.track_offsets, "track_images": poses.track_images, "track_uv": poses.track_uv,
    }, kind="sparse", **meta)]  # fmt: skip
    distortion = io.colmap_cameras_distortion(poses.colmap_cameras, poses.names)
    cameras = io.CameraSet(poses.names, poses.R, poses.T, poses.K, poses.width, poses.height, distortion)
    if "transforms" in cfg.export:
        rel = [os.path.relpath(root / entry.path, folder) for entry in capture.images]
        extra = [{"file_path": path, "nvf_source": _source_name(s), "nvf_confidence": float(c)}
                 for path, s, c in zip(rel, poses.source, poses.confidence)]  # fmt: skip
        written.append(io.write_transforms(folder / "transforms.json", cameras, extra_frames=extra))
    if "colmap" in cfg.export:
        models = [(poses.colmap_cameras[name]["model"], poses.colmap_cameras[name]["params"])
                  if source == SOURCES["sfm"] else None for name, source in zip(poses.names, poses.source)]  # fmt: skip
        written.append(io.write_colmap_text(folder / "colmap", cameras, poses.points_p3, poses.colors_p3,
                                            errors_n=poses.point_error_p, track_offsets=poses.track_offsets, track_images=poses.track_images,
                                            track_uv=poses.track_uv, camera_models=models))  # fmt: skip
    tensors = {"R": poses.R, "T": poses.T, "K": poses.K, "width": poses.width, "height": poses.height,
               "source": poses.source, "confidence": poses.confidence, "reproj_error": poses.reproj_error}  # fmt: skip
    unregistered = [n for n, s in zip(poses.names, poses.source) if s != SOURCES["sfm"]]
    written.append(io.save_record(worktree.record_path(out, capture.id, "poses"), tensors, kind="poses", extra={
        "camera_ids": json.dumps(poses.camera_ids), "sources": json.dumps(SOURCES),
        "colmap_cameras": json.dumps(poses.colmap_cameras), "unregistered": json.dumps(unregistered),
        "sfm_models": str(poses.models), "image_paths": json.dumps(_absolute_image_paths(root, capture, poses.names)),
    }, **meta))  # fmt: skip
    return written


def _source_name(code: int) -> str:
    return next(name for name, value in SOURCES.items() if value == int(code))


# ----------------------------------------------------------------------------------------------
# Stage entry point
# ----------------------------------------------------------------------------------------------


def validate(cfg: Config) -> None:
    """Reject bad settings before any work (unknown exports, --colmap keys, rig mode)."""
    unknown = [e for e in cfg.export if e not in EXPORTS]
    if unknown:
        raise InputError(f"unknown export '{unknown[0]}'; choose from: {', '.join(EXPORTS)}")
    if cfg.focal_px is not None and not cfg.focal_px > 0:
        raise InputError(f"focal length must be positive, got {cfg.focal_px}")
    build_options(cfg)  # raises for unknown --colmap keys


def resolve_rig(cfg: Config, layout: str) -> tuple[str, Rig | None]:
    """(mode, rig): mode off | auto | on | file; the rig loaded from ``cfg.rig`` when it names a file."""
    if cfg.rig == "off":
        return "off", None
    if cfg.rig in ("auto", "on"):
        if layout != "multipie":
            if cfg.rig == "auto":
                log.info("poses: --rig auto: layout '%s' is not a fixed camera rig; posing captures one by one", layout)
                return "off", None
            raise InputError(f"--rig on needs a fixed camera rig (the Multi-PIE layout, the same cameras in every "
                             f"capture); this dataset scanned as '{layout}'. Use --rig off or auto")  # fmt: skip
        return cfg.rig, None
    return "file", Rig.load(cfg.rig)


def capture_hash(capture: dataset.Capture, cfg: Config, image_digests: Sequence[str]) -> str:
    """Input hash of a capture: its image names and bytes (`image_digests`, sha256 in view order)
    plus the config (and the rig file's bytes)."""
    rig_file = [io.hash_file(cfg.rig)] if cfg.rig not in ("off", "auto", "on") and Path(cfg.rig).is_file() else []
    return io.hash_inputs(dataclasses.asdict(cfg), capture.names, *rig_file, list(image_digests))


def _groups(selected: Sequence[dataset.Capture], mode: str) -> list[list[dataset.Capture]]:
    """Units of work: one capture each, or (rig modes auto/on) the captures of a session together."""
    if mode not in ("auto", "on"):
        return [[capture] for capture in selected]
    by_session: dict[str, list[dataset.Capture]] = {}
    for capture in selected:
        by_session.setdefault(capture.session, []).append(capture)
    groups = []
    for session, members in by_session.items():
        if len(members) >= 2:
            groups.append(members)
        elif mode == "on":
            raise InputError(f"--rig on: session {session} has only capture {members[0].id} here; a rig is solved "
                             "from >= 2 captures of a session (add captures, reuse a rig file with --rig FILE, or "
                             "use --rig auto)")  # fmt: skip
        else:
            groups.append(members)
    return groups


def run(
    data: Path,
    out: Path,
    cfg: Config = Config(),
    *,
    shard: worktree.Shard = worktree.Shard(),
    captures: Sequence[str] | None = None,
    overwrite: bool = False,
    device: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    captures_at_once: int = 2,
) -> list[Path]:
    """Estimate poses for every selected capture of ``data``; returns the paths written.

    Every selected capture is validated (images readable, >= 2 views) before any is processed, so
    bad input writes nothing. Up-to-date captures (same input hash) are skipped unless ``overwrite``.
    Rig modes: ``auto``/``on`` pose the captures of a session together (a session with >= 2
    captures solves the rig from their SfM views, saves it as ``WORK/rig_<session>.safetensors``
    and poses every view SfM missed through it, source rig); a rig file poses each capture
    through that rig. ``device`` is accepted for the common stage signature; pycolmap runs on CPU.
    ``captures_at_once`` captures go through SfM together, so one's single-threaded mapping overlaps
    another's extraction (4 ring captures on 2 cores: 4.41 s -> 3.74 s; the same poses).
    """
    del device  # SIFT on CPU; pycolmap picks CUDA itself where its build has it
    validate(cfg)
    data, out = Path(data), Path(out)
    found = dataset.scan(data, cfg.layout)
    mode, rig = resolve_rig(cfg, found.layout)
    selected = worktree.select_captures(found.captures, shard=shard, capture_ids=captures)
    if not selected:
        log.warning("poses: no captures selected (shard %s/%s)", shard.index, shard.count)
        return []
    groups = _groups(selected, mode)
    for capture in selected:
        check_capture(data, capture, decode=False)
    # Image digests are remembered in the work tree (core.digests): a rerun reads no unchanged file.
    memos: dict[str, digests.DigestMemo] = {}  # saved once the captures to pose are validated
    per_capture = dict(zip([c.id for c in selected], digests.image_digests(data, out, selected, memos=memos)))
    plans = []  # (group, input hashes, pending flags)
    for group in groups:
        hashes = [capture_hash(c, cfg, per_capture[c.id]) for c in group]
        if len(group) > 1:  # a rig couples the captures of the group: each depends on all
            hashes = [io.hash_inputs(own, sorted(hashes)) for own in hashes]
        pending = [overwrite or not worktree.is_up_to_date(worktree.record_path(out, c.id, "poses"), h)
                   or not _exports_present(out, c.id, cfg) for c, h in zip(group, hashes)]  # fmt: skip
        if len(group) > 1 and any(pending):
            pending = [True] * len(group)
        plans.append((group, hashes, pending))
    # decode what will be posed, all before the first write (an up-to-date capture decoded when it was posed)
    checked = {c.id: check_capture(data, c) for group, _, pending in plans for c, todo in zip(group, pending) if todo}
    for memo in memos.values():
        memo.save()
    written: list[Path] = []
    done = 0
    # SfM runs `captures_at_once` captures at a time (a capture's mapping and adjustment run on one
    # thread, its extraction and matching on all); results come back in order, bit for bit the same
    to_pose = [c for group, _, pending in plans for c, todo in zip(group, pending) if todo]

    cancel = cancellation_token() if to_pose else None

    def pose(capture: dataset.Capture) -> CapturePoses:
        return sfm_capture(data, capture, cfg, checked[capture.id], cancel=cancel)

    # BLAS on one thread for the whole run, set and restored here: sift_matching runs its own threads
    # on an error or Ctrl-C, the captures still in SfM are cancelled before they are waited for
    posed_in_order = batching.ordered_thread_map(pose, to_pose, captures_at_once,
                                                 on_abort=None if cancel is None else cancel.cancel)  # fmt: skip
    with batching.one_blas_thread(), contextlib.closing(posed_in_order) as posed:
        for group, hashes, pending in plans:
            partial = {c.id: next(posed) for c, todo in zip(group, pending) if todo}
            group_rig = rig
            if len(group) > 1 and partial:
                group_rig = _solve_group_rig(list(partial.values()), group)
                if group_rig is not None:
                    session = group[0].session
                    written.append(group_rig.save(rig_path(out, session), session, cfg, io.hash_inputs(sorted(hashes))))
            for capture, inputs_hash in zip(group, hashes):
                done += 1
                if capture.id not in partial:
                    log.info("poses: %s up to date, skipped", capture.id)
                else:
                    poses = complete_capture(partial[capture.id], capture, found.layout, group_rig)
                    written.extend(write_capture(out, data, capture, poses, cfg, inputs_hash))
                    counts = {name: int((poses.source == code).sum()) for name, code in SOURCES.items()}
                    log.info("poses: %s: %d/%d views by SfM, %d through the rig, %d interpolated", capture.id,
                             counts["sfm"], len(poses.names), counts["rig"], counts["interp"])  # fmt: skip
                if progress is not None:
                    progress(done, len(selected))
    return written


def _solve_group_rig(partial: Sequence[CapturePoses], group: Sequence[dataset.Capture]) -> Rig | None:
    usable = [p for p in partial if int((p.source == SOURCES["sfm"]).sum()) >= 2]
    if len(usable) < 2:
        log.warning("poses: session %s: fewer than 2 captures with >= 2 SfM views; no rig solved",
                    group[0].session)  # fmt: skip
        return None
    rig = solve_rig(usable)
    log.info("poses: session %s: rig of %d cameras solved from %d captures (rotation spread median %.3f°)",
             group[0].session, len(rig.camera_ids), len(usable), float(np.median(rig.spread_deg)))  # fmt: skip
    return rig


def _exports_present(out: Path, capture: str, cfg: Config) -> bool:
    folder = worktree.capture_dir(out, capture)
    need = {"transforms": folder / "transforms.json", "colmap": folder / "colmap" / "images.txt"}
    return worktree.record_path(out, capture, "sparse").is_file() and all(need[e].exists() for e in cfg.export)


def load_poses(work: Path, capture: str) -> io.Record:
    """The poses record of a capture (validated)."""
    return io.load_record(worktree.record_path(work, capture, "poses"), kind="poses", capture=capture)
