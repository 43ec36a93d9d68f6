"""Parts the segmenters share (docs/ALGORITHMS.md §2): the base class that implements the
segmenter contract, the auxiliary FCN head, ASPP (DeepLab v3) and ASPP-L (DeepLab v2),
label-aware cross-entropy and small helpers.

A segmenter is a ResNet `backbone` plus heads. Subclassing `Segmenter` and writing
`head(features)` gives the contract's forward / loss / predict / param_groups:

    class MyNet(Segmenter):
        def __init__(self, num_classes, *, depth=50, width=1.0, output_stride=8, aux=True):
            super().__init__()
            self.backbone = resnet(depth, output_stride=output_stride, width=width)
            self.aux_head = AuxHead(self.backbone.channels["layer3"], num_classes) if aux else None
            self.classifier = classifier(self.backbone.channels["layer4"], num_classes)

        def head(self, features):
            return self.classifier(features["layer4"])

Head widths: the papers' channel counts (ASPP 256, PSPNet 512, ...) belong to a
2048-channel layer4 (ResNet-50/101 at width 1). `head_channels` scales them with the
backbone's layer4, as mmsegmentation's ResNet-18 configs do (a quarter: 512 -> 128),
so a width-0.25 ResNet-18 gets a head of matching size. At ResNet-50/101 width 1 the
numbers are the papers'.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.class_ids import IGNORE
from wsseg.models.backbones import ResNet

# layer4 channels of the backbones the papers' head widths were designed for (R50/R101).
REFERENCE_LAYER4_CHANNELS = 2048


def head_channels(backbone: ResNet, channels: int) -> int:
    """A paper's head width `channels` scaled to this backbone's layer4 (at least 8).

    channels * backbone.channels["layer4"] / 2048, rounded: 256 stays 256 on ResNet-50,
    becomes 64 on ResNet-18 and 16 on a width-0.25 ResNet-18 (128-channel layer4).
    """
    return max(8, int(round(channels * backbone.channels["layer4"] / REFERENCE_LAYER4_CHANNELS)))


def classifier(in_channels: int, num_classes: int) -> nn.Conv2d:
    """The final 1x1 conv to class logits, initialised N(0, 0.01) with zero bias (DeepLab's
    fc8 filler and mmsegmentation's conv_seg)."""
    conv = nn.Conv2d(in_channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, *,
                 dilation: int = 1) -> nn.Sequential:
    """kxk conv (no bias: BN follows), BatchNorm, ReLU; 'same' padding for odd k."""
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def upsample_to(logits: Tensor, size: Sequence[int], align_corners: bool = False) -> Tensor:
    """(B, K, h, w) -> (B, K, *size), bilinear; unchanged if already that size.

    align_corners=False is the toolboxes' geometry (a logit is the centre of its cell);
    True is DeepLab v1/v2's (a logit is the corner-aligned label pixel `downsample_labels`
    trains it on, Caffe's Interp layer): a model must be read back the way it was trained."""
    size = tuple(int(s) for s in size)
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=align_corners)


def downsample_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest, corner-aligned label resizing: (B, H, W) int64 -> (B, h, w) int64.

    Output pixel (i, j) takes input pixel (round(i·(H−1)/(h−1)), round(j·(W−1)/(w−1)))
    (row 0 for h = 1). This is DeepLab's Caffe `label_shrink` (an Interp layer with
    aligned corners): a 321 crop gives 41x41 logits at OS8 and the labels are read at
    rows and columns 0, 8, ..., 320, the centres of the logits' receptive fields.
    Interpolating class ids would invent classes, so only whole pixels are picked.
    """
    height, width = labels.shape[-2:]
    rows = _corner_aligned_indices(height, int(size[0]), labels.device)
    cols = _corner_aligned_indices(width, int(size[1]), labels.device)
    return labels[..., rows[:, None], cols[None, :]]


def _corner_aligned_indices(source: int, target: int, device: torch.device) -> Tensor:
    """round(i·(source−1)/(target−1)) for i < target, in exact integer arithmetic."""
    index = torch.arange(target, device=device)
    if target == 1:
        return index * 0
    # floor(i·(S−1)/(T−1) + 1/2) without floating point.
    return (2 * index * (source - 1) + (target - 1)) // (2 * (target - 1))


def cross_entropy(logits: Tensor, labels: Tensor, size_from: str = "label", relax: int = 0) -> Tensor:
    """Mean per-pixel cross-entropy over pixels whose label is not 255; a float32 scalar.

    logits (B, K, h, w); labels (B, H, W) int64 in 0..K−1 or 255. size_from="label":
    the logits are upsampled to H x W (bilinear, align_corners=False: the toolboxes'
    loss); "logits": the labels are downsampled to h x w with `downsample_labels`
    (DeepLab v1/v2). A batch with no labelled pixel gives 0 (with a graph), not NaN.
    relax > 0: boundary label relaxation (`relaxed_nll`) with a window of that radius, always
    at the labels' resolution (the logits upsampled, whatever size_from says): one logit of a
    stride-8 model covers 8 label pixels, and relaxing on that grid gave away whole small objects.
    With size_from="logits" that upsampling is corner-aligned, the geometry the plain loss trains.
    """
    if size_from not in ("label", "logits"):
        raise ValueError(f"size_from must be 'label' or 'logits', got {size_from!r}")
    if relax > 0:
        logits = upsample_to(logits, labels.shape[-2:], align_corners=size_from == "logits")
        summed = relaxed_nll(logits, labels, relax).sum()
        return summed / (labels != IGNORE).sum().clamp(min=1)
    if size_from == "label":
        logits = upsample_to(logits, labels.shape[-2:])
    else:
        labels = downsample_labels(labels, logits.shape[-2:])
    summed = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="sum")
    return summed / (labels != IGNORE).sum().clamp(min=1)


def relaxed_nll(logits: Tensor, labels: Tensor, radius: int) -> Tensor:
    """Boundary label relaxation (Zhu et al., CVPR 2019): per pixel −log Σ_{c ∈ N} softmax_c, where
    N is the set of labels found in the (2·radius+1)² window around it (255 contributes none).

    Inside a region N is the pixel's own label and this is the cross-entropy; on a boundary the
    network may put the mass on any class that meets there, so a label boundary drawn a few
    pixels off costs nothing. logits (B, K, H, W), labels (B, H, W) at the same size -> (B, H, W)
    float32, 0 where the label is 255.
    """
    num_classes = logits.shape[1]
    valid = labels != IGNORE
    onehot = F.one_hot(labels.where(valid, 0), num_classes).permute(0, 3, 1, 2).float() * valid[:, None]
    allowed = F.max_pool2d(onehot, 2 * radius + 1, stride=1, padding=radius) > 0
    allowed = allowed | ~valid[:, None]  # ignored pixels: any class (a finite value, masked out below)
    log_probs = F.log_softmax(logits.float(), dim=1)
    loss = -torch.logsumexp(log_probs.masked_fill(~allowed, float("-inf")), dim=1)
    return loss.where(valid, torch.zeros_like(loss))


class AuxHead(nn.Module):
    """The auxiliary FCN head on layer3 (PSPNet's deep supervision, the toolboxes' aux
    head): 3x3 conv `channels`, BN, ReLU, dropout 0.1, 1x1 to classes. Training only."""

    def __init__(self, in_channels: int, num_classes: int, *, channels: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, h, w) -> logits (B, num_classes, h, w)."""
        return self.classifier(self.dropout(self.conv(x)))


class ImagePooling(nn.Module):
    """ASPP's image-level branch: global average pool, 1x1 conv, BN, ReLU, broadcast back.

    BatchNorm sees one value per image and channel, so training needs at least 2 images
    per device (PyTorch raises otherwise), as in every reference implementation.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.project = conv_bn_relu(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.project(x.mean(dim=(2, 3), keepdim=True))
        return pooled.expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling of DeepLab v3 (Chen et al. 2017).

    Branches: 1x1 conv; one 3x3 conv per rate; image pooling (optional). Each gives
    `out_channels` with BN + ReLU; their concatenation goes through 1x1 conv
    `out_channels`, BN, ReLU and dropout (0.1: the TF reference's keep_prob 0.9 after
    the concat projection). Rates are (6, 12, 18) at output stride 16; pass them doubled
    at OS8.

    Attributes: rates (tuple), branches (nn.ModuleList: the 1x1, the rate convs in
    order, then the pooling branch).
    """

    def __init__(self, in_channels: int, out_channels: int = 256, rates: Sequence[int] = (6, 12, 18),
                 image_pooling: bool = True, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        branches: list[nn.Module] = [conv_bn_relu(in_channels, out_channels, 1)]
        branches += [conv_bn_relu(in_channels, out_channels, 3, dilation=r) for r in self.rates]
        if image_pooling:
            branches.append(ImagePooling(in_channels, out_channels))
        self.branches = nn.ModuleList(branches)
        self.project = conv_bn_relu(len(branches) * out_channels, out_channels, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, h, w) -> (B, out_channels, h, w)."""
        merged = torch.cat([branch(x) for branch in self.branches], dim=1)
        return self.dropout(self.project(merged))


class ASPPSum(nn.Module):
    """DeepLab v2's ASPP-L: one 3x3 conv per rate (6, 12, 18, 24) straight to class
    logits, summed. Each conv has a bias and the N(0, 0.01) filler of DeepLab's fc1_c*.

    Attributes: rates (tuple), branches (nn.ModuleList of the convs, in rate order).
    """

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList()
        for rate in self.rates:
            conv = nn.Conv2d(in_channels, num_classes, 3, padding=rate, dilation=rate)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            self.branches.append(conv)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, h, w) -> logits (B, num_classes, h, w)."""
        logits = self.branches[0](x)
        for branch in self.branches[1:]:
            logits = logits + branch(x)
        return logits


class Segmenter(nn.Module):
    """Base of the segmenters: the contract's forward / loss / predict / param_groups.

    Subclasses set `backbone` (a ResNet), `aux_head` (AuxHead on layer3 or None) and
    implement `head(features) -> main logits`. Class attributes:
      aux_weight: weight of the aux term in "total" (0.4, PSPNet's).
      label_size_from: "label" (logits upsampled to the label: the toolboxes) or
        "logits" (labels downsampled to the logits: DeepLab v1/v2); see cross_entropy.
      input_channels: channels of the input tensor: 3 (normalised RGB) or 4 (RGB-D: the
        normalised depth, transforms.normalize_depth, as the fourth channel; train-segmenter,
        its evaluation and `wsseg predict` then read depth maps, data.depth_dir: ACNet).
    Instance attribute set by train-segmenter:
      label_relaxation: boundary label relaxation radius in label pixels for every
        pixel-wise term (`pixel_loss`); 0 = plain cross-entropy.
    """

    aux_weight: float = 0.4
    label_size_from: str = "label"
    label_relaxation: int = 0
    input_channels: int = 3
    backbone: ResNet
    aux_head: AuxHead | None

    def head(self, features: dict[str, Tensor]) -> Tensor:
        """Backbone stage outputs -> main logits (B, num_classes, h, w)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x (B, 3, H, W) normalised -> {"out": main logits at the head's resolution,
        "aux": layer3 logits (when the model has an aux head)}."""
        features = self.backbone(x)
        outputs = {"out": self.head(features)}
        if self.aux_head is not None:
            outputs["aux"] = self.aux_head(features["layer3"])
        return outputs

    def loss(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """Terms "main" (CE of "out") and, if present, "aux" (CE of "aux", unweighted);
        "total" = main + aux_weight·aux. labels (B, H, W) int64, 255 ignored."""
        terms = {"main": self.pixel_loss(outputs["out"], labels)}
        total = terms["main"]
        if "aux" in outputs:
            terms["aux"] = self.pixel_loss(outputs["aux"], labels)
            total = total + self.aux_weight * terms["aux"]
        terms["total"] = total
        return terms

    def add_pixel_terms(self, terms: dict[str, Tensor], outputs: dict[str, Tensor], labels: Tensor,
                        keys: Sequence[str], weight: float) -> dict[str, Tensor]:
        """For each of `keys` in `outputs`: its `pixel_loss` as a term, and weight x it added to
        terms["total"] (extra supervised outputs: DANet's branches, BiSeNet's context heads)."""
        total = terms.pop("total")
        for key in keys:
            if key in outputs:
                terms[key] = self.pixel_loss(outputs[key], labels)
                total = total + weight * terms[key]
        terms["total"] = total  # last, as every model's terms
        return terms

    def pixel_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The per-pixel classification loss of every labelled output: cross-entropy at
        `label_size_from`, with boundary label relaxation when `label_relaxation` > 0."""
        return cross_entropy(logits, labels, self.label_size_from, relax=self.label_relaxation)

    def predict(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> main logits (B, num_classes, H, W), bilinearly upsampled; no
        aux head. Does not switch modes: call model.eval() first for test-time behaviour."""
        return upsample_to(self.head(self.backbone(x)), x.shape[-2:], self.corner_aligned)

    @property
    def corner_aligned(self) -> bool:
        """Whether the logits are read back corner-aligned (`upsample_to`): the models trained on labels
        downsampled to the logits (label_size_from "logits"), whose logit (i, j) learnt the label pixel
        `downsample_labels` picks for it. Read back centre-aligned, as the toolboxes' models are, the
        map is stretched by up to half a cell at the borders (on the demo's 128 px images the best a
        stride-8 map of such labels can score fell from 0.92 to 0.85 val mIoU)."""
        return self.label_size_from == "logits"

    def backbone_weights_loaded(self) -> None:
        """Called by train-segmenter after `segmenter.weights` went into `backbone`. Models with more
        than one ResNet branch override it to start the others from them (ACNet)."""

    def begin_training(self, steps_per_epoch: int, max_steps: int) -> None:
        """Called by train-segmenter before the first step (and again on a resume). Models whose
        schedule depends on the run's length override it (MCIBI's memory loss starts after epoch 1)."""

    def fit_to_labels(self, labels: Iterable[Tensor]) -> None:
        """Called by train-segmenter once before the first step (and again on a resume, where the
        checkpoint then restores the state) with the training label maps of the semantic run, each
        (H, W) int64 at its image's size, 255 ignored, read lazily. Models with state fitted to the
        labels rather than learned override it (DUpsampling's W); others never read them."""

    def after_step(self, outputs: dict[str, Tensor], labels: Tensor, step: int, max_steps: int) -> None:
        """Called after every optimiser step, without gradients, with the step's outputs and labels.
        Models with state outside the gradient override it (MCIBI's memory, dilated-context's stages)."""

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters, all other parameters), trainable ones only, each once."""
        in_backbone = {id(p) for p in self.backbone.parameters()}
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [p for p in self.parameters() if p.requires_grad and id(p) not in in_backbone]
        return backbone, heads
