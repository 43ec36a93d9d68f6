"""EncNet (Zhang et al., "Context Encoding for Semantic Segmentation", CVPR 2018;
docs/ALGORITHMS.md §2): a dilated ResNet at OS8, a 3x3 conv, and the context encoding
module: an Encoding layer summarises the whole feature map into one vector e, which
(a) rescales the channels of the feature map (γ = sigmoid(FC(e)), out = ReLU(X + X·γ))
and (b) predicts which classes occur in the image (the SE-loss, a sigmoid BCE).

The Encoding layer is written with plain tensor ops: the squared distances come from
‖x‖² − 2x·d + ‖d‖² (one matmul) and the aggregation from two more, so no (N, K, D)
residual tensor is ever built. On a CPU this was 8-100x faster than the broadcast
form (forward + backward, D = 512, K = 32, 64 to 4096 pixels; docs/models/encnet.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.class_ids import IGNORE
from wsseg.models.backbones import resnet
from wsseg.models.segmenters.common import (
    AuxHead,
    Segmenter,
    classifier,
    conv_bn_relu,
    head_channels,
    upsample_to,
)

# EncNet: 32 codewords (the paper's K for segmentation; PyTorch-Encoding's ncodes=32).
NUM_CODES = 32
# EncNet: SE-loss and aux-loss weights 0.2 (the paper's α = 0.2; PyTorch-Encoding's
# --se-weight 0.2 and the EncNet recipe's aux weight).
SE_WEIGHT = 0.2
AUX_WEIGHT = 0.2


class EncodingLayer(nn.Module):
    """The Encoding layer: K learned codewords d_k (K, D) and smoothing factors s_k (K,).

    For the N = H·W feature vectors x_i of an image:
        r_ik = x_i − d_k,  a_ik = softmax_k(−s_k ‖r_ik‖²),  e_k = Σ_i a_ik r_ik.
    Initialisation as PyTorch-Encoding's `Encoding.reset_params`: codewords uniform in
    ±1/sqrt(K·D). PyTorch-Encoding stores `scale` = −s_k, uniform in [−1, 0], and takes
    softmax(scale·‖r‖²); this layer stores the paper's s_k, uniform in [0, 1] (the same
    distribution of assignments), so that a larger s_k means a sharper assignment.

    The layer computes in float32 (float64 for float64 input) with autocast off:
    ‖x‖² − 2x·d + ‖d‖² cancels, and in bf16/fp16 the error would be a percent of ‖x‖².
    """

    def __init__(self, channels: int, num_codes: int = NUM_CODES) -> None:
        super().__init__()
        self.channels, self.num_codes = channels, num_codes
        self.codewords = nn.Parameter(torch.empty(num_codes, channels))
        self.smoothing = nn.Parameter(torch.empty(num_codes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.num_codes * self.channels)
        nn.init.uniform_(self.codewords, -bound, bound)
        nn.init.uniform_(self.smoothing, 0.0, 1.0)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, D, H, W) -> encodings E (B, K, D) (float32, or float64 for float64 input):
        E[b, k] = e_k of image b."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"EncodingLayer expects (B, {self.channels}, H, W), got {tuple(x.shape)}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            points = x.to(dtype).flatten(2).transpose(1, 2)                 # (B, N, D)
            codewords = self.codewords.to(dtype)                            # (K, D)
            squared = ((points * points).sum(-1, keepdim=True)              # ‖x_i‖²  (B, N, 1)
                       - 2.0 * points @ codewords.t()                       # x_i·d_k (B, N, K)
                       + (codewords * codewords).sum(-1))                   # ‖d_k‖²  (K,)
            # Rounding can make ‖x − d‖² slightly negative where x ≈ d; it is never below 0.
            squared = squared.clamp(min=0.0)
            assignments = F.softmax(-self.smoothing.to(dtype) * squared, dim=2)  # (B, N, K)
            # Σ_i a_ik (x_i − d_k) = Σ_i a_ik x_i − (Σ_i a_ik) d_k
            weighted = assignments.transpose(1, 2) @ points                 # (B, K, D)
            return weighted - assignments.sum(1).unsqueeze(-1) * codewords

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_codes={self.num_codes}"


class ContextEncoding(nn.Module):
    """EncNet's context encoding module on a (B, C, h, w) map.

    1x1 conv C (BN, ReLU) -> EncodingLayer (K codewords) -> BatchNorm1d over the K
    codewords + ReLU -> mean over K: the image's encoding e (B, C). Then
    γ = sigmoid(Linear(e)) and the output is ReLU(X + X·γ) channel-wise; with
    `se_classes`, also SE logits Linear(e) (B, se_classes).
    """

    def __init__(self, channels: int, num_codes: int = NUM_CODES, se_classes: int | None = None) -> None:
        super().__init__()
        self.project = conv_bn_relu(channels, channels, 1)
        self.encoding = EncodingLayer(channels, num_codes)
        # PyTorch-Encoding: norm_layer(ncodes) on (B, K, D), i.e. one BN channel per codeword.
        self.encoding_bn = nn.BatchNorm1d(num_codes)
        self.attention = nn.Linear(channels, channels)
        self.se_classifier = nn.Linear(channels, se_classes) if se_classes else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """x (B, C, h, w) -> (ReLU(x + x·γ) (B, C, h, w), SE logits (B, se_classes) or None)."""
        encodings = self.encoding(self.project(x))                         # (B, K, C) float32
        encoded = F.relu(self.encoding_bn(encodings)).mean(dim=1)          # (B, C)
        gamma = torch.sigmoid(self.attention(encoded)).to(x.dtype)
        out = F.relu(x + x * gamma[:, :, None, None])
        se_logits = self.se_classifier(encoded) if self.se_classifier is not None else None
        return out, se_logits


def class_presence(labels: Tensor, num_classes: int) -> Tensor:
    """SE-loss targets: (B, H, W) int64 labels -> (B, num_classes) float32, 1 where the
    class occurs in the image's label map (255 is not a class; absent classes are 0)."""
    batch = labels.shape[0]
    flat = labels.reshape(batch, -1)
    valid = flat != IGNORE
    if bool(((flat < 0) | (flat >= num_classes))[valid].any()):
        raise ValueError(f"labels must be in 0..{num_classes - 1} or {IGNORE}")
    # Ignored pixels go to an extra column that is dropped.
    index = torch.where(valid, flat, torch.full_like(flat, num_classes))
    presence = torch.zeros(batch, num_classes + 1, device=labels.device)
    presence.scatter_(1, index, 1.0)
    return presence[:, :num_classes]


def se_loss(se_logits: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """EncNet's SE-loss: sigmoid BCE of SE logits (B, num_classes) against `class_presence` of
    the labels, mean over images and classes (float32)."""
    return F.binary_cross_entropy_with_logits(se_logits.float(), class_presence(labels, num_classes))


class SELossSegmenter(Segmenter):
    """A segmenter whose head also predicts which classes the image holds (EncNet's SE-loss).

    Subclasses implement `head_with_se(features) -> (main logits, SE logits or None)` and set
    `se_weight`; forward adds "se" to the outputs and loss adds the weighted SE term."""

    se_weight: float

    def head_with_se(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError

    def head(self, features: dict[str, Tensor]) -> Tensor:
        return self.head_with_se(features)[0]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x (B, 3, H, W) -> {"out", "aux" (if aux), "se" (if the head predicts it)}."""
        features = self.backbone(x)
        logits, se_logits = self.head_with_se(features)
        outputs = {"out": logits}
        if self.aux_head is not None:
            outputs["aux"] = self.aux_head(features["layer3"])
        if se_logits is not None:
            outputs["se"] = se_logits
        return outputs

    def loss(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """"main" and "aux" CE (upsampled logits, 255 ignored), "se": `se_loss` (sigmoid BCE of the
        SE logits against class presence, mean over images and classes); "total"."""
        terms = super().loss(outputs, labels)
        total = terms.pop("total")
        if "se" in outputs:
            terms["se"] = se_loss(outputs["se"], labels, self.num_classes)
            total = total + self.se_weight * terms["se"]
        terms["total"] = total
        return terms


class EncNet(SELossSegmenter):
    """EncNet: dilated ResNet -> 3x3 conv 512 (BN, ReLU) [-> lateral fusion] -> context
    encoding -> dropout 0.1 -> 1x1 classifier; SE-loss; aux head on layer3.

    Args:
        num_classes: classes including background (C + 1).
        depth, width: the ResNet.
        output_stride: 8 (the paper) or 16.
        aux: the auxiliary FCN head on layer3 (loss weight 0.2).
        se_loss: the SE-loss branch (weight `se_weight`).
        lateral: EncNet's optional multi-level fusion: layer2 and layer3 each through a
            1x1 conv 512 (BN, ReLU), concatenated with the 3x3 conv output -> 3x3 conv 512
            (BN, ReLU), before the context encoding (PyTorch-Encoding turns it on for
            PASCAL Context). At OS16 layer2 is resized to layer4's size (bilinear).
        num_codes: K, the number of codewords (32).
        se_weight: weight of the SE-loss in "total" (0.2).

    Head widths (512, the aux head's 256) are the paper's at ResNet-50/101 width 1 and
    scale with the backbone's layer4 (`common.head_channels`); K does not scale.

    forward() returns {"out": logits at the output stride, "aux": layer3 logits (with
    aux), "se": SE logits (B, num_classes) (with se_loss)}; loss() returns "main",
    "aux", "se" and "total" = main + 0.2·aux + se_weight·se.
    """

    aux_weight = AUX_WEIGHT

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 output_stride: int = 8, aux: bool = True, se_loss: bool = True,
                 lateral: bool = False, num_codes: int = NUM_CODES,
                 se_weight: float = SE_WEIGHT) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"encnet: output_stride must be 8 or 16, got {output_stride}")
        self.num_classes = num_classes
        self.se_weight = se_weight
        self.backbone = resnet(depth, output_stride=output_stride, width=width)
        channels = head_channels(self.backbone, 512)
        self.conv5 = conv_bn_relu(self.backbone.channels["layer4"], channels, 3)
        self.lateral = lateral
        if lateral:
            self.lateral_layer2 = conv_bn_relu(self.backbone.channels["layer2"], channels, 1)
            self.lateral_layer3 = conv_bn_relu(self.backbone.channels["layer3"], channels, 1)
            self.fusion = conv_bn_relu(3 * channels, channels, 3)
        self.context = ContextEncoding(channels, num_codes, se_classes=num_classes if se_loss else None)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = classifier(channels, num_classes)
        self.aux_head = (AuxHead(self.backbone.channels["layer3"], num_classes,
                                 channels=head_channels(self.backbone, 256)) if aux else None)

    def head_with_se(self, features: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        x = self.conv5(features["layer4"])
        if self.lateral:
            size = x.shape[-2:]
            x = self.fusion(torch.cat([
                x,
                upsample_to(self.lateral_layer2(features["layer2"]), size),
                upsample_to(self.lateral_layer3(features["layer3"]), size),
            ], dim=1))
        x, se_logits = self.context(x)
        return self.classifier(self.dropout(x)), se_logits

