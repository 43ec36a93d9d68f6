"""Context decoupling augmentation (Su et al., ICCV 2021): objects cut out of some training
images by earlier labels and pasted onto others, so that a class stops being recognised by
its usual surroundings (a boat by its water).

The rules are those of the authors' released code: an image gives an object only when its
label map holds exactly one foreground class covering 10-70 % of the image (the object is
that class's pixels, cropped to their box); an image being augmented receives one object of
a class it does not contain, rotated by an angle in [-90, 90] degrees, shrunk to fit within
70 % of the image's height and width, at a random place; its tags gain that class.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from wsseg.class_ids import BACKGROUND, IGNORE
from wsseg.data.images import read_label_png
from wsseg.data.voc import VOCDataset
from wsseg.errors import UserError

MIN_SHARE, MAX_SHARE = 0.1, 0.7  # the object's share of its image
MAX_SIDE = 0.7  # a pasted object spans at most this share of the image's height and width
MAX_ANGLE = 90  # degrees


@dataclass(frozen=True)
class CutOut:
    """One object: `rgb` (h, w, 3) uint8 and `mask` (h, w) bool, cropped to the mask's box."""

    rgb: np.ndarray
    mask: np.ndarray
    class_index: int  # 0-based foreground class


def cut_object(image: np.ndarray, labels: np.ndarray) -> CutOut | None:
    """The object an image gives under CDA's rule, or None: exactly one foreground class in
    `labels` ((H, W) class ids, 255 ignored), covering 10-70 % of the image."""
    classes = [int(c) for c in np.unique(labels) if c not in (BACKGROUND, IGNORE)]
    if len(classes) != 1:
        return None
    mask = labels == classes[0]
    if not MIN_SHARE <= mask.mean() <= MAX_SHARE:
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return CutOut(np.ascontiguousarray(image[box]), np.ascontiguousarray(mask[box]), classes[0] - 1)


def paste(image: np.ndarray, cut: CutOut, rng: np.random.Generator) -> np.ndarray:
    """`image` (H, W, 3) uint8 with `cut` rotated, shrunk to fit and pasted at a random place."""
    angle = float(rng.integers(-MAX_ANGLE, MAX_ANGLE + 1))
    rgb = ndimage.rotate(cut.rgb, angle, axes=(1, 0), order=1, reshape=True)
    mask = ndimage.rotate(cut.mask.astype(np.uint8), angle, axes=(1, 0), order=0, reshape=True) > 0
    height, width = image.shape[:2]
    scale = min(1.0, MAX_SIDE * height / mask.shape[0], MAX_SIDE * width / mask.shape[1])
    if scale < 1.0:
        rgb = ndimage.zoom(rgb, (scale, scale, 1), order=1)
        mask = ndimage.zoom(mask.astype(np.uint8), scale, order=0) > 0
    h, w = mask.shape
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    out = image.copy()
    region = out[top : top + h, left : left + w]
    region[mask] = rgb[mask]
    return out


class ObjectBank:
    """The cut-outs of a set of training images, by class, from a folder of label maps."""

    def __init__(self, objects: Sequence[CutOut], num_classes: int) -> None:
        self.by_class: list[list[CutOut]] = [[] for _ in range(num_classes)]
        for cut in objects:
            self.by_class[cut.class_index].append(cut)

    @classmethod
    def from_labels(cls, voc: VOCDataset, ids: Sequence[str], label_dir: str | Path) -> "ObjectBank":
        """Objects of the images `ids` whose `<label_dir>/<id>.png` exists (e.g. an earlier run's
        labels/semantic). UserError when the folder is missing or yields no object at all."""
        folder = Path(label_dir)
        if not folder.is_dir():
            raise UserError(f"cam.context_decoupling: {folder} is not a folder; give the semantic labels of an "
                            f"earlier run, e.g. runs/demo/labels/semantic")
        objects = []
        for image_id in ids:
            path = folder / f"{image_id}.png"
            if path.is_file():
                cut = cut_object(voc.read_image(image_id), read_label_png(path))
                if cut is not None:
                    objects.append(cut)
        if not objects:
            raise UserError(f"cam.context_decoupling: no label map in {folder} of an image of data.train_list holds "
                            f"exactly one class covering 10-70 % of it; there is nothing to cut out")
        return cls(objects, voc.num_classes)

    def counts(self) -> list[int]:
        return [len(objects) for objects in self.by_class]

    def decouple(self, image: np.ndarray, tags: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """`image` with an object of a class its multi-hot `tags` (C,) lack pasted in, and the tags
        with that class; unchanged when the bank has no such class."""
        absent = [k for k, objects in enumerate(self.by_class) if objects and tags[k] < 0.5]
        if not absent:
            return image, tags
        k = absent[int(rng.integers(len(absent)))]
        cut = self.by_class[k][int(rng.integers(len(self.by_class[k])))]
        tags = tags.copy()
        tags[k] = 1.0
        return paste(image, cut, rng), tags
