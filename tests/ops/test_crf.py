from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
import pytest
from pydensecrf.utils import unary_from_labels

from wsseg.ops.crf import DEEPLAB_V2_RESNET101_CRF, crf_from_labels, crf_from_probs

SIZE = 40


def two_region_image(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A dark left half and a bright right half with mild noise; returns (image, truth)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((SIZE, SIZE), dtype=np.int64)
    truth[:, SIZE // 2 :] = 1
    grey = np.where(truth == 1, 200, 50) + rng.integers(-10, 11, truth.shape)
    image = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
    return image, truth


def flip_some(labels: np.ndarray, fraction: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    flipped = rng.random(labels.shape) < fraction
    noisy = labels.copy()
    noisy[flipped] = 1 - noisy[flipped]
    return noisy, flipped


def test_crf_from_labels_shape_dtype():
    image, truth = two_region_image()
    out = crf_from_labels(image, truth.astype(np.uint8), 2)
    assert out.shape == truth.shape
    assert out.dtype == np.int64


def test_crf_from_labels_denoises_to_region_boundary():
    image, truth = two_region_image()
    noisy, _ = flip_some(truth, 0.2)
    assert (noisy != truth).mean() > 0.15
    out = crf_from_labels(image, noisy, 2)
    # The colour edge is where the labels change, so the CRF recovers the halves.
    assert (out != truth).mean() < 0.01


def test_crf_from_labels_matches_pydensecrf_reference():
    # IRN's crf_inference_label written directly against pydensecrf.
    image, truth = two_region_image(seed=3)
    rng = np.random.default_rng(4)
    labels = np.where(rng.random(truth.shape) < 0.3, rng.integers(0, 3, truth.shape), truth)
    d = dcrf.DenseCRF2D(SIZE, SIZE, 3)
    d.setUnaryEnergy(unary_from_labels(labels, 3, gt_prob=0.7, zero_unsure=False))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(image), compat=10)
    expected = np.argmax(np.array(d.inference(10)).reshape(3, SIZE, SIZE), axis=0)
    np.testing.assert_array_equal(crf_from_labels(image, labels, 3), expected)


def test_crf_from_labels_uniform_stays_uniform():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)  # busy texture
    labels = np.full((SIZE, SIZE), 2)
    out = crf_from_labels(image, labels, 4)
    assert (out == 2).all()


def test_crf_from_labels_absent_label_does_not_appear():
    image, truth = two_region_image()
    labels = truth * 2  # uses labels 0 and 2 of 3
    noisy = np.where(flip_some(truth, 0.1)[1], 2 - labels, labels)
    out = crf_from_labels(image, noisy, 3)
    assert not (out == 1).any()
    assert set(np.unique(out)) == {0, 2}


def test_crf_from_labels_non_contiguous_image_same_result():
    image, truth = two_region_image()
    noisy, _ = flip_some(truth, 0.2)
    view = np.ascontiguousarray(image[:, ::-1])[:, ::-1]  # same pixels, negative strides
    assert not view.flags.c_contiguous
    np.testing.assert_array_equal(view, image)
    np.testing.assert_array_equal(crf_from_labels(view, noisy, 2), crf_from_labels(image, noisy, 2))


def test_crf_from_labels_rejects_bad_input():
    image, truth = two_region_image()
    with pytest.raises(ValueError, match="uint8"):
        crf_from_labels(image.astype(np.float32) / 255, truth, 2)
    with pytest.raises(ValueError, match="0..1"):
        crf_from_labels(image, truth * 2, 2)
    with pytest.raises(ValueError, match="shape"):
        crf_from_labels(image, truth[:-1], 2)


def test_crf_from_labels_single_label():
    image, truth = two_region_image()
    out = crf_from_labels(image, np.zeros_like(truth), 1)
    assert out.dtype == np.int64 and (out == 0).all()


def test_crf_from_probs_normalised_and_denoising():
    image, truth = two_region_image()
    _, flipped = flip_some(truth, 0.2)
    # 0.8 on the true label, 0.2 on the other; swapped on the flipped pixels.
    probs = np.stack([truth == 0, truth == 1]).astype(np.float32) * 0.6 + 0.2
    probs[:, flipped] = probs[::-1][:, flipped]
    q = crf_from_probs(image, probs)
    assert q.shape == probs.shape and q.dtype == np.float32
    assert (q >= 0).all()
    np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-5)
    assert (q.argmax(axis=0) != truth).mean() < 0.01


def test_crf_from_probs_v2_settings_and_zero_probabilities():
    image, truth = two_region_image()
    probs = np.zeros((3, SIZE, SIZE), dtype=np.float64)  # hard one-hot, label 2 never
    probs[0][truth == 0] = 1
    probs[1][truth == 1] = 1
    q = crf_from_probs(image, probs, **DEEPLAB_V2_RESNET101_CRF)
    assert np.isfinite(q).all()
    np.testing.assert_allclose(q.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(q.argmax(axis=0), truth)
    assert q[2].max() < 0.01


def test_read_only_images_are_accepted():
    image = np.zeros((12, 12, 3), np.uint8)
    image[:, 6:] = 200
    image.setflags(write=False)  # as np.asarray(PIL image) gives
    labels = np.zeros((12, 12), np.int64)
    labels[:, 6:] = 1
    assert crf_from_labels(image, labels, 2).shape == (12, 12)
