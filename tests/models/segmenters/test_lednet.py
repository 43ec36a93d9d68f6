"""LEDNet and its parts: the SS-nbt unit's split, branches and channel shuffle against explicit
references, the downsampling unit, the encoder's Table 1, the APN's composition, and how the
contract's `backbone` (an encoder, not a ResNet) meets the rest of wsseg."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsseg.models.segmenters.lednet import (
    AttentionPyramid,
    DownsamplingUnit,
    LEDNet,
    LEDNetEncoder,
    SSnbt,
    channel_shuffle,
)
from segmenter_batches import assert_param_groups_partition, randomise_bn, train_steps

NUM_CLASSES = 5


def tiny(seed: int = 0, **kwargs) -> LEDNet:
    torch.manual_seed(seed)
    return LEDNet(NUM_CLASSES, depth=18, width=0.25, **kwargs)



def test_channel_shuffle_interleaves_the_two_halves():
    x = torch.arange(8.0).reshape(1, 8, 1, 1).expand(2, 8, 3, 2)
    # Explicit reference: output channel 2i is input channel i, 2i+1 is input channel 4 + i.
    expected = [0, 4, 1, 5, 2, 6, 3, 7]
    assert channel_shuffle(x, 2)[0, :, 0, 0].tolist() == expected
    torch.testing.assert_close(channel_shuffle(x, 2), x[:, expected])


def test_ss_nbt_with_silent_branches_is_shuffled_relu_of_its_input():
    unit = SSnbt(8, dilation=2).eval()
    for branch in (unit.left, unit.right):
        branch[-1].weight.data.zero_()  # the last BN of each branch: the branch outputs 0
        branch[-1].bias.data.zero_()
    x = torch.randn(2, 8, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(unit(x), F.relu(x)[:, [0, 4, 1, 5, 2, 6, 3, 7]])


def test_ss_nbt_splits_then_shuffles():
    """After the shuffle, even output channels come from the first half of the input only (the left
    branch and its share of the residual), odd ones from the second half only."""
    torch.manual_seed(0)
    unit = SSnbt(8, dilation=5)
    randomise_bn(unit)
    unit.eval()
    x = torch.randn(1, 8, 12, 12)
    with torch.no_grad():
        out = unit(x)
        second_moved = x.clone()
        second_moved[:, 4:] += torch.randn(1, 4, 12, 12)
        first_moved = x.clone()
        first_moved[:, :4] += torch.randn(1, 4, 12, 12)
        torch.testing.assert_close(unit(second_moved)[:, 0::2], out[:, 0::2])
        assert not torch.allclose(unit(second_moved)[:, 1::2], out[:, 1::2])
        torch.testing.assert_close(unit(first_moved)[:, 1::2], out[:, 1::2])
        assert not torch.allclose(unit(first_moved)[:, 0::2], out[:, 0::2])


def test_ss_nbt_branches_are_factorised_with_the_second_pair_dilated():
    unit = SSnbt(16, dilation=9)
    left = [m for m in unit.left if isinstance(m, torch.nn.Conv2d)]
    right = [m for m in unit.right if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in left] == [(3, 1), (1, 3), (3, 1), (1, 3)]
    assert [c.kernel_size for c in right] == [(1, 3), (3, 1), (1, 3), (3, 1)]
    assert [c.dilation for c in left] == [(1, 1), (1, 1), (9, 1), (1, 9)]
    assert [c.dilation for c in right] == [(1, 1), (1, 1), (1, 9), (9, 1)]
    assert all(c.in_channels == c.out_channels == 8 for c in left + right)
    with pytest.raises(ValueError, match="odd"):
        SSnbt(7)


def test_downsampling_unit_concatenates_a_strided_conv_and_the_max_pool():
    unit = DownsamplingUnit(4, 10).eval()  # BN at its initial statistics: identity up to eps
    x = torch.randn(2, 4, 9, 7)
    with torch.no_grad():
        out = unit(x)
        scale = 1 / (1 + unit.bn.eps) ** 0.5
        assert out.shape == (2, 10, 5, 4)  # ceil(9/2), ceil(7/2)
        torch.testing.assert_close(out[:, 6:], F.relu(F.max_pool2d(x, 2, ceil_mode=True)) * scale)
        torch.testing.assert_close(out[:, :6], F.relu(unit.conv(x)) * scale)


def test_encoder_is_the_papers_table_one():
    encoder = LEDNetEncoder(1.0)
    assert encoder.channels == {"stage1": 32, "stage2": 64, "stage3": 128}
    assert encoder.strides_of == {"stage1": 2, "stage2": 4, "stage3": 8}
    units = {name: [type(m).__name__ for m in getattr(encoder, name)] for name in encoder.channels}
    assert units == {"stage1": ["DownsamplingUnit"] + ["SSnbt"] * 3,
                     "stage2": ["DownsamplingUnit"] + ["SSnbt"] * 2,
                     "stage3": ["DownsamplingUnit"] + ["SSnbt"] * 8}
    assert [m.dilation for m in encoder.stage3[1:]] == [1, 2, 5, 9, 2, 5, 9, 17]
    assert [m.dropout.p for m in encoder.stage1[1:]] == [0.03] * 3
    assert [m.dropout.p for m in encoder.stage3[1:]] == [0.3] * 8
    # The paper's "less than 1M parameters" (19 Cityscapes classes + void, as the release's decoder).
    assert sum(p.numel() for p in LEDNet(20).parameters()) < 1_000_000
    assert LEDNetEncoder(0.25).channels == {"stage1": 8, "stage2": 16, "stage3": 32}
    encoder.eval()
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 65, 49))
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(33, 25), (17, 13), (9, 7)]


def test_apn_is_pyramid_attention_times_scores_plus_global_context():
    torch.manual_seed(0)
    apn = AttentionPyramid(16, NUM_CLASSES)
    randomise_bn(apn)
    apn.eval()
    x = torch.randn(2, 16, 12, 10)
    assert [apn.down1[0].kernel_size, apn.down2[0].kernel_size, apn.down3[0][0].kernel_size] == [(7, 7), (5, 5), (3, 3)]
    assert apn.down1[0].out_channels == 1 and apn.down1[0].stride == (2, 2)
    with torch.no_grad():
        attention = apn.attention(x)
        assert attention.shape == (2, 1, 12, 10)
        expected = attention * apn.scores(x) + apn.global_branch(x).expand(-1, -1, 12, 10)
        torch.testing.assert_close(apn(x), expected)
        # Silence the scores: what is left is the global branch, the same at every position.
        apn.scores[1].weight.zero_()
        apn.scores[1].bias.zero_()
        out = apn(x)
    torch.testing.assert_close(out, out[:, :, :1, :1].expand_as(out))
    assert out.abs().sum() > 0


def test_contract_depth_is_ignored_and_the_encoder_is_the_backbone_group():
    model = tiny()
    losses, history = train_steps(model, lr=0.01, steps=15)
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(history[-1]) == {"main", "total"}
    assert_param_groups_partition(model)  # backbone = the encoder, heads = the APN
    backbone, heads = model.param_groups()
    assert {id(p) for p in heads} == {id(p) for p in model.decoder.parameters()}
    model.eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        assert model(x)["out"].shape == (1, NUM_CLASSES, 9, 7)  # stride 8
        assert model.predict(x).shape == (1, NUM_CLASSES, 65, 49)
