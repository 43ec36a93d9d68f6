"""RefineNet (Lin, Milan, Shen, Reid, "RefineNet: Multi-Path Refinement Networks for
High-Resolution Semantic Segmentation", CVPR 2017; docs/ALGORITHMS.md §2 for the shared
recipe): a standard ResNet at output stride 32 whose four stages (strides 4, 8, 16, 32)
are merged from the deepest to the finest by RefineNet blocks, giving logits at stride 4.

A RefineNet block takes one or more input paths (feature maps of possibly different
resolutions and widths) and applies, in order:
  1. two Residual Conv Units (RCU: ReLU -> 3x3 conv -> ReLU -> 3x3 conv, plus the
     input; no BatchNorm, the paper's simplified ResNet unit) to each path;
  2. multi-resolution fusion: a 3x3 conv per path to the smallest width among the
     paths, bilinear upsampling to the largest resolution, sum (skipped for one path);
  3. chained residual pooling: ReLU, then a chain of (5x5 max-pool stride 1 -> 3x3
     conv) blocks, each block's output added to the running sum;
  4. one output RCU.

Each ResNet stage is first adapted by a 3x3 conv: layer4 to 512 channels, the others
to 256 (at ResNet-50/101 width; scaled with the backbone like every head here,
`common.head_channels`). How the stages are grouped into blocks is `cascade`
(the paper's §3.3 variants; docs/models/refinenet.md):
  "4"      RefineNet-4 (layer4) -> RefineNet-3 (its output + layer3) -> RefineNet-2
           (+ layer2) -> RefineNet-1 (+ layer1); the paper's default.
  "2"      one block on layer4 + layer3 (stride 16), one on its output + layer2 + layer1.
  "single" one block fed by all four stages at once.
The stride-4 output goes through two more RCUs, dropout 0.5 and the classifier.

Details from the authors' MatConvNet release (guosheng/refinenet), where the paper is
silent: 2 pooling blocks in the chained residual pooling (the release offers 2 or 4),
dropout 0.5 before the classifier, and biases only in the first conv of each RCU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.models.backbones import resnet
from wsseg.models.segmenters.common import AuxHead, Segmenter, classifier, head_channels, upsample_to

# cascade -> the ResNet stages feeding each RefineNet block, deepest block first. Every
# block after the first also takes the previous block's output as its first path.
CASCADES: dict[str, tuple[tuple[str, ...], ...]] = {
    "4": (("layer4",), ("layer3",), ("layer2",), ("layer1",)),
    "2": (("layer4", "layer3"), ("layer2", "layer1")),
    "single": (("layer4", "layer3", "layer2", "layer1"),),
}
# RefineNet: chained residual pooling with 5x5 max-pooling, stride 1.
POOL_SIZE = 5


def _conv3x3(in_channels: int, out_channels: int, *, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


class ResidualConvUnit(nn.Module):
    """RCU: x + conv2(relu(conv1(relu(x)))), 3x3 convs at `channels`, no BatchNorm.
    (B, channels, h, w) -> same shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(channels, channels, bias=True)
        self.conv2 = _conv3x3(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class MultiResolutionFusion(nn.Module):
    """Per path a 3x3 conv to out_channels = min(in_channels), bilinear upsampling
    (align_corners=False) to the largest height and width among the paths, sum.

    With one path there is nothing to fuse: the path passes through unchanged (the
    paper's RefineNet-4) and the module has no parameters.
    """

    def __init__(self, in_channels: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = min(in_channels)
        self.convs = (nn.ModuleList(_conv3x3(c, self.out_channels) for c in in_channels)
                      if len(in_channels) > 1 else None)

    def forward(self, paths: Sequence[Tensor]) -> Tensor:
        """paths[i] (B, in_channels[i], h_i, w_i) -> (B, out_channels, max h_i, max w_i)."""
        if self.convs is None:
            return paths[0]
        size = (max(p.shape[-2] for p in paths), max(p.shape[-1] for p in paths))
        fused = upsample_to(self.convs[0](paths[0]), size)
        for conv, path in zip(self.convs[1:], paths[1:]):
            fused = fused + upsample_to(conv(path), size)
        return fused


class ChainedResidualPooling(nn.Module):
    """x = relu(x); out = x + b_1 + ... + b_n with b_k = conv_k(maxpool(b_{k−1})), b_0 = x.

    Max-pooling 5x5, stride 1, padding 2 (any size, odd or 1x1, is kept); convs 3x3 at
    `channels` without bias. The ReLU first is the paper's (it makes the pooling
    effective and training less sensitive to the learning rate).
    (B, channels, h, w) -> same shape.
    """

    def __init__(self, channels: int, blocks: int = 2) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"chained residual pooling needs at least 1 block, got {blocks}")
        self.pool = nn.MaxPool2d(POOL_SIZE, stride=1, padding=POOL_SIZE // 2)
        self.convs = nn.ModuleList(_conv3x3(channels, channels) for _ in range(blocks))

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(x)
        total, chain = x, x
        for conv in self.convs:
            chain = conv(self.pool(chain))
            total = total + chain
        return total


class RefineNetBlock(nn.Module):
    """Two RCUs per input path (at that path's width) -> multi-resolution fusion ->
    chained residual pooling -> output RCU. Output: (B, out_channels, largest h, w),
    out_channels = min(in_channels)."""

    def __init__(self, in_channels: Sequence[int], pool_blocks: int = 2) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        self.path_rcus = nn.ModuleList(
            nn.Sequential(ResidualConvUnit(c), ResidualConvUnit(c)) for c in self.in_channels
        )
        self.fusion = MultiResolutionFusion(self.in_channels)
        self.out_channels = self.fusion.out_channels
        self.pooling = ChainedResidualPooling(self.out_channels, pool_blocks)
        self.output_rcu = ResidualConvUnit(self.out_channels)

    def forward(self, paths: Sequence[Tensor]) -> Tensor:
        if len(paths) != len(self.path_rcus):
            raise ValueError(f"RefineNet block built for {len(self.path_rcus)} paths, got {len(paths)}")
        paths = [rcus(path) for rcus, path in zip(self.path_rcus, paths)]
        return self.output_rcu(self.pooling(self.fusion(paths)))


class RefineNet(Segmenter):
    """RefineNet on a ResNet at output stride 32; logits at stride 4 (layer1's size).

    Args:
        num_classes: classes including background.
        depth, width: the ResNet (18/34/50/101; channel multiplier).
        output_stride: must be 32 — RefineNet refines the undilated ResNet's stages.
        aux: the aux FCN head on layer3 (weight 0.4); not part of RefineNet, off by default.
        cascade: "4" (default), "2" or "single": how the four stages are grouped into
            RefineNet blocks (module docstring, docs/models/refinenet.md).
        pool_blocks: pooling blocks in each chained residual pooling (2: the release's
            default; it also offers 4).

    Attributes: adapt (ModuleDict stage -> 3x3 adaptation conv), blocks (ModuleList of
    RefineNetBlock, deepest first), final_rcus, dropout, classifier, aux_head.
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 output_stride: int = 32, aux: bool = False, cascade: str = "4",
                 pool_blocks: int = 2) -> None:
        super().__init__()
        if output_stride != 32:
            raise ValueError(f"refinenet refines the stages of a standard ResNet: output_stride must be 32, "
                             f"got {output_stride}")
        cascade = str(cascade)
        if cascade not in CASCADES:
            raise ValueError(f"refinenet: cascade must be one of {', '.join(CASCADES)}, got {cascade!r}")
        self.cascade = cascade
        self.backbone = resnet(depth, output_stride=32, width=width)
        # RefineNet: 512 channels for the deepest stage (RefineNet-4), 256 elsewhere.
        stage_widths = {stage: head_channels(self.backbone, 512 if stage == "layer4" else 256)
                        for stage in ("layer4", "layer3", "layer2", "layer1")}
        self.adapt = nn.ModuleDict({
            stage: _conv3x3(self.backbone.channels[stage], channels)
            for stage, channels in stage_widths.items()
        })
        self.blocks = nn.ModuleList()
        previous: int | None = None
        for stages in CASCADES[cascade]:
            in_channels = ([previous] if previous is not None else []) + [stage_widths[s] for s in stages]
            block = RefineNetBlock(in_channels, pool_blocks)
            self.blocks.append(block)
            previous = block.out_channels
        assert previous is not None
        self.final_rcus = nn.Sequential(ResidualConvUnit(previous), ResidualConvUnit(previous))
        # The release's dropout before its classifier: rate 0.5, elementwise.
        self.dropout = nn.Dropout(0.5)
        self.classifier = classifier(previous, num_classes)
        self.aux_head = (AuxHead(self.backbone.channels["layer3"], num_classes,
                                 channels=head_channels(self.backbone, 256)) if aux else None)

    def refine(self, features: dict[str, Tensor]) -> Tensor:
        """Backbone stages -> the last RefineNet block's output (B, 256·s, h/4, w/4)."""
        refined: Tensor | None = None
        for stages, block in zip(CASCADES[self.cascade], self.blocks):
            paths = [refined] if refined is not None else []
            paths += [self.adapt[stage](features[stage]) for stage in stages]
            refined = block(paths)
        assert refined is not None
        return refined

    def head(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.final_rcus(self.refine(features))))
