"""AMN's network, loss and maps (wsseg/models/amn.py) against literal restatements of the
released code's steps, plus a network that must fit one batch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from wsseg.metrics import ConfusionMatrix
from wsseg.models.amn import AMNet, amn_loss, amn_maps, nearest
from wsseg.models.backbones import ResNet


def tiny_amn(num_classes=3, seed=0):
    torch.manual_seed(seed)
    backbone = ResNet(18, width=0.25, strides=(1, 2, 2, 1), frozen_bn=False,
                      trainable=("stem", "layer1", "layer2", "layer3", "layer4"))
    return AMNet(backbone, num_classes, rates=(1, 2))


def reference_loss(logits, labels, eps):
    """gaviotas/AMN step/train_amn.py, restated: PIL-nearest labels, smoothed one-hot, balanced CE."""
    n, c, h, w = logits.shape
    resized = torch.stack([torch.from_numpy(np.array(Image.fromarray(label.float().numpy()).resize((w, h), Image.NEAREST)))
                           for label in labels]).long()
    label_ = resized.clone()
    label_[resized == 255] = 0
    given = torch.full((n, c, h, w), eps / (c - 1))
    given.scatter_(1, label_[:, None], 1 - eps)
    structure = -torch.sum(F.log_softmax(logits, dim=1) * given, dim=1)
    bg = (resized == 0).float()
    fg = ((resized != 0) & (resized != 255)).float()
    return ((structure * bg).sum() / bg.sum() + (structure * fg).sum() / fg.sum()) / 2


def test_loss_is_amns_balanced_smoothed_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 6, 7, generator=generator)
    labels = torch.randint(0, 4, (2, 23, 29), generator=generator)
    labels[:, :5] = 255
    for eps in (0.0, 0.4):
        assert torch.allclose(amn_loss(logits, labels, eps), reference_loss(logits, labels, eps), atol=1e-5)
    # the balance: ten times more background pixels does not change the weight of the objects
    single = torch.zeros(1, 8, 8, dtype=torch.long)
    single[0, :1, :1] = 1
    logits = torch.zeros(1, 2, 8, 8)
    logits[0, 1] = 5.0  # every pixel says class 1: background all wrong, the object right
    loss = amn_loss(logits, single, 0.0)
    assert loss.item() == pytest.approx((F.softplus(torch.tensor(5.0)).item() + F.softplus(torch.tensor(-5.0)).item()) / 2,
                                        rel=1e-4)


def test_nearest_is_pils():
    labels = torch.randint(0, 200, (17, 23))
    for size in ((4, 6), (17, 23), (30, 11)):
        expected = np.asarray(Image.fromarray(labels.numpy().astype(np.uint8)).resize(size[::-1], Image.NEAREST))
        assert np.array_equal(nearest(labels, size).numpy(), expected)


def test_maps_follow_amns_make_amn_cam():
    """Flip-averaged logits summed over scales, softmax over background + classes, present classes
    min-max stretched except on confident background, which keeps the raw probability."""
    model = tiny_amn().eval()
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(3, 40, 52, generator=generator)
    tags = torch.tensor([1.0, 0.0, 1.0])
    keys = torch.tensor([0, 2])
    background = torch.zeros(40, 52, dtype=torch.bool)
    background[:, :20] = True
    scales = (1.0, 0.5)
    cam, high_res = amn_maps(model, image, keys, tags, background, scales)

    with torch.no_grad():  # the released code's steps, one by one
        highs = []
        for scale in scales:
            size = (round(40 * scale), round(52 * scale))
            x = image[None] if scale == 1.0 else F.interpolate(image[None], size=size, mode="bicubic",
                                                                align_corners=False, antialias=True)
            out = model(torch.cat([x, x.flip(-1)]), tags[None].expand(2, -1))
            out = (out[0] + out[1].flip(-1)) / 2
            highs.append(F.interpolate(out[None], (40, 52), mode="bilinear", align_corners=False)[0])
        probabilities = torch.softmax(sum(highs) / len(scales), dim=0)[[1, 3]]
        low = probabilities.amin(dim=(1, 2), keepdim=True)
        norm = (probabilities - low) / (probabilities.amax(dim=(1, 2), keepdim=True) - low + 1e-5)
        expected = torch.where(background[None], probabilities, norm)
    assert torch.allclose(high_res, expected, atol=1e-5)
    assert cam.shape == (2, 10, 13)
    assert high_res[:, :, 20:].amax() > 0.99  # the stretch reaches 1 off the confident background


def test_amn_fits_one_batch():
    """A tiny AMN learns a fixed batch's labels: mIoU >= 0.9 of its per-pixel argmax against the
    labels as the loss sees them (picked at the logits' size)."""
    torch.manual_seed(0)
    model = tiny_amn(num_classes=2)
    images = torch.randn(4, 3, 128, 128)
    labels = torch.zeros(4, 128, 128, dtype=torch.long)
    tags = torch.zeros(4, 2)
    for index in range(4):
        cls = index % 2
        top, left = 16 + 8 * index, 24 + 4 * index
        labels[index, top:top + 64, left:left + 64] = cls + 1
        images[index, :, top:top + 64, left:left + 64] += 2.0 if cls == 0 else -2.0
        tags[index, cls] = 1
    labels[:, 60:68] = 255
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(150):
        loss = amn_loss(model(images, tags), labels, 0.4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(images, tags)
    matrix = ConfusionMatrix(3)
    matrix.update(logits.argmax(1).numpy(), nearest(labels, logits.shape[-2:]).numpy())
    assert matrix.summary()["miou"] >= 0.9
