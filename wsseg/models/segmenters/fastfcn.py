"""FastFCN (Wu et al., "FastFCN: Rethinking Dilated Convolution in the Backbone for Semantic
Segmentation", 2019): an undilated ResNet (output stride 32) whose layer2, layer3 and layer4
outputs the Joint Pyramid Upsampling module (JPU) turns into one stride-8 map, in place of
the dilated layer3/layer4 of an OS8 backbone; a segmentation head on that map.

JPU: each of the three stages through a 3x3 conv (BN, ReLU) to `width` channels (512 at
ResNet-50/101 width, scaled with the backbone), layer3 and layer4 upsampled (bilinear) to
layer2's size (stride 8), concatenated (3·width) -> four parallel separable convs with
dilation 1, 2, 4, 8 (depthwise 3x3, BN, pointwise 1x1 to `width`, BN, ReLU), concatenated
(4·width: 2048 at ResNet-50 width, layer4's channel count of a dilated ResNet-50).

Heads (`head`), as the authors' code pairs them with JPU:
  - "enc" (default, the paper's main model): EncNet's head, imported from encnet.py: a 1x1
    conv 512 (BN, ReLU: the authors' EncHead uses 1x1 instead of 3x3 after JPU), the
    context encoding module with its SE-loss, dropout 0.1, 1x1 classifier;
  - "psp": PSPNet's pyramid pooling (from pspnet.py) with bins 1, 2, 3, 6, 3x3 conv 512,
    dropout 0.1, 1x1 classifier;
  - "aspp": DeepLab v3's ASPP (common.ASPP) with rates 12, 24, 36 (stride 8) and image
    pooling, 256 channels, dropout2d 0.5, then 3x3 conv 256, dropout 0.1, 1x1 classifier
    (the authors' DeepLabV3Head).
Aux FCN head on layer3 (stride 16 here) and SE-loss weights 0.2 (the authors' --aux-weight
and --se-weight defaults).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from wsseg.models.backbones import resnet
from wsseg.models.segmenters.common import (
    ASPP,
    AuxHead,
    classifier,
    conv_bn_relu,
    head_channels,
    upsample_to,
)
from wsseg.models.segmenters import encnet
from wsseg.models.segmenters.encnet import AUX_WEIGHT, NUM_CODES, SE_WEIGHT, ContextEncoding
from wsseg.models.segmenters.pspnet import PyramidPooling

# JPU: the dilation rates of its four separable convs (the authors' JPU).
JPU_DILATIONS = (1, 2, 4, 8)
# The stages JPU reads, highest resolution first (its output has the first one's size).
JPU_STAGES = ("layer2", "layer3", "layer4")
# The "aspp" head: DeepLab v3's rates at stride 8 (the authors' DeepLabV3Head default).
ASPP_RATES = (12, 24, 36)
HEADS = ("enc", "psp", "aspp")


class SeparableConv(nn.Sequential):
    """The authors' SeparableConv2d: depthwise 3x3 conv with `dilation` (padding = dilation,
    no bias), BatchNorm over the input channels, pointwise 1x1 conv to `out_channels` (no bias)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=dilation, dilation=dilation, groups=in_channels,
                      bias=False),
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
        )


class JointPyramidUpsampling(nn.Module):
    """JPU on three backbone stages (strides s, 2s, 4s; FastFCN: layer2, layer3, layer4 at 8, 16, 32).

    Each input through a 3x3 conv (BN, ReLU) to `width`; the two coarser ones upsampled
    (bilinear, align_corners=False) to the finest one's size; concatenated in the authors'
    order (coarsest first: layer4, layer3, layer2) -> one branch per dilation d: a separable
    conv (`SeparableConv`) 3·width -> width, BN, ReLU; the branches concatenated in
    dilation order. (B, c_i, h_i, w_i) x 3 -> (B, len(dilations)·width, h_0, w_0).

    Attributes: dilations (tuple), reduce (ModuleList, one conv per input in input order),
    branches (ModuleList, one per dilation), out_channels.
    """

    def __init__(self, in_channels: Sequence[int], width: int, dilations: Sequence[int] = JPU_DILATIONS) -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ValueError(f"JPU reads 3 stages, got {len(in_channels)} channel counts")
        self.dilations = tuple(int(d) for d in dilations)
        if not self.dilations or any(d < 1 for d in self.dilations):
            raise ValueError(f"JPU dilations must be integers >= 1, got {tuple(dilations)}")
        self.reduce = nn.ModuleList(conv_bn_relu(c, width, 3) for c in in_channels)
        self.branches = nn.ModuleList(
            nn.Sequential(SeparableConv(3 * width, width, d), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            for d in self.dilations
        )
        self.out_channels = len(self.dilations) * width

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """[finest, middle, coarsest] stage outputs -> (B, out_channels, *finest size)."""
        size = features[0].shape[-2:]
        reduced = [upsample_to(conv(x), size) for conv, x in zip(self.reduce, features)]
        merged = torch.cat(reduced[::-1], dim=1)
        return torch.cat([branch(merged) for branch in self.branches], dim=1)


class FastFCN(encnet.SELossSegmenter):
    """FastFCN: undilated ResNet (OS32) -> JPU on layer2/3/4 (stride 8, 4·width channels) -> head.

    Args:
        num_classes: classes including background (C + 1).
        depth, width: the ResNet.
        head: "enc" (EncNet's head, the paper's main model), "psp" or "aspp".
        aux: the auxiliary FCN head on layer3 (loss weight 0.2).
        se_loss: the enc head's SE-loss branch (weight `se_weight`); psp and aspp have no
            SE branch and ignore it, as the authors' code does.
        num_codes: K of the enc head's Encoding layer (32).
        se_weight: weight of the SE-loss in "total" (0.2).
        jpu_dilations: the JPU branches' dilations (1, 2, 4, 8).

    Widths: JPU 512 per branch, the enc/psp heads' 512, the aspp head's 256 and the aux
    head's 256 are the paper's at ResNet-50/101 width 1 and scale with the backbone's layer4
    (`common.head_channels`); the pyramid pooling branches get a quarter of the JPU output.

    forward() returns {"out": logits at stride 8, "aux": layer3 logits at stride 16 (with
    aux), "se": SE logits (B, num_classes) (enc head with se_loss)}; loss() returns "main",
    ["aux"], ["se"], "total" = main + 0.2·aux + se_weight·se.
    """

    aux_weight = AUX_WEIGHT

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0, head: str = "enc",
                 aux: bool = True, se_loss: bool = True, num_codes: int = NUM_CODES,
                 se_weight: float = SE_WEIGHT, jpu_dilations: Sequence[int] = JPU_DILATIONS) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"fastfcn: head must be one of {', '.join(HEADS)}, got {head!r}")
        self.num_classes = num_classes
        self.head_type = head
        self.se_weight = se_weight
        self.backbone = resnet(depth, output_stride=32, width=width)
        self.jpu = JointPyramidUpsampling([self.backbone.channels[s] for s in JPU_STAGES],
                                          head_channels(self.backbone, 512), jpu_dilations)
        in_channels = self.jpu.out_channels
        if head == "enc":
            channels = head_channels(self.backbone, 512)
            self.project = conv_bn_relu(in_channels, channels, 1)
            self.context = ContextEncoding(channels, num_codes, se_classes=num_classes if se_loss else None)
        elif head == "psp":
            self.pyramid = PyramidPooling(in_channels, max(8, in_channels // 4), (1, 2, 3, 6))
            channels = head_channels(self.backbone, 512)
            self.bottleneck = conv_bn_relu(self.pyramid.out_channels, channels, 3)
        else:
            channels = head_channels(self.backbone, 256)
            self.aspp = ASPP(in_channels, channels, ASPP_RATES, dropout=0.0)
            self.aspp_dropout = nn.Dropout2d(0.5)
            self.bottleneck = conv_bn_relu(channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = classifier(channels, num_classes)
        self.aux_head = (AuxHead(self.backbone.channels["layer3"], num_classes,
                                 channels=head_channels(self.backbone, 256)) if aux else None)

    def upsampled(self, features: dict[str, Tensor]) -> Tensor:
        """The JPU output (B, jpu.out_channels, ~H/8, ~W/8) from the backbone's stages."""
        return self.jpu([features[s] for s in JPU_STAGES])

    def head_with_se(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        x = self.upsampled(features)
        se_logits = None
        if self.head_type == "enc":
            x, se_logits = self.context(self.project(x))
        elif self.head_type == "psp":
            x = self.bottleneck(self.pyramid(x))
        else:
            x = self.bottleneck(self.aspp_dropout(self.aspp(x)))
        return self.classifier(self.dropout(x)), se_logits

