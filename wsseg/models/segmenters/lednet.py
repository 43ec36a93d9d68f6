"""LEDNet (Wang, Zhou, Liu, Xiong, Gao, Wu, Latecki, "LEDNet: A Lightweight Encoder-Decoder
Network for Real-Time Semantic Segmentation", ICIP 2019; docs/models/lednet.md): its own
encoder of split-shuffle residual blocks at stride 8, and an attention pyramid network
(APN) decoder that outputs the class scores.

LEDNet has no ResNet. Its encoder is the segmenter contract's `backbone` (the parameter
group at segmenter.lr) and the APN is the heads (segmenter.lr·head_lr_mult); the encoder
has a fixed depth (the paper's Table 1), so the shared `segmenter.depth` does not apply and
is ignored, while `segmenter.width` scales every channel count (32, 64, 128 at width 1).
ResNet weights cannot load into the encoder: train-segmenter refuses `segmenter.weights`
other than null for it, with one error naming the key.

Encoder (Table 1; stride, channels at width 1):
  stage 1 (/2, 32):   downsampling unit 3 -> 32, 3 SS-nbt (dilation 1)
  stage 2 (/4, 64):   downsampling unit 32 -> 64, 2 SS-nbt (dilation 1)
  stage 3 (/8, 128):  downsampling unit 64 -> 128, 8 SS-nbt, dilations 1, 2, 5, 9, 2, 5, 9, 17
Downsampling unit (ENet's initial block): concat(3x3 conv stride 2 to out − in channels,
2x2 max-pool stride 2 of the input) -> BN -> ReLU.
SS-nbt unit: split the channels in halves; the first half through 3x1, ReLU, 1x3, BN, ReLU,
3x1 (dilated), ReLU, 1x3 (dilated), BN; the second half through the same with 1x3 and 3x1
swapped; concat, add the input, ReLU, channel shuffle with 2 groups.

Details the paper leaves to the authors' release (xiaoyufenfei/LEDNet, train/lednet.py),
followed here: biases in the factorised convs, BatchNorm eps 1e-3, spatial dropout 0.03 in
stages 1-2 and 0.3 in stage 3 (on each branch before the concat), and the APN's layout
(`AttentionPyramid`). Where the release cannot take any input size (its max-pool drops an
odd row and pads it back, its APN resizes to H//4 and H//2), the pool rounds up
(ceil_mode) and each pyramid level is resized to the size of the level above it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.models.segmenters.common import Segmenter, upsample_to

# The authors' BatchNorm epsilon (train/lednet.py).
BN_EPS = 1e-3
# Table 1: channels of the three stages at width 1, SS-nbt units per stage, stage 3's dilations.
STAGE_CHANNELS = (32, 64, 128)
UNITS = (3, 2)  # stages 1 and 2; stage 3 has one unit per dilation
DILATIONS = (1, 2, 5, 9, 2, 5, 9, 17)
# The release's spatial dropout: stages 1-2, stage 3.
DROPOUT = (0.03, 0.03, 0.3)


def lednet_channels(channels: int, width: float) -> int:
    """A LEDNet width times the multiplier, rounded to an even number (SS-nbt splits it in
    halves), at least 8."""
    return max(8, 2 * int(round(channels * width / 2)))


def channel_shuffle(x: Tensor, groups: int = 2) -> Tensor:
    """ShuffleNet's channel shuffle: (B, g·n, h, w) viewed as (B, g, n, h, w), transposed to
    (B, n, g, h, w) and flattened; with 2 groups output channel 2i is input channel i and 2i+1
    is input channel n + i."""
    batch, channels, height, width = x.shape
    return (x.reshape(batch, groups, channels // groups, height, width).transpose(1, 2)
            .reshape(batch, channels, height, width))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class DownsamplingUnit(nn.Module):
    """concat(3x3 conv stride 2 (bias) to out − in channels, 2x2 max-pool stride 2) -> BN -> ReLU:
    (B, in, H, W) -> (B, out, ceil(H/2), ceil(W/2)); the pooled input is the last `in` channels."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if out_channels <= in_channels:
            raise ValueError(f"a downsampling unit must widen: {in_channels} -> {out_channels}")
        self.conv = nn.Conv2d(in_channels, out_channels - in_channels, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.bn = _bn(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(torch.cat([self.conv(x), self.pool(x)], dim=1)))


def _factorised_branch(channels: int, dilation: int, vertical_first: bool) -> nn.Sequential:
    """Two factorised 3x3s (the second dilated): k1, ReLU, k2, BN, ReLU, k1 dilated, ReLU, k2 dilated,
    BN, with (k1, k2) = (3x1, 1x3) when vertical_first, else (1x3, 3x1)."""
    def conv(kernel: tuple[int, int], d: int) -> nn.Conv2d:
        vertical = kernel == (3, 1)
        return nn.Conv2d(channels, channels, kernel, padding=(d, 0) if vertical else (0, d),
                         dilation=(d, 1) if vertical else (1, d))

    first, second = ((3, 1), (1, 3)) if vertical_first else ((1, 3), (3, 1))
    return nn.Sequential(
        conv(first, 1), nn.ReLU(inplace=True), conv(second, 1), _bn(channels), nn.ReLU(inplace=True),
        conv(first, dilation), nn.ReLU(inplace=True), conv(second, dilation), _bn(channels),
    )


class SSnbt(nn.Module):
    """Split-shuffle non-bottleneck unit: (B, C, h, w) -> same shape (C even).

    out = shuffle(relu(x + concat(left(x[:, :C/2]), right(x[:, C/2:])))), left starting with
    3x1 convs, right with 1x3 (the paper's Fig. 2(d)); both factorised pairs, the second
    dilated; spatial dropout on each branch's output in training.
    """

    def __init__(self, channels: int, dilation: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"SS-nbt splits its channels in halves: {channels} is odd")
        self.dilation = int(dilation)
        self.left = _factorised_branch(channels // 2, self.dilation, vertical_first=True)
        self.right = _factorised_branch(channels // 2, self.dilation, vertical_first=False)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: Tensor) -> Tensor:
        first, second = x.chunk(2, dim=1)
        branches = torch.cat([self.dropout(self.left(first)), self.dropout(self.right(second))], dim=1)
        return channel_shuffle(F.relu(x + branches), 2)


class LEDNetEncoder(nn.Module):
    """The encoder (Table 1): three stages, each a downsampling unit and SS-nbt units.

    forward(x) -> {"stage1": stride 2, "stage2": stride 4, "stage3": stride 8}; each stride-2
    step maps n to ceil(n / 2), like wsseg's ResNet.

    Attributes: channels and strides_of (per stage, as ResNet's), dilations (stage 3's).
    """

    def __init__(self, width: float = 1.0, dilations: Sequence[int] = DILATIONS) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.dilations = tuple(int(d) for d in dilations)
        if not self.dilations or any(d < 1 for d in self.dilations):
            raise ValueError(f"dilations must be integers >= 1, got {list(dilations)}")
        self.width = float(width)
        widths = [lednet_channels(c, width) for c in STAGE_CHANNELS]
        unit_dilations = [(1,) * UNITS[0], (1,) * UNITS[1], self.dilations]
        self.channels, self.strides_of = {}, {}
        in_channels = 3
        for index, (channels, stage_dilations) in enumerate(zip(widths, unit_dilations)):
            name = f"stage{index + 1}"
            units = [DownsamplingUnit(in_channels, channels)]
            units += [SSnbt(channels, d, DROPOUT[index]) for d in stage_dilations]
            self.add_module(name, nn.Sequential(*units))
            self.channels[name] = channels
            self.strides_of[name] = 2 ** (index + 1)
            in_channels = channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = {}
        for name in self.channels:
            x = getattr(self, name)(x)
            features[name] = x
        return features


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """The release's Conv2dBnRelu: kxk conv with bias, BN (eps 1e-3), ReLU; 'same' padding."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2),
                         _bn(out_channels), nn.ReLU(inplace=True))


class AttentionPyramid(nn.Module):
    """The APN decoder: (B, C, h, w) encoder features -> class scores (B, K, h, w).

      scores    = conv-BN-ReLU 1x1 (C -> K) of the features;
      pyramid   = a one-channel attention map: 7x7 stride 2 (C -> 1, level 1, h/2), 5x5 stride 2
                  (level 2, h/4), 3x3 stride 2 and 3x3 (level 3, h/8); from the coarsest up,
                  level 3 upsampled + 5x5(level 2), upsampled + 7x7(level 1), upsampled to h x w;
      global    = global average pool -> conv-BN-ReLU 1x1 (C -> K), broadcast;
      output    = pyramid · scores + global.
    Every conv is conv-BN-ReLU (the release's), so the scores are >= 0. Upsampling is bilinear.
    The global branch's BatchNorm sees one value per image and channel: training needs at least
    2 images per device.
    """

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.scores = _conv_bn_relu(in_channels, num_classes, 1)
        self.global_branch = nn.Sequential(nn.AdaptiveAvgPool2d(1), _conv_bn_relu(in_channels, num_classes, 1))
        self.down1 = _conv_bn_relu(in_channels, 1, 7, stride=2)
        self.down2 = _conv_bn_relu(1, 1, 5, stride=2)
        self.down3 = nn.Sequential(_conv_bn_relu(1, 1, 3, stride=2), _conv_bn_relu(1, 1, 3))
        self.conv2 = _conv_bn_relu(1, 1, 5)
        self.conv1 = _conv_bn_relu(1, 1, 7)

    def attention(self, x: Tensor) -> Tensor:
        """The pyramid's one-channel map at the features' size (B, 1, h, w)."""
        level1 = self.down1(x)
        level2 = self.down2(level1)
        level3 = self.down3(level2)
        merged = self.conv2(level2) + upsample_to(level3, level2.shape[-2:])
        merged = self.conv1(level1) + upsample_to(merged, level1.shape[-2:])
        return upsample_to(merged, x.shape[-2:])

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x) * self.scores(x) + self.global_branch(x)  # the pooled map broadcasts


class LEDNet(Segmenter):
    """LEDNet: the split-shuffle encoder (`backbone`, stride 8) and the APN decoder; logits at
    stride 8, upsampled bilinearly by the loss and predict() (module docstring).

    Args:
        num_classes: classes including background.
        depth: ignored — LEDNet's encoder has the paper's fixed depth; the argument exists
            because every segmenter receives `segmenter.depth`.
        width: multiplier of every channel count (32, 64, 128 at 1; rounded to even, >= 8).
        dilations: stage 3's SS-nbt dilations, one unit each (the paper's 1, 2, 5, 9, 2, 5, 9, 17).

    forward -> {"out"} (LEDNet has no auxiliary loss); loss -> {"main", "total"}.
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 dilations: Sequence[int] = DILATIONS) -> None:
        super().__init__()
        del depth  # LEDNet's encoder depth is fixed (Table 1); segmenter.depth does not apply
        self.backbone = LEDNetEncoder(width, dilations)  # the contract's backbone: not a ResNet
        self.decoder = AttentionPyramid(self.backbone.channels["stage3"], num_classes)
        self.aux_head = None

    def head(self, features: dict[str, Tensor]) -> Tensor:
        return self.decoder(features["stage3"])
