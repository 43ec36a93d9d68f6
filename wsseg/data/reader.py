"""What every dataset layout's reader shares (voc.py, folder.py, coco.py): depth maps and image headers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from wsseg.data.images import read_depth_png, too_large
from wsseg.errors import UserError


def header_size(path: Path, missing: str) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels; `missing` says what to do
    when the file is not there."""
    if not path.is_file():
        raise UserError(f"{path}: file not found; {missing}")
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:
        raise UserError(too_large(path, error)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{path}: cannot read the image ({error}); replace the file or remove it from the list") from None
    return height, width


class DepthMaps:
    """The optional depth maps of a dataset (`data.depth_dir`: <id>.png, 16-bit, relative to the root or absolute)."""

    root: Path
    depth_dir: Path | None = None

    def set_depth_dir(self, depth_dir: str | None) -> None:
        self.depth_dir = None if depth_dir is None else Path(depth_dir) if Path(depth_dir).is_absolute() else self.root / depth_dir

    def depth_path(self, image_id: str) -> Path:
        if self.depth_dir is None:
            raise UserError("data.depth_dir: not set; point it at the folder of 16-bit depth PNGs, one <id>.png per image "
                            "(relative to data.root or absolute)")
        return self.depth_dir / f"{image_id}.png"

    def read_depth(self, image_id: str) -> np.ndarray:
        """(H, W) uint16 depth of the image from `depth_dir`: larger = farther, 0 = no reading."""
        path = self.depth_path(image_id)
        if not path.is_file():
            raise UserError(f"data.depth_dir: depth image {path} not found; every image needs its depth map there "
                            f"as <id>.png (16-bit, larger = farther, 0 = no reading)")
        return read_depth_png(path)
