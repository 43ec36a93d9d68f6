"""Gated CRF loss (Obukhov et al., 2019): a pairwise CRF energy on a network's softmax output,
used as an extra training term where labels are missing or unreliable.

For every pixel i and every pixel j in the (2·radius+1)² window around it (j ≠ i), both inside
the gate (the image proper, not the crop's padding), the energy adds

    k_ij · (1 − Σ_c p_i^c p_j^c),   k_ij = Σ_kernels w · exp(−|xy_i − xy_j|² / 2σ_xy² − |rgb_i − rgb_j|² / 2σ_rgb²)

and is divided by the number of gated pixels. It is low when pixels that look alike and lie
close together get the same class distribution, whatever the labels say, so it pulls the
prediction to image edges where the pseudo labels' boundaries are off. The paper's kernels:
RGBXY (weight 0.9, σ_xy 6, σ_rgb 0.1 on RGB in [0, 1]) plus XY (weight 0.1, σ_xy 6), radius 5,
computed on a downscaled prediction (σ_xy in that map's pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Kernel:
    weight: float
    sigma_xy: float
    sigma_rgb: float | None = None  # None: a position-only kernel


PAPER_KERNELS = (Kernel(0.9, 6.0, 0.1), Kernel(0.1, 6.0))


def gated_crf_loss(probs: Tensor, rgb: Tensor, gate: Tensor, *, kernels: tuple[Kernel, ...] = PAPER_KERNELS,
                   radius: int = 5, xy_scale: float = 1.0) -> Tensor:
    """The gated CRF energy per gated pixel; a float32 scalar with a graph to `probs`.

    probs (B, K, h, w) class probabilities; rgb (B, 3, h, w) in [0, 1] at the same size;
    gate (B, h, w) bool, the pixels that take part (as source and as neighbour).
    `xy_scale`: this map's pixels per kernel pixel (0.5 for a map at half the image's size:
    σ_xy is given in image pixels). A square window, as the paper's.
    """
    height, width = probs.shape[-2:]
    probs = probs.float()
    gate = gate.float()
    padded_probs = F.pad(probs, (radius,) * 4)
    rgb = rgb.float()
    padded_rgb = F.pad(rgb, (radius,) * 4)
    padded_gate = F.pad(gate, (radius,) * 4)
    energy = probs.new_zeros(())
    # Each pair (i, j) and (j, i) has the same kernel, agreement and gate: visit half the offsets, count twice.
    for dy in range(0, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy == 0 and dx <= 0:
                continue
            rows, cols = slice(radius + dy, radius + dy + height), slice(radius + dx, radius + dx + width)
            colour_distance = ((rgb - padded_rgb[:, :, rows, cols]) ** 2).sum(dim=1)
            distance_xy = (dy * dy + dx * dx) / (xy_scale * xy_scale)
            affinity = torch.zeros_like(colour_distance)
            for kernel in kernels:
                exponent = -distance_xy / (2 * kernel.sigma_xy ** 2)
                if kernel.sigma_rgb is None:
                    affinity = affinity + kernel.weight * math.exp(exponent)
                else:
                    affinity = affinity + kernel.weight * torch.exp(exponent - colour_distance / (2 * kernel.sigma_rgb ** 2))
            agreement = (probs * padded_probs[:, :, rows, cols]).sum(dim=1)
            energy = energy + (gate * padded_gate[:, rows, cols] * affinity * (1.0 - agreement)).sum()
    return 2.0 * energy / gate.sum().clamp(min=1)
