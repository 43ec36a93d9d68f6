"""The tiny fixed batch every segmenter test trains on, a few SGD steps over it, and shared checks."""

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


def train_steps(model, lr: float, steps: int = 10, *, images=None, labels=None, weight_decay: float = 0.0
                ) -> tuple[list[float], list[dict]]:
    """SGD (momentum 0.9, heads at 10x lr) on a batch (the fixed one by default), calling the
    model's after_step hook after each step as train-segmenter does. Returns the total loss
    and the loss terms of every step."""
    if images is None:
        images, labels = fixed_batch()
    backbone, heads = model.param_groups()
    optimizer = torch.optim.SGD([{"params": backbone}, {"params": heads, "lr": 10 * lr}], lr=lr, momentum=0.9,
                                weight_decay=weight_decay)
    losses, history = [], []
    for step in range(steps):
        outputs = model(images)
        terms = model.loss(outputs, labels)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        if hasattr(model, "after_step"):
            with torch.no_grad():
                model.after_step(outputs, labels, step, steps)
        losses.append(terms["total"].item())
        history.append(terms)
    return losses, history


def train_losses(model, lr: float, steps: int = 10) -> list[float]:
    return train_steps(model, lr, steps)[0]


def assert_param_groups_partition(model) -> None:
    """param_groups() splits the trainable parameters into backbone and heads, each once."""
    backbone, heads = model.param_groups()
    ids = [id(p) for p in backbone + heads]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in backbone} == {id(p) for p in model.backbone.parameters()}


def eval_outputs(model, num_classes: int, size: tuple[int, int] = (65, 49)) -> dict[str, torch.Tensor]:
    """In eval mode, predict() on an odd-sized image gives logits at the input size, the same twice;
    returns forward()'s outputs on that image (for the caller's stride checks)."""
    model.eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        first, second = model.predict(x), model.predict(x)
        outputs = model(x)
    assert first.shape == (1, num_classes, *size)
    assert torch.equal(first, second)
    return outputs


def randomise_bn(module: torch.nn.Module, seed: int = 1) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode checks see them."""
    generator = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            bn.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            bn.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
