"""RefineNet and its parts: residual conv unit, multi-resolution fusion, chained
residual pooling, the cascade variants."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsseg.models.segmenters.refinenet import (
    ChainedResidualPooling,
    MultiResolutionFusion,
    RefineNet,
    ResidualConvUnit,
)
from segmenter_batches import assert_param_groups_partition, fixed_batch, train_steps

NUM_CLASSES = 5


def tiny(seed: int = 0, **kwargs) -> RefineNet:
    torch.manual_seed(seed)
    return RefineNet(NUM_CLASSES, depth=18, width=0.25, **kwargs)


def test_contract():
    model = tiny()
    # The head has no BatchNorm (the paper's RCU): at heads 10x it needs a small lr, as the
    # release's 5e-4; lr 0.005 diverged here within 15 steps.
    losses, history = train_steps(model, lr=0.002, steps=20)
    terms = history[-1]
    assert losses[-1] < 0.8 * losses[0], losses  # measured: ends at ~0.70 of the start
    assert set(terms) == {"main", "total"}  # no aux head by default

    model.eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        first, second = model.predict(x), model.predict(x)
        outputs = model(x)
    assert first.shape == (1, NUM_CLASSES, 65, 49)
    assert torch.equal(first, second)
    assert outputs["out"].shape[-2:] == (17, 13)  # stride 4: layer1's size
    assert_param_groups_partition(model)


@pytest.mark.parametrize("cascade, in_channels, out_sizes", [
    ("4", [(32,), (32, 16), (16, 16), (16, 16)], [(3, 2), (5, 4), (9, 7), (17, 13)]),
    ("2", [(32, 16), (16, 16, 16)], [(5, 4), (17, 13)]),
    ("single", [(32, 16, 16, 16)], [(17, 13)]),
])
def test_cascades_group_the_stages_as_documented(cascade, in_channels, out_sizes):
    model = tiny(cascade=cascade).eval()
    # Adapted widths on a width-0.25 ResNet-18 (128-channel layer4): 512 -> 32, 256 -> 16.
    assert [block.in_channels for block in model.blocks] == in_channels
    sizes = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[-2:])))
             for block in model.blocks]
    x = torch.randn(1, 3, 65, 49)  # stages: 17x13, 9x7, 5x4, 3x2
    with torch.no_grad():
        logits = model.predict(x)
    for hook in hooks:
        hook.remove()
    assert sizes == out_sizes  # each block fuses at its finest input
    assert logits.shape == (1, NUM_CLASSES, 65, 49)
    assert torch.isfinite(logits).all()
    assert_param_groups_partition(model)


def test_widths_at_resnet50():
    model = RefineNet(21, depth=50)
    assert {stage: conv.out_channels for stage, conv in model.adapt.items()} == {
        "layer4": 512, "layer3": 256, "layer2": 256, "layer1": 256}
    assert [block.in_channels for block in model.blocks] == [(512,), (512, 256), (256, 256), (256, 256)]
    assert model.blocks[0].fusion.convs is None  # RefineNet-4: one path, no fusion
    assert len(model.blocks[0].pooling.convs) == 2
    assert model.classifier.in_channels == 256 and model.dropout.p == 0.5
    assert model.backbone.strides_of["layer4"] == 32


def test_options_and_errors():
    model = tiny(aux=True)
    images, labels = fixed_batch()
    outputs = model(images)
    terms = model.loss(outputs, labels)
    assert outputs["aux"].shape[-2:] == (4, 4)  # layer3 at stride 16
    torch.testing.assert_close(terms["total"], terms["main"] + 0.4 * terms["aux"])
    assert all(len(block.pooling.convs) == 4 for block in tiny(pool_blocks=4).blocks)
    with pytest.raises(ValueError, match="output_stride must be 32"):
        tiny(output_stride=8)
    with pytest.raises(ValueError, match="cascade"):
        tiny(cascade="3")


def test_residual_conv_unit_matches_its_formula():
    torch.manual_seed(0)
    rcu = ResidualConvUnit(6)
    x = torch.randn(2, 6, 7, 5)
    with torch.no_grad():
        expected = x + rcu.conv2(F.relu(rcu.conv1(F.relu(x))))
        torch.testing.assert_close(rcu(x), expected)
        rcu.conv2.weight.zero_()
        assert torch.equal(rcu(x), x)  # a zero residual branch passes the input, negatives included


def test_fusion_convs_to_the_smallest_width_and_upsamples_to_the_largest_size():
    torch.manual_seed(0)
    fusion = MultiResolutionFusion([8, 4])
    coarse, fine = torch.randn(1, 8, 3, 2), torch.randn(1, 4, 5, 4)
    with torch.no_grad():
        out = fusion([coarse, fine])
        expected = (F.interpolate(fusion.convs[0](coarse), size=(5, 4), mode="bilinear", align_corners=False)
                    + fusion.convs[1](fine))
    assert fusion.out_channels == 4 and out.shape == (1, 4, 5, 4)
    torch.testing.assert_close(out, expected)
    single = MultiResolutionFusion([8])
    assert single.convs is None and single([coarse]) is coarse


def reference_max_pool5(x: torch.Tensor) -> torch.Tensor:
    """5x5 max over the window clipped to the image, one pixel at a time."""
    out = torch.empty_like(x)
    height, width = x.shape[-2:]
    for i in range(height):
        for j in range(width):
            window = x[..., max(0, i - 2): i + 3, max(0, j - 2): j + 3]
            out[..., i, j] = window.amax(dim=(-2, -1))
    return out


@pytest.mark.parametrize("size", [(9, 7), (5, 3), (1, 1), (13, 8)])
def test_chained_residual_pooling_keeps_size_and_channels(size):
    torch.manual_seed(0)
    pooling = ChainedResidualPooling(8, blocks=2)
    x = torch.randn(2, 8, *size)
    with torch.no_grad():
        out = pooling(x)
    assert out.shape == x.shape


def test_chained_residual_pooling_against_a_slow_reference():
    torch.manual_seed(0)
    pooling = ChainedResidualPooling(4, blocks=3)
    x = torch.randn(2, 4, 7, 6)
    with torch.no_grad():
        total = chain = F.relu(x)  # the input goes through ReLU first
        for conv in pooling.convs:
            chain = conv(reference_max_pool5(chain))
            total = total + chain
        torch.testing.assert_close(pooling(x), total)
        for conv in pooling.convs:
            conv.weight.zero_()
        assert torch.equal(pooling(x), F.relu(x))
    with pytest.raises(ValueError, match="at least 1 block"):
        ChainedResidualPooling(4, blocks=0)
