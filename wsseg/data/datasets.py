"""torch Datasets for the training stages: tagged images (train-cam), labelled images (train-irn, segmenters).

Per-item randomness comes from `np.random.default_rng([seed, epoch, index])`: an item's
augmentation depends only on the seed, the epoch (`set_epoch`) and its index, never on
the number of data-loader workers or ranks, so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from wsseg.data.transforms import normalize, normalize_depth
from wsseg.data.voc import VOCDataset
from wsseg.errors import UserError

ImageTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]
PairTransform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]


def _to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, C) float32 -> contiguous (C, H, W) float32 tensor (C = 3, or 4 with depth)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.float32).transpose(2, 0, 1)))


class _SeededItems(torch.utils.data.Dataset):
    """Holds ids, seed and epoch; `_rng(index)` is the item's own generator."""

    def __init__(self, ids: Sequence[str], seed: int) -> None:
        self.ids = list(ids)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations `__getitem__` draws (call before each epoch)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, int(index)])


def multi_hot_tags(voc: VOCDataset, image_id: str) -> np.ndarray:
    """(C,) float32: 1 for each foreground class the image is tagged with."""
    tags = np.zeros(voc.num_classes, dtype=np.float32)
    tags[voc.tags(image_id)] = 1.0
    return tags


class TaggedImages(_SeededItems):
    """Images with multi-hot tags, for train-cam.

    Item: {"id": str, "image": float32 (3, h, w), "tags": float32 (C,) multi-hot over the
    foreground classes}. `transform(uint8 image, rng) -> float32 (h, w, 3)` augments and
    normalises (e.g. `transforms.ClassificationAugment`); None only normalises. With an
    `objects` bank (data.objects.ObjectBank), a share `object_probability` of the items first
    get an object of a class they lack pasted in, and that class in their tags (CDA).
    """

    def __init__(self, voc: VOCDataset, ids: Sequence[str], transform: ImageTransform | None = None, *, seed: int = 0,
                 objects=None, object_probability: float = 0.0) -> None:
        super().__init__(ids, seed)
        self.voc = voc
        self.transform = transform
        self.objects = objects
        self.object_probability = float(object_probability)

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = self.voc.read_image(image_id)
        tags = multi_hot_tags(self.voc, image_id)
        rng = self._rng(index)
        if self.objects is not None and rng.random() < self.object_probability:
            image, tags = self.objects.decouple(image, tags, rng)
        image = normalize(image) if self.transform is None else self.transform(image, rng)
        return {"id": image_id, "image": _to_chw_tensor(image), "tags": torch.from_numpy(tags)}


class LabelledImages(_SeededItems):
    """Images with a label map, for train-irn (relation maps) and the segmenters (pseudo or true labels).

    Item: {"id": str, "image": float32 (3, h, w), "label": int64 (h, w)} (and "tags", float32 (C,)
    multi-hot, with tags=True). `label_reader(id)`
    gives the (H, W) uint8 map at the image's size (0 background, 1..C, 255 ignore);
    `transform(uint8 image, label, rng) -> (float32 (h, w, 3), label (h, w))` augments and
    normalises (e.g. `transforms.SegmentationAugment`); None only normalises.

    depth=True (RGB-D segmenters): the image's depth map (`voc.read_depth`) travels with it, the
    transform is called as `transform(image, label, rng, depth=depth)` and returns (image, label,
    float32 depth) (`SegmentationAugment` does), and "image" is (4, h, w): the normalised RGB and
    the normalised depth (`transforms.normalize_depth`) as the fourth channel.
    """

    def __init__(
        self,
        voc: VOCDataset,
        ids: Sequence[str],
        label_reader: Callable[[str], np.ndarray],
        transform: PairTransform | None = None,
        *,
        seed: int = 0,
        tags: bool = False,
        depth: bool = False,
    ) -> None:
        super().__init__(ids, seed)
        self.voc = voc
        self.label_reader = label_reader
        self.transform = transform
        self.tags = tags
        self.depth = depth

    def __getitem__(self, index: int) -> dict:
        image_id = self.ids[index]
        image = self.voc.read_image(image_id)
        label = np.asarray(self.label_reader(image_id))
        if label.shape != image.shape[:2]:
            raise UserError(
                f"label map of image {image_id} is {label.shape[1]}x{label.shape[0]} but "
                f"{self.voc.image_path(image_id)} is {image.shape[1]}x{image.shape[0]}; they must match"
            )
        if self.depth:
            depth = self.voc.read_depth(image_id)
            if depth.shape != image.shape[:2]:
                raise UserError(
                    f"depth map {self.voc.depth_path(image_id)} is {depth.shape[1]}x{depth.shape[0]} but "
                    f"{self.voc.image_path(image_id)} is {image.shape[1]}x{image.shape[0]}; they must match"
                )
            if self.transform is None:
                image, depth = normalize(image), normalize_depth(depth)
            else:
                image, label, depth = self.transform(image, label, self._rng(index), depth=depth)
            image = np.concatenate([image, depth[:, :, None]], axis=2)
        elif self.transform is None:
            image = normalize(image)
        else:
            image, label = self.transform(image, label, self._rng(index))
        item = {
            "id": image_id,
            "image": _to_chw_tensor(image),
            "label": torch.from_numpy(np.ascontiguousarray(label, dtype=np.int64)),
        }
        if self.tags:  # the image's multi-hot tags too (AMN's label encoder reads them)
            item["tags"] = torch.from_numpy(multi_hot_tags(self.voc, image_id))
        return item
