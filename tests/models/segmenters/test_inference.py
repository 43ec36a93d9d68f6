"""Tests of wsseg.models.segmenters.inference on tiny deterministic conv nets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wsseg.data.transforms import normalize
from wsseg.models.segmenters.inference import (
    dense_crf,
    multi_scale,
    predict_labels,
    sliding_window,
    whole_image,
    window_boxes,
    window_starts,
)
from wsseg.ops.crf import crf_from_probs

NUM_CLASSES = 4


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return module.eval()


def conv_net(seed: int = 0) -> nn.Module:
    """3x3 conv (zero padding) + ReLU + 1x1: receptive field radius 1."""
    return _seeded(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 1)), seed)


def deep_conv_net(seed: int = 1) -> nn.Module:
    """Two 3x3 convs with biases: padding the input changes the border outputs."""
    return _seeded(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                                 nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 1)), seed)


def pointwise_net(seed: int = 2) -> nn.Module:
    """1x1 convs only: translation equivariant with no spatial context."""
    return _seeded(nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 1)), seed)


def symmetric_net(seed: int = 3) -> nn.Module:
    """conv_net with left-right symmetric kernels, so net(flip(x)) = flip(net(x))."""
    net = conv_net(seed)
    with torch.no_grad():
        net[0].weight.copy_(0.5 * (net[0].weight + net[0].weight.flip(-1)))
    return net


def random_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((3, height, width), generator=torch.Generator().manual_seed(seed))


def assert_distribution(probs: torch.Tensor | np.ndarray, shape: tuple[int, ...]) -> None:
    probs = torch.as_tensor(probs)
    assert tuple(probs.shape) == shape
    assert probs.dtype == torch.float32
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(0), torch.ones(shape[1:]), atol=1e-5, rtol=0)


# --- windows -------------------------------------------------------------------------

def test_window_starts_known_values():
    assert window_starts(10, 6, 3) == [0, 3, 4]  # last window moved back to end at the border
    assert window_starts(13, 6, 3) == [0, 3, 6, 7]
    assert window_starts(12, 6, 3) == [0, 3, 6]  # already aligned: no extra window
    assert window_starts(6, 6, 4) == [0]
    assert window_starts(7, 6, 4) == [0, 1]
    assert window_starts(5, 8, 3) == [0]  # shorter than the window
    assert window_starts(9, 3, 3) == [0, 3, 6]


@pytest.mark.parametrize("height, width", [(37, 53), (5, 20), (64, 33), (1, 1)])
@pytest.mark.parametrize("window", [1, 8, 33])
def test_window_boxes_cover_odd_sizes(height, width, window):
    for stride in sorted({1, max(1, window // 2), max(1, window * 2 // 3), window}):
        boxes = window_boxes(height, width, window, stride)
        counts = np.zeros((height, width), np.int64)
        for top, left, bottom, right in boxes:
            assert 0 <= top < bottom <= height and 0 <= left < right <= width
            assert (bottom - top, right - left) == (min(window, height), min(window, width))
            counts[top:bottom, left:right] += 1
        assert (counts > 0).all(), (height, width, window, stride)
        assert len(set(boxes)) == len(boxes)
        # The last window of each axis ends at the border.
        assert max(box[2] for box in boxes) == height and max(box[3] for box in boxes) == width
        expected = [max(1, math.ceil((size - window) / stride) + 1) for size in (height, width)]
        assert len(boxes) == expected[0] * expected[1]
        if stride == window:  # a tiling: only the border-aligned last window overlaps
            assert counts.max() <= 4


# --- sliding window --------------------------------------------------------------------

def test_sliding_window_equals_whole_image_when_window_is_the_image():
    net = deep_conv_net()
    image = random_image(33, 33)
    torch.testing.assert_close(sliding_window(net, image, window=33), whole_image(net, image), atol=1e-6, rtol=0)


def test_sliding_window_pads_small_images_to_the_window():
    image = random_image(29, 35)
    # Radius-1 receptive field: zero padding up to the window equals the conv's own zero padding.
    net = conv_net()
    torch.testing.assert_close(sliding_window(net, image, window=40), whole_image(net, image), atol=1e-6, rtol=0)
    # A deeper net sees the padded canvas: the result is the padded image's prediction, cropped.
    net = deep_conv_net()
    for pad_value in (0.0, 1.5):
        padded = F.pad(image, (0, 5, 0, 11), value=pad_value)
        expected = whole_image(net, padded)[:, :29, :35]
        got = sliding_window(net, image, window=40, pad_value=pad_value)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(sliding_window(net, image, window=40), whole_image(net, image), atol=1e-3)


@pytest.mark.parametrize("window, stride", [(1, 1), (5, 2), (16, None), (16, 16), (37, 7), (64, None)])
def test_sliding_window_is_exact_for_a_pointwise_model(window, stride):
    net = pointwise_net()
    image = random_image(37, 53)
    got = sliding_window(net, image, window=window, stride=stride, batch_size=64)
    torch.testing.assert_close(got, whole_image(net, image), atol=1e-6, rtol=0)


@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_sliding_window_matches_slow_reference(batch_size):
    net = deep_conv_net()
    image = random_image(10, 13, seed=4)
    # Hand-listed windows of 6 with stride 3 (see test_window_starts_known_values).
    summed = torch.zeros((NUM_CLASSES, 10, 13))
    counts = torch.zeros((10, 13))
    for top in (0, 3, 4):
        for left in (0, 3, 6, 7):
            crop = image[:, top:top + 6, left:left + 6]
            summed[:, top:top + 6, left:left + 6] += torch.softmax(net(crop[None])[0], dim=0)
            counts[top:top + 6, left:left + 6] += 1
    got = sliding_window(net, image, window=6, stride=3, batch_size=batch_size)
    torch.testing.assert_close(got, summed / counts, atol=1e-6, rtol=0)
    assert_distribution(got, (NUM_CLASSES, 10, 13))


def test_sliding_window_rejects_gaps_and_bad_inputs():
    net = conv_net()
    image = random_image(9, 9)
    with pytest.raises(ValueError, match="stride"):
        sliding_window(net, image, window=4, stride=5)
    with pytest.raises(ValueError, match="window"):
        sliding_window(net, image, window=0)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        whole_image(net, image[None])
    with pytest.raises(ValueError, match="input size"):
        whole_image(lambda x: net(x)[:, :, ::2], image)


# --- multi-scale + flip ------------------------------------------------------------------

def test_multi_scale_at_scale_one_without_flip_is_whole_image():
    net = deep_conv_net()
    image = random_image(21, 30)
    assert torch.equal(multi_scale(net, image, scales=(1.0,), flip=False), whole_image(net, image))
    torch.testing.assert_close(multi_scale(net, image, scales=(1.0,), flip=False, window=8, stride=5),
                               sliding_window(net, image, window=8, stride=5), atol=0, rtol=0)


def test_multi_scale_flip_is_flipped_back():
    net = conv_net()
    image = random_image(21, 30)
    expected = 0.5 * (whole_image(net, image) + whole_image(net, image.flip(-1)).flip(-1))
    torch.testing.assert_close(multi_scale(net, image, scales=(1.0,)), expected, atol=1e-6, rtol=0)


def test_multi_scale_matches_reference():
    net = conv_net()
    image = random_image(21, 30)
    # 0.5 -> 10.5 x 15 -> (11, 15); 1.25 -> 26.25 x 37.5 -> (26, 38): rounded half up.
    expected = torch.zeros((NUM_CLASSES, 21, 30))
    for size in ((11, 15), (26, 38)):
        scaled = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        for flipped in (False, True):
            probs = whole_image(net, scaled.flip(-1) if flipped else scaled)
            probs = probs.flip(-1) if flipped else probs
            expected += F.interpolate(probs[None], size=(21, 30), mode="bilinear", align_corners=False)[0] / 4
    got = multi_scale(net, image, scales=(0.5, 1.25))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert_distribution(got, (NUM_CLASSES, 21, 30))


@pytest.mark.parametrize("window", [None, 12])
def test_flip_changes_nothing_for_a_flip_symmetric_model(window):
    image = random_image(23, 32)
    net = symmetric_net()
    torch.testing.assert_close(net(image.flip(-1)[None]), net(image[None]).flip(-1), atol=1e-5, rtol=0)
    # Widths 16, 32, 64: (width - 12) is a multiple of the stride 4 at every scale, so the
    # window layout is its own mirror image (otherwise windows differ between the image
    # and its flip, and so do border effects). Heights 12, 23, 46: odd and even.
    scales = (0.5, 1.0, 2.0)
    torch.testing.assert_close(multi_scale(net, image, scales=scales, window=window, stride=4),
                               multi_scale(net, image, scales=scales, flip=False, window=window, stride=4),
                               atol=1e-5, rtol=0)
    # The same check fails for a model without the symmetry, so it tests the flip.
    net = conv_net()
    assert not torch.allclose(multi_scale(net, image, scales=scales, window=window, stride=4),
                              multi_scale(net, image, scales=scales, flip=False, window=window, stride=4),
                              atol=1e-3)


def test_probabilities_sum_to_one_on_odd_sizes():
    net = deep_conv_net()
    image = random_image(17, 26)
    shape = (NUM_CLASSES, 17, 26)
    assert_distribution(whole_image(net, image), shape)
    assert_distribution(sliding_window(net, image, window=7), shape)
    assert_distribution(multi_scale(net, image), shape)
    assert_distribution(multi_scale(net, image, scales=(0.75, 1.75), window=9, stride=4), shape)


def test_autocast_bfloat16_stays_close_to_float32():
    net = deep_conv_net()
    image = random_image(17, 26)
    reference = multi_scale(net, image, scales=(0.5, 1.0), window=9)
    low = multi_scale(net, image, scales=(0.5, 1.0), window=9, amp_dtype=torch.bfloat16)
    assert_distribution(low, (NUM_CLASSES, 17, 26))
    assert (low - reference).abs().max() < 0.05


# --- CRF -------------------------------------------------------------------------------------

def test_dense_crf_returns_distributions():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (15, 22, 3), dtype=np.uint8)
    probs = torch.softmax(torch.randn((3, 15, 22), generator=torch.Generator().manual_seed(0)) * 3, dim=0)
    refined = dense_crf(image, probs, bilateral_sxy=10, iterations=5)
    assert isinstance(refined, np.ndarray)
    assert_distribution(refined, (3, 15, 22))
    np.testing.assert_allclose(refined, crf_from_probs(image, probs.numpy(), bilateral_sxy=10, iterations=5))
    assert not np.allclose(refined, probs.numpy(), atol=1e-2)  # the CRF did something


# --- predict_labels ------------------------------------------------------------------------------

class TinySegmenter(nn.Module):
    """A segmenter-shaped model: BatchNorm and dropout make train and eval mode differ."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Conv2d(8, NUM_CLASSES, 1))
        _seeded(self, 5)
        self.body[1].running_var.fill_(2.0)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("mode, window", [("single", None), ("single", 8), ("msflip", None), ("msflip", 8)])
def test_predict_labels_shapes_and_dtypes(mode, window):
    model = TinySegmenter().train()
    image = np.random.default_rng(1).integers(0, 256, (19, 24, 3), dtype=np.uint8)
    labels, probs = predict_labels(model, image, device="cpu", mode=mode, scales=(0.75, 1.0), window=window)
    assert labels.shape == (19, 24) and labels.dtype == np.uint8
    assert_distribution(probs, (NUM_CLASSES, 19, 24))
    np.testing.assert_array_equal(labels, probs.argmax(0))
    assert model.training  # mode given back
    again, _ = predict_labels(model, image, device="cpu", mode=mode, scales=(0.75, 1.0), window=window)
    np.testing.assert_array_equal(labels, again)  # eval mode: dropout off
    if mode == "single" and window is None:
        tensor = torch.from_numpy(normalize(image)).permute(2, 0, 1)
        model.eval()
        np.testing.assert_allclose(probs, whole_image(model.predict, tensor).numpy(), atol=1e-6)


def test_predict_labels_with_crf():
    model = TinySegmenter()
    image = np.random.default_rng(2).integers(0, 256, (14, 17, 3), dtype=np.uint8)
    labels, probs = predict_labels(model, image, device=torch.device("cpu"), crf={"iterations": 3})
    _, raw = predict_labels(model, image, device="cpu")
    assert labels.dtype == np.uint8 and labels.shape == (14, 17)
    assert_distribution(probs, (NUM_CLASSES, 14, 17))
    np.testing.assert_array_equal(labels, probs.argmax(0))
    np.testing.assert_allclose(probs, crf_from_probs(image, raw, iterations=3), atol=1e-6)
    with pytest.raises(ValueError, match="mode"):
        predict_labels(model, image, device="cpu", mode="ms")
    with pytest.raises(ValueError, match="uint8"):
        predict_labels(model, image.astype(np.float32), device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    model = TinySegmenter()
    image = np.random.default_rng(3).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    labels, probs = predict_labels(model, image, device="cpu", mode="msflip", window=16)
    model.cuda()
    cuda_labels, cuda_probs = predict_labels(model, image, device="cuda", mode="msflip", window=16)
    np.testing.assert_allclose(cuda_probs, probs, atol=1e-4)
    _, bf16_probs = predict_labels(model, image, device="cuda", mode="msflip", window=16, amp_dtype=torch.bfloat16)
    assert np.abs(bf16_probs - probs).max() < 0.05
