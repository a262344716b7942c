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
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.core import dataset, geometry, io, worktree
from stages.core.batching import ProgressFn
from stages.core.errors import InputError, RecordError

log = logging.getLogger("nvf")

STAGE = "triplets"
KIND = "triplets"
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
POSE_SOURCES: dict[str, int] = {"sfm": 0, "rig": 1, "interp": 2}
"""As `stages.poses.SOURCES`; a poses record without a ``source`` tensor (a rig or ground truth) counts as rig."""
PAIR_MODES = ("all", "adjacent", "nearest", "random")
PoseCode = Literal["paper", "zero123", "both"]
DepthChoice = Literal["auto", "aligned", "depth", "none"]

SCHEMA: dict[str, tuple[int | str, ...]] = {
    # per image (N = len(names); names are image paths relative to the dataset root)
    "capture_index": ("N",),  # int32 -> metadata captures[]
    "subject_index": ("N",),  # int32 -> metadata subjects[]
    "split": ("N",),  # int8, SPLITS
    "embed_row": ("N",),  # int32, row of the capture's embed record
    "pose_row": ("N",),  # int32, row of the capture's poses record
    "depth_row": ("N",),  # int32, row of the capture's depth record, -1 without one
    "pose_source": ("N",),  # int8, POSE_SOURCES
    "azimuth_deg": ("N",),  # float32
    "elevation_deg": ("N",),  # float32
    "order": ("N",),  # int32, rank within the capture by (azimuth, elevation)
    # per capture (C)
    "pose_scale": ("C",),  # float64, multiplies T before the codes are made
    # per pair (P)
    "pair_source": ("P",),  # int32, image row
    "pair_target": ("P",),  # int32, image row
    "pose_code": ("P", 12),  # float32, flatten([R_rel | s T_rel])
}
OPTIONAL_SCHEMA: dict[str, tuple[int | str, ...]] = {
    "zero123_code": ("P", 4),  # float32, (Δpolar, sin Δazimuth, cos Δazimuth, Δradius) in radians / scaled units
}
POSE_NORMALIZATION = "T *= pose_scale = 1 / mean |C_i - mean(C)| per capture (camera centres C = -R^T T)"


@dataclass(frozen=True)
class PairSpec:
    """How pairs are drawn inside a capture: `all`, `adjacent`, `nearest` (k) or `random` (k)."""

    mode: str = "all"
    k: int = 0

    @classmethod
    def parse(cls, text: str) -> PairSpec:
        """``all`` | ``adjacent`` | ``nearest:K`` | ``random:K`` (K >= 1)."""
        mode, sep, count = text.strip().lower().partition(":")
        if mode in ("all", "adjacent") and not sep:
            return cls(mode)
        if mode in ("nearest", "random") and count.isdigit() and int(count) >= 1:
            return cls(mode, int(count))
        raise InputError(f"bad --pairs '{text}': use all, adjacent, nearest:K or random:K with K >= 1 (e.g. nearest:2)")

    def __str__(self) -> str:
        return f"{self.mode}:{self.k}" if self.mode in ("nearest", "random") else self.mode


@dataclass(frozen=True)
class Config:
    """Which views pair up, how they are conditioned and how people are split."""

    layout: dataset.Layout = "auto"
    """Dataset layout, as in `nvf scan`."""
    pairs: str = "all"
    """Pairs inside a capture: `all` (every ordered pair), `adjacent` (azimuth neighbours),
    `nearest:K` (K nearest views by azimuth/elevation) or `random:K` (K random targets per source)."""
    exclude_interp: bool = False
    """Leave out views whose pose was interpolated (poses source `interp`), as source and as target."""
    pose_code: PoseCode = "paper"
    """Conditioning train uses: `paper` (12-D [R_rel|T_rel]), `zero123` (4-D) or `both` (16-D)."""
    train_split: float = 0.9
    """Fraction of subjects (persons) in the training split."""
    val_split: float | None = None
    """Fraction of subjects in validation; None: whatever train and test leave."""
    test_split: float = 0.0
    """Fraction of subjects in the test split."""
    seed: int = 0
    """Seed of the subject shuffle and of `random:K` pairs."""
    protocol: str | None = None
    """Multi-PIE protocol E, P, M or U: picks captures and restricts source views (see module doc)."""
    subjects: tuple[str, ...] = ()
    """Subjects to keep (empty: all)."""
    sessions: tuple[str, ...] = ()
    """Sessions to keep (Multi-PIE)."""
    expressions: tuple[str, ...] = ()
    """Expressions to keep (Multi-PIE)."""
    shots: tuple[str, ...] = ()
    """Shots (illumination) to keep (Multi-PIE)."""
    cameras: tuple[str, ...] = ()
    """Cameras to keep as sources and targets (Multi-PIE ids or file stems)."""
    depth: DepthChoice = "auto"
    """Depth reference of D_I: `aligned`, `depth`, `auto` (aligned, else depth, else none) or `none`."""
    min_depth_quality: Literal["failed", "weak", "good"] = "weak"
    """With an aligned depth reference, views whose align quality flag is below this get no depth
    reference (depth_row -1; `stages.align.QUALITY`): the image and its pairs stay."""
    skip_missing: bool = False
    """Leave out captures lacking a poses/embed record instead of stopping with an error."""
    csv: bool = True
    """Also write the CSV views beside the record."""


PRESETS: dict[str, Config] = {
    "paper": Config(),
    "sequential": Config(pairs="adjacent"),
    "zero123": Config(pose_code="zero123"),
}


# ----------------------------------------------------------------------------------------------
# Geometry of a capture
# ----------------------------------------------------------------------------------------------


def pose_scale(R_n33: np.ndarray, T_n3: np.ndarray) -> float:
    """1 / mean distance of the camera centres from their centroid (1.0 when all centres coincide)."""
    centers = geometry.camera_centers(R_n33, T_n3)  # [N, 3]
    radius = float(np.linalg.norm(centers - centers.mean(axis=0), axis=-1).mean())
    return 1.0 / radius if radius > 1e-12 else 1.0


@dataclass(frozen=True)
class CaptureFrame:
    """A capture's rig frame estimated from its poses (world units of the poses record).

    up: unit [3], the direction most orthogonal to the cameras' x axes (see `_up_axis`); center: [3]
    the point nearest to every optical axis (least squares; the centroid of the centres when the axes are parallel);
    azimuth_deg / elevation_deg [N]: of (C_i - center) about `up`, azimuth zero at the mean
    viewing direction (the first camera's for a full orbit) and positive toward the cameras' right.
    """

    up: np.ndarray
    center: np.ndarray
    azimuth_deg: np.ndarray
    elevation_deg: np.ndarray


def capture_frame(R_n33: np.ndarray, T_n3: np.ndarray) -> CaptureFrame:
    """Estimate up, look-at centre and per-view azimuth/elevation from world-to-camera poses."""
    R = np.asarray(R_n33, dtype=np.float64)
    centers = geometry.camera_centers(R, T_n3)  # [N, 3]
    up = _up_axis(R)
    axes = R[:, 2, :]  # [N, 3] viewing directions
    projectors = np.eye(3) - axes[:, :, None] * axes[:, None, :]  # [N, 3, 3]
    A, b = projectors.sum(axis=0), np.einsum("nij,nj->i", projectors, centers)
    center = np.linalg.solve(A, b) if np.linalg.cond(A) < 1e8 else centers.mean(axis=0)
    offsets = centers - center
    along = offsets @ up
    flat = offsets - along[:, None] * up
    flat_norm = np.linalg.norm(flat, axis=-1)
    directions = flat / np.maximum(flat_norm, 1e-12)[:, None]
    mean_dir = directions.sum(axis=0)
    if np.linalg.norm(mean_dir) < 1e-6 * len(directions):  # a full orbit: start at the first view
        mean_dir = directions[0]
    mean_dir = mean_dir / max(np.linalg.norm(mean_dir), 1e-12)
    right = np.cross(up, mean_dir)  # the x axis of an upright camera looking from mean_dir
    azimuth = np.degrees(np.arctan2(flat @ right, flat @ mean_dir))
    elevation = np.degrees(np.arctan2(along, flat_norm))
    return CaptureFrame(up, center, azimuth, elevation)


def _up_axis(R_n33: np.ndarray) -> np.ndarray:
    """The world's up axis seen by upright cameras: the direction most orthogonal to every camera's
    x axis (an upright camera's x is horizontal whatever its elevation), signed against the mean
    image-down axis; the mean image-up axis itself when the x axes do not span a plane."""
    down = R_n33[:, 1, :].mean(axis=0)
    x_axes = R_n33[:, 0, :]  # [N, 3]
    eigenvalues, eigenvectors = np.linalg.eigh(x_axes.T @ x_axes)
    if eigenvalues[1] > 1e-3 * len(x_axes):
        up = eigenvectors[:, 0]
        return up if up @ down <= 0 else -up
    return -down / max(np.linalg.norm(down), 1e-12)


def view_order(azimuth_deg: np.ndarray, elevation_deg: np.ndarray) -> np.ndarray:
    """Rank [N] of each view when sorted by azimuth (-90 -> +90), then elevation, then row."""
    keys = np.lexsort((np.arange(len(azimuth_deg)), elevation_deg, azimuth_deg))
    rank = np.empty(len(keys), dtype=np.int32)
    rank[keys] = np.arange(len(keys), dtype=np.int32)
    return rank


def capture_pairs(
    azimuth_deg: np.ndarray,
    elevation_deg: np.ndarray,
    is_source: np.ndarray,
    spec: PairSpec,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(source, target) local view indices [P] of one capture, sources in azimuth order.

    Every view is a possible target; `is_source` [N] marks the views that may be sources. Targets of
    a source: `all` every other view; `adjacent` its neighbours in the azimuth order; `nearest` the
    k views nearest in (azimuth, elevation) degrees; `random` k distinct others drawn with `rng`.
    Targets of one source come in azimuth order.
    """
    n = len(azimuth_deg)
    rank = view_order(azimuth_deg, elevation_deg)
    by_rank = np.argsort(rank)
    sources_out: list[int] = []
    targets_out: list[int] = []
    for s in by_rank:
        if not is_source[s]:
            continue
        others = by_rank[by_rank != s]
        if spec.mode == "all":
            chosen = others
        elif spec.mode == "adjacent":
            chosen = by_rank[[r for r in (rank[s] - 1, rank[s] + 1) if 0 <= r < n]]
        elif spec.mode == "nearest":
            distance = np.hypot(azimuth_deg[others] - azimuth_deg[s], elevation_deg[others] - elevation_deg[s])
            nearest = others[np.lexsort((rank[others], distance))[: spec.k]]
            chosen = nearest[np.argsort(rank[nearest])]
        elif spec.mode == "random":
            if rng is None:
                raise ValueError("random pairs need a generator")
            picked = rng.choice(others, size=min(spec.k, len(others)), replace=False) if len(others) else others
            chosen = picked[np.argsort(rank[picked])]
        else:
            raise ValueError(f"unknown pair mode {spec.mode!r}")
        sources_out.extend([int(s)] * len(chosen))
        targets_out.extend(int(t) for t in chosen)
    return np.asarray(sources_out, dtype=np.int64), np.asarray(targets_out, dtype=np.int64)


def pair_codes(
    R_n33: np.ndarray, T_n3: np.ndarray, scale: float, source_p: np.ndarray, target_p: np.ndarray
) -> np.ndarray:
    """The paper's 12-D codes [P, 12] of pairs of rows, translations multiplied by `scale` first."""
    R, T = np.asarray(R_n33, np.float64), np.asarray(T_n3, np.float64) * scale
    R_rel, T_rel = geometry.relative_pose(R[source_p], T[source_p], R[target_p], T[target_p])
    return geometry.pose_code12(R_rel, T_rel).reshape(-1, 12)


def decode_code12(code_p12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(R_rel [..., 3, 3], T_rel [..., 3]) back from 12-D codes [..., 12] (inverse of `pose_code12`)."""
    rt = np.asarray(code_p12, dtype=np.float64).reshape(*np.shape(code_p12)[:-1], 3, 4)
    return rt[..., :3], rt[..., 3]


def pair_zero123_codes(
    R_n33: np.ndarray, T_n3: np.ndarray, scale: float, frame: CaptureFrame, source_p: np.ndarray, target_p: np.ndarray
) -> np.ndarray:
    """Zero-1-to-3 codes [P, 4] of pairs of rows, about the capture's up axis and look-at centre, in
    the scaled world (so Δradius is in units of the mean distance of the camera centres from their
    centroid)."""
    R, T = np.asarray(R_n33, np.float64), np.asarray(T_n3, np.float64) * scale
    code = geometry.zero123_pose_code(
        R[source_p], T[source_p], R[target_p], T[target_p], up=frame.up, center=frame.center * scale
    )
    return code.reshape(-1, 4)


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def check_fractions(train: float, val: float | None, test: float) -> tuple[float, float, float]:
    """(train, val, test) fractions, val defaulting to the rest; InputError for a fraction outside
    [0, 1], a sum above 1, or no training fraction."""
    val = 1.0 - train - test if val is None else val
    fractions = {"--train-split": train, "--val-split": val, "--test-split": test}
    for name, value in fractions.items():
        if not -1e-9 <= value <= 1 + 1e-9:
            raise InputError(f"{name} must be a fraction in [0, 1], got {value:g} (train + test must not exceed 1)")
    if train + val + test > 1 + 1e-6:
        raise InputError(f"split fractions add up to {train + val + test:g} > 1: lower --train-split or --val-split")
    if train <= 0:
        raise InputError("--train-split must be positive: training needs at least one person")
    return train, max(val, 0.0), test


def split_counts(n_subjects: int, train: float, val: float | None, test: float) -> tuple[int, int, int]:
    """(train, val, test) subject counts by rounding; a split with a positive fraction gets at least
    one subject while train keeps one. InputError when no subject is left for training."""
    train, val, test = check_fractions(train, val, test)
    n_test = round(test * n_subjects)
    n_val = round(val * n_subjects)
    if test > 1e-9 and n_test == 0 and n_subjects - n_val >= 2:
        n_test = 1
    if val > 1e-9 and n_val == 0 and n_subjects - n_test >= 2:
        n_val = 1
    n_train = n_subjects - n_val - n_test
    if n_train < 1:
        raise InputError(
            f"{n_subjects} person(s) leave none for training with these split fractions: raise --train-split"
        )
    return n_train, n_val, n_test


def assign_splits(
    subjects: Sequence[str], train: float = 0.9, val: float | None = None, test: float = 0.0, seed: int = 0
) -> dict[str, str]:
    """subject -> split name, disjoint by construction: sorted subjects shuffled with `seed`, dealt
    train first, then val, then test. The same subjects, fractions and seed give the same result."""
    unique = sorted(set(subjects))
    n_train, n_val, _n_test = split_counts(len(unique), train, val, test)
    shuffled = [unique[i] for i in np.random.default_rng(seed).permutation(len(unique))]
    return {
        subject: "train" if i < n_train else "val" if i < n_train + n_val else "test"
        for i, subject in enumerate(shuffled)
    }


def check_splits(subject_index: np.ndarray, split: np.ndarray, subjects: Sequence[str], where: Path | str) -> None:
    """RecordError when a person has images in two splits (identity leakage)."""
    subject_index = np.asarray(subject_index)
    split = np.asarray(split)
    names = {v: k for k, v in SPLITS.items()}
    for s in np.unique(subject_index):
        found = np.unique(split[subject_index == s])
        if len(found) > 1:
            found_names = " and ".join(names.get(int(v), str(int(v))) for v in found)
            raise RecordError(
                f"{where}: person {subjects[int(s)]} is in the {found_names} splits (identity leakage); "
                "rebuild it with `nvf triplets`"
            )


# ----------------------------------------------------------------------------------------------
# Building the index
# ----------------------------------------------------------------------------------------------


@dataclass
class _CaptureRows:
    """What one capture contributes: its records, kept views and pairs (local view indices)."""

    capture: dataset.Capture
    records: dict[str, Path]
    views: list[int]  # index into capture.images
    embed_rows: np.ndarray
    pose_rows: np.ndarray
    depth_rows: np.ndarray
    pose_source: np.ndarray
    azimuth: np.ndarray
    elevation: np.ndarray
    scale: float
    sources: np.ndarray
    targets: np.ndarray
    codes: np.ndarray
    zero123: np.ndarray | None = None
    stamp: list[Any] = field(default_factory=list)


_QUALITY_LEVEL = {"failed": 0, "weak": 1, "good": 2}  # as stages.align.QUALITY


def validate(cfg: Config) -> PairSpec:
    """Reject bad settings before any work; returns the parsed pair spec."""
    spec = PairSpec.parse(cfg.pairs)
    if cfg.min_depth_quality not in _QUALITY_LEVEL:
        raise InputError(f"unknown min depth quality '{cfg.min_depth_quality}': use failed, weak or good")
    if cfg.pose_code not in ("paper", "zero123", "both"):
        raise InputError(f"unknown --pose-code '{cfg.pose_code}': use paper, zero123 or both")
    if cfg.depth not in ("auto", "aligned", "depth", "none"):
        raise InputError(f"unknown --depth '{cfg.depth}': use auto, aligned, depth or none")
    if cfg.protocol is not None and cfg.protocol not in dataset.PROTOCOLS:
        raise InputError(f"unknown protocol '{cfg.protocol}'; choose one of: {', '.join(dataset.PROTOCOLS)}")
    check_fractions(cfg.train_split, cfg.val_split, cfg.test_split)
    return spec


def resolve_data_root(work: Path, data: Path | None) -> Path:
    """`data`, else the dataset root the work tree's embed records name (they must agree)."""
    if data is not None:
        return Path(data)
    roots = set()
    for path in sorted(Path(work).glob(f"*/{worktree.RECORD_FILES['embed']}")):
        root = io.read_record_metadata(path).get("data_root")
        if root:
            roots.add(root)
    if not roots:
        raise InputError(f"{work}: no embed records name their dataset; pass --data DATA (or run nvf embed first)")
    if len(roots) > 1:
        raise InputError(f"{work}: embed records come from {len(roots)} dataset folders ({', '.join(sorted(roots)[:2])}"
                         ", ...); pass --data DATA to say which holds the images")  # fmt: skip
    return Path(roots.pop())


def _select(index: dataset.DatasetIndex, cfg: Config) -> list[tuple[dataset.Capture, set[str]]]:
    """Captures with all their kept views, and per capture the names of the views that may be sources."""
    base = dataset.Filters(subjects=cfg.subjects, sessions=cfg.sessions, cameras=cfg.cameras,
                           expressions=cfg.expressions, shots=cfg.shots)  # fmt: skip
    full = dataset.apply_filters(index, base)
    if cfg.protocol is None:
        return [(capture, set(capture.names)) for capture in full.captures]
    sources = dataset.apply_filters(full, dataclasses.replace(base, protocol=cfg.protocol))
    by_id = {capture.id: capture for capture in full.captures}
    return [(by_id[capture.id], set(capture.names)) for capture in sources.captures]


def _records(work: Path, capture: str, depth: DepthChoice) -> tuple[dict[str, Path], list[str]]:
    """The records of a capture D_I refers to, and the kinds missing."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for kind in ("poses", "embed"):
        path = worktree.record_path(work, capture, kind)
        if path.is_file():
            found[kind] = path
        else:
            missing.append(kind)
    if depth != "none":
        kinds = ("aligned", "depth") if depth == "auto" else (depth,)
        path = next((p for k in kinds if (p := worktree.record_path(work, capture, k)).is_file()), None)
        if path is not None:
            found["depth"] = path
        elif depth != "auto":
            missing.append(depth)
    return found, missing


def _row_map(names: Sequence[str], wanted: Sequence[str], record: Path) -> np.ndarray:
    """Row of each wanted name in a record's names; RecordError naming the first one missing."""
    rows = {name: i for i, name in enumerate(names)}
    missing = [name for name in wanted if name not in rows]
    if missing:
        raise RecordError(f"{record}: has no row for view {missing[0]} ({len(missing)} missing); the dataset changed "
                          "since that record was written: rerun its stage with --overwrite")  # fmt: skip
    return np.asarray([rows[name] for name in wanted], dtype=np.int32)


def _capture_rows(
    capture: dataset.Capture, source_names: set[str], records: dict[str, Path], layout: str, cfg: Config,
    spec: PairSpec,
) -> tuple[_CaptureRows, dict[str, str]]:  # fmt: skip
    poses = io.load_record(records["poses"], kind="poses", capture=capture.id)
    embed = io.load_record(records["embed"], kind="embed", capture=capture.id)  # checked whole: training reads it
    embed_meta = {**embed.extra, "nvf_kind": embed.kind, "capture": embed.capture}
    names = capture.names
    pose_rows = _row_map(poses.names, names, poses.path)
    embed_rows = _row_map(embed.names, names, records["embed"])
    if "depth" in records:
        depth_rows = _row_map(io.read_record_names(records["depth"]), names, records["depth"])
        quality = io.read_record_tensor(records["depth"], "quality")  # aligned records since issue 17
        if quality is not None:
            low = np.asarray(quality)[depth_rows] < _QUALITY_LEVEL[cfg.min_depth_quality]
            depth_rows = np.where(low, -1, depth_rows).astype(np.int32)
    else:
        depth_rows = np.full(len(names), -1, dtype=np.int32)
    sources_all = poses.tensors.get("source")
    pose_source = (np.asarray(sources_all, np.int8)[pose_rows] if sources_all is not None
                   else np.full(len(names), POSE_SOURCES["rig"], np.int8))  # fmt: skip
    R, T = np.asarray(poses["R"], np.float64), np.asarray(poses["T"], np.float64)
    scale = pose_scale(R, T)
    frame = capture_frame(R, T)
    if layout == "multipie":
        azimuth = np.asarray([dataset.MULTIPIE_CAMERAS[image.camera].azimuth_deg for image in capture.images])
        elevation = np.asarray([dataset.MULTIPIE_CAMERAS[image.camera].elevation_deg for image in capture.images])
    else:
        azimuth, elevation = frame.azimuth_deg[pose_rows], frame.elevation_deg[pose_rows]
    keep = np.ones(len(names), dtype=bool)
    if cfg.exclude_interp:
        keep &= pose_source != POSE_SOURCES["interp"]
    views = [int(i) for i in np.flatnonzero(keep)]
    is_source = np.asarray([names[i] in source_names for i in views], dtype=bool)
    rng = np.random.default_rng([cfg.seed, zlib.crc32(capture.id.encode())])
    src_local, tgt_local = capture_pairs(azimuth[views], elevation[views], is_source, spec, rng)
    view_arr = np.asarray(views, dtype=np.int64)
    src_rows, tgt_rows = pose_rows[view_arr[src_local]], pose_rows[view_arr[tgt_local]]
    codes = pair_codes(R, T, scale, src_rows, tgt_rows)
    zero123 = pair_zero123_codes(R, T, scale, frame, src_rows, tgt_rows) if cfg.pose_code != "paper" else None
    stamp = [[kind, path.name, *_file_stamp(path)] for kind, path in sorted(records.items())]
    rows = _CaptureRows(
        capture, records, views, embed_rows[views], pose_rows[views], depth_rows[views], pose_source[views],
        azimuth[views], elevation[views], scale, src_local, tgt_local, codes, zero123, stamp,
    )  # fmt: skip
    return rows, {"model": embed_meta.get("model", ""), "pretrained": embed_meta.get("pretrained", ""),
                  "embed_dim": embed_meta.get("embed_dim", "")}  # fmt: skip


def _file_stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def run(
    work: Path,
    out: Path | None = None,
    cfg: Config = Config(),
    *,
    data: Path | None = None,
    overwrite: bool = False,
    device: str = "auto",
    progress: ProgressFn | None = None,
) -> list[Path]:
    """Build the triplet index of every capture of the work tree; returns the paths written.

    `out` defaults to ``work/triplets.safetensors``; `data` to the dataset root the embed records
    name. Skips the work when `out` was built from the same records and config (unless `overwrite`).
    `device` is accepted for the common stage signature (all of this is numpy on the CPU).
    """
    del device
    spec = validate(cfg)
    work = Path(work)
    if not work.is_dir():
        raise InputError(f"{work}: no such work folder; run nvf poses / nvf embed DATA --out {work} first")
    out = Path(out) if out is not None else work / "triplets.safetensors"
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out}: the triplet index is a .safetensors file (e.g. {work}/triplets.safetensors)")
    data_root = resolve_data_root(work, data)
    index = dataset.scan(data_root, cfg.layout)
    selected = _select(index, cfg)
    if not selected:
        raise InputError(f"{data_root}: no captures pass the filters/protocol; loosen them (see `nvf scan --protocol`)")
    found = [(capture, sources, *_records(work, capture.id, cfg.depth)) for capture, sources in selected]
    lacking = [(capture.id, missing) for capture, _s, _r, missing in found if missing]
    if lacking and not cfg.skip_missing:
        cid, kinds = lacking[0]
        raise InputError(
            f"{len(lacking)} of {len(found)} capture(s) lack records in {work} (e.g. {cid}: no {' or '.join(kinds)}): "
            f"run nvf poses / nvf embed (and depth/align) for them, or pass --skip-missing"
        )
    if lacking:
        log.warning("triplets: %d capture(s) without records left out (e.g. %s)", len(lacking), lacking[0][0])
    found = [item for item in found if not item[3]]
    if not found:
        raise InputError(f"{work}: none of the selected captures has poses and embed records")
    stamps = [[capture.id, sorted(sources), [[k, *_file_stamp(p)] for k, p in sorted(recs.items())]]
              for capture, sources, recs, _m in found]  # fmt: skip
    inputs_hash = io.hash_inputs(dataclasses.asdict(cfg), str(Path(data_root).resolve()), index.layout, stamps)
    if not overwrite and worktree.is_up_to_date(out, inputs_hash):
        log.info("triplets: %s is up to date, skipped", out)
        return []
    rows: list[_CaptureRows] = []
    models_seen: dict[tuple[str, str, str], str] = {}
    if progress is not None:
        progress(0, len(found))
    for done, (capture, sources, recs, _missing) in enumerate(found):
        capture_rows, model = _capture_rows(capture, sources, recs, index.layout, cfg, spec)
        models_seen.setdefault((model["model"], model["pretrained"], model["embed_dim"]), capture.id)
        if capture_rows.views:
            rows.append(capture_rows)
        if progress is not None:
            progress(done + 1, len(found))
    if len(models_seen) > 1:
        (a, ca), (b, cb) = list(models_seen.items())[:2]
        raise InputError(f"embed records of different models cannot be mixed: {ca} has {a[0]}@{a[1] or '-'}, "
                         f"{cb} has {b[0]}@{b[1] or '-'}; rerun nvf embed with one model (--overwrite)")  # fmt: skip
    n_pairs = sum(len(r.sources) for r in rows)
    if n_pairs == 0:
        raise InputError(f"no (source, target) pairs: every selected capture has fewer than 2 usable views "
                         f"(pairs '{spec}', protocol {cfg.protocol or 'none'}); widen --cameras or drop "
                         "--exclude-interp")  # fmt: skip
    ((model_id, pretrained, embed_dim),) = list(models_seen)[:1]
    paths = _write(out, rows, cfg, spec, data_root, index.layout, inputs_hash,
                   {"embed_model": model_id, "embed_pretrained": pretrained, "embed_dim": embed_dim})  # fmt: skip
    log.info("triplets: %d image(s), %d pair(s) from %d capture(s) -> %s",
             sum(len(r.views) for r in rows), n_pairs, len(rows), out)  # fmt: skip
    return paths


def _rel(path: Path | str, base: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), base.resolve())).as_posix()


def _write(out: Path, rows: list[_CaptureRows], cfg: Config, spec: PairSpec, data_root: Path, layout: str,
           inputs_hash: str, embed_meta: dict[str, str]) -> list[Path]:  # fmt: skip
    base = out.parent
    base.mkdir(parents=True, exist_ok=True)
    subjects = sorted({r.capture.subject for r in rows})
    split_of = assign_splits(subjects, cfg.train_split, cfg.val_split, cfg.test_split, cfg.seed)
    subject_ids = {s: i for i, s in enumerate(subjects)}
    per_image: dict[str, list[np.ndarray]] = {key: [] for key in SCHEMA if key not in ("pose_scale",)}
    image_paths, cameras, captures_meta = [], [], []
    pair_codes_list, zero123_list = [], []
    offset = 0
    for c, r in enumerate(rows):
        n = len(r.views)
        images = [r.capture.images[i] for i in r.views]
        image_paths += [image.path for image in images]
        cameras += [image.camera for image in images]
        per_image["capture_index"].append(np.full(n, c, np.int32))
        per_image["subject_index"].append(np.full(n, subject_ids[r.capture.subject], np.int32))
        per_image["split"].append(np.full(n, SPLITS[split_of[r.capture.subject]], np.int8))
        per_image["embed_row"].append(r.embed_rows.astype(np.int32))
        per_image["pose_row"].append(r.pose_rows.astype(np.int32))
        per_image["depth_row"].append(r.depth_rows.astype(np.int32))
        per_image["pose_source"].append(r.pose_source.astype(np.int8))
        per_image["azimuth_deg"].append(r.azimuth.astype(np.float32))
        per_image["elevation_deg"].append(r.elevation.astype(np.float32))
        per_image["order"].append(view_order(r.azimuth, r.elevation))
        per_image["pair_source"].append((r.sources + offset).astype(np.int32))
        per_image["pair_target"].append((r.targets + offset).astype(np.int32))
        pair_codes_list.append(r.codes.astype(np.float32))
        if r.zero123 is not None:
            zero123_list.append(r.zero123.astype(np.float32))
        captures_meta.append({
            "id": r.capture.id, "subject": r.capture.subject, "session": r.capture.session,
            "recording": r.capture.recording, "shot": r.capture.shot, "expression": r.capture.expression,
            **{kind: _rel(r.records[kind], base) if kind in r.records else "" for kind in ("poses", "embed", "depth")},
        })  # fmt: skip
        offset += n
    tensors: dict[str, np.ndarray] = {
        key: np.concatenate(parts) for key, parts in per_image.items() if key not in ("pose_code",)
    }
    tensors["pose_code"] = np.concatenate(pair_codes_list).reshape(-1, 12)
    tensors["pose_scale"] = np.asarray([r.scale for r in rows], dtype=np.float64)
    if cfg.pose_code != "paper":
        tensors["zero123_code"] = np.concatenate(zero123_list).reshape(-1, 4)
    check_splits(tensors["subject_index"], tensors["split"], subjects, out)
    splits_meta = {name: sorted(s for s in subjects if split_of[s] == name) for name in SPLITS}
    code_dim = {"paper": 12, "zero123": 4, "both": 16}[cfg.pose_code]
    embed_dim = int(embed_meta["embed_dim"]) if embed_meta["embed_dim"].isdigit() else 0
    extra = {
        "captures": json.dumps(captures_meta),
        "subjects": json.dumps(subjects),
        "splits": json.dumps(splits_meta),
        "camera_ids": json.dumps(cameras),
        "data_root": _rel(data_root, base),
        "layout": layout,
        "pairs": str(spec),
        "conditioning": cfg.pose_code,
        "pose_code_dim": str(code_dim),
        "z_cond_dim": str(embed_dim + code_dim),
        "pose_normalization": POSE_NORMALIZATION,
        "pose_sources": json.dumps(POSE_SOURCES),
        "splits_codes": json.dumps(SPLITS),
        "azimuth_source": "multipie-camera-table" if layout == "multipie" else "poses",
        "optional_tensors": json.dumps(sorted(k for k in OPTIONAL_SCHEMA if k in tensors)),
        **embed_meta,
    }
    io.save_record(out, tensors, kind=KIND, stage=STAGE, capture="*", names=image_paths, config=cfg,
                   inputs_hash=inputs_hash, extra=extra, schema=record_schema(tensors))  # fmt: skip
    written = [out]
    if cfg.csv:
        triplets = load_triplets(out)
        written += write_csv(triplets, out.with_suffix(".csv"), out.with_suffix(".images.csv"))
    return written


def record_schema(tensors_or_keys: Any) -> dict[str, tuple[int | str, ...]]:
    """`SCHEMA` plus the optional tensors present (keys of a mapping, or an iterable of names)."""
    present = set(tensors_or_keys)
    return {**SCHEMA, **{k: v for k, v in OPTIONAL_SCHEMA.items() if k in present}}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TripletSet:
    """A loaded triplet index (checked: schema, person-disjoint splits, references in range).

    `record[...]` gives the tensors (see `SCHEMA`); paths are resolved against the file's folder.
    """

    record: io.Record
    captures: list[dict[str, str]]
    subjects: list[str]
    splits: dict[str, list[str]]
    data_root: Path
    conditioning: str

    @property
    def path(self) -> Path:
        return self.record.path

    def __getitem__(self, key: str) -> np.ndarray:
        return self.record[key]

    @property
    def n_images(self) -> int:
        return len(self.record.names)

    @property
    def n_pairs(self) -> int:
        return len(self.record["pair_source"])

    def image_path(self, row: int) -> Path:
        """The image file of image row `row`."""
        return self.data_root / self.record.names[row]

    def record_path(self, capture_index: int, kind: Literal["poses", "embed", "depth"]) -> Path | None:
        """A capture's record of `kind` (None when D_I has no depth for it)."""
        rel = self.captures[capture_index].get(kind, "")
        return (self.path.parent / rel) if rel else None

    def pairs(self, split: str) -> np.ndarray:
        """Pair indices [k] whose images belong to `split` (train, val or test)."""
        if split not in SPLITS:
            raise InputError(f"unknown split '{split}': use {', '.join(SPLITS)}")
        return np.flatnonzero(self.record["split"][self.record["pair_source"]] == SPLITS[split])

    def embeddings(self, raw: bool = False) -> np.ndarray:
        """z_I [N, D] float32 of every image row, read from the captures' embed records.

        Unit rows (the paper's z_I), or with `raw` the model's output before normalising (unit row
        times the record's ``norm``), which Zero123's camera projection was trained on.
        """
        capture_index, embed_row = self.record["capture_index"], self.record["embed_row"]
        out: np.ndarray | None = None
        for c in range(len(self.captures)):
            members = np.flatnonzero(capture_index == c)
            if not len(members):
                continue
            path = self.record_path(c, "embed")
            record = io.load_record(path, kind="embed", capture=self.captures[c]["id"])  # type: ignore[arg-type]
            matrix = record["embedding"]
            if raw:
                if "norm" not in record.tensors:
                    raise InputError(f"{path} has unit embeddings only (written by an older nvf embed); raw "
                                     "CLIP features need their norms: rerun nvf embed with --overwrite")  # fmt: skip
                matrix = matrix * record["norm"][:, None]
            if out is None:
                out = np.zeros((self.n_images, matrix.shape[1]), dtype=np.float32)
            out[members] = matrix[embed_row[members]]
        return out if out is not None else np.zeros((0, 0), np.float32)

    def pose_conditioning(self, pairs: np.ndarray | None = None) -> np.ndarray:
        """The pose part of z_cond [P, 12 | 4 | 16] for `conditioning` paper | zero123 | both, in the
        order of `geometry.POSE_LAYOUTS` (both: [4 ‖ 12])."""
        select = slice(None) if pairs is None else np.asarray(pairs)
        names = geometry.POSE_LAYOUTS[self.conditioning]
        return geometry.pose_part({name: self.record[name][select] for name in names}, self.conditioning)

    def z_cond(self, pairs: np.ndarray | None = None, embeddings: np.ndarray | None = None) -> np.ndarray:
        """z_cond = [CLIP(source) ‖ pose code] [P, D + k] float32 (524 for ViT-B/32 and the paper's code)."""
        embeddings = self.embeddings() if embeddings is None else embeddings
        select = slice(None) if pairs is None else np.asarray(pairs)
        source = self.record["pair_source"][select]
        return np.concatenate([embeddings[source], self.pose_conditioning(pairs)], axis=-1).astype(np.float32)


def load_triplets(path: str | os.PathLike) -> TripletSet:
    """Load and check a triplet index: schema, references in range, and no person in two splits."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: triplet index not found; build it with `nvf triplets WORK`")
    meta = io.read_record_metadata(path)
    optional = json.loads(meta.get("optional_tensors", "[]"))
    record = io.load_record(path, kind=KIND, stage=STAGE, schema=record_schema(optional))
    try:
        captures = json.loads(record.extra["captures"])
        subjects = json.loads(record.extra["subjects"])
        splits = json.loads(record.extra["splits"])
        data_root = path.parent / record.extra["data_root"]
        conditioning = record.extra["conditioning"]
    except (KeyError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: triplet metadata incomplete ({exc}); rebuild it with `nvf triplets`") from None
    n, c, s = len(record.names), len(captures), len(subjects)
    for key, bound in (("capture_index", c), ("subject_index", s), ("pair_source", n), ("pair_target", n)):
        values = record[key]
        if len(values) and (values.min() < 0 or values.max() >= bound):
            raise RecordError(
                f"{path}: '{key}' points outside its table (size {bound}); rebuild it with `nvf triplets`"
            )
    if len(record["pose_scale"]) != c:
        raise RecordError(f"{path}: {len(record['pose_scale'])} pose scales for {c} captures; rebuild it")
    check_splits(record["subject_index"], record["split"], subjects, path)
    listed = [person for name in SPLITS for person in splits.get(name, [])]
    if len(listed) != len(set(listed)):
        twice = next(p for p in listed if listed.count(p) > 1)
        raise RecordError(f"{path}: person {twice} is listed in two splits (identity leakage); rebuild it")
    for name, code in SPLITS.items():
        members = {subjects[i] for i in np.unique(record["subject_index"][record["split"] == code])}
        if not members <= set(splits.get(name, [])):
            raise RecordError(f"{path}: the '{name}' split holds persons not listed for it; rebuild it")
    if conditioning != "paper" and "zero123_code" not in record.tensors:
        raise RecordError(f"{path}: conditioning '{conditioning}' needs 'zero123_code', which is missing; rebuild it")
    return TripletSet(record, captures, subjects, splits, data_root, conditioning)


# ----------------------------------------------------------------------------------------------
# CSV views
# ----------------------------------------------------------------------------------------------


def write_csv(triplets: TripletSet, pairs_path: Path, images_path: Path) -> list[Path]:
    """Write the pair view (one row per pair) and the image view (one row per D_I) as CSV.

    Image and record paths are relative to the CSV's folder (the triplet file's folder).
    """
    rec = triplets.record
    base = pairs_path.parent
    split_names = {v: k for k, v in SPLITS.items()}
    cameras = json.loads(rec.extra.get("camera_ids", "[]")) or [""] * triplets.n_images
    image_rel = [_rel(triplets.image_path(i), base) for i in range(triplets.n_images)]
    capture_index = rec["capture_index"]

    def rel_record(c: int, kind: Any) -> str:
        found = triplets.record_path(c, kind)
        return _rel(found, base) if found is not None else ""

    with io.atomic_path(images_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "image", "capture", "subject", "split", "camera", "azimuth_deg", "elevation_deg",
                         "order", "pose_source", "embed_record", "embed_row", "pose_record", "pose_row",
                         "depth_record", "depth_row"])  # fmt: skip
        for i in range(triplets.n_images):
            c = int(capture_index[i])
            writer.writerow([
                i, image_rel[i], triplets.captures[c]["id"], triplets.subjects[int(rec["subject_index"][i])],
                split_names[int(rec["split"][i])], cameras[i], f"{rec['azimuth_deg'][i]:.6g}",
                f"{rec['elevation_deg'][i]:.6g}", int(rec["order"][i]), int(rec["pose_source"][i]),
                rel_record(c, "embed"), int(rec["embed_row"][i]), rel_record(c, "poses"), int(rec["pose_row"][i]),
                rel_record(c, "depth"), int(rec["depth_row"][i]),
            ])  # fmt: skip
    has_z123 = "zero123_code" in rec.tensors
    with io.atomic_path(pairs_path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["pair", "split", "subject", "capture", "source_row", "target_row", "source_image", "target_image",
                  "source_camera", "target_camera", "source_azimuth_deg", "target_azimuth_deg"]  # fmt: skip
        header += [f"pose_{k}" for k in range(12)] + ([f"zero123_{k}" for k in range(4)] if has_z123 else [])
        writer.writerow(header)
        for p, (s, t) in enumerate(zip(rec["pair_source"], rec["pair_target"], strict=True)):
            s, t = int(s), int(t)
            row = [p, split_names[int(rec["split"][s])], triplets.subjects[int(rec["subject_index"][s])],
                   triplets.captures[int(capture_index[s])]["id"], s, t, image_rel[s], image_rel[t], cameras[s],
                   cameras[t], f"{rec['azimuth_deg'][s]:.6g}", f"{rec['azimuth_deg'][t]:.6g}"]  # fmt: skip
            row += [f"{v:.9g}" for v in rec["pose_code"][p]]
            if has_z123:
                row += [f"{v:.9g}" for v in rec["zero123_code"][p]]
            writer.writerow(row)
    return [pairs_path, images_path]
