"""ConvCRF (Teichmann & Cipolla, BMVC 2019): DenseCRF's mean field with local messages.

A fully connected CRF sends every pixel a message from every other pixel, which needs the
permutohedral lattice to be affordable. ConvCRF assumes the messages from far away are
negligible once the Gaussian kernels have decayed, and keeps only a `window` x `window`
neighbourhood: the message of every pixel is then a per-pixel-weighted convolution (a
multiply-add per offset), exact for that window, and runs as plain tensor ops on CPU or
GPU. To reach further at the same cost, the paper computes the messages on a grid pooled by
`blur` (avg-pooled features and marginals, messages upsampled bilinearly back): a window of 11
at blur 4 spans +-20 pixels.

wsseg's ConvCRF minimises the energy of wsseg's DenseCRF (`wsseg.ops.crf`): the same unary,
Gaussian (positions / gaussian_sxy) and bilateral (positions / bilateral_sxy, colours /
bilateral_srgb) kernels, Potts compatibilities weighted by their compat values, and the
symmetric kernel normalisation pydensecrf applies by default (each message scaled by
1/sqrt of the kernel's row sums on both sides, which also makes the pooled grid's sums
independent of `blur`). One update, as pydensecrf's:

    Q <- softmax(-unary + sum_m compat_m * n_m * K_m (n_m * Q)),  n_m = 1 / sqrt(K_m 1)

where K_m sums the kernel over the window (the pixel itself included). With a window that
covers the image and blur 1 this is the exact fully connected mean field that the lattice
approximates (tests/ops/test_conv_crf.py checks it against a dense N x N reference). The
paper's own configuration differs in its weighting (no normalisation, a unary weight and a
per-class message weight of 0.2); wsseg keeps DenseCRF's parameters so that the two are
interchangeable in every stage (`relations.crf_method`, `segmenter.crf_method`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def _pool(values: Tensor, blur: int) -> Tensor:
    """(C, H, W) -> (C, ceil(H/blur), ceil(W/blur)): the mean over each blur x blur cell's pixels
    inside the image (a partial cell at the bottom or right edge averages what it has)."""
    if blur == 1:
        return values
    height, width = values.shape[-2:]
    pad = (0, (-width) % blur, 0, (-height) % blur)
    sums = F.avg_pool2d(F.pad(values, pad)[None], blur, divisor_override=1)[0]
    counts = F.avg_pool2d(F.pad(torch.ones_like(values[:1]), pad)[None], blur, divisor_override=1)[0]
    return sums / counts


def _unpool(values: Tensor, blur: int, size: tuple[int, int]) -> Tensor:
    """The pooled grid's (C, h, w) back to (C, H, W): bilinear, each cell's value at its centre."""
    if blur == 1:
        return values
    height, width = values.shape[-2:]
    upsampled = F.interpolate(values[None], size=(height * blur, width * blur), mode="bilinear", align_corners=False)
    return upsampled[0, :, : size[0], : size[1]]


def _offsets(window: int):
    """(row, column) shifts of a window x window neighbourhood, row-major from (-r, -r)."""
    radius = window // 2
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


def window_kernel(features: Tensor, window: int) -> Tensor:
    """exp(-|f_i - f_j|^2 / 2) for every pixel i and every j in its window x window neighbourhood.

    features (D, h, w), already divided by their kernel widths. Returns (window^2, h, w), the
    offsets in `_offsets` order; 0 where j falls outside the image. One offset at a time: the
    (D, window^2, h, w) of all neighbours at once would be hundreds of MB at VOC sizes."""
    radius = window // 2
    depth, height, width = features.shape
    padded = F.pad(features, (radius, radius, radius, radius))
    inside = F.pad(torch.ones(1, height, width, dtype=features.dtype, device=features.device),
                   (radius, radius, radius, radius))
    kernel = features.new_empty(window * window, height, width)
    for index, (dy, dx) in enumerate(_offsets(window)):
        rows, cols = slice(radius + dy, radius + dy + height), slice(radius + dx, radius + dx + width)
        distance = (padded[:, rows, cols] - features).square().sum(dim=0)
        kernel[index] = torch.exp(-0.5 * distance) * inside[0, rows, cols]
    return kernel


def _message(kernel: Tensor, norm: Tensor, q: Tensor, window: int) -> Tensor:
    """norm * sum_j kernel_ij * (norm * q)_j over the window; q (L, h, w). A multiply-add per
    offset (on CPU 8-18x faster than unfolding every neighbour at once, measured at 94x125)."""
    radius = window // 2
    height, width = q.shape[-2:]
    padded = F.pad(q * norm, (radius, radius, radius, radius))
    message = torch.zeros_like(q)
    for index, (dy, dx) in enumerate(_offsets(window)):
        message.add_(kernel[index] * padded[:, radius + dy: radius + dy + height, radius + dx: radius + dx + width])
    return norm * message


def conv_mean_field(
    image: np.ndarray,
    unary: np.ndarray,
    *,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
    iterations: int,
    window: int = 11,
    blur: int = 4,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Mean-field inference with windowed messages; image (H, W, 3) uint8, unary (L, H*W) float
    energies. Returns Q (L, H, W) float32 (sums to 1 over L)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd number of grid cells, got {window}")
    if blur < 1:
        raise ValueError(f"blur must be >= 1, got {blur}")
    height, width = image.shape[:2]
    labels = unary.shape[0]
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    positions = _pool(torch.stack([rows, cols]).to(device), blur)  # in the image's pixels, also when pooled
    colours = _pool(torch.from_numpy(np.ascontiguousarray(image)).to(device=device, dtype=torch.float32).permute(2, 0, 1),
                    blur)
    kernels = []
    for compat, features in ((gaussian_compat, positions / gaussian_sxy),
                             (bilateral_compat, torch.cat([positions / bilateral_sxy, colours / bilateral_srgb]))):
        if compat == 0:
            continue
        kernel = window_kernel(features, window)
        norm = 1.0 / torch.sqrt(kernel.sum(dim=0, keepdim=True) + 1e-20)
        kernels.append((compat, kernel, norm))
    energy = -torch.from_numpy(np.ascontiguousarray(unary, dtype=np.float32)).to(device).view(labels, height, width)
    q = torch.softmax(energy, dim=0)
    for _ in range(iterations if kernels else 0):
        pooled = _pool(q, blur)
        message = sum(compat * _message(kernel, norm, pooled, window) for compat, kernel, norm in kernels)
        q = torch.softmax(energy + _unpool(message, blur, (height, width)), dim=0)
    return q.cpu().numpy().astype(np.float32)
