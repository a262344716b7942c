"""Images: RGB uint8 with EXIF orientation applied, alpha, grey, header sizes; atomic writes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stages.core.errors import InputError
from stages.core.io.atomic import atomic_path

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


def image_hw(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) after EXIF orientation, reading only the header (`image_size` in array order)."""
    width, height = image_size(path)
    return int(height), int(width)


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
