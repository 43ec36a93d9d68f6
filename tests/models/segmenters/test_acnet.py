"""ACNet: the attention complementary module, the three branches, the decoder's outputs and loss, depth's effect."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsseg.models.backbones import load_weights
from wsseg.models.segmenters import build_segmenter
from wsseg.models.segmenters.acnet import ACNet, ChannelAttention

from segmenter_batches import randomise_bn

NUM_CLASSES = 4


def small(**options) -> ACNet:
    torch.manual_seed(0)
    return build_segmenter("acnet", NUM_CLASSES, depth=18, width=0.25, options=options)


def test_acm_is_channel_attention_by_the_formula():
    """ACM(x) = x · sigmoid(W · mean_hw(x) + b): one weight in (0, 1) per image and channel."""
    torch.manual_seed(0)
    module = ChannelAttention(5)
    x = torch.randn(2, 5, 7, 6)
    weight, bias = module.conv.weight[:, :, 0, 0], module.conv.bias
    pooled = x.sum(dim=(2, 3)) / (7 * 6)
    expected = x * torch.sigmoid(pooled @ weight.T + bias)[:, :, None, None]
    assert torch.allclose(module(x), expected, atol=1e-6)
    assert module.weights(x).shape == (2, 5, 1, 1)


def test_merged_branch_adds_the_reweighted_rgb_and_depth_features_after_every_stage():
    """The encoder written out by hand: m0 = ACM_rgb(stem_rgb) + ACM_d(stem_d); m_k = merged layer k of
    m_{k-1} (layer 1: of maxpool(m0)) + ACM_rgb(layer k of RGB) + ACM_d(layer k of depth)."""
    model = small()
    randomise_bn(model)
    model.eval()
    x = torch.randn(2, 4, 64, 48)
    with torch.no_grad():
        levels = model.encode(x)
        rgb_branch, depth_branch = model.backbone, model.depth_encoder
        rgb = rgb_branch.relu(rgb_branch.bn1(rgb_branch.conv1(x[:, :3])))
        depth = depth_branch.relu(depth_branch.bn1(depth_branch.conv1(x[:, 3:])))
        merged = model.attention_rgb[0](rgb) + model.attention_depth[0](depth)
        assert torch.allclose(levels[0], merged, atol=1e-5)
        rgb, depth = F.max_pool2d(rgb, 3, 2, 1), F.max_pool2d(depth, 3, 2, 1)
        merged = F.max_pool2d(merged, 3, 2, 1)
        for k in range(1, 5):
            rgb = getattr(rgb_branch, f"layer{k}")(rgb)
            depth = getattr(depth_branch, f"layer{k}")(depth)
            merged = model.merged_layers[k - 1](merged) + model.attention_rgb[k](rgb) + model.attention_depth[k](depth)
            assert torch.allclose(levels[k], merged, atol=1e-4), k
    assert model.depth_encoder.conv1.in_channels == 1 and model.backbone.conv1.in_channels == 3
    assert [level.shape[-1] for level in levels] == [24, 12, 6, 3, 2]  # strides 2, 4, 8, 16, 32 (ceil)


def test_outputs_at_every_scale_in_training_and_the_loss_sums_them_with_weight_one():
    model = small()
    x = torch.randn(2, 4, 50, 38)
    labels = torch.randint(0, NUM_CLASSES, (2, 50, 38))
    labels[:, :3] = 255
    outputs = model(x)
    assert outputs["out"].shape == (2, NUM_CLASSES, 50, 38)
    assert {k: tuple(v.shape[-2:]) for k, v in outputs.items() if k != "out"} == {
        "out2": (25, 19), "out3": (13, 10), "out4": (7, 5), "out5": (4, 3)}
    terms = model.loss(outputs, labels)
    assert list(terms) == ["main", "out5", "out4", "out3", "out2", "total"]
    expected = sum(model.pixel_loss(outputs[k], labels) for k in ("out", "out2", "out3", "out4", "out5"))
    assert torch.allclose(terms["total"], expected)
    terms["total"].backward()
    assert model.depth_encoder.conv1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert list(model(x)) == ["out"]
        assert torch.equal(model.predict(x), model(x)["out"])
    assert list(small(deep_supervision=False).train()(x)) == ["out"]


def test_depth_changes_the_prediction():
    model = small()
    randomise_bn(model)
    model.eval()
    torch.manual_seed(1)
    x = torch.randn(1, 4, 64, 64)
    flat = x.clone()
    flat[:, 3] = 0
    with torch.no_grad():
        with_depth, without = model.predict(x), model.predict(flat)
        rgb_changed = x.clone()
        rgb_changed[:, :3] = torch.randn(1, 3, 64, 64)
        other_rgb = model.predict(rgb_changed)
    assert (with_depth - without).abs().mean() > 1e-3 * with_depth.abs().mean()
    assert (with_depth - other_rgb).abs().mean() > 1e-3 * with_depth.abs().mean()


def test_an_rgb_input_is_refused():
    with pytest.raises(ValueError, match=r"acnet takes \(B, 4, H, W\)"):
        small()(torch.randn(2, 3, 32, 32))


def test_param_groups_put_the_three_branches_in_the_backbone_group():
    model = small()
    backbone, heads = model.param_groups()
    encoders = {id(p) for m in (model.backbone, model.depth_encoder, model.merged_layers) for p in m.parameters()}
    assert {id(p) for p in backbone} == encoders
    assert {id(p) for p in backbone + heads} == {id(p) for p in model.parameters()}
    assert len(backbone) + len(heads) == len(list(model.parameters()))
    assert {id(p) for p in model.attention_rgb.parameters()} <= {id(p) for p in heads}


def test_backbone_weights_start_the_depth_and_merged_branches_too(tmp_path):
    """As the authors' code: every branch from the ResNet file, the depth stem's conv the mean over RGB."""
    donor = small()
    torch.manual_seed(5)
    for p in donor.backbone.parameters():
        p.data.normal_()
    path = tmp_path / "resnet.pt"
    torch.save(donor.backbone.state_dict(), path)
    model = small()
    load_weights(model.backbone, str(path))
    model.backbone_weights_loaded()
    expected = donor.backbone.conv1.weight.mean(dim=1, keepdim=True)
    assert torch.allclose(model.depth_encoder.conv1.weight, expected)
    assert torch.equal(model.depth_encoder.layer3[0].conv1.weight, donor.backbone.layer3[0].conv1.weight)
    assert torch.equal(model.merged_layers[1][0].conv2.weight, donor.backbone.layer2[0].conv2.weight)
    assert torch.equal(model.depth_encoder.bn1.weight, donor.backbone.bn1.weight)
