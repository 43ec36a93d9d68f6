"""Image and label-map transforms on numpy arrays (docs/ALGORITHMS.md §1.1, §1.5, §2).

Images are (H, W, 3): uint8 before `normalize`, float32 after. Depth maps are (H, W) uint16
before `normalize_depth` (larger = farther, 0 = no reading), float32 after. Label maps are (H, W)
integer arrays (uint8 class ids, uint16 instance ids, ...). Every random transform takes
an explicit `rng: np.random.Generator` and no global random state, so a data item's
augmentation is a function of its generator alone.

`labels` arguments are `None`, one label map, or a tuple/list of label maps that must
move with the image (e.g. semantic + instance); the result has the same form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# ImageNet statistics of RGB on [0, 1] (torchvision's, which the pretrained backbones expect).
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# Depth (RGB-D segmenters): PNG units per metre (millimetres: NYU Depth v2, SUN RGB-D, the demo) and
# the mean and standard deviation in metres of ACNet's NYUv2 training depth (the authors' code).
DEPTH_UNITS_PER_METRE = 1000.0
DEPTH_MEAN_METRES = 2.8424503515351494
DEPTH_STD_METRES = 0.9932836506164299

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}

Labels = Any  # None | np.ndarray | tuple/list of np.ndarray


def _map_labels(labels: Labels, function: Callable[[np.ndarray, int], np.ndarray]) -> Labels:
    """Apply `function(label_map, position)` to each label map, keeping the form of `labels`."""
    if labels is None:
        return None
    if isinstance(labels, (tuple, list)):
        return type(labels)(function(np.asarray(label), index) for index, label in enumerate(labels))
    return function(np.asarray(labels), 0)


def normalize(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) float32, (x / 255 - mean) / std."""
    return ((np.asarray(image, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def normalize_depth(depth: np.ndarray) -> np.ndarray:
    """(H, W) uint16 depth -> (H, W) float32: metres (value / 1000) standardised with ACNet's NYUv2
    mean and std, (d - 2.842) / 0.993. A pixel without a reading (0) becomes 0, the mean depth: the
    value the crops' padding gets too, so "no reading" and "outside the image" look alike and
    neither looks like a very near surface."""
    depth = np.asarray(depth)
    metres = depth.astype(np.float32) / DEPTH_UNITS_PER_METRE
    standard = (metres - DEPTH_MEAN_METRES) / DEPTH_STD_METRES
    return np.where(depth > 0, standard, 0.0).astype(np.float32)


def denormalize(image: np.ndarray) -> np.ndarray:
    """Inverse of `normalize`: (H, W, 3) float32 -> (H, W, 3) uint8 (rounded, clipped)."""
    rgb = (np.asarray(image, dtype=np.float32) * IMAGENET_STD + IMAGENET_MEAN) * 255.0
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, size_hw: tuple[int, int], method: str = "bicubic") -> np.ndarray:
    """Resize an (H, W, 3) uint8 image (or (H, W[, K]) float32 planes) to `size_hw` = (h, w) with PIL.

    uint8 stays uint8 (PIL clips bicubic overshoot); float planes are resized one by one.
    """
    if method not in _RESAMPLE:
        raise ValueError(f"method must be one of {sorted(_RESAMPLE)}, got {method!r}")
    height, width = int(size_hw[0]), int(size_hw[1])
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size_hw}")
    image = np.asarray(image)
    if image.shape[:2] == (height, width):
        return image.copy()
    resample = _RESAMPLE[method]
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize((width, height), resample)).copy()
    planes = image.astype(np.float32)
    if planes.ndim == 2:
        return np.asarray(Image.fromarray(planes).resize((width, height), resample)).copy()
    resized = [np.asarray(Image.fromarray(np.ascontiguousarray(planes[:, :, k])).resize((width, height), resample))
               for k in range(planes.shape[2])]
    return np.stack(resized, axis=2)


def resize_labels(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W[, ...]) label map of any dtype to `size_hw`.

    Output pixel i samples input pixel floor((i + 0.5) · H / h), the pixel whose area
    contains its centre (PIL's NEAREST rule), so ids are never blended.
    """
    labels = np.asarray(labels)
    height, width = int(size_hw[0]), int(size_hw[1])
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size_hw}")
    in_height, in_width = labels.shape[:2]
    # Integer arithmetic: exact at ties (a centre on a pixel edge takes the lower-right pixel, as PIL).
    rows = (2 * np.arange(height, dtype=np.int64) + 1) * in_height // (2 * height)
    cols = (2 * np.arange(width, dtype=np.int64) + 1) * in_width // (2 * width)
    return labels[rows[:, None], cols[None, :]]


def _rescale(image: np.ndarray, labels: Labels, size_hw: tuple[int, int], method: str) -> tuple[np.ndarray, Labels]:
    resized_labels = _map_labels(labels, lambda label, _: resize_labels(label, size_hw))
    return resize_image(image, size_hw, method), resized_labels


def random_resize_long(
    image: np.ndarray, labels: Labels, low: int, high: int, rng: np.random.Generator, method: str = "bicubic"
) -> tuple[np.ndarray, Labels]:
    """Rescale so the long side is a uniform integer in [low, high] (IRN train-cam: 320-640, bicubic)."""
    target_long = int(rng.integers(low, high + 1))
    height, width = np.asarray(image).shape[:2]
    scale = target_long / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return _rescale(image, labels, size, method)


def random_scale(
    image: np.ndarray, labels: Labels, low: float, high: float, rng: np.random.Generator, method: str = "bicubic"
) -> tuple[np.ndarray, Labels]:
    """Rescale by a factor uniform in [low, high] (IRN train-irn: 0.5-1.5; segmenters: 0.5-2.0)."""
    scale = float(rng.uniform(low, high))
    height, width = np.asarray(image).shape[:2]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return _rescale(image, labels, size, method)


def random_flip(image: np.ndarray, labels: Labels, rng: np.random.Generator) -> tuple[np.ndarray, Labels]:
    """Mirror left-right with probability 1/2 (always draws one number from `rng`)."""
    if rng.random() < 0.5:
        flipped = np.ascontiguousarray(np.asarray(image)[:, ::-1])
        return flipped, _map_labels(labels, lambda label, _: np.ascontiguousarray(label[:, ::-1]))
    return image, labels


def _crop_offsets(size: int, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """(offset in the source, offset on the canvas) along one axis."""
    space = size - crop
    if space >= 0:
        return int(rng.integers(0, space + 1)), 0
    return 0, int(rng.integers(0, -space + 1))


def random_crop(
    image: np.ndarray,
    labels: Labels,
    crop_size: int | tuple[int, int],
    rng: np.random.Generator,
    label_fill: int | tuple[int, ...] = 255,
    image_fill: float = 0.0,
) -> tuple[np.ndarray, Labels, tuple[int, int, int, int]]:
    """A crop_size canvas: larger images are cropped at a random offset, smaller ones sit at one.

    As in IRN, the image is padded with `image_fill` (0 after normalisation = the mean
    colour) and labels with `label_fill` (255 = ignore; one value, or one per label map).
    Returns (image, labels, box) where box = (top, left, height, width) is the part of the
    canvas that holds image content.
    """
    crop_h, crop_w = (crop_size, crop_size) if np.isscalar(crop_size) else (int(crop_size[0]), int(crop_size[1]))
    image = np.asarray(image)
    height, width = image.shape[:2]
    source_top, canvas_top = _crop_offsets(height, crop_h, rng)
    source_left, canvas_left = _crop_offsets(width, crop_w, rng)
    valid_h, valid_w = min(crop_h, height), min(crop_w, width)

    def place(array: np.ndarray, fill: float) -> np.ndarray:
        canvas = np.full((crop_h, crop_w) + array.shape[2:], fill, dtype=array.dtype)
        canvas[canvas_top : canvas_top + valid_h, canvas_left : canvas_left + valid_w] = array[
            source_top : source_top + valid_h, source_left : source_left + valid_w
        ]
        return canvas

    def place_label(label: np.ndarray, index: int) -> np.ndarray:
        fill = label_fill[index] if isinstance(label_fill, (tuple, list)) else label_fill
        return place(label, fill)

    return place(image, image_fill), _map_labels(labels, place_label), (canvas_top, canvas_left, valid_h, valid_w)


@dataclass(frozen=True)
class ClassificationAugment:
    """train-cam augmentation (IRN, docs/ALGORITHMS.md §1.1): `(uint8 image, rng) -> float32 (crop, crop, 3)`.

    Random long side in `resize_long` (bicubic), flip, normalise, random crop on a zero
    (= mean colour) canvas. `resize_long=None` keeps the size, `crop_size=None` skips the crop.
    """

    resize_long: tuple[int, int] | None = (320, 640)  # IRN: long side uniform in 320-640 px
    crop_size: int | None = 512  # IRN: 512 px
    flip: bool = True

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.resize_long is not None:
            image, _ = random_resize_long(image, None, self.resize_long[0], self.resize_long[1], rng)
        if self.flip:
            image, _ = random_flip(image, None, rng)
        image = normalize(image)
        if self.crop_size is not None:
            image, _, _ = random_crop(image, None, self.crop_size, rng)
        return image


@dataclass(frozen=True)
class SegmentationAugment:
    """train-irn / segmenter augmentation: `(uint8 image, uint8 label, rng) -> (float32 image, label)`.

    Random rescale in `scale_range`, flip, normalise, random crop (image padded with 0 =
    mean colour, label with 255 = ignore). `scale_range=None` keeps the size,
    `crop_size=None` skips the crop.

    With `depth` ((H, W) uint16, RGB-D segmenters) it returns (image, label, float32 depth): the
    depth moves with the label (the same rescale, nearest neighbour as ACNet's code, so no
    depth is invented between a surface and what lies behind it, and 0 = no reading stays 0;
    the same flip and crop, padded with 0 = no reading), then `normalize_depth`. The random
    draws are the same with and without depth.
    """

    scale_range: tuple[float, float] | None = (0.5, 1.5)  # IRN train-irn; segmenters use 0.5-2.0
    crop_size: int | None = 512  # IRN: 512; DeepLab v2 (WSSS recipe) 321, v3 513
    flip: bool = True
    method: str = "bicubic"  # IRN rescales images bicubic; segmenter toolboxes use bilinear

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator,
                 depth: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        labels = label if depth is None else (label, depth)
        if self.scale_range is not None:
            image, labels = random_scale(image, labels, self.scale_range[0], self.scale_range[1], rng, self.method)
        if self.flip:
            image, labels = random_flip(image, labels, rng)
        image = normalize(image)
        if self.crop_size is not None:
            image, labels, _ = random_crop(image, labels, self.crop_size, rng, label_fill=255 if depth is None else (255, 0))
        if depth is None:
            return image, labels
        return image, labels[0], normalize_depth(labels[1])
