"""The views of a capture and their back-projection into one cloud (step 2; `_fuse_on` on a torch device)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.core import geometry


@dataclass
class Views:
    """The views of one capture, depth-record order: z-depth maps, K scaled to them, poses, images."""

    names: list[str]
    depth_vhw: np.ndarray  # float32 z-depth, 0 = invalid
    K_v33: np.ndarray  # intrinsics of the depth map
    R_v33: np.ndarray  # world-to-camera
    T_v3: np.ndarray
    images: list[np.ndarray] | None = None  # RGB uint8 [h, w, 3] per view (any size), or None
    quality_v: np.ndarray | None = None  # align's per-view quality flag (None: every view good)

    @property
    def centers_v3(self) -> np.ndarray:
        return geometry.camera_centers(self.R_v33, self.T_v3)


@dataclass
class Points:
    """A cloud with per-point attributes: coordinates, colours (uint8, or None) and source view."""

    points_n3: np.ndarray  # float64 world coordinates
    colors_n3: np.ndarray | None  # uint8 RGB
    view_n: np.ndarray  # int32 index into Views

    def __len__(self) -> int:
        return len(self.points_n3)

    def take(self, index: np.ndarray) -> Points:
        """The subset at `index` (integer indices or a boolean mask)."""
        return Points(self.points_n3[index], None if self.colors_n3 is None else self.colors_n3[index],
                      self.view_n[index])  # fmt: skip


def fuse_views(views: Views, mask_vhw: np.ndarray | None = None, device: Any = None) -> Points:
    """Back-project every valid pixel (depth > 0, finite, mask) of every view into one cloud.

    X = R^T (d K^-1 (u, v, 1) - T) with (u, v) the pixel centre (+0.5), by
    `geometry.backproject_views`; rows are ordered view, row, column; colours sample the image at
    the pixel centre (nearest). `device`: a CUDA `torch.device` back-projects there in float64
    (same points to ~1e-15) and brings the cloud back; None (or the CPU) uses numpy threads.
    """
    if device is not None and device.type != "cpu":
        return _fuse_on(device, views, mask_vhw)
    height, width = views.depth_vhw.shape[1:]
    found = geometry.backproject_views(views.depth_vhw, views.K_v33, views.R_v33, views.T_v3, mask_vhw)
    colors = None
    if views.images is not None:
        colors = np.empty((len(found.pixel_n), 3), dtype=np.uint8)
        bounds = np.searchsorted(found.view_n, np.arange(len(views.depth_vhw) + 1))
        for view, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            colors[start:stop] = _sample_colors(views.images[view], found.pixel_n[start:stop], height, width)
    return Points(found.points_n3, colors, found.view_n.astype(np.int32))


def _fuse_on(device: Any, views: Views, mask_vhw: np.ndarray | None) -> Points:
    """`fuse_views` on a torch device: back-projection in float64 and colour sampling run there,
    and only what the cloud keeps comes back (points [n, 3] float64, colours [n, 3] uint8); view ids
    are rebuilt on the host from per-view counts, so no per-point index crosses the bus."""
    import torch

    def put(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device, non_blocking=True)

    n_views, height, width = views.depth_vhw.shape
    depth = put(views.depth_vhw).double()
    mask = None if mask_vhw is None else put(mask_vhw)
    found = geometry.backproject_views(depth, put(views.K_v33), put(views.R_v33), put(views.T_v3), mask)
    counts = torch.bincount(found.view_n, minlength=n_views).cpu().numpy()
    view_n = np.repeat(np.arange(n_views, dtype=np.int32), counts)
    colors = None
    if views.images is not None:
        shapes = {image.shape for image in views.images}
        if len(shapes) == 1:  # one upload; the gather below is `_sample_colors` in torch
            images_vhw3 = put(np.stack(views.images))
            img_h, img_w = images_vhw3.shape[1:3]
            row, col = found.row_n, found.pixel_n % width
            if (img_h, img_w) != (height, width):
                row = ((row.double() + 0.5) * img_h / height).long().clamp_(max=img_h - 1)
                col = ((col.double() + 0.5) * img_w / width).long().clamp_(max=img_w - 1)
            colors = images_vhw3.reshape(-1, 3)[(found.view_n * img_h + row) * img_w + col].cpu().numpy()
        else:  # images of several sizes: sample on the host, view by view
            pixel_n = found.pixel_n.cpu().numpy()
            colors = np.empty((len(pixel_n), 3), dtype=np.uint8)
            bounds = np.concatenate([[0], np.cumsum(counts)])
            for view, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
                colors[start:stop] = _sample_colors(views.images[view], pixel_n[start:stop], height, width)
    return Points(found.points_n3.cpu().numpy(), colors, view_n)


def _sample_colors(image_hw3: np.ndarray, flat: np.ndarray, height: int, width: int) -> np.ndarray:
    """Image pixels [n, 3] at the centres of depth-map pixels `flat` (nearest; any image size)."""
    img_h, img_w = image_hw3.shape[:2]
    if (img_h, img_w) == (height, width):
        return image_hw3.reshape(-1, 3).take(flat, axis=0)
    rows = ((flat // width + 0.5) * img_h / height).astype(np.int64)
    cols = ((flat % width + 0.5) * img_w / width).astype(np.int64)
    return image_hw3[np.minimum(rows, img_h - 1), np.minimum(cols, img_w - 1)]
