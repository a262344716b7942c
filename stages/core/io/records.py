"""safetensors *records*: named tensors + string metadata (kind, producing stage, nvf version, config
JSON, input hash, row names, capture id, conventions), validated on load."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages.core.errors import RecordError
from stages.core.io.atomic import atomic_path
from stages.core.io.jsonio import to_jsonable

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


# ----------------------------------------------------------------------------------------------
# Contracts between stages: what a value in one stage's record means to the stages that read it
# ----------------------------------------------------------------------------------------------

POSE_SOURCES: dict[str, int] = {"sfm": 0, "rig": 1, "interp": 2}
"""Where a view's pose came from, as the int8 ``source`` tensor of a poses record (and the
``pose_source`` of a triplet index) holds it; poses records also carry this table as JSON in their
``sources`` metadata. ``sfm``: registered by structure from motion. ``rig``: placed from a
calibrated rig (the camera's pose in the rig, fitted to the capture's SfM views). ``interp``:
neither; interpolated between known views along the ring, or placed on the fallback ring (the least
trustworthy: `nvf triplets --exclude-interp` leaves them out). A poses record without a ``source``
tensor (a rig or ground truth) counts as ``rig`` in a triplet index."""
GROUNDTRUTH_STAGE = "groundtruth"
"""``nvf_stage`` of a poses record copied from a synthetic dataset's ground truth
(`stages.groundtruth`), so nothing mistakes it for estimated poses."""

DepthKind = Literal["depth", "disparity"]
DEPTH_KINDS: tuple[DepthKind, ...] = ("depth", "disparity")
"""What the maps of a depth record hold, by its ``depth_kind`` metadata (see `DEPTH_CONVENTION`):
``depth`` z-depth along the optical axis, ``disparity`` relative inverse depth (larger = nearer,
unknown scale and shift). Read it with `depth_kind`."""


def depth_kind(record: Record) -> DepthKind:
    """What the maps of a depth (or aligned) record hold: its ``depth_kind`` metadata, ``depth`` when
    absent; aligned records always hold z-depth. RecordError (an InputError) naming the file for a
    value not in `DEPTH_KINDS`."""
    if record.kind == "aligned":
        return "depth"
    kind = record.extra.get("depth_kind", "depth")
    if kind not in DEPTH_KINDS:
        raise RecordError(f"{record.path}: depth_kind '{kind}' is not one of {', '.join(DEPTH_KINDS)}; "
                          "rerun nvf depth to rewrite the record")  # fmt: skip
    return kind  # type: ignore[return-value]


POSE_CODES: dict[str, int] = {"pose_code": 12, "zero123_code": 4}
"""Width of each pose code a triplet index holds per pair: ``pose_code`` the 12-D
flatten([R_rel | T_rel]) (`geometry.pose_code12`), ``zero123_code`` Zero-1-to-3's 4 numbers
(Δpolar, sin Δazimuth, cos Δazimuth, Δradius; `geometry.zero123_pose_code`)."""
PoseLayout = Literal["paper", "zero123", "both"]
POSE_LAYOUTS: dict[str, tuple[str, ...]] = {
    "paper": ("pose_code",),
    "zero123": ("zero123_code",),
    "both": ("zero123_code", "pose_code"),
}
"""The pose part of z_cond = [CLIP(source) ‖ pose part], by layout (`nvf triplets --pose-code`): the
one definition of its order, which triplets (`TripletSet.z_cond`), train and sample all follow
(`join_z_cond`). With both, the 4 come first: Zero123's cc_projection takes [CLIP ‖ 4], and nvf's
zero123 conditioning appends the 12 as zero-initialised columns ([CLIP ‖ 4 ‖ 12])."""
POSE_CODE_DIMS: dict[str, int] = {
    layout: sum(POSE_CODES[name] for name in names) for layout, names in POSE_LAYOUTS.items()
}
"""Numbers in the pose part of z_cond by layout: paper 12, zero123 4, both 16."""
CONDITIONING_LAYOUTS: dict[str, PoseLayout] = {"paper": "paper", "zero123": "both"}
"""The pose layout a trained model's conditioning (`nvf train --conditioning`) reads: zero123
conditioning is Zero123's [CLIP ‖ 4] widened by the 12-D code."""


def z_cond_dim(clip_dim: int, layout: str) -> int:
    """Numbers in z_cond = [CLIP ‖ pose part] for CLIP embeddings of `clip_dim` and a pose `layout`
    (524 for ViT-B/32 and the paper's code)."""
    return clip_dim + POSE_CODE_DIMS[layout]


def pose_part(codes: Mapping[str, np.ndarray], layout: str) -> np.ndarray:
    """The pose part of z_cond [..., 12 | 4 | 16] from named codes, in `POSE_LAYOUTS` order."""
    return np.concatenate([np.asarray(codes[name]) for name in POSE_LAYOUTS[layout]], axis=-1)


def join_z_cond(clip: Any, pose: Any) -> Any:
    """z_cond = [CLIP ‖ pose part] along the last axis: float32 from numpy arrays, or the `torch.cat`
    of torch tensors (their dtype and device)."""
    if hasattr(clip, "detach"):  # torch.Tensor without importing torch here
        import torch

        return torch.cat([clip, pose], dim=-1)
    return np.concatenate([clip, pose], axis=-1).astype(np.float32)


def without_clip(z_cond: Any, clip_dim: int, keep: Any = None) -> Any:
    """z_cond [B, D + P] (torch) with its CLIP part zeroed: the condition classifier-free guidance
    drops. ``keep`` [B] bool keeps the CLIP part of the rows where it is True (training's dropout)."""
    import torch

    clip = torch.zeros_like(z_cond[:, :clip_dim]) if keep is None else z_cond[:, :clip_dim] * keep[:, None]
    return torch.cat([clip, z_cond[:, clip_dim:]], dim=1)


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
