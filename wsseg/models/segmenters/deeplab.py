"""DeepLab v1 (LargeFOV), v2 (ASPP-L, optional MSC), v3 (ASPP) and v3+ (ASPP + decoder)
on a dilated ResNet (Chen et al. 2015, 2017, 2017, 2018; docs/ALGORITHMS.md §2).

v1 and v2 compute their loss on the labels downsampled to the logits (nearest,
corner-aligned: `common.downsample_labels`), as the Caffe releases did; v3 and v3+
upsample the logits to the labels. v1 and v2 carry their DenseCRF settings in
`crf_defaults` (keyword arguments of wsseg.ops.crf.crf_from_probs).

Dilation rates are the papers' at their output stride (v1/v2: OS8, v3/v3+: OS16) and
scale inversely with it: v3's (6, 12, 18) become (12, 24, 36) at OS8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.models.backbones import resnet
from wsseg.models.segmenters.common import (
    ASPP,
    ASPPSum,
    AuxHead,
    Segmenter,
    classifier,
    conv_bn_relu,
    head_channels,
    upsample_to,
)
from wsseg.ops.crf import DEEPLAB_V2_RESNET101_CRF

# DeepLab v2's multi-scale inputs (MSC): the image at 1, 0.75 and 0.5 of its size.
MSC_SCALES = (1.0, 0.75, 0.5)


def _check_output_stride(model: str, output_stride: int) -> None:
    if output_stride not in (8, 16):
        raise ValueError(f"{model}: output_stride must be 8 or 16, got {output_stride}")


def _check_rates(model: str, rates: Sequence[int]) -> None:
    if not rates or any(int(r) < 1 for r in rates):
        raise ValueError(f"{model}: rates must be one or more dilations >= 1, got {tuple(rates)}")


def _loss_on(model: str, loss_on: str) -> str:
    """The `label_size_from` of a v1/v2 model's `loss_on` option: "logits" (the papers' labels
    downsampled to the logits) or "labels" (the logits upsampled to the labels, as v3 does)."""
    if loss_on not in ("logits", "labels"):
        raise ValueError(f"{model}: loss_on must be 'logits' (the paper's) or 'labels', got {loss_on!r}")
    return "logits" if loss_on == "logits" else "label"


def _aux_head(backbone, num_classes: int, aux: bool) -> AuxHead | None:
    if not aux:
        return None
    return AuxHead(backbone.channels["layer3"], num_classes, channels=head_channels(backbone, 256))


class DeepLabV1(Segmenter):
    """DeepLab v1 LargeFOV: 3x3 conv dilation 12 -> 1024, ReLU, dropout 0.5, 1x1 1024,
    ReLU, dropout 0.5, 1x1 to classes (fc6/fc7/fc8 of the VGG release; no BatchNorm).
    1024 is scaled with the backbone (`head_channels`). Loss on downsampled labels.

    `rate`: fc6's dilation at OS8, the paper's 12 for 321 px crops (a 41x41 map).
    `dropout`: the drop probability after fc6 and fc7 (the paper's 0.5; 0 leaves them out).
    `head_norm`: BatchNorm after fc6 and fc7 (before the ReLU), which the paper has not.
    `loss_on`: "logits" (the paper's: labels downsampled to the logits) or "labels"."""

    label_size_from = "logits"
    # DeepLab v1's DenseCRF: bilateral w 4, sxy 121, srgb 5; Gaussian w 3, sxy 3.
    crf_defaults = dict(bilateral_weight=4, bilateral_sxy=121, bilateral_srgb=5,
                        gaussian_weight=3, gaussian_sxy=3)

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 output_stride: int = 8, aux: bool = False, rate: int = 12,
                 dropout: float = 0.5, head_norm: bool = False, loss_on: str = "logits") -> None:
        super().__init__()
        self.label_size_from = _loss_on("deeplab-v1", loss_on)
        _check_output_stride("deeplab-v1", output_stride)
        _check_rates("deeplab-v1", (rate,))
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"deeplab-v1: dropout must be in [0, 1), got {dropout}")
        self.backbone = resnet(depth, output_stride=output_stride, width=width)
        channels = head_channels(self.backbone, 1024)
        dilation = max(1, rate * 8 // output_stride)  # LargeFOV: 12 at OS8
        self.fc6 = nn.Conv2d(self.backbone.channels["layer4"], channels, 3, padding=dilation, dilation=dilation,
                             bias=not head_norm)
        self.fc7 = nn.Conv2d(channels, channels, 1, bias=not head_norm)
        self.norm6 = nn.BatchNorm2d(channels) if head_norm else nn.Identity()
        self.norm7 = nn.BatchNorm2d(channels) if head_norm else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        # Caffe's Dropout layer drops single activations (not whole channels).
        self.dropout6 = nn.Dropout(dropout)
        self.dropout7 = nn.Dropout(dropout)
        self.classifier = classifier(channels, num_classes)
        self.aux_head = _aux_head(self.backbone, num_classes, aux)

    def head(self, features: dict[str, Tensor]) -> Tensor:
        x = self.dropout6(self.relu(self.norm6(self.fc6(features["layer4"]))))
        x = self.dropout7(self.relu(self.norm7(self.fc7(x))))
        return self.classifier(x)


class DeepLabV2(Segmenter):
    """DeepLab v2: ASPP-L (four 3x3 convs to classes, rates 6, 12, 18, 24 at OS8, summed).

    `rates` (at OS8) are the paper's for 321 px crops (a 41x41 map). On small images most
    of a large rate's taps land in the padding; scaling the rates with the image is the
    obvious fix, but on the demo's 128 px images a quarter of them scored lower, not higher
    (val mIoU on ground truth .611 vs .649, 1000 steps), so the paper's rates stay default.

    msc=True adds DeepLab v2's multi-scale inputs: the network runs on the image at
    scales 1, 0.75 and 0.5 (bilinear resizing); the 0.75 and 0.5 logits are upsampled
    (bilinear) to the scale-1 logits and the three are fused by an elementwise max.
    forward() then returns "out" (the fused logits) plus "scale1.0", "scale0.75",
    "scale0.5" (each at its own resolution; "aux" is from the scale-1 pass) and loss()
    has four equally weighted CE terms, each on the labels downsampled to that output:
    total = main (fused) + scale1.0 + scale0.75 + scale0.5 [+ aux_weight·aux]
    (the DeepLab v2 PyTorch port's sum over its four outputs). predict() gives the
    fused logits.

    `loss_on`: "logits" (the paper's: labels downsampled to each output) or "labels" (each
    output upsampled to the labels).
    """

    label_size_from = "logits"
    # DeepLab v2 ResNet-101's DenseCRF (4, 67, 3, 3, 1).
    crf_defaults = dict(DEEPLAB_V2_RESNET101_CRF)

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 output_stride: int = 8, aux: bool = False, msc: bool = False,
                 rates: Sequence[int] = (6, 12, 18, 24), loss_on: str = "logits") -> None:
        super().__init__()
        self.label_size_from = _loss_on("deeplab-v2", loss_on)
        _check_output_stride("deeplab-v2", output_stride)
        _check_rates("deeplab-v2", rates)
        self.msc = msc
        self.backbone = resnet(depth, output_stride=output_stride, width=width)
        rates = tuple(max(1, r * 8 // output_stride) for r in rates)
        self.aspp = ASPPSum(self.backbone.channels["layer4"], num_classes, rates)
        self.aux_head = _aux_head(self.backbone, num_classes, aux)

    def head(self, features: dict[str, Tensor]) -> Tensor:
        return self.aspp(features["layer4"])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if not self.msc:
            return super().forward(x)
        features = self.backbone(x)
        outputs = self._msc(x, self.head(features))
        if self.aux_head is not None:
            outputs["aux"] = self.aux_head(features["layer3"])
        return outputs

    def loss(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        terms = super().loss(outputs, labels)
        if self.msc:
            for scale in MSC_SCALES:
                key = _scale_key(scale)
                terms[key] = self.pixel_loss(outputs[key], labels)
                terms["total"] = terms["total"] + terms[key]
        return terms

    def predict(self, x: Tensor) -> Tensor:
        if not self.msc:
            return super().predict(x)
        return upsample_to(self._msc(x, self.head(self.backbone(x)))["out"], x.shape[-2:], self.corner_aligned)

    def _msc(self, x: Tensor, full_scale: Tensor) -> dict[str, Tensor]:
        """Given the scale-1 logits, run the smaller scales and fuse by elementwise max."""
        outputs = {_scale_key(1.0): full_scale}
        fused = full_scale
        for scale in MSC_SCALES[1:]:
            logits = self.head(self.backbone(_rescale(x, scale)))
            outputs[_scale_key(scale)] = logits
            fused = torch.maximum(fused, upsample_to(logits, fused.shape[-2:], self.corner_aligned))
        outputs["out"] = fused
        return outputs


def _scale_key(scale: float) -> str:
    """The output/loss-term name of one MSC scale: "scale1.0", "scale0.75", "scale0.5"."""
    return f"scale{scale}"


def _rescale(x: Tensor, scale: float) -> Tensor:
    """The batch resized by `scale` (size floor(H·scale), at least 1), bilinear."""
    size = (max(1, int(x.shape[-2] * scale)), max(1, int(x.shape[-1] * scale)))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DeepLabV3(Segmenter):
    """DeepLab v3: multi-grid dilated ResNet, ASPP (256 ch at ResNet-50 width), 1x1
    classifier; aux head on layer3 (weight 0.4).

    Args:
        output_stride: 16 (the paper's training setting) or 8; ASPP rates
            (6, 12, 18) at OS16, doubled at OS8.
        multi_grid: per-unit multipliers of layer4's dilation (paper: (1, 2, 4)); None
            for plain dilation.
        rates: the ASPP's dilation rates at OS16, the paper's (6, 12, 18) for 513 px crops
            (a quarter of them on the demo's 128 px images scored .503 vs .515: see DeepLabV2).
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 output_stride: int = 16, aux: bool = True,
                 multi_grid: Sequence[int] | None = (1, 2, 4), rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__()
        _check_output_stride("deeplab-v3/v3+", output_stride)
        _check_rates("deeplab-v3/v3+", rates)
        self.backbone = resnet(depth, output_stride=output_stride, width=width,
                               multi_grid=tuple(multi_grid) if multi_grid is not None else None)
        self.aspp_channels = head_channels(self.backbone, 256)
        rates = tuple(max(1, r * 16 // output_stride) for r in rates)
        self.aspp = ASPP(self.backbone.channels["layer4"], self.aspp_channels, rates)
        self.classifier = classifier(self.aspp_channels, num_classes)
        self.aux_head = _aux_head(self.backbone, num_classes, aux)

    def head(self, features: dict[str, Tensor]) -> Tensor:
        return self.classifier(self.aspp(features["layer4"]))


class DeepLabV3Plus(DeepLabV3):
    """DeepLab v3+: the v3 encoder and a decoder at stride 4.

    layer1 (stride 4) -> 1x1 conv 48 (BN, ReLU); the ASPP output upsampled (bilinear,
    x4 at OS16) to layer1's size; concat -> two 3x3 convs 256 (BN, ReLU) -> 1x1
    classifier. Logits at stride 4; the loss and predict() upsample them x4. Channel
    counts (48, 256) are scaled with the backbone. Arguments as DeepLabV3.
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 output_stride: int = 16, aux: bool = True,
                 multi_grid: Sequence[int] | None = (1, 2, 4), rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__(num_classes, depth=depth, width=width, output_stride=output_stride,
                         aux=aux, multi_grid=multi_grid, rates=rates)
        low_level = head_channels(self.backbone, 48)
        self.reduce = conv_bn_relu(self.backbone.channels["layer1"], low_level, 1)
        self.decoder = nn.Sequential(
            conv_bn_relu(self.aspp_channels + low_level, self.aspp_channels, 3),
            conv_bn_relu(self.aspp_channels, self.aspp_channels, 3),
        )
        # v3's `classifier` (aspp_channels -> classes) now reads the decoder's output.

    def head(self, features: dict[str, Tensor]) -> Tensor:
        low = self.reduce(features["layer1"])
        context = upsample_to(self.aspp(features["layer4"]), low.shape[-2:])
        return self.classifier(self.decoder(torch.cat([context, low], dim=1)))
