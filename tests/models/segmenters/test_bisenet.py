"""BiSeNet and its parts: the spatial path's strides, the attention refinement and feature fusion
modules' formulas, the context path's outputs and the loss with the paper's alpha."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsseg.models.segmenters.bisenet import AttentionRefinement, BiSeNet, FeatureFusion, SpatialPath
from segmenter_batches import assert_param_groups_partition, randomise_bn, train_steps

NUM_CLASSES = 5


def tiny(seed: int = 0, **kwargs) -> BiSeNet:
    torch.manual_seed(seed)
    return BiSeNet(NUM_CLASSES, depth=18, width=0.25, **kwargs)



def test_contract_outputs_and_loss_with_alpha_one():
    model = tiny()
    losses, history = train_steps(model, lr=0.01, steps=15)
    assert losses[-1] < 0.8 * losses[0], losses
    terms = history[-1]
    assert set(terms) == {"main", "aux16", "aux32", "total"}
    # The paper's loss: principal + alpha * (both auxiliary terms), alpha = 1.
    torch.testing.assert_close(terms["total"], terms["main"] + terms["aux16"] + terms["aux32"])

    model.eval()
    x = torch.randn(1, 3, 65, 49)  # ResNet sizes: layer2 9x7, layer3 5x4, layer4 3x2
    with torch.no_grad():
        outputs = model(x)
        first, second = model.predict(x), model.predict(x)
    assert outputs["out"].shape == (1, NUM_CLASSES, 9, 7)  # stride 8
    assert outputs["aux16"].shape[-2:] == (9, 7)  # the layer3 branch, upsampled to stride 8
    assert outputs["aux32"].shape[-2:] == (5, 4)  # the layer4 branch, upsampled to stride 16
    assert first.shape == (1, NUM_CLASSES, 65, 49)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, F.interpolate(outputs["out"], size=(65, 49), mode="bilinear",
                                                    align_corners=False))
    assert_param_groups_partition(model)


def test_aux_options():
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, NUM_CLASSES, (2, 64, 64))
    plain = tiny(aux=False)
    assert set(plain(images)) == {"out"} and plain.aux_heads is None
    assert set(plain.loss(plain(images), labels)) == {"main", "total"}
    half = tiny(aux_weight=0.5)
    terms = half.loss(half(images), labels)
    torch.testing.assert_close(terms["total"], terms["main"] + 0.5 * (terms["aux16"] + terms["aux32"]))
    with pytest.raises(ValueError, match="aux_weight"):
        tiny(aux_weight=-1.0)


def test_spatial_path_is_three_stride_two_convs_to_the_size_of_layer2():
    path = SpatialPath(16, 32).eval()
    convs = [m for m in path.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2), (2, 2), (2, 2), (1, 1)]
    assert [c.kernel_size for c in convs] == [(7, 7), (3, 3), (3, 3), (1, 1)]
    model = tiny().eval()
    for size in ((65, 49), (97, 33), (64, 64)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            spatial = model.spatial_path(x)
            layer2 = model.backbone(x)["layer2"]
        assert spatial.shape[-2:] == layer2.shape[-2:], size
        assert spatial.shape[1] == 32  # 128 at width 0.25


def test_attention_refinement_is_features_times_sigmoid_of_pooled_channel_attention():
    torch.manual_seed(0)
    arm = AttentionRefinement(12, 8)
    randomise_bn(arm)
    arm.eval()
    x = torch.randn(2, 12, 7, 5)
    with torch.no_grad():
        features = arm.conv(x)
        conv, bn = arm.attention[1], arm.attention[2]
        pooled = features.mean(dim=(2, 3))  # (B, C)
        logits = pooled @ conv.weight[:, :, 0, 0].T
        weights = torch.sigmoid((logits - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias)
        torch.testing.assert_close(arm(x), features * weights[:, :, None, None])
        # Saturated attention: the ARM passes its 3x3 conv-BN-ReLU through, or closes.
        bn.bias.fill_(40.0)
        torch.testing.assert_close(arm(x), features)
        bn.bias.fill_(-40.0)
        assert arm(x).abs().max() < 1e-12


def test_feature_fusion_is_residual_se_attention_over_the_concatenation_spatial_first():
    torch.manual_seed(0)
    ffm = FeatureFusion(10, 8)
    randomise_bn(ffm)
    ffm.eval()
    spatial, context = torch.randn(2, 6, 5, 4), torch.randn(2, 4, 5, 4)
    conv, bn = ffm.fuse[0], ffm.fuse[1]
    with torch.no_grad():
        x = F.relu(F.batch_norm(F.conv2d(torch.cat([spatial, context], dim=1), conv.weight), bn.running_mean,
                                bn.running_var, bn.weight, bn.bias, eps=bn.eps))
        w1, w2 = ffm.attention[1].weight[:, :, 0, 0], ffm.attention[3].weight[:, :, 0, 0]
        attention = torch.sigmoid(F.relu(x.mean(dim=(2, 3)) @ w1.T) @ w2.T)[:, :, None, None]
        torch.testing.assert_close(ffm(spatial, context), x + x * attention)
        # A closed SE (zero last conv): sigmoid(0) = 1/2, so the module scales by 1.5.
        ffm.attention[3].weight.zero_()
        torch.testing.assert_close(ffm(spatial, context), 1.5 * x)


def test_context_path_global_pooling_reaches_every_position():
    """A change in one corner of layer4 moves c16 everywhere: the global context branch (and the
    ARM's pooled attention) broadcast over the whole map, which a purely local path would not."""
    model = tiny()
    randomise_bn(model)
    model.eval()
    features = {"layer3": torch.randn(1, model.backbone.channels["layer3"], 8, 8),
                "layer4": torch.randn(1, model.backbone.channels["layer4"], 4, 4)}
    with torch.no_grad():
        _, c16 = model.context_path(features, (16, 16))
        features["layer4"][..., 0, 0] += 5.0
        _, moved = model.context_path(features, (16, 16))
    assert ((c16 - moved).abs().amax(dim=1) > 0).all()


def test_widths_follow_the_authors_and_scale_with_width_not_depth():
    full = BiSeNet(NUM_CLASSES, depth=18, width=1.0)
    assert full.arm32.conv[0].out_channels == full.arm16.conv[0].out_channels == 128
    assert full.spatial_path.out_channels == 128
    assert full.ffm.fuse[0].out_channels == 256
    assert full.head_out.conv[0].out_channels == 64
    assert full.aux_heads["aux16"].conv[0].out_channels == 256
    assert full.backbone.strides_of["layer4"] == 32
    deep = BiSeNet(NUM_CLASSES, depth=50, width=1.0)
    assert deep.arm32.conv[0].in_channels == 2048 and deep.arm32.conv[0].out_channels == 128
    small = tiny()
    assert small.arm32.conv[0].out_channels == 32 and small.ffm.fuse[0].out_channels == 64
