"""Reading the inputs of `nvf evaluate`: pose sets, trees of <capture>/<file>, pairing by capture id,
and the images of a views folder."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core import io
from stages.core.errors import InputError

log = logging.getLogger("nvf")

POSE_SOURCES: dict[str, int] = io.POSE_SOURCES  # the name stages.evaluate exports


@dataclass(frozen=True)
class PoseSet:
    """Posed views of one capture; `source` is a tag per view (sfm, rig, interp, or given)."""

    names: list[str]
    R: np.ndarray  # [N, 3, 3] world-to-camera
    T: np.ndarray  # [N, 3]
    source: list[str]
    origin: str  # where it was read from

    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def read_pose_set(path: Path) -> PoseSet:
    """One PoseSet from a poses record, a transforms.json or a COLMAP model folder."""
    path = Path(path)
    if path.suffix == ".safetensors":
        record = io.load_record(path, kind="poses")
        tags = {v: k for k, v in json.loads(record.extra.get("sources", json.dumps(io.POSE_SOURCES))).items()}
        source = (
            [tags.get(int(s), str(int(s))) for s in record.tensors["source"]]
            if "source" in record.tensors
            else ["given"] * len(record)
        )
        return PoseSet(
            list(record.names), record["R"].astype(np.float64), record["T"].astype(np.float64), source, str(path)
        )
    if path.suffix == ".json":
        cams = io.read_transforms(path)
        frames = io.read_json(path)["frames"]
        source = [str(f.get("nvf_source", "given")) for f in frames]
        return PoseSet(list(cams.names), cams.R, cams.T, source, str(path))
    if path.is_dir() and any((path / f"cameras.{ext}").is_file() for ext in ("txt", "bin")):
        return _read_colmap(path)
    raise InputError(f"{path}: not a poses record, transforms.json or COLMAP model folder")


def _read_colmap(folder: Path) -> PoseSet:
    import pycolmap

    try:
        rec = pycolmap.Reconstruction(str(folder))
    except Exception as exc:  # pycolmap raises its own error types for unreadable models
        raise InputError(f"{folder}: cannot read the COLMAP model ({exc})") from None
    names, Rs, Ts = [], [], []
    for _, image in sorted(rec.images.items()):
        pose = image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world
        names.append(Path(image.name).name)
        Rs.append(np.asarray(pose.rotation.matrix(), dtype=np.float64))
        Ts.append(np.asarray(pose.translation, dtype=np.float64))
    if not names:
        raise InputError(f"{folder}: the COLMAP model has no registered images")
    return PoseSet(names, np.stack(Rs), np.stack(Ts), ["sfm"] * len(names), str(folder))


def _single_source(path: Path, names: Sequence[str]) -> Path | None:
    """The file or model folder that `path` itself is (or holds directly), else None for a tree."""
    if path.is_file():
        return path
    for name in names:
        if (path / name).exists():
            return path / name
    if any((path / f"cameras.{ext}").is_file() for ext in ("txt", "bin")):
        return path
    return None


def _tree(path: Path | None, names: Sequence[str], what: str) -> dict[str, Path]:
    """{capture id: file} from a file (capture from its record or folder) or a tree of <capture>/<name>."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder ({what})")
    single = _single_source(path, names)
    if single is not None:
        return {_capture_of(single): single}
    found = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        hit = _single_source(sub, names)
        if hit is not None and hit != sub:
            found[sub.name] = hit
    if not found:
        raise InputError(f"{path}: holds no {what} (looked for {' or '.join(names)} in it and in its sub-folders)")
    return found


def _capture_of(path: Path) -> str:
    if path.suffix == ".safetensors":
        capture = io.read_record_metadata(path).get("capture", "")
        if capture:
            return capture
    return (path if path.is_dir() else path.parent).name


def _paired(est: dict[str, Path], ref: dict[str, Path], what: str) -> list[tuple[str, Path, Path]]:
    """(capture, est, ref) triples: by capture id, or the one-to-one pair when both sides are single."""
    if len(est) == 1 and len(ref) == 1:
        (cid, e), (_, r) = next(iter(est.items())), next(iter(ref.items()))
        return [(cid, e, r)]
    common = sorted(set(est) & set(ref))
    if not common:
        raise InputError(
            f"{what}: no capture appears on both sides (estimate: {', '.join(sorted(est)[:5])}; reference: "
            f"{', '.join(sorted(ref)[:5])}); pass matching folders"
        )
    missing = sorted(set(ref) - set(est))
    if missing:
        log.warning(
            "evaluate: %s: %d reference captures have no estimate: %s", what, len(missing), ", ".join(missing[:5])
        )
    return [(cid, est[cid], ref[cid]) for cid in common]


def _images_by_name(folder: Path) -> dict[str, Path]:
    """{file name: path} of every image under `folder` (recursive); duplicates are an error."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() in io.IMAGE_SUFFIXES and not path.name.startswith("."):
            if path.name in found:
                raise InputError(f"{folder}: two images named {path.name} ({found[path.name]} and {path}); "
                                 "pass a folder where names are unique")  # fmt: skip
            found[path.name] = path
    return found


def _input_frames(views: Path) -> set[str]:
    """Names of the frames of an `nvf sample` folder that are its input photo (sample.json's frames
    with ``generated: false``): pairing them with ground truth would score the photo against itself."""
    path = Path(views) / "sample.json"
    if not path.is_file():
        return set()
    doc = io.read_json(path)
    frames = doc.get("frames") if isinstance(doc, dict) else None
    if not isinstance(frames, list) or not all(isinstance(f, dict) and isinstance(f.get("file"), str) for f in frames):
        raise InputError(f"{path}: no frames list (file, generated); is this folder from nvf sample?")
    return {Path(f["file"]).name for f in frames if f.get("generated") is False}


def _optional_poses(path: Path | None) -> PoseSet | None:
    if path is None or not Path(path).exists():
        return None
    return read_pose_set(Path(path))
