"""Every on-disk format nvf reads or writes, in one place.

- safetensors *records*: named tensors + string metadata (kind, producing stage, nvf version, config
  JSON, input hash, row names, capture id, conventions), validated on load;
- atomic writes: every file nvf writes goes to a temp file beside the target and is renamed into
  place, so an interrupted run never leaves a half-written output;
- PLY point clouds (points, colours, normals) through Open3D;
- images (EXIF orientation applied, RGB uint8);
- nerfstudio ``transforms.json`` (OpenGL camera-to-world, per-frame intrinsics when cameras differ);
- COLMAP text models (cameras.txt, images.txt, points3D.txt).

Convention: poses in records are world-to-camera OpenCV (x_cam = R x_world + T), see
`stages.core.geometry`. Conversions to other frames happen here, at the format boundary, only.

Modules: `atomic` (atomic writes, folder ownership, record sets), `jsonio` (JSON files, input
hashes), `records` (safetensors records, and the values stages pass through them: pose source
tags, depth kinds, the z_cond layout), `images`, `ply` (point clouds), `cameras` (transforms.json,
COLMAP text). Every name is re-exported here: call sites use ``io.X``. A test
that monkeypatches a setting must patch the submodule that reads it (e.g. ``io.records``).
"""

import logging

from stages.core.io.atomic import (
    OWNED_MARK,
    atomic_dir,
    atomic_path,
    check_replaceable,
    claim_dir,
    foreign_files,
    record_set,
    remove_owned_dir,
    write_text,
)
from stages.core.io.cameras import (
    COLMAP_DISTORTION_PARAMS,
    CameraSet,
    colmap_cameras_distortion,
    opencv_distortion,
    read_transforms,
    record_distortion,
    transforms_image_paths,
    write_colmap_text,
    write_transforms,
)
from stages.core.io.images import (
    IMAGE_SUFFIXES,
    image_hw,
    image_size,
    read_gray,
    read_image,
    read_image_alpha,
    write_image,
)
from stages.core.io.jsonio import hash_file, hash_inputs, read_json, to_jsonable, write_json
from stages.core.io.ply import PointCloud, import_open3d, read_ply, write_ply
from stages.core.io.records import (
    CONDITIONING_LAYOUTS,
    DEPTH_CONVENTION,
    DEPTH_KINDS,
    FINITE,
    FORMAT_VERSION,
    GROUNDTRUTH_STAGE,
    NAMES_IN_HEADER_MAX,
    POSE_CODE_DIMS,
    POSE_CODES,
    POSE_CONVENTION,
    POSE_LAYOUTS,
    POSE_SOURCES,
    SCHEMAS,
    DepthKind,
    PoseLayout,
    Record,
    depth_kind,
    join_z_cond,
    load_record,
    pose_part,
    read_record_metadata,
    read_record_names,
    read_record_tensor,
    safetensors_bytes,
    save_record,
    without_clip,
    z_cond_dim,
)

log = logging.getLogger("nvf")

__all__ = [
    "COLMAP_DISTORTION_PARAMS",
    "CONDITIONING_LAYOUTS",
    "CameraSet",
    "DEPTH_CONVENTION",
    "DEPTH_KINDS",
    "DepthKind",
    "FINITE",
    "FORMAT_VERSION",
    "GROUNDTRUTH_STAGE",
    "IMAGE_SUFFIXES",
    "NAMES_IN_HEADER_MAX",
    "OWNED_MARK",
    "POSE_CODES",
    "POSE_CODE_DIMS",
    "POSE_CONVENTION",
    "POSE_LAYOUTS",
    "POSE_SOURCES",
    "PointCloud",
    "PoseLayout",
    "Record",
    "SCHEMAS",
    "atomic_dir",
    "atomic_path",
    "check_replaceable",
    "claim_dir",
    "colmap_cameras_distortion",
    "depth_kind",
    "foreign_files",
    "hash_file",
    "hash_inputs",
    "image_hw",
    "image_size",
    "import_open3d",
    "join_z_cond",
    "load_record",
    "opencv_distortion",
    "pose_part",
    "read_gray",
    "read_image",
    "read_image_alpha",
    "read_json",
    "read_ply",
    "read_record_metadata",
    "read_record_names",
    "read_record_tensor",
    "read_transforms",
    "record_distortion",
    "record_set",
    "remove_owned_dir",
    "safetensors_bytes",
    "save_record",
    "without_clip",
    "to_jsonable",
    "transforms_image_paths",
    "write_colmap_text",
    "write_image",
    "write_json",
    "write_ply",
    "write_text",
    "write_transforms",
    "z_cond_dim",
]
