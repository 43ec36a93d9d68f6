"""AMN: the activation manipulation network (Lee, Kim, Shim, "Threshold Matters in WSSS:
Manipulating the Activation for the Robust Localization Map", CVPR 2022).

A CAM is a classifier's evidence map, sharp where a class is most discriminative and faint
elsewhere, so no single background threshold fits every image. AMN trains a second network
as a per-pixel classifier over the C + 1 classes (background included) on the CAMs'
confident regions (IRN's relation maps: confident foreground, confident background, the
rest ignored), with label smoothing, so that its per-pixel probabilities come out flat
across an object instead of peaked. Its maps replace the CAMs for everything after.

The network (gaviotas/AMN's net/resnet50_amn.py): a ResNet at output stride 16, whose last
features are multiplied channel-wise by a linear encoding of the image's tags, then
dropout 0.1 and DeepLab v2's ASPP-L (four 3x3 convs of rates 6, 12, 18, 24 straight to C + 1
logits, summed). See docs/models/cam.md for the recipe and wsseg's measurements.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.models.backbones import ResNet
from wsseg.models.cam import rescaled
from wsseg.models.segmenters.common import ASPPSum

_NORM_EPS = 1e-5  # AMN's make_amn_cam.py


class AMNet(nn.Module):
    """ResNet (OS16) features x label encoding -> dropout -> ASPP-L -> (B, C + 1, h, w) logits.

    Args:
        backbone: a ResNet with strides (1, 2, 2, 1), like the CAM network's.
        num_classes: foreground classes C; channel 0 of the output is background, k + 1 is class k.
        rates: the ASPP-L dilations.
    """

    def __init__(self, backbone: ResNet, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = num_classes
        features = backbone.channels["layer4"]
        self.label_encoder = nn.Linear(num_classes, features)  # PyTorch's default init, as AMN's
        self.dropout = nn.Dropout(0.1)
        self.aspp = ASPPSum(features, num_classes + 1, rates)  # N(0, 0.01) weights, zero bias: AMN's _ASPP

    def forward(self, x: Tensor, tags: Tensor) -> Tensor:
        """x (B, 3, H, W) normalised, tags (B, C) multi-hot -> logits (B, C + 1, H/16, W/16)."""
        features = self.backbone(x)["layer4"]
        encoding = self.label_encoder(tags.to(features.dtype))[:, :, None, None]
        return self.aspp(self.dropout(features * encoding))

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters that learn, new layers: label encoder and ASPP head)."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return backbone, [*self.label_encoder.parameters(), *self.aspp.parameters()]


def amn_loss(logits: Tensor, labels: Tensor, smoothing: float) -> Tensor:
    """AMN's balanced, label-smoothed cross-entropy.

    labels (B, H, W) int64 (0 background, 1..C, 255 ignore) are picked at the logits' size
    (nearest); the target puts 1 - eps on the pixel's class and eps / C on each of the other
    C classes; the loss is the mean over background pixels plus the mean over foreground
    pixels, halved, so that the (usually larger) background does not drown the objects.
    A batch without background or without foreground pixels contributes only the other half.
    """
    labels = nearest(labels, logits.shape[-2:])
    channels = logits.shape[1]
    log_probs = F.log_softmax(logits.float(), dim=1)
    valid = labels != 255
    index = torch.where(valid, labels, torch.zeros_like(labels))
    picked = log_probs.gather(1, index[:, None])[:, 0]
    # sum_c target_c * log p_c with target = eps/(C) everywhere but 1 - eps at the label
    others = (log_probs.sum(dim=1) - picked) * (smoothing / (channels - 1))
    pixel_loss = -((1.0 - smoothing) * picked + others)
    terms = []
    for mask in (valid & (labels == 0), valid & (labels > 0)):
        if mask.any():
            terms.append(pixel_loss[mask].mean())
    return sum(terms) / 2.0 if terms else logits.sum() * 0.0


def amn_maps(model: AMNet, image: Tensor, keys: Tensor, tags: Tensor, confident_background: Tensor,
             scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0)) -> tuple[Tensor, Tensor]:
    """AMN's make_amn_cam for one image: the seeds that replace its CAMs.

    For every scale the image and its flip go through the network together (with the image's
    tags); the flip-averaged logits are resized to stride 4 (`cam`) and to the image size
    (`high_res`) and averaged over scales; softmax over the C + 1 channels; the present
    classes' channels are kept and each is min-max normalised over the image, except on the
    pixels whose relation label is confident background (`confident_background`, (H, W)
    bool), which keep their raw probability, so that a region the CAMs called background stays
    low after the stretch.

    Args:
        image: (3, H, W) normalised. keys: (K,) 0-based present classes. tags: (C,) multi-hot.
    Returns:
        cam (K, ceil(H/4), ceil(W/4)) and high_res (K, H, W), float32.
    """
    device = image.device
    height, width = image.shape[1:]
    small_size = (math.ceil(height / 4), math.ceil(width / 4))
    keys = keys.to(device=device, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            small = torch.zeros((model.num_classes + 1, *small_size), device=device)
            high = torch.zeros((model.num_classes + 1, height, width), device=device)
            for scale in scales:
                scaled, _ = rescaled(image, scale)
                pair = torch.cat([scaled, scaled.flip(-1)])
                logits = model(pair, tags[None].expand(2, -1).to(device))
                logits = ((logits[0] + logits[1].flip(-1)) / 2)[None]
                small += F.interpolate(logits, size=small_size, mode="bilinear", align_corners=False)[0]
                high += F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0]
            outputs = []
            masks = (nearest(confident_background.to(device), small_size), confident_background.to(device))
            for summed, background in zip((small, high), masks):
                probabilities = torch.softmax(summed / len(scales), dim=0)[keys + 1]
                low = probabilities.amin(dim=(1, 2), keepdim=True)
                stretched = (probabilities - low) / (probabilities.amax(dim=(1, 2), keepdim=True) - low + _NORM_EPS)
                outputs.append(torch.where(background[None], probabilities, stretched))
    finally:
        model.train(was_training)
    return outputs[0].clone(), outputs[1].clone()


def nearest(labels: Tensor, size: Sequence[int]) -> Tensor:
    """(..., H, W) labels or mask resized to `size` by nearest neighbour the way PIL's NEAREST
    does it (AMN resizes its labels with PIL): output pixel i reads input pixel floor((i + 0.5) * H / h)."""
    height, width = labels.shape[-2:]
    rows = ((torch.arange(int(size[0]), device=labels.device) + 0.5) * height / int(size[0])).long().clamp(max=height - 1)
    cols = ((torch.arange(int(size[1]), device=labels.device) + 0.5) * width / int(size[1])).long().clamp(max=width - 1)
    return labels[..., rows[:, None], cols[None, :]]
