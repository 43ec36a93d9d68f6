"""The losses for training on partly wrong labels: boundary label relaxation and the gated CRF
loss, each against a per-pixel reference, plus what each is for."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsseg.models.segmenters.common import cross_entropy, relaxed_nll
from wsseg.models.segmenters.deeplab import DeepLabV2
from wsseg.ops.gated_crf import PAPER_KERNELS, Kernel, gated_crf_loss


def slow_relaxed_nll(logits, labels, radius):
    probs = F.softmax(logits.double(), dim=1).numpy()
    labels = labels.numpy()
    batch, _, height, width = probs.shape
    out = np.zeros((batch, height, width))
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                if labels[b, y, x] == 255:
                    continue
                window = labels[b, max(0, y - radius): y + radius + 1, max(0, x - radius): x + radius + 1]
                classes = {int(c) for c in window.flatten() if c != 255}
                out[b, y, x] = -math.log(sum(probs[b, c, y, x] for c in classes))
    return out


def random_labels(generator, shape, num_classes):
    labels = torch.randint(0, num_classes, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < 0.15] = 255
    return labels


def test_relaxed_nll_matches_the_per_pixel_definition():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, 9, generator=generator)
    labels = random_labels(generator, (2, 7, 9), 4)
    for radius in (1, 2):
        np.testing.assert_allclose(relaxed_nll(logits, labels, radius).numpy(), slow_relaxed_nll(logits, labels, radius),
                                   rtol=1e-5, atol=1e-6)


def test_relaxation_is_cross_entropy_inside_regions_and_free_on_a_shifted_boundary():
    generator = torch.Generator().manual_seed(1)
    labels = torch.zeros(1, 12, 12, dtype=torch.long)
    labels[:, :, 6:] = 2  # two regions meeting at column 6
    logits = torch.randn(1, 3, 12, 12, generator=generator)
    relaxed = relaxed_nll(logits, labels, 1)
    plain = F.cross_entropy(logits, labels, reduction="none")
    # Away from the boundary the relaxed loss is the cross-entropy.
    torch.testing.assert_close(relaxed[:, :, :5], plain[:, :, :5])
    torch.testing.assert_close(relaxed[:, :, 8:], plain[:, :, 8:])
    # A prediction whose boundary sits one pixel off costs (almost) nothing relaxed, a lot plain.
    shifted = torch.full((1, 3, 12, 12), -20.0)
    shifted[:, 0, :, :7] = 20.0
    shifted[:, 2, :, 7:] = 20.0
    assert relaxed_nll(shifted, labels, 1).max() < 1e-6
    assert F.cross_entropy(shifted, labels, reduction="none")[:, :, 6].min() > 30


def test_cross_entropy_relaxes_at_the_labels_resolution_for_both_size_rules():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 5, 5, generator=generator)
    labels = random_labels(generator, (2, 17, 17), 3)
    # each rule upsamples in the geometry its plain loss trains: centre-aligned for "label", corner-aligned
    # (logit i is label pixel 4i of 17 here, the pixel `downsample_labels` gives it) for "logits"
    for size_from, corners in (("label", False), ("logits", True)):
        upsampled = F.interpolate(logits, size=(17, 17), mode="bilinear", align_corners=corners)
        expected = torch.from_numpy(slow_relaxed_nll(upsampled, labels, 2)).sum() / (labels != 255).sum()
        torch.testing.assert_close(cross_entropy(logits, labels, size_from, relax=2).double(), expected, rtol=1e-5, atol=1e-6)


def test_a_segmenter_uses_its_label_relaxation_in_every_pixel_term():
    torch.manual_seed(0)
    model = DeepLabV2(3, depth=18, width=0.125)
    model.train()
    images = torch.randn(2, 3, 33, 33)
    labels = random_labels(torch.Generator().manual_seed(3), (2, 33, 33), 3)
    outputs = model(images)
    plain = model.loss(outputs, labels)
    model.label_relaxation = 2
    relaxed = model.loss(outputs, labels)
    # each relaxed term is the relaxed cross-entropy of that output, and never above the plain one
    for key, value in relaxed.items():
        if key != "total":
            output = outputs["out" if key == "main" else key]
            torch.testing.assert_close(value, cross_entropy(output, labels, "logits", relax=2))
            assert value <= plain[key] + 1e-6
    assert relaxed["total"] < plain["total"]


def slow_gated_crf(probs, rgb, gate, kernels, radius, xy_scale):
    probs, rgb, gate = probs.double().numpy(), rgb.double().numpy(), gate.numpy()
    batch, _, height, width = probs.shape
    energy = 0.0
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                if not gate[b, y, x]:
                    continue
                for v in range(max(0, y - radius), min(height, y + radius + 1)):
                    for u in range(max(0, x - radius), min(width, x + radius + 1)):
                        if (v, u) == (y, x) or not gate[b, v, u]:
                            continue
                        d_xy = ((v - y) ** 2 + (u - x) ** 2) / xy_scale ** 2
                        d_rgb = ((rgb[b, :, y, x] - rgb[b, :, v, u]) ** 2).sum()
                        k = sum(kernel.weight * math.exp(-d_xy / (2 * kernel.sigma_xy ** 2)
                                                         - (0 if kernel.sigma_rgb is None else d_rgb / (2 * kernel.sigma_rgb ** 2)))
                                for kernel in kernels)
                        energy += k * (1 - (probs[b, :, y, x] * probs[b, :, v, u]).sum())
    return energy / max(1, gate.sum())


def test_gated_crf_matches_the_pairwise_definition():
    generator = torch.Generator().manual_seed(4)
    probs = F.softmax(torch.randn(2, 3, 6, 7, generator=generator), dim=1)
    rgb = torch.rand(2, 3, 6, 7, generator=generator)
    gate = torch.rand(2, 6, 7, generator=generator) > 0.2
    kernels = (Kernel(0.9, 2.0, 0.3), Kernel(0.1, 1.5))
    for radius, xy_scale in ((2, 1.0), (3, 0.5)):
        got = gated_crf_loss(probs, rgb, gate, kernels=kernels, radius=radius, xy_scale=xy_scale)
        assert got.item() == pytest.approx(slow_gated_crf(probs, rgb, gate, kernels, radius, xy_scale), rel=1e-5)


def test_gated_crf_descends_to_the_image_edge_and_ignores_the_gate_outside():
    # Two flat colour halves; a prediction whose boundary is 3 px off the colour edge.
    rgb = torch.zeros(1, 3, 16, 16)
    rgb[:, :, :, 8:] = 1.0
    gate = torch.ones(1, 16, 16, dtype=torch.bool)
    logits = torch.full((1, 2, 16, 16), -1.5)
    logits[:, 0, :, :5] = 1.5
    logits[:, 1, :, 5:] = 1.5
    logits.requires_grad_(True)
    optimizer = torch.optim.Adam([logits], lr=0.1)
    start = gated_crf_loss(F.softmax(logits, 1), rgb, gate, kernels=PAPER_KERNELS, radius=3).item()
    for _ in range(300):
        optimizer.zero_grad()
        gated_crf_loss(F.softmax(logits, 1), rgb, gate, kernels=PAPER_KERNELS, radius=3).backward()
        optimizer.step()
    predicted = logits.argmax(1)[0]
    assert gated_crf_loss(F.softmax(logits, 1), rgb, gate, kernels=PAPER_KERNELS, radius=3).item() < 0.5 * start
    # the columns between the wrong boundary and the colour edge changed to the class of their colour
    assert (predicted[:, :8] == 0).all() and (predicted[:, 8:] == 1).all()
    # Pixels outside the gate neither count nor receive a gradient.
    gate[:, :, 12:] = False
    logits.grad = None
    gated_crf_loss(F.softmax(logits, 1), rgb, gate, kernels=PAPER_KERNELS, radius=3).backward()
    assert logits.grad[:, :, :, 12:].abs().max() == 0
