from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from wsseg.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ClassificationAugment,
    SegmentationAugment,
    denormalize,
    normalize,
    random_crop,
    random_flip,
    random_resize_long,
    random_scale,
    resize_image,
    resize_labels,
)


def _image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_normalize_uses_imagenet_statistics_and_round_trips():
    image = _image(4, 5)
    normal = normalize(image)
    assert normal.dtype == np.float32 and normal.shape == (4, 5, 3)
    np.testing.assert_allclose(normal[1, 2], (image[1, 2] / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225], rtol=1e-5)
    np.testing.assert_array_equal(denormalize(normal), image)
    # Zero after normalisation is the mean colour (what crops pad with).
    np.testing.assert_array_equal(denormalize(np.zeros((1, 1, 3), np.float32))[0, 0], np.round(IMAGENET_MEAN * 255))
    assert IMAGENET_STD.shape == (3,)


def test_resize_image_keeps_uint8_and_matches_pil():
    image = _image(7, 10)
    for method, resample in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
        resized = resize_image(image, (13, 4), method)
        assert resized.dtype == np.uint8 and resized.shape == (13, 4, 3)
        np.testing.assert_array_equal(resized, np.asarray(Image.fromarray(image).resize((4, 13), resample)))
    with pytest.raises(ValueError, match="method"):
        resize_image(image, (3, 3), "lanczos")


def test_resize_image_float_planes_resize_each_channel():
    planes = np.random.default_rng(1).normal(size=(6, 5, 2)).astype(np.float32)
    resized = resize_image(planes, (9, 8), "bilinear")
    assert resized.dtype == np.float32 and resized.shape == (9, 8, 2)
    for k in range(2):
        np.testing.assert_allclose(resized[:, :, k], resize_image(planes[:, :, k], (9, 8), "bilinear"))
    constant = np.full((5, 5, 3), 0.7, np.float32)
    np.testing.assert_allclose(resize_image(constant, (11, 3), "bicubic"), 0.7, atol=1e-6)


def test_resize_labels_is_nearest_and_agrees_with_pil_off_ties():
    rng = np.random.default_rng(2)
    for in_h, in_w, out_h, out_w in ((7, 9, 20, 4), (50, 33, 13, 64), (5, 5, 5, 5), (12, 8, 5, 3)):
        labels = rng.integers(0, 21, (in_h, in_w), dtype=np.uint8)
        resized = resize_labels(labels, (out_h, out_w))
        assert resized.dtype == np.uint8 and resized.shape == (out_h, out_w)
        reference = np.asarray(Image.fromarray(labels).resize((out_w, out_h), Image.NEAREST))
        # Where an output centre falls exactly on an input pixel edge the choice is arbitrary
        # (PIL's fixed-point arithmetic decides); compare everywhere else.
        rows = ((2 * np.arange(out_h) + 1) * in_h) % (2 * out_h) != 0
        cols = ((2 * np.arange(out_w) + 1) * in_w) % (2 * out_w) != 0
        np.testing.assert_array_equal(resized[np.ix_(rows, cols)], reference[np.ix_(rows, cols)])
    # Any dtype, values never blended: uint16 instance ids keep 65535.
    ids = np.array([[0, 65535], [3, 1]], np.uint16)
    up = resize_labels(ids, (4, 4))
    assert up.dtype == np.uint16
    np.testing.assert_array_equal(up, np.kron(ids, np.ones((2, 2), np.uint16)))


def test_random_resize_long_bounds_aspect_and_label_alignment():
    image = _image(30, 20)
    labels = np.zeros((30, 20), np.uint8)
    labels[:15] = 7
    longs = set()
    for seed in range(40):
        rng = np.random.default_rng(seed)
        out, out_labels = random_resize_long(image, labels, 24, 28, rng)
        height, width = out.shape[:2]
        assert 24 <= height <= 28 and height == max(height, width)
        assert width == round(20 * height / 30)
        assert out_labels.shape == (height, width) and out_labels.dtype == np.uint8
        assert set(np.unique(out_labels)) == {0, 7}
        assert np.all(out_labels[: height // 2 - 1] == 7) and np.all(out_labels[height // 2 + 1 :] == 0)
        longs.add(height)
    assert longs == {24, 25, 26, 27, 28}  # both ends are reachable
    fixed, none = random_resize_long(image, None, 40, 40, np.random.default_rng(0))
    assert fixed.shape == (40, round(20 * 40 / 30), 3) and none is None


def test_random_scale_range_and_labels_move_together():
    image = _image(20, 10)
    semantic = np.ones((20, 10), np.uint8)
    instances = np.full((20, 10), 3, np.uint16)
    for seed in range(20):
        out, (out_semantic, out_instances) = random_scale(image, (semantic, instances), 0.5, 1.5, np.random.default_rng(seed))
        height, width = out.shape[:2]
        assert 10 <= height <= 30 and 5 <= width <= 15
        assert out_semantic.shape == out_instances.shape == (height, width)
        assert out_instances.dtype == np.uint16 and np.all(out_instances == 3)


def test_random_flip_twice_is_identity_and_moves_labels():
    image = _image(5, 6)
    labels = np.arange(30, dtype=np.uint8).reshape(5, 6)
    flipped_any = False
    for seed in range(10):
        once, once_labels = random_flip(image, labels, np.random.default_rng(seed))
        twice, twice_labels = random_flip(once, once_labels, np.random.default_rng(seed))
        np.testing.assert_array_equal(twice, image)
        np.testing.assert_array_equal(twice_labels, labels)
        if not np.array_equal(once, image):
            flipped_any = True
            np.testing.assert_array_equal(once, image[:, ::-1])
            np.testing.assert_array_equal(once_labels, labels[:, ::-1])
        else:
            np.testing.assert_array_equal(once_labels, labels)
    assert flipped_any


def test_random_crop_pads_small_images_with_zero_and_labels_with_255():
    image = normalize(_image(3, 5))
    labels = np.arange(15, dtype=np.uint8).reshape(3, 5)
    offsets = set()
    for seed in range(60):
        out, out_labels, (top, left, height, width) = random_crop(image, labels, 8, np.random.default_rng(seed))
        assert out.shape == (8, 8, 3) and out.dtype == np.float32 and out_labels.shape == (8, 8)
        assert (height, width) == (3, 5)
        np.testing.assert_array_equal(out[top : top + 3, left : left + 5], image)
        np.testing.assert_array_equal(out_labels[top : top + 3, left : left + 5], labels)
        outside = np.ones((8, 8), bool)
        outside[top : top + 3, left : left + 5] = False
        assert np.all(out[outside] == 0) and np.all(out_labels[outside] == 255)
        offsets.add((top, left))
    assert {top for top, _ in offsets} == set(range(6)) and {left for _, left in offsets} == set(range(4))


def test_random_crop_of_large_image_is_a_window_and_mixed_sizes_work():
    image = _image(10, 3)
    semantic = np.arange(30, dtype=np.uint8).reshape(10, 3)
    instances = np.arange(30, dtype=np.uint16).reshape(10, 3)
    out, (out_semantic, out_instances), (top, left, height, width) = random_crop(
        image, (semantic, instances), (4, 6), np.random.default_rng(3), label_fill=(255, 0)
    )
    assert out.shape == (4, 6, 3) and (top, height, width) == (0, 4, 3)
    source_top = int(out_semantic[0, left]) // 3  # the labels enumerate source positions
    np.testing.assert_array_equal(out[:, left : left + 3], image[source_top : source_top + 4])
    np.testing.assert_array_equal(out_semantic[:, left : left + 3], semantic[source_top : source_top + 4])
    np.testing.assert_array_equal(out_instances[:, left : left + 3], instances[source_top : source_top + 4])
    outside = np.ones(6, bool)
    outside[left : left + 3] = False
    assert np.all(out_semantic[:, outside] == 255) and np.all(out_instances[:, outside] == 0)
    assert np.all(out[:, outside] == 0)


def test_random_transforms_are_deterministic_given_rng():
    image = _image(40, 30)
    labels = np.random.default_rng(5).integers(0, 3, (40, 30), dtype=np.uint8)
    augment = SegmentationAugment(scale_range=(0.5, 2.0), crop_size=32, flip=True)
    first = augment(image, labels, np.random.default_rng([1, 2, 3]))
    second = augment(image, labels, np.random.default_rng([1, 2, 3]))
    other = augment(image, labels, np.random.default_rng([1, 2, 4]))
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], other[0])


def test_classification_augment_shape_and_mean_padding():
    augment = ClassificationAugment(resize_long=(20, 24), crop_size=32, flip=True)
    out = augment(_image(30, 15), np.random.default_rng(0))
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    # The resized image (long side 20-24) sits on a canvas of exact zeros (the mean colour).
    rows = np.flatnonzero(np.any(out != 0, axis=(1, 2)))
    cols = np.flatnonzero(np.any(out != 0, axis=(0, 2)))
    assert 20 <= rows.size <= 24 and rows.size == rows[-1] - rows[0] + 1
    assert cols.size == round(15 * rows.size / 30) and cols.size == cols[-1] - cols[0] + 1
    plain = ClassificationAugment(resize_long=None, crop_size=None, flip=False)
    np.testing.assert_array_equal(plain(_image(5, 4), np.random.default_rng(0)), normalize(_image(5, 4)))


def test_segmentation_augment_keeps_labels_aligned_with_pixels():
    # Left half red with label 1, right half blue with label 2: after rescale, flip and crop,
    # label-1 pixels must still be red and label-2 pixels blue.
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :30, 0] = 255
    image[:, 30:, 2] = 255
    labels = np.ones((40, 60), np.uint8)
    labels[:, 30:] = 2
    augment = SegmentationAugment(scale_range=(0.7, 1.6), crop_size=48, flip=True)
    for seed in range(8):
        out, out_labels = augment(image, labels, np.random.default_rng(seed))
        assert out.shape == (48, 48, 3) and out_labels.shape == (48, 48) and out_labels.dtype == np.uint8
        rgb = denormalize(out).astype(int)
        red, blue = out_labels == 1, out_labels == 2
        assert red.any() and blue.any()
        assert np.mean(rgb[red][:, 0] > rgb[red][:, 2]) > 0.95
        assert np.mean(rgb[blue][:, 2] > rgb[blue][:, 0]) > 0.95
        assert np.all(out[out_labels == 255] == 0)
