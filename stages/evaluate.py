"""Stage `evaluate`: one metric suite for poses, depth, clouds and novel views, and a report to look at.

Each section runs when its inputs are given (`Inputs`); sources are files or work trees, paired
by capture id (folder names) and by image name:

- **poses** (a poses record, a nerfstudio ``transforms.json`` or a COLMAP model, each vs a
  reference of any of those kinds): a similarity (Umeyama on camera centres) fitted on the views
  whose source tag is in `Config.fit_sources` (all paired views when fewer than 3), then per view
  the geodesic rotation error (degrees) and the camera-centre error (reference units, and relative
  to the reference rig's radius = mean distance of its centres from their centroid). Registered
  fraction = views with a fitted source tag / reference views. Figures are split by source tag.
- **depth** (a depth or aligned record vs a z-depth reference): per view, after
  `Config.depth_alignment` (none | scale | scale_shift least squares | median scaling; disparity
  records are aligned in disparity space to 1/z and inverted), over pixels valid in both (> 0,
  finite): AbsRel = mean |d - d*| / d*, RMSE = sqrt(mean (d - d*)^2) in reference units,
  δ_k = share of pixels with max(d / d*, d* / d) < 1.25^k, k = 1, 2, 3. The estimate is resized
  to the reference's size by nearest neighbour.
- **clouds** (a PLY or a work tree of ``<capture>/cloud.ply`` vs a reference surface PLY): the
  cloud stage's own Table V diagnostics (its ``cloud_metrics.json``, quoted as written), then
  Chamfer (symmetric, not squared) and F-score from `stages.core.metrics`, after mapping the cloud
  with the pose similarity when a poses section covered the capture (else no alignment).
  Mean nearest-neighbour *spacing* is a Table V diagnostic, never called Chamfer here.
- **views** (generated images vs ground-truth images): paired by name, or by pose (nearest
  reference camera after a similarity alignment, cost = rotation error in degrees + centre error
  as an angle, degrees of the reference radius). The input photo of an `nvf sample` folder
  (views/000.png, ``generated: false`` in its sample.json) is not scored: the section lists it under
  ``inputs_excluded``. PSNR, SSIM, LPIPS (`stages.core.image_metrics`),
  CLIP identity (I2O: input photo -> view, O2O: between views, to-GT: view -> its ground truth),
  ArcFace when available, FID when enough images; buckets all / frontal (|azimuth| <= 90°) / back.

- **closed_loop** and **identity** (generated views alone, `--views` without `--views-ref`; also
  beside the views section): `stages.evaluate_views` (SfM re-posing of the views against their
  transforms.json; dlib face identity, default backbone, with CLIP and ArcFace beside it).

Averaging: per view -> per capture -> over captures (each capture weighs the same).
Output: ``OUT/metrics.json``, ``OUT/report.md`` and ``OUT/figures/*.png``, written into a temp
folder and swapped in. In ``metrics.json`` every figure carries its protocol (resolution, mask,
backbone, alignment...). JSON has no infinity: a non-finite number is written ``null``; for PSNR
that means +inf (identical images), noted in ``conventions``. `run` with `compare` adds a side by
side table against another report folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from stages import evaluate_plots, evaluate_recon, evaluate_views
from stages.core import dataset, geometry, image_metrics, io
from stages.core import masks as headmasks
from stages.core.errors import InputError, ModelError

log = logging.getLogger("nvf")

STAGE = "evaluate"
POSE_SOURCES: dict[str, int] = {"sfm": 0, "rig": 1, "interp": 2}  # as stages.poses.SOURCES
DepthAlignment = Literal["none", "scale", "scale_shift", "median"]
Pairing = Literal["name", "pose"]
MaskMode = Literal["none", "alpha", "depth"]
DepthMask = Literal["auto", "none", "masks"]
LpipsChoice = Literal["auto", "alex", "vgg", "squeeze", "off"]
Switch = Literal["auto", "on", "off"]
ProgressFn = Callable[[int, int], None]

CONVENTIONS = {
    "null": "JSON has no infinity or NaN: null is a non-finite value; a null PSNR is +inf (identical images, MSE 0)",
    "averaging": "per view -> per capture -> mean over captures (each capture weighs the same)",
    "images": "RGB in [0, 1], data range 1",
    "poses": io.POSE_CONVENTION,
    "azimuth": "Multi-PIE camera table when the name is a Multi-PIE name, else from the reference camera's viewing "
    "direction in the nvf rig frame (frontal looks along +z, positive azimuth toward +x); frontal = |az| <= 90°",
}


@dataclass(frozen=True)
class Inputs:
    """What to evaluate; a section runs when both of its sides are given."""

    poses: Path | None = None
    """Estimated poses: poses record, transforms.json, COLMAP model folder, or a tree of <capture>/poses.safetensors."""
    poses_ref: Path | None = None
    """Reference poses, same kinds (e.g. synth's groundtruth folder)."""
    depth: Path | None = None
    """Estimated depth: depth/aligned record or work tree (<capture>/aligned.safetensors, else depth.safetensors)."""
    depth_ref: Path | None = None
    """Reference z-depth: depth record or tree of <capture>/depth.safetensors."""
    cloud: Path | None = None
    """Point cloud PLY or work tree of <capture>/cloud.ply (with cloud_metrics.json beside it)."""
    cloud_ref: Path | None = None
    """Reference surface PLY or tree of <capture>/surface.ply."""
    views: Path | None = None
    """Folder of generated views (PNG/JPG), optionally with their transforms.json."""
    views_ref: Path | None = None
    """Folder searched (recursively) for the ground-truth images, by file name."""
    views_ref_poses: Path | None = None
    """Poses of the ground-truth views (for pairing by pose and azimuth buckets of non-Multi-PIE names)."""
    input_image: Path | None = None
    """The photo the views were generated from (identity I2O)."""
    reconstruction: Path | None = None
    """`nvf reconstruct` output (recon_metrics.json) or a tree of <capture>/recon_metrics.json: held-out PSNR/SSIM/LPIPS."""
    compare: Path | None = None
    """Another report folder to put side by side with this one."""


@dataclass(frozen=True)
class Config:
    """How the evaluation is done; every choice is recorded next to the figures it affects."""

    fit_sources: tuple[str, ...] = ("sfm", "rig")
    """Pose source tags the similarity is fitted on (sfm, rig, interp); other views are only scored."""
    depth_alignment: DepthAlignment = "median"
    """Per-view depth alignment before scoring: none, scale, scale_shift (least squares) or median."""
    fscore_threshold_rel: float = 0.01
    """F-score threshold as a fraction of the reference cloud's bounding-box diagonal."""
    resolution: int | None = 512
    """Longer side the ground-truth views are resized to (generated views follow); None keeps their size."""
    depth_mask: DepthMask = "auto"
    """Depth scores inside the head mask (head ∪ hair) of the masks.safetensors beside each estimate
    (`nvf masks`): `auto` where that record exists, `masks` requires it, `none` scores every pixel."""
    mask: MaskMode = "none"
    """Composite both views on white outside a mask: none, the GT image's alpha, or GT depth > 0 (depth_ref)."""
    pairing: Pairing = "name"
    """Pair generated and GT views by file name, or by pose (nearest reference camera after alignment)."""
    lpips: LpipsChoice = "auto"
    """LPIPS backbone; auto = alex, skipped with a reason when its weights are not cached; off skips it."""
    identity: Switch = "auto"
    """CLIP identity similarity: auto skips (with the reason) when the model cannot load; on requires it."""
    clip_preset: str = "paper"
    """Model preset for CLIP (paper = ViT-B/32 OpenAI, tiny = random test model)."""
    clip_model: str | None = None
    """CLIP override: NAME@TAG, hf-hub:org/repo or a local open_clip folder."""
    arcface: Switch = "auto"
    """ArcFace identity (insightface buffalo_l): auto when installed with weights, on requires it."""
    closed_loop: Switch = "auto"
    """Re-pose generated views by SfM against their transforms.json (`stages.closed_loop`): auto when present."""
    face_identity: Switch = "auto"
    """dlib face identity of generated views (extra nvf[face]): auto skips with the reason when missing."""
    fid_min_images: int = 100
    """FID only with at least this many image pairs (and the Inception weights cached)."""
    frontal_max_azimuth: float = 90.0
    """Views with |azimuth| up to this many degrees are 'frontal', the rest 'back'."""
    sheet_views: int = 12
    """Most views in the contact sheet and depth figure."""
    label: str = ""
    """A line under the report's title saying what the run is (e.g. a smoke run on random-weight models)."""
    overwrite: bool = False
    """Evaluate again even when OUT/metrics.json was made from the same inputs and config."""


PRESETS: dict[str, Config] = {
    "default": Config(),
    "tiny": Config(clip_preset="tiny", resolution=None, sheet_views=6),
}


# ----------------------------------------------------------------------------------------------
# Reading sources
# ----------------------------------------------------------------------------------------------


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
        tags = {v: k for k, v in json.loads(record.extra.get("sources", json.dumps(POSE_SOURCES))).items()}
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


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _stats(values: Any) -> dict[str, float | int]:
    """mean/median/max/n of the finite values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": math.nan, "median": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "max": float(v.max()), "n": int(len(v))}


def _mean(values: Any) -> float:
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else math.nan


def _finite_json(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no inf/NaN)."""
    obj = io.to_jsonable(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_json(v) for v in obj]
    return obj


@dataclass
class Figures:
    """Flat list of figures; each carries its section, bucket and the protocol it was measured under."""

    rows: list[dict[str, Any]] = field(default_factory=list)

    def add(self, section: str, metric: str, value: float, *, protocol: dict, bucket: str = "all",
            n: int = 0, unit: str = "", better: str = "", note: str = "") -> None:  # fmt: skip
        row = {"section": section, "metric": metric, "bucket": bucket, "value": value, "n": n, "unit": unit,
               "better": better, "protocol": protocol}  # fmt: skip
        if note:
            row["note"] = note
        self.rows.append(row)


def rig_radius(centers_n3: np.ndarray) -> float:
    """Mean distance of camera centres from their centroid (the rig's size, reference units)."""
    return float(np.linalg.norm(centers_n3 - centers_n3.mean(0), axis=1).mean())


def view_azimuth_deg(name: str, R: np.ndarray | None = None) -> float | None:
    """Azimuth of a view: Multi-PIE camera table by name, else from the viewing direction (nvf rig frame)."""
    parsed = dataset.parse_multipie_name(name)
    if parsed is not None:
        return dataset.MULTIPIE_CAMERAS[parsed[3]].azimuth_deg
    if R is None:
        return None
    d = np.asarray(R)[2]  # camera +z (viewing direction) in world coordinates
    return float(np.degrees(np.arctan2(-d[0], d[2])))


def _bucket(azimuth: float | None, cfg: Config) -> str | None:
    if azimuth is None:
        return None
    return "frontal" if abs(azimuth) <= cfg.frontal_max_azimuth else "back"


# ----------------------------------------------------------------------------------------------
# Poses
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PoseResult:
    capture: str
    per_view: list[dict[str, Any]]
    summary: dict[str, Any]
    scale: float
    R_world: np.ndarray
    t_world: np.ndarray
    ref_centers: np.ndarray  # [M, 3] reference centres of the paired views
    est_centers_aligned: np.ndarray  # [M, 3]
    sources: list[str]


def evaluate_poses(est: PoseSet, ref: PoseSet, cfg: Config, capture: str = "") -> PoseResult:
    """Align `est` to `ref` (Umeyama on centres of the fit-source views) and score every paired view."""
    est_index = est.index()
    paired = [(name, est_index[name], j) for j, name in enumerate(ref.names) if name in est_index]
    if len(paired) < 3:
        raise InputError(f"{capture or est.origin}: only {len(paired)} views pair by name with the reference; need 3")
    names = [p[0] for p in paired]
    ie, ir = np.array([p[1] for p in paired]), np.array([p[2] for p in paired])
    R_e, T_e, R_r, T_r = est.R[ie], est.T[ie], ref.R[ir], ref.T[ir]
    sources = [est.source[i] for i in ie]
    fit = np.array([s in cfg.fit_sources or s == "given" for s in sources])
    fit_on = "fit_sources" if fit.sum() >= 3 else "all paired views (fewer than 3 with a fit source)"
    fit = fit if fit.sum() >= 3 else np.ones(len(names), dtype=bool)
    aligned = geometry.similarity_align_poses(R_e[fit], T_e[fit], R_r[fit], T_r[fit])
    s, R_w, t_w = aligned.scale, aligned.R_world, aligned.t_world
    R_al = R_e @ R_w.T  # same change of world as geometry.similarity_align_poses, applied to every view
    T_al = s * T_e - R_al @ t_w
    C_ref, C_al = geometry.camera_centers(R_r, T_r), geometry.camera_centers(R_al, T_al)
    rot_err = geometry.rotation_angle_deg(R_al, R_r)
    ctr_err = np.linalg.norm(C_al - C_ref, axis=1)
    radius = rig_radius(geometry.camera_centers(ref.R, ref.T))
    per_view = [
        {
            "name": n,
            "source": src,
            "fit": bool(f),
            "rotation_error_deg": float(re),
            "center_error": float(ce),
            "center_error_rel": float(ce / radius) if radius > 0 else math.nan,
            "azimuth_deg": view_azimuth_deg(n, R_r[k]),
        }  # fmt: skip
        for k, (n, src, f, re, ce) in enumerate(zip(names, sources, fit, rot_err, ctr_err, strict=True))
    ]
    registered = sum(1 for src in sources if src in cfg.fit_sources or src == "given")
    by_source = {}
    for tag in sorted(set(sources)):
        rows = [v for v in per_view if v["source"] == tag]
        by_source[tag] = {
            "rotation_error_deg": _stats([v["rotation_error_deg"] for v in rows]),
            "center_error": _stats([v["center_error"] for v in rows]),
            "center_error_rel": _stats([v["center_error_rel"] for v in rows]),
        }
    summary = {
        "n_reference": len(ref.names),
        "n_estimated": len(est.names),
        "n_paired": len(names),
        "fraction_registered": registered / len(ref.names),
        "rig_radius": radius,
        "scale": s,
        "fit_on": fit_on,
        "rotation_error_deg": _stats(rot_err),
        "center_error": _stats(ctr_err),
        "center_error_rel": _stats(ctr_err / radius if radius > 0 else ctr_err * math.nan),
        "by_source": by_source,
    }
    return PoseResult(capture, per_view, summary, s, R_w, t_w, C_ref, C_al, sources)


def _poses_section(inputs: Inputs, cfg: Config, figures: Figures) -> tuple[dict, dict[str, PoseResult]]:
    names = ("poses.safetensors", "transforms.json")
    pairs = _paired(_tree(inputs.poses, names, "poses"), _tree(inputs.poses_ref, names, "reference poses"), "poses")
    results = {cid: evaluate_poses(read_pose_set(e), read_pose_set(r), cfg, cid) for cid, e, r in pairs}
    protocol = {"alignment": "similarity (Umeyama) on camera centres", "fit_sources": list(cfg.fit_sources),
                "rotation_error": "geodesic angle, degrees", "center_error": "reference units; _rel: / rig radius",
                "rig_radius": "mean distance of reference centres from their centroid"}  # fmt: skip
    per_capture = {cid: {"summary": r.summary, "per_view": r.per_view, "inputs": [str(e), str(f)]}
                   for (cid, e, f), r in zip(pairs, results.values(), strict=True)}  # fmt: skip
    agg = lambda key, stat="mean": _mean(r.summary[key][stat] for r in results.values())  # noqa: E731
    n = sum(r.summary["n_paired"] for r in results.values())
    figures.add(
        "poses", "rotation_error_deg", agg("rotation_error_deg"), protocol=protocol, n=n, unit="deg", better="lower"
    )
    figures.add("poses", "rotation_error_deg_median", agg("rotation_error_deg", "median"), protocol=protocol, n=n,
                unit="deg", better="lower")  # fmt: skip
    figures.add("poses", "center_error", agg("center_error"), protocol=protocol, n=n, unit="ref units", better="lower")
    figures.add("poses", "center_error_rel", agg("center_error_rel"), protocol=protocol, n=n, unit="x rig radius",
                better="lower")  # fmt: skip
    figures.add("poses", "fraction_registered", _mean(r.summary["fraction_registered"] for r in results.values()),
                protocol=protocol, n=sum(r.summary["n_reference"] for r in results.values()),
                better="higher")  # fmt: skip
    tags = sorted({t for r in results.values() for t in r.summary["by_source"]})
    for tag in tags:
        rows = [r.summary["by_source"][tag] for r in results.values() if tag in r.summary["by_source"]]
        k = sum(row["rotation_error_deg"]["n"] for row in rows)
        figures.add("poses", "rotation_error_deg", _mean(row["rotation_error_deg"]["mean"] for row in rows),
                    protocol=protocol, bucket=f"source={tag}", n=k, unit="deg", better="lower")  # fmt: skip
        figures.add("poses", "center_error_rel", _mean(row["center_error_rel"]["mean"] for row in rows),
                    protocol=protocol, bucket=f"source={tag}", n=k, unit="x rig radius", better="lower")  # fmt: skip
    return {"protocol": protocol, "captures": per_capture}, results


# ----------------------------------------------------------------------------------------------
# Depth
# ----------------------------------------------------------------------------------------------


def align_depth(est_hw: np.ndarray, ref_hw: np.ndarray, mode: DepthAlignment, kind: str = "depth") -> np.ndarray:
    """`est_hw` mapped onto the reference's z-depth by `mode`, fitted over pixels valid in both.

    kind="disparity": fitted in disparity space against 1/z, then inverted (non-positive -> 0).
    Pixels invalid in the estimate stay 0.
    """
    est = np.asarray(est_hw, dtype=np.float64)
    ref = np.asarray(ref_hw, dtype=np.float64)
    valid = np.isfinite(est) & np.isfinite(ref) & (ref > 0) & (est > 0 if kind == "depth" else np.isfinite(est))
    if kind == "disparity":
        valid &= est != 0
    target = np.where(ref > 0, 1.0 / np.where(ref > 0, ref, 1.0), 0.0) if kind == "disparity" else ref
    x, y = est[valid], target[valid]
    scale, shift = 1.0, 0.0
    if len(x) >= 2 and mode != "none":
        if mode == "scale":
            scale = float(x @ y / max(x @ x, 1e-300))
        elif mode == "median":
            scale = float(np.median(y) / np.median(x)) if np.median(x) != 0 else 1.0
        elif mode == "scale_shift":
            A = np.stack([x, np.ones_like(x)], axis=1)
            (scale, shift), *_ = np.linalg.lstsq(A, y, rcond=None)
        else:
            raise InputError(f"unknown depth alignment {mode!r}: none, scale, scale_shift or median")
    fitted = scale * est + shift
    ok = np.isfinite(est) & (est != 0) & (fitted > 0)
    if kind == "disparity":
        return np.where(ok, 1.0 / np.where(ok, fitted, 1.0), 0.0)
    return np.where(ok & (est > 0), fitted, 0.0)


def depth_errors(est_hw: np.ndarray, ref_hw: np.ndarray) -> dict[str, float]:
    """AbsRel, RMSE, δ<1.25^k over pixels valid (> 0, finite) in both; n = pixel count."""
    est, ref = np.asarray(est_hw, np.float64), np.asarray(ref_hw, np.float64)
    valid = np.isfinite(est) & np.isfinite(ref) & (est > 0) & (ref > 0)
    if not valid.any():
        return {
            "abs_rel": math.nan,
            "rmse": math.nan,
            "delta1": math.nan,
            "delta2": math.nan,
            "delta3": math.nan,
            "n": 0,
        }
    e, r = est[valid], ref[valid]
    ratio = np.maximum(e / r, r / e)
    return {
        "abs_rel": float(np.mean(np.abs(e - r) / r)),
        "rmse": float(np.sqrt(np.mean((e - r) ** 2))),
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25**2)),
        "delta3": float(np.mean(ratio < 1.25**3)),
        "n": int(valid.sum()),
    }


def _resize_nearest(map_hw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize by pixel centres: row j of the output samples row floor((j+0.5) h / H)."""
    h, w = map_hw.shape
    if (h, w) == (height, width):
        return map_hw
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(int), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(int), w - 1)
    return map_hw[rows[:, None], cols[None, :]]


def _load_depth(path: Path) -> tuple[io.Record, str]:
    meta = io.read_record_metadata(path)
    kind = meta.get("nvf_kind", "")
    if kind not in ("depth", "aligned"):
        raise InputError(f"{path}: holds a '{kind}' record; evaluate depth needs a depth or aligned record: "
                         "pass one (nvf depth and nvf align write them)")  # fmt: skip
    record = io.load_record(path, kind=kind)
    return record, ("depth" if kind == "aligned" else record.extra.get("depth_kind", "depth"))


def _depth_section(inputs: Inputs, cfg: Config, figures: Figures) -> tuple[dict, dict[str, dict]]:
    est_tree = _tree(inputs.depth, ("aligned.safetensors", "depth.safetensors"), "depth")
    ref_tree = _tree(inputs.depth_ref, ("depth.safetensors",), "reference depth")
    captures, maps = {}, {}
    protocol: dict[str, Any] = {"alignment": cfg.depth_alignment, "alignment_scope": "per view",
                                "valid": "pixels > 0 and finite in both",
                                "resolution": "reference's (estimate resized, nearest)",
                                "units": "reference units (RMSE)"}  # fmt: skip
    masked = set()
    for cid, est_path, ref_path in _paired(est_tree, ref_tree, "depth"):
        est, kind = _load_depth(est_path)
        ref, _ = _load_depth(ref_path)
        ref_index = {n: i for i, n in enumerate(ref.names)}
        head = _depth_head_masks(est_path, est, cfg)
        masked.add(head is not None)
        per_view, shown = [], []
        for i, name in enumerate(est.names):
            if name not in ref_index:
                continue
            ref_hw = ref["depth"][ref_index[name]].astype(np.float64)
            if head is not None:  # outside the head mask the reference counts as invalid
                ref_hw = np.where(headmasks.resample_nearest(head[i : i + 1], ref_hw.shape)[0], ref_hw, 0.0)
            est_hw = _resize_nearest(est["depth"][i].astype(np.float64), *ref_hw.shape)
            aligned = align_depth(est_hw, ref_hw, cfg.depth_alignment, kind)
            per_view.append({"name": name, **depth_errors(aligned, ref_hw)})
            shown.append((name, ref_hw, aligned))
        if not per_view:
            raise InputError(f"{cid}: no depth map of {est_path} pairs by name with {ref_path}")
        summary = {k: _mean(v[k] for v in per_view) for k in ("abs_rel", "rmse", "delta1", "delta2", "delta3")}
        captures[cid] = {"kind": kind, "record": est.kind, "inputs": [str(est_path), str(ref_path)],
                         "mask": str(est_path.parent / "masks.safetensors") if head is not None else "none",
                         "summary": summary, "per_view": per_view}  # fmt: skip
        maps[cid] = shown
    kinds = sorted({c["kind"] for c in captures.values()})
    protocol["mask"] = {frozenset([True]): "head mask (head ∪ hair) of <capture>/masks.safetensors beside the estimate",
                        frozenset([False]): "none"}.get(frozenset(masked), "per capture (see its 'mask')")  # fmt: skip
    protocol["estimate_kind"] = kinds if len(kinds) > 1 else kinds[0]
    n = sum(len(c["per_view"]) for c in captures.values())
    for key, better, unit in (("abs_rel", "lower", ""), ("rmse", "lower", "ref units"), ("delta1", "higher", ""),
                              ("delta2", "higher", ""), ("delta3", "higher", "")):  # fmt: skip
        figures.add("depth", key, _mean(c["summary"][key] for c in captures.values()), protocol=protocol, n=n,
                    unit=unit, better=better)  # fmt: skip
    return {"protocol": protocol, "captures": captures}, maps


def _depth_head_masks(est_path: Path, est: io.Record, cfg: Config) -> np.ndarray | None:
    """[V, H, W] bool head masks of the estimate's views from the masks record beside it, or None
    (`depth_mask` none, or auto without a record)."""
    path = est_path.parent / "masks.safetensors"
    if cfg.depth_mask not in ("auto", "none", "masks"):
        raise InputError(f"unknown depth_mask {cfg.depth_mask!r}: use auto, masks or none")
    if cfg.depth_mask == "none" or (cfg.depth_mask == "auto" and not path.is_file()):
        return None
    if not path.is_file():
        raise InputError(f"{path}: not found, and depth_mask=masks needs it; run `nvf masks DATA --out WORK` first")
    return headmasks.view_head_masks(headmasks.load_masks(path), est.names)


# ----------------------------------------------------------------------------------------------
# Clouds
# ----------------------------------------------------------------------------------------------


def _cloud_section(inputs: Inputs, cfg: Config, figures: Figures, poses: dict[str, PoseResult]) -> dict:
    from stages.core import metrics

    est_tree = _tree(inputs.cloud, ("cloud.ply",), "clouds")
    ref_tree = _tree(inputs.cloud_ref, ("surface.ply",), "reference surfaces")
    captures = {}
    alignments = set()
    for cid, est_path, ref_path in _paired(est_tree, ref_tree, "clouds"):
        points = io.read_ply(est_path).points
        ref_points = io.read_ply(ref_path).points
        if cid in poses:
            pr = poses[cid]
            points = pr.scale * points @ pr.R_world.T + pr.t_world
            alignment = "pose similarity (Umeyama on camera centres)"
        else:
            alignment = "none (same frame assumed)"
        alignments.add(alignment)
        threshold = cfg.fscore_threshold_rel * metrics.bbox_diagonal(ref_points)
        chamfer = metrics.chamfer_distance(points, ref_points)
        fs = metrics.fscore(points, ref_points, threshold)
        diagnostics_path = est_path.parent / "cloud_metrics.json"
        diagnostics = io.read_json(diagnostics_path) if diagnostics_path.is_file() else None
        captures[cid] = {
            "inputs": [str(est_path), str(ref_path)],
            "alignment": alignment,
            "n_points": len(points),
            "n_reference": len(ref_points),
            "chamfer": dataclasses.asdict(chamfer),
            "fscore": dataclasses.asdict(fs),
            "table_v": diagnostics,
            "table_v_note": None if diagnostics else f"no {diagnostics_path.name} beside the cloud: run `nvf cloud`",
        }
    protocol = {"alignment": sorted(alignments), "chamfer": "symmetric, not squared: mean_p min_q |p-q| + mean_q "
                "min_p |q-p|, reference units", "fscore_threshold": f"{cfg.fscore_threshold_rel} x reference bbox "
                "diagonal", "table_v": "cloud stage diagnostics quoted as written (self-consistency, not "
                "accuracy)"}  # fmt: skip
    n = len(captures)
    for key, sub, better in (("chamfer", "chamfer", "lower"), ("chamfer", "accuracy", "lower"),
                             ("chamfer", "completeness", "lower"), ("fscore", "fscore", "higher"),
                             ("fscore", "precision", "higher"), ("fscore", "recall", "higher")):  # fmt: skip
        name = sub if key == "fscore" or sub == "chamfer" else f"chamfer_{sub}"
        figures.add("clouds", name, _mean(c[key][sub] for c in captures.values()), protocol=protocol, n=n,
                    unit="ref units" if key == "chamfer" else "", better=better)  # fmt: skip
    for key in TABLE_V_KEYS:
        values = [_dig(c["table_v"], key) for c in captures.values()]
        values = [v for v in values if isinstance(v, (int, float))]
        if values:
            figures.add("clouds", f"table_v.{key}", _mean(values), protocol=protocol, n=len(values),
                        note="cloud-stage diagnostic in the cloud's own units; NN spacing is not Chamfer")  # fmt: skip
    return {"protocol": protocol, "captures": captures}


TABLE_V_KEYS = (
    "removed_percent",
    "mean_nn_distance",
    "density_uniformity_coefficient",
    "local_density_variation",
    "points_per_valid_pixel",
    "coverage_percent",
    "confirmed_percent",
    "view_consistency",
)
"""Table V figures (from the cloud stage's cloud_metrics.json) carried into the summary table."""


def _dig(doc: Any, key: str) -> Any:
    """The first value stored under `key` anywhere in a nested dict (cloud_metrics.json layouts vary)."""
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        for value in doc.values():
            found = _dig(value, key)
            if found is not None:
                return found
    return None


# ----------------------------------------------------------------------------------------------
# Novel views
# ----------------------------------------------------------------------------------------------


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


def _read_rgba(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    return io.read_image_alpha(path)


def _resize(image_hw3: np.ndarray, height: int, width: int) -> np.ndarray:
    from PIL import Image

    if image_hw3.shape[:2] == (height, width):
        return image_hw3
    return np.asarray(Image.fromarray(image_hw3).resize((width, height), Image.Resampling.BICUBIC))


def _resize_mask(mask_hw: np.ndarray, height: int, width: int) -> np.ndarray:
    return _resize_nearest(mask_hw.astype(np.float64), height, width) > 0.5


def pair_views_by_pose(gen: PoseSet, ref: PoseSet) -> list[tuple[str, str, float]]:
    """(generated name, nearest reference name, cost) per generated view, in any world frame.

    The generated cameras' world may differ from the reference's by a similarity, so: (1) rotation
    anchoring: for each reference camera j, rotate the generated world so that generated view 0
    matches j, and keep the j with the smallest summed nearest-rotation error; (2) with the
    correspondences that gives, a similarity (Umeyama on centres) when 3+ distinct non-collinear
    cameras pair up; (3) nearest reference camera by cost = rotation error (deg) + centre error as
    an angle (deg, centre error / reference rig radius).
    """
    if not len(gen.names) or not len(ref.names):
        raise InputError("pairing by pose needs generated and reference cameras")
    best_cost, best_Rw = math.inf, np.eye(3)
    for j in range(len(ref.names)):
        R_w = ref.R[j].T @ gen.R[0]  # gen.R[0] @ R_w.T == ref.R[j]
        rot = geometry.rotation_angle_deg((gen.R @ R_w.T)[:, None], ref.R[None])  # [N_gen, N_ref]
        cost = float(rot.min(axis=1).sum())
        if cost < best_cost:
            best_cost, best_Rw = cost, R_w
    R_g, T_g = gen.R @ best_Rw.T, gen.T
    match = np.argmin(geometry.rotation_angle_deg(R_g[:, None], ref.R[None]), axis=1)
    C_ref = geometry.camera_centers(ref.R, ref.T)
    radius = max(rig_radius(C_ref), 1e-12)
    if len(set(match.tolist())) >= 3:
        try:
            s, R_w, t_w = geometry.umeyama(geometry.camera_centers(gen.R, gen.T), C_ref[match])
            R_g = gen.R @ R_w.T
            T_g = s * gen.T - R_g @ t_w
        except InputError:
            log.warning("evaluate: generated cameras are collinear; pairing by rotation only")
    C_g = geometry.camera_centers(R_g, T_g)
    out = []
    for i, name in enumerate(gen.names):
        rot = geometry.rotation_angle_deg(R_g[i][None], ref.R)
        ctr = np.degrees(np.linalg.norm(C_ref - C_g[i], axis=1) / radius)
        j = int(np.argmin(rot + ctr))
        out.append((name, ref.names[j], float(rot[j] + ctr[j])))
    return out


def _identity_embedder(cfg: Config, device: str, skipped: list[dict]) -> Any:
    if cfg.identity == "off":
        return None
    try:
        return image_metrics.ClipEmbedder(cfg.clip_preset, cfg.clip_model, device)
    except ModelError as exc:
        if cfg.identity == "on":
            raise
        skipped.append({"metric": "clip_identity", "reason": str(exc)})
        log.warning("evaluate: CLIP identity skipped: %s", exc)
        return None


def _lpips_scorer(cfg: Config, device: str, skipped: list[dict]) -> Any:
    if cfg.lpips == "off":
        return None
    backbone = "alex" if cfg.lpips == "auto" else cfg.lpips
    reason = image_metrics.lpips_unavailable(backbone)
    if reason is None:
        return image_metrics.LpipsScorer(backbone, device)
    if cfg.lpips != "auto":
        raise ModelError(reason)
    skipped.append({"metric": "lpips", "reason": reason})
    log.warning("evaluate: LPIPS skipped: %s", reason)
    return None


def _views_section(inputs: Inputs, cfg: Config, figures: Figures, device: str, skipped: list[dict],
                   progress: ProgressFn | None) -> tuple[dict, list]:  # fmt: skip
    gen_images = _images_by_name(inputs.views)
    ref_images = _images_by_name(inputs.views_ref)
    if not gen_images:
        raise InputError(f"{inputs.views}: no images to evaluate")
    gen_poses = _optional_poses(inputs.views / "transforms.json" if inputs.views.is_dir() else None)
    ref_poses = _optional_poses(inputs.views_ref_poses)
    if cfg.pairing == "pose":
        if gen_poses is None or ref_poses is None:
            raise InputError("pairing by pose needs the generated views' transforms.json (in the views folder) and "
                             "--views-ref-poses; or pair by name")  # fmt: skip
        pairs = [(g, r, cost) for g, r, cost in pair_views_by_pose(gen_poses, ref_poses) if g in gen_images]
    else:
        pairs = [(name, name, 0.0) for name in sorted(gen_images) if name in ref_images]
    pairs = [(g, r, c) for g, r, c in pairs if r in ref_images]
    inputs_excluded = _input_frames(inputs.views)  # an nvf sample folder's input photo is no generated view
    pairs = [(g, r, c) for g, r, c in pairs if g not in inputs_excluded]
    if not pairs:
        raise InputError(f"no generated view in {inputs.views} pairs with a ground-truth image in {inputs.views_ref} "
                         f"(pairing by {cfg.pairing})")  # fmt: skip
    depth_masks = _depth_masks(inputs) if cfg.mask == "depth" else {}
    ref_R = ref_poses.index() if ref_poses is not None else {}
    rows, gen_list, ref_list = [], [], []
    for k, (g, r, cost) in enumerate(pairs):
        ref_img, alpha = _read_rgba(ref_images[r])
        gen_img, _ = _read_rgba(gen_images[g])
        mask = None
        if cfg.mask == "alpha":
            if alpha is None:
                raise InputError(
                    f"{ref_images[r]}: no alpha channel, so mask=alpha cannot mask it; use mask=none/depth"
                )
            mask = alpha
        elif cfg.mask == "depth":
            if r not in depth_masks:
                raise InputError(f"mask=depth: no reference depth map named {r} in {inputs.depth_ref}")
            mask = depth_masks[r]
        if cfg.resolution:
            h, w = ref_img.shape[:2]
            f = cfg.resolution / max(h, w)
            ref_img = _resize(ref_img, round(h * f), round(w * f))
        gen_img = _resize(gen_img, *ref_img.shape[:2])
        if mask is not None:
            mask = _resize_mask(mask, *ref_img.shape[:2])
            ref_f, gen_f = (
                image_metrics.composite_on_white(ref_img, mask),
                image_metrics.composite_on_white(gen_img, mask),
            )
        else:
            ref_f, gen_f = image_metrics.as_float01(ref_img), image_metrics.as_float01(gen_img)
        azimuth = view_azimuth_deg(r, ref_poses.R[ref_R[r]] if r in ref_R else None)
        rows.append({"name": g, "reference": r, "pair_cost": cost, "azimuth_deg": azimuth,
                     "bucket": _bucket(azimuth, cfg), "psnr": image_metrics.psnr(gen_f, ref_f),
                     "ssim": image_metrics.ssim(gen_f, ref_f)})  # fmt: skip
        gen_list.append(gen_f)
        ref_list.append(ref_f)
        if progress is not None:
            progress(k + 1, len(pairs))
    lpips = _lpips_scorer(cfg, device, skipped)
    if lpips is not None:
        for row, value in zip(rows, lpips(gen_list, ref_list), strict=True):
            row["lpips"] = float(value)
    clip = _identity_embedder(cfg, device, skipped)
    identity: dict[str, Any] = {}
    if clip is not None:
        emb_gen, emb_ref = clip(gen_list), clip(ref_list)
        for row, value in zip(rows, image_metrics.cosine_paired(emb_gen, emb_ref), strict=True):
            row["clip_to_gt"] = float(value)
        identity["clip_o2o"] = image_metrics.mean_pairwise_cosine(emb_gen)
        if inputs.input_image is not None:
            emb_in = clip([io.read_image(inputs.input_image)])[0]
            for row, value in zip(rows, image_metrics.cosine_to(emb_in, emb_gen), strict=True):
                row["clip_i2o"] = float(value)
        else:
            skipped.append({"metric": "clip_i2o", "reason": "no input photo given (--input)"})
    _arcface(cfg, inputs, rows, gen_list, ref_list, identity, skipped)
    fid_value = _fid(cfg, gen_list, ref_list, device, skipped)
    resolution = f"{ref_list[0].shape[1]}x{ref_list[0].shape[0]}" if ref_list else None
    protocol = {
        "resolution": resolution if cfg.resolution is None else f"longer side {cfg.resolution} ({resolution})",
        "resize": "bicubic; generated resized to the ground truth's size",
        "mask": cfg.mask, "masked": cfg.mask != "none",
        "pairing": cfg.pairing,
        "ssim": "11x11 Gaussian, sigma 1.5, K1 0.01, K2 0.03, valid region, mean over RGB",
        "psnr": "10 log10(1/MSE), data range 1, all channels",
        "lpips_backbone": lpips.backbone if lpips is not None else None,
        "lpips": "v0.1 linear layers (torchmetrics), inputs in [-1, 1]" if lpips is not None else None,
        "identity_model": clip.name if clip is not None else None,
        "identity": "cosine of L2-normalised image embeddings",
        "alignment": "similarity (Umeyama) on centres for pairing" if cfg.pairing == "pose" else "none (by name)",
    }  # fmt: skip
    buckets = ["all", "frontal", "back"]
    for metric, better, unit in (("psnr", "higher", "dB"), ("ssim", "higher", ""), ("lpips", "lower", ""),
                                 ("clip_to_gt", "higher", "cos"), ("clip_i2o", "higher", "cos"),
                                 ("arcface_to_gt", "higher", "cos"), ("arcface_i2o", "higher", "cos")):  # fmt: skip
        for bucket in buckets:
            chosen = [row[metric] for row in rows if metric in row and (bucket == "all" or row["bucket"] == bucket)]
            if not chosen:
                continue
            values = np.asarray(chosen, dtype=np.float64)
            n_inf = int(np.isinf(values).sum())
            note = (
                f"{n_inf} identical view(s) with PSNR +inf left out of the mean" if metric == "psnr" and n_inf else ""
            )
            if metric == "psnr" and n_inf == len(values):
                value, note = math.inf, "every view identical: PSNR +inf (written as null)"
            else:
                value = _mean(values)
            figures.add("views", metric, value, protocol=protocol, bucket=bucket, n=len(values), unit=unit,
                        better=better, note=note)  # fmt: skip
    for metric, value in identity.items():
        figures.add("views", metric, value, protocol=protocol, n=len(rows), unit="cos", better="higher")
    if fid_value is not None:
        figures.add("views", "fid", fid_value, protocol=protocol, n=len(rows), better="lower",
                    note="reference = ground-truth views")  # fmt: skip
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["azimuth_deg"] is None, rows[i]["azimuth_deg"] or 0.0))
    sheet = [(rows[i]["name"], rows[i]["reference"], gen_list[i], ref_list[i]) for i in order]  # ring order
    section = {"protocol": protocol, "per_view": rows, "identity": identity,
               "inputs_excluded": sorted(inputs_excluded & gen_images.keys())}  # fmt: skip
    return section, sheet


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


def _depth_masks(inputs: Inputs) -> dict[str, np.ndarray]:
    masks = {}
    for _, path in _tree(inputs.depth_ref, ("depth.safetensors",), "reference depth (for mask=depth)").items():
        record, _ = _load_depth(path)
        masks.update({name: record["depth"][i] > 0 for i, name in enumerate(record.names)})
    return masks


def _arcface(cfg: Config, inputs: Inputs, rows: list[dict], gen: list, ref: list, identity: dict,
             skipped: list[dict]) -> None:  # fmt: skip
    if cfg.arcface == "off":
        return
    reason = image_metrics.arcface_unavailable()
    if reason is not None:
        if cfg.arcface == "on":
            raise ModelError(reason)
        skipped.append({"metric": "arcface", "reason": reason})
        return
    arc = image_metrics.ArcFaceEmbedder()
    emb_gen, emb_ref = arc(gen), arc(ref)
    found = ~np.isnan(emb_gen[:, 0])
    both = found & ~np.isnan(emb_ref[:, 0])
    for row, value, ok in zip(rows, image_metrics.cosine_paired(emb_gen, emb_ref), both, strict=True):
        row["arcface_to_gt"] = float(value) if ok else math.nan
    identity["arcface_o2o"] = image_metrics.mean_pairwise_cosine(emb_gen[found])
    identity["arcface_faces_found"] = int(found.sum())
    if inputs.input_image is not None:
        emb_in = arc([io.read_image(inputs.input_image)])[0]
        if not np.isnan(emb_in[0]):
            for row, value, ok in zip(rows, image_metrics.cosine_to(emb_in, emb_gen), found, strict=True):
                row["arcface_i2o"] = float(value) if ok else math.nan


def _fid(cfg: Config, gen: list, ref: list, device: str, skipped: list[dict]) -> float | None:
    reason = image_metrics.fid_unavailable(len(gen), cfg.fid_min_images)
    if reason is not None:
        skipped.append({"metric": "fid", "reason": reason})
        return None
    return image_metrics.fid(ref, gen, device)


# ----------------------------------------------------------------------------------------------
# Figures and report
# ----------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure  # Figure.savefig uses the Agg canvas: no pyplot, no display

    return Figure(figsize=(width, height), dpi=100)


def plot_pose_top_view(results: dict[str, PoseResult], path: Path) -> Path:
    """Top view (x right, z up the page: the nvf rig's ground plane) of reference vs aligned estimated centres."""
    shown = list(results.values())[:4]
    fig = _new_figure(4.5 * len(shown), 4.5)
    colours = {"sfm": "tab:blue", "rig": "tab:green", "interp": "tab:orange", "given": "tab:blue"}
    for k, res in enumerate(shown):
        ax = fig.add_subplot(1, len(shown), k + 1)
        ax.scatter(res.ref_centers[:, 0], res.ref_centers[:, 2], marker="o", facecolors="none", edgecolors="k",
                   s=60, label="reference")  # fmt: skip
        for tag in sorted(set(res.sources)):
            sel = np.array([s == tag for s in res.sources])
            ax.scatter(res.est_centers_aligned[sel, 0], res.est_centers_aligned[sel, 2], marker="x", s=40,
                       color=colours.get(tag, "tab:red"), label=f"estimate ({tag})")  # fmt: skip
        for a, b in zip(res.ref_centers, res.est_centers_aligned, strict=True):
            ax.plot([a[0], b[0]], [a[2], b[2]], color="tab:red", linewidth=0.8)
        ax.scatter([0], [0], marker="+", color="grey")
        ax.set_aspect("equal")
        ax.set_xlabel("x")
        ax.set_ylabel("z")
        rot = res.summary["rotation_error_deg"]["mean"]
        ax.set_title(f"{res.capture}\nmean rot err {rot:.2f}°", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_depth_maps(maps: dict[str, list], path: Path, max_views: int) -> Path:
    """Reference, aligned estimate and |error| / reference for the first capture's views (colour-mapped)."""
    cid, shown = next(iter(maps.items()))
    shown = shown[:max_views]
    fig = _new_figure(2.2 * len(shown), 6.6)
    for k, (name, ref_hw, est_hw) in enumerate(shown):
        valid = (ref_hw > 0) & (est_hw > 0)
        lo, hi = np.percentile(ref_hw[ref_hw > 0], [2, 98]) if (ref_hw > 0).any() else (0.0, 1.0)
        rel = np.where(valid, np.abs(est_hw - ref_hw) / np.where(ref_hw > 0, ref_hw, 1.0), np.nan)
        for row, (image, cmap, vmin, vmax, label) in enumerate(
            ((np.where(ref_hw > 0, ref_hw, np.nan), "viridis", lo, hi, "reference"),
             (np.where(est_hw > 0, est_hw, np.nan), "viridis", lo, hi, "estimate"),
             (rel, "magma", 0.0, 0.2, "|err| / ref"))):  # fmt: skip
            ax = fig.add_subplot(3, len(shown), row * len(shown) + k + 1)
            im = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0:
                ax.set_ylabel(label, fontsize=8)
            if row == 0:
                ax.set_title(Path(name).stem, fontsize=7)
            if k == len(shown) - 1:
                fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"depth, {cid}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_contact_sheet(sheet: list, path: Path, max_views: int) -> Path:
    """Ground truth (top row) over generated views (bottom row)."""
    shown = sheet[:max_views]
    fig = _new_figure(2.0 * len(shown), 4.4)
    for k, (gen_name, ref_name, gen, ref) in enumerate(shown):
        for row, (image, title) in enumerate(((ref, f"GT {Path(ref_name).stem}"), (gen, Path(gen_name).stem))):
            ax = fig.add_subplot(2, len(shown), row * len(shown) + k + 1)
            ax.imshow(np.clip(image, 0, 1))
            ax.set_title(title, fontsize=6)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if math.isnan(value):
            return "—"
        return f"{value:.4g}"
    return str(value)


def _figure_key(row: dict) -> tuple[str, str, str]:
    return (row["section"], row["metric"], row["bucket"])


def compare_rows(this: list[dict], other: list[dict]) -> list[dict]:
    """Side-by-side rows for figures present in either run, with the difference (this - other)."""
    theirs = {_figure_key(r): r for r in other}
    mine = {_figure_key(r): r for r in this}
    rows = []
    for key in list(mine) + [k for k in theirs if k not in mine]:
        a, b = mine.get(key, {}).get("value"), theirs.get(key, {}).get("value")
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        same_protocol = key in mine and key in theirs and mine[key]["protocol"] == theirs[key]["protocol"]
        rows.append({"section": key[0], "metric": key[1], "bucket": key[2], "this": a, "other": b, "delta": delta,
                     "better": (mine.get(key) or theirs.get(key)).get("better", ""),
                     "same_protocol": same_protocol})  # fmt: skip
    return rows


def render_report(doc: dict, figure_files: dict[str, str]) -> str:
    """The markdown report: inputs, one table per section with its protocol, figures, skips, comparison."""
    lines = ["# nvf evaluation report", ""]
    if doc["config"].get("label"):
        lines += [f"**{doc['config']['label']}**", ""]
    lines += [f"nvf {doc['nvf_version']}; inputs:", ""]
    lines += [f"- {k}: `{v}`" for k, v in doc["inputs"].items() if v]
    by_section: dict[str, list[dict]] = {}
    for row in doc["figures"]:
        by_section.setdefault(row["section"], []).append(row)
    titles = {"poses": "Poses", "depth": "Depth", "clouds": "Point clouds", "views": "Novel views",
              "reconstruction": "Reconstruction (held-out views)",
              **evaluate_views.SECTION_TITLES}  # fmt: skip
    for section, rows in by_section.items():
        lines += ["", f"## {titles.get(section, section)}", "", "| metric | bucket | value | n | unit | better |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for row in rows:
            value = _fmt(row["value"]) + (f" ({row['note']})" if row.get("note") else "")
            lines.append(
                f"| {row['metric']} | {row['bucket']} | {value} | {row['n']} | {row['unit']} | {row['better']} |"
            )
        protocol = doc[section]["protocol"]
        if doc[section].get("status", "ok") != "ok":
            lines += ["", f"**{doc[section]['status']}**"]
        lines += ["", "Protocol: " + "; ".join(f"{k} = {_fmt(v)}" for k, v in protocol.items() if v is not None)]
        if section in figure_files:
            lines += ["", f"![{section}]({figure_files[section]})"]
    if doc["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- **{s['metric']}**: {s['reason']}" for s in doc["skipped"]]
    if doc.get("compare"):
        lines += ["", f"## Comparison with `{doc['compare']['other']}`", "",
                  "| section | metric | bucket | this | other | this − other | better | same protocol |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in doc["compare"]["rows"]:
            lines.append(f"| {row['section']} | {row['metric']} | {row['bucket']} | {_fmt(row['this'])} | "
                         f"{_fmt(row['other'])} | {_fmt(row['delta'])} | {row['better']} | "
                         f"{'yes' if row['same_protocol'] else 'NO'} |")  # fmt: skip
    lines += ["", "## Conventions", ""] + [f"- {k}: {v}" for k, v in doc["conventions"].items()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def _inputs_fingerprint(inputs: Inputs, cfg: Config) -> str:
    """Hash of the config and of every input file's name, size and mtime (cheap for image folders)."""
    listing = []
    for f in dataclasses.fields(inputs):
        path = getattr(inputs, f.name)
        if path is None or not Path(path).exists():
            continue
        files = [Path(path)] if Path(path).is_file() else sorted(p for p in Path(path).rglob("*") if p.is_file())
        listing.append([f.name, [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]])
    return io.hash_inputs(dataclasses.asdict(cfg) | {"overwrite": False}, listing)


def _resolve_device(device: str) -> str:
    if device != "auto":
        return device
    from stages.core.batching import choose_device

    return str(choose_device("auto"))


def run(inputs: Inputs, out: Path, cfg: Config = Config(), *, device: str = "auto", overwrite: bool = False,
        progress: ProgressFn | None = None) -> list[Path]:  # fmt: skip
    """Evaluate every section whose inputs are given; write OUT/metrics.json, OUT/report.md, OUT/figures/.

    Returns the paths written (report.md first). An up-to-date OUT (same inputs hash) is kept
    unless `overwrite` or `cfg.overwrite`; then nothing is written and [] is returned.
    """
    out = Path(out)
    sections = {"poses": (inputs.poses, inputs.poses_ref), "depth": (inputs.depth, inputs.depth_ref),
                "clouds": (inputs.cloud, inputs.cloud_ref), "views": (inputs.views, inputs.views_ref)}  # fmt: skip
    if inputs.views is not None and not Path(inputs.views).is_dir():
        raise InputError(f"--views {inputs.views}: not a folder; pass the folder nvf sample wrote")
    for name, (est, ref) in sections.items():
        if name == "views" and est is not None:
            continue  # generated views alone: closed loop and identity, no ground truth needed
        if (est is None) != (ref is None):
            raise InputError(f"{name}: give both the estimate and its reference (got only the "
                             f"{'estimate' if ref is None else 'reference'})")  # fmt: skip
    if not any(est is not None for est, _ in sections.values()) and inputs.reconstruction is None:
        raise InputError(
            "nothing to evaluate: give at least one pair (poses, depth, clouds or views) and its reference, "
            "generated views, or a reconstruction"
        )
    found_reconstructions = _tree(inputs.reconstruction, (evaluate_recon.METRICS_FILE,), "reconstructions")
    fingerprint = _inputs_fingerprint(inputs, cfg)
    metrics_path = out / "metrics.json"
    if not (overwrite or cfg.overwrite) and metrics_path.is_file():
        try:
            if json.loads(metrics_path.read_text()).get("inputs_hash") == fingerprint:
                log.info("evaluate: %s is up to date, skipped (pass --overwrite to redo)", out)
                return []
        except (OSError, ValueError, AttributeError):  # not a report of nvf's: the check below decides
            pass
    io.check_replaceable(out, "--out folder")  # before the work: a report replaces only a report
    device = _resolve_device(device)
    figures, skipped = Figures(), []
    doc: dict[str, Any] = {"nvf_stage": STAGE, "nvf_version": _version(), "inputs_hash": fingerprint,
                           "inputs": {k: str(v) if v else None for k, v in dataclasses.asdict(inputs).items()},
                           "config": dataclasses.asdict(cfg), "conventions": CONVENTIONS}  # fmt: skip
    plots: dict[str, Callable[[Path], Path]] = {}
    pose_results: dict[str, PoseResult] = {}
    if inputs.poses is not None:
        doc["poses"], pose_results = _poses_section(inputs, cfg, figures)
        plots["poses"] = lambda p: plot_pose_top_view(pose_results, p)
    if inputs.depth is not None:
        doc["depth"], maps = _depth_section(inputs, cfg, figures)
        plots["depth"] = lambda p: plot_depth_maps(maps, p, cfg.sheet_views)
    if inputs.cloud is not None:
        doc["clouds"] = _cloud_section(inputs, cfg, figures, pose_results)
        renders = evaluate_plots.cloud_renders(_tree(inputs.cloud, ("cloud.ply",), "clouds"))
        if renders:
            plots["clouds"] = lambda p: evaluate_plots.plot_cloud_renders(renders, p)
    if inputs.views is not None and inputs.views_ref is not None:
        doc["views"], sheet = _views_section(inputs, cfg, figures, device, skipped, progress)
        plots["views"] = lambda p: plot_contact_sheet(sheet, p, cfg.sheet_views)
    if inputs.views is not None:
        _generated_views_sections(inputs, cfg, figures, device, skipped, doc)
        generated = evaluate_plots.generated_sheet(inputs.views, doc.get("closed_loop"), doc.get("identity"))
        section = "identity" if "identity" in doc else "closed_loop" if "closed_loop" in doc else None
        if generated and section is not None:
            plots[section] = lambda p: evaluate_plots.plot_generated_sheet(generated, p)
    if found_reconstructions:
        doc["reconstruction"] = evaluate_recon.reconstruction_section(found_reconstructions, figures)
    doc["figures"] = figures.rows
    doc["skipped"] = skipped
    if inputs.compare is not None:
        other_path = Path(inputs.compare) / "metrics.json" if Path(inputs.compare).is_dir() else Path(inputs.compare)
        other = io.read_json(other_path)
        if not isinstance(other, dict) or "figures" not in other:
            raise InputError(f"{other_path}: not an nvf evaluate metrics.json (no 'figures'); pass a report folder")
        doc["compare"] = {
            "other": str(other_path.parent),
            "rows": compare_rows(_finite_json(figures.rows), other["figures"]),
        }
    plot_names = {
        "poses": "poses_top.png",
        "depth": "depth.png",
        "views": "contact_sheet.png",
        "clouds": "cloud_renders.png",
        "identity": "generated_views.png",
        "closed_loop": "generated_views.png",
    }
    with io.atomic_dir(out) as tmp:
        (tmp / "figures").mkdir()
        for section, plot in plots.items():
            plot(tmp / "figures" / plot_names[section])
        figure_files = {s: f"figures/{plot_names[s]}" for s in plots}
        safe = _finite_json(doc)
        (tmp / "metrics.json").write_text(json.dumps(safe, indent=2) + "\n")
        (tmp / "report.md").write_text(render_report({**safe, "figures": figures.rows}, figure_files))
    written = [out / "report.md", out / "metrics.json"] + [out / f for f in figure_files.values()]
    log.info("evaluate: wrote %s", out / "report.md")
    return written


def _generated_views_sections(inputs: Inputs, cfg: Config, figures: Figures, device: str, skipped: list[dict],
                              doc: dict) -> None:  # fmt: skip
    """Closed loop and identity of generated views (`stages.evaluate_views`), into `doc`."""
    from stages.core import faces

    if cfg.face_identity == "on" and (reason := faces.unavailable_reason()) is not None:
        raise ModelError(reason)  # before the SfM work, not after it
    section = evaluate_views.closed_loop_section(inputs.views, cfg.closed_loop, figures, skipped)
    if section is not None:
        doc["closed_loop"] = section
    arcface = None
    if cfg.arcface != "off":
        reason = image_metrics.arcface_unavailable()
        if reason is None:
            arcface = image_metrics.ArcFaceEmbedder()
        elif cfg.arcface == "on":
            raise ModelError(reason)
    clip = _identity_embedder(cfg, device, skipped)
    section = evaluate_views.identity_section(inputs.views, inputs.input_image, cfg.face_identity,
                                              cfg.frontal_max_azimuth, figures, skipped, clip, arcface)  # fmt: skip
    if section is not None:
        doc["identity"] = section


def _version() -> str:
    from stages import __version__

    return __version__
