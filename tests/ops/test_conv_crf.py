"""ConvCRF: exact against a dense N x N mean field written here, window truncation, pooling, and
that it does a CRF's job (cleans label noise inside flat colour regions) like pydensecrf."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wsseg.ops.conv_crf import _pool, _unpool, conv_mean_field
from wsseg.ops.crf import crf_from_labels, crf_from_probs

PARAMS = dict(gaussian_sxy=2.0, gaussian_compat=3.0, bilateral_sxy=4.0, bilateral_srgb=20.0, bilateral_compat=5.0)


def reference_mean_field(image, unary, *, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb,
                         bilateral_compat, iterations, radius=None):
    """The fully connected mean field with symmetric normalisation, as N x N matrices in float64;
    `radius` keeps only pairs within a (2 radius + 1)^2 square."""
    height, width = image.shape[:2]
    rows, cols = np.mgrid[:height, :width]
    positions = np.stack([rows.ravel(), cols.ravel()], axis=1).astype(np.float64)
    colours = image.reshape(-1, 3).astype(np.float64)
    unary = unary.astype(np.float64)  # (L, N)
    kernels = []
    for compat, features in ((gaussian_compat, positions / gaussian_sxy),
                             (bilateral_compat, np.concatenate([positions / bilateral_sxy, colours / bilateral_srgb], 1))):
        kernel = np.exp(-0.5 * ((features[:, None] - features[None]) ** 2).sum(-1))
        if radius is not None:
            offsets = np.abs(positions[:, None] - positions[None])
            kernel *= (offsets <= radius).all(-1)
        norm = 1 / np.sqrt(kernel.sum(1))
        kernels.append((compat, kernel, norm))

    def softmax(energy):
        e = np.exp(energy - energy.max(0))
        return e / e.sum(0)

    q = softmax(-unary)
    for _ in range(iterations):
        energy = -unary.copy()
        for compat, kernel, norm in kernels:
            energy += compat * norm * ((q * norm) @ kernel.T)
        q = softmax(energy)
    return q.reshape(-1, height, width)


def random_problem(seed, height=7, width=9, labels=3):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    unary = rng.uniform(0, 3, (labels, height * width)).astype(np.float32)
    return image, unary


def test_whole_image_window_is_the_exact_dense_mean_field():
    image, unary = random_problem(0)
    expected = reference_mean_field(image, unary, iterations=5, **PARAMS)
    got = conv_mean_field(image, unary, iterations=5, window=2 * 9 + 1, blur=1, **PARAMS)
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_window_keeps_only_the_pairs_inside_it():
    image, unary = random_problem(1)
    for window in (3, 5):
        expected = reference_mean_field(image, unary, iterations=4, radius=window // 2, **PARAMS)
        got = conv_mean_field(image, unary, iterations=4, window=window, blur=1, **PARAMS)
        np.testing.assert_allclose(got, expected, atol=2e-5)
    whole = reference_mean_field(image, unary, iterations=4, **PARAMS)
    assert np.abs(conv_mean_field(image, unary, iterations=4, window=3, blur=1, **PARAMS) - whole).max() > 1e-3


def test_pool_is_the_mean_of_each_cells_pixels_and_unpool_keeps_constants():
    values = torch.arange(2 * 7 * 10, dtype=torch.float32).view(2, 7, 10)
    pooled = _pool(values, 3)
    assert pooled.shape == (2, 3, 4)
    for i in range(3):
        for j in range(4):
            cell = values[:, 3 * i: 3 * i + 3, 3 * j: 3 * j + 3]  # clipped at the edges
            torch.testing.assert_close(pooled[:, i, j], cell.mean(dim=(1, 2)))
    constant = torch.full((1, 3, 4), 0.25)
    torch.testing.assert_close(_unpool(constant, 3, (7, 10)), torch.full((1, 7, 10), 0.25))


def noisy_halves(seed=0, size=32, flip=0.3):
    """Two flat colour halves, their true labels, and hard labels with `flip` of the pixels wrong."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((size, size), np.int64)
    truth[:, size // 2:] = 1
    image = np.where(truth[..., None] == 0, [200, 40, 40], [40, 40, 200]).astype(np.uint8)
    noisy = np.where(rng.random(truth.shape) < flip, 1 - truth, truth)
    return image, truth, noisy


@pytest.mark.parametrize("method, window, blur", [("dense", 11, 4), ("conv", 11, 1), ("conv", 7, 2), ("conv", 11, 4)])
def test_both_methods_clean_label_noise_inside_flat_regions(method, window, blur):
    image, truth, noisy = noisy_halves()
    assert (noisy == truth).mean() < 0.75
    refined = crf_from_labels(image, noisy, 2, gt_prob=0.6, bilateral_sxy=20, method=method, window=window, blur=blur)
    assert (refined == truth).mean() > 0.97


def test_conv_agrees_with_pydensecrf_on_probabilities():
    """Same parameters, a window wide enough for the kernels: the labels agree with the lattice's."""
    rng = np.random.default_rng(3)
    image, truth, _ = noisy_halves(seed=3, size=40)
    logits = rng.normal(0, 1.0, (2, 40, 40)) + 1.2 * np.stack([truth == 0, truth == 1])
    probs = np.exp(logits) / np.exp(logits).sum(0)
    kwargs = dict(bilateral_weight=4, bilateral_sxy=10, bilateral_srgb=5, gaussian_weight=3, gaussian_sxy=3)
    dense = crf_from_probs(image, probs, **kwargs).argmax(0)
    conv = crf_from_probs(image, probs, method="conv", window=11, blur=2, **kwargs)
    np.testing.assert_allclose(conv.sum(0), 1.0, atol=1e-5)
    assert (conv.argmax(0) == dense).mean() > 0.97


def test_bad_arguments_are_refused():
    image, unary = random_problem(2)
    with pytest.raises(ValueError, match="odd"):
        conv_mean_field(image, unary, iterations=1, window=4, **PARAMS)
    with pytest.raises(ValueError, match="method"):
        crf_from_labels(image, np.zeros(image.shape[:2], int), 2, method="lattice")


def test_mine_relations_uses_the_configured_crf():
    """relations.crf_method / crf_window / crf_blur reach the CRF of mine-relations (and AMN's labels)."""
    from wsseg.config import load_config
    from wsseg.stages.mine_relations import crf_labels

    image, truth, _ = noisy_halves(seed=4, size=24)
    rng = np.random.default_rng(4)
    high_res = np.clip(np.stack([truth == 1]).astype(np.float32) * 0.6 + rng.uniform(0, 0.5, (1, 24, 24)), 0, 1)
    keys = np.array([2])
    config = load_config([], ["relations.crf_method=conv", "relations.crf_window=3", "relations.crf_blur=2"])
    indices = np.concatenate([np.full((1, 24, 24), 0.3, np.float32), high_res]).argmax(0)
    expected = crf_from_labels(image, indices, 2, method="conv", window=3, blur=2)
    np.testing.assert_array_equal(crf_labels(image, high_res, keys, 0.3, config), np.array([0, 3])[expected])
    dense = crf_labels(image, high_res, keys, 0.3, load_config([], []))
    assert not np.array_equal(crf_labels(image, high_res, keys, 0.3, config), dense)
