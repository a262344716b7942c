"""Settings of the `poses` stage: constants, `Config` and its `PRESETS`, the per-capture result
`CapturePoses`, and the pycolmap option objects built from a Config (detect features, not versions).
"""

from __future__ import annotations

import enum
import logging
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.core import io
from stages.core.errors import InputError, StageFailure

log = logging.getLogger("nvf")


STAGE = "poses"
SOURCES: dict[str, int] = io.POSE_SOURCES
"""Where a view's pose came from, as stored in the ``source`` tensor (int8): `io.POSE_SOURCES`."""
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
    captures_at_once: int = 2
    """Captures in SfM at a time: one's single-threaded mapping overlaps another's extraction (the
    same poses bit for bit; not part of a record's input hash)."""


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
