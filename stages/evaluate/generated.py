"""Sections of `nvf evaluate --views` that need no ground truth: closed-loop cameras and identity.

- **closed_loop** (`stages.closed_loop`): the views and the input photo are posed again by SfM and
  compared with the cameras of VIEWS/transforms.json: registered fraction, rotation error (deg) and
  centre error (/ orbit radius) after an input-anchored similarity, reprojection error (px) of the
  matched features under the claimed cameras; buckets by the angle from the input camera.
- **identity**: dlib's 128-D face descriptor (`stages.core.faces`, the default backbone; extra
  ``nvf[face]``): face-detection rate per view, I2O (input photo -> view) Euclidean distance, cosine
  and same-person rate (distance < 0.6; a view without a face counts as not the same person), O2O
  (mean over pairs of views with a face); CLIP I2O/O2O (the paper's figure) and ArcFace (when
  installed) beside it. Buckets all / frontal (|azimuth| <= `frontal_max_azimuth`) / back.

The generated views are the frames of VIEWS/transforms.json (else every image in VIEWS), minus the
input frame (``generated: false`` in an `nvf sample` folder's sample.json). The input photo is
``--input`` when given, else that input frame.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages import closed_loop
from stages.core import faces, image_metrics, io
from stages.core.errors import ModelError
from stages.evaluate.common import Figures, view_azimuth_deg
from stages.evaluate.sources import _images_by_name, _input_frames
from stages.evaluate.views import _identity_embedder

if TYPE_CHECKING:
    from stages.evaluate import Config, Inputs

log = logging.getLogger("nvf")

SECTION_TITLES = {"closed_loop": "Closed-loop camera consistency", "identity": "Identity"}


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def closed_loop_section(views: Path, mode: str, figures: Any, skipped: list[dict]) -> dict | None:
    """The closed-loop section (None when skipped: `mode` auto without transforms.json, or off)."""
    if mode == "off":
        return None
    if mode == "auto" and not (Path(views) / "transforms.json").is_file():
        skipped.append({"metric": "closed_loop", "reason": f"{views} has no transforms.json (the requested cameras)"})
        return None
    result = closed_loop.closed_loop(Path(views))
    protocol = {
        "sfm": "stages.poses calibrated preset (SIMPLE_PINHOLE, claimed focal held fixed), exhaustive SIFT",
        "alignment": "similarity anchored on the input view (rotation, centre; least-median scale), refitted in "
        "least squares on views within 3 deg and 0.05 radius",
        "center_error": "distance / orbit radius (mean distance of claimed centres to the point the axes meet)",
        "reprojection": "SfM tracks triangulated (DLT) and reprojected with the claimed cameras; median px",
        "buckets": "angle between input and view camera seen from the subject (deg)",
        "anchor": result.get("anchor"),
    }
    n = result["n_views"]
    note = "" if result["status"] == "ok" else result["status"]
    figures.add("closed_loop", "fraction_registered", result["fraction_registered"], protocol=protocol, n=n,
                better="higher", note=note)  # fmt: skip
    if result["status"] == "ok":
        summary = result["summary"]
        for metric, unit in (("rotation_error_deg", "deg"), ("center_error_rel", "radius")):
            figures.add("closed_loop", metric, summary[metric]["mean"], protocol=protocol, n=result["registered"],
                        unit=unit, better="lower")  # fmt: skip
        figures.add("closed_loop", "reprojection_error_px", summary["reprojection_error_px"]["median"],
                    protocol=protocol, n=summary["reprojection_error_px"]["observations"], unit="px", better="lower",
                    note=f"SfM's own cameras: {summary['sfm_reprojection_error_px']:.3g} px")  # fmt: skip
    for bucket, row in result["buckets"].items():
        figures.add("closed_loop", "fraction_registered", row["fraction_registered"], protocol=protocol,
                    bucket=bucket, n=row["n"], better="higher")  # fmt: skip
        if math.isfinite(row["rotation_error_deg"]):
            figures.add("closed_loop", "rotation_error_deg", row["rotation_error_deg"], protocol=protocol,
                        bucket=bucket, n=row["n"], unit="deg", better="lower")  # fmt: skip
    return {"protocol": protocol, **result}


def _frames(views: Path) -> tuple[list[Path], list[float | None], set[str]]:
    """(image paths, azimuth per image or None, names of input frames) of a views folder."""
    views = Path(views)
    inputs = _input_frames(views)
    transforms = views / "transforms.json"
    if transforms.is_file():
        cameras = io.read_transforms(transforms)
        doc = io.read_json(transforms)
        paths = io.transforms_image_paths(transforms)
        azimuths = [frame.get("nvf_azimuth_deg", view_azimuth_deg(name, R))
                    for frame, name, R in zip(doc["frames"], cameras.names, cameras.R)]  # fmt: skip
        return paths, azimuths, inputs
    found = _images_by_name(views)
    return [found[k] for k in sorted(found)], [view_azimuth_deg(k) for k in sorted(found)], inputs


def identity_section(views: Path, input_image: Path | None, mode: str, frontal_max_azimuth: float, figures: Any,
                     skipped: list[dict], clip: Any = None, arcface: Any = None) -> dict | None:  # fmt: skip
    """The identity section; `clip`/`arcface` are loaded embedders (or None). None when nothing ran.

    `mode` (dlib): auto skips with the reason when the extra is missing; on raises ModelError; off skips.
    """
    paths, azimuths, inputs = _frames(views)
    gen = [(p, a) for p, a in zip(paths, azimuths) if p.name not in inputs]
    photo_path = Path(input_image) if input_image is not None else next((p for p in paths if p.name in inputs), None)
    use_dlib = mode != "off"
    if use_dlib and (reason := faces.unavailable_reason()) is not None:
        if mode == "on":
            raise ModelError(reason)
        skipped.append({"metric": "dlib_identity", "reason": reason})
        log.warning("evaluate: %s", reason)
        use_dlib = False
    if not (use_dlib or clip is not None or arcface is not None) or not gen:
        return None
    images = [io.read_image(p) for p, _ in gen]
    photo = io.read_image(photo_path) if photo_path is not None else None
    if photo is None:
        skipped.append({"metric": "identity_i2o", "reason": "no input photo (pass --input, or an nvf sample folder)"})
    rows = [{"name": p.name, "azimuth_deg": a,
             "bucket": None if a is None else ("frontal" if abs(a) <= frontal_max_azimuth else "back")}
            for p, a in gen]  # fmt: skip
    protocol: dict[str, Any] = {"input": str(photo_path) if photo_path else None, "views": len(rows)}
    status: list[str] = []
    o2o: dict[str, float] = {}
    if use_dlib:
        protocol.update(_dlib_scores(images, photo, rows, status, o2o))
    if clip is not None:
        protocol["clip_model"] = clip.name
        _embedding_scores("clip", clip(images), clip([photo])[0] if photo is not None else None, rows, o2o)
    if arcface is not None:
        protocol["arcface_model"] = arcface.name
        found_photo = arcface([photo])[0] if photo is not None else None
        _embedding_scores("arcface", arcface(images), found_photo, rows, o2o)
    _add_identity_figures(rows, o2o, protocol, figures, status)
    return {"protocol": protocol, "status": "; ".join(status) or "ok", "o2o": o2o, "per_view": rows}


def _dlib_scores(images: list[np.ndarray], photo: np.ndarray | None, rows: list[dict], status: list[str],
                 o2o: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    described = faces.describe(images)
    for row, face, found in zip(rows, described.faces, described.found_n):
        row["face_found"] = bool(found)
        row["face_score"] = face.score if face is not None else None
    if not described.found_n.any():
        status.append(f"no face detected in any of the {len(rows)} generated views: identity not available")
    protocol = {"identity_backbone": faces.BACKBONE, "same_person_distance": faces.SAME_PERSON_DISTANCE,
                "dlib_o2o": "mean distance over pairs of views with a face"}  # fmt: skip
    desc = described.descriptors_n128[described.found_n]
    if len(desc) >= 2:
        dist, cos = faces.pairwise(desc)
        o2o["dlib_o2o_distance"], o2o["dlib_o2o_cos"] = float(dist.mean()), float(cos.mean())
    if photo is None:
        return protocol
    face = faces.best_face(photo)
    if face is None:
        status.append("no face detected in the input photo: I2O identity not available")
        return protocol
    anchor = faces.descriptor(photo, face)
    for row, found, vec in zip(rows, described.found_n, described.descriptors_n128):
        if found:
            row["dlib_i2o_distance"] = float(faces.distance(anchor, vec[None])[0])
            row["dlib_i2o_cos"] = float(faces.cosine(anchor, vec[None])[0])
        row["dlib_same_person"] = bool(found) and row.get("dlib_i2o_distance", math.inf) < faces.SAME_PERSON_DISTANCE
    return protocol


def _embedding_scores(name: str, emb_nd: np.ndarray, anchor_d: np.ndarray | None, rows: list[dict],
                      o2o: dict[str, float]) -> None:  # fmt: skip
    found = ~np.isnan(emb_nd[:, 0])
    if found.sum() >= 2:
        o2o[f"{name}_o2o_cos"] = image_metrics.mean_pairwise_cosine(emb_nd[found])
    if anchor_d is None or np.isnan(anchor_d[0]):
        return
    for row, value, ok in zip(rows, image_metrics.cosine_to(anchor_d, np.nan_to_num(emb_nd)), found):
        row[f"{name}_i2o_cos"] = float(value) if ok else math.nan


def _add_identity_figures(rows: list[dict], o2o: dict[str, float], protocol: dict, figures: Any,
                          status: list[str]) -> None:  # fmt: skip
    metrics: list[tuple[str, str, str, Callable[[dict], Any]]] = [
        ("dlib_face_rate", "higher", "", lambda r: float(r["face_found"]) if "face_found" in r else None),
        ("dlib_i2o_same_rate", "higher", "", lambda r: float(r["dlib_same_person"]) if "dlib_same_person" in r else None),
        ("dlib_i2o_distance", "lower", "", lambda r: r.get("dlib_i2o_distance")),
        ("dlib_i2o_cos", "higher", "cos", lambda r: r.get("dlib_i2o_cos")),
        ("clip_i2o", "higher", "cos", lambda r: r.get("clip_i2o_cos")),
        ("arcface_i2o", "higher", "cos", lambda r: r.get("arcface_i2o_cos")),
    ]  # fmt: skip
    note = "; ".join(status)
    for metric, better, unit, pick in metrics:
        for bucket in ("all", "frontal", "back"):
            values = [pick(r) for r in rows if bucket == "all" or r["bucket"] == bucket]
            values = [v for v in values if v is not None]
            if not values:
                continue
            value = _finite_mean(values)
            figures.add("identity", metric, value, protocol=protocol, bucket=bucket, n=len(values), unit=unit,
                        better=better, note=note if bucket == "all" and metric == "dlib_face_rate" else "")  # fmt: skip
    for metric, better, unit in (("dlib_o2o_distance", "lower", ""), ("dlib_o2o_cos", "higher", "cos"),
                                 ("clip_o2o_cos", "higher", "cos"), ("arcface_o2o_cos", "higher", "cos")):  # fmt: skip
        if metric in o2o:
            figures.add("identity", metric, o2o[metric], protocol=protocol, n=len(rows), unit=unit,
                        better=better)  # fmt: skip


def _generated_views_sections(inputs: Inputs, cfg: Config, figures: Figures, device: str, skipped: list[dict],
                              doc: dict) -> None:  # fmt: skip
    """Closed loop and identity of generated views (this module), into `doc`."""
    if cfg.face_identity == "on" and (reason := faces.unavailable_reason()) is not None:
        raise ModelError(reason)  # before the SfM work, not after it
    section = closed_loop_section(inputs.views, cfg.closed_loop, figures, skipped)
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
    section = identity_section(inputs.views, inputs.input_image, cfg.face_identity, cfg.frontal_max_azimuth,
                               figures, skipped, clip, arcface)  # fmt: skip
    if section is not None:
        doc["identity"] = section
