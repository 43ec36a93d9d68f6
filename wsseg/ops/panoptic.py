"""Panoptic labels from instance labels, and COCO panoptic's RGB id encoding (pure numpy).

wsseg's panoptic labels (docs/ALGORITHMS.md §1.6): every instance is a "thing" segment with
its class as category; all remaining pixels form one "stuff" segment of category 0
(background). Segment ids are encoded in PNGs as id = R + 256·G + 256²·B, 0 = VOID.
"""

from __future__ import annotations

import numpy as np

BACKGROUND_CATEGORY = 0


def encode_ids(ids: np.ndarray) -> np.ndarray:
    """(H, W) int segment ids -> (H, W, 3) uint8 RGB (COCO panoptic)."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.min(initial=0) < 0 or ids.max(initial=0) >= 256**3:
        raise ValueError("segment ids must be in [0, 256^3)")
    return np.stack([ids % 256, (ids // 256) % 256, ids // 256**2], axis=-1).astype(np.uint8)


def decode_ids(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) int64 segment ids."""
    rgb = np.asarray(rgb, dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def panoptic_from_instances(instance_ids: np.ndarray, classes: np.ndarray, void: np.ndarray | None = None
                            ) -> tuple[np.ndarray, list[dict]]:
    """Instance map -> (segment ids (H, W) int64, segments_info).

    instance_ids (H, W) int: 0 = none, k = instance k (1-based, classes[k-1] its 1-based class).
    void: optional (H, W) bool of pixels that belong to no segment (id 0).
    Segment k keeps id k; the background stuff segment gets id M+1. Empty segments are left out.
    """
    instance_ids = np.asarray(instance_ids, dtype=np.int64)
    count = len(classes)
    segments = np.where(instance_ids > 0, instance_ids, count + 1)
    if void is not None:
        segments = np.where(void, 0, segments)
    areas = np.bincount(segments.ravel(), minlength=count + 2)
    info = []
    for index in range(1, count + 1):
        if areas[index] > 0:
            info.append({"id": index, "category_id": int(classes[index - 1]), "iscrowd": 0, "area": int(areas[index]),
                         "isthing": 1})
    if areas[count + 1] > 0:
        info.append({"id": count + 1, "category_id": BACKGROUND_CATEGORY, "iscrowd": 0, "area": int(areas[count + 1]),
                     "isthing": 0})
    return segments, info
