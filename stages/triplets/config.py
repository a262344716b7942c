"""Settings and layout of the triplet index: splits and pose-source codes, the record `SCHEMA`,
the pair spec, `Config` and its `PRESETS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from stages.core import dataset, io
from stages.core.errors import InputError

STAGE = "triplets"
KIND = "triplets"
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
POSE_SOURCES: dict[str, int] = io.POSE_SOURCES
"""`io.POSE_SOURCES`; a poses record without a ``source`` tensor (a rig or ground truth) counts as rig."""
PAIR_MODES = ("all", "adjacent", "nearest", "random")
PoseCode = io.PoseLayout  # which codes z_cond holds: `io.POSE_LAYOUTS`
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
    "pose_code": ("P", io.POSE_CODES["pose_code"]),  # float32, flatten([R_rel | s T_rel])
}
OPTIONAL_SCHEMA: dict[str, tuple[int | str, ...]] = {
    # float32, (Δpolar, sin Δazimuth, cos Δazimuth, Δradius) in radians / scaled units
    "zero123_code": ("P", io.POSE_CODES["zero123_code"]),
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


def record_schema(tensors_or_keys: Any) -> dict[str, tuple[int | str, ...]]:
    """`SCHEMA` plus the optional tensors present (keys of a mapping, or an iterable of names)."""
    present = set(tensors_or_keys)
    return {**SCHEMA, **{k: v for k, v in OPTIONAL_SCHEMA.items() if k in present}}
