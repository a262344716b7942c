"""Figures of `nvf evaluate`: pose top views, depth maps, the GT contact sheet, clouds rendered from
their own cameras, and a contact sheet of generated views captioned with their closed-loop and identity scores."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.core import geometry, io
from stages.evaluate.common import view_azimuth_deg
from stages.evaluate.generated import _frames

if TYPE_CHECKING:
    from stages.evaluate.poses import PoseResult


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


RENDER_AZIMUTHS_DEG = (0.0, 60.0)  # the capture cameras nearest these are the cloud's render views


def splat_points(points_n3: np.ndarray, colors_n3: np.ndarray | None, K: np.ndarray, R: np.ndarray, T: np.ndarray,
                 height: int, width: int, radius: int = 1) -> np.ndarray:  # fmt: skip
    """The points seen by camera (K, R, T) as an RGB image [H, W, 3] in 0..1 on white: each point a
    (2 radius + 1)² square, the nearest point winning every pixel (a z-buffer, not draw order)."""
    image = np.ones((height, width, 3))
    uv, z = geometry.project(points_n3, K, R, T)
    colors = np.full((len(points_n3), 3), 0.3) if colors_n3 is None else np.asarray(colors_n3, np.float64)
    front = z > 0
    uv, z, colors = uv[front], z[front], colors[front]
    offsets = range(-radius, radius + 1)
    cols = np.concatenate([np.floor(uv[:, 0]).astype(np.int64) + dx for dy in offsets for dx in offsets])
    rows = np.concatenate([np.floor(uv[:, 1]).astype(np.int64) + dy for dy in offsets for dx in offsets])
    depth = np.tile(z, len(offsets) ** 2)
    source = np.tile(np.arange(len(z)), len(offsets) ** 2)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    flat, depth, source = (rows * width + cols)[inside], depth[inside], source[inside]
    order = np.lexsort((depth, flat))  # by pixel, then nearest first
    pixels, first = np.unique(flat[order], return_index=True)
    image.reshape(-1, 3)[pixels] = colors[source[order][first]]
    return image


def cloud_renders(clouds: dict[str, Path], max_captures: int = 3) -> list[tuple[str, str, np.ndarray]]:
    """(capture, view name, image) renders of each cloud.ply from the capture cameras nearest
    RENDER_AZIMUTHS_DEG, where a poses.safetensors lies beside the cloud (an nvf work tree)."""
    renders = []
    for capture, path in list(clouds.items())[:max_captures]:
        poses_path = path.parent / "poses.safetensors"
        if path.suffix != ".ply" or not poses_path.is_file():
            continue
        cloud = io.read_ply(path)
        poses = io.load_record(poses_path, kind="poses")
        azimuths = np.array([view_azimuth_deg(name, R) for name, R in zip(poses.names, poses["R"])], dtype=float)
        if not np.isfinite(azimuths).any():
            continue
        picked: list[int] = []
        for target in RENDER_AZIMUTHS_DEG:
            row = int(np.nanargmin(np.abs(np.abs(azimuths) - target)))
            if row not in picked:
                picked.append(row)
        for row in picked:
            height, width = int(poses["height"][row]), int(poses["width"][row])
            image = splat_points(cloud.points, cloud.colors, poses["K"][row], poses["R"][row], poses["T"][row],
                                 height, width, radius=max(1, round(max(height, width) / 256)))  # fmt: skip
            renders.append((capture, f"{poses.names[row]} ({azimuths[row]:+.0f}°)", image))
    return renders


def plot_cloud_renders(renders: list[tuple[str, str, np.ndarray]], path: Path) -> Path:
    fig = _new_figure(3.2 * len(renders), 3.6)
    for k, (capture, view, image) in enumerate(renders):
        ax = fig.add_subplot(1, len(renders), k + 1)
        ax.imshow(image)
        ax.set_title(f"{capture}\nfrom {view}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    return path


def generated_sheet(views: Path, closed_loop: dict | None, identity: dict | None) -> list[tuple[str, np.ndarray, str]]:
    """(name, image, caption) of the input photo then each generated view of an nvf sample folder,
    captioned with its requested azimuth, closed-loop rotation error and dlib / CLIP identity."""
    paths, azimuths, inputs = _frames(Path(views))
    loop = {row["name"]: row for row in (closed_loop or {}).get("per_view", [])}
    ident = {row["name"]: row for row in (identity or {}).get("per_view", [])}
    sheet = []
    for image_path, azimuth in zip(paths, azimuths):
        name = image_path.name
        lines = ["input photo" if name in inputs else f"az {azimuth:+.0f}°" if azimuth is not None else name]
        row = loop.get(name, {})
        if "rotation_error_deg" in row and _finite(row["rotation_error_deg"]):
            lines.append(f"loop {row['rotation_error_deg']:.1f}°")
        elif closed_loop is not None and name not in inputs:
            lines.append("loop: not registered" if row.get("registered") is False else "loop: n/a")
        scores = ident.get(name, {})
        if "face_found" in scores:
            distance = scores.get("dlib_i2o_distance")
            lines.append("no face" if not scores["face_found"] else f"dlib d {distance:.2f}" if _finite(distance)
                         else "face")  # fmt: skip
        if _finite(scores.get("clip_i2o_cos")):
            lines.append(f"clip {scores['clip_i2o_cos']:.2f}")
        sheet.append((name, io.read_image(image_path).astype(np.float64) / 255.0, "\n".join(lines)))
    return sheet


def plot_generated_sheet(sheet: list[tuple[str, np.ndarray, str]], path: Path, per_row: int = 7) -> Path:
    rows = math.ceil(len(sheet) / per_row)
    fig = _new_figure(1.9 * min(per_row, len(sheet)), 2.5 * rows)
    for k, (_, image, caption) in enumerate(sheet):
        ax = fig.add_subplot(rows, min(per_row, len(sheet)), k + 1)
        ax.imshow(np.clip(image, 0, 1))
        ax.set_title(caption, fontsize=6)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _finite(value: Any) -> bool:
    return isinstance(value, float | int) and math.isfinite(value)
