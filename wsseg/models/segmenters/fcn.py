"""Fully convolutional networks (Long, Shelhamer, Darrell, CVPR 2015) on a ResNet, and
the toolboxes' dilated "FCN" (docs/ALGORITHMS.md §2).

FCN-32s/16s/8s keep the backbone at output stride 32 and fuse coarse and fine
predictions: a 1x1 score layer on layer4 (stride 32); FCN-16s adds a score layer on
layer3 (stride 16) to the 2x-upsampled stride-32 scores; FCN-8s then adds layer2's
(stride 8) to the 2x-upsampled sum. The 2x upsamplers are ConvTranspose2d(4, stride 2,
padding 1) initialised to bilinear interpolation and learned; the skip score layers
start at zero, so at initialisation FCN-16s/8s predict what FCN-32s predicts,
upsampled through the bilinear deconvolutions (the paper's staged training: each
finer net starts from the coarser one). The last step to the image is bilinear
interpolation (the paper's fixed bilinear deconvolution).

`fcn-d8` is mmsegmentation's/PyTorch-Encoding's FCN: a dilated ResNet at OS8, two 3x3
convs (512 at ResNet-50 width, BN, ReLU), dropout 0.1, classifier, aux head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsseg.models.backbones import resnet
from wsseg.models.segmenters.common import AuxHead, Segmenter, classifier, conv_bn_relu, head_channels


def bilinear_kernel(channels: int, factor: int) -> Tensor:
    """ConvTranspose2d weight (channels, channels, k, k), k = 2·factor − factor % 2, that
    upsamples each channel separately by bilinear interpolation (FCN's upsample_filt).

    For factor 2 (k 4) with stride 2 and padding 1 the output is F.interpolate(
    scale_factor=2, mode="bilinear", align_corners=False) away from a one-pixel border,
    where the deconvolution sees zero padding instead of the edge value.
    """
    size = 2 * factor - factor % 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(size, dtype=torch.float32) - centre).abs() / factor
    weight = torch.zeros(channels, channels, size, size)
    weight[range(channels), range(channels)] = taps[:, None] * taps[None, :]
    return weight


class _FCNSkip(Segmenter):
    """FCN with score layers on layer4 and on `skip_stages` (finest last)."""

    skip_stages: tuple[str, ...] = ()

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 output_stride: int = 32, aux: bool = False) -> None:
        super().__init__()
        if output_stride != 32:
            raise ValueError(f"FCN-32s/16s/8s fuse strides 32, 16 and 8: output_stride must be 32, "
                             f"got {output_stride} (use fcn-d8 for a dilated FCN)")
        self.backbone = resnet(depth, output_stride=32, width=width)
        channels = self.backbone.channels
        # The stride-32 score layer gets the N(0, 0.01) of every classifier here (the paper
        # zero-initialised it on a pretrained VGG and found random init no better or faster).
        self.scores = nn.ModuleDict({"layer4": classifier(channels["layer4"], num_classes)})
        self.upsamplers = nn.ModuleList()
        for stage in self.skip_stages:
            score = nn.Conv2d(channels[stage], num_classes, 1)
            nn.init.zeros_(score.weight)  # FCN: skips start at zero, adding nothing at first
            nn.init.zeros_(score.bias)
            self.scores[stage] = score
            upsample = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, padding=1, bias=False)
            with torch.no_grad():
                upsample.weight.copy_(bilinear_kernel(num_classes, 2))
            self.upsamplers.append(upsample)
        self.aux_head = (AuxHead(channels["layer3"], num_classes, channels=head_channels(self.backbone, 256))
                         if aux else None)

    def head(self, features: dict[str, Tensor]) -> Tensor:
        """Fused scores at the stride of the finest skip (32, 16 or 8)."""
        logits = self.scores["layer4"](features["layer4"])
        for stage, upsample in zip(self.skip_stages, self.upsamplers):
            skip = self.scores[stage](features[stage])
            # A stride-2 stage maps n to ceil(n / 2), so 2x brings back n or n + 1: crop.
            logits = upsample(logits)[..., : skip.shape[-2], : skip.shape[-1]] + skip
        return logits


class FCN32s(_FCNSkip):
    """FCN-32s: the layer4 score map (stride 32), bilinearly upsampled to the image."""

    skip_stages = ()


class FCN16s(_FCNSkip):
    """FCN-16s: 2x(layer4 scores) + layer3 scores (stride 16)."""

    skip_stages = ("layer3",)


class FCN8s(_FCNSkip):
    """FCN-8s: 2x(2x(layer4 scores) + layer3 scores) + layer2 scores (stride 8)."""

    skip_stages = ("layer3", "layer2")


class FCNDilated(Segmenter):
    """The toolboxes' FCN (`fcn-d8`): dilated ResNet at OS8 (or 16), two 3x3 convs with
    BN + ReLU (512 channels at ResNet-50 width), dropout 0.1, 1x1 classifier; aux head
    on layer3 with weight 0.4 (mmsegmentation's fcn_r50-d8)."""

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 output_stride: int = 8, aux: bool = True) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"fcn-d8: output_stride must be 8 or 16, got {output_stride}")
        self.backbone = resnet(depth, output_stride=output_stride, width=width)
        channels = head_channels(self.backbone, 512)
        self.convs = nn.Sequential(
            conv_bn_relu(self.backbone.channels["layer4"], channels, 3),
            conv_bn_relu(channels, channels, 3),
        )
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = classifier(channels, num_classes)
        self.aux_head = (AuxHead(self.backbone.channels["layer3"], num_classes,
                                 channels=head_channels(self.backbone, 256)) if aux else None)

    def head(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.convs(features["layer4"])))
