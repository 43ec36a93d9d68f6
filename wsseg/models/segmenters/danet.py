"""DANet (Fu et al., "Dual Attention Network for Scene Segmentation", CVPR 2019): a dilated
ResNet at OS8 and two self-attention branches on layer4, summed before the classifier.

Each branch reduces layer4 with a 3x3 conv (BN, ReLU) to C/4 channels, applies its attention
module and a second 3x3 conv (BN, ReLU):
  - position attention (PAM): every position becomes the input plus γ times a weighted sum
    of the values at all N = h·w positions, the weights softmax_j(q_i·k_j) of 1x1-conv
    query/key projections to C/8 channels;
  - channel attention (CAM): every channel map becomes the input plus γ times a weighted sum
    of all C channel maps, the weights from the C x C Gram matrix of the maps.
γ starts at 0 in both (each module is the identity at initialisation). The two branches'
outputs are summed -> dropout 0.1 -> 1x1 classifier ("out"); each branch also has its own
dropout + classifier ("pam", "cam"), trained with the same weight as the main output, as
the authors' code does (SegmentationMultiLosses: the sum of the three cross-entropies).

PAM builds an N x N attention map per image: memory grows with the square of the feature
map's area (docs/models/danet.md gives the numbers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.models.backbones import resnet
from wsseg.models.segmenters.common import (
    AuxHead,
    Segmenter,
    classifier,
    conv_bn_relu,
    head_channels,
)

# DANet: query/key channels of PAM = C/8 (the authors' PAM_Module, from SAGAN).
QUERY_REDUCTION = 8
# The authors' SegmentationMultiLosses: main, PAM and CAM outputs, each weight 1.
BRANCH_WEIGHT = 1.0


class PositionAttention(nn.Module):
    """DANet's position attention module on (B, C, H, W), N = H·W.

    q = Wq x, k = Wk x (1x1 convs to C/8, with bias), v = Wv x (1x1 conv to C, with bias);
    s_ij = softmax_j(q_i · k_j) (no scaling); out_i = γ Σ_j s_ij v_j + x_i. γ is one
    learnable scalar, 0 at initialisation. Builds the (B, N, N) map.
    """

    def __init__(self, channels: int, reduction: int = QUERY_REDUCTION) -> None:
        super().__init__()
        inner = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> the (B, N, N) map s: row i is position i's weights over all positions."""
        query = self.query(x).flatten(2)                                  # (B, C/8, N)
        key = self.key(x).flatten(2)                                      # (B, C/8, N)
        return F.softmax(query.transpose(1, 2) @ key, dim=-1)            # (B, N, N)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        value = self.value(x).flatten(2)                                  # (B, C, N)
        out = value @ self.attention(x).transpose(1, 2)                   # out[:, :, i] = Σ_j s_ij v_j
        return self.gamma * out.view_as(x) + x


class ChannelAttention(nn.Module):
    """DANet's channel attention module on (B, C, H, W): no projections.

    With the C maps flattened to x_c (N = H·W values each): e_cd = x_c · x_d (the Gram
    matrix), s_cd = softmax_d(max_d' e_cd' − e_cd), out_c = γ Σ_d s_cd x_d + x_c. γ is one
    learnable scalar, 0 at initialisation.

    The max-minus step is the authors' CAM_Module. A softmax does not change when a row is
    shifted, so s = softmax_d(−e_cd): a channel draws most from the channels least like it
    (the paper's Eq. 3 writes exp(x_c · x_d) without the minus; the code, whose numbers the
    paper reports, has it).

    The Gram matrix and its softmax are computed in float32 (float64 for float64 input)
    with autocast off: e_cd sums N products (2048 for unit-Gaussian post-ReLU maps at
    N = 4096, times the square of the features' scale), within reach of float16's 65504.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: Tensor) -> Tensor:
        """x (B, C, H, W) -> the (B, C, C) map s (float32, or float64 for float64 input)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            maps = x.to(dtype).flatten(2)                                  # (B, C, N)
            energy = maps @ maps.transpose(1, 2)                           # (B, C, C)
            energy = energy.amax(dim=-1, keepdim=True) - energy
            return F.softmax(energy, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        attention = self.attention(x)
        with torch.autocast(x.device.type, enabled=False):
            out = attention @ x.to(attention.dtype).flatten(2)             # (B, C, N)
        return self.gamma * out.view_as(x).to(x.dtype) + x


class DANet(Segmenter):
    """DANet: dilated ResNet -> two branches on layer4 (C channels), each 3x3 conv C/4 (BN,
    ReLU) -> attention (PAM or CAM) -> 3x3 conv C/4 (BN, ReLU); their sum -> dropout 0.1 ->
    1x1 classifier. C/4 is 512 at ResNet-50/101 width and scales with the backbone
    (`common.head_channels`).

    Args:
        num_classes: classes including background (C + 1).
        depth, width: the ResNet.
        output_stride: 8 (the paper) or 16.
        aux: an auxiliary FCN head on layer3 (weight 0.4, mmsegmentation's DANet recipe;
            the authors' code has none, so it is off by default).
        multi_grid: per-unit multipliers of layer4's dilation; (1, 2, 4) at OS8 gives the
            dilations 4, 8, 16 of the authors' Cityscapes model (--multi-grid
            --multi-dilation 4 8 16). None: plain dilation, the paper's ablations.
        branch_weight: weight of each branch's own cross-entropy ("pam", "cam") in "total"
            (1.0: the authors' code).

    forward() returns {"out": logits at the output stride, "pam", "cam": the branches' own
    logits, "aux": layer3 logits (with aux)}; loss() returns "main", "pam", "cam", ["aux"],
    "total" = main + branch_weight·(pam + cam) [+ 0.4·aux].
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 output_stride: int = 8, aux: bool = False,
                 multi_grid: Sequence[int] | None = None,
                 branch_weight: float = BRANCH_WEIGHT) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"danet: output_stride must be 8 or 16, got {output_stride}")
        if branch_weight < 0:
            raise ValueError(f"danet: branch_weight must be >= 0, got {branch_weight}")
        self.branch_weight = branch_weight
        self.backbone = resnet(depth, output_stride=output_stride, width=width,
                               multi_grid=tuple(multi_grid) if multi_grid is not None else None)
        in_channels = self.backbone.channels["layer4"]
        channels = head_channels(self.backbone, 512)
        self.reduce_pam = conv_bn_relu(in_channels, channels, 3)
        self.reduce_cam = conv_bn_relu(in_channels, channels, 3)
        self.pam = PositionAttention(channels)
        self.cam = ChannelAttention()
        self.conv_pam = conv_bn_relu(channels, channels, 3)
        self.conv_cam = conv_bn_relu(channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = classifier(channels, num_classes)
        self.classifier_pam = classifier(channels, num_classes)
        self.classifier_cam = classifier(channels, num_classes)
        self.aux_head = (AuxHead(self.backbone.channels["layer3"], num_classes,
                                 channels=head_channels(self.backbone, 256)) if aux else None)

    def branches(self, layer4: Tensor) -> tuple[Tensor, Tensor]:
        """layer4 -> (PAM branch, CAM branch) features, each (B, C/4, h, w), before the classifiers."""
        pam = self.conv_pam(self.pam(self.reduce_pam(layer4)))
        cam = self.conv_cam(self.cam(self.reduce_cam(layer4)))
        return pam, cam

    def head(self, features: dict[str, Tensor]) -> Tensor:
        pam, cam = self.branches(features["layer4"])
        return self.classifier(self.dropout(pam + cam))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x (B, 3, H, W) -> {"out", "pam", "cam", "aux" (if aux)}, all at the output stride."""
        features = self.backbone(x)
        pam, cam = self.branches(features["layer4"])
        outputs = {
            "out": self.classifier(self.dropout(pam + cam)),
            "pam": self.classifier_pam(self.dropout(pam)),
            "cam": self.classifier_cam(self.dropout(cam)),
        }
        if self.aux_head is not None:
            outputs["aux"] = self.aux_head(features["layer3"])
        return outputs

    def loss(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """"main", "pam", "cam" (and "aux") cross-entropies (logits upsampled to the labels, 255
        ignored); "total" = main + branch_weight·(pam + cam) + 0.4·aux."""
        return self.add_pixel_terms(super().loss(outputs, labels), outputs, labels, ("pam", "cam"), self.branch_weight)
