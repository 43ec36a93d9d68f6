from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wsseg.data.datasets import LabelledImages, TaggedImages
from wsseg.data.images import write_label_png
from wsseg.data.transforms import ClassificationAugment, SegmentationAugment, normalize
from wsseg.data.voc import VOCDataset
from wsseg.errors import UserError

CLASSES = ("cat", "dog", "bird")
# id -> (height, width, tags as class names)
IMAGES = {
    "2007_000032": (24, 32, ["dog"]),
    "2007_000033": (30, 20, ["cat", "bird"]),
    "2008_000002": (16, 16, ["bird", "dog", "cat"]),
}


@pytest.fixture()
def voc(tmp_path: Path) -> VOCDataset:
    root = tmp_path / "VOC"
    for folder in ("JPEGImages", "Annotations", "SegmentationClass"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, (height, width, names) in IMAGES.items():
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        objects = "".join(f"<object><name>{name}</name></object>" for name in names)
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
        labels = rng.integers(0, 4, (height, width), dtype=np.uint8)
        labels[0] = 255
        write_label_png(root / "SegmentationClass" / f"{image_id}.png", labels)
    return VOCDataset(root, CLASSES)


def _assert_items_equal(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        if isinstance(first[key], torch.Tensor):
            assert torch.equal(first[key], second[key]), key
        else:
            assert first[key] == second[key], key


def test_tagged_images_item_shapes_dtypes_and_tags(voc):
    dataset = TaggedImages(voc, list(IMAGES), ClassificationAugment(resize_long=(16, 24), crop_size=20), seed=1)
    assert len(dataset) == 3
    item = dataset[1]
    assert item["id"] == "2007_000033"
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 20, 20)
    assert item["image"].is_contiguous()
    assert item["tags"].dtype == torch.float32 and item["tags"].tolist() == [1.0, 0.0, 1.0]
    assert dataset[2]["tags"].tolist() == [1.0, 1.0, 1.0]


def test_tagged_images_without_transform_only_normalises(voc):
    item = TaggedImages(voc, ["2007_000032"])[0]
    expected = normalize(voc.read_image("2007_000032")).transpose(2, 0, 1)
    np.testing.assert_array_equal(item["image"].numpy(), expected)


def test_items_are_reproducible_per_seed_epoch_and_index(voc):
    augment = ClassificationAugment(resize_long=(16, 40), crop_size=24)
    first = TaggedImages(voc, list(IMAGES), augment, seed=7)
    second = TaggedImages(voc, list(IMAGES), augment, seed=7)
    first.set_epoch(3)
    second.set_epoch(3)
    # Same items whatever the access order (no state shared between items).
    forward = [first[index] for index in range(3)]
    backward = [second[index] for index in reversed(range(3))][::-1]
    for a, b in zip(forward, backward):
        _assert_items_equal(a, b)
    second.set_epoch(4)
    assert not torch.equal(second[0]["image"], forward[0]["image"])
    other_seed = TaggedImages(voc, list(IMAGES), augment, seed=8)
    other_seed.set_epoch(3)
    assert not torch.equal(other_seed[0]["image"], forward[0]["image"])


def test_batches_do_not_depend_on_the_number_of_workers(voc):
    dataset = LabelledImages(voc, list(IMAGES), voc.read_semantic, SegmentationAugment(scale_range=(0.5, 1.5), crop_size=16), seed=3)
    dataset.set_epoch(2)
    pickle.loads(pickle.dumps(dataset))  # workers started by spawn/forkserver need a picklable dataset

    def batches(workers: int) -> list[dict]:
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=workers, shuffle=False)
        return list(loader)

    for a, b in zip(batches(0), batches(2), strict=True):
        assert a["id"] == b["id"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_labelled_images_item_and_padding(voc):
    dataset = LabelledImages(voc, list(IMAGES), voc.read_semantic, SegmentationAugment(scale_range=(1.0, 1.0), crop_size=36), seed=0)
    item = dataset[2]  # 16 x 16 image on a 36 x 36 canvas
    assert item["id"] == "2008_000002"
    assert item["image"].shape == (3, 36, 36) and item["image"].dtype == torch.float32
    assert item["label"].shape == (36, 36) and item["label"].dtype == torch.int64
    label, image = item["label"].numpy(), item["image"].numpy()
    content = np.any(image != 0, axis=0)
    assert content.sum() == 16 * 16
    assert np.all(label[~content] == 255)
    # Inside the image the labels are the file's labels, possibly mirrored.
    rows, cols = np.nonzero(content)
    inside = label[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    truth = voc.read_semantic("2008_000002")
    assert np.array_equal(inside, truth) or np.array_equal(inside, truth[:, ::-1])


def test_labelled_images_without_transform_keeps_full_size(voc):
    item = LabelledImages(voc, ["2007_000033"], voc.read_semantic)[0]
    assert item["image"].shape == (3, 30, 20)
    np.testing.assert_array_equal(item["label"].numpy(), voc.read_semantic("2007_000033").astype(np.int64))


def test_label_of_another_size_names_the_image(voc):
    dataset = LabelledImages(voc, ["2007_000032"], lambda image_id: np.zeros((5, 5), np.uint8))
    with pytest.raises(UserError, match="2007_000032.*5x5.*32x24"):
        dataset[0]


def test_bad_image_names_the_file(voc):
    (voc.root / "JPEGImages" / "2007_000032.jpg").write_bytes(b"garbage")
    with pytest.raises(UserError, match="2007_000032.jpg"):
        TaggedImages(voc, ["2007_000032"])[0]
