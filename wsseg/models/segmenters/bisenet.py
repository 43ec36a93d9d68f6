"""BiSeNet (Yu, Wang, Peng, Gao, Yu, Sang, "BiSeNet: Bilateral Segmentation Network for
Real-time Semantic Segmentation", ECCV 2018; docs/models/bisenet.md): two paths over the
image, fused at stride 8.

  Spatial path   three stride-2 conv-BN-ReLU (7x7 64, 3x3 64, 3x3 64) and a 1x1
                 conv-BN-ReLU to 128: wide, shallow, stride 8.
  Context path   a light ResNet at output stride 32 (the paper's ResNet-18); global
                 average pooling on layer4 (1x1 conv-BN-ReLU 128, broadcast); an attention
                 refinement module (ARM) on layer4 (stride 32) and on layer3 (stride 16).
                 From the deepest up: ARM(layer4) + global -> upsample to layer3's size ->
                 3x3 conv-BN-ReLU ("c16", stride 16); ARM(layer3) + c16 -> upsample to the
                 spatial path's size -> 3x3 conv-BN-ReLU ("c8", stride 8).
  Fusion         the feature fusion module (FFM): concat(spatial, c8) -> 1x1 conv-BN-ReLU
                 256 -> x + x·SE(x), SE = global pool, 1x1 conv, ReLU, 1x1 conv, sigmoid.
  Head           3x3 conv-BN-ReLU 64 -> 1x1 to classes: logits at stride 8.
  Aux heads      3x3 conv-BN-ReLU 256 -> 1x1 to classes on c16 ("aux32": the output of the
                 layer4 branch) and on c8 ("aux16": the output of the layer3 branch); loss
                 = main + alpha·(aux16 + aux32) with the paper's alpha = 1.

The layout and the widths the paper leaves open (the 7x7 first conv, the 1x1 to 128, the
3x3 conv in each ARM before its attention, the BN in the ARM's attention, the aux heads'
256) are the authors' own code (TorchSeg, model/bisenet/cityscapes.bisenet.R18). Its
widths are the same for ResNet-18 and ResNet-101, so here they scale with the backbone's
width multiplier only, not with its depth: 128 stays 128 on any width-1 ResNet and
becomes 32 at width 0.25.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsseg.models.backbones import ResNet, resnet
from wsseg.models.segmenters.common import Segmenter, classifier, conv_bn_relu, upsample_to

# BiSeNet's widths at backbone width 1 (the authors' ResNet-18 and ResNet-101 models alike).
SPATIAL_INNER, SPATIAL_OUT = 64, 128
CONTEXT_CHANNELS = 128
HEAD_CHANNELS, AUX_HEAD_CHANNELS = 64, 256


def bisenet_channels(backbone: ResNet, channels: int) -> int:
    """A BiSeNet width scaled with the backbone's width multiplier (at least 8)."""
    return max(8, int(round(channels * backbone.width)))


def conv_bn_relu_strided(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Sequential:
    """kxk conv with stride (no bias), BN, ReLU; padding k // 2 (size ceil(n / stride))."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class SpatialPath(nn.Module):
    """Three stride-2 conv-BN-ReLU (7x7, 3x3, 3x3 at `inner` channels) and a 1x1 conv-BN-ReLU
    to `out_channels`: (B, 3, H, W) -> (B, out_channels, ceil(H/8), ceil(W/8)), the size of a
    ResNet's layer2."""

    def __init__(self, inner: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            conv_bn_relu_strided(3, inner, 7, 2),
            conv_bn_relu_strided(inner, inner, 3, 2),
            conv_bn_relu_strided(inner, inner, 3, 2),
        )
        self.project = conv_bn_relu(inner, out_channels, 1)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.convs(x))


class AttentionRefinement(nn.Module):
    """ARM: x -> f = 3x3 conv-BN-ReLU(x) -> f · sigmoid(BN(1x1 conv(global average pool(f)))).

    The attention is one weight in (0, 1) per image and channel. Its BatchNorm sees one value
    per image and channel: training needs at least 2 images per device.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, out_channels, 3)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, h, w) -> (B, out_channels, h, w)."""
        features = self.conv(x)
        return features * self.attention(features)


class FeatureFusion(nn.Module):
    """FFM: x = 1x1 conv-BN-ReLU(concat(spatial, context)) -> x + x · a, where
    a = sigmoid(conv2(relu(conv1(global average pool(x))))) is SE-like channel attention
    (1x1 convs without bias or BN; `reduction` divides the hidden width, 1 in the authors'
    models). Spatial first in the concatenation."""

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 1) -> None:
        super().__init__()
        hidden = max(1, out_channels // reduction)
        self.fuse = conv_bn_relu(in_channels, out_channels, 1)
        self.attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(out_channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, spatial: Tensor, context: Tensor) -> Tensor:
        """spatial (B, Cs, h, w), context (B, Cc, h, w) -> (B, out_channels, h, w)."""
        x = self.fuse(torch.cat([spatial, context], dim=1))
        return x + x * self.attention(x)


class BiSeNetHead(nn.Module):
    """3x3 conv-BN-ReLU to `channels`, 1x1 to classes (N(0, 0.01), zero bias)."""

    def __init__(self, in_channels: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.classifier = classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.conv(x))


class BiSeNet(Segmenter):
    """BiSeNet: spatial path + context path (ResNet at output stride 32 with ARMs and global
    pooling), feature fusion, head at stride 8 (module docstring).

    Args:
        num_classes: classes including background.
        depth, width: the context path's ResNet (the paper's is ResNet-18); the BiSeNet
            widths (128 context, 256 fusion, 64 head) scale with width only.
        aux: the two auxiliary heads on the context path and their loss terms.
        aux_weight: alpha, the weight of each aux term in "total" (the paper's 1).

    forward(x) -> {"out": logits at stride 8, "aux16": the layer3 branch's logits (stride 8),
    "aux32": the layer4 branch's logits (stride 16)} (the aux entries only with aux);
    loss -> {"main", "aux16", "aux32", "total" = main + aux_weight·(aux16 + aux32)}.
    """

    def __init__(self, num_classes: int, *, depth: int = 18, width: float = 1.0,
                 aux: bool = True, aux_weight: float = 1.0) -> None:
        super().__init__()
        if aux_weight < 0:
            raise ValueError(f"bisenet: aux_weight must be >= 0, got {aux_weight}")
        self.aux_weight = float(aux_weight)
        self.backbone = resnet(depth, output_stride=32, width=width)
        channels = self.backbone.channels
        context = bisenet_channels(self.backbone, CONTEXT_CHANNELS)
        self.spatial_path = SpatialPath(bisenet_channels(self.backbone, SPATIAL_INNER),
                                        bisenet_channels(self.backbone, SPATIAL_OUT))
        self.global_context = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(channels["layer4"], context, 1))
        self.arm32 = AttentionRefinement(channels["layer4"], context)
        self.arm16 = AttentionRefinement(channels["layer3"], context)
        self.refine32 = conv_bn_relu(context, context, 3)
        self.refine16 = conv_bn_relu(context, context, 3)
        fused = self.spatial_path.out_channels + context
        self.ffm = FeatureFusion(fused, fused)
        self.head_out = BiSeNetHead(fused, bisenet_channels(self.backbone, HEAD_CHANNELS), num_classes)
        aux_channels = bisenet_channels(self.backbone, AUX_HEAD_CHANNELS)
        self.aux_heads = (nn.ModuleDict({"aux16": BiSeNetHead(context, aux_channels, num_classes),
                                         "aux32": BiSeNetHead(context, aux_channels, num_classes)})
                          if aux else None)
        self.aux_head = None  # the base class's single layer3 head: BiSeNet has its own two

    def context_path(self, features: dict[str, Tensor], size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Backbone stages -> (c8 at `size`, the spatial path's; c16 at layer3's size)."""
        layer4, layer3 = features["layer4"], features["layer3"]
        tail = self.arm32(layer4) + self.global_context(layer4)  # the 1x1 pooled map broadcasts
        c16 = self.refine32(upsample_to(tail, layer3.shape[-2:]))
        c8 = self.refine16(upsample_to(self.arm16(layer3) + c16, size))
        return c8, c16

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        spatial = self.spatial_path(x)
        c8, c16 = self.context_path(self.backbone(x), spatial.shape[-2:])
        outputs = {"out": self.head_out(self.ffm(spatial, c8))}
        if self.aux_heads is not None:
            outputs["aux16"] = self.aux_heads["aux16"](c8)
            outputs["aux32"] = self.aux_heads["aux32"](c16)
        return outputs

    def loss(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        main = self.pixel_loss(outputs["out"], labels)
        return self.add_pixel_terms({"main": main, "total": main}, outputs, labels, ("aux16", "aux32"), self.aux_weight)

    def predict(self, x: Tensor) -> Tensor:
        spatial = self.spatial_path(x)
        c8, _ = self.context_path(self.backbone(x), spatial.shape[-2:])
        return upsample_to(self.head_out(self.ffm(spatial, c8)), x.shape[-2:])
