"""IRN: inter-pixel relation network (Ahn, Cho, Kwak, CVPR 2019), docs/ALGORITHMS.md §1.5.

Two heads on a ResNet: a class-boundary map B (one logit per stride-4 pixel) and a
displacement field D (dy, dx per stride-4 pixel, in stride-4 pixels) that points from
every pixel toward the centroid of its instance. Both are trained from the relation
labels of mine-relations through pairs of nearby pixels (wsseg.ops.path_index).

Displacement sign convention. For a source pixel i and its neighbour j = i + d
(d = (dy, dx) from path_index.directions), the loss asks δ_ij = D(i) − D(j) to equal d
on fg_pos pairs. If D(p) = c − p (pointing from p to the centroid c), then
D(i) − D(j) = (c − i) − (c − j) = j − i = d: the target is met. The loss constrains
only differences, so D is defined up to a constant per connected object; with zero
initial displacement and plain SGD the per-object sum of D is conserved at zero, and
at inference the mean displacement over the images (`mean_displacement`) is
subtracted: both put the zero of D at the object's centroid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.models.backbones import ResNet
from wsseg.ops.path_index import (
    BG_POS,
    FG_POS,
    NEG,
    directions,
    pair_labels,
    path_affinity,
    source_crop,
)

LEVELS = ("stem", "layer1", "layer2", "layer3", "layer4")
# Output strides of the levels for IRN's backbone (layer strides 1, 2, 2, 1).
IRN_LEVEL_STRIDES = {"stem": 4, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 16}
LOG_EPS = 1e-5  # IRN: -log(a + 1e-5), -log(1 + 1e-5 - a)


def _block(in_channels: int, out_channels: int, groups: int, upsample: int = 1) -> nn.Sequential:
    """IRN's head unit: 1x1 conv (no bias), GroupNorm, optional bilinear upsampling, ReLU."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
        nn.GroupNorm(groups, out_channels),
    ]
    if upsample > 1:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop the bottom/right of an upsampled map to the finer level's size."""
    if x.shape[-2] < size[0] or x.shape[-1] < size[1]:
        raise ValueError(f"map {tuple(x.shape[-2:])} is smaller than the target size {size}")
    return x[..., : size[0], : size[1]]


class IRNet(nn.Module):
    """Boundary and displacement heads on a ResNet with IRN's strides (1, 2, 2, 1).

    backbone: a wsseg ResNet whose forward returns the five levels of `LEVELS`; input
    channel counts are read from `backbone.channels`, so any depth/width works.
    train_backbone: IRN keeps the backbone frozen and detached (eval mode, no
    gradient; only the heads learn). True trains the stages the backbone itself marks
    trainable, and they join the boundary head's parameter group (see `param_groups`).

    forward(x (B, 3, H, W)) returns boundary logits (B, 1, h, w) and displacement
    (B, 2, h, w) (dy, dx) in stride-4 pixels, with h, w = ⌈H/4⌉, ⌈W/4⌉ (the stem's
    size). forward does not subtract `mean_displacement`; `boundary_inference` does.
    """

    def __init__(self, backbone: ResNet, *, train_backbone: bool = False) -> None:
        super().__init__()
        level_strides = dict(getattr(backbone, "strides_of", IRN_LEVEL_STRIDES))
        if level_strides != IRN_LEVEL_STRIDES:
            raise ValueError(
                f"IRNet needs a ResNet with strides (1, 2, 2, 1) and stem stride 2 "
                f"(level strides {IRN_LEVEL_STRIDES}), got {level_strides}"
            )
        self.backbone = backbone
        self.train_backbone = train_backbone
        if not train_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()
        channels = backbone.channels

        # Boundary head: every level -> 32 ch, GN(4), up to stride 4, ReLU; concat 160 -> 1.
        self.boundary_levels = nn.ModuleDict(
            {
                level: _block(channels[level], 32, 4, upsample=IRN_LEVEL_STRIDES[level] // 4)
                for level in LEVELS
            }
        )
        self.boundary_out = nn.Conv2d(32 * len(LEVELS), 1, 1, bias=True)

        # Displacement head: a small two-step decoder (s8 then s4), IRN's fc_dp1..7.
        self.disp_stem = _block(channels["stem"], 64, 8)  # s4
        self.disp_layer1 = _block(channels["layer1"], 128, 16)  # s4
        self.disp_layer2 = _block(channels["layer2"], 256, 16)  # s8
        self.disp_layer3 = _block(channels["layer3"], 256, 16, upsample=2)  # s16 -> s8
        self.disp_layer4 = _block(channels["layer4"], 256, 16, upsample=2)  # s16 -> s8
        self.disp_fuse_s8 = _block(768, 256, 16, upsample=2)  # s8 -> s4
        self.disp_fuse_s4 = nn.Sequential(
            _block(448, 256, 16), nn.Conv2d(256, 2, 1, bias=False)  # (dy, dx), no bias
        )
        # Mean predicted displacement over the inference images, set after training.
        self.register_buffer("mean_displacement", torch.zeros(2))

    def train(self, mode: bool = True) -> IRNet:
        super().train(mode)
        if not self.train_backbone:
            self.backbone.eval()  # IRN: a frozen backbone keeps its BN statistics
        return self

    def _boundary_modules(self) -> list[nn.Module]:
        return [self.boundary_levels, self.boundary_out]

    def _displacement_modules(self) -> list[nn.Module]:
        return [
            self.disp_stem,
            self.disp_layer1,
            self.disp_layer2,
            self.disp_layer3,
            self.disp_layer4,
            self.disp_fuse_s8,
            self.disp_fuse_s4,
        ]

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(boundary group, displacement group) for IRN's lr 0.1 and 1.0 (10x).

        With train_backbone the backbone's trainable parameters are appended to the
        first group: they learn at the base lr, as the backbone does in train-cam.
        """
        boundary = [p for m in self._boundary_modules() for p in m.parameters()]
        displacement = [p for m in self._displacement_modules() for p in m.parameters()]
        if self.train_backbone:
            boundary += [p for p in self.backbone.parameters() if p.requires_grad]
        return boundary, displacement

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.train_backbone:
            features = self.backbone(x)
        else:
            with torch.no_grad():  # IRN detaches the backbone features
                features = self.backbone(x)
        s4 = tuple(features["stem"].shape[-2:])
        s8 = tuple(features["layer2"].shape[-2:])

        edges = [_crop(self.boundary_levels[level](features[level]), s4) for level in LEVELS]
        boundary_logits = self.boundary_out(torch.cat(edges, dim=1))

        coarse = torch.cat(
            [
                self.disp_layer2(features["layer2"]),
                _crop(self.disp_layer3(features["layer3"]), s8),
                _crop(self.disp_layer4(features["layer4"]), s8),
            ],
            dim=1,
        )
        fine = torch.cat(
            [
                self.disp_stem(features["stem"]),
                self.disp_layer1(features["layer1"]),
                _crop(self.disp_fuse_s8(coarse), s4),
            ],
            dim=1,
        )
        displacement = self.disp_fuse_s4(fine)
        return boundary_logits, displacement


def pair_differences(displacement: Tensor, radius: int) -> Tensor:
    """δ_ij = D(i) − D(j) for every source i and neighbour j = i + d.

    displacement: (B, 2, h, w). Returns (B, 2, D, h', w') in the layout of
    path_index.path_affinity (directions(radius) order, sources of source_crop).
    """
    height, width = displacement.shape[-2:]
    rows, cols = source_crop(height, width, radius)
    source = displacement[:, :, rows, cols]
    neighbours = [
        displacement[:, :, rows.start + dy : rows.stop + dy, cols.start + dx : cols.stop + dx]
        for dy, dx in directions(radius).tolist()
    ]
    return source.unsqueeze(2) - torch.stack(neighbours, dim=2)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values where mask holds; 0 (not NaN) for an empty mask."""
    count = mask.sum().clamp(min=1)
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count


def irn_losses(
    boundary_logits: Tensor, displacement: Tensor, labels: Tensor, radius: int = 10
) -> dict[str, Tensor]:
    """IRN's training losses (docs/ALGORITHMS.md §1.5).

    boundary_logits: (B, 1, h, w); displacement: (B, 2, h, w) (dy, dx) in stride-4
    pixels; labels: (B, h, w) int64 relation labels at stride 4 (0 background, 1..C
    class, 255 unsure). radius: pair radius in stride-4 pixels (IRN: 10).
    Returns scalar losses "aff_bg_pos", "aff_fg_pos", "aff_neg", "disp_fg", "disp_bg"
    and "total" = ½(½ aff_bg_pos + ½ aff_fg_pos + aff_neg) + ½(disp_fg + disp_bg).
    Every term is a mean over its pairs (the displacement terms also over the two
    channels); a term with no pairs is 0.
    """
    size = labels.shape[-2:]
    if boundary_logits.shape[-2:] != size or displacement.shape[-2:] != size:
        raise ValueError(
            f"boundary {tuple(boundary_logits.shape)}, displacement {tuple(displacement.shape)} "
            f"and labels {tuple(labels.shape)} must share the stride-4 size"
        )
    boundary = torch.sigmoid(boundary_logits[:, 0].float())
    affinity = path_affinity(boundary, radius)  # (B, D, h', w')
    codes = pair_labels(labels, radius)
    bg_pos, fg_pos, neg = codes == BG_POS, codes == FG_POS, codes == NEG

    pos_term = -torch.log(affinity + LOG_EPS)
    neg_term = -torch.log(1.0 + LOG_EPS - affinity)
    aff_bg_pos = _masked_mean(pos_term, bg_pos)
    aff_fg_pos = _masked_mean(pos_term, fg_pos)
    aff_neg = _masked_mean(neg_term, neg)

    delta = pair_differences(displacement.float(), radius)  # (B, 2, D, h', w')
    target = torch.as_tensor(directions(radius).T, dtype=delta.dtype, device=delta.device)
    target = target[None, :, :, None, None]  # (1, 2, D, 1, 1): δ = D(i) − D(j) → j − i
    # Masks over pairs x both channels, so the means run over both channels too.
    disp_fg = _masked_mean((delta - target).abs(), fg_pos.unsqueeze(1).expand_as(delta))
    disp_bg = _masked_mean(delta.abs(), bg_pos.unsqueeze(1).expand_as(delta))

    aff_pos = 0.5 * aff_bg_pos + 0.5 * aff_fg_pos
    total = 0.5 * (aff_pos + aff_neg) + 0.5 * (disp_fg + disp_bg)
    return {
        "aff_bg_pos": aff_bg_pos,
        "aff_fg_pos": aff_fg_pos,
        "aff_neg": aff_neg,
        "disp_fg": disp_fg,
        "disp_bg": disp_bg,
        "total": total,
    }


@torch.no_grad()
def boundary_inference(
    model: IRNet, image: Tensor, *, pad_to: int | None = 512
) -> tuple[Tensor, Tensor]:
    """IRN's inference: boundary probability and displacement of one image.

    image: (3, H, W) float, normalised. The image and its horizontal flip are
    zero-padded at the bottom/right to pad_to x pad_to (IRN: 512, the training canvas;
    VOC images are <= 500), or, along a side longer than pad_to (or with pad_to None),
    up to a multiple of 4. B = sigmoid(½ logit + ½ flip(logit of the flip));
    displacement from the unflipped image only, minus model.mean_displacement.
    Returns boundary (h, w) in [0, 1] and displacement (2, h, w) (dy, dx) in stride-4
    pixels, float32 on the model's device, h, w = ⌈H/4⌉, ⌈W/4⌉.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    height, width = image.shape[-2:]
    out_h, out_w = math.ceil(height / 4), math.ceil(width / 4)

    def padded(size: int) -> int:
        if pad_to is not None and size <= pad_to:
            return pad_to
        return 4 * math.ceil(size / 4)

    device = model.mean_displacement.device
    batch = torch.stack([image, image.flip(-1)]).to(device=device, dtype=torch.float32)
    batch = F.pad(batch, (0, padded(width) - width, 0, padded(height) - height))

    was_training = model.training
    model.eval()
    try:
        logits, displacement = model(batch)
    finally:
        model.train(was_training)
    # Crop before flipping back: the padding sits at the right of both images.
    logits = logits[:, 0, :out_h, :out_w].float()
    boundary = torch.sigmoid(0.5 * logits[0] + 0.5 * logits[1].flip(-1))
    displacement = displacement[0, :, :out_h, :out_w].float()
    displacement = displacement - model.mean_displacement[:, None, None].float()
    return boundary, displacement
