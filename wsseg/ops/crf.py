"""Fully connected CRF (Krähenbühl & Koltun 2011) over an RGB image, via pydensecrf, or its
windowed ConvCRF form (wsseg.ops.conv_crf) with the same parameters.

Two uses in wsseg:

- `crf_from_labels`: IRN's `cam_to_ir_label` refinement of hard CAM labels before the
  relation labels are mined (docs/ALGORITHMS.md §1.3).
- `crf_from_probs`: DeepLab's post-processing of softmax probabilities (§2).

Both take the image as (H, W, 3) uint8 RGB in pixels of the original resolution; the
spatial kernel widths (`*_sxy`) are in those pixels and the colour widths (`*_srgb`)
in 0..255 intensity units. Cost grows with H·W·labels·iterations: on one CPU core a
500×375 image with 10 iterations took ~2 s with 3 labels and ~6 s with 21 (noise
images, the worst case for the permutohedral lattice); stages fan it out with joblib.
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf

from wsseg.ops.conv_crf import conv_mean_field

# DeepLab v2's CRF for ResNet-101 as keyword arguments of `crf_from_probs`; the paper
# lists them as (bi_w, bi_xy_std, bi_rgb_std, pos_w, pos_xy_std) = (4, 67, 3, 3, 1).
DEEPLAB_V2_RESNET101_CRF = dict(
    bilateral_weight=4, bilateral_sxy=67, bilateral_srgb=3, gaussian_weight=3, gaussian_sxy=1
)


def _rgb_image(image: np.ndarray) -> np.ndarray:
    """The image as C-contiguous (H, W, 3) uint8, which pydensecrf's C++ side requires."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        # Casting a float image in [0, 1] would silently give a black image: refuse.
        raise ValueError(f"image must be uint8 RGB (0..255), got dtype {image.dtype}")
    image = np.ascontiguousarray(image)
    # pydensecrf takes a writable buffer; a read-only array (np.asarray of a PIL image) needs a copy
    return image if image.flags.writeable else image.copy()


def _mean_field(
    image: np.ndarray,
    unary: np.ndarray,
    *,
    gaussian_sxy: float,
    gaussian_compat: float,
    bilateral_sxy: float,
    bilateral_srgb: float,
    bilateral_compat: float,
    iterations: int,
    method: str = "dense",
    window: int = 11,
    blur: int = 4,
) -> np.ndarray:
    """Run mean-field inference; unary (L, H·W) float32 energies. Returns Q (L, H, W) float32.

    method: "dense" (pydensecrf's fully connected CRF) or "conv" (ConvCRF: the same energy with
    messages from a `window` x `window` neighbourhood of the grid pooled by `blur`; see
    wsseg.ops.conv_crf)."""
    if method == "conv":
        return conv_mean_field(image, unary, gaussian_sxy=gaussian_sxy, gaussian_compat=gaussian_compat,
                               bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb,
                               bilateral_compat=bilateral_compat, iterations=iterations, window=window, blur=blur)
    if method != "dense":
        raise ValueError(f"CRF method must be 'dense' or 'conv', got {method!r}")
    height, width = image.shape[:2]
    num_labels = unary.shape[0]
    crf = dcrf.DenseCRF2D(width, height, num_labels)  # pydensecrf takes width first
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(
        sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=image, compat=bilateral_compat
    )
    q = crf.inference(iterations)
    return np.asarray(q, dtype=np.float32).reshape(num_labels, height, width)


def crf_from_labels(
    image: np.ndarray,
    labels: np.ndarray,
    num_labels: int,
    *,
    gt_prob: float = 0.7,
    gaussian_sxy: float = 3,
    gaussian_compat: float = 3,
    bilateral_sxy: float = 50,
    bilateral_srgb: float = 5,
    bilateral_compat: float = 10,
    iterations: int = 10,
    method: str = "dense",
    window: int = 11,
    blur: int = 4,
) -> np.ndarray:
    """Refine a hard label map with a DenseCRF; IRN's `crf_inference_label`.

    image: (H, W, 3) uint8 RGB (any memory layout). labels: (H, W) int, label
    indices 0..num_labels-1 (IRN passes indices into its `keys`, not class ids).
    Every pixel's unary puts probability `gt_prob` on its label and spreads the rest
    evenly over the others (pydensecrf's `unary_from_labels` with zero_unsure=False:
    no label means "unsure"). Defaults are IRN's (docs/ALGORITHMS.md §1.3). method, window,
    blur: DenseCRF or ConvCRF, as in `_mean_field`.
    Returns (H, W) int64 label indices, the argmax of the mean-field marginals.
    """
    image = _rgb_image(image)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels shape {labels.shape} does not match image {image.shape[:2]}")
    if num_labels < 1:
        raise ValueError(f"num_labels must be >= 1, got {num_labels}")
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(
            f"labels must lie in 0..{num_labels - 1}, got {labels.min()}..{labels.max()}"
        )
    if num_labels == 1:  # nothing to decide (and the "other labels" share is 0/0)
        return np.zeros(labels.shape, dtype=np.int64)

    flat = labels.reshape(-1)
    other_energy = -np.log((1.0 - gt_prob) / (num_labels - 1))
    unary = np.full((num_labels, flat.size), other_energy, dtype=np.float32)
    unary[flat, np.arange(flat.size)] = -np.log(gt_prob)
    q = _mean_field(
        image,
        unary,
        gaussian_sxy=gaussian_sxy,
        gaussian_compat=gaussian_compat,
        bilateral_sxy=bilateral_sxy,
        bilateral_srgb=bilateral_srgb,
        bilateral_compat=bilateral_compat,
        iterations=iterations,
        method=method,
        window=window,
        blur=blur,
    )
    return np.argmax(q, axis=0).astype(np.int64)


def crf_from_probs(
    image: np.ndarray,
    probs: np.ndarray,
    *,
    bilateral_weight: float = 4,
    bilateral_sxy: float = 121,
    bilateral_srgb: float = 5,
    gaussian_weight: float = 3,
    gaussian_sxy: float = 3,
    iterations: int = 10,
    min_prob: float = 1e-5,
    method: str = "dense",
    window: int = 11,
    blur: int = 4,
) -> np.ndarray:
    """Refine per-pixel class probabilities with a DenseCRF; DeepLab's post-processing.

    image: (H, W, 3) uint8 RGB (any memory layout). probs: (L, H, W) float, a
    distribution over L labels per pixel (softmax output at the image's resolution).
    Unary = −log(max(p, min_prob)) (pydensecrf's clip, so p = 0 is not an infinite cost).
    Defaults are DeepLab v1's (bilateral w 4, sxy 121, srgb 5; Gaussian w 3, sxy 3;
    10 iterations). For DeepLab v2 ResNet-101's (4, 67, 3, 3, 1) pass
    `**DEEPLAB_V2_RESNET101_CRF`, i.e. bilateral_weight=4, bilateral_sxy=67,
    bilateral_srgb=3, gaussian_weight=3, gaussian_sxy=1. method, window, blur: DenseCRF
    or ConvCRF, as in `_mean_field`.
    Returns the refined distribution (L, H, W) float32 (sums to 1 over L); argmax it
    for labels.
    """
    image = _rgb_image(image)
    probs = np.asarray(probs)
    if probs.ndim != 3 or probs.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"probs must be (L, H, W) with (H, W) = {image.shape[:2]}, got {probs.shape}"
        )
    num_labels = probs.shape[0]
    if num_labels < 1:
        raise ValueError("probs has no labels (L = 0)")
    unary = -np.log(np.clip(probs.astype(np.float32), min_prob, 1.0)).reshape(num_labels, -1)
    return _mean_field(
        image,
        unary,
        gaussian_sxy=gaussian_sxy,
        gaussian_compat=gaussian_weight,
        bilateral_sxy=bilateral_sxy,
        bilateral_srgb=bilateral_srgb,
        bilateral_compat=bilateral_weight,
        iterations=iterations,
        method=method,
        window=window,
        blur=blur,
    )
