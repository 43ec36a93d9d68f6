"""FCN-32s/16s/8s (skip architecture at OS32) and the dilated fcn-d8."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wsseg.models.segmenters.fcn import FCN8s, FCN16s, FCN32s, FCNDilated, bilinear_kernel
from segmenter_batches import assert_param_groups_partition, fixed_batch, train_losses

NUM_CLASSES = 5


def tiny(cls, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return cls(NUM_CLASSES, depth=18, width=0.25, **kwargs)


@pytest.mark.parametrize("cls", [FCN32s, FCN16s, FCN8s, FCNDilated])
def test_contract(cls):
    model = tiny(cls)
    # Loss falls clearly on a fixed batch (measured: 10 steps end at 0.03-0.4 of the start).
    losses = train_losses(model, lr=0.01)
    assert losses[-1] < 0.6 * losses[0], losses
    # predict: input size for odd sizes, deterministic in eval mode.
    model.eval()
    x = torch.randn(1, 3, 65, 49)
    with torch.no_grad():
        first, second = model.predict(x), model.predict(x)
    assert first.shape == (1, NUM_CLASSES, 65, 49)
    assert torch.equal(first, second)
    # param_groups: every trainable parameter exactly once; the backbone's in the first.
    assert_param_groups_partition(model)


def test_output_strides_and_aux():
    x = torch.randn(1, 3, 65, 49)  # layer2 9x7, layer3 5x4, layer4 3x2
    with torch.no_grad():
        assert tiny(FCN32s).eval()(x)["out"].shape[-2:] == (3, 2)
        assert tiny(FCN16s).eval()(x)["out"].shape[-2:] == (5, 4)
        assert tiny(FCN8s).eval()(x)["out"].shape[-2:] == (9, 7)
        outputs = tiny(FCNDilated).eval()(x)
    assert set(outputs) == {"out", "aux"} and outputs["out"].shape[-2:] == (9, 7)
    assert "aux" not in tiny(FCN8s)(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="output_stride must be 32"):
        FCN8s(NUM_CLASSES, depth=18, width=0.25, output_stride=8)


def test_upsampler_starts_as_bilinear_interpolation():
    model = tiny(FCN8s)
    x = torch.randn(1, NUM_CLASSES, 6, 7)
    for upsample in model.upsamplers:
        assert torch.equal(upsample.weight, bilinear_kernel(NUM_CLASSES, 2))
        with torch.no_grad():
            learned = upsample(x)
        reference = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        assert learned.shape == reference.shape == (1, NUM_CLASSES, 12, 14)
        # Equal away from the one-pixel border, where the deconvolution sees zero padding.
        torch.testing.assert_close(learned[..., 1:-1, 1:-1], reference[..., 1:-1, 1:-1])
        assert not torch.allclose(learned[..., 0, :], reference[..., 0, :])
    assert model.upsamplers[0].weight.requires_grad  # learned, not fixed


def test_skips_start_at_zero_so_fcn8s_equals_upsampled_fcn32s():
    fcn32s = tiny(FCN32s, seed=1)
    fcn8s = tiny(FCN8s, seed=2)
    for stage in ("layer3", "layer2"):
        assert not fcn8s.scores[stage].weight.any() and not fcn8s.scores[stage].bias.any()
    # Same backbone and stride-32 score layer: copy FCN-32s into FCN-8s (the staged training).
    missing, unexpected = fcn8s.load_state_dict(fcn32s.state_dict(), strict=False)
    assert not unexpected
    assert all(k.startswith(("scores.layer3", "scores.layer2", "upsamplers")) for k in missing)
    fcn32s.eval()
    fcn8s.eval()
    x = torch.randn(1, 3, 161, 225)  # layer2 21x29, layer3 11x15, layer4 6x8
    with torch.no_grad():
        coarse = fcn32s(x)["out"]
        fine = fcn8s(x)["out"]
        # Exactly the stride-32 scores through the two bilinear deconvolutions, cropped.
        weight = bilinear_kernel(NUM_CLASSES, 2)
        expected = F.conv_transpose2d(coarse, weight, stride=2, padding=1)[..., :11, :15]
        expected = F.conv_transpose2d(expected, weight, stride=2, padding=1)[..., :21, :29]
    torch.testing.assert_close(fine, expected, rtol=1e-5, atol=1e-6)
    # Hence FCN-32s' prediction upsampled 2x twice, away from the borders.
    twice = F.interpolate(coarse, scale_factor=2, mode="bilinear", align_corners=False)[..., :11, :15]
    twice = F.interpolate(twice, scale_factor=2, mode="bilinear", align_corners=False)[..., :21, :29]
    torch.testing.assert_close(fine[..., 3:-3, 3:-3], twice[..., 3:-3, 3:-3], rtol=1e-5, atol=1e-6)
    # The skips learn: after a backward pass their score layers have gradients.
    fcn8s.train()
    images, labels = fixed_batch()
    fcn8s.loss(fcn8s(images), labels)["total"].backward()
    assert fcn8s.scores["layer2"].weight.grad.abs().sum() > 0
    assert fcn8s.scores["layer3"].weight.grad.abs().sum() > 0
