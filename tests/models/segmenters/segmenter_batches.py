"""The tiny fixed batch every segmenter test trains on, and a few SGD steps over it."""

from __future__ import annotations

import torch


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two noise images with blocky labels (and an ignored band) a net can memorise."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[0, :32, :32] = 1
    labels[0, 32:, :] = 2
    labels[1, :, 32:] = 3
    labels[1, 40:, :20] = 4
    labels[1, :8, :] = 255
    return images, labels


def train_losses(model, lr: float, steps: int = 10) -> list[float]:
    images, labels = fixed_batch()
    backbone, heads = model.param_groups()
    optimizer = torch.optim.SGD([{"params": backbone}, {"params": heads, "lr": 10 * lr}], lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        terms = model.loss(model(images), labels)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        losses.append(terms["total"].item())
    return losses
