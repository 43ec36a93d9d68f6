"""The shared training loop's schedule and optimisers."""

import pytest
import torch

from wsseg.training import adamw, set_poly_lr, sgd


def _lrs(optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def test_warmup_ramps_linearly_then_the_poly_schedule_takes_over():
    weights = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = sgd([([weights[0]], 0.1), ([weights[1]], 1.0)], momentum=0.9, weight_decay=0.0)
    max_steps, warmup = 100, 10
    for step in (0, 4, 9, 10, 50, 99):
        set_poly_lr(optimizer, step, max_steps, 0.9, warmup)
        poly = (1 - step / max_steps) ** 0.9
        ramp = (step + 1) / warmup if step < warmup else 1.0
        assert _lrs(optimizer) == pytest.approx([0.1 * poly * ramp, 1.0 * poly * ramp])
    set_poly_lr(optimizer, 9, max_steps, 0.9, 0)  # no warmup: the plain poly value
    assert _lrs(optimizer)[1] == pytest.approx((1 - 9 / 100) ** 0.9)


def test_adamw_decays_weights_apart_from_the_gradient():
    """With a zero gradient Adam's step is zero, so what moves the weight is the decoupled decay
    lr·weight_decay·w alone (torch's Adam with weight_decay would add it to the gradient, and
    Adam's normalisation would turn it into a step of about lr)."""
    weight = torch.nn.Parameter(torch.full((3,), 2.0))
    optimizer = adamw([([weight], 0.1)], weight_decay=0.5)
    weight.grad = torch.zeros(3)
    optimizer.step()
    assert weight.detach() == pytest.approx(torch.full((3,), 2.0 * (1 - 0.1 * 0.5)))
    assert optimizer.param_groups[0]["base_lr"] == 0.1
