"""Depth maps: the demo generator's (ordering, unchanged images), the dataset reader, and the
segmenter augmentation that must move depth with the image and the label."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from wsseg.data import demo
from wsseg.data.datasets import LabelledImages
from wsseg.data.demo import generate_demo, make_scene
from wsseg.data.images import read_depth_png
from wsseg.data.transforms import DEPTH_MEAN_METRES, SegmentationAugment, normalize_depth
from wsseg.data.voc import VOCDataset
from wsseg.errors import UserError

# sha256 (first 16 hex digits) of image, class map and object map of make_scene(index, seed), taken
# with the generator as it was before it drew depth maps: the depth map must not change them.
SCENES_BEFORE_DEPTH = {(0, 0): "8056f74dfb8dcad9", (0, 1): "27cefb446ce819a4", (0, 7): "eadb762021913e5d",
                       (3, 2): "4e234fea9de5da2f", (5, 11): "374707cd38a7d3a4"}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("depth-demo")
    generate_demo(out, num_images=8, seed=3, size=64)
    return out


def test_the_depth_map_leaves_images_labels_and_tags_as_they_were():
    for (seed, index), expected in SCENES_BEFORE_DEPTH.items():
        scene = make_scene(index, seed)
        digest = hashlib.sha256()
        for array in (scene.image, scene.class_map, scene.object_map):
            digest.update(array.tobytes())
        assert digest.hexdigest()[:16] == expected, (seed, index)


def test_demo_writes_a_16_bit_depth_map_per_image(written):
    ids = (written / "ImageSets" / "Segmentation" / "trainval.txt").read_text().split()
    for image_id in ids:
        path = written / "Depth" / f"{image_id}.png"
        assert Image.open(path).mode == "I;16"
        depth = read_depth_png(path)
        assert depth.shape == Image.open(written / "JPEGImages" / f"{image_id}.jpg").size[::-1]
        assert depth.dtype == np.uint16 and 1000 < np.median(depth[depth > 0]) < 16000  # millimetres
    assert "depth_dir: Depth" in (written / "config.yaml").read_text()


def _scenes(count: int = 40):
    return [make_scene(index, seed) for seed in (0, 7) for index in range(count)]


def test_objects_are_nearer_than_the_background_behind_them():
    """Around each object (a 3 px ring), the background at the object's rows or above (behind it on
    the ground, or the far backdrop) reads farther than the object itself."""
    checked = 0
    for scene in _scenes():
        depth = scene.depth.astype(np.float64)
        background = (scene.object_map == 0) & (depth > 0)
        for obj in scene.objects:
            own = (scene.object_map == obj.index) & (depth > 0)
            if own.sum() < 20:
                continue
            ring = ndimage.binary_dilation(own, iterations=3) & background
            ring[np.flatnonzero(own.any(axis=1)).max() + 1:] = False  # the ground in front of it is nearer
            if ring.sum() < 10:
                continue
            assert np.median(depth[own]) < np.median(depth[ring]), (scene.background, obj)
            checked += 1
    assert checked > 60


def test_an_occluder_is_nearer_than_what_it_hides():
    """Where two objects' visible parts touch, the later one (drawn over the other) is nearer."""
    pairs = 0
    for scene in _scenes():
        depth = scene.depth.astype(np.float64)
        for back in scene.objects:
            for front in scene.objects:
                if front.index <= back.index:
                    continue
                hidden, hiding = scene.object_map == back.index, scene.object_map == front.index
                near_front = ndimage.binary_dilation(hiding, iterations=4)
                contact = near_front & hidden & (depth > 0)
                seen = ndimage.binary_dilation(hidden, iterations=4) & hiding & (depth > 0)
                if contact.sum() < 5 or seen.sum() < 5:
                    continue
                assert np.median(depth[seen]) < np.median(depth[contact]), (back, front)
                pairs += 1
    assert pairs > 10


def test_sky_has_no_reading_and_the_noise_is_small():
    skies = 0
    for scene in _scenes():
        if scene.horizon is not None:
            sky = (scene.object_map[: scene.horizon] == 0)
            assert (scene.depth[: scene.horizon][sky] == 0).all()
            skies += 1
        values = scene.depth[scene.object_map == 0].astype(np.float64)
        assert (values == 0).mean() < 0.6
    assert skies > 0
    # the noise has its own stream: the same scene gives the same depth map
    assert np.array_equal(make_scene(4, 2).depth, make_scene(4, 2).depth)


def test_read_depth_names_the_key_and_the_missing_file(written):
    dataset = VOCDataset(written, demo.DEMO_CLASSES, depth_dir="Depth")
    ids = (written / "ImageSets" / "Segmentation" / "trainval.txt").read_text().split()
    (written / "Depth" / f"{ids[-1]}.png").rename(written / f"{ids[-1]}.moved.png")
    try:
        with pytest.raises(UserError) as error:
            dataset.read_depth(ids[-1])
        message = str(error.value)
        assert message.startswith("data.depth_dir: depth image ") and f"Depth/{ids[-1]}.png not found" in message
        assert "\n" not in message
    finally:
        (written / f"{ids[-1]}.moved.png").rename(written / "Depth" / f"{ids[-1]}.png")
    with pytest.raises(UserError, match="data.depth_dir: not set"):
        VOCDataset(written, demo.DEMO_CLASSES).read_depth(ids[0])
    absolute = VOCDataset(written, demo.DEMO_CLASSES, depth_dir=str(written / "Depth"))
    assert np.array_equal(absolute.read_depth(ids[0]), dataset.read_depth(ids[0]))


def test_an_8_bit_depth_png_is_refused(tmp_path):
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "d.png")
    with pytest.raises(UserError, match="must be a 16-bit grayscale PNG"):
        read_depth_png(tmp_path / "d.png")


def test_normalize_depth():
    depth = np.array([[0, round(DEPTH_MEAN_METRES * 1000)], [1000, 5000]], np.uint16)
    normalised = normalize_depth(depth)
    assert normalised.dtype == np.float32
    assert normalised[0, 0] == 0 and abs(normalised[0, 1]) < 1e-3
    assert normalised[1, 0] < -1 < 1 < normalised[1, 1]


def test_augmentation_keeps_image_label_and_depth_aligned():
    """A depth map that is a function of the label stays that function after rescale, flip and crop
    (nearest neighbour: no blended depth), padding is 0 (no reading); and the random draws are those of
    the same call without depth, so RGB models see exactly what they did."""
    rng = np.random.default_rng(0)
    label = np.zeros((50, 70), np.uint8)
    label[10:30, 5:40] = 1
    label[25:45, 30:65] = 2
    label[:, 66:] = 3
    depth_of = np.array([4000, 1500, 2500, 0], np.uint16)  # class 3 has no reading
    depth = depth_of[label]
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    augment = SegmentationAugment(scale_range=(0.5, 2.0), crop_size=64, flip=True, method="bilinear")
    for seed in range(20):
        out_image, out_label, out_depth = augment(image, label, np.random.default_rng(seed), depth=depth)
        plain_image, plain_label = augment(image, label, np.random.default_rng(seed))
        assert np.array_equal(out_image, plain_image) and np.array_equal(out_label, plain_label)
        assert out_depth.shape == out_label.shape == out_image.shape[:2]
        inside = out_label != 255
        assert np.allclose(out_depth[inside], normalize_depth(depth_of[out_label[inside]]))
        assert (out_depth[~inside] == 0).all()


def test_labelled_images_with_depth_give_four_channels(written):
    dataset = VOCDataset(written, demo.DEMO_CLASSES, depth_dir="Depth")
    ids = (written / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:2]
    augmented = LabelledImages(dataset, ids, dataset.read_semantic, SegmentationAugment(crop_size=48), depth=True)
    item = augmented[0]
    assert item["image"].shape == (4, 48, 48) and item["label"].shape == (48, 48)
    plain = LabelledImages(dataset, ids, dataset.read_semantic, SegmentationAugment(crop_size=48))[0]
    assert np.array_equal(item["image"][:3].numpy(), plain["image"].numpy())
    assert np.array_equal(item["label"].numpy(), plain["label"].numpy())
    whole = LabelledImages(dataset, ids, dataset.read_semantic, depth=True)[1]
    assert np.array_equal(whole["image"][3].numpy(), normalize_depth(dataset.read_depth(ids[1])))
