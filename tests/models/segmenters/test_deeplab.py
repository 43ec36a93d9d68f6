"""DeepLab v1/v2/v3/v3+ and the shared parts they use (common.py: ASPP, ASPP-L, label
downsampling, cross-entropy, aux head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wsseg.models.segmenters.common import (
    ASPP,
    AuxHead,
    cross_entropy,
    downsample_labels,
    head_channels,
)
from wsseg.models.segmenters.deeplab import DeepLabV1, DeepLabV2, DeepLabV3, DeepLabV3Plus
from wsseg.ops.crf import DEEPLAB_V2_RESNET101_CRF, crf_from_probs
from segmenter_batches import assert_param_groups_partition, train_losses

NUM_CLASSES = 5


def tiny(cls, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return cls(NUM_CLASSES, depth=18, width=0.25, **kwargs)


# lr per model, measured: v1's BN-free head needs a larger one, v2's summed ASPP-L
# (and MSC's four terms) a smaller one. 10 steps end at 0.04-0.5 of the first loss.
@pytest.mark.parametrize("cls, kwargs, lr", [
    (DeepLabV1, {}, 0.05),
    (DeepLabV2, {}, 0.001),
    (DeepLabV2, {"msc": True}, 0.001),
    (DeepLabV3, {}, 0.01),
    (DeepLabV3Plus, {}, 0.01),
], ids=["v1", "v2", "v2-msc", "v3", "v3plus"])
def test_contract(cls, kwargs, lr):
    model = tiny(cls, **kwargs)
    losses = train_losses(model, lr=lr)
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        first, second = model.predict(x), model.predict(x)
    assert first.shape == (1, NUM_CLASSES, 65, 49)
    assert torch.equal(first, second)
    assert_param_groups_partition(model)


def dilations(module) -> list[int]:
    return [m.dilation[0] for m in module.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]


def test_aspp_rates_branches_and_output_stride():
    v3 = tiny(DeepLabV3)
    assert v3.aspp.rates == (6, 12, 18)
    assert len(v3.aspp.branches) == 5  # 1x1, three rates, image pooling
    assert dilations(v3.aspp) == [6, 12, 18]
    # OS16 with multi-grid (1, 2, 4): layer4 dilation 2 x (1, 2) on ResNet-18's two units.
    assert dilations(v3.backbone.layer4) == [2, 2, 4, 4]
    v3_os8 = tiny(DeepLabV3, output_stride=8)
    assert v3_os8.aspp.rates == (12, 24, 36)  # doubled at OS8
    assert dilations(v3_os8.aspp) == [12, 24, 36]
    assert dilations(v3_os8.backbone.layer4) == [4, 4, 8, 8]
    assert tiny(DeepLabV3Plus, output_stride=8).aspp.rates == (12, 24, 36)

    v2 = tiny(DeepLabV2)
    assert v2.aspp.rates == (6, 12, 18, 24) and len(v2.aspp.branches) == 4
    assert [b.dilation[0] for b in v2.aspp.branches] == [6, 12, 18, 24]
    assert all(b.out_channels == NUM_CLASSES for b in v2.aspp.branches)  # straight to classes
    features = torch.randn(1, v2.backbone.channels["layer4"], 9, 7)
    with torch.no_grad():
        summed = sum(branch(features) for branch in v2.aspp.branches)
        torch.testing.assert_close(v2.aspp(features), summed)

    v1 = tiny(DeepLabV1)
    assert v1.fc6.dilation == (12, 12) and v1.fc6.kernel_size == (3, 3)
    assert v1.fc6.out_channels == head_channels(v1.backbone, 1024) == 64  # 1024 x 128/2048
    assert tiny(DeepLabV1, rate=4).fc6.dilation == (4, 4)  # LargeFOV's rate, given at OS8
    assert tiny(DeepLabV1, output_stride=16, rate=4).fc6.dilation == (2, 2)


@pytest.mark.parametrize("cls", [DeepLabV1, DeepLabV2], ids=["v1", "v2"])
def test_predict_reads_each_logit_back_where_the_loss_trained_it(cls):
    """v1/v2 learn logit (i, j) from the label pixel `downsample_labels` picks for it (corner-aligned:
    pixel 8i on a 121 px input, Caffe's 8k+1 sizes, whose logits are 16 x 16); predict must put the
    logit back on that pixel, not half a cell away as a centre-aligned upsampling does."""
    model = tiny(cls).eval()
    x = torch.randn(1, 3, 121, 121)
    labels = torch.arange(121 * 121).reshape(1, 121, 121)
    with torch.no_grad():
        logits = model.head(model.backbone(x))
        assert logits.shape[-2:] == (16, 16)
        assert torch.equal(downsample_labels(labels, (16, 16)), labels[:, ::8, ::8])
        torch.testing.assert_close(model.predict(x)[..., ::8, ::8], logits)


def test_aspp_image_pooling_is_global():
    torch.manual_seed(0)
    aspp = ASPP(16, 8, rates=(2,), image_pooling=True).eval()
    x = torch.randn(2, 16, 7, 5)
    pooled = aspp.branches[-1](x)
    assert pooled.shape == (2, 8, 7, 5)
    assert torch.equal(pooled, pooled[..., :1, :1].expand_as(pooled))  # one vector per image
    assert len(ASPP(16, 8, rates=(2, 3), image_pooling=False).branches) == 3
    assert aspp(x).shape == (2, 8, 7, 5)


def test_v3plus_decodes_at_stride_4():
    model = tiny(DeepLabV3Plus).eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        features = model.backbone(x)
        outputs = model(x)
    assert outputs["out"].shape[-2:] == features["layer1"].shape[-2:] == (17, 13)
    assert outputs["aux"].shape[-2:] == features["layer3"].shape[-2:]
    assert model.reduce[0].out_channels == 8  # 48 x 128/2048 = 3, at least 8
    assert "aux" not in tiny(DeepLabV3Plus, aux=False)(torch.randn(2, 3, 32, 32))


def reference_downsample(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest with aligned corners, written as a loop: round half up of i·(H−1)/(h−1)."""
    height, width = labels.shape[-2:]
    out = np.zeros(labels.shape[:-2] + size, dtype=labels.dtype)
    for i in range(size[0]):
        row = 0 if size[0] == 1 else int(np.floor(i * (height - 1) / (size[0] - 1) + 0.5))
        for j in range(size[1]):
            col = 0 if size[1] == 1 else int(np.floor(j * (width - 1) / (size[1] - 1) + 0.5))
            out[..., i, j] = labels[..., row, col]
    return out


@pytest.mark.parametrize("source, target", [((321, 321), (41, 41)), ((65, 49), (9, 7)),
                                            ((30, 17), (7, 6)), ((5, 4), (1, 1))])
def test_downsample_labels_matches_reference(source, target):
    labels = torch.randint(0, 256, (2, *source))
    result = downsample_labels(labels, target)
    assert result.dtype == torch.int64
    np.testing.assert_array_equal(result.numpy(), reference_downsample(labels.numpy(), target))
    if source == (321, 321):  # DeepLab's crop at OS8 reads rows and columns 0, 8, ..., 320
        assert torch.equal(result, labels[:, ::8, ::8])


@pytest.mark.parametrize("cls", [DeepLabV1, DeepLabV2])
def test_v1_v2_loss_uses_labels_downsampled_to_the_logits(cls):
    model = tiny(cls, aux=True)
    x = torch.randn(2, 3, 65, 49)
    labels = torch.randint(0, NUM_CLASSES, (2, 65, 49))
    labels[:, :20] = 255
    outputs = model(x)
    logits = outputs["out"]
    assert logits.shape[-2:] == (9, 7)
    terms = model.loss(outputs, labels)
    # 65x49 -> 9x7 with aligned corners reads every 8th pixel exactly.
    small = labels[:, ::8, ::8]
    expected = F.cross_entropy(logits, small, ignore_index=255)
    torch.testing.assert_close(terms["main"], expected)
    torch.testing.assert_close(terms["aux"], F.cross_entropy(outputs["aux"], small, ignore_index=255))
    torch.testing.assert_close(terms["total"], terms["main"] + 0.4 * terms["aux"])
    upsampled = F.cross_entropy(F.interpolate(logits, size=(65, 49), mode="bilinear"), labels, ignore_index=255)
    assert abs(terms["main"].item() - upsampled.item()) > 1e-4  # the toolboxes' loss differs


@pytest.mark.parametrize("cls", [DeepLabV1, DeepLabV2])
def test_v1_v2_loss_on_labels_upsamples_the_logits_and_reads_them_back_so(cls):
    """`loss_on: labels` trains the logits upsampled (centre-aligned) to the labels, as v3 does, and
    predict() reads them back with that geometry."""
    model = tiny(cls, loss_on="labels")
    assert not model.corner_aligned and tiny(cls).corner_aligned
    x = torch.randn(2, 3, 65, 49)
    labels = torch.randint(0, NUM_CLASSES, (2, 65, 49))
    labels[:, :20] = 255
    outputs = model(x)
    expected = F.cross_entropy(F.interpolate(outputs["out"], size=(65, 49), mode="bilinear", align_corners=False),
                               labels, ignore_index=255)
    torch.testing.assert_close(model.loss(outputs, labels)["main"], expected)
    model.eval()
    with torch.no_grad():
        logits = model.head(model.backbone(x))
        torch.testing.assert_close(model.predict(x), F.interpolate(logits, size=(65, 49), mode="bilinear",
                                                                   align_corners=False))
    with pytest.raises(ValueError, match="loss_on"):
        tiny(cls, loss_on="pixels")


def test_v1_head_norm_and_dropout_options():
    """head_norm puts a BatchNorm between fc6/fc7 and their ReLU (the convs lose their bias); dropout
    sets both dropout layers' probability."""
    plain, normed = tiny(DeepLabV1), tiny(DeepLabV1, head_norm=True, dropout=0.0)
    assert plain.fc6.bias is not None and isinstance(plain.norm6, torch.nn.Identity)
    assert normed.fc6.bias is None and normed.fc7.bias is None
    assert plain.dropout6.p == plain.dropout7.p == 0.5 and normed.dropout6.p == normed.dropout7.p == 0.0
    for norm in (normed.norm6, normed.norm7):  # statistics that change what the head computes
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    normed.eval()
    x = torch.randn(2, normed.fc6.in_channels, 6, 6)
    bn = lambda norm, t: F.batch_norm(t, norm.running_mean, norm.running_var, norm.weight, norm.bias, eps=norm.eps)
    with torch.no_grad():
        expected = normed.classifier(F.relu(bn(normed.norm7, normed.fc7(F.relu(bn(normed.norm6, normed.fc6(x)))))))
        torch.testing.assert_close(normed.head({"layer4": x}), expected)
    plain.train()
    with torch.no_grad():  # dropout 0.5 is live in training: two passes differ
        assert not torch.equal(plain.head({"layer4": x}), plain.head({"layer4": x}))
    with pytest.raises(ValueError, match="dropout"):
        tiny(DeepLabV1, dropout=1.0)


def test_v3_loss_upsamples_the_logits():
    model = tiny(DeepLabV3, aux=False)
    x = torch.randn(2, 3, 65, 49)
    labels = torch.randint(0, NUM_CLASSES, (2, 65, 49))
    outputs = model(x)
    expected = F.cross_entropy(F.interpolate(outputs["out"], size=(65, 49), mode="bilinear", align_corners=False),
                               labels, ignore_index=255)
    terms = model.loss(outputs, labels)
    assert set(terms) == {"main", "total"}
    torch.testing.assert_close(terms["total"], expected)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    labels = torch.full((1, 8, 8), 255)
    for size_from in ("label", "logits"):
        loss = cross_entropy(logits, labels, size_from)
        assert loss.item() == 0.0
        loss.backward()
    with pytest.raises(ValueError, match="size_from"):
        cross_entropy(logits, labels, "image")


def test_msc_returns_each_scale_and_the_fused_max():
    model = tiny(DeepLabV2, msc=True)
    x = torch.randn(2, 3, 65, 49)
    labels = torch.randint(0, NUM_CLASSES, (2, 65, 49))
    outputs = model(x)
    assert set(outputs) == {"out", "scale1.0", "scale0.75", "scale0.5"}
    assert outputs["scale1.0"].shape[-2:] == (9, 7)
    assert outputs["scale0.75"].shape[-2:] == (6, 5)  # 48x36 input
    assert outputs["scale0.5"].shape[-2:] == (4, 3)  # 32x24 input
    size = (9, 7)
    fused = torch.stack([outputs["scale1.0"]] + [
        # corner-aligned, as Caffe's Interp layer brought DeepLab v2's smaller scales to scale 1
        F.interpolate(outputs[k], size=size, mode="bilinear", align_corners=True) for k in ("scale0.75", "scale0.5")
    ]).amax(dim=0)
    torch.testing.assert_close(outputs["out"], fused)
    terms = model.loss(outputs, labels)
    assert set(terms) == {"main", "scale1.0", "scale0.75", "scale0.5", "total"}
    for key in ("scale1.0", "scale0.75", "scale0.5"):
        small = downsample_labels(labels, outputs[key].shape[-2:])
        torch.testing.assert_close(terms[key], F.cross_entropy(outputs[key], small))
    torch.testing.assert_close(terms["main"], F.cross_entropy(outputs["out"], labels[:, ::8, ::8]))
    torch.testing.assert_close(terms["total"], terms["main"] + terms["scale1.0"] + terms["scale0.75"]
                               + terms["scale0.5"])
    model.eval()
    with torch.no_grad():
        eval_out = model(x)["out"]
        torch.testing.assert_close(model.predict(x), F.interpolate(eval_out, size=(65, 49), mode="bilinear",
                                                                   align_corners=True))


def test_aux_head_layout():
    head = AuxHead(32, NUM_CLASSES, channels=16)
    layers = [type(m).__name__ for m in head.modules() if not list(m.children())]
    assert layers == ["Conv2d", "BatchNorm2d", "ReLU", "Dropout2d", "Conv2d"]
    assert head.conv[0].kernel_size == (3, 3) and head.dropout.p == 0.1
    assert head(torch.randn(2, 32, 5, 3)).shape == (2, NUM_CLASSES, 5, 3)


def test_crf_defaults_are_the_papers_and_fit_crf_from_probs():
    assert DeepLabV1.crf_defaults == dict(bilateral_weight=4, bilateral_sxy=121, bilateral_srgb=5,
                                          gaussian_weight=3, gaussian_sxy=3)
    assert DeepLabV2.crf_defaults == DEEPLAB_V2_RESNET101_CRF
    assert not hasattr(DeepLabV3, "crf_defaults")
    image = np.zeros((6, 5, 3), np.uint8)
    probs = np.full((2, 6, 5), 0.5, np.float32)
    for cls in (DeepLabV1, DeepLabV2):
        assert crf_from_probs(image, probs, **cls.crf_defaults).shape == (2, 6, 5)
