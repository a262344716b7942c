"""Closed-loop camera consistency of a generated view set: re-pose the views by SfM and compare.

A view set (``VIEWS/transforms.json`` + its images, e.g. from `nvf sample`) claims a camera per image.
The images, the input photo among them, are posed again with nvf's own SfM (`stages.poses.run_sfm`,
the ``calibrated`` preset: one pinhole camera with the claimed focal length held fixed), and the
recovered cameras are compared with the claimed ones. Views that no consistent 3D scene explains
(identity drift, collapse to a canonical view, Janus faces) fail to register or land elsewhere,
even where each image looks plausible on its own.

Alignment (SfM's world is arbitrary): input-anchored, then refitted on the views that agree. Every
claimed camera is a pose *relative to the input photo* (the pose codes the model was conditioned on),
so a first similarity takes the world rotation and the anchor centre from the input view
(``generated: false`` in sample.json, else frame 0) alone, and the scale as the least-median choice
among the per-view ratios of centre offsets from the anchor (robust to up to half of the views being
wrong). The views within `Config.inlier_deg` and `Config.inlier_rel` of their claims under it then
refit the similarity in least squares (`stages.poses.fit_pose_similarity`: chordal mean rotation,
centres), which removes the anchor's own SfM noise. A wrong view thus shows its own error instead of
spreading it over the others, as a least-squares fit on all views would. When the input view is not
registered, the registered view with the least median rotation error to the others anchors.

Figures: registered fraction; per view the geodesic rotation error (degrees) and the centre error
relative to the orbit radius (mean distance of the claimed centres from the point their optical axes
pass closest to, i.e. the subject); by bucket of the angle from the input camera (0-45, 45-90,
90-135, 135-180 degrees, the angle between the two centres seen from the subject). Dense check:
every SfM track (matched features across views) is triangulated with the *claimed* cameras (linear
DLT) and reprojected; the reprojection error (pixels, +0.5 pixel-centre convention) per observation
is what the claims leave unexplained. The same with the recovered cameras is SfM's own floor.

Fewer than `Config.min_registered` registered views: the set carries no consistent geometry; the
result says so (`status`) and holds no error figures, never an exception.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages import poses
from stages.core import geometry, io
from stages.core.errors import InputError

log = logging.getLogger("nvf")

BUCKET_EDGES_DEG = (45.0, 90.0, 135.0, 180.0)


@dataclass(frozen=True)
class Config:
    """How the view set is re-posed and scored."""

    min_registered: int = 3
    """Fewest registered views (input included) for any error figure."""
    poses_preset: str = "calibrated"
    """`stages.poses` preset SfM runs with; its focal length is set to the claimed one."""
    fix_focal: bool = True
    """Hold the claimed focal length fixed in SfM (False: let bundle adjustment refine it)."""
    inlier_deg: float = 3.0
    """After the anchored fit, views within this rotation error (degrees) ..."""
    inlier_rel: float = 0.05
    """... and this centre error (fraction of the orbit radius) refit the similarity in least squares."""


@dataclass(frozen=True)
class ViewSet:
    """The claimed cameras of a view set; `paths` relative to `root`, `anchor` = the input view's row."""

    root: Path
    paths: list[str]
    cameras: io.CameraSet
    anchor: int


def read_view_set(views: Path) -> ViewSet:
    """The frames of VIEWS/transforms.json (claimed cameras) and which one is the input photo.

    The input is the frame sample.json marks ``generated: false``, else frame 0.
    """
    views = Path(views)
    path = views / "transforms.json"
    if not path.is_file():
        raise InputError(f"{views}: no transforms.json (the cameras the views were asked for); "
                         "pass a folder written by nvf sample")  # fmt: skip
    cameras = io.read_transforms(path)
    doc = io.read_json(path)
    paths = [frame["file_path"] for frame in doc["frames"]]
    for rel in paths:
        if not (views / rel).is_file():
            raise InputError(f"{path}: frame image {rel} not found in {views}")
    anchor = 0
    sample_json = views / "sample.json"
    if sample_json.is_file():
        frames = io.read_json(sample_json).get("frames", [])
        inputs = [Path(f["file"]).name for f in frames if isinstance(f, dict) and f.get("generated") is False]
        names = [Path(p).name for p in paths]
        if inputs and inputs[0] in names:
            anchor = names.index(inputs[0])
    return ViewSet(views, paths, cameras, anchor)


@dataclass(frozen=True)
class Recovered:
    """SfM's cameras of the registered rows: registered [N] bool, R [N,3,3], T [N,3] (identity where not),
    and its tracks (`stages.poses.extract_views` sparse dict, rows = view set rows)."""

    registered_n: np.ndarray
    R_n33: np.ndarray
    T_n3: np.ndarray
    sparse: dict[str, np.ndarray] | None
    seconds: float
    note: str = ""


def repose(view_set: ViewSet, cfg: Config = Config()) -> Recovered:
    """Run SfM on the view set's images with the claimed focal length (one shared pinhole camera)."""
    cams = view_set.cameras
    n = len(view_set.paths)
    focal = float(np.median(0.5 * (cams.K[:, 0, 0] + cams.K[:, 1, 1])))
    sfm_cfg = dataclasses.replace(poses.PRESETS[cfg.poses_preset], focal_px=focal, refine_focal=not cfg.fix_focal,
                                  rig="off", layout="folder")  # fmt: skip
    sizes = [io.image_size(view_set.root / p) for p in view_set.paths]
    registered = np.zeros(n, dtype=bool)
    R, T = np.tile(np.eye(3), (n, 1, 1)), np.zeros((n, 3))
    clock = time.perf_counter()
    note = ""
    try:
        rec, _ = poses.run_sfm(view_set.root, view_set.paths, sfm_cfg, sizes, label="closed loop")
    except (RuntimeError, ValueError) as exc:  # pycolmap's errors on images without usable features
        rec, note = None, f"SfM failed: {exc}"
    sparse = None
    if rec is not None:
        views, sparse = poses.extract_views(rec, view_set.paths)
        for i, rel in enumerate(view_set.paths):
            if rel in views:
                registered[i] = True
                R[i], T[i] = views[rel]["R"], views[rel]["T"]
    return Recovered(registered, R, T, sparse, time.perf_counter() - clock, note)


def subject_point(R_n33: np.ndarray, T_n3: np.ndarray) -> np.ndarray:
    """The point [3] closest (least squares) to every camera's optical axis: what the cameras look at."""
    centers = geometry.camera_centers(R_n33, T_n3)
    dirs = R_n33[:, 2, :]  # camera +z in world coordinates
    proj = np.eye(3)[None] - dirs[:, :, None] * dirs[:, None, :]  # [N, 3, 3]
    A, b = proj.sum(0), np.einsum("nij,nj->i", proj, centers)
    if np.linalg.cond(A) > 1e8:  # parallel axes: no common point; the centroid stands in
        return centers.mean(0)
    return np.linalg.solve(A, b)


def anchored_similarity(R_rec: np.ndarray, T_rec: np.ndarray, R_req: np.ndarray, T_req: np.ndarray,
                        anchor: int) -> tuple[float, np.ndarray, np.ndarray]:  # fmt: skip
    """(s, R_w, t_w) with X_req = s R_w X_rec + t_w, exact on the anchor's pose; s by least median.

    Rows [N] are the registered views (N >= 2). R_w puts the anchor's recovered rotation onto its
    claimed one; each other view i proposes s_i from its centre offset to the anchor; the s whose
    median centre error over the views is smallest wins.
    """
    R_w = R_req[anchor].T @ R_rec[anchor]  # R_rec[a] R_w^T == R_req[a]
    C_rec = geometry.camera_centers(R_rec, T_rec) @ R_w.T
    C_req = geometry.camera_centers(R_req, T_req)
    d_rec, d_req = C_rec - C_rec[anchor], C_req - C_req[anchor]
    norm2 = (d_rec**2).sum(1)
    usable = norm2 > 1e-12 * max(norm2.max(), 1e-300)
    candidates = (d_req * d_rec).sum(1)[usable] / norm2[usable]
    candidates = candidates[candidates > 0]
    if not len(candidates):
        raise InputError("closed loop: recovered cameras coincide; no scale can be fitted")
    costs = [np.median(np.linalg.norm(s * d_rec - d_req, axis=1)) for s in candidates]
    scale = float(candidates[int(np.argmin(costs))])
    return scale, R_w, C_req[anchor] - scale * C_rec[anchor]


def _choose_anchor(R_rec: np.ndarray, R_req: np.ndarray) -> int:
    """Row whose anchoring gives the least median rotation error over the others (no input view)."""
    costs = []
    for a in range(len(R_rec)):
        R_w = R_req[a].T @ R_rec[a]
        costs.append(np.median(geometry.rotation_angle_deg(R_rec @ R_w.T, R_req)))
    return int(np.argmin(costs))


def triangulate_tracks(sparse: dict[str, np.ndarray], P_n34: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear (DLT) triangulation of every track with projection matrices P [N, 3, 4] (rows = views).

    Returns (points [M, 3], ok [M]); tracks of fewer than 2 views, or with a point behind a camera
    or at infinity, are not ok.
    """
    offsets, rows, uv = sparse["track_offsets"], sparse["track_images"], sparse["track_uv"]
    lengths = np.diff(offsets)
    points = np.full((len(lengths), 3), np.nan)
    for length in np.unique(lengths[lengths >= 2]):
        tracks = np.flatnonzero(lengths == length)
        idx = offsets[tracks][:, None] + np.arange(length)[None]  # [K, L] observation indices
        P = P_n34[rows[idx]]  # [K, L, 3, 4]
        u, v = uv[idx][..., 0:1], uv[idx][..., 1:2]  # [K, L, 1]
        A = np.concatenate([u * P[..., 2, :] - P[..., 0, :], v * P[..., 2, :] - P[..., 1, :]], axis=1)  # [K, 2L, 4]
        _, _, Vt = np.linalg.svd(A)
        X = Vt[:, -1]  # [K, 4]
        with np.errstate(divide="ignore", invalid="ignore"):
            points[tracks] = X[:, :3] / X[:, 3:4]
    ok = np.isfinite(points).all(1)
    point_of_obs = np.repeat(np.arange(len(lengths)), lengths)
    depth = np.einsum("mij,mj->mi", P_n34[rows][:, 2:3, :3], np.nan_to_num(points[point_of_obs]))[:, 0]
    depth = depth + P_n34[rows][:, 2, 3]
    behind = np.zeros(len(lengths), dtype=bool)
    np.logical_or.at(behind, point_of_obs, depth <= 0)
    return points, ok & ~behind


def reprojection_errors(sparse: dict[str, np.ndarray], K_n33: np.ndarray, R_n33: np.ndarray,
                        T_n3: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(error [M_obs] in pixels, view row [M_obs]) of the tracks triangulated and reprojected with the
    given cameras; observations of tracks that cannot be triangulated are left out."""
    P = K_n33 @ np.concatenate([R_n33, T_n3[:, :, None]], axis=2)  # [N, 3, 4]
    points, ok = triangulate_tracks(sparse, P)
    lengths = np.diff(sparse["track_offsets"])
    point_of_obs = np.repeat(np.arange(len(lengths)), lengths)
    keep = ok[point_of_obs]
    rows = sparse["track_images"][keep]
    X = np.concatenate([points[point_of_obs[keep]], np.ones((int(keep.sum()), 1))], axis=1)  # [M, 4]
    proj = np.einsum("mij,mj->mi", P[rows], X)
    uv = proj[:, :2] / proj[:, 2:3]
    return np.linalg.norm(uv - sparse["track_uv"][keep], axis=1), rows


def bucket_of(angle_deg: float) -> str:
    """Bucket label of an angle from the input camera: '0-45', '45-90', '90-135' or '135-180'."""
    low = 0.0
    for edge in BUCKET_EDGES_DEG:
        if angle_deg <= edge + 1e-9:
            return f"{low:g}-{edge:g}"
        low = edge
    return f"{BUCKET_EDGES_DEG[-2]:g}-{BUCKET_EDGES_DEG[-1]:g}"


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def score(view_set: ViewSet, recovered: Recovered, cfg: Config = Config()) -> dict[str, Any]:
    """The closed-loop figures of a view set from its SfM result (see the module docstring).

    Returns {status, registered, n_views, fraction_registered, anchor, scale, orbit_radius, per_view,
    buckets, summary, seconds}; `status` is "ok" or the reason there are no error figures.
    """
    cams = view_set.cameras
    n = len(view_set.paths)
    reg = recovered.registered_n
    target = subject_point(cams.R, cams.T)
    C_req = geometry.camera_centers(cams.R, cams.T)
    radius = float(np.linalg.norm(C_req - target, axis=1).mean())
    to_cam = C_req - target
    unit = to_cam / np.maximum(np.linalg.norm(to_cam, axis=1, keepdims=True), 1e-12)
    angle_from_input = np.degrees(np.arccos(np.clip(unit @ unit[view_set.anchor], -1.0, 1.0)))  # [N]
    per_view = [{"name": Path(p).name, "angle_from_input_deg": float(angle_from_input[i]),
                 "bucket": bucket_of(float(angle_from_input[i])), "registered": bool(reg[i]),
                 "is_input": i == view_set.anchor} for i, p in enumerate(view_set.paths)]  # fmt: skip
    result: dict[str, Any] = {"n_views": n, "registered": int(reg.sum()), "fraction_registered": float(reg.mean()),
                              "orbit_radius": radius, "seconds": recovered.seconds, "per_view": per_view}  # fmt: skip
    if reg.sum() < max(cfg.min_registered, 2):
        why = f" ({recovered.note})" if recovered.note else ""
        result["status"] = (f"not enough views registered ({int(reg.sum())}/{n}): views carry no consistent "
                            f"geometry{why}")  # fmt: skip
        result.update({"anchor": None, "buckets": _buckets(per_view)})
        return result
    rows = np.flatnonzero(reg)
    anchor_row = view_set.anchor if reg[view_set.anchor] else int(rows[_choose_anchor(
        recovered.R_n33[rows], cams.R[rows])])  # fmt: skip
    a = int(np.flatnonzero(rows == anchor_row)[0])
    R_rec, T_rec, R_req, T_req = recovered.R_n33[rows], recovered.T_n3[rows], cams.R[rows], cams.T[rows]
    s, R_w, t_w = anchored_similarity(R_rec, T_rec, R_req, T_req, a)
    rot, ctr = _errors(R_rec, T_rec, R_req, C_req[rows], radius, (s, R_w, t_w))
    inliers = (rot <= cfg.inlier_deg) & (ctr <= cfg.inlier_rel)
    if inliers.sum() >= 2:  # refit on the views that agree: least squares removes the anchor's own noise
        s, R_w, t_w = poses.fit_pose_similarity(R_rec[inliers], T_rec[inliers], R_req[inliers], T_req[inliers])
        rot, ctr = _errors(R_rec, T_rec, R_req, C_req[rows], radius, (s, R_w, t_w))
    R_al, T_al = poses.transform_pose(R_rec, T_rec, s, R_w, t_w)
    claimed_px, claimed_rows = reprojection_errors(recovered.sparse, cams.K, cams.R, cams.T)
    own_R, own_T = cams.R.copy(), cams.T.copy()
    own_R[rows], own_T[rows] = R_al, T_al
    own_px, own_rows = reprojection_errors(recovered.sparse, cams.K, own_R, own_T)
    for k, i in enumerate(rows):
        view = per_view[i]
        view["rotation_error_deg"] = float(rot[k])
        view["center_error_rel"] = float(ctr[k])
        mine = claimed_px[claimed_rows == i]
        view["reprojection_error_px"] = float(np.median(mine)) if mine.size else math.nan
        view["observations"] = int(mine.size)
    result.update({
        "status": "ok", "anchor": per_view[anchor_row]["name"], "anchor_is_input": anchor_row == view_set.anchor,
        "scale": s, "fit_views": int(inliers.sum()) if inliers.sum() >= 2 else 1, "buckets": _buckets(per_view),
        "summary": {
            "rotation_error_deg": {"mean": float(rot.mean()), "median": float(np.median(rot)), "max": float(rot.max())},
            "center_error_rel": {"mean": float(ctr.mean()), "median": float(np.median(ctr)), "max": float(ctr.max())},
            "reprojection_error_px": {"median": float(np.median(claimed_px)) if claimed_px.size else math.nan,
                                      "mean": float(claimed_px.mean()) if claimed_px.size else math.nan,
                                      "observations": int(claimed_px.size)},
            "sfm_reprojection_error_px": float(np.median(own_px)) if own_px.size else math.nan,
        },
    })  # fmt: skip
    return result


def _errors(R_rec: np.ndarray, T_rec: np.ndarray, R_req: np.ndarray, C_req: np.ndarray, radius: float,
            similarity: tuple[float, np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(rotation error [N] deg, centre error [N] / radius) of recovered cameras mapped by the similarity."""
    R_al, T_al = poses.transform_pose(R_rec, T_rec, *similarity)
    return (geometry.rotation_angle_deg(R_al, R_req),
            np.linalg.norm(geometry.camera_centers(R_al, T_al) - C_req, axis=1) / radius)  # fmt: skip


def _buckets(per_view: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for view in per_view:
        if view["is_input"]:
            continue  # the input is the anchor: zero error by construction
        bucket = out.setdefault(view["bucket"], {"n": 0, "registered": 0, "rot": [], "ctr": [], "px": []})
        bucket["n"] += 1
        bucket["registered"] += int(view["registered"])
        if "rotation_error_deg" in view:
            bucket["rot"].append(view["rotation_error_deg"])
            bucket["ctr"].append(view["center_error_rel"])
            bucket["px"].append(view["reprojection_error_px"])
    return {name: {"n": b["n"], "fraction_registered": b["registered"] / b["n"],
                   "rotation_error_deg": _mean(b["rot"]), "center_error_rel": _mean(b["ctr"]),
                   "reprojection_error_px": _mean(b["px"])}
            for name, b in sorted(out.items(), key=lambda kv: float(kv[0].split("-")[0]))}  # fmt: skip


def closed_loop(views: Path, cfg: Config = Config()) -> dict[str, Any]:
    """Re-pose the view set in `views` and score it (`read_view_set`, `repose`, `score`)."""
    view_set = read_view_set(views)
    recovered = repose(view_set, cfg)
    result = score(view_set, recovered, cfg)
    log.info("closed loop: %d/%d views registered in %.1f s (%s)", result["registered"], result["n_views"],
             recovered.seconds, result["status"])  # fmt: skip
    return result
