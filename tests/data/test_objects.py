"""Context decoupling augmentation: cutting objects out by label maps, pasting them elsewhere."""

import numpy as np
import pytest

from wsseg.data.datasets import TaggedImages
from wsseg.data.demo import DEMO_CLASSES, generate_demo
from wsseg.data.objects import CutOut, ObjectBank, cut_object, paste
from wsseg.data.voc import VOCDataset
from wsseg.errors import UserError


def test_only_one_class_covering_ten_to_seventy_percent_gives_an_object():
    image = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    labels = np.zeros((20, 30), np.uint8)
    labels[5:15, 10:25] = 3  # 150 px of 600: 25 %
    labels[5, 10] = 255  # an outline pixel is not a class
    cut = cut_object(image, labels)
    assert cut.class_index == 2 and cut.mask.shape == (10, 15) == cut.rgb.shape[:2]
    assert np.array_equal(cut.rgb, image[5:15, 10:25]) and cut.mask.sum() == 149
    two = labels.copy()
    two[0, 0] = 1
    assert cut_object(image, two) is None  # two classes
    small = np.zeros_like(labels)
    small[:2, :2] = 3
    assert cut_object(image, small) is None  # under 10 %
    assert cut_object(image, np.full_like(labels, 3)) is None  # over 70 %


def test_a_pasted_object_keeps_its_colours_fits_and_leaves_the_rest_alone():
    rng = np.random.default_rng(0)
    red = np.zeros((30, 40, 3), np.uint8)
    red[..., 0] = 250
    cut = CutOut(red, np.ones((30, 40), bool), 0)
    background = np.full((50, 60, 3), 20, np.uint8)
    for _ in range(10):
        out = paste(background, cut, rng)
        changed = (out != background).any(axis=2)
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        assert changed.sum() > 100
        assert rows[-1] - rows[0] + 1 <= 0.7 * 50 + 1 and cols[-1] - cols[0] + 1 <= 0.7 * 60 + 1
        assert (out[changed][:, 0] > 150).mean() > 0.9  # the object's own (red) pixels
        assert (out[~changed] == 20).all()


def test_decoupling_adds_a_class_the_image_lacks(tmp_path):
    out = tmp_path / "demo"
    generate_demo(out, num_images=80, seed=1, size=48)
    voc = VOCDataset(out, DEMO_CLASSES)
    ids = (out / "ImageSets/Segmentation/train.txt").read_text().split()
    bank = ObjectBank.from_labels(voc, ids, out / "SegmentationClass")  # the ground truth stands in for labels
    assert sum(1 for count in bank.counts() if count) >= 3
    rng = np.random.default_rng(0)
    for image_id in ids[:20]:
        tags = np.zeros(len(DEMO_CLASSES), np.float32)
        tags[voc.tags(image_id)] = 1
        absent = {k for k, count in enumerate(bank.counts()) if count and tags[k] == 0}
        image, new_tags = bank.decouple(voc.read_image(image_id), tags, rng)
        added = set(np.flatnonzero(new_tags - tags).tolist())
        assert added <= absent and len(added) == (1 if absent else 0)  # a class the image lacks, never its own
        assert (image != voc.read_image(image_id)).any() == bool(absent)
    # as train-cam's dataset: at probability 1 items gain a class, at 0 they are the plain items
    always = TaggedImages(voc, ids, seed=3, objects=bank, object_probability=1.0)
    never = TaggedImages(voc, ids, seed=3, objects=bank, object_probability=0.0)
    plain = TaggedImages(voc, ids, seed=3)
    gained = [int(always[i]["tags"].sum() - plain[i]["tags"].sum()) for i in range(10)]
    assert set(gained) <= {0, 1} and sum(gained) >= 7
    for index in range(6):
        assert (never[index]["image"] == plain[index]["image"]).all()
    with pytest.raises(UserError, match="cam.context_decoupling: .* is not a folder"):
        ObjectBank.from_labels(voc, ids, tmp_path / "missing")
