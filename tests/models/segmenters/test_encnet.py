"""EncNet: the Encoding layer against a direct loop, the context encoding module, SE
targets and loss, and the segmenter contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsseg.models.segmenters.encnet import ContextEncoding, EncNet, EncodingLayer, class_presence
from segmenter_batches import assert_param_groups_partition, fixed_batch, train_steps

NUM_CLASSES = 5


def tiny(seed: int = 0, **kwargs) -> EncNet:
    torch.manual_seed(seed)
    return EncNet(NUM_CLASSES, depth=18, width=0.25, **kwargs)


def encoding_by_loop(x: torch.Tensor, codewords: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """The paper's definition, one pixel and one codeword at a time, in float64."""
    batch, channels, height, width = x.shape
    num_codes = codewords.shape[0]
    out = torch.zeros(batch, num_codes, channels, dtype=torch.float64)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                point = x[b, :, i, j].double()
                residuals = [point - codewords[k].double() for k in range(num_codes)]
                exponents = [-float(smoothing[k]) * float((r * r).sum()) for k, r in enumerate(residuals)]
                top = max(exponents)
                norm = sum(math.exp(e - top) for e in exponents)
                for k in range(num_codes):
                    out[b, k] += math.exp(exponents[k] - top) / norm * residuals[k]
    return out


def test_encoding_layer_matches_a_direct_loop():
    torch.manual_seed(0)
    layer = EncodingLayer(4, num_codes=3)
    with torch.no_grad():  # spread codewords and smoothing so the assignments are not uniform
        layer.codewords.normal_()
        layer.smoothing.copy_(torch.tensor([0.3, 1.0, 2.5]))
    x = torch.randn(2, 4, 3, 5)
    expected = encoding_by_loop(x, layer.codewords.detach(), layer.smoothing.detach())
    with torch.no_grad():
        out = layer(x)
        out64 = layer.double()(x.double())
    assert out.shape == (2, 3, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out64, expected, atol=1e-12, rtol=1e-12)


def test_encoding_layer_gradients_and_realistic_magnitudes():
    torch.manual_seed(1)
    layer = EncodingLayer(3, num_codes=4).double()
    x = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))
    # Post-ReLU features of size ~1 per channel at D = 64 (where ‖x‖² ≈ 64 cancels in the
    # expansion): float32 stays within 1e-4 of the float64 loop.
    layer = EncodingLayer(64, num_codes=8)
    x = F.relu(torch.randn(1, 64, 4, 5))
    expected = encoding_by_loop(x, layer.codewords.detach(), layer.smoothing.detach())
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, atol=1e-4, rtol=1e-4)


def test_encoding_layer_initialisation():
    torch.manual_seed(0)
    layer = EncodingLayer(512, num_codes=32)
    bound = 1 / math.sqrt(32 * 512)
    assert layer.codewords.shape == (32, 512) and layer.smoothing.shape == (32,)
    assert layer.codewords.abs().max() <= bound and layer.codewords.abs().max() > 0.9 * bound
    assert 0 <= layer.smoothing.min() and layer.smoothing.max() <= 1
    with pytest.raises(ValueError, match="expects"):
        layer(torch.zeros(1, 16, 2, 2))


def test_context_encoding_rescales_channels():
    torch.manual_seed(0)
    module = ContextEncoding(8, num_codes=4, se_classes=3).eval()
    x = torch.randn(2, 8, 5, 3)
    with torch.no_grad():
        out, se_logits = module(x)
        encodings = module.encoding(module.project(x))
        encoded = F.relu(module.encoding_bn(encodings)).mean(dim=1)
        gamma = torch.sigmoid(module.attention(encoded))
        expected = F.relu(x + x * gamma[:, :, None, None])
    assert out.shape == x.shape and se_logits.shape == (2, 3)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(se_logits, module.se_classifier(encoded))
    assert ContextEncoding(8, num_codes=4)(x)[1] is None


def test_class_presence_excludes_ignore_and_absent_classes():
    labels = torch.full((3, 4, 4), 255, dtype=torch.long)
    labels[0, 0, 0] = 2
    labels[0, 1:, :] = 0
    labels[1, :2, :2] = 4  # image 1: only class 4 and void
    # image 2: all void -> no class present
    presence = class_presence(labels, 5)
    expected = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(presence, expected)
    with pytest.raises(ValueError, match="0..4"):
        class_presence(torch.full((1, 2, 2), 5), 5)


def test_se_loss_is_bce_against_presence():
    model = tiny()
    _, labels = fixed_batch()
    outputs = {"out": torch.zeros(2, NUM_CLASSES, 8, 8), "aux": torch.zeros(2, NUM_CLASSES, 8, 8),
               "se": torch.tensor([[2.0, -1.0, 0.5, 0.0, 3.0], [0.0, 1.0, -2.0, 4.0, -0.5]])}
    terms = model.loss(outputs, labels)
    # image 0 holds classes 0 (top right), 1, 2; image 1 holds 0, 3, 4 (and void rows).
    targets = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 1, 1]], dtype=torch.float32)
    probs = torch.sigmoid(outputs["se"])
    manual = -(targets * probs.log() + (1 - targets) * (1 - probs).log()).mean()
    torch.testing.assert_close(terms["se"], manual)
    assert list(terms) == ["main", "aux", "se", "total"]
    torch.testing.assert_close(terms["total"], terms["main"] + 0.2 * terms["aux"] + 0.2 * terms["se"])
    torch.testing.assert_close(terms["main"], torch.tensor(math.log(NUM_CLASSES)))


def test_contract():
    model = tiny()
    losses, _ = train_steps(model, lr=0.01)
    assert losses[-1] < 0.6 * losses[0], losses  # measured: ends at ~0.3 of the start
    assert model.context.encoding.codewords.grad.abs().sum() > 0
    assert model.context.encoding.smoothing.grad.abs().sum() > 0

    model.eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        first, second = model.predict(x), model.predict(x)
        outputs = model(x)
    assert first.shape == (1, NUM_CLASSES, 65, 49)
    assert torch.equal(first, second)
    assert outputs["out"].shape[-2:] == outputs["aux"].shape[-2:] == (9, 7)  # OS8
    assert outputs["se"].shape == (1, NUM_CLASSES)
    assert_param_groups_partition(model)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_lateral_fusion_and_options(output_stride):
    model = tiny(lateral=True, output_stride=output_stride).eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        outputs = model(x)
        prediction = model.predict(x)
    size = (9, 7) if output_stride == 8 else (5, 4)
    assert outputs["out"].shape == (1, NUM_CLASSES, *size)
    assert prediction.shape == (1, NUM_CLASSES, 65, 49)
    # width-0.25 ResNet-18: layer2 32, layer3 64 channels -> 1x1 to 32 (512 x 128/2048).
    assert model.lateral_layer2[0].in_channels == 32 and model.lateral_layer3[0].in_channels == 64
    assert model.fusion[0].in_channels == 3 * 32

    plain = tiny(aux=False, se_loss=False).eval()
    with torch.no_grad():
        outputs = plain(x)
    assert set(outputs) == {"out"}
    _, labels = fixed_batch()
    assert set(plain.loss(plain(fixed_batch()[0]), labels)) == {"main", "total"}


def test_head_widths_follow_the_backbone():
    full = EncNet(21, depth=50)
    assert full.conv5[0].in_channels == 2048 and full.conv5[0].out_channels == 512
    assert full.context.encoding.codewords.shape == (32, 512)
    assert full.context.se_classifier.out_features == 21
    assert full.aux_head.conv[0].in_channels == 1024 and full.aux_head.conv[0].out_channels == 256
    assert full.backbone.strides_of["layer4"] == 8
