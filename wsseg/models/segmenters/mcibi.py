"""MCIBI (Jin et al., "Mining Contextual Information Beyond Image for Semantic
Segmentation", ICCV 2021; docs/ALGORITHMS.md §2) on the DeepLab v3 base.

A dataset-level memory M holds one 512-d feature per class. Each image reads it through
its own coarse prediction: the pixel representation R (3x3 conv on layer4) gives
stage-1 logits (H1), their per-pixel softmax P mixes the memory into a context map
D = P·M, attention with R as query refines D, and the fused features give the final
logits (H2). Optionally (the paper's DeepLabV3 variant, sssegmentation's
`context_within_image`) the ASPP output joins through a second attention.

The memory is a buffer, not a parameter: no gradient ever reaches it. It changes only
in `after_step()`, which the training loop calls after every optimiser step:

    outputs = model(images)
    terms = model.loss(outputs, labels)          # "total" = main + 0.4 stage1 + memory + 0.4 aux
    terms["total"].backward(); optimizer.step()
    model.after_step(outputs, labels, step, max_steps)   # under DDP: model.module.after_step

The consistency loss (memory vectors through H2 must give their own class) is on once
`steps_done >= memory_loss_after_step`; the paper turns it on after the first epoch,
which is the default (None): `begin_training(steps_per_epoch, ...)`, which train-segmenter
calls before the first step, fixes it at the number of steps per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.class_ids import IGNORE
from wsseg.models.backbones import resnet
from wsseg.models.segmenters.common import (
    ASPP,
    AuxHead,
    Segmenter,
    classifier,
    conv_bn_relu,
    downsample_labels,
    head_channels,
)

# MCIBI: loss = CE(H2) + 0.4·CE(H1) + 1.0·CE(memory) + 0.4·aux (sssegmentation's config).
STAGE1_WEIGHT = 0.4
MEMORY_WEIGHT = 1.0
# Memory momentum t = 0.9·(1 − step/max_steps)^0.9: sssegmentation's base_momentum 0.9
# scaled by lr / base_lr under the poly schedule.
BASE_MOMENTUM = 0.9
MOMENTUM_POWER = 0.9
# A class whose pixels all point exactly along its memory vector has Σ(1 − cos) = 0;
# below this the update falls back to the plain mean.
_WEIGHT_EPS = 1e-12


def memory_momentum(step: int, max_steps: int) -> float:
    """t = 0.9·(1 − step/max_steps)^0.9 for the 0-based step just taken."""
    progress = min(max(step, 0), max_steps) / max(max_steps, 1)
    return BASE_MOMENTUM * (1.0 - progress) ** MOMENTUM_POWER


class Attention(nn.Module):
    """Scaled dot-product attention between two maps of the same size (sssegmentation's
    SelfAttentionBlock as MCIBI configures it).

    query: two (1x1 conv, BN, ReLU) to `transform_channels`; key: the same on the
    key/value map; value: one (1x1 conv, BN, ReLU) to `transform_channels`;
    softmax over the key map's positions of q·k / sqrt(transform_channels); the
    attended values through (1x1 conv, BN, ReLU) to `out_channels`.
    """

    def __init__(self, query_channels: int, key_channels: int, transform_channels: int,
                 out_channels: int) -> None:
        super().__init__()
        self.transform_channels = transform_channels
        self.query = nn.Sequential(conv_bn_relu(query_channels, transform_channels),
                                   conv_bn_relu(transform_channels, transform_channels))
        self.key = nn.Sequential(conv_bn_relu(key_channels, transform_channels),
                                 conv_bn_relu(transform_channels, transform_channels))
        self.value = conv_bn_relu(key_channels, transform_channels)
        self.out = conv_bn_relu(transform_channels, out_channels)

    def forward(self, query: Tensor, key_value: Tensor) -> Tensor:
        """query (B, Cq, h, w), key_value (B, Ck, h', w') -> (B, out_channels, h, w)."""
        batch, _, height, width = query.shape
        q = self.query(query).flatten(2).transpose(1, 2)              # (B, hw, T)
        k = self.key(key_value).flatten(2)                            # (B, T, h'w')
        v = self.value(key_value).flatten(2).transpose(1, 2)          # (B, h'w', T)
        weights = F.softmax((q @ k) * self.transform_channels ** -0.5, dim=-1)
        context = (weights @ v).transpose(1, 2).reshape(batch, -1, height, width)
        return self.out(context)


class MCIBI(Segmenter):
    """DeepLab v3 + MCIBI.

    Architecture (widths at ResNet-50/101 width 1; scaled with the backbone's layer4
    as every head here, `common.head_channels`):
      R  = 3x3 conv layer4 -> 512 (BN, ReLU)                         "features"
      H1 = 1x1 512 (BN, ReLU), dropout 0.1, 1x1 -> classes            "stage1"
      D  = softmax(H1)·M per pixel (B, 512, h, w); D' = Attention(R, D) (256 inside)
      F  = 3x3 conv concat(R, D') -> 512 (BN, ReLU)
      with aspp_fusion: A = ASPP(layer4) -> 512 (rates (12, 24, 36) at OS8, (6, 12, 18)
          at OS16); F = 3x3 conv concat(Attention(R, A), F) -> 512 (BN, ReLU)
      H2 = 1x1 512 (BN, ReLU), dropout 0.1, 1x1 -> classes            "out"
    plus the aux head on layer3 (weight 0.4).

    Memory: buffers `memory` (num_classes, 512) float32, zero at start, `initialised`
    (num_classes,) bool, and `steps_done` (the step count the last after_step saw), all
    saved in the state dict, none a parameter.

    Args:
        num_classes: classes including background (C + 1); one memory row each.
        depth, width: the ResNet.
        output_stride: 8 (MCIBI's setting: sssegmentation's resnet101os8 configs) or 16.
        aux: the auxiliary FCN head on layer3.
        aspp_fusion: fuse the ASPP output through a second attention (the paper's
            DeepLabV3 variant; sssegmentation's context_within_image). Default on.
        multi_grid: layer4's multi-grid; None (MCIBI's configs use a plain dilated ResNet).
        memory_loss_after_step: the consistency loss counts once `steps_done` (the number
            of steps after_step has seen) reaches this. None (the paper's "after the first
            epoch"): the number of steps per epoch that `begin_training` is given, and 0
            when a training loop of one's own never calls it.
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0,
                 output_stride: int = 8, aux: bool = True, aspp_fusion: bool = True,
                 multi_grid: Sequence[int] | None = None,
                 memory_loss_after_step: int | None = None) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"mcibi: output_stride must be 8 or 16, got {output_stride}")
        self.num_classes = num_classes
        self.memory_loss_option = memory_loss_after_step
        self.memory_loss_after_step = 0 if memory_loss_after_step is None else int(memory_loss_after_step)
        self.backbone = resnet(depth, output_stride=output_stride, width=width,
                               multi_grid=tuple(multi_grid) if multi_grid is not None else None)
        in_channels = self.backbone.channels["layer4"]
        channels = head_channels(self.backbone, 512)
        transform = head_channels(self.backbone, 256)
        self.channels = channels

        self.representation = conv_bn_relu(in_channels, channels, 3)
        self.stage1_head = _classifier_head(channels, num_classes)
        self.register_buffer("memory", torch.zeros(num_classes, channels))
        self.register_buffer("initialised", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.memory_attention = Attention(channels, channels, transform, channels)
        self.memory_fusion = conv_bn_relu(2 * channels, channels, 3)
        self.aspp_fusion = aspp_fusion
        if aspp_fusion:
            rates = tuple(r * 16 // output_stride for r in (6, 12, 18))
            self.aspp = ASPP(in_channels, channels, rates)
            self.aspp_attention = Attention(channels, channels, transform, channels)
            self.aspp_merge = conv_bn_relu(2 * channels, channels, 3)
        self.final_head = _classifier_head(channels, num_classes)
        self.aux_head = (AuxHead(self.backbone.channels["layer3"], num_classes,
                                 channels=head_channels(self.backbone, 256)) if aux else None)

    # -- forward ----------------------------------------------------------------------

    def _decode(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        layer4 = features["layer4"]
        representation = self.representation(layer4)
        stage1 = self.stage1_head(representation)
        probs = F.softmax(stage1.float(), dim=1)
        # D[b, :, i, j] = Σ_c P[b, c, i, j]·M[c]; the memory carries no gradient.
        context = torch.einsum("bchw,cd->bdhw", probs, self.memory).to(representation.dtype)
        context = self.memory_attention(representation, context)
        fused = self.memory_fusion(torch.cat([representation, context], dim=1))
        if self.aspp_fusion:
            within = self.aspp_attention(representation, self.aspp(layer4))
            fused = self.aspp_merge(torch.cat([within, fused], dim=1))
        return {"out": self.final_head(fused), "stage1": stage1, "features": representation}

    def head(self, features: dict[str, Tensor]) -> Tensor:
        return self._decode(features)["out"]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x (B, 3, H, W) -> {"out": H2 logits, "stage1": H1 logits, "aux" (with aux),
        "features": R (B, 512, h, w) for after_step, "memory_logits": (num_classes,
        num_classes) the memory rows through H2 (computed here so that every use of a
        parameter happens inside forward, as DistributedDataParallel expects)}."""
        features = self.backbone(x)
        outputs = self._decode(features)
        outputs["memory_logits"] = self.memory_logits()
        if self.aux_head is not None:
            outputs["aux"] = self.aux_head(features["layer3"])
        return outputs

    def memory_logits(self) -> Tensor:
        """The memory rows as (num_classes, 512, 1, 1) maps through H2 -> (num_classes,
        num_classes) logits, float32.

        H2's BatchNorm normalises with its running statistics and never updates them,
        also in train(): the C memory vectors are not a batch of image pixels and must
        not move the statistics; its dropout is skipped. Gradients reach H2's
        parameters, not the memory (a buffer).
        """
        conv, bn = self.final_head[0][0], self.final_head[0][1]
        x = conv(self.memory[:, :, None, None].to(conv.weight.dtype))
        x = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                         training=False, eps=bn.eps)
        return self.final_head[2](F.relu(x)).flatten(1).float()

    # -- loss -------------------------------------------------------------------------

    def begin_training(self, steps_per_epoch: int, max_steps: int) -> None:
        """The memory loss starts after the first epoch unless the option set its own step."""
        if self.memory_loss_option is None:
            self.memory_loss_after_step = int(steps_per_epoch)

    @property
    def memory_loss_active(self) -> bool:
        """Whether loss() counts the consistency term (steps_done >= memory_loss_after_step)."""
        return int(self.steps_done) >= self.memory_loss_after_step

    def loss(self, outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
        """Terms "main" (H2), "stage1" (H1), "memory" (consistency), "aux"; "total" =
        main + 0.4·stage1 + 1.0·memory + 0.4·aux. CE on logits upsampled to the labels,
        255 ignored. "memory": CE of `memory_logits` rows against their class index,
        mean over initialised classes, once `memory_loss_active`; 0 before (the key is
        always there, so per-epoch curves keep one set of names)."""
        terms = {"main": self.pixel_loss(outputs["out"], labels),
                 "stage1": self.pixel_loss(outputs["stage1"], labels)}
        memory_logits = outputs["memory_logits"]
        rows = self.initialised.nonzero().flatten()
        if self.memory_loss_active and rows.numel() > 0:
            terms["memory"] = F.cross_entropy(memory_logits[rows].float(), rows)
        else:
            # Zero with a graph: H2's parameters get a (zero) gradient either way.
            terms["memory"] = (memory_logits * 0.0).sum()
        total = terms["main"] + STAGE1_WEIGHT * terms["stage1"] + MEMORY_WEIGHT * terms["memory"]
        if "aux" in outputs:
            terms["aux"] = self.pixel_loss(outputs["aux"], labels)
            total = total + self.aux_weight * terms["aux"]
        terms["total"] = total
        return terms

    # -- memory update ----------------------------------------------------------------

    @torch.no_grad()
    def after_step(self, outputs: dict[str, Tensor], labels: Tensor, step: int, max_steps: int) -> None:
        """Update the memory from this batch's features (no grad); call after each
        optimiser step with the forward's outputs, the (B, H, W) labels, the 0-based
        step just taken and the number of steps.

        Labels are downsampled to the features' size (nearest, corner-aligned:
        `common.downsample_labels`), 255 ignored. For each class c present: if its row
        was never written, m_c = the mean of its pixels' features; else with weights
        w_i ∝ 1 − cos(f_i, m_c) over its pixels (normalised to sum 1; the plain mean if
        they sum to 0), f̄ = Σ w_i f_i and m_c ← (1 − t)·m_c + t·f̄, t = memory_momentum.

        Under torch.distributed, every rank's per-class sums (Σ f_i, the pixel count,
        Σ (1 − cos) f_i, Σ (1 − cos)) are summed with one all_reduce before the update,
        so all ranks apply the update of the whole global batch and their memories stay
        equal (sssegmentation instead averages the ranks' updated memories, which
        weights a rank that saw 10 pixels of a class like one that saw 10,000).
        """
        features = outputs["features"].detach().float()
        small = downsample_labels(labels, features.shape[-2:])
        statistics = class_statistics(features, small, self.memory, self.initialised)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(statistics)
        apply_update(self.memory, self.initialised, statistics, memory_momentum(step, max_steps))
        self.steps_done.fill_(step + 1)


def class_statistics(features: Tensor, labels: Tensor, memory: Tensor, initialised: Tensor) -> Tensor:
    """Per-class sums of one batch for the memory update; additive over batches/ranks.

    features (B, D, h, w) float32; labels (B, h, w) int64 (255 ignored); memory (C, D);
    initialised (C,) bool. Returns (C, 2D + 2) float32, per class c: [Σ f_i (D), n_c,
    Σ w_i f_i (D), Σ w_i] over its pixels i, with w_i = 1 − cos(f_i, m_c) (0 for a class
    whose row is not initialised: its first write uses the plain mean).
    """
    num_classes, dims = memory.shape
    points = features.permute(0, 2, 3, 1).reshape(-1, dims)
    classes = labels.reshape(-1)
    valid = classes != IGNORE
    if bool(((classes < 0) | (classes >= num_classes))[valid].any()):
        raise ValueError(f"labels must be in 0..{num_classes - 1} or {IGNORE}")
    points, classes = points[valid], classes[valid]
    rows = memory[classes].to(points.dtype)
    weights = 1.0 - F.cosine_similarity(points, rows, dim=1)
    weights = torch.where(initialised[classes], weights, torch.zeros_like(weights))
    statistics = torch.zeros(num_classes, 2 * dims + 2, dtype=torch.float32, device=features.device)
    statistics[:, :dims].index_add_(0, classes, points)
    statistics[:, dims].index_add_(0, classes, torch.ones_like(weights))
    statistics[:, dims + 1:2 * dims + 1].index_add_(0, classes, weights[:, None] * points)
    statistics[:, -1].index_add_(0, classes, weights)
    return statistics


def apply_update(memory: Tensor, initialised: Tensor, statistics: Tensor, momentum: float) -> None:
    """Update memory (C, D) and initialised (C,) in place from `class_statistics` sums
    (summed over ranks): see MCIBI.after_step."""
    dims = memory.shape[1]
    sums, counts = statistics[:, :dims], statistics[:, dims]
    weighted, weight_totals = statistics[:, dims + 1:2 * dims + 1], statistics[:, -1]
    present = counts > 0
    mean = sums / counts.clamp(min=1)[:, None]
    cosine_mean = torch.where((weight_totals > _WEIGHT_EPS)[:, None],
                              weighted / weight_totals.clamp(min=_WEIGHT_EPS)[:, None], mean)
    updated = (1.0 - momentum) * memory + momentum * cosine_mean
    first = present & ~initialised
    memory.copy_(torch.where(first[:, None], mean, torch.where(present[:, None], updated, memory)))
    initialised |= present


def _classifier_head(channels: int, num_classes: int) -> nn.Sequential:
    """H1/H2: 1x1 conv (BN, ReLU), dropout 0.1, 1x1 to classes (sssegmentation's
    decoder_stage1/2)."""
    return nn.Sequential(conv_bn_relu(channels, channels, 1), nn.Dropout2d(0.1),
                         classifier(channels, num_classes))
