"""PLY point clouds (points, colours, normals): written by numpy, read through Open3D."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.core.errors import InputError
from stages.core.io.atomic import atomic_path


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
