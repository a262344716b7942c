"""Stage `triplets`: the training index — per image the unified record D_I, (source, target) pairs with
their relative-pose conditioning, and person-disjoint splits (paper §IV-4, §IV-6, §IV-A, Table II).

Per image (N rows), D_I = {image, z_I, PoseDict[I], Depth(I)} as references, not copies: the image
path (relative to the dataset root), and row indices into the capture's ``embed``, ``poses`` and
(when present) ``aligned``/``depth`` records of the work tree. Per pair (P rows, both views of one
capture): source and target image rows and the conditioning code.

Conditioning (paper §IV-4): R_rel = R_t R_s^T, T_rel = T_t - R_rel T_s, code = flatten([R_rel | T_rel])
(12 numbers, row-major; `geometry.pose_code12`), poses world-to-camera OpenCV. The relative pose does
not change under a rotation or translation of the world, only under its scale, so translations are
normalised per capture: every T is multiplied by ``pose_scale`` = 1 / (mean distance of the camera
centres from their centroid), i.e. the world is scaled so that the mean distance of the camera
centres from their centroid is 1 (their distance to the subject is another figure: about 1.30 on
Multi-PIE's 15 cameras, `sample.MULTIPIE_POSE_RADIUS`). An SfM capture (arbitrary scale) and a rig capture of another subject then mean the same by
"one unit". Optionally Zero-1-to-3's 4 numbers (Δpolar, sin Δazimuth, cos Δazimuth, Δradius) are
stored too, with the capture's up axis and look-at centre estimated from the poses (see
`capture_frame`). What train consumes is z_cond = [CLIP(source) ‖ pose code] (512 + 12 = 524 numbers
for ViT-B/32): the record stores the pose codes and the embedding row references, and
`TripletSet.z_cond` concatenates them (storing z_cond itself would repeat each 2 KB embedding once
per pair, ~40x the record size for all-pairs on a 15-camera ring).

Views are ordered per capture by azimuth (-90° -> +90°, then elevation): ``azimuth_deg``,
``elevation_deg`` and ``order`` (rank in the capture) serve the sequential, person-aware sampler.
Multi-PIE cameras take the azimuth of the camera table; other layouts take it from the poses
(about the estimated up axis, zero at the mean viewing direction, positive toward the cameras'
right).

Splits are disjoint by person (subject): subjects are sorted, shuffled with the seed and dealt by
the split fractions. The record stores each image's split and the subject lists; `load_triplets`
checks on every load that no person is in two splits.

Multi-PIE protocols (E, P, M, U; `stages.core.dataset`): the protocol picks the captures (expression,
shot) and restricts the *source* views to its cameras (E/M/U: the frontal camera 051, P: the 13
head-height cameras); targets are every view that passes the other filters. So protocol E gives
"frontal photo of any expression -> every other view".

Output: ``triplets.safetensors`` (kind ``triplets``, `SCHEMA`) and a CSV view beside it
(``<stem>.csv``, one row per pair, and ``<stem>.images.csv``, one row per image) that pandas opens.
Paths inside both are relative to the folder of the output file.

Modules: `config` (Config, PRESETS, SCHEMA), `codes` (capture frame, pairs, pose codes), `splits`,
`rows` (one capture's rows), `write` (record and CSV views), `load` (`TripletSet`), `entry` (`run`);
this package re-exports them.
"""

from __future__ import annotations

from stages.triplets.codes import (
    CaptureFrame,
    capture_frame,
    capture_pairs,
    decode_code12,
    pair_codes,
    pair_zero123_codes,
    pose_scale,
    view_order,
)
from stages.triplets.config import (
    KIND,
    OPTIONAL_SCHEMA,
    PAIR_MODES,
    POSE_NORMALIZATION,
    POSE_SOURCES,
    PRESETS,
    SCHEMA,
    SPLITS,
    STAGE,
    Config,
    DepthChoice,
    PairSpec,
    PoseCode,
    record_schema,
)
from stages.triplets.entry import PATHS, resolve_data_root, run, validate
from stages.triplets.load import TripletSet, load_triplets
from stages.triplets.splits import assign_splits, check_fractions, check_splits, split_counts
from stages.triplets.write import write_csv

__all__ = [
    "STAGE",
    "PATHS",
    "KIND",
    "SPLITS",
    "POSE_SOURCES",
    "PAIR_MODES",
    "PoseCode",
    "DepthChoice",
    "SCHEMA",
    "OPTIONAL_SCHEMA",
    "POSE_NORMALIZATION",
    "PairSpec",
    "Config",
    "PRESETS",
    "pose_scale",
    "CaptureFrame",
    "capture_frame",
    "view_order",
    "capture_pairs",
    "pair_codes",
    "decode_code12",
    "pair_zero123_codes",
    "check_fractions",
    "split_counts",
    "assign_splits",
    "check_splits",
    "validate",
    "resolve_data_root",
    "run",
    "record_schema",
    "TripletSet",
    "load_triplets",
    "write_csv",
]
