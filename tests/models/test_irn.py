from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsseg.models.backbones import ResNet
from wsseg.models.irn import IRNet, boundary_inference, irn_losses
from wsseg.ops.instances import centroid_groups

IRN_STRIDES = (1, 2, 2, 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convs on a busy 2-core machine: OpenMP threads spin against each other and
    run ~100x slower than one thread. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_irn(depth: int = 18, width: float = 0.25, **kwargs) -> IRNet:
    torch.manual_seed(0)
    return IRNet(ResNet(depth, width=width, strides=IRN_STRIDES), **kwargs)


# ---------------------------------------------------------------- architecture


@pytest.mark.parametrize(
    "depth, width, size, expected",
    [(18, 0.25, (67, 53), (17, 14)), (50, 0.0625, (35, 30), (9, 8))],
)
def test_output_maps_are_at_stride_4_for_odd_sizes(depth, width, size, expected):
    model = small_irn(depth, width)  # basic blocks, then bottlenecks: other channel counts
    logits, displacement = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 1, *expected)
    assert displacement.shape == (2, 2, *expected)
    assert torch.isfinite(logits).all() and torch.isfinite(displacement).all()


def test_a_backbone_with_other_strides_is_refused():
    with pytest.raises(ValueError, match="strides"):
        IRNet(ResNet(18, width=0.25, strides=(1, 2, 2, 2)))


def test_frozen_backbone_gets_no_gradient_and_stays_in_eval_mode():
    model = small_irn()
    model.train()
    assert not model.backbone.training
    logits, displacement = model(torch.randn(1, 3, 40, 40))
    labels = torch.zeros(1, 10, 10, dtype=torch.int64)
    labels[:, 2:7, 2:7] = 1
    irn_losses(logits, displacement, labels, radius=3)["total"].backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    boundary, disp = model.param_groups()
    assert all(p.grad is not None for p in boundary + disp)
    # The two groups are the heads exactly: no backbone parameter, no overlap.
    head_ids = {id(p) for p in boundary} | {id(p) for p in disp}
    assert len(head_ids) == len(boundary) + len(disp)
    backbone_ids = {id(p) for p in model.backbone.parameters()}
    assert not head_ids & backbone_ids
    assert head_ids | backbone_ids == {id(p) for p in model.parameters()}


def test_trained_backbone_gets_gradient_and_joins_the_first_group():
    model = small_irn(train_backbone=True)
    model.train()
    assert model.backbone.training
    logits, displacement = model(torch.randn(1, 3, 40, 40))
    (logits.mean() + displacement.mean()).backward()
    trainable = [p for p in model.backbone.parameters() if p.requires_grad]
    assert trainable and any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    boundary, disp = model.param_groups()
    assert {id(p) for p in trainable} <= {id(p) for p in boundary}
    assert not {id(p) for p in trainable} & {id(p) for p in disp}


# ---------------------------------------------------------------- losses


def reference_directions(radius: int) -> list[tuple[int, int]]:
    dirs = [(0, x) for x in range(1, radius)]
    dirs += [
        (y, x)
        for y in range(1, radius)
        for x in range(-radius + 1, radius)
        if x * x + y * y < radius * radius
    ]
    return dirs


def reference_path(dy: int, dx: int) -> list[tuple[int, int]]:
    return [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 < dy * dy + dx * dx
    ]


def slow_losses(boundary, displacement, labels, radius):
    """IRN's losses pair by pair, straight from docs/ALGORITHMS.md §1.5."""
    sums = {key: 0.0 for key in ("bg", "fg", "neg", "dfg", "dbg")}
    counts = {key: 0 for key in ("bg", "fg", "neg")}
    batch, height, width = labels.shape
    for b in range(batch):
        for y in range(0, height - radius + 1):
            for x in range(radius - 1, width - radius + 1):
                for dy, dx in reference_directions(radius):
                    li, lj = int(labels[b, y, x]), int(labels[b, y + dy, x + dx])
                    if li == 255 or lj == 255:
                        continue
                    path = reference_path(dy, dx)
                    a = 1.0 - max(float(boundary[b, y + py, x + px]) for py, px in path)
                    delta = displacement[b, :, y, x] - displacement[b, :, y + dy, x + dx]
                    if li == lj == 0:
                        sums["bg"] += -np.log(a + 1e-5)
                        sums["dbg"] += float(np.abs(delta).sum())
                        counts["bg"] += 1
                    elif li == lj:
                        sums["fg"] += -np.log(a + 1e-5)
                        sums["dfg"] += float(np.abs(delta - np.array([dy, dx])).sum())
                        counts["fg"] += 1
                    else:
                        sums["neg"] += -np.log(1 + 1e-5 - a)
                        counts["neg"] += 1
    mean = lambda total, n: total / n if n else 0.0  # noqa: E731
    out = {
        "aff_bg_pos": mean(sums["bg"], counts["bg"]),
        "aff_fg_pos": mean(sums["fg"], counts["fg"]),
        "aff_neg": mean(sums["neg"], counts["neg"]),
        "disp_fg": mean(sums["dfg"], 2 * counts["fg"]),
        "disp_bg": mean(sums["dbg"], 2 * counts["bg"]),
    }
    aff_pos = 0.5 * out["aff_bg_pos"] + 0.5 * out["aff_fg_pos"]
    out["total"] = 0.5 * (aff_pos + out["aff_neg"]) + 0.5 * (out["disp_fg"] + out["disp_bg"])
    return out


def test_losses_match_a_pair_by_pair_reference():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 1, 7, 9, generator=generator, dtype=torch.float64) * 2
    displacement = torch.randn(2, 2, 7, 9, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, 3, (2, 7, 9), generator=generator)
    labels[0, 0, :4] = 255
    labels[1, :, :2] = 255
    losses = irn_losses(logits.float(), displacement.float(), labels, radius=3)
    expected = slow_losses(
        torch.sigmoid(logits[:, 0]).numpy(), displacement.numpy(), labels.numpy(), radius=3
    )
    assert set(losses) == set(expected)
    for key, value in expected.items():
        assert losses[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_all_background_has_no_fg_or_neg_pairs_and_a_finite_loss():
    logits = torch.randn(1, 1, 24, 24, requires_grad=True)
    displacement = torch.randn(1, 2, 24, 24, requires_grad=True)
    labels = torch.zeros(1, 24, 24, dtype=torch.int64)
    losses = irn_losses(logits, displacement, labels)  # IRN's radius 10
    assert losses["aff_fg_pos"].item() == 0 and losses["aff_neg"].item() == 0
    assert losses["disp_fg"].item() == 0
    assert losses["aff_bg_pos"].item() > 0 and losses["disp_bg"].item() > 0
    assert torch.isfinite(losses["total"])
    losses["total"].backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(displacement.grad).all()


def test_all_unsure_gives_zero_not_nan():
    logits = torch.randn(1, 1, 12, 12, requires_grad=True)
    displacement = torch.randn(1, 2, 12, 12, requires_grad=True)
    labels = torch.full((1, 12, 12), 255, dtype=torch.int64)
    losses = irn_losses(logits, displacement, labels, radius=4)
    assert all(value.item() == 0 for value in losses.values())
    losses["total"].backward()
    assert not torch.isnan(logits.grad).any()


def test_a_correct_boundary_costs_less_than_an_inverted_one():
    labels = torch.zeros(1, 12, 20, dtype=torch.int64)
    labels[:, :, :10] = 1  # class 1 left, background right
    on_edge = torch.zeros(1, 1, 12, 20, dtype=torch.bool)
    on_edge[..., 9:11] = True
    correct = torch.where(on_edge, 8.0, -8.0)
    inverted = -correct
    zero_disp = torch.zeros(1, 2, 12, 20)
    good = irn_losses(correct, zero_disp, labels, radius=4)
    bad = irn_losses(inverted, zero_disp, labels, radius=4)
    for key in ("aff_bg_pos", "aff_fg_pos", "aff_neg", "total"):
        assert good[key] < bad[key], key
    # Every negative pair crosses the edge columns; positive pairs touching them pay.
    assert good["aff_neg"] < 0.01 < bad["aff_neg"]


def test_a_few_optimizer_steps_lower_the_loss():
    model = small_irn()
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 40, 40, generator=generator)
    labels = torch.zeros(2, 10, 10, dtype=torch.int64)
    labels[0, 2:7, 3:8] = 1
    labels[1, 4:9, 1:6] = 2
    labels[1, 0:2, :] = 255
    images[0, :, 8:28, 12:32] += 2.0  # the objects are visible in the image
    images[1, :, 16:36, 4:24] -= 2.0
    boundary_params, disp_params = model.param_groups()
    # Lower lrs than IRN's 0.1 / 1.0, which oscillate on a random backbone's features.
    optimizer = torch.optim.SGD(
        [{"params": boundary_params, "lr": 0.02}, {"params": disp_params, "lr": 0.05}],
        weight_decay=1e-4,
    )
    model.train()
    history = []
    for _ in range(8):
        losses = irn_losses(*model(images), labels, radius=4)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append(losses["total"].item())
    assert history[-1] < 0.85 * history[0]
    assert all(later < earlier for earlier, later in zip(history, history[1:]))


def test_trained_displacement_points_toward_the_object_centre():
    """The sign convention: optimise a free field with the loss and look where it points."""
    size, radius = 20, 5
    labels = torch.zeros(1, size, size, dtype=torch.int64)
    labels[:, 5:15, 6:16] = 1  # a 10 x 10 square, centre (9.5, 10.5)
    displacement = torch.zeros(1, 2, size, size, requires_grad=True)
    logits = torch.zeros(1, 1, size, size)
    optimizer = torch.optim.SGD([displacement], lr=300.0)  # per-pixel gradients are ~1/#pairs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1 - step / 60) ** 0.9)
    for _ in range(60):
        losses = irn_losses(logits, displacement, labels, radius=radius)
        optimizer.zero_grad()
        (losses["disp_fg"] + losses["disp_bg"]).backward()
        optimizer.step()
        schedule.step()

    field = displacement.detach()[0].numpy()
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    to_centre = np.stack([9.5 - rows, 10.5 - cols])
    inside = (labels[0].numpy() == 1) & (np.hypot(*to_centre) > 2)
    cosine = (field * to_centre).sum(0) / (np.hypot(*field) * np.hypot(*to_centre) + 1e-9)
    assert cosine[inside].min() > 0.9
    assert np.abs(field - to_centre)[:, inside].mean() < 0.5
    outside = labels[0].numpy() == 0
    assert np.abs(field[:, outside]).max() < 0.5

    # And the grouping reads it as one object on a background.
    groups = centroid_groups(field)
    object_group = groups[9, 10]
    assert np.all(groups[labels[0].numpy() == 1] == object_group)
    assert np.all(groups[outside] != object_group)


# ---------------------------------------------------------------- inference


def test_boundary_inference_shapes_padding_and_mean_displacement():
    model = small_irn()
    model.mean_displacement.copy_(torch.tensor([0.5, -1.0]))
    model.train()
    image = torch.randn(3, 21, 27)
    boundary, displacement = boundary_inference(model, image, pad_to=32)
    assert boundary.shape == (6, 7) and displacement.shape == (2, 6, 7)
    assert boundary.min() >= 0 and boundary.max() <= 1
    assert model.training  # the mode is restored

    with torch.no_grad():
        padded = F.pad(image, (0, 32 - 27, 0, 32 - 21))[None]
        _, raw = model(padded)
    expected = raw[0, :, :6, :7] - torch.tensor([0.5, -1.0])[:, None, None]
    torch.testing.assert_close(displacement, expected)

    # A side longer than pad_to (or pad_to None) is padded to a multiple of 4 only.
    with torch.no_grad():
        _, raw = model(F.pad(image, (0, 28 - 27, 0, 24 - 21))[None])
    expected = raw[0, :, :6, :7] - torch.tensor([0.5, -1.0])[:, None, None]
    for pad_to in (None, 16):
        _, displacement = boundary_inference(model, image, pad_to=pad_to)
        torch.testing.assert_close(displacement, expected)


def test_boundary_inference_is_flip_equivariant():
    model = small_irn()
    torch.manual_seed(5)
    image = torch.randn(3, 21, 27)
    boundary, _ = boundary_inference(model, image, pad_to=32)
    flipped, _ = boundary_inference(model, image.flip(-1), pad_to=32)
    torch.testing.assert_close(flipped, boundary.flip(-1))

    symmetric = image + image.flip(-1)
    boundary, _ = boundary_inference(model, symmetric, pad_to=32)
    torch.testing.assert_close(boundary, boundary.flip(-1))
