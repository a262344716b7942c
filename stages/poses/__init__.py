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

Modules: `options` (Config, PRESETS, pycolmap options), `sfm` (pycolmap passes, with `sift_matching`),
`rig`, `capture` (one capture: SfM, then the rig and ring fallbacks), `write` (records and exports),
`entry` (`run`); the pose geometry they share is `stages.core.pose_math`. This package re-exports them.
"""

from __future__ import annotations

from stages.core.pose_math import fit_circle, fit_pose_similarity, interpolate_missing, transform_pose
from stages.poses import sift_matching
from stages.poses.capture import check_capture, complete_capture, estimate_capture, order_parameter, sfm_capture
from stages.poses.entry import capture_hash, load_poses, resolve_rig, run, validate
from stages.poses.options import (
    CAMERA_MODELS,
    COLMAP_PEAK_THRESHOLD,
    COLMAP_ROOTS,
    EXPORTS,
    FACE_CONTRAST,
    PRESETS,
    REFINE_FUNCTION_TOLERANCE,
    SOURCES,
    STAGE,
    CameraModel,
    CapturePoses,
    Config,
    build_options,
    parse_overrides,
)
from stages.poses.rig import RIG_CONVENTION, RIG_SCHEMA, Rig, rig_path, solve_rig
from stages.poses.sfm import (
    CheckedImages,
    _bundle_adjust,
    _quiet_colmap,
    cancellation_token,
    capture_contrast,
    contrast_peak_threshold,
    extract_features,
    extract_views,
    fast_pass,
    fine_contrast,
    inspect_images,
    refine_reconstruction,
    run_sfm,
)
from stages.poses.write import write_capture

__all__ = [
    "sift_matching",
    "STAGE",
    "SOURCES",
    "EXPORTS",
    "CameraModel",
    "CAMERA_MODELS",
    "COLMAP_ROOTS",
    "REFINE_FUNCTION_TOLERANCE",
    "COLMAP_PEAK_THRESHOLD",
    "FACE_CONTRAST",
    "Config",
    "PRESETS",
    "CapturePoses",
    "build_options",
    "parse_overrides",
    "_quiet_colmap",
    "_bundle_adjust",
    "run_sfm",
    "fast_pass",
    "contrast_peak_threshold",
    "fine_contrast",
    "capture_contrast",
    "CheckedImages",
    "inspect_images",
    "cancellation_token",
    "extract_features",
    "refine_reconstruction",
    "extract_views",
    "fit_circle",
    "interpolate_missing",
    "RIG_SCHEMA",
    "RIG_CONVENTION",
    "Rig",
    "rig_path",
    "fit_pose_similarity",
    "transform_pose",
    "solve_rig",
    "check_capture",
    "order_parameter",
    "estimate_capture",
    "sfm_capture",
    "complete_capture",
    "write_capture",
    "validate",
    "resolve_rig",
    "capture_hash",
    "run",
    "load_poses",
]
