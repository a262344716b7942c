"""Samples: (prediction, reference z) pairs per view, read through the prefilter (`_Views`), and the
views of a depth record (`_load_views`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.align.config import Config
from stages.core import depthmaps, geometry, io
from stages.core import masks as headmasks
from stages.core.errors import InputError

log = logging.getLogger("nvf")

_BLOCKS_FOR_NOISE = 16  # a view's noise from its sample blocks' own 16 residuals each needs this many blocks


@dataclass
class _Views:
    """The views of one capture in depth-record order (only those with what the reference needs)."""

    names: list[str]
    depth_nhw: np.ndarray  # float64 prediction
    valid_nhw: np.ndarray  # bool: finite, > 0, inside the foreground mask
    K_map: np.ndarray | None  # [N, 3, 3] K scaled to the depth map, when poses are used
    R: np.ndarray | None
    T: np.ndarray | None
    prefilter: Config | None = None  # the config whose prefilter applies; None: samples read raw pixels
    noise_raw: np.ndarray | None = None  # [N] relative per-pixel noise of the prediction (with prefilter)
    noise: np.ndarray | None = None  # [N] relative noise of what samples read
    rejected: np.ndarray | None = None  # [N] samples the prefilter dropped (edges, salt)

    def read_at(self, row: int, lines: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prediction [Q], usable [Q]) of view `row` at integer pixels: the raw value where valid,
        or with the prefilter (`stages.core.depthmaps.check_pixels`) never on a depth edge, and the
        3 x 3 median (SfM points, a reference view) or the raw value off salt (a `depth` reference)."""
        depth, valid = self.depth_nhw[row], self.valid_nhw[row]
        usable = valid[lines, cols]
        if self.prefilter is None or not len(lines):
            return depth[lines, cols], usable
        check = depthmaps.check_pixels(depth, valid, lines, cols, float(self.noise_raw[row]),
                                       edge_threshold=self.edge_threshold(row))  # fmt: skip
        if self.reads_median(row):
            return check.median_q, usable & ~check.edge_q
        return depth[lines, cols], usable & ~check.edge_q & ~check.outlier_q

    def read_block(self, row: int, lines: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`read_at` for the 2 x 2 blocks at (lines, cols) (top-left; the next line and column are
        clipped to the map): values and usable [Q, 4], corners (r, c), (r, c+1), (r+1, c), (r+1, c+1)."""
        depth, valid = self.depth_nhw[row], self.valid_nhw[row]
        height, width = valid.shape
        r1, c1 = np.minimum(lines + 1, height - 1), np.minimum(cols + 1, width - 1)
        pick_r, pick_c = np.stack([lines, lines, r1, r1], 1), np.stack([cols, c1, cols, c1], 1)
        usable = valid[pick_r, pick_c]
        if self.prefilter is None or not len(lines) or height < 2 or width < 2:
            return depth[pick_r, pick_c], usable
        known = bool(np.isfinite(self.noise_raw[row]))
        if not known and len(lines) < _BLOCKS_FOR_NOISE:  # too few blocks to tell the noise: read more pixels
            self.noise_raw[row] = depthmaps.estimate_noise(depth, valid, seed=self.prefilter.seed)
            known = True
        check = depthmaps.check_blocks(depth, valid, lines, cols, float(self.noise_raw[row]) if known else None,
                                       edge_threshold=self.edge_threshold(row))  # fmt: skip
        self.noise_raw[row] = check.noise
        if self.reads_median(row):
            return check.median_q, usable & ~check.edge_q
        return depth[pick_r, pick_c], usable & ~check.edge_q & ~check.outlier_q

    def edge_threshold(self, row: int) -> float:
        """`depthmaps.slope_threshold` of view `row` at the prefilter's `edge_angle`."""
        if self.K_map is not None:
            focal = float(np.sqrt(self.K_map[row, 0, 0] * self.K_map[row, 1, 1]))
        else:
            focal = 1.2 * max(self.depth_nhw.shape[1:])
        return float(depthmaps.slope_threshold(focal, self.prefilter.edge_angle))

    def reads_median(self, row: int) -> bool:
        """Whether samples of view `row` read the 3 x 3 median: SfM points or a reference view on a
        prediction noisier than `median_noise` (below it, the median's curvature bias outweighs)."""
        cfg = self.prefilter
        return cfg is not None and cfg.reference != "depth" and float(self.noise_raw[row]) >= cfg.median_noise

    def count_rejected(self, row: int, before: int, after: int) -> None:
        if self.rejected is not None:
            self.rejected[row] += before - after


def _pad(samples: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-view (x [m], z [m]) pairs -> x [N, M], z [N, M], valid [N, M] (M = the longest)."""
    width = max((len(x) for x, _ in samples), default=0)
    x_nm = np.zeros((len(samples), width))
    z_nm = np.zeros((len(samples), width))
    valid = np.zeros((len(samples), width), dtype=bool)
    for row, (x, z) in enumerate(samples):
        x_nm[row, : len(x)], z_nm[row, : len(z)], valid[row, : len(x)] = x, z, True
    return x_nm, z_nm, valid


def _subsample(index: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return index if len(index) <= limit else np.sort(rng.choice(index, size=limit, replace=False))


def _sample_points(views: _Views, row: int, points_n3: np.ndarray, *, zbuffer: bool) -> tuple[np.ndarray, np.ndarray]:
    """(prediction x, reference z) where world points project into view `row`.

    The prediction is read bilinearly at the projected position (pixel centres at +0.5), and only
    where all four neighbouring pixels are valid, so points on a silhouette drop out. Points behind
    the camera or off the map are dropped; with `zbuffer`, so is every point more than 1% behind
    the nearest point landing in the same pixel.
    """
    height, width = views.depth_nhw.shape[1:]
    uv, z = geometry.project(points_n3, views.K_map[row], views.R[row], views.T[row])
    fx, fy = uv[:, 0] - 0.5, uv[:, 1] - 0.5  # continuous pixel-index coordinates
    inside = (z > 0) & (fx >= 0) & (fx <= width - 1) & (fy >= 0) & (fy <= height - 1)
    fx, fy, z = fx[inside], fy[inside], z[inside]
    if zbuffer and len(z):
        pixel = np.round(fy).astype(np.int64) * width + np.round(fx).astype(np.int64)
        nearest = np.full(height * width, np.inf)
        np.minimum.at(nearest, pixel, z)
        front = z <= nearest[pixel] * 1.01
        fx, fy, z = fx[front], fy[front], z[front]
    c0 = np.minimum(np.floor(fx).astype(np.int64), width - 2) if width > 1 else np.zeros(len(fx), np.int64)
    r0 = np.minimum(np.floor(fy).astype(np.int64), height - 2) if height > 1 else np.zeros(len(fy), np.int64)
    c1, r1 = np.minimum(c0 + 1, width - 1), np.minimum(r0 + 1, height - 1)
    wx, wy = fx - c0, fy - r0
    value, usable = views.read_block(row, r0, c0)  # [n, 4]: (r0, c0), (r0, c1), (r1, c0), (r1, c1)
    d00, d01, d10, d11 = value.T
    good = usable.all(axis=1)
    valid = views.valid_nhw[row]
    raw_good = valid[r0, c0] & valid[r0, c1] & valid[r1, c0] & valid[r1, c1]
    views.count_rejected(row, int(raw_good.sum()), int(good.sum()))
    x = (d00 * (1 - wx) + d01 * wx) * (1 - wy) + (d10 * (1 - wx) + d11 * wx) * wy
    return x[good], z[good]


def sparse_samples(views: _Views, sparse: io.Record, cfg: Config) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per view: the SfM points whose track includes it, projected with its pose."""
    points = np.asarray(sparse["points"], dtype=np.float64)
    if len(points) == 0:
        raise InputError(f"{sparse.path}: no sparse points; rerun nvf poses, or align with --reference-depth")
    offsets = np.asarray(sparse["track_offsets"], dtype=np.int64)
    track_point = np.repeat(np.arange(len(points)), np.diff(offsets))  # [M] point of each observation
    track_image = np.asarray(sparse["track_images"], dtype=np.int64)
    sparse_row = {name: i for i, name in enumerate(sparse.names)}
    rng = np.random.default_rng(cfg.seed)
    samples, observed = [], 0
    for row, name in enumerate(views.names):
        seen = np.unique(track_point[track_image == sparse_row.get(name, -1)])
        observed += len(seen)
        samples.append(_sample_points(views, row, points[_subsample(seen, cfg.max_samples, rng)], zbuffer=False))
    if not observed:  # (observed points that every map's prefilter rejects leave their views unfitted instead)
        raise InputError(
            f"{sparse.path}: none of its {len(points)} points is observed in a view of the depth record "
            "(no names in common?); rerun nvf poses on the same images"
        )
    return samples


def view_samples(
    views: _Views, reference_row: int, z_ref_hw: np.ndarray, cfg: Config
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per view: the reference view's z-depth back-projected and projected in, nearest per pixel."""
    rng = np.random.default_rng(cfg.seed)
    height, width = z_ref_hw.shape
    good = np.flatnonzero(np.isfinite(z_ref_hw) & (z_ref_hw > 0))
    chosen = np.zeros(height * width, dtype=bool)
    chosen[_subsample(good, cfg.max_samples, rng)] = True
    points = geometry.backproject(
        z_ref_hw,
        views.K_map[reference_row],
        views.R[reference_row],
        views.T[reference_row],
        chosen.reshape(height, width),
    )
    points = np.asarray(points, dtype=np.float64)
    return [
        (np.zeros(0), np.zeros(0)) if row == reference_row else _sample_points(views, row, points, zbuffer=True)
        for row in range(len(views.names))
    ]


def depth_samples(views: _Views, reference: io.Record, cfg: Config) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per view: the reference z-depth pixel by pixel (resampled nearest to the prediction's size)."""
    kind = io.depth_kind(reference)
    if kind != "depth":
        raise InputError(f"{reference.path}: a reference must hold z-depth, not {kind}")
    ref_row = {name: i for i, name in enumerate(reference.names)}
    missing = [name for name in views.names if name not in ref_row]
    if missing:
        raise InputError(f"{reference.path}: no reference depth for view(s) {', '.join(missing[:3])}; "
                         "pass the reference record of the same capture")  # fmt: skip
    ref = np.asarray(reference["depth"], dtype=np.float64)[[ref_row[name] for name in views.names]]
    height, width = views.depth_nhw.shape[1:]
    lines = ((np.arange(height) + 0.5) * ref.shape[1] / height).astype(np.int64)  # nearest, centre to centre
    cols = ((np.arange(width) + 0.5) * ref.shape[2] / width).astype(np.int64)
    ref = ref[:, lines][:, :, cols]  # [N, H, W]
    rng = np.random.default_rng(cfg.seed)
    samples = []
    for row in range(len(views.names)):
        flat = np.flatnonzero(views.valid_nhw[row] & np.isfinite(ref[row]) & (ref[row] > 0))
        flat = _subsample(flat, cfg.max_samples, rng)
        value, usable = views.read_at(row, flat // width, flat % width)
        views.count_rejected(row, len(flat), int(usable.sum()))
        samples.append((value[usable], ref[row].reshape(-1)[flat[usable]]))
    return samples


def _sample_mask(views: _Views, work: Path, capture: str) -> np.ndarray:
    """[N, H, W] bool: the valid pixels inside each view's head mask (a view whose head mask holds
    no valid pixel keeps all its valid pixels, with a warning)."""
    found = headmasks.work_head_masks(work, capture, views.names, views.depth_nhw.shape[1:])
    if found is None:
        return views.valid_nhw
    inside = views.valid_nhw & found[0]
    empty = ~inside.any(axis=(1, 2))
    if empty.any():
        log.warning("align: %s: %d view(s) have no valid pixel in their head mask and are sampled unmasked: %s",
                    capture, int(empty.sum()), ", ".join(np.asarray(views.names)[empty][:5]))  # fmt: skip
        inside[empty] = views.valid_nhw[empty]
    return inside


def _image_hw(record: io.Record) -> np.ndarray:
    """Each view's image size [N, 2] (the depth record's image_hw, else the map size)."""
    if "image_hw" in record.tensors:
        return np.asarray(record["image_hw"], dtype=np.int64)
    return np.tile(np.asarray(record["depth"].shape[1:], dtype=np.int64), (len(record.names), 1))


def _load_views(record: io.Record, poses_path: Path | None, capture: str) -> _Views:
    """The depth record's views, checked (NaN, all invalid), with their poses when asked."""
    depth = np.asarray(record["depth"], dtype=np.float64)  # [N, H, W]
    nan_views = [name for name, view in zip(record.names, depth, strict=False) if np.isnan(view).any()]
    if nan_views:
        raise InputError(f"{record.path}: NaN in the depth of {len(nan_views)} view(s) (e.g. {nan_views[0]}); "
                         "rerun nvf depth with --overwrite (and --precision fp32)")  # fmt: skip
    valid = np.isfinite(depth) & (depth > 0)
    if "mask" in record.tensors:  # a foreground mask stored with the depth
        valid &= np.asarray(record["mask"]).astype(bool).reshape(depth.shape)
    if not valid.any():
        raise InputError(f"{record.path}: every depth pixel is invalid (<= 0 or not finite); rerun nvf depth")
    image_hw = _image_hw(record)
    names = list(record.names)
    if poses_path is None:
        return _Views(names, depth, valid, None, None, None)
    poses = io.load_record(poses_path, kind="poses", capture=capture)
    pose_row = {name: i for i, name in enumerate(poses.names)}
    keep = [i for i, name in enumerate(names) if name in pose_row]
    if not keep:
        raise InputError(f"{poses_path}: none of the {len(names)} depth views has a pose (names differ); "
                         "run nvf poses and nvf depth on the same images")  # fmt: skip
    if len(keep) < len(names):
        log.warning("align: %s: %d view(s) without a pose are left out", capture, len(names) - len(keep))
    rows = [pose_row[names[i]] for i in keep]
    poses_hw = np.stack([poses["height"][rows], poses["width"][rows]], axis=1).astype(np.int64)
    if not np.array_equal(poses_hw, image_hw[keep]):
        bad = int(np.flatnonzero((poses_hw != image_hw[keep]).any(axis=1))[0])
        raise InputError(
            f"{record.path} and {poses_path} disagree on the size of {names[keep[bad]]} "
            f"({image_hw[keep][bad][1]}x{image_hw[keep][bad][0]} vs {poses_hw[bad][1]}x{poses_hw[bad][0]}); "
            "they were made from different images: rerun the stage with the stale output"
        )
    map_h, map_w = depth.shape[1:]
    to_map = np.zeros((len(keep), 3, 3))
    to_map[:, 0, 0] = map_w / poses_hw[:, 1]
    to_map[:, 1, 1] = map_h / poses_hw[:, 0]
    to_map[:, 2, 2] = 1.0
    K_map = to_map @ np.asarray(poses["K"], dtype=np.float64)[rows]
    return _Views([names[i] for i in keep], depth[keep], valid[keep], K_map,
                  np.asarray(poses["R"], dtype=np.float64)[rows],
                  np.asarray(poses["T"], dtype=np.float64)[rows])  # fmt: skip
