"""Test-time inference of the segmenters: whole image, sliding window, multi-scale +
flip, DenseCRF (docs/ALGORITHMS.md §2 "Inference", §3).

Every function takes `predict`, any callable mapping a normalised batch (B, 3, h, w)
to logits (B, K, h, w) at the input size: a segmenter's `model.predict` (see the
segmenter contract). Inputs are one ImageNet-normalised image (3, H, W) on the model's
device, or (4, H, W) for an RGB-D model: the normalised depth (transforms.normalize_depth)
as the fourth channel, resized with nearest neighbour where the image is resized bilinearly
(as in training) and padded with 0 (no reading) where the image is padded with the mean.
Outputs are softmax probabilities (K, H, W) float32 at the image's size on the same device. Predictions at the original resolution are what §3 evaluates. The
functions run under torch.inference_mode() (no autograd; set model.eval() first, or
use `predict_labels`, which does).

Averaging: wherever several predictions of one pixel are combined (overlapping
windows, scales, flips) wsseg averages softmax *probabilities*, the standard of the
segmentation papers' multi-scale + flip evaluation. mmsegmentation averages logits
over overlapping windows instead; for a pixel that one window covers the two agree.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.data.transforms import normalize, normalize_depth
from wsseg.ops.crf import crf_from_probs

Predict = Callable[[Tensor], Tensor]

# Test-time scales of DeepLab v3/v3+, PSPNet, EncNet and MCIBI's ms+flip evaluation.
DEFAULT_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
# Windows per forward pass: a few 513x513 crops fit any GPU at inference.
DEFAULT_WINDOW_BATCH = 4


def _check_image(image: Tensor) -> None:
    if image.dim() != 3 or image.shape[0] not in (3, 4):
        raise ValueError(f"image must be a normalised (3, H, W) tensor, or (4, H, W) with depth, got shape "
                         f"{tuple(image.shape)}")


def _resize(batch: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, 3 or 4, h, w) -> size: RGB bilinear (align_corners=False, no antialiasing), a depth channel
    nearest neighbour (PIL's centre rule, as the training augmentation), so no depth is invented
    between a surface and what lies behind it and 0 (no reading) stays 0."""
    rgb = F.interpolate(batch[:, :3], size=size, mode="bilinear", align_corners=False)
    if batch.shape[1] == 3:
        return rgb
    return torch.cat([rgb, F.interpolate(batch[:, 3:], size=size, mode="nearest-exact")], dim=1)


def _probabilities(predict: Predict, batch: Tensor, amp_dtype: torch.dtype | None) -> Tensor:
    """Run `predict` on (B, 3, h, w) and return float32 softmax probabilities (B, K, h, w)."""
    autocast = (torch.autocast(batch.device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        logits = predict(batch)
    if logits.dim() != 4 or logits.shape[0] != batch.shape[0] or logits.shape[2:] != batch.shape[2:]:
        raise ValueError(f"predict must return logits (B, K, h, w) at the input size {tuple(batch.shape[2:])} "
                         f"for a batch of {batch.shape[0]}, got shape {tuple(logits.shape)}")
    return torch.softmax(logits.float(), dim=1)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis of length `size`.

    Windows start every `stride` pixels; the last one is moved back to end at the border
    (start = size - window), so they cover 0..size-1 exactly, never past it, and no two
    start at the same offset. A `size` <= `window` gets one window at 0 (of length
    min(size, window)). The count is ceil((size - window) / stride) + 1 (mmsegmentation's).
    """
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got window={window}, stride={stride}")
    count = max(size - window + stride - 1, 0) // stride + 1
    return [max(min(index * stride, size - window), 0) for index in range(count)]


def window_boxes(height: int, width: int, window: int, stride: int) -> list[tuple[int, int, int, int]]:
    """The sliding windows of a height x width image as (top, left, bottom, right), bottom/right exclusive.

    Row-major over `window_starts` of each axis; every box is min(window, height) x
    min(window, width) pixels and every pixel lies in at least one box when stride <= window.
    """
    box_height, box_width = min(window, height), min(window, width)
    return [(top, left, top + box_height, left + box_width)
            for top in window_starts(height, window, stride)
            for left in window_starts(width, window, stride)]


def _default_stride(window: int) -> int:
    # mmsegmentation's VOC/ADE configs: stride 341 for 512 windows, i.e. 2/3 of the window.
    return max(1, window * 2 // 3)


def _sliding_batch(predict: Predict, images: Tensor, *, window: int, stride: int, pad_value: float,
                   batch_size: int, amp_dtype: torch.dtype | None) -> Tensor:
    """Sliding-window probabilities of every image of (N, 3, H, W); windows of all N share batches."""
    num_images, _, height, width = images.shape
    # Pad bottom/right up to the window, with the normalised mean colour (0) by default:
    # the segmenters were trained on crops of this size padded the same way, and every
    # window then has the same shape, so windows batch together.
    padded_height, padded_width = max(height, window), max(width, window)
    if (padded_height, padded_width) != (height, width):
        images = F.pad(images, (0, padded_width - width, 0, padded_height - height), value=pad_value)
    boxes = window_boxes(padded_height, padded_width, window, stride)
    jobs = [(index, box) for index in range(num_images) for box in boxes]
    summed: Tensor | None = None
    counts = torch.zeros((padded_height, padded_width), device=images.device)
    for top, left, bottom, right in boxes:
        counts[top:bottom, left:right] += 1
    for first in range(0, len(jobs), batch_size):
        chunk = jobs[first:first + batch_size]
        crops = torch.stack([images[index, :, top:bottom, left:right] for index, (top, left, bottom, right) in chunk])
        probs = _probabilities(predict, crops, amp_dtype)
        if summed is None:
            summed = torch.zeros((num_images, probs.shape[1], padded_height, padded_width), device=images.device)
        for crop_probs, (index, (top, left, bottom, right)) in zip(probs, chunk):
            summed[index, :, top:bottom, left:right] += crop_probs
    return (summed / counts)[:, :, :height, :width]


def _check_window(window: int, stride: int | None, batch_size: int) -> int:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    stride = _default_stride(window) if stride is None else stride
    if not 1 <= stride <= window:
        # A stride above the window would leave pixels no window covers.
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return stride


@torch.inference_mode()
def whole_image(predict: Predict, image: Tensor, *, amp_dtype: torch.dtype | None = None) -> Tensor:
    """Probabilities of one image in one forward pass.

    image: (3, H, W) float, ImageNet-normalised, on the model's device.
    amp_dtype: run `predict` under torch.autocast with this dtype (e.g. torch.bfloat16);
        the softmax is float32.
    Returns (K, H, W) float32 softmax probabilities (sum to 1 over K).
    """
    _check_image(image)
    return _probabilities(predict, image[None], amp_dtype)[0]


@torch.inference_mode()
def sliding_window(predict: Predict, image: Tensor, *, window: int, stride: int | None = None,
                   pad_value: float = 0.0, batch_size: int = DEFAULT_WINDOW_BATCH,
                   amp_dtype: torch.dtype | None = None) -> Tensor:
    """Probabilities of one image from overlapping window x window crops (mmsegmentation's "slide").

    image: (3, H, W) float, ImageNet-normalised. An image shorter than `window` along an
    axis is padded at the bottom/right with `pad_value` (0 = the mean colour after
    normalisation) up to the window, so the model sees its training canvas; the padding
    is cropped off the result. Windows start every `stride` pixels (default 2/3 of the
    window) and the last one per axis is aligned to the border (`window_boxes`).
    Each window's softmax probabilities are summed into the image and divided by the
    number of windows covering each pixel (a count map, > 0 everywhere).
    batch_size: windows per forward pass. amp_dtype: as in `whole_image`.
    Returns (K, H, W) float32 probabilities.
    """
    _check_image(image)
    stride = _check_window(window, stride, batch_size)
    return _sliding_batch(predict, image[None], window=window, stride=stride, pad_value=pad_value,
                          batch_size=batch_size, amp_dtype=amp_dtype)[0]


@torch.inference_mode()
def multi_scale(predict: Predict, image: Tensor, *, scales: Sequence[float] = DEFAULT_SCALES,
                flip: bool = True, window: int | None = None, stride: int | None = None,
                pad_value: float = 0.0, batch_size: int = DEFAULT_WINDOW_BATCH,
                amp_dtype: torch.dtype | None = None) -> Tensor:
    """Multi-scale (+ flip) probabilities of one image, averaged over scales and flips.

    For each scale s the image is resized to (H·s, W·s) rounded half up (bilinear,
    align_corners=False, no antialiasing; scale 1.0 leaves it untouched), predicted as a
    whole (`window` None) or with `sliding_window` (the same window at every scale),
    turned into softmax probabilities, resized back to H x W (bilinear) and averaged.
    With `flip`, the horizontally flipped image is predicted too (in the same batch) and
    its probabilities are flipped back before averaging. (With windows, the flipped
    image's windows are the mirror images of the unflipped ones only when the layout is
    symmetric, e.g. (width - window) a multiple of the stride; otherwise border effects
    of the windows differ between the two, as in every sliding-window ms+flip.)
    Returns (K, H, W) float32 probabilities.
    """
    _check_image(image)
    if not scales:
        raise ValueError("scales must not be empty")
    if any(scale <= 0 for scale in scales):
        raise ValueError(f"scales must be positive, got {tuple(scales)}")
    if window is not None:
        stride = _check_window(window, stride, batch_size)
    height, width = image.shape[1:]
    total: Tensor | None = None
    for scale in scales:
        size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
        scaled = image[None].float()
        if size != (height, width):
            scaled = _resize(scaled, size)
        batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        if window is None:
            probs = _probabilities(predict, batch, amp_dtype)
        else:
            probs = _sliding_batch(predict, batch, window=window, stride=stride, pad_value=pad_value,
                                   batch_size=batch_size, amp_dtype=amp_dtype)
        combined = probs[:1] + probs[1:].flip(-1) if flip else probs
        if size != (height, width):
            # Bilinear weights are convex, so the resized maps still sum to 1 per pixel.
            combined = F.interpolate(combined, size=(height, width), mode="bilinear", align_corners=False)
        total = combined[0] if total is None else total + combined[0]
    return total / (len(scales) * (2 if flip else 1))


def dense_crf(image: np.ndarray, probs: np.ndarray | Tensor, **crf_kwargs) -> np.ndarray:
    """DenseCRF refinement of probabilities (DeepLab's post-processing): `crf_from_probs`.

    image: (H, W, 3) uint8 RGB at the probabilities' resolution. probs: (K, H, W)
    numpy array or tensor (any device). crf_kwargs: keyword arguments of
    wsseg.ops.crf.crf_from_probs (defaults DeepLab v1's; a model's `crf_defaults`).
    Returns (K, H, W) float32, a distribution over K per pixel.
    """
    if isinstance(probs, Tensor):
        probs = probs.detach().float().cpu().numpy()
    return crf_from_probs(image, np.asarray(probs, dtype=np.float32), **crf_kwargs)


def predict_labels(model: nn.Module, image: np.ndarray, *, device: torch.device | str,
                   mode: str = "single", scales: Sequence[float] = DEFAULT_SCALES,
                   window: int | None = None, stride: int | None = None,
                   batch_size: int = DEFAULT_WINDOW_BATCH, crf: dict | None = None,
                   amp_dtype: torch.dtype | None = None,
                   depth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label map of one image from a segmenter: normalise, infer, (CRF), argmax.

    model: a segmenter with `predict` (the segmenter contract), already on `device`;
        it runs in eval() under torch.inference_mode() and gets its mode back after.
    image: (H, W, 3) uint8 RGB.
    mode: "single" (scale 1, no flip) or "msflip" (`scales` + flip, §2's ms+flip).
    window/stride/batch_size: sliding-window inference when `window` is set, else whole image.
    crf: None, or keyword arguments of `crf_from_probs` ({} for its defaults) to refine
        the probabilities before the argmax.
    amp_dtype: autocast dtype for the forward passes (None: float32).
    depth: (H, W) uint16 depth map (larger = farther, 0 = no reading) for a model with
        `input_channels` 4 (RGB-D: ACNet), which needs it; normalised with
        `transforms.normalize_depth` and given as the fourth channel. None for RGB models.
    Returns labels (H, W) uint8 class ids 0..K-1 and probs (K, H, W) float32 (after the
    CRF when one ran); labels == probs.argmax(0).
    """
    if mode not in ("single", "msflip"):
        raise ValueError(f"mode must be 'single' or 'msflip', got {mode!r}")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    channels = getattr(model, "input_channels", 3)
    if (depth is not None) != (channels == 4):
        raise ValueError(f"the model takes {channels} input channels: "
                         f"{'pass its depth map' if channels == 4 else 'it takes no depth map'}")
    planes = normalize(image)
    if depth is not None:
        depth = np.asarray(depth)
        if depth.shape != image.shape[:2]:
            raise ValueError(f"depth map is {depth.shape} but the image is {image.shape[:2]}; they must match")
        planes = np.concatenate([planes, normalize_depth(depth)[:, :, None]], axis=2)
    tensor = torch.from_numpy(planes).permute(2, 0, 1).contiguous().to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            probs = multi_scale(model.predict, tensor, scales=(1.0,) if mode == "single" else scales,
                                flip=mode == "msflip", window=window, stride=stride, batch_size=batch_size,
                                amp_dtype=amp_dtype)
            probs = probs.cpu().numpy()
    finally:
        model.train(was_training)
    if probs.shape[0] > 256:
        raise ValueError(f"uint8 labels hold at most 256 classes, the model predicts {probs.shape[0]}")
    if crf is not None:
        probs = dense_crf(image, probs, **crf)
    return probs.argmax(axis=0).astype(np.uint8), probs.astype(np.float32, copy=False)
