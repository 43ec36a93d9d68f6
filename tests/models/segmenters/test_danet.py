"""DANet: the position and channel attention modules against per-position / per-channel loops,
the identity at initialisation (γ = 0), the branch wiring and loss, and the segmenter contract."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from wsseg.models.segmenters.danet import ChannelAttention, DANet, PositionAttention
from segmenter_batches import assert_param_groups_partition, eval_outputs, fixed_batch, train_steps

NUM_CLASSES = 5


def tiny(seed: int = 0, **kwargs) -> DANet:
    torch.manual_seed(seed)
    return DANet(NUM_CLASSES, depth=18, width=0.25, **kwargs)


def conv1x1(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv on one feature vector x (C,), in float64: W x + b."""
    return conv.weight.detach().double()[:, :, 0, 0] @ x + conv.bias.detach().double()


def position_attention_by_loop(module: PositionAttention, x: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 1-2, one output position at a time, in float64."""
    batch, channels, height, width = x.shape
    out = torch.zeros(batch, channels, height, width, dtype=torch.float64)
    gamma = module.gamma.item()
    for b in range(batch):
        points = [x[b, :, i, j].double() for i in range(height) for j in range(width)]
        queries = [conv1x1(module.query, p) for p in points]
        keys = [conv1x1(module.key, p) for p in points]
        values = [conv1x1(module.value, p) for p in points]
        for n, query in enumerate(queries):
            energies = [float(query @ key) for key in keys]
            top = max(energies)
            weights = [math.exp(e - top) for e in energies]
            total = sum(weights)
            summed = sum(w / total * v for w, v in zip(weights, values))
            out[b, :, n // width, n % width] = gamma * summed + points[n]
    return out


def channel_attention_by_loop(gamma: float, x: torch.Tensor) -> torch.Tensor:
    """The authors' CAM_Module, one output channel at a time, in float64: energies
    e_cd = x_c · x_d, weights softmax_d(max_d' e_cd' − e_cd), out_c = γ Σ_d s_cd x_d + x_c."""
    batch, channels = x.shape[:2]
    maps = x.double().flatten(2)
    out = torch.zeros_like(maps)
    for b in range(batch):
        for c in range(channels):
            energies = [float(maps[b, c] @ maps[b, d]) for d in range(channels)]
            flipped = [max(energies) - e for e in energies]
            top = max(flipped)
            weights = [math.exp(f - top) for f in flipped]
            total = sum(weights)
            summed = sum(w / total * maps[b, d] for d, w in enumerate(weights))
            out[b, c] = gamma * summed + maps[b, c]
    return out.view(x.shape)


def test_position_attention_matches_a_loop_over_positions():
    torch.manual_seed(0)
    module = PositionAttention(16)
    assert module.query.out_channels == module.key.out_channels == 2  # C/8
    assert module.value.out_channels == 16
    with torch.no_grad():
        module.gamma.fill_(0.75)
    x = torch.randn(2, 16, 3, 5)
    expected = position_attention_by_loop(module, x)
    with torch.no_grad():
        out = module(x)
        attention = module.attention(x)
    assert attention.shape == (2, 15, 15)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 15))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_channel_attention_matches_a_loop_over_channels_and_attends_to_the_least_similar():
    torch.manual_seed(1)
    module = ChannelAttention()
    with torch.no_grad():
        module.gamma.fill_(-0.375)
    x = torch.randn(2, 6, 4, 3) * 0.3
    with torch.no_grad():
        out = module(x)
        attention = module.attention(x)
    torch.testing.assert_close(out.double(), channel_attention_by_loop(-0.375, x), atol=1e-5, rtol=1e-5)
    # The max-minus step is a shift: the weights are softmax(-x_c · x_d), so each channel draws
    # most from the channel least like it.
    maps = x.flatten(2)
    torch.testing.assert_close(attention, F.softmax(-(maps @ maps.transpose(1, 2)), dim=-1))
    energy = maps @ maps.transpose(1, 2)
    assert torch.equal(attention.argmax(-1), energy.argmin(-1))
    # float64 input stays float64 (to the loop's precision).
    with torch.no_grad():
        out64 = module.double()(x.double())
    torch.testing.assert_close(out64, channel_attention_by_loop(-0.375, x), atol=1e-12, rtol=1e-12)


def test_channel_attention_survives_large_energies_under_autocast():
    """e_cd sums N products: here (N = 4096, ReLU maps x 4) ~3e4, half of float16's range, and bf16
    keeps three digits of it, which would move the softmax's exponents by tens. The module computes
    them in float32 whatever autocast says (checked to fail with the energies left to autocast)."""
    torch.manual_seed(2)
    module = ChannelAttention()
    with torch.no_grad():
        module.gamma.fill_(1.0)
    x = F.relu(torch.randn(1, 8, 64, 64)) * 4
    with torch.no_grad():
        reference = module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = module(x.bfloat16())
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), reference, atol=0.1, rtol=0.02)


def test_attention_modules_are_the_identity_at_initialisation_and_learn_gamma():
    torch.manual_seed(3)
    pam, cam = PositionAttention(16), ChannelAttention()
    assert pam.gamma.item() == 0.0 and cam.gamma.item() == 0.0
    x = torch.randn(2, 16, 4, 4, requires_grad=True)
    assert torch.equal(pam(x), x) and torch.equal(cam(x), x)
    # γ = 0 stops the gradient to PAM's projections, not to γ itself: the first step moves γ,
    # and from then on the projections learn.
    target = torch.randn(2, 16, 4, 4)
    ((pam(x) + cam(x) - target) ** 2).sum().backward()
    assert pam.gamma.grad.abs().item() > 0 and cam.gamma.grad.abs().item() > 0
    assert pam.query.weight.grad.abs().sum() == 0 and pam.value.weight.grad.abs().sum() == 0
    with torch.no_grad():
        pam.gamma.fill_(0.1)
    pam.zero_grad()
    ((pam(x) - target) ** 2).sum().backward()
    assert pam.query.weight.grad.abs().sum() > 0 and pam.value.weight.grad.abs().sum() > 0

    model = tiny().eval()
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        features = model.backbone(images)
        layer4 = features["layer4"]
        # At initialisation each branch is conv -> identity -> conv.
        pam_branch, cam_branch = model.branches(layer4)
        torch.testing.assert_close(pam_branch, model.conv_pam(model.reduce_pam(layer4)))
        torch.testing.assert_close(cam_branch, model.conv_cam(model.reduce_cam(layer4)))


def test_outputs_are_the_sum_and_each_branch_and_the_loss_weights_them_equally():
    model = tiny()
    with torch.no_grad():  # non-trivial attention
        model.pam.gamma.fill_(0.5)
        model.cam.gamma.fill_(0.3)
    model.eval()
    images, labels = fixed_batch()
    with torch.no_grad():
        outputs = model(images)
        pam, cam = model.branches(model.backbone(images)["layer4"])
    assert set(outputs) == {"out", "pam", "cam"}
    torch.testing.assert_close(outputs["out"], model.classifier(pam + cam))
    torch.testing.assert_close(outputs["pam"], model.classifier_pam(pam))
    torch.testing.assert_close(outputs["cam"], model.classifier_cam(cam))

    logits = {"out": torch.randn(2, NUM_CLASSES, 8, 8), "pam": torch.randn(2, NUM_CLASSES, 8, 8),
              "cam": torch.zeros(2, NUM_CLASSES, 8, 8)}
    terms = model.loss(logits, labels)
    assert list(terms) == ["main", "pam", "cam", "total"]
    torch.testing.assert_close(terms["cam"], torch.tensor(math.log(NUM_CLASSES)))
    torch.testing.assert_close(terms["total"], terms["main"] + terms["pam"] + terms["cam"])
    weighted = tiny(aux=True, branch_weight=0.5)
    logits["aux"] = torch.randn(2, NUM_CLASSES, 8, 8)
    terms = weighted.loss(logits, labels)
    assert list(terms) == ["main", "aux", "pam", "cam", "total"]
    torch.testing.assert_close(terms["total"], terms["main"] + 0.4 * terms["aux"] + 0.5 * (terms["pam"] + terms["cam"]))


def test_contract():
    model = tiny()
    losses, _ = train_steps(model, lr=0.01)
    assert losses[-1] < 0.6 * losses[0], losses
    assert model.pam.gamma.item() != 0 and model.cam.gamma.item() != 0
    assert model.pam.query.weight.grad.abs().sum() > 0

    outputs = eval_outputs(model, NUM_CLASSES)
    assert outputs["out"].shape[-2:] == outputs["pam"].shape[-2:] == outputs["cam"].shape[-2:] == (9, 7)  # OS8
    assert_param_groups_partition(model)
    backbone, heads = model.param_groups()
    assert any(p is model.pam.gamma for p in heads) and any(p is model.cam.gamma for p in heads)


@pytest.mark.parametrize("kwargs, size", [({"output_stride": 16, "aux": True}, (5, 4)),
                                          ({"multi_grid": (1, 2, 4)}, (9, 7))])
def test_options(kwargs, size):
    model = tiny(**kwargs).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 65, 49))
    assert outputs["out"].shape == (1, NUM_CLASSES, *size)
    assert ("aux" in outputs) == bool(kwargs.get("aux"))
    if "multi_grid" in kwargs:  # ResNet-18's two layer4 units: dilations 4·1, 4·2
        assert [unit.conv2.dilation for unit in model.backbone.layer4] == [(4, 4), (8, 8)]
    with pytest.raises(ValueError, match="output_stride"):
        tiny(output_stride=32)


def test_head_widths_follow_the_backbone():
    full = DANet(21, depth=50)
    assert full.reduce_pam[0].in_channels == 2048 and full.reduce_pam[0].out_channels == 512
    assert full.pam.query.out_channels == 64 and full.pam.value.out_channels == 512
    assert full.classifier.in_channels == 512 and full.aux_head is None
    assert full.backbone.strides_of["layer4"] == 8
    small = tiny()  # width-0.25 ResNet-18: layer4 128 channels -> 32, query/key 4
    assert small.reduce_cam[0].out_channels == 32 and small.pam.key.out_channels == 4
