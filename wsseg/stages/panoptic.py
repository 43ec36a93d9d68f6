"""Panoptic training data and evaluation for train-segmenter (MaX-DeepLab).

A panoptic label travels through the segmenter's augmentation as ONE int64 map:
code = 256·(1 + category) + k for the k-th segment of a category (k < 256), and any
code below 256 is void (the crop pads with 255, which stays void). Nearest-neighbour
resizing, flips and crops keep the codes intact, so the loss can rebuild each image's
segments (masks + categories) from the augmented map.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsseg.class_ids import IGNORE
from wsseg.data.images import write_rgb_png
from wsseg.data.voc import VOCDataset
from wsseg.errors import UserError
from wsseg.metrics import panoptic_headline, panoptic_quality
from wsseg.ops.panoptic import encode_ids, panoptic_from_instances
from wsseg.stages.artifacts import read_panoptic
from wsseg.store import RunStore, atomic_path, write_json

SEGMENT_BASE = 256


def encode_segments(segment_ids: np.ndarray, categories: dict[int, int]) -> np.ndarray:
    """(H, W) segment ids (0 = void) + {segment id: category} -> the (H, W) int64 code map."""
    codes = np.full(segment_ids.shape, IGNORE, np.int64)
    per_category: dict[int, int] = {}
    for segment_id in sorted(categories):
        category = categories[segment_id]
        k = per_category.get(category, 0)
        if k >= SEGMENT_BASE:
            raise UserError(f"more than {SEGMENT_BASE} segments of category {category} in one image")
        per_category[category] = k + 1
        codes[segment_ids == segment_id] = SEGMENT_BASE * (1 + category) + k
    return codes


def targets_from_codes(codes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """(B, H, W) code maps -> per image {"masks" (M,H,W) bool, "classes" (M,) int64, "void" (H,W) bool}."""
    targets = []
    for code_map in codes:
        present = torch.unique(code_map[code_map >= SEGMENT_BASE])
        targets.append({"masks": code_map[None] == present[:, None, None],
                        "classes": present // SEGMENT_BASE - 1,
                        "void": code_map < SEGMENT_BASE})
    return targets


class PseudoPanoptic:
    """label_reader: synthesize-labels' panoptic label as a code map (picklable)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __call__(self, image_id: str) -> np.ndarray:
        label = read_panoptic(RunStore(self.run_dir).folder("labels/panoptic"), image_id)
        if label is None:
            raise UserError(f"labels/panoptic/{image_id}: missing or damaged; rerun synthesize-labels")
        return encode_segments(*label)


def ground_truth_segments(dataset: VOCDataset, image_id: str) -> tuple[np.ndarray, dict[int, int], np.ndarray]:
    """VOC ground truth as panoptic segments: instances are things, background the one stuff class."""
    ids, classes = dataset.read_instances(image_id)
    ids = ids.astype(np.int64)
    void = (ids == 65535) | (dataset.read_semantic(image_id) == IGNORE)
    segments, info = panoptic_from_instances(np.where(void, 0, ids), classes, void)
    return segments, {s["id"]: s["category_id"] for s in info}, void


class TruePanoptic:
    """label_reader: the dataset's instance + class masks as a code map (picklable)."""

    def __init__(self, dataset: VOCDataset):
        self.dataset = dataset

    def __call__(self, image_id: str) -> np.ndarray:
        segments, categories, _ = ground_truth_segments(self.dataset, image_id)
        return encode_segments(segments, categories)


def evaluate_panoptic(model, dataset: VOCDataset, ids: list[str], device: torch.device, num_classes: int,
                      class_names: list[str], progress=None, out: Path | None = None) -> dict:
    """PQ / SQ / RQ (all, things, stuff) of the model's panoptic predictions on images with instance ground truth."""
    from wsseg.data.transforms import normalize

    pairs = []
    model.eval()
    for image_id in (progress(ids, desc="evaluating panoptic predictions") if progress else ids):
        if not dataset.has_instances(image_id):
            continue
        image = torch.from_numpy(normalize(dataset.read_image(image_id))).permute(2, 0, 1)[None].to(device)
        with torch.inference_mode():
            predicted, info = model.predict_panoptic(image)[0]
        if out is not None:
            write_panoptic(out, image_id, predicted, info)
        gt_segments, gt_categories, void = ground_truth_segments(dataset, image_id)
        pairs.append((predicted, {s["id"]: s["category_id"] for s in info}, gt_segments, gt_categories, void))
    if not pairs:
        return {}
    result = panoptic_quality(pairs, num_classes, thing_classes=list(range(1, num_classes)), stuff_classes=[0],
                              class_names=class_names)
    return {**panoptic_headline(result), "panoptic_images": len(pairs)}


def write_panoptic(folder: Path, image_id: str, segments: np.ndarray, info: list[dict]) -> None:
    """<folder>/<id>.png (COCO RGB ids) and <id>.json (segments_info)."""
    with atomic_path(folder / f"{image_id}.png") as tmp:
        write_rgb_png(tmp, encode_ids(segments))
    write_json(folder / f"{image_id}.json", {"image_id": image_id, "segments_info": info})


def is_panoptic(model) -> bool:
    return hasattr(model, "predict_panoptic")

