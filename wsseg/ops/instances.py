"""Instance grouping from IRN's displacement field, and instances from walked seeds.

docs/ALGORITHMS.md §1.6 (instance labels). The synthesize-labels stage composes these as

    groups = centroid_groups(displacement)                  # (h, w) at stride 4
    seeds, seed_classes, seed_groups = instance_seeds(cams, keys, groups)
    walked = random_walk(seeds, boundary)                   # wsseg.ops.random_walk
    walked = upsample x4 (bilinear), crop to H x W
    ids, classes, scores = instances_from_walk(walked, seed_classes)

Units: the displacement field, end points and centroid threshold are in stride-4 pixels
(one unit = 4 image pixels), as IRN trains them; `instances_from_walk` works at the
image's full resolution. Channel 0 of a displacement field is dy (rows), channel 1 dx.
Pure functions: numpy / scipy in, numpy out; torch tensors are accepted as inputs.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

# 4-connectivity (IRN: skimage.measure.label(..., connectivity=1)).
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def _to_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def follow_displacement(
    displacement: np.ndarray | torch.Tensor, num_steps: int = 300
) -> np.ndarray:
    """Move every pixel along the displacement field and return where it ends.

    displacement: (2, h, w) float, (dy, dx) in stride-4 pixels, pointing from a pixel
    toward its instance's centroid. Each pixel p starts at its own coordinates and takes
    `num_steps` steps p <- p + D(p), with D sampled bilinearly at the (fractional) p and
    p clipped to [0, h-1] x [0, w-1] after every step (IRN: 300 steps).
    Returns (h, w, 2) int64 end points (row, col), rounded, inside the map.
    """
    field = _to_numpy(displacement).astype(np.float64)
    if field.ndim != 3 or field.shape[0] != 2:
        raise ValueError(f"displacement must be (2, h, w), got {field.shape}")
    _, height, width = field.shape
    rows, cols = np.meshgrid(
        np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij"
    )
    rows, cols = rows.ravel(), cols.ravel()
    for _ in range(num_steps):
        row0 = np.floor(rows).astype(np.int64)
        col0 = np.floor(cols).astype(np.int64)
        row1 = np.minimum(row0 + 1, height - 1)
        col1 = np.minimum(col0 + 1, width - 1)
        wy = rows - row0
        wx = cols - col0
        step = (
            field[:, row0, col0] * (1 - wy) * (1 - wx)
            + field[:, row0, col1] * (1 - wy) * wx
            + field[:, row1, col0] * wy * (1 - wx)
            + field[:, row1, col1] * wy * wx
        )
        rows = np.clip(rows + step[0], 0, height - 1)
        cols = np.clip(cols + step[1], 0, width - 1)
    end = np.stack([np.rint(rows), np.rint(cols)], axis=-1).astype(np.int64)
    return end.reshape(height, width, 2)


def centroid_groups(
    displacement: np.ndarray | torch.Tensor,
    *,
    num_steps: int = 300,
    centroid_threshold: float = 2.5,
) -> np.ndarray:
    """Group pixels by the centroid region their displacement path ends in.

    displacement: (2, h, w) float (dy, dx) in stride-4 pixels, mean displacement already
    subtracted. Pixels where |D| < centroid_threshold (IRN: 2.5 stride-4 pixels) form
    4-connected centroid regions; every pixel follows the field for `num_steps` steps
    (`follow_displacement`) and takes the region its path ends in. Pixels that end
    outside every region form one more group.
    Returns (h, w) int64 group ids 0..G-1, consecutive over the groups that have at
    least one pixel: centroid regions first (in scipy.ndimage.label order, i.e. raster
    order of their first pixel), the "ended outside every region" group last.
    """
    field = _to_numpy(displacement).astype(np.float64)
    strength = np.sqrt(field[0] ** 2 + field[1] ** 2)
    regions, _ = ndimage.label(strength < centroid_threshold, structure=_FOUR_CONNECTED)
    end = follow_displacement(field, num_steps=num_steps)
    # Region ids 1..R for centroid regions; 0 (outside) becomes the largest id so it
    # sorts last, then np.unique renumbers to consecutive ids over present groups.
    ended_in = regions[end[..., 0], end[..., 1]]
    ended_in = np.where(ended_in == 0, regions.max() + 1, ended_in)
    _, groups = np.unique(ended_in, return_inverse=True)
    return groups.reshape(ended_in.shape).astype(np.int64)


def instance_seeds(
    cams: np.ndarray | torch.Tensor,
    keys: np.ndarray | torch.Tensor,
    groups: np.ndarray | torch.Tensor,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random-walk seed per (class, group): CAM_k restricted to group m.

    cams: (K, h, w) float, the `cam` channels of the present classes (stride 4).
    keys: (K,) int, their 0-based foreground class ids.
    groups: (h, w) int, group ids 0..G-1 from `centroid_groups`.
    Returns seeds (S, h, w) float32, seed_classes (S,) int64 0-based class ids and
    seed_groups (S,) int64 group ids, ordered by class then group. Products that are
    zero everywhere (the class has no activation in that group) are left out: walking
    them would give a zero plane that can never win the argmax, at the walk's cost.
    S = 0 gives seeds of shape (0, h, w).
    """
    cams_np = _to_numpy(cams).astype(np.float32)
    keys_np = _to_numpy(keys).astype(np.int64).reshape(-1)
    groups_np = _to_numpy(groups).astype(np.int64)
    if cams_np.shape[0] != keys_np.shape[0] or cams_np.shape[1:] != groups_np.shape:
        raise ValueError(
            f"cams {cams_np.shape}, keys {keys_np.shape} and groups {groups_np.shape} disagree"
        )
    num_groups = int(groups_np.max()) + 1 if groups_np.size else 0
    seeds, seed_classes, seed_groups = [], [], []
    for cam, key in zip(cams_np, keys_np):
        for group in range(num_groups):
            seed = cam * (groups_np == group)
            if not np.any(seed > 0):
                continue
            seeds.append(seed)
            seed_classes.append(key)
            seed_groups.append(group)
    if not seeds:
        empty = np.zeros((0, *groups_np.shape), dtype=np.float32)
        return empty, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return (
        np.stack(seeds).astype(np.float32),
        np.asarray(seed_classes, dtype=np.int64),
        np.asarray(seed_groups, dtype=np.int64),
    )


def instances_from_walk(
    walked: np.ndarray | torch.Tensor,
    seed_classes: np.ndarray | torch.Tensor,
    *,
    background: float | np.ndarray = 0.25,
    min_area_fraction: float = 0.01,
    normalise: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Turn walked seed maps into instance masks with classes and scores.

    walked: (S, H, W) float, the walked seeds at full image resolution (upsampled and
    cropped). seed_classes: (S,) int, 0-based class id of every seed.
    All planes are divided by their global max over seeds and pixels (unless `normalise`
    is False: the caller has put them on the background's scale), a background plane
    (`background`: a constant, IRN 0.25, or an (H, W) array) is prepended, and each pixel
    takes the argmax. Each seed's mask is split into 4-connected components; each component is
    one instance scored by the max (normalised) walked score inside it. Components
    smaller than min_area_fraction x H x W pixels (IRN: 1 %) are kept with score 0.
    Returns ids (H, W) uint16 (0 = no instance, instance i has id i + 1), classes (M,)
    int64 1-based class ids and scores (M,) float32; instances are ordered by seed,
    then by component (raster order of first pixel). No instance gives M = 0.
    """
    planes = _to_numpy(walked).astype(np.float32)
    classes_np = _to_numpy(seed_classes).astype(np.int64).reshape(-1)
    if planes.ndim != 3 or planes.shape[0] != classes_np.shape[0]:
        raise ValueError(f"walked {planes.shape} and seed_classes {classes_np.shape} disagree")
    height, width = planes.shape[1:]
    ids = np.zeros((height, width), dtype=np.uint16)
    no_instances = (ids, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
    peak = float(planes.max()) if planes.size else 0.0
    if peak <= 0:
        return no_instances  # nothing to normalise by, nothing can beat the background

    if normalise:
        planes = planes / peak
    background_plane = np.broadcast_to(np.asarray(background, dtype=np.float32), (height, width))
    with_background = np.concatenate([background_plane[None], planes])
    winner = np.argmax(with_background, axis=0)  # 0 = background, s + 1 = seed s
    min_area = min_area_fraction * height * width

    classes, scores = [], []
    for seed, seed_class in enumerate(classes_np):
        components, count = ndimage.label(winner == seed + 1, structure=_FOUR_CONNECTED)
        if count == 0:
            continue
        index = np.arange(1, count + 1)
        areas = np.bincount(components.ravel(), minlength=count + 1)[1:]
        peaks = ndimage.maximum(planes[seed], labels=components, index=index)
        first_id = len(classes) + 1
        if first_id + count - 1 > np.iinfo(np.uint16).max:
            raise ValueError("more than 65535 instances in one image: cannot store uint16 ids")
        inside = components > 0
        ids[inside] = (components[inside] + first_id - 1).astype(np.uint16)
        for area, score in zip(areas, peaks):
            classes.append(int(seed_class) + 1)
            # IRN (detect_instance): fragments under 1 % of the image keep score 0.
            scores.append(0.0 if area < min_area else float(score))
    if not classes:
        return no_instances
    return ids, np.asarray(classes, dtype=np.int64), np.asarray(scores, dtype=np.float32)
