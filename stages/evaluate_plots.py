"""Figures of `nvf evaluate` beyond the metric tables: clouds rendered from their own cameras, and a
contact sheet of generated views captioned with their closed-loop and identity scores."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from stages.core import geometry, io

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
    from stages.evaluate import view_azimuth_deg  # (evaluate imports this module)

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
    from stages.evaluate import _new_figure

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
    from stages.evaluate_views import _frames

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
    from stages.evaluate import _new_figure

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
