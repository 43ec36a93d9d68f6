"""DFANet and its parts: the Xception block's separable convs and residual, backbone A's stages, the
FC attention's formula, sub-network and sub-stage aggregation against explicit references, the
decoder's composition, and how the contract's `backbone` (an encoder, not a ResNet) meets wsseg."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsseg.errors import UserError
from wsseg.models.segmenters import build_segmenter
from wsseg.models.segmenters.dfanet import DFANet, DFANetEncoder, FCAttention, SeparableConv, XceptionBlock
from segmenter_batches import assert_param_groups_partition, randomise_bn, train_steps

NUM_CLASSES = 5


def tiny(seed: int = 0, **kwargs) -> DFANet:
    torch.manual_seed(seed)
    return DFANet(NUM_CLASSES, depth=18, width=0.25, **kwargs)


def resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def test_separable_conv_is_depthwise_then_pointwise():
    conv = SeparableConv(6, 10, stride=2)
    depthwise, bn, pointwise = conv
    assert depthwise.groups == 6 and depthwise.kernel_size == (3, 3) and depthwise.stride == (2, 2)
    assert pointwise.kernel_size == (1, 1) and (pointwise.in_channels, pointwise.out_channels) == (6, 10)
    conv.eval()
    x = torch.randn(2, 6, 9, 7)
    with torch.no_grad():
        # Each output of the depthwise conv reads its own input channel only.
        moved = x.clone()
        moved[:, 3] += 1.0
        change = (depthwise(moved) - depthwise(x)).abs().sum(dim=(0, 2, 3))
        assert change[3] > 0 and (change[torch.arange(6) != 3] == 0).all()
        assert conv(x).shape == (2, 10, 5, 4)  # ceil(9/2), ceil(7/2)


def test_xception_block_widths_residual_and_stride():
    block = XceptionBlock(8, 16, 4, stride=2, start_with_relu=False)
    seps = [m for m in block.convs if isinstance(m, SeparableConv)]
    assert [(s[2].in_channels, s[2].out_channels) for s in seps] == [(8, 4), (4, 4), (4, 16)]
    assert [s[0].stride for s in seps] == [(1, 1), (1, 1), (2, 2)]  # the last carries the stride
    assert not isinstance(block.convs[0], torch.nn.ReLU) and block.skip[0].stride == (2, 2)
    inner = XceptionBlock(16, 16, 4)
    assert isinstance(inner.convs[0], torch.nn.ReLU) and inner.skip is None
    randomise_bn(inner)
    inner.eval()
    x = torch.randn(2, 16, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(inner(x), inner.convs(x) + x)  # identity residual
        out = block(torch.randn(2, 8, 9, 7))
    assert out.shape == (2, 16, 5, 4)


def test_encoder_is_backbone_a_three_times_one_octave_deeper_each():
    encoder = DFANetEncoder(1.0)
    assert encoder.sub_networks == "abc"
    stages = {name: len(getattr(encoder, f"{name}a")) for name in ("enc2", "enc3", "enc4")}
    assert stages == {"enc2": 4, "enc3": 6, "enc4": 4}
    assert {k: encoder.channels[k] for k in ("conv1", "enc2a", "enc3a", "enc4a", "fca")} == \
        {"conv1": 8, "enc2a": 48, "enc3a": 96, "enc4a": 192, "fca": 192}
    # Sub-stage aggregation widens the later sub-networks' inputs: the stage before (or the FC
    # attention) + the same stage of the sub-network before.
    names = ("enc2a", "enc2b", "enc3b", "enc4b", "enc4c")
    first_in = {n: getattr(encoder, n)[0].convs[0][0].in_channels for n in names}
    assert first_in == {"enc2a": 8, "enc2b": 192 + 48, "enc3b": 48 + 96, "enc4b": 96 + 192, "enc4c": 96 + 192}
    assert encoder.fca.fc.out_features == 1000
    assert [encoder.strides_of[f"enc{s}{k}"] for k in "abc" for s in (2, 3, 4)] == [4, 8, 16, 8, 16, 32, 16, 32, 64]
    assert DFANetEncoder(0.25).channels["enc4a"] == 48 and DFANetEncoder(0.25).fca.fc.out_features == 250
    encoder.eval()
    with torch.no_grad():
        features = encoder(torch.randn(1, 3, 65, 49))
    assert tuple(features["enc2a"].shape[-2:]) == (17, 13)
    assert tuple(features["enc4c"].shape[-2:]) == (2, 1)
    for name, stride in encoder.strides_of.items():
        size = (65, 49)
        for _ in range(stride.bit_length() - 1):
            size = tuple((s + 1) // 2 for s in size)
        assert tuple(features[name].shape[-2:]) == size, name
    with pytest.raises(ValueError, match="sub_networks"):
        DFANetEncoder(1.0, sub_networks=0)


def test_aggregation_feeds_each_sub_network_the_last_ones_output_and_stages():
    """Against an explicit forward through the encoder's own modules: sub-network b starts from a's FC
    attention upsampled to a's enc2, concatenated with a's enc2; each later stage concatenates its own
    input with a's output of that stage."""
    torch.manual_seed(0)
    encoder = DFANetEncoder(0.25)
    randomise_bn(encoder)
    encoder.eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        features = encoder(x)
        a = {"conv1": encoder.conv1(x)}
        a["enc2"] = encoder.enc2a(a["conv1"])
        a["enc3"] = encoder.enc3a(a["enc2"])
        a["enc4"] = encoder.enc4a(a["enc3"])
        a["fc"] = encoder.fca(a["enc4"])
        up = resize(a["fc"], a["enc2"].shape[-2:])
        b2 = encoder.enc2b(torch.cat([up, a["enc2"]], dim=1))
        b3 = encoder.enc3b(torch.cat([b2, a["enc3"]], dim=1))
        b4 = encoder.enc4b(torch.cat([b3, a["enc4"]], dim=1))
        c2 = encoder.enc2c(torch.cat([resize(encoder.fcb(b4), b2.shape[-2:]), b2], dim=1))
    torch.testing.assert_close(features["fca"], a["fc"])
    torch.testing.assert_close(features["enc4b"], b4)
    torch.testing.assert_close(features["fcb"], encoder.fcb(b4))
    torch.testing.assert_close(features["enc2c"], c2)
    assert up.shape[-1] == 4 * a["fc"].shape[-1]  # x4, from stride 16 to stride 4


def test_fc_attention_multiplies_each_channel_by_its_encoding():
    torch.manual_seed(0)
    attention = FCAttention(6, 20).eval()
    x = torch.randn(3, 6, 5, 4)
    with torch.no_grad():
        encoding = F.relu(attention.project[0](attention.fc(x.mean(dim=(2, 3)))[:, :, None, None]))
        torch.testing.assert_close(attention(x), x * encoding)
        # Per image: another image in the batch does not change it (no BatchNorm over the pooled vector).
        torch.testing.assert_close(attention(x[:1]), attention(x)[:1])


def test_decoder_sums_low_and_high_level_features_at_stride_four():
    model = tiny()
    randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, 64, 48)
    decoder = model.decoder
    with torch.no_grad():
        features = model.backbone(x)
        size = features["enc2a"].shape[-2:]
        low = sum(resize(decoder.low[k](features[f"enc2{k}"]), size) for k in "abc")
        high = sum(resize(decoder.high[k](features[f"fc{k}"]), size) for k in "abc")
        expected = decoder.classifier(decoder.merge(low) + high)
        torch.testing.assert_close(model(x)["out"], expected)
    assert expected.shape == (2, NUM_CLASSES, 16, 12)


def test_contract_depth_is_ignored_and_the_encoder_is_the_backbone_group():
    model = tiny()
    # 30 steps: at 15 the loss had fallen to 0.6 of its start on an AMD EPYC but only to 0.98 on an
    # Intel Xeon (float order; the first steps oscillate); by 25-30 it is 0.45-0.37 on the Xeon
    losses, history = train_steps(model, lr=0.01, steps=30)
    assert losses[-1] < 0.8 * losses[0], losses
    assert set(history[-1]) == {"main", "total"}
    assert_param_groups_partition(model)  # backbone = the encoder (FC attention included), heads = the decoder
    _, heads = model.param_groups()
    assert {id(p) for p in heads} == {id(p) for p in model.decoder.parameters()}
    # Eval on a model with set BatchNorm statistics: after 15 SGD steps at this rate the running statistics of
    # the ~250 BatchNorms in series (6 per Xception block, 14 blocks per sub-network) lag far behind the weights.
    model = tiny(seed=1)
    randomise_bn(model)
    model.eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        assert model(x)["out"].shape == (1, NUM_CLASSES, 17, 13)  # stride 4
        torch.testing.assert_close(model.predict(x), resize(model(x)["out"], (65, 49)))


def test_fewer_sub_networks():
    for count in (1, 2):
        model = tiny(sub_networks=count)
        assert model.backbone.sub_networks == "abc"[:count]
        assert set(model.decoder.low) == set("abc"[:count])
        outputs = model(torch.randn(2, 3, 64, 48))
        assert outputs["out"].shape == (2, NUM_CLASSES, 16, 12)
    with pytest.raises(UserError, match="segmenter.options.dfanet: sub_networks must be 1..4"):
        build_segmenter("dfanet", NUM_CLASSES, options={"sub_networks": 5})
