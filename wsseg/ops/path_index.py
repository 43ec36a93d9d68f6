"""Pairs of nearby pixels and the paths between them (IRN's path index, docs/ALGORITHMS.md §1.4).

IRN compares every pixel (a *source*) with its neighbours within a radius r, at
stride 4. The neighbour offsets form a half disc, so every unordered pair of pixels
is listed once. The affinity of a pair is 1 minus the strongest class boundary on
the straight path between the two pixels, and the pair's label says whether the
two pixels belong together (relation labels from mine-relations).

Everything here works on stride-4 maps, on CPU or CUDA (the device of the input).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from wsseg.class_ids import IGNORE

# Pair codes returned by pair_labels (uint8).
BG_POS = 0  # both pixels are background
FG_POS = 1  # both pixels have the same foreground class
NEG = 2  # the pixels have different classes
UNSURE = 3  # either pixel is unsure (IGNORE in the relation map)


@functools.lru_cache(maxsize=None)
def _directions(radius: int) -> tuple[tuple[int, int], ...]:
    if radius < 2:
        raise ValueError(f"radius must be >= 2, got {radius}")
    dirs = [(0, x) for x in range(1, radius)]
    for y in range(1, radius):
        for x in range(-radius + 1, radius):
            if x * x + y * y < radius * radius:
                dirs.append((y, x))
    return tuple(dirs)


def directions(radius: int) -> np.ndarray:
    """Neighbour offsets of a source pixel, a half disc of the given radius.

    Returns (D, 2) int64 offsets (dy, dx) in stride-4 pixels: (0, x) for x = 1..r-1,
    then (y, x) for y = 1..r-1, x = -(r-1)..r-1 with x² + y² < r². Each unordered
    pair of pixels appears once (d is listed, -d is not). IRN: r = 10 gives 152
    directions (training), r = 5 gives 34 (the random walk).
    """
    return np.array(_directions(radius), dtype=np.int64).reshape(-1, 2)


@functools.lru_cache(maxsize=None)
def _path_points(dy: int, dx: int) -> tuple[tuple[int, int], ...]:
    length_sq = dy * dy + dx * dx
    if length_sq == 0:
        raise ValueError("direction (0, 0) has no path")
    points = []
    for y in range(min(0, dy), max(0, dy) + 1):
        for x in range(min(0, dx), max(0, dx) + 1):
            # squared distance of (y, x) to the line through 0 and d, compared exactly
            if (dy * x - dx * y) ** 2 < length_sq:
                points.append((y, x))
    # order from 0 to d by the projection on d (ties, if any, in raster order)
    points.sort(key=lambda p: p[0] * dy + p[1] * dx)
    return tuple(points)


def path_points(direction) -> np.ndarray:
    """Integer points on the straight path from (0, 0) to ``direction`` = (dy, dx).

    The points of the box spanned by 0 and d whose distance to the line through 0
    and d is below 1, both endpoints included, ordered from 0 to d. Returns (P, 2)
    int64 offsets (dy, dx).
    """
    dy, dx = (int(v) for v in direction)
    return np.array(_path_points(dy, dx), dtype=np.int64).reshape(-1, 2)


def source_crop(height: int, width: int, radius: int) -> tuple[slice, slice]:
    """The sources from which every direction stays inside a (height, width) map.

    Rows [0, H-r+1), columns [r-1, W-r+1): directions go down by up to r-1 rows
    and sideways by up to r-1 columns.
    """
    if height < radius or width < 2 * radius - 1:
        raise ValueError(
            f"a {height}x{width} map is too small for radius {radius}: "
            f"need at least {radius}x{2 * radius - 1}"
        )
    return slice(0, height - radius + 1), slice(radius - 1, width - radius + 1)


def _shifted(maps: Tensor, crop: tuple[slice, slice], offset) -> Tensor:
    """View of ``maps`` (B, H, W) at the sources of ``crop`` moved by offset (dy, dx)."""
    rows, cols = crop
    dy, dx = int(offset[0]), int(offset[1])
    return maps[:, rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx]


def path_affinity(boundary: Tensor, radius: int) -> Tensor:
    """Affinity of every source with every neighbour: 1 - max boundary on their path.

    boundary: (B, H, W) float in [0, 1], class-boundary probability at stride 4.
    Returns (B, D, H', W') with D = len(directions(radius)) and (H', W') the
    sources of source_crop(H, W, radius): out[b, k, y, x] is the affinity between
    the source at (y, x + r - 1) of the map and that pixel moved by directions[k].

    Differentiable w.r.t. boundary: the gradient of each affinity goes to the path
    point that holds the maximum (as max-pooling does). Only the (B, D, H', W')
    index of that point is kept for the backward pass, not the path values.
    """
    if boundary.dim() != 3:
        raise ValueError(f"boundary must be (B, H, W), got shape {tuple(boundary.shape)}")
    batch, height, width = boundary.shape
    crop = source_crop(height, width, radius)
    dirs = directions(radius)
    num_rows = crop[0].stop - crop[0].start
    num_cols = crop[1].stop - crop[1].start
    device = boundary.device

    with torch.no_grad():
        # Find which path point holds the maximum: a running max over shifted views
        # (much faster than stacking the path values and taking argmax).
        rows = torch.arange(crop[0].start, crop[0].stop, device=device)
        cols = torch.arange(crop[1].start, crop[1].stop, device=device)
        source_index = rows[:, None] * width + cols[None, :]  # flat index in the (H, W) map
        winner = torch.empty(batch, len(dirs), num_rows, num_cols, dtype=torch.int64, device=device)
        for k, direction in enumerate(dirs):
            points = path_points(direction)  # starts at the source, offset (0, 0)
            best = _shifted(boundary, crop, points[0]).clone()
            best_offset = winner[:, k]
            best_offset.fill_(0)
            for dy, dx in points[1:]:
                values = _shifted(boundary, crop, (dy, dx))
                higher = values > best
                torch.maximum(best, values, out=best)
                best_offset.masked_fill_(higher, int(dy * width + dx))
        winner += source_index

    # Gather the winning values with autograd: the backward pass is one scatter-add.
    flat = boundary.reshape(batch, height * width)
    path_max = flat.gather(1, winner.view(batch, -1)).view(batch, len(dirs), num_rows, num_cols)
    return 1.0 - path_max


def labels_at_stride4(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Full-resolution label maps (B, H, W) -> (B, h, w) on the stride-4 grid of IRN's outputs.

    Each stride-4 cell takes the pixel at its centre, (4y + 2, 4x + 2), clamped to the map:
    what IRN's `pil_rescale(label, 0.25, 0)` (PIL's nearest resize) picks when H and W are
    multiples of 4. The cell's corner pixel (4y, 4x) would shift every label by 2 pixels
    towards the top left, and on an object's edge sample the other side of it.
    """
    rows = (torch.arange(size[0], device=labels.device) * 4 + 2).clamp(max=labels.shape[1] - 1)
    cols = (torch.arange(size[1], device=labels.device) * 4 + 2).clamp(max=labels.shape[2] - 1)
    return labels[:, rows][:, :, cols]


def pair_labels(labels: Tensor, radius: int) -> Tensor:
    """Relation code of every (source, neighbour) pair from a label map.

    labels: (B, H, W) int64 class ids at stride 4 (0 background, 1..C foreground,
    255 unsure). Returns (B, D, H', W') uint8 with the layout of path_affinity:
    BG_POS (both 0), FG_POS (same class > 0), NEG (different classes), UNSURE
    (either is 255). Built on the fly, so the data loader ships only label maps.
    """
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    _, height, width = labels.shape
    crop = source_crop(height, width, radius)
    source = _shifted(labels, crop, (0, 0))
    codes = []
    for direction in directions(radius):
        target = _shifted(labels, crop, direction)
        code = torch.full(source.shape, NEG, dtype=torch.uint8, device=labels.device)
        same = source == target
        code[same & (source == 0)] = BG_POS
        code[same & (source != 0)] = FG_POS
        code[(source == IGNORE) | (target == IGNORE)] = UNSURE
        codes.append(code)
    return torch.stack(codes, dim=1)
