"""Dataset layouts: CMU Multi-PIE and plain image folders, scanned into captures.

A *capture* is the unit of work of every per-capture stage: the views of one moment seen by every
camera. Multi-PIE (paper §III): a file ``001_02_02_051_07.png`` is subject 001, session 02,
recording 02, camera 051 (folder ``05_1``), shot 07; a capture is (subject, session, recording,
shot) across the 15 cameras, with id ``001_02_02_07``. Names are parsed, not folder depth: the
released dataset nests ``sessionNN/multiview/<subject>/<recording>/<camera>/<file>``, the paper
shows ``001/02/05_1/...``; both scan the same. A plain folder is one capture per folder of images,
its id the folder name.

Convention for camera angles: azimuth in degrees, 0 = frontal, negative toward the subject's
right side as seen in camera 110 (-90°) and positive toward camera 240 (+90°); elevation positive
upward. The two elevated cameras' angles are approximate (the dataset gives no calibration).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from stages.core.errors import InputError
from stages.core.io import IMAGE_SUFFIXES

Layout = Literal["auto", "multipie", "folder"]
"""How `scan` reads a dataset folder: detect, the Multi-PIE tree, or one capture per folder of images."""


@dataclass(frozen=True)
class CameraInfo:
    """One Multi-PIE camera: id as in file names ("051"), folder name ("05_1"), angles in degrees."""

    id: str
    azimuth_deg: float
    elevation_deg: float = 0.0

    @property
    def folder(self) -> str:
        return f"{self.id[:2]}_{self.id[2]}"


RING_CAMERAS: tuple[str, ...] = (
    "110",
    "120",
    "090",
    "080",
    "130",
    "140",
    "051",
    "050",
    "041",
    "190",
    "200",
    "010",
    "240",
)  # fmt: skip  (head height, azimuth -90..+90 in 15° steps)
ELEVATED_CAMERAS: tuple[str, ...] = ("081", "191")
MULTIPIE_CAMERAS: dict[str, CameraInfo] = {
    **{cam: CameraInfo(cam, -90.0 + 15.0 * i) for i, cam in enumerate(RING_CAMERAS)},
    "081": CameraInfo("081", -45.0, 30.0),
    "191": CameraInfo("191", 45.0, 30.0),
}
FRONTAL_CAMERA = "051"

# Session -> expressions by recording number (recording 01 is the first entry), paper §III.C.
SESSION_EXPRESSIONS: dict[str, tuple[str, ...]] = {
    "01": ("neutral", "smile"),
    "02": ("neutral", "surprise", "squint"),
    "03": ("neutral", "smile", "disgust"),
    "04": ("neutral", "scream"),
}
AMBIENT_SHOT = "00"  # no flash; shots 01-18 each fire one flash
N_SHOTS = 19

# The evaluation protocols of §III.E as nvf applies them (the paper names them without details):
# E: expression variation, frontal camera, no flash, every expression;
# P: pose variation, the 13 head-height cameras, neutral expression;
# M: illumination variation with the flashes (shots 01-18), frontal camera, neutral;
# U: ambient illumination only (shot 00), frontal camera, neutral.
PROTOCOLS = ("E", "P", "M", "U")

MULTIPIE_NAME = re.compile(r"^(\d{3})_(\d{2})_(\d{2})_(\d{3})_(\d{2})$")


@dataclass(frozen=True)
class ImageEntry:
    """One image of a capture; ``path`` is relative to the dataset root."""

    path: str
    camera: str  # Multi-PIE camera id, or the file stem for plain folders


@dataclass(frozen=True)
class Capture:
    """The views of one capture, ordered by camera azimuth (ring first), then elevated cameras."""

    id: str
    subject: str
    images: tuple[ImageEntry, ...]
    session: str = ""
    recording: str = ""
    shot: str = ""
    expression: str = ""

    @property
    def names(self) -> list[str]:
        return [Path(image.path).name for image in self.images]

    @property
    def cameras(self) -> list[str]:
        return [image.camera for image in self.images]


@dataclass(frozen=True)
class DatasetIndex:
    """What `scan` found: the layout, the captures and anything worth a warning."""

    root: str
    layout: str
    captures: tuple[Capture, ...]
    warnings: tuple[str, ...] = field(default=())

    def summary(self) -> dict:
        """Counts per subject, session and camera, and image totals."""
        per_camera: Counter[str] = Counter()
        for capture in self.captures:
            per_camera.update(capture.cameras)
        return {
            "layout": self.layout,
            "captures": len(self.captures),
            "images": sum(len(c.images) for c in self.captures),
            "subjects": len({c.subject for c in self.captures}),
            "per_subject": dict(sorted(Counter(c.subject for c in self.captures).items())),
            "per_session": dict(sorted(Counter(c.session for c in self.captures if c.session).items())),
            "per_camera": {cam: per_camera[cam] for cam in _camera_order(per_camera)},
            "cameras_per_capture": dict(sorted(Counter(len(c.images) for c in self.captures).items())),
            "warnings": len(self.warnings),
        }


# ----------------------------------------------------------------------------------------------
# Multi-PIE names
# ----------------------------------------------------------------------------------------------


def capture_id(subject: int | str, session: int | str, recording: int | str, shot: int | str) -> str:
    """``001_01_01_00``: subject, session, recording, shot."""
    return f"{int(subject):03d}_{int(session):02d}_{int(recording):02d}_{int(shot):02d}"


def multipie_filename(
    subject: int | str, session: int | str, recording: int | str, camera: str, shot: int | str, suffix: str = ".png"
) -> str:
    """``001_01_01_051_00.png``."""
    return f"{int(subject):03d}_{int(session):02d}_{int(recording):02d}_{camera}_{int(shot):02d}{suffix}"


def multipie_relpath(
    subject: int | str, session: int | str, recording: int | str, camera: str, shot: int | str, suffix: str = ".png"
) -> Path:
    """Where the released dataset keeps an image: ``session01/multiview/001/01/05_1/001_01_01_051_00.png``."""
    return (
        Path(f"session{int(session):02d}")
        / "multiview"
        / f"{int(subject):03d}"
        / f"{int(recording):02d}"
        / MULTIPIE_CAMERAS[camera].folder
        / multipie_filename(subject, session, recording, camera, shot, suffix)
    )


def parse_multipie_name(name: str) -> tuple[str, str, str, str, str] | None:
    """(subject, session, recording, camera, shot) from a file name, or None when it does not fit."""
    match = MULTIPIE_NAME.match(Path(name).stem)
    if not match or match.group(4) not in MULTIPIE_CAMERAS:
        return None
    return match.groups()  # type: ignore[return-value]


def expression_of(session: str, recording: str) -> str:
    """The expression of a recording; ``recording-NN`` for a recording outside the known table."""
    expressions = SESSION_EXPRESSIONS.get(session, ())
    index = int(recording) - 1
    return expressions[index] if 0 <= index < len(expressions) else f"recording-{recording}"


def _camera_order(cameras: Iterable[str]) -> list[str]:
    order = {cam: i for i, cam in enumerate(RING_CAMERAS + ELEVATED_CAMERAS)}
    return sorted(set(cameras), key=lambda cam: (order.get(cam, len(order)), cam))


# ----------------------------------------------------------------------------------------------
# Scanning
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """Which captures/views to keep. Empty tuples keep everything. Values are as in file names."""

    subjects: tuple[str, ...] = ()
    """Subjects to keep (Multi-PIE ids such as `001`)."""
    sessions: tuple[str, ...] = ()
    """Sessions to keep (Multi-PIE `01` to `04`)."""
    cameras: tuple[str, ...] = ()
    """Cameras to keep (Multi-PIE ids such as `051`); the other cameras' views are dropped."""
    expressions: tuple[str, ...] = ()
    """Expressions to keep: neutral, smile, surprise, squint, disgust, scream (Multi-PIE)."""
    shots: tuple[str, ...] = ()
    """Shots (illumination) to keep: `00` no flash, `01` to `18` one flash each (Multi-PIE)."""
    protocol: str | None = None
    """Multi-PIE protocol E, P, M or U (paper §III.E): narrows cameras, shots and expressions to its own."""


def scan(root: str | os.PathLike, layout: str = "auto", filters: Filters | None = None) -> DatasetIndex:
    """Find the captures under ``root``. Raises InputError for a missing folder, an unknown layout,
    no images, misnamed Multi-PIE files or duplicate names."""
    root = Path(root)
    if layout not in ("auto", "multipie", "folder"):
        raise InputError(f"unknown layout '{layout}'; choose one of: auto, multipie, folder")
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; pass the folder that holds the images")
    images = _find_images(root)
    if not images:
        raise InputError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} in every subfolder); "
                         "pass the folder that holds the images")  # fmt: skip
    if layout == "auto":
        layout = "multipie" if any(parse_multipie_name(p.name) for p in images) else "folder"
    index = _scan_multipie(root, images) if layout == "multipie" else _scan_folders(root, images)
    return apply_filters(index, filters) if filters else index


def _find_images(root: Path) -> list[Path]:
    """Image files under root (relative paths, sorted), skipping hidden entries and nvf's own
    ground-truth/work folders."""
    found: list[Path] = []
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=True):
                    if entry.name != "groundtruth":
                        stack.append(Path(entry.path))
                elif entry.name.lower().endswith(IMAGE_SUFFIXES):
                    found.append(Path(entry.path).relative_to(root))
    return sorted(found)


def _check_duplicates(root: Path, paths: Sequence[Path]) -> None:
    counts = Counter(p.name for p in paths)
    dupes = [name for name, count in counts.items() if count > 1]
    if dupes:
        where = [str(p) for p in paths if p.name == dupes[0]]
        raise InputError(
            f"{root}: {len(dupes)} image name(s) occur more than once, e.g. {dupes[0]} at {' and '.join(where[:2])}; "
            "names identify views, so remove or rename the copies"
        )


def _scan_multipie(root: Path, images: list[Path]) -> DatasetIndex:
    parsed = [(path, parse_multipie_name(path.name)) for path in images]
    misnamed = [path for path, fields in parsed if fields is None]
    if misnamed:
        raise InputError(
            f"{root}: {len(misnamed)} of {len(images)} images do not follow the Multi-PIE naming "
            f"SUBJECT_SESSION_RECORDING_CAMERA_SHOT (e.g. 001_01_01_051_00.png with a known camera id), "
            f"first: {misnamed[0]}; rename or move them, or use --layout folder"
        )
    _check_duplicates(root, images)
    groups: dict[str, list[tuple[Path, tuple[str, ...]]]] = {}
    for path, fields in parsed:
        subject, session, recording, _camera, shot = fields  # type: ignore[misc]
        groups.setdefault(capture_id(subject, session, recording, shot), []).append((path, fields))  # type: ignore[arg-type]
    order = {cam: i for i, cam in enumerate(RING_CAMERAS + ELEVATED_CAMERAS)}
    captures, warnings = [], []
    for cid in sorted(groups):
        members = sorted(groups[cid], key=lambda item: order[item[1][3]])
        subject, session, recording, _camera, shot = members[0][1]
        entries = tuple(ImageEntry(path.as_posix(), fields[3]) for path, fields in members)
        missing = [cam for cam in MULTIPIE_CAMERAS if cam not in {e.camera for e in entries}]
        if missing:
            warnings.append(f"capture {cid}: {len(missing)} of 15 cameras missing ({', '.join(missing)})")
        captures.append(Capture(cid, subject, entries, session, recording, shot, expression_of(session, recording)))
    return DatasetIndex(str(root), "multipie", tuple(captures), tuple(warnings))


def _scan_folders(root: Path, images: list[Path]) -> DatasetIndex:
    groups: dict[Path, list[Path]] = {}
    for path in images:
        groups.setdefault(path.parent, []).append(path)
    captures, warnings = [], []
    ids: dict[str, Path] = {}
    for folder in sorted(groups):
        members = groups[folder]
        _check_duplicates(root / folder, members)
        cid = (root.resolve().name if folder == Path(".") else folder.as_posix()).replace("/", "_")
        if cid in ids:
            raise InputError(f"{root}: folders {ids[cid]} and {folder} give the same capture id '{cid}'; rename one")
        ids[cid] = folder
        if len(members) < 2:
            warnings.append(f"capture {cid}: only {len(members)} image; multi-view stages need at least 2")
        entries = tuple(ImageEntry(p.as_posix(), p.stem) for p in members)
        captures.append(Capture(cid, cid, entries))
    return DatasetIndex(str(root), "folder", tuple(captures), tuple(warnings))


def apply_filters(index: DatasetIndex, filters: Filters) -> DatasetIndex:
    """Keep the captures and views that pass ``filters`` (protocols only apply to Multi-PIE)."""
    cameras, shots, expressions = set(filters.cameras), set(filters.shots), set(filters.expressions)
    if filters.protocol is not None:
        if filters.protocol not in PROTOCOLS:
            raise InputError(f"unknown protocol '{filters.protocol}'; choose one of: {', '.join(PROTOCOLS)}")
        if index.layout != "multipie":
            raise InputError("protocols E/P/M/U need the Multi-PIE layout; this dataset scanned as plain folders")
        proto_cameras, proto_shots, proto_expr = _protocol_sets(filters.protocol)
        cameras = _narrow(cameras, proto_cameras)
        shots = _narrow(shots, proto_shots)
        expressions = _narrow(expressions, proto_expr)
    kept = []
    for capture in index.captures:
        if filters.subjects and capture.subject not in filters.subjects:
            continue
        if filters.sessions and capture.session not in filters.sessions:
            continue
        if expressions and capture.expression not in expressions:
            continue
        if shots and capture.shot not in shots:
            continue
        images = tuple(e for e in capture.images if not cameras or e.camera in cameras)
        if images:
            kept.append(Capture(capture.id, capture.subject, images, capture.session, capture.recording,
                                capture.shot, capture.expression))  # fmt: skip
    return DatasetIndex(index.root, index.layout, tuple(kept), index.warnings)


def _narrow(chosen: set[str], protocol: set[str]) -> set[str]:
    """Intersect a user's choice with a protocol's (empty = any); an empty overlap matches nothing."""
    if not protocol or not chosen:
        return chosen or protocol
    return (chosen & protocol) or {"<nothing>"}


def _protocol_sets(protocol: str) -> tuple[set[str], set[str], set[str]]:
    """(cameras, shots, expressions) of a protocol; an empty set means 'any'."""
    all_expressions = {e for exprs in SESSION_EXPRESSIONS.values() for e in exprs}
    flash_shots = {f"{s:02d}" for s in range(1, N_SHOTS)}
    return {
        "E": ({FRONTAL_CAMERA}, {AMBIENT_SHOT}, all_expressions),
        "P": (set(RING_CAMERAS), set(), {"neutral"}),
        "M": ({FRONTAL_CAMERA}, flash_shots, {"neutral"}),
        "U": ({FRONTAL_CAMERA}, {AMBIENT_SHOT}, {"neutral"}),
    }[protocol]


def parse_ids(values: Iterable[str], width: int, what: str) -> tuple[str, ...]:
    """Expand ``["1-3,7", "010"]`` into zero-padded ids ``("001", "002", "003", "007", "010")``."""
    ids: list[str] = []
    for value in values:
        for part in filter(None, (p.strip() for p in str(value).split(","))):
            low, _, high = part.partition("-")
            if not low.isdigit() or (high and not high.isdigit()):
                raise InputError(f"bad {what} '{part}': use numbers and ranges such as 1-10,12")
            stop = int(high) if high else int(low)
            if stop < int(low):
                raise InputError(f"bad {what} range '{part}': the end is before the start")
            ids.extend(f"{n:0{width}d}" for n in range(int(low), stop + 1))
    return tuple(dict.fromkeys(ids))


def index_from_json(doc: dict) -> DatasetIndex:
    """Rebuild a DatasetIndex from the JSON that `nvf scan --out` writes."""
    try:
        captures = tuple(
            Capture(
                id=c["id"],
                subject=c["subject"],
                session=c.get("session", ""),
                recording=c.get("recording", ""),
                shot=c.get("shot", ""),
                expression=c.get("expression", ""),
                images=tuple(ImageEntry(i["path"], i["camera"]) for i in c["images"]),
            )  # fmt: skip
            for c in doc["captures"]
        )
        return DatasetIndex(doc["root"], doc["layout"], captures, tuple(doc.get("warnings", ())))
    except (KeyError, TypeError) as exc:
        raise InputError(f"not an nvf scan index (missing {exc}); rewrite it with `nvf scan DATA --out FILE`") from None
