"""PSPNet and its pyramid pooling module."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsseg.models.segmenters.pspnet import PSPNet, PyramidPooling
from segmenter_batches import assert_param_groups_partition, train_steps

NUM_CLASSES = 5


def tiny(seed: int = 0, **kwargs) -> PSPNet:
    torch.manual_seed(seed)
    return PSPNet(NUM_CLASSES, depth=18, width=0.25, **kwargs)


def test_contract():
    model = tiny()
    losses, history = train_steps(model, lr=0.01)
    terms = history[-1]
    assert losses[-1] < 0.6 * losses[0], losses  # measured: ends at ~0.32 of the start
    assert set(terms) == {"main", "aux", "total"}
    torch.testing.assert_close(terms["total"], terms["main"] + 0.4 * terms["aux"])

    model.eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        first, second = model.predict(x), model.predict(x)
        outputs = model(x)
    assert first.shape == (1, NUM_CLASSES, 65, 49)
    assert torch.equal(first, second)
    assert outputs["out"].shape[-2:] == outputs["aux"].shape[-2:] == (9, 7)  # OS8
    assert_param_groups_partition(model)


@pytest.mark.parametrize("size", [(9, 7), (5, 3), (1, 1), (13, 8)])
def test_pyramid_pooling_keeps_sizes_for_odd_inputs(size):
    torch.manual_seed(0)
    pyramid = PyramidPooling(16, 4, bins=(1, 2, 3, 6)).eval()
    x = torch.randn(2, 16, *size)
    with torch.no_grad():
        out = pyramid(x)
    assert out.shape == (2, 16 + 4 * 4, *size)
    assert torch.equal(out[:, :16], x)  # the input comes first, untouched


def test_pyramid_pooling_bins_against_manual_pooling():
    torch.manual_seed(0)
    pyramid = PyramidPooling(8, 4, bins=(1, 2, 3, 6)).eval()
    x = torch.randn(1, 8, 12, 18)  # divisible by every bin: plain block means
    with torch.no_grad():
        out = pyramid(x)
        for index, bins in enumerate(pyramid.bins):
            blocks = x.reshape(1, 8, bins, 12 // bins, bins, 18 // bins).mean(dim=(3, 5))
            projected = pyramid.branches[index][1](blocks)
            expected = F.interpolate(projected, size=(12, 18), mode="bilinear", align_corners=False)
            torch.testing.assert_close(out[:, 8 + 4 * index: 12 + 4 * index], expected)
    # The bin-1 branch is one vector per image, the same at every pixel.
    global_branch = out[:, 8:12]
    assert torch.allclose(global_branch, global_branch[..., :1, :1].expand_as(global_branch))


def test_head_widths_follow_the_backbone():
    model = tiny()
    # layer4 of a width-0.25 ResNet-18 has 128 channels: branches 128/4, 3x3 conv 512 x 128/2048.
    assert [branch[1][0].out_channels for branch in model.pyramid.branches] == [32] * 4
    assert model.bottleneck[0].in_channels == 256 and model.bottleneck[0].out_channels == 32
    assert model.bottleneck[0].kernel_size == (3, 3) and model.dropout.p == 0.1
    # ResNet-50 at width 1: the paper's 2048 + 4 x 512 = 4096 -> 512.
    full = PSPNet(21, depth=50)
    assert [branch[1][0].out_channels for branch in full.pyramid.branches] == [512] * 4
    assert full.bottleneck[0].in_channels == 4096 and full.bottleneck[0].out_channels == 512
    assert full.aux_head.conv[0].out_channels == 256
    assert tiny(aux=False).aux_head is None
