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
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import geometry
from stages.core.errors import InputError, RecordError

log = logging.getLogger("nvf")

FORMAT_VERSION = "1"
NAMES_IN_HEADER_MAX = 1 << 20
"""Bytes of JSON up to which a record's row names go in its header; longer lists are stored as two
tensors (UTF-8 bytes and offsets). safetensors caps the header at 100 MB, and a triplets index of
Multi-PIE's 750k images holds ~45 MB of names (2M images would not fit)."""
_NAMES_UTF8, _NAMES_OFFSETS = "nvf_names_utf8", "nvf_names_offsets"
POSE_CONVENTION = "opencv_w2c: x_cam = R @ x_world + T; x right, y down, z forward; pixel centres at +0.5"
DEPTH_CONVENTION = (
    "depth maps hold z-depth along the optical axis, or relative inverse depth where depth_kind=disparity; 0 = invalid"
)

# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is renamed onto ``path``, on error removed.

    The temp name keeps the suffix (libraries such as Open3D pick the format from it) and starts
    with ``.`` plus ends in ``.tmp-<suffix>`` so that half-written files are easy to spot and are
    never mistaken for outputs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


OWNED_MARK = ".nvf-owned.json"
"""The file in every folder nvf writes whole (`atomic_dir`, `claim_dir`): the files nvf put there.
A folder is replaced or removed only when every file in it is listed (nvf deletes nothing it did
not write); ``{"all": true}`` marks a folder nvf made for a tool that fills it (nerfstudio's run)."""


def foreign_files(folder: str | os.PathLike) -> list[Path]:
    """Files under ``folder`` that nvf did not write: every file when it has no `OWNED_MARK`, else
    those its mark does not list. [] for a folder that does not exist, or that holds no file."""
    folder = Path(folder)
    if not folder.exists():
        return []
    if not folder.is_dir():
        return [folder]
    files = sorted(p for p in folder.rglob("*") if not p.is_dir() and p != folder / OWNED_MARK)
    try:
        mark = json.loads((folder / OWNED_MARK).read_text(encoding="utf-8"))
        if mark.get("all") is True:
            return []
        listed = set(mark.get("files", []))
    except (OSError, ValueError, AttributeError):  # no mark, or not nvf's: nothing in it is nvf's
        listed = set()
    return [p for p in files if p.relative_to(folder).as_posix() not in listed]


def check_replaceable(folder: str | os.PathLike, what: str = "folder") -> None:
    """Raise InputError (naming a file) when ``folder`` holds a file nvf did not write."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file, not a {what}: pass a new or empty folder")
    foreign = foreign_files(folder)
    if foreign:
        raise InputError(
            f"{folder} holds {len(foreign)} file(s) nvf did not write (e.g. {foreign[0].relative_to(folder)}): "
            f"nvf replaces only its own outputs; pass a new or empty {what}"
        )


def remove_owned_dir(folder: str | os.PathLike) -> None:
    """Remove a folder nvf wrote (`check_replaceable` first: a foreign file refuses, nothing is removed)."""
    import shutil

    folder = Path(folder)
    check_replaceable(folder)
    if folder.exists():
        shutil.rmtree(folder)


def claim_dir(folder: str | os.PathLike) -> Path:
    """Make ``folder`` (new or empty, else refused) a folder nvf owns whole, for a tool to fill."""
    folder = Path(folder)
    check_replaceable(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / OWNED_MARK).write_text(json.dumps({"all": True}) + "\n", encoding="utf-8")
    return folder


def _mark_owned(folder: Path) -> None:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    (folder / OWNED_MARK).write_text(json.dumps({"files": files}, indent=0) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, mark: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it takes the place of ``path``.

    ``path`` may be absent, empty, or a folder nvf wrote (`OWNED_MARK` lists every file in it);
    any other folder is refused with an InputError before the body runs (and again before the
    swap), so nvf never deletes a file it did not write. With ``mark`` the new folder lists its
    files in `OWNED_MARK`. The swap renames the old folder aside, the new one in, then removes the
    old: a kill between the two renames leaves ``path`` absent (never half old, half new) and two
    temp folders that `worktree.clean_stale_temp` removes.
    """
    import shutil

    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if mark:
            _mark_owned(tmp)
        if path.exists():
            check_replaceable(path)
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            os.replace(path, old)  # onto the empty temp folder: rename(2) replaces an empty folder
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def record_set(mark: str | os.PathLike) -> Iterator[Path]:
    """Write files that belong together, one convention everywhere (cloud.ply + cloud_metrics.json;
    sparse + transforms.json + colmap/ + poses.safetensors; a reconstruction + recon_metrics.json).

    ``mark`` is the set's completion mark, the one file reruns and readers trust: it is removed
    first, then the body writes the other members (each atomically) and the mark last. A kill at
    any point leaves the whole new set, or members without a mark (a rerun redoes them), never a
    mark beside a member written by another run. The body must write the mark.
    """
    mark = Path(mark)
    mark.unlink(missing_ok=True)
    yield mark
    if not mark.is_file():
        raise RuntimeError(f"{mark}: a record set was written without its completion mark")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically; returns its path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON (indented, keys in insertion order, numpy values converted) atomically."""
    return write_text(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a missing or malformed file is an InputError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); rewrite or delete it") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a JSON text file (not UTF-8); rewrite or delete it") from None
    except IsADirectoryError:
        raise InputError(f"{path}: a folder where a JSON file was expected") from None


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, numpy scalars/arrays, Paths and tuples -> plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def hash_inputs(*parts: Any) -> str:
    """A short stable hash (sha256, 16 hex) of JSON-able parts, file paths hashed by content."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            digest.update(hash_file(part).encode())
        elif isinstance(part, bytes):
            digest.update(part)
        else:
            digest.update(json.dumps(to_jsonable(part), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def hash_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# safetensors records
# ----------------------------------------------------------------------------------------------

# Expected tensors per record kind: key -> shape, where "N" is the row count (len(names)) and other
# strings are symbols that must agree across keys of one record (e.g. "H", "W").
SCHEMAS: dict[str, dict[str, tuple[int | str, ...]]] = {
    "poses": {"R": ("N", 3, 3), "T": ("N", 3), "K": ("N", 3, 3), "width": ("N",), "height": ("N",)},
    "depth": {"depth": ("N", "H", "W")},
    # SfM points with their tracks in CSR form: the observations of point p are rows
    # track_offsets[p]:track_offsets[p+1] of track_images (row index into names) and track_uv (pixels).
    "sparse": {
        "points": ("P", 3),
        "colors": ("P", 3),
        "error": ("P",),
        "track_offsets": ("P+1",),
        "track_images": ("M",),
        "track_uv": ("M", 2),
    },
    "aligned": {
        "depth": ("N", "H", "W"),
        "scale": ("N",),
        "shift": ("N",),
        "residual_rms": ("N",),
        "inliers": ("N",),
    },
    "embed": {"embedding": ("N", "D")},
    # head masks: a class per pixel (`stages.core.masks.CLASSES`) at image resolution, each view's image size
    "masks": {"classes": ("N", "H", "W"), "image_hw": ("N", 2)},
}


@dataclass(frozen=True)
class Record:
    """A loaded record: tensors (numpy) plus the metadata written with them."""

    path: Path
    tensors: dict[str, np.ndarray]
    kind: str
    stage: str
    capture: str
    names: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    inputs_hash: str = ""
    nvf_version: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self.tensors[key]
        except KeyError:
            raise RecordError(f"{self.path}: no tensor '{key}' in this {self.kind} record") from None

    def __len__(self) -> int:
        return len(self.names)


def save_record(
    path: str | os.PathLike,
    tensors: Mapping[str, Any],
    *,
    kind: str,
    stage: str,
    capture: str,
    names: Sequence[str],
    config: Any = None,
    inputs_hash: str = "",
    extra: Mapping[str, str] | None = None,
    schema: Mapping[str, tuple[int | str, ...]] | None = None,
) -> Path:
    """Write ``tensors`` (numpy arrays or torch tensors) as a safetensors record, atomically.

    ``names`` are the row names (image file names) in row order; ``kind`` is what the record holds
    (poses, depth, ...), ``stage`` what produced it. Every record carries the nvf version, the
    config as JSON, the input hash and the pose/depth conventions in its metadata. Tensors are
    checked against ``schema`` (default: ``SCHEMAS[kind]``) before anything is written.
    """
    from stages import __version__

    arrays = {key: _to_numpy(value) for key, value in tensors.items()}
    _validate_shapes(Path(path), kind, arrays, len(names), schema)
    names_json = json.dumps(list(names))
    names_storage = {}  # absent: in the header (records that fit stay byte-identical to earlier versions)
    if len(names_json) > NAMES_IN_HEADER_MAX:
        encoded = [name.encode() for name in names]
        arrays[_NAMES_UTF8] = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()  # [bytes]
        arrays[_NAMES_OFFSETS] = np.concatenate([[0], np.cumsum([len(e) for e in encoded])]).astype(np.int64)
        names_json, names_storage = "[]", {"names_storage": "tensors"}
    metadata = {
        "nvf_format": FORMAT_VERSION,
        "nvf_kind": kind,
        "nvf_stage": stage,
        "nvf_version": __version__,
        "capture": capture,
        "names": names_json,
        **names_storage,
        "config": json.dumps(to_jsonable(config if config is not None else {}), sort_keys=True),
        "inputs": inputs_hash,
        "pose_convention": POSE_CONVENTION,
        "depth_convention": DEPTH_CONVENTION,
    }
    for key, value in (extra or {}).items():
        if key in metadata or key == "names_storage":
            raise ValueError(f"extra metadata key '{key}' clashes with a reserved key")
        metadata[key] = str(value)
    with atomic_path(path) as tmp:
        tmp.write_bytes(safetensors_bytes(arrays, metadata))
    return Path(path)


def safetensors_bytes(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """The safetensors encoding of ``arrays`` with a canonical header: keys sorted, no spaces.

    The safetensors library writes header keys in hash order, so saving the same record twice gives
    different bytes; stages hash their input files, so a canonical header keeps an identical record
    byte-identical (and downstream work up to date). The data section is left as the library wrote it.
    """
    from safetensors.numpy import save

    raw = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=dict(metadata))
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment with spaces
    return len(text).to_bytes(8, "little") + text + raw[8 + header_len :]


def load_record(
    path: str | os.PathLike,
    *,
    kind: str | None = None,
    capture: str | None = None,
    stage: str | None = None,
    schema: Mapping[str, tuple[int | str, ...]] | None = None,
) -> Record:
    """Read and validate a record. Every mismatch is a RecordError naming the file and the fix.

    ``kind``/``capture``/``stage`` must match the metadata when given; tensors are checked against
    ``schema`` (default: ``SCHEMAS[kind]``).
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: record not found; run the stage that writes it first")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise RecordError(f"{path}: not a readable safetensors file ({exc}); delete it and rerun the stage") from None
    if "nvf_kind" not in metadata:
        raise RecordError(f"{path}: not an nvf record (no nvf metadata); was it written by nvf?")
    found_kind = metadata["nvf_kind"]
    if kind is not None and found_kind != kind:
        raise RecordError(f"{path}: holds a '{found_kind}' record where a '{kind}' record was expected; "
                          f"rerun the stage that writes {kind} records (or restore the file)")  # fmt: skip
    if stage is not None and metadata.get("nvf_stage") != stage:
        raise RecordError(f"{path}: written by stage '{metadata.get('nvf_stage')}', expected '{stage}'")
    if capture is not None and metadata.get("capture") != capture:
        raise RecordError(
            f"{path}: belongs to capture '{metadata.get('capture')}', not '{capture}'; records of different captures "
            "cannot be combined: rerun the stage that writes it for this capture"
        )
    try:
        names = json.loads(metadata.get("names", "[]"))
        config = json.loads(metadata.get("config", "{}"))
    except json.JSONDecodeError:
        raise RecordError(f"{path}: corrupt metadata (names/config are not JSON); delete it and rerun") from None
    if metadata.get("names_storage") == "tensors":  # a long name list (see NAMES_IN_HEADER_MAX)
        blob, offsets = tensors.pop(_NAMES_UTF8, None), tensors.pop(_NAMES_OFFSETS, None)
        if blob is None or offsets is None:
            raise RecordError(f"{path}: the row names are missing; delete it and rerun the stage that writes it")
        names = _decode_names(blob, offsets)
    _validate_shapes(path, found_kind, tensors, len(names), schema)
    _validate_finite(path, found_kind, tensors)
    reserved = {"nvf_format", "nvf_kind", "nvf_stage", "nvf_version", "capture", "names", "names_storage", "config",
                "inputs"}  # fmt: skip
    return Record(
        path=path,
        tensors=tensors,
        kind=found_kind,
        stage=metadata.get("nvf_stage", ""),
        capture=metadata.get("capture", ""),
        names=names,
        config=config,
        inputs_hash=metadata.get("inputs", ""),
        nvf_version=metadata.get("nvf_version", ""),
        extra={k: v for k, v in metadata.items() if k not in reserved},
    )


@contextlib.contextmanager
def _record_errors(path: str | os.PathLike) -> Iterator[None]:
    """A missing, unreadable or corrupt record is a RecordError naming the file (never a traceback)."""
    from safetensors import SafetensorError

    try:
        yield
    except FileNotFoundError:
        raise RecordError(f"{path}: record not found; run the stage that writes it first") from None
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: not a readable safetensors file ({exc}); delete it and rerun the stage") from None


def read_record_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a record without loading its tensors (cheap: used to decide what to skip).
    Its row names: `read_record_names` (a long list is not in the metadata). RecordError when unreadable."""
    from safetensors import safe_open

    with _record_errors(path), safe_open(str(path), framework="numpy") as handle:
        return dict(handle.metadata() or {})


def read_record_names(path: str | os.PathLike) -> list[str]:
    """A record's row names without loading its other tensors (see `NAMES_IN_HEADER_MAX`)."""
    from safetensors import safe_open

    with _record_errors(path), safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata() or {})
        if metadata.get("names_storage") != "tensors":
            return json.loads(metadata.get("names", "[]"))
        return _decode_names(handle.get_tensor(_NAMES_UTF8), handle.get_tensor(_NAMES_OFFSETS))


def read_record_tensor(path: str | os.PathLike, name: str) -> np.ndarray | None:
    """One tensor of a record without loading the others (None when the record has no such tensor)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        return handle.get_tensor(name) if name in handle.keys() else None  # noqa: SIM118 (safe_open has no __contains__)


def _decode_names(utf8_b: np.ndarray, offsets_n1: np.ndarray) -> list[str]:
    """Row names from their concatenated UTF-8 bytes [B] and offsets [N+1] (see `save_record`)."""
    data, bounds = utf8_b.tobytes(), offsets_n1.tolist()
    return [data[start:end].decode() for start, end in zip(bounds[:-1], bounds[1:])]


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _validate_shapes(
    path: Path,
    kind: str,
    tensors: Mapping[str, np.ndarray],
    n_rows: int,
    schema: Mapping[str, tuple[int | str, ...]] | None = None,
) -> None:
    schema = SCHEMAS.get(kind, {}) if schema is None else schema
    symbols: dict[str, int] = {"N": n_rows}
    for key, expected in schema.items():
        if key not in tensors:
            raise RecordError(f"{path}: {kind} record is missing tensor '{key}'; rerun the stage that writes it")
        shape = tensors[key].shape
        ok = len(shape) == len(expected)
        for dim, want in zip(shape, expected) if ok else ():
            if isinstance(want, str) and want.endswith("+1"):
                ok = ok and symbols.setdefault(want[:-2], dim - 1) == dim - 1
            elif isinstance(want, str):
                ok = ok and symbols.setdefault(want, dim) == dim
            else:
                ok = ok and dim == want
        if not ok:
            want_text = "[" + ", ".join(_dim_text(w, symbols) for w in expected) + "]"
            raise RecordError(f"{path}: tensor '{key}' has shape {list(shape)}, expected {want_text}; the record is "
                              "damaged: delete it and rerun the stage that writes it")  # fmt: skip


FINITE: dict[str, tuple[str, ...]] = {
    "poses": ("R", "T", "K"),
    "depth": ("depth",),
    "sparse": ("points", "track_uv"),
    "embed": ("embedding", "norm"),
    "triplets": ("pose_code",),
}
"""Tensors that hold no NaN or Inf in a sound record, by kind (others use NaN on purpose: a view's
reprojection error when not from SfM, the scale of a view align could not fit)."""


def _validate_finite(path: Path, kind: str, tensors: Mapping[str, np.ndarray]) -> None:
    for key in FINITE.get(kind, ()):
        values = tensors.get(key)
        if values is None or not np.issubdtype(values.dtype, np.floating):
            continue
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise RecordError(f"{path}: tensor '{key}' holds {int(bad.sum())} NaN/Inf value(s) (first in row {row}); "
                              "the record is damaged: delete it and rerun the stage that writes it")  # fmt: skip


def _dim_text(want: int | str, symbols: Mapping[str, int]) -> str:
    if isinstance(want, str) and want.endswith("+1") and want[:-2] in symbols:
        return str(symbols[want[:-2]] + 1)
    return str(symbols.get(want, want)) if isinstance(want, str) else str(want)


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB uint8 [H, W, 3] with its EXIF orientation applied.

    A missing, truncated or undecodable file is an InputError naming the file.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: corrupt or unreadable image ({exc}); replace or remove the file") from None


def read_image_alpha(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """(RGB uint8 [H, W, 3], alpha > 127 [H, W] bool or None when the image has no alpha); no EXIF
    rotation where there is alpha. A missing or undecodable file is an InputError naming it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            if image.mode in ("RGBA", "LA") or "transparency" in image.info:
                rgba = np.asarray(image.convert("RGBA"))
                return rgba[..., :3], rgba[..., 3] > 127
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: corrupt or unreadable image ({exc}); replace or remove the file") from None
    return read_image(path), None


def read_gray(path: str | os.PathLike, reduce: int = 1) -> np.ndarray:
    """Read an image as grey float32 [H // reduce, W // reduce] in 0..1 (ITU-R 601 luma, as COLMAP's
    reader; EXIF orientation is not applied). ``reduce`` > 1 box-averages reduce x reduce pixels; a
    JPEG is then decoded at the smaller scale directly (DCT scaling), which is several times faster.

    A missing, truncated or undecodable file is an InputError naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if reduce & (reduce - 1) == 0:  # JPEG scales by 1/2, 1/4 or 1/8; other formats ignore it
                image.draft("L", (width // reduce, height // reduce))
            image = image.convert("L")
            factor = round(width / image.size[0])
            if reduce > factor:
                image = image.reduce(reduce // factor)
            return np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: corrupt or unreadable image ({exc}); replace or remove the file") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) after EXIF orientation, reading only the header."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{path}: corrupt or unreadable image ({exc}); replace or remove the file") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def write_image(path: str | os.PathLike, image_hw3: np.ndarray) -> Path:
    """Write an RGB (or grey) uint8 image atomically; the format follows the suffix."""
    from PIL import Image

    image_hw3 = np.asarray(image_hw3)
    if image_hw3.dtype != np.uint8:
        raise ValueError(f"write_image wants uint8, got {image_hw3.dtype}")
    with atomic_path(path) as tmp:
        Image.fromarray(image_hw3).save(tmp, format=Image.registered_extensions()[Path(path).suffix.lower()])
    return Path(path)


# ----------------------------------------------------------------------------------------------
# PLY point clouds (Open3D)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointCloud:
    """Points [N,3] float64 with optional colours [N,3] float64 in 0..1 and normals [N,3]."""

    points: np.ndarray
    colors: np.ndarray | None = None
    normals: np.ndarray | None = None


def write_ply(
    path: str | os.PathLike,
    points_n3: np.ndarray,
    colors_n3: np.ndarray | None = None,
    normals_n3: np.ndarray | None = None,
) -> Path:
    """Write a binary little-endian PLY atomically: x, y, z (and nx, ny, nz) as doubles, red, green,
    blue as uchar, the layout Open3D writes. Colours are uint8 0..255 or float 0..1 (rounded to
    0..255, halves up). numpy writes it, so machines without Open3D (a bare GPU box) can write clouds too."""
    points_n3 = np.asarray(points_n3, dtype=np.float64).reshape(-1, 3)
    fields: list[tuple[str, str, np.ndarray]] = [("x", "<f8", points_n3[:, 0]), ("y", "<f8", points_n3[:, 1]),
                                                 ("z", "<f8", points_n3[:, 2])]  # fmt: skip
    if normals_n3 is not None:
        normals_n3 = np.asarray(normals_n3, dtype=np.float64).reshape(-1, 3)
        fields += [(name, "<f8", normals_n3[:, k]) for k, name in enumerate(("nx", "ny", "nz"))]
    if colors_n3 is not None:
        colors_n3 = np.asarray(colors_n3).reshape(-1, 3)
        if colors_n3.dtype != np.uint8:
            unit = np.clip(np.asarray(colors_n3, dtype=np.float64), 0.0, 1.0)
            colors_n3 = np.floor(unit * 255.0 + 0.5).astype(np.uint8)  # halves up, as Open3D rounds
        fields += [(name, "u1", colors_n3[:, k]) for k, name in enumerate(("red", "green", "blue"))]
    for name, _, column in fields:
        if len(column) != len(points_n3):
            raise ValueError(f"write_ply: {name} has {len(column)} rows for {len(points_n3)} points")
    rows = np.empty(len(points_n3), dtype=[(name, dtype) for name, dtype, _ in fields])
    for name, _, column in fields:
        rows[name] = column
    kinds = {"<f8": "double", "u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", "comment written by nvf", f"element vertex {len(rows)}",
              *(f"property {kinds[dtype]} {name}" for name, dtype, _ in fields), "end_header"]  # fmt: skip
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(("\n".join(header) + "\n").encode("ascii"))
            handle.write(rows.tobytes())
    return Path(path)


_PLY_SIZES = {"char": 1, "int8": 1, "uchar": 1, "uint8": 1, "short": 2, "int16": 2, "ushort": 2, "uint16": 2,
              "int": 4, "int32": 4, "uint": 4, "uint32": 4, "float": 4, "float32": 4, "double": 8, "float64": 8}  # fmt: skip


def _check_ply(path: Path) -> None:
    """InputError unless ``path`` starts with a PLY header and holds every vertex it announces
    (Open3D reads a truncated file silently, as fewer points)."""
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    end = head.find(b"end_header")
    if not head.startswith(b"ply") or end < 0:
        raise InputError(f"{path}: not a PLY file (no PLY header); pass a point cloud written as PLY")
    lines = head[:end].decode("ascii", errors="replace").splitlines()
    fmt = next((line.split()[1] for line in lines if line.startswith("format ")), "")
    vertices, row_bytes, element = 0, 0, ""
    for line in lines:
        words = line.split()
        if words[:1] == ["element"] and len(words) == 3:
            element = words[1]
            vertices = int(words[2]) if element == "vertex" and words[2].isdigit() else vertices
        elif words[:1] == ["property"] and element == "vertex":
            row_bytes = -1 if words[1] == "list" or row_bytes < 0 else row_bytes + _PLY_SIZES.get(words[1], 0)
    data_bytes = path.stat().st_size - (end + len(b"end_header") + 1)
    if fmt.startswith("binary") and row_bytes > 0 and data_bytes < vertices * row_bytes:
        raise InputError(f"{path}: truncated PLY ({data_bytes} bytes of data for the {vertices} points its header "
                         f"announces, {vertices * row_bytes} needed); rewrite the file")  # fmt: skip
    if fmt == "ascii":
        rows = head[end:].count(b"\n") if path.stat().st_size <= len(head) else vertices + 1
        if rows - 1 < vertices:
            raise InputError(f"{path}: truncated PLY ({rows - 1} of the {vertices} points its header announces); "
                             "rewrite the file")  # fmt: skip


def read_ply(path: str | os.PathLike) -> PointCloud:
    """Read a PLY point cloud; a missing, empty, truncated or non-PLY file is an InputError."""
    o3d = import_open3d()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: point cloud not found")
    _check_ply(path)
    cloud = o3d.io.read_point_cloud(str(path), format="ply")
    if len(cloud.points) == 0:
        raise InputError(f"{path}: no points could be read (empty or not a PLY file)")
    return PointCloud(
        points=np.asarray(cloud.points),
        colors=np.asarray(cloud.colors) if cloud.has_colors() else None,
        normals=np.asarray(cloud.normals) if cloud.has_normals() else None,
    )


def import_open3d():
    """Import Open3D, turning its missing-system-library failure into a clear error."""
    try:
        import open3d
    except OSError as exc:  # e.g. libusb-1.0.so.0: cannot open shared object file
        raise InputError(
            f"open3d cannot load a system library ({exc}); install it: apt-get install libusb-1.0-0 libgomp1"
        ) from None
    return open3d


# ----------------------------------------------------------------------------------------------
# nerfstudio transforms.json
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CameraSet:
    """Posed cameras: names [N], R [N,3,3], T [N,3] (OpenCV w2c), K [N,3,3], width/height [N], and
    ``distortion`` [N, 4] OpenCV (k1, k2, p1, p2) of normalised image coordinates (None: pinhole)."""

    names: list[str]
    R: np.ndarray
    T: np.ndarray
    K: np.ndarray
    width: np.ndarray
    height: np.ndarray
    distortion: np.ndarray | None = None


COLMAP_DISTORTION_PARAMS: dict[str, tuple[int, ...]] = {
    "SIMPLE_PINHOLE": (),
    "PINHOLE": (),
    "SIMPLE_RADIAL": (3,),
    "RADIAL": (3, 4),
    "OPENCV": (4, 5, 6, 7),
}
"""COLMAP camera models with OpenCV's distortion: the params' indices of k1[, k2[, p1, p2]]."""


def opencv_distortion(model: str, params: Sequence[float]) -> np.ndarray:
    """(k1, k2, p1, p2) of a COLMAP camera model, whose radial and tangential terms are OpenCV's.

    Raises ValueError for models outside `COLMAP_DISTORTION_PARAMS` (fisheye and others)."""
    if model not in COLMAP_DISTORTION_PARAMS:
        raise ValueError(f"COLMAP camera model {model} has no OpenCV (k1, k2, p1, p2) form")
    found = np.zeros(4)
    for slot, index in enumerate(COLMAP_DISTORTION_PARAMS[model]):
        found[slot] = float(params[index])
    return found


def colmap_cameras_distortion(
    colmap_cameras: Mapping[str, Mapping[str, Any]], names: Sequence[str]
) -> np.ndarray | None:
    """[N, 4] OpenCV (k1, k2, p1, p2) per row from a poses record's ``colmap_cameras`` metadata (row
    name -> COLMAP model and params): SfM's fit for its views, the nearest SfM view's for
    interpolated ones, none for views posed through the rig (pinhole, no params). A model without
    an OpenCV form is warned about and left out. None when no row has any distortion."""
    rows = []
    for name in names:
        camera = colmap_cameras.get(name, {})
        try:
            rows.append(opencv_distortion(camera["model"], camera["params"]) if "params" in camera else np.zeros(4))
        except ValueError as exc:
            log.warning("%s: %s; taken as no distortion", name, exc)
            rows.append(np.zeros(4))
    found = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    return found if found.any() else None


def record_distortion(record: Record) -> np.ndarray | None:
    """`colmap_cameras_distortion` of a loaded poses record, in its row order."""
    return colmap_cameras_distortion(json.loads(record.extra.get("colmap_cameras", "{}")), record.names)


def write_transforms(
    path: str | os.PathLike,
    cameras: CameraSet,
    *,
    image_dir: str = "images",
    extra_frames: Sequence[Mapping[str, Any]] | None = None,
    applied_transform: np.ndarray | None = None,
) -> Path:
    """Write nerfstudio's transforms.json (camera-to-world, OpenGL frame: x right, y up, z back).

    Intrinsics (OPENCV: focal, centre, k1, k2, p1, p2 from ``cameras.distortion``, else zeros) go at
    the top level when every camera shares them, per frame otherwise; file paths
    are ``<image_dir>/<name>``. ``applied_transform`` (3x4) is recorded for dataparsers that undo it.
    """
    c2w = geometry.opencv_w2c_to_opengl_c2w(cameras.R, cameras.T)  # [N, 4, 4]
    distortion = np.zeros((len(cameras.names), 4)) if cameras.distortion is None else cameras.distortion
    intrinsics = [_intrinsics_dict(k, int(w), int(h), d)
                  for k, w, h, d in zip(cameras.K, cameras.width, cameras.height, distortion)]  # fmt: skip
    shared = all(entry == intrinsics[0] for entry in intrinsics)
    doc: dict[str, Any] = {"camera_model": "OPENCV"}
    if shared and intrinsics:
        doc.update(intrinsics[0])
    frames = []
    for i, name in enumerate(cameras.names):
        frame: dict[str, Any] = {"file_path": f"{image_dir}/{name}" if image_dir else name}
        if not shared:
            frame.update(intrinsics[i])
        frame["transform_matrix"] = c2w[i].tolist()
        if extra_frames is not None:
            frame.update(extra_frames[i])
        frames.append(frame)
    doc["frames"] = frames
    if applied_transform is not None:
        doc["applied_transform"] = np.asarray(applied_transform, dtype=float)[:3].tolist()
    return write_json(path, doc)


def _transforms_frames(path: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(document, frames) of a transforms.json; every frame an object with a `file_path` string."""
    doc = read_json(path)
    frames = doc.get("frames") if isinstance(doc, dict) else None
    if not isinstance(frames, list) or not frames:
        raise InputError(f"{path}: no frames in transforms.json; write it with nvf poses --export transforms")
    for i, frame in enumerate(frames):
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str) or not frame["file_path"]:
            raise InputError(f"{path}: frame {i} has no file_path (the image it shows); add it or rewrite the file")
    return doc, frames


def transforms_image_paths(path: str | os.PathLike) -> list[Path]:
    """The image of each frame of a transforms.json, relative paths resolved against its folder."""
    _doc, frames = _transforms_frames(path)
    return [Path(path).parent / frame["file_path"] for frame in frames]


def read_transforms(path: str | os.PathLike) -> CameraSet:
    """Read a nerfstudio transforms.json back into OpenCV world-to-camera cameras (InputError naming
    the file and frame for a missing key, a non-number, a matrix that is not 4x4 or not finite)."""
    doc, frames = _transforms_frames(path)
    names, c2w, Ks, widths, heights, distortion = [], [], [], [], [], []
    for frame in frames:
        source = {**doc, **frame}
        try:
            K = [[float(source["fl_x"]), 0, float(source["cx"])], [0, float(source["fl_y"]), float(source["cy"])],
                 [0, 0, 1]]  # fmt: skip
            distortion.append([float(source.get(key, 0.0)) for key in ("k1", "k2", "p1", "p2")])
            widths.append(int(source["w"]))
            heights.append(int(source["h"]))
            matrix = np.asarray(frame["transform_matrix"], dtype=np.float64)
        except KeyError as exc:
            raise InputError(f"{path}: frame {frame['file_path']} lacks {exc}; add it or rewrite the file") from None
        except (TypeError, ValueError):
            raise InputError(f"{path}: frame {frame['file_path']} holds a value that is not a number (intrinsics, "
                             "size or transform_matrix); rewrite the file") from None  # fmt: skip
        if matrix.shape not in ((4, 4), (3, 4)) or not np.isfinite(matrix).all() or not np.isfinite(K).all():
            raise InputError(f"{path}: frame {frame['file_path']}: transform_matrix must be a finite 4x4 (or 3x4) "
                             f"matrix, got shape {list(matrix.shape)}; rewrite the file")  # fmt: skip
        Ks.append(K)
        c2w.append(np.vstack([matrix[:3], [0.0, 0.0, 0.0, 1.0]]))
        names.append(Path(frame["file_path"]).name)
    R, T = geometry.opengl_c2w_to_opencv_w2c(np.asarray(c2w, dtype=np.float64))
    distortion_n4 = np.asarray(distortion, dtype=np.float64)
    return CameraSet(names, R, T, np.asarray(Ks, dtype=np.float64), np.asarray(widths), np.asarray(heights),
                     distortion_n4 if distortion_n4.any() else None)  # fmt: skip


def _intrinsics_dict(K: np.ndarray, width: int, height: int, distortion: np.ndarray) -> dict[str, Any]:
    k1, k2, p1, p2 = (float(v) for v in distortion)
    return {
        "fl_x": float(K[0, 0]),
        "fl_y": float(K[1, 1]),
        "cx": float(K[0, 2]),
        "cy": float(K[1, 2]),
        "w": width,
        "h": height,
        "k1": k1,
        "k2": k2,
        "p1": p1,
        "p2": p2,
    }


# ----------------------------------------------------------------------------------------------
# COLMAP text model
# ----------------------------------------------------------------------------------------------


def write_colmap_text(
    folder: str | os.PathLike,
    cameras: CameraSet,
    points_n3: np.ndarray | None = None,
    colors_n3: np.ndarray | None = None,
    *,
    errors_n: np.ndarray | None = None,
    track_offsets: np.ndarray | None = None,
    track_images: np.ndarray | None = None,
    track_uv: np.ndarray | None = None,
    camera_models: Sequence[tuple[str, Sequence[float]] | None] | None = None,
) -> Path:
    """Export cameras, images and (optionally) 3D points as a COLMAP text model, atomically.

    One camera per distinct model and parameters: ``camera_models[i]`` (COLMAP model name and
    params, distortion included) where given, else PINHOLE from K. Image poses as COLMAP stores
    them (quaternion w,x,y,z and translation of world-to-camera, the same convention as nvf). With
    CSR tracks (``track_offsets`` [P+1], ``track_images`` [M] camera rows, ``track_uv`` [M, 2]
    pixels) every observation becomes a 2D point of its image and an element of its point's track;
    without them points have empty tracks. COLMAP's pixel coordinates and K use the same +0.5 pixel
    centre convention as nvf, so nothing is shifted. ``errors_n`` fills each point's mean
    reprojection error (pixels; 0 without).
    """
    n_points = 0 if points_n3 is None else len(points_n3)
    points2d: list[list[str]] = [[] for _ in cameras.names]  # per image: "u v point_id"
    tracks: list[str] = [""] * n_points  # per point: "image_id point2d_idx ..."
    if track_offsets is not None and track_images is not None and track_uv is not None:
        for p in range(n_points):
            elements = []
            for m in range(int(track_offsets[p]), int(track_offsets[p + 1])):
                row = int(track_images[m])
                elements.append(f" {row + 1} {len(points2d[row])}")
                points2d[row].append(f"{float(track_uv[m, 0])!r} {float(track_uv[m, 1])!r} {p + 1}")
            tracks[p] = "".join(elements)
    camera_ids: dict[tuple, int] = {}
    camera_lines, image_lines = [], []
    quats = geometry.rotmat_to_quat(cameras.R)
    for i, name in enumerate(cameras.names):
        K, width, height = cameras.K[i], int(cameras.width[i]), int(cameras.height[i])
        model = camera_models[i] if camera_models is not None else None
        if model is None:
            model = ("PINHOLE", (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
        key = (model[0], width, height, *(float(v) for v in model[1]))
        if key not in camera_ids:
            camera_ids[key] = len(camera_ids) + 1
            camera_lines.append(f"{camera_ids[key]} {model[0]} {width} {height} " + " ".join(repr(v) for v in key[3:]))
        qw, qx, qy, qz = (repr(float(v)) for v in quats[i])
        tx, ty, tz = (repr(float(v)) for v in cameras.T[i])
        image_lines.append(f"{i + 1} {qw} {qx} {qy} {qz} {tx} {ty} {tz} {camera_ids[key]} {name}")
        image_lines.append(" ".join(points2d[i]))
    point_lines = []
    if points_n3 is not None:
        colors = np.zeros_like(points_n3, dtype=np.uint8) if colors_n3 is None else np.asarray(colors_n3)
        colors = (np.clip(colors, 0, 1) * 255).round().astype(np.uint8) if colors.dtype != np.uint8 else colors
        errors = np.zeros(n_points) if errors_n is None else np.asarray(errors_n, dtype=float)
        for j, (point, color) in enumerate(zip(np.asarray(points_n3, dtype=float).tolist(), colors)):
            xyz = f"{point[0]!r} {point[1]!r} {point[2]!r}"  # Python floats: repr is the shortest exact text
            point_lines.append(f"{j + 1} {xyz} {color[0]} {color[1]} {color[2]} {float(errors[j])!r}{tracks[j]}")
    header = "# written by nvf\n"
    with atomic_dir(folder) as tmp:
        (tmp / "cameras.txt").write_text(header + "\n".join(camera_lines) + "\n")
        (tmp / "images.txt").write_text(header + "\n".join(image_lines) + "\n")
        (tmp / "points3D.txt").write_text(header + "\n".join(point_lines) + ("\n" if point_lines else ""))
    return Path(folder)
