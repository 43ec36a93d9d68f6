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


VOID_INSTANCE = 65535  # instance id of void pixels in every reader's instance maps


def without_gaps(ids: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An instance map (uint16: 1..M instances, 65535 void) and its classes (M,), renumbered 1..K over
    the K instances that still have pixels (in their order), when some have none."""
    kept = np.unique(ids[(ids > 0) & (ids != VOID_INSTANCE)])
    if len(kept) == len(classes):
        return ids, classes
    renumber = np.zeros(VOID_INSTANCE + 1, dtype=np.uint16)
    renumber[VOID_INSTANCE] = VOID_INSTANCE
    renumber[kept] = np.arange(1, len(kept) + 1, dtype=np.uint16)
    return renumber[ids], classes[kept.astype(np.int64) - 1]


def scaled_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(H, W) with the long side brought down to `max_side` (aspect kept, rounded); unchanged when it fits."""
    height, width = size
    if max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


class Downscaled:
    """A dataset reader whose images have their long side brought down to `max_side` on read
    (`data.max_side`): the image antialiased (PIL's bicubic, a filter as wide as the reduction),
    its masks and depth map nearest-neighbour, so that every stage works at the smaller size.
    `original_size` gives the file's size, for exports that map the labels back. Everything else
    (tags, lists, which images have masks) is the wrapped reader's."""

    def __init__(self, dataset, max_side: int) -> None:
        self.dataset = dataset
        self.max_side = int(max_side)

    def __getattr__(self, name: str):
        return getattr(self.dataset, name)

    def original_size(self, image_id: str) -> tuple[int, int]:
        return self.dataset.image_size(image_id)

    def image_size(self, image_id: str) -> tuple[int, int]:
        return scaled_size(self.dataset.image_size(image_id), self.max_side)

    def read_image(self, image_id: str) -> np.ndarray:
        from wsseg.data.transforms import resize_image

        image = self.dataset.read_image(image_id)
        size = scaled_size(image.shape[:2], self.max_side)
        return image if size == image.shape[:2] else resize_image(image, size, "bicubic")

    def _nearest(self, labels: np.ndarray) -> np.ndarray:
        from wsseg.data.transforms import resize_labels

        size = scaled_size(labels.shape[:2], self.max_side)
        return labels if size == labels.shape[:2] else resize_labels(labels, size)

    def read_semantic(self, image_id: str) -> np.ndarray:
        return self._nearest(self.dataset.read_semantic(image_id))

    def read_instances(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        ids, classes = self.dataset.read_instances(image_id)
        return without_gaps(self._nearest(ids), classes)  # an instance below one pixel of the smaller image is gone

    def read_depth(self, image_id: str) -> np.ndarray:
        return self._nearest(self.dataset.read_depth(image_id))
