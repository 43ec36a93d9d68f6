"""DFANet (Li, Xiong, Fan, Sun, "DFANet: Deep Feature Aggregation for Real-Time Semantic
Segmentation", CVPR 2019; docs/models/dfanet.md): one light Xception backbone run as a cascade of
sub-networks, each refining the last one's output, with same-level stages connected across
them, and a small decoder that fuses their low- and high-level features at stride 4.

DFANet has no ResNet. Its encoder (all sub-networks, FC attention included) is the segmenter
contract's `backbone` (the parameter group at segmenter.lr) and the decoder is the heads
(segmenter.lr·head_lr_mult); the encoder has the paper's fixed depth, so `segmenter.depth` is
ignored, while `segmenter.width` scales every channel count. train-segmenter refuses
`segmenter.weights` other than null for it (ResNet weights have nowhere to go).

Backbone A (the paper's modified Xception; the layout and the widths at width 1 are those of an
unofficial release, huaifeng1993/DFANet model/dfanet.py, the authors having released none):
  conv1   3x3 conv stride 2 -> 8, BN, ReLU                                         stride 2
  enc2    4 Xception blocks -> 48 (inner 12)                                       stride 4
  enc3    6 Xception blocks -> 96 (inner 24)                                       stride 8
  enc4    4 Xception blocks -> 192 (inner 48)                                      stride 16
  fc      FC attention on enc4: global average pool, FC to 1000 (the ImageNet classifier's
          width), 1x1 conv and ReLU back to 192 (the release: conv-BN-ReLU; `FCAttention` says
          why not here); the features times that vector, per channel.
Xception block: three depthwise-separable 3x3 convs (depthwise, BN, pointwise) in -> inner ->
inner -> out, BN after each, ReLU between (and before the first, except in a stage's first
block); the last carries the stride (2 in a stage's first block); a residual, through a 1x1 conv
with that stride and BN when the shape changes.

Sub-network aggregation: sub-network k + 1 takes sub-network k's FC-attention output, upsampled
x4 (bilinear) to the size of k's enc2, as its input. Sub-stage aggregation: each of its stages
takes concat(its own previous output, sub-network k's output of that stage) (channels 192 + 48,
48 + 96, 96 + 192 at width 1). Each stage's first block halves the size, so sub-network k + 1 runs
one octave deeper than k: strides 8/16/32 for the second, 16/32/64 for the third.

Decoder: the enc2 outputs of all sub-networks through 1x1 conv-BN-ReLU 32, upsampled to the first
enc2's size (stride 4) and summed, then a 1x1 conv-BN-ReLU 32; plus the FC-attention outputs, each
through 1x1 conv-BN-ReLU 32 and upsampled to stride 4; a 1x1 conv to class logits at stride 4
(upsampled x4, bilinear, by the loss and predict()). The release ends in conv-BN-ReLU to the
classes; here a plain classifier (N(0, 0.01), zero bias), as every wsseg segmenter, keeps the logits
signed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wsseg.models.segmenters.common import Segmenter, classifier, conv_bn_relu, upsample_to

# Backbone A at width 1: conv1, then per stage (out channels, inner channels, blocks).
CONV1_CHANNELS = 8
STAGES = (("enc2", 48, 12, 4), ("enc3", 96, 24, 6), ("enc4", 192, 48, 4))
ATTENTION_CHANNELS = 1000  # the FC layer's width in the release: an ImageNet classifier's
DECODER_CHANNELS = 32
MAX_SUB_NETWORKS = 4  # each one more halves the resolution again: a fifth's enc4 would sit at stride 256
NAMES = "abcd"


def dfanet_channels(channels: int, width: float) -> int:
    """A DFANet width times the multiplier, rounded, at least 8."""
    return max(8, int(round(channels * width)))


class SeparableConv(nn.Sequential):
    """Depthwise 3x3 conv (stride, no bias), BN, pointwise 1x1 conv (no bias): (B, in, H, W) ->
    (B, out, ceil(H / stride), ceil(W / stride))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
        )


class XceptionBlock(nn.Module):
    """[ReLU,] sep(in -> inner), BN, ReLU, sep(inner -> inner), BN, ReLU, sep(inner -> out, stride),
    BN; plus the input (through 1x1 conv with the stride and BN when in != out or stride != 1)."""

    def __init__(self, in_channels: int, out_channels: int, inner_channels: int, *, stride: int = 1,
                 start_with_relu: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReLU()] if start_with_relu else []  # not in place: the skip reads x
        layers += [SeparableConv(in_channels, inner_channels), nn.BatchNorm2d(inner_channels), nn.ReLU(inplace=True),
                   SeparableConv(inner_channels, inner_channels), nn.BatchNorm2d(inner_channels),
                   nn.ReLU(inplace=True),
                   SeparableConv(inner_channels, out_channels, stride), nn.BatchNorm2d(out_channels)]
        self.convs = nn.Sequential(*layers)
        self.skip = (nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out_channels))
                     if in_channels != out_channels or stride != 1 else None)

    def forward(self, x: Tensor) -> Tensor:
        return self.convs(x) + (x if self.skip is None else self.skip(x))


def encoder_stage(in_channels: int, out_channels: int, inner_channels: int, blocks: int) -> nn.Sequential:
    """A stage: a stride-2 block without the leading ReLU, then blocks − 1 at stride 1."""
    units = [XceptionBlock(in_channels, out_channels, inner_channels, stride=2, start_with_relu=False)]
    units += [XceptionBlock(out_channels, out_channels, inner_channels) for _ in range(blocks - 1)]
    return nn.Sequential(*units)


def conv_bn_relu_strided(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv1: 3x3 conv stride 2 (no bias), BN, ReLU; size ceil(n / 2)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class FCAttention(nn.Module):
    """x · relu(1x1 conv(FC(global average pool(x)))): one weight >= 0 per image and channel (FC:
    C -> hidden, with bias, an ImageNet classifier's shape; conv: hidden -> C, with bias).

    The release's conv is conv-BN-ReLU. That BatchNorm normalises one pooled value per image and
    channel, so each image's attention depended on the others in its batch: on the fit test's batch
    of five 64 px crops, after 300 Adam steps, the model fitted it in training mode (mIoU 1.0) and
    scored 0.64 in eval mode (0.91 with the BN left out, 0.94 with a sigmoid gate instead); the BN
    is left out here.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, hidden)
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1), nn.ReLU(inplace=True))

    def weights(self, x: Tensor) -> Tensor:
        """(B, C, h, w) -> the (B, C, 1, 1) channel weights."""
        pooled = self.fc(x.mean(dim=(2, 3)))
        return self.project(pooled[:, :, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights(x)


class DFANetEncoder(nn.Module):
    """conv1 and `sub_networks` copies of backbone A (enc2, enc3, enc4, FC attention), aggregated.

    forward(x) -> {"conv1", "enc2a", "enc3a", "enc4a", "fca", "enc2b", ..., "fcc"} (letters a, b,
    c, d by sub-network). Attributes: channels and strides_of (per output, as ResNet's),
    sub_networks (the letters in use)."""

    def __init__(self, width: float = 1.0, sub_networks: int = 3, attention_channels: int = ATTENTION_CHANNELS) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        if not 1 <= sub_networks <= MAX_SUB_NETWORKS:
            raise ValueError(f"sub_networks must be 1..{MAX_SUB_NETWORKS}, got {sub_networks}")
        if attention_channels < 1:
            raise ValueError(f"attention_channels must be >= 1, got {attention_channels}")
        self.width = float(width)
        self.sub_networks = NAMES[:sub_networks]
        conv1 = dfanet_channels(CONV1_CHANNELS, width)
        self.conv1 = conv_bn_relu_strided(3, conv1)
        self.channels, self.strides_of = {"conv1": conv1}, {"conv1": 2}
        widths = [(name, dfanet_channels(out, width), dfanet_channels(inner, width), blocks)
                  for name, out, inner, blocks in STAGES]
        top = widths[-1][1]
        hidden = dfanet_channels(attention_channels, width)
        for index, letter in enumerate(self.sub_networks):
            # The first sub-network starts from conv1; a later one from the last FC attention, concatenated
            # with the previous sub-network's enc2 (sub-stage aggregation, as for every stage after it).
            previous = conv1 if index == 0 else top
            for level, (name, out, inner, blocks) in enumerate(widths):
                in_channels = previous + (out if index else 0)
                self.add_module(f"{name}{letter}", encoder_stage(in_channels, out, inner, blocks))
                self.channels[f"{name}{letter}"] = out
                self.strides_of[f"{name}{letter}"] = self.strides_of["conv1"] * 2 ** (level + 1 + index)
                previous = out
            self.add_module(f"fc{letter}", FCAttention(top, hidden))
            self.channels[f"fc{letter}"], self.strides_of[f"fc{letter}"] = top, self.strides_of[f"enc4{letter}"]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = {"conv1": self.conv1(x)}
        previous: dict[str, Tensor] = {}
        for index, letter in enumerate(self.sub_networks):
            if index == 0:
                x = features["conv1"]
            else:  # sub-network aggregation: the last FC attention, upsampled x4 to the last enc2's size
                x = upsample_to(features[f"fc{self.sub_networks[index - 1]}"], previous["enc2"].shape[-2:])
            for name, *_ in STAGES:
                if index:  # sub-stage aggregation: concat with the previous sub-network's same stage
                    x = torch.cat([x, previous[name]], dim=1)
                x = getattr(self, f"{name}{letter}")(x)
                features[f"{name}{letter}"] = previous[name] = x
            features[f"fc{letter}"] = getattr(self, f"fc{letter}")(x)
        return features


class DFANetDecoder(nn.Module):
    """Low level: Σ upsample(1x1 conv-BN-ReLU(enc2 of each sub-network)) at the first enc2's size,
    then 1x1 conv-BN-ReLU; high level: + Σ upsample(1x1 conv-BN-ReLU(FC attention of each));
    1x1 classifier: logits (B, num_classes) at stride 4."""

    def __init__(self, encoder: DFANetEncoder, num_classes: int, channels: int) -> None:
        super().__init__()
        letters = encoder.sub_networks
        self.letters = letters
        self.low = nn.ModuleDict({k: conv_bn_relu(encoder.channels[f"enc2{k}"], channels, 1) for k in letters})
        self.merge = conv_bn_relu(channels, channels, 1)
        self.high = nn.ModuleDict({k: conv_bn_relu(encoder.channels[f"fc{k}"], channels, 1) for k in letters})
        self.classifier = classifier(channels, num_classes)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        size = features[f"enc2{self.letters[0]}"].shape[-2:]
        low = sum(upsample_to(self.low[k](features[f"enc2{k}"]), size) for k in self.letters)
        high = sum(upsample_to(self.high[k](features[f"fc{k}"]), size) for k in self.letters)
        return self.classifier(self.merge(low) + high)


class DFANet(Segmenter):
    """DFANet: backbone A as `sub_networks` aggregated sub-networks (the contract's `backbone`) and
    the decoder; logits at stride 4, upsampled bilinearly by the loss and predict() (module docstring).

    Args:
        num_classes: classes including background.
        depth: ignored — the encoder has the paper's fixed depth; the argument exists because every
            segmenter receives `segmenter.depth`.
        width: multiplier of every channel count (8, 48, 96, 192, 1000, 32 at 1; rounded, >= 8).
        sub_networks: how many copies of the backbone are cascaded (the paper's 3; 1 to 4).
        attention_channels: the FC attention's hidden width at width 1 (the release's 1000: ImageNet's classes).

    forward -> {"out"} (no auxiliary loss); loss -> {"main", "total"}.
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0, sub_networks: int = 3,
                 attention_channels: int = ATTENTION_CHANNELS) -> None:
        super().__init__()
        del depth  # DFANet's encoder depth is fixed; segmenter.depth does not apply
        self.backbone = DFANetEncoder(width, sub_networks, attention_channels)  # not a ResNet
        self.decoder = DFANetDecoder(self.backbone, num_classes, dfanet_channels(DECODER_CHANNELS, width))
        self.aux_head = None

    def head(self, features: dict[str, Tensor]) -> Tensor:
        return self.decoder(features)
