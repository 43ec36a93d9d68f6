"""PSPNet (Zhao et al., CVPR 2017; docs/ALGORITHMS.md §2): dilated ResNet at OS8, pyramid
pooling module, 3x3 conv, dropout, classifier; aux head on layer3 with weight 0.4
(the paper's deep supervision).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from wsseg.models.backbones import resnet
from wsseg.models.segmenters.common import (
    AuxHead,
    Segmenter,
    classifier,
    conv_bn_relu,
    head_channels,
    upsample_to,
)


class PyramidPooling(nn.Module):
    """Pyramid pooling: for each bin count b, adaptive average pooling to b x b, 1x1 conv
    to `branch_channels` (BN, ReLU), bilinear upsampling back; concatenated after the
    input: (B, C, h, w) -> (B, C + len(bins)·branch_channels, h, w) for any h, w
    (a map smaller than b pools overlapping regions).

    BatchNorm on the 1x1 bin sees one value per image and channel: training needs at
    least 2 images per device.
    """

    def __init__(self, in_channels: int, branch_channels: int, bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        self.bins = tuple(int(b) for b in bins)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(b), conv_bn_relu(in_channels, branch_channels, 1))
            for b in self.bins
        )
        self.out_channels = in_channels + len(self.bins) * branch_channels

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [upsample_to(branch(x), size) for branch in self.branches], dim=1)


class PSPNet(Segmenter):
    """PSPNet: layer4 (C channels) -> pyramid pooling with bins (1, 2, 3, 6), each branch
    C/N channels for N bins (the paper's 1/N: 512 at ResNet-50 width), concat with the input (2C) -> 3x3 conv
    (512 at ResNet-50 width, scaled with the backbone), BN, ReLU -> dropout 0.1 ->
    1x1 classifier. Logits at the output stride (8)."""

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 output_stride: int = 8, aux: bool = True,
                 bins: Sequence[int] = (1, 2, 3, 6)) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"pspnet: output_stride must be 8 or 16, got {output_stride}")
        self.backbone = resnet(depth, output_stride=output_stride, width=width)
        in_channels = self.backbone.channels["layer4"]
        self.pyramid = PyramidPooling(in_channels, max(8, in_channels // len(tuple(bins))), bins)
        channels = head_channels(self.backbone, 512)
        self.bottleneck = conv_bn_relu(self.pyramid.out_channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = classifier(channels, num_classes)
        self.aux_head = (AuxHead(self.backbone.channels["layer3"], num_classes,
                                 channels=head_channels(self.backbone, 256)) if aux else None)

    def head(self, features: dict[str, Tensor]) -> Tensor:
        x = self.bottleneck(self.pyramid(features["layer4"]))
        return self.classifier(self.dropout(x))
