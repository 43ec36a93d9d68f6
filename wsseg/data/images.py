"""Reading images and label maps from disk, and writing label maps as palette PNGs.

Every reader turns a damaged or unreadable file into a `UserError` that names the file,
so a bad image in a 10,000-image list costs one clear line, not a PIL traceback.
Label maps are uint8 arrays: 0 background, 1..C classes, 255 ignore/void.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsseg.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")  # what the dataset readers take


def voc_palette(num_colors: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: (num_colors, 3) uint8; index 255 is (224, 224, 192)."""
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        value, r, g, b = index, 0, 0, 0
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette[index] = (r, g, b)
    return palette


VOC_PALETTE = voc_palette()


def too_large(path: Path, error: Exception) -> str:
    """The sentence for PIL's DecompressionBombError (an image above PIL's pixel limit, 2 x
    Image.MAX_IMAGE_PIXELS, about 179 million pixels, refused before decoding)."""
    pixels = re.search(r"\((\d+) pixels\)", str(error))
    count = int(pixels.group(1)) if pixels else None
    size = ("too many pixels" if count is None else f"{count / 1e6:.0f} million pixels" if count >= 1e6 else f"{count} pixels")
    return (f"{path}: the image has {size}, more than PIL opens ({2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} million, its "
            f"guard against decompression bombs); downscale it (e.g. to 4000 px on its long side) or leave it out of the list")


def _open(path: Path) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: file not found; check the dataset root and the image list")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: the file is empty (0 bytes); replace it or remove its id from the list")
    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here and not later
    except Image.DecompressionBombError as error:
        raise UserError(too_large(path, error)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{path}: cannot decode the image ({error}); replace the file or remove its id from the list") from None
    return image


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An RGB image as (H, W, 3) uint8. Grayscale, palette, CMYK and RGBA are converted.

    RGBA is composited over black (alpha is not part of the image content we classify).
    """
    image = _open(Path(path))
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        canvas = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(canvas, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """A label map stored as a palette (or grayscale) PNG, as (H, W) uint8 indices."""
    image = _open(Path(path))
    if image.mode not in ("P", "L"):
        raise UserError(
            f"{path}: a label map must be a palette or grayscale PNG of class indices, "
            f"found mode {image.mode}; convert it to indices (VOC palette) first"
        )
    return np.asarray(image, dtype=np.uint8).copy()


def read_depth_png(path: str | os.PathLike) -> np.ndarray:
    """A depth map stored as a 16-bit grayscale PNG, as (H, W) uint16: larger = farther, 0 = no reading.

    PIL reads such a file as mode I;16 (or I, 32-bit, for some writers: its values must fit 16 bits).
    An 8-bit or colour PNG is refused: its values are not distances.
    """
    image = _open(Path(path))
    if image.mode in ("I;16", "I;16L", "I;16B"):
        return np.asarray(image).astype(np.uint16)
    if image.mode == "I":
        values = np.asarray(image)
        if values.min() >= 0 and values.max() <= 65535:
            return values.astype(np.uint16)
    raise UserError(
        f"{path}: a depth map must be a 16-bit grayscale PNG (larger = farther, 0 = no reading), "
        f"found mode {image.mode}; write it as uint16"
    )


def write_depth_png(path: str | os.PathLike, depth: np.ndarray) -> None:
    """Write an (H, W) uint16 depth map as a 16-bit grayscale PNG (the caller makes the write atomic)."""
    depth = np.asarray(depth)
    if depth.ndim != 2 or depth.dtype != np.uint16:
        raise ValueError(f"depth map must be (H, W) uint16, got {depth.shape} {depth.dtype}")
    Image.fromarray(depth).save(path, format="PNG")


def write_label_png(path: str | os.PathLike, labels: np.ndarray, palette: np.ndarray = VOC_PALETTE) -> None:
    """Write an (H, W) uint8 label map as a palette PNG (VOC colours, readable by every VOC tool).

    The caller makes the write atomic (see `wsseg.store.atomic_path`).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.dtype != np.uint8:
        raise ValueError(f"label map must be (H, W) uint8, got {labels.shape} {labels.dtype}")
    image = Image.fromarray(labels, mode="P")
    image.putpalette(palette.astype(np.uint8).flatten().tolist())
    image.save(path, format="PNG")


def write_rgb_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 image as PNG."""
    Image.fromarray(np.asarray(rgb, dtype=np.uint8), mode="RGB").save(path, format="PNG")
