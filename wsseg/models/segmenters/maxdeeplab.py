"""MaX-DeepLab (Wang, Zhu, Adam, Yuille, Chen, "MaX-DeepLab: End-to-End Panoptic
Segmentation with Mask Transformers", CVPR 2021; docs/ALGORITHMS.md §2, §3) on a ResNet.

N mask slots are a learned memory path next to the pixel path. Dual-path transformer
blocks after the chosen backbone stages let the memory read the pixels and itself
(M2P + M2M: one softmax over [pixels; memory]) and the pixels read the memory (P2M,
a residual on the pixel features); an FFN follows on the memory. A decoder brings the
pixels back to stride 4; the pixel head gives L2-normalised features g, the memory
heads a mask embedding f and class logits (C+1 classes and ∅ = "no object") per slot.
Mask logits are g·f per slot, batch-normalised, and a softmax over the slots makes
the masks a partition of the image: a pixel belongs to one slot.

Training targets are panoptic, one dict per image (see `MaXDeepLab.loss`):

    model = MaXDeepLab(num_classes=21, depth=50)
    outputs = model(images)              # {"out", "semantic", "mask_logits", "class_logits", "pixel_features"}
    targets = [panoptic_target(segment_ids, segments_info) for each image]   # or a (B, H, W) label tensor
    terms = model.loss(outputs, targets) # {"pq", "mask_id", "instance", "semantic", "total"}
    model.eval(); panoptic = model.predict_panoptic(images)   # [(segment ids (H, W), segments_info)]

The loss matches ground-truth masks to slots with the Hungarian algorithm on
p̂_j(c_i)·Dice(m_i, m̂_j) (scipy's linear_sum_assignment) and combines the PQ-style
loss (3.0), mask-ID cross-entropy (0.3), instance discrimination (1.0, τ = 0.3) and
the semantic head's cross-entropy (1.0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from wsseg.class_ids import IGNORE
from wsseg.models.backbones import resnet
from wsseg.models.segmenters.common import (
    Segmenter,
    classifier,
    conv_bn_relu,
    cross_entropy,
    downsample_labels,
    head_channels,
    upsample_to,
)

# Loss weights and constants of the paper (and deeplab2's MaX-DeepLab configs).
PQ_WEIGHT = 3.0
MASK_ID_WEIGHT = 0.3
INSTANCE_WEIGHT = 1.0
SEMANTIC_WEIGHT = 1.0
PQ_ALPHA = 0.75                     # weight of the matched (positive) PQ-style terms; 1 − α for ∅ terms
INSTANCE_TEMPERATURE = 0.3          # τ of the instance discrimination softmax
INITIAL_NO_OBJECT_PROBABILITY = 0.9  # p(∅) of every slot at initialisation
# Inference (the paper's post-processing).
CLASS_THRESHOLD = 0.7
PIXEL_THRESHOLD = 0.4
# The paper drops thing segments under 100 pixels on COCO; 100 px of a typical
# 640x480 COCO image, as a fraction of the image area so that it scales with the size.
MIN_AREA_FRACTION = 100 / (640 * 480)
# Denominator guard of the Dice similarity (deeplab2: 1e-5 on the mean area).
DICE_EPS = 2e-5
# A CPU-demo / test configuration (`MaXDeepLab.tiny`).
TINY = {"depth": 18, "width": 0.25, "num_slots": 16, "memory_channels": 64, "pixel_dim": 32, "num_heads": 4}


class DualPathBlock(nn.Module):
    """One dual-path transformer block between a pixel map and the memory.

    Pixel path: 1x1 conv + BN to queries (P2M) and to keys/values (M2P). Memory path:
    LayerNorm, one linear layer to queries/keys/values. All attention is multi-head
    (`num_heads`, each memory_channels/num_heads wide), scaled dot product.
      memory ← memory + Linear(softmax(q_m·[k_p; k_m]ᵀ/√d)·[v_p; v_m])   (M2P + M2M, one softmax)
      pixels ← pixels + BN(1x1 conv(softmax(q_p·k_mᵀ/√d)·v_m))           (P2M)
      memory ← memory + FFN(LayerNorm(memory))    (Linear 4x, GELU, Linear)
    Both attentions read the block's inputs (the two paths run in parallel, as in the
    paper). The P2M output's BN starts with zero scale, so a new block leaves the
    (possibly pretrained) backbone features unchanged at the start of training.
    """

    def __init__(self, pixel_channels: int, memory_channels: int, *, num_heads: int = 8) -> None:
        super().__init__()
        if memory_channels % num_heads:
            raise ValueError(f"memory_channels ({memory_channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        channels = memory_channels
        self.pixel_query = nn.Sequential(nn.Conv2d(pixel_channels, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.pixel_key_value = nn.Sequential(nn.Conv2d(pixel_channels, 2 * channels, 1, bias=False),
                                             nn.BatchNorm2d(2 * channels))
        self.memory_norm = nn.LayerNorm(channels)
        self.memory_qkv = nn.Linear(channels, 3 * channels)
        self.memory_out = nn.Linear(channels, channels)
        self.pixel_out = nn.Sequential(nn.Conv2d(channels, pixel_channels, 1, bias=False),
                                       nn.BatchNorm2d(pixel_channels))
        nn.init.zeros_(self.pixel_out[1].weight)
        self.ffn_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels))

    def _heads(self, x: Tensor) -> Tensor:
        """(B, L, D) -> (B, heads, L, D/heads)."""
        batch, length, channels = x.shape
        return x.reshape(batch, length, self.num_heads, channels // self.num_heads).transpose(1, 2)

    @staticmethod
    def _merge(x: Tensor) -> Tensor:
        """(B, heads, L, d) -> (B, L, heads·d)."""
        batch, heads, length, dims = x.shape
        return x.transpose(1, 2).reshape(batch, length, heads * dims)

    def forward(self, pixels: Tensor, memory: Tensor) -> tuple[Tensor, Tensor]:
        """pixels (B, Cp, h, w), memory (B, N, D) -> the updated pair, same shapes."""
        batch, _, height, width = pixels.shape
        q_p = self._heads(self.pixel_query(pixels).flatten(2).transpose(1, 2))            # (B, H, hw, d)
        k_p, v_p = (self._heads(t.flatten(2).transpose(1, 2))
                    for t in self.pixel_key_value(pixels).chunk(2, dim=1))
        q_m, k_m, v_m = (self._heads(t) for t in self.memory_qkv(self.memory_norm(memory)).chunk(3, dim=-1))

        # M2P + M2M: the memory attends over [pixels; memory] with one softmax.
        read = F.scaled_dot_product_attention(q_m, torch.cat([k_p, k_m], dim=2), torch.cat([v_p, v_m], dim=2))
        # P2M: every pixel attends over the memory.
        written = F.scaled_dot_product_attention(q_p, k_m, v_m)
        written = self._merge(written).transpose(1, 2).reshape(batch, -1, height, width)

        pixels = pixels + self.pixel_out(written)
        memory = memory + self.memory_out(self._merge(read))
        memory = memory + self.ffn(self.ffn_norm(memory))
        return pixels, memory


class MaXDeepLab(Segmenter):
    """MaX-DeepLab on a dilated ResNet (see the module docstring and docs/models/maxdeeplab.md).

    Args:
        num_classes: classes including background (C + 1); the class head has one more
            output, ∅ (no object), at index num_classes.
        depth, width: the ResNet.
        output_stride: 16 (default) or 8.
        aux: the semantic head (stride 4, num_classes logits, loss weight 1.0).
        num_slots: N mask slots (the paper: 128).
        memory_channels: width of the memory path and of the attention (the paper: 256).
        transformer_stages: backbone stages followed by dual-path blocks, from
            "layer3", "layer4"; a block after layer3 changes what layer4 reads.
        blocks_per_stage: dual-path blocks after each of those stages.
        num_heads: attention heads (the paper: 8).
        pixel_dim: width of the pixel features g and mask embeddings f (the paper: 128).
        decoder_channels: width of the stride-8/4 decoder; None: max(pixel_dim, 256
            scaled with layer4 as every wsseg head).
        stuff_classes: categories that are stuff (one segment per class); wsseg: (0,),
            background. Every other category is a thing.
        semantic_source: what "out" and predict() give: "masks" (default: the panoptic
            output as class scores, Σ_j m̂_j·p̂_j(c)) or "head" (the semantic head; needs aux).

    Attributes: backbone (ResNet), memory (nn.Parameter (N, memory_channels), the
    learned initial slots), blocks (nn.ModuleDict stage -> ModuleList of DualPathBlock).
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0, output_stride: int = 16,
                 aux: bool = True, num_slots: int = 128, memory_channels: int = 256,
                 transformer_stages: Sequence[str] = ("layer4",), blocks_per_stage: int = 1,
                 num_heads: int = 8, pixel_dim: int = 128, decoder_channels: int | None = None,
                 stuff_classes: Sequence[int] = (0,), semantic_source: str = "masks") -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"maxdeeplab: output_stride must be 8 or 16, got {output_stride}")
        stages = tuple(transformer_stages)
        if not stages or any(s not in ("layer3", "layer4") for s in stages):
            raise ValueError(f"maxdeeplab: transformer_stages must name 'layer3' and/or 'layer4', got {stages}")
        if semantic_source not in ("masks", "head") or (semantic_source == "head" and not aux):
            raise ValueError(f"maxdeeplab: semantic_source must be 'masks' or 'head' (which needs aux=True), "
                             f"got {semantic_source!r} with aux={aux}")
        if num_slots < 1 or blocks_per_stage < 1:
            raise ValueError("maxdeeplab: num_slots and blocks_per_stage must be >= 1")
        self.num_classes = num_classes
        self.num_slots = num_slots
        self.stuff_classes = tuple(int(c) for c in stuff_classes)
        self.semantic_source = semantic_source
        self.backbone = resnet(depth, output_stride=output_stride, width=width)
        self.aux_head = None  # the Segmenter base's layer3 head; MaX-DeepLab's aux is the semantic head
        channels = self.backbone.channels

        # Memory path: the slots' initial values are learned (one set shared by all images).
        self.memory = nn.Parameter(torch.empty(num_slots, memory_channels))
        nn.init.trunc_normal_(self.memory, std=1.0, a=-2.0, b=2.0)
        self.blocks = nn.ModuleDict({
            stage: nn.ModuleList(DualPathBlock(channels[stage], memory_channels, num_heads=num_heads)
                                 for _ in range(blocks_per_stage))
            for stage in ("layer3", "layer4") if stage in stages
        })

        # Decoder to stride 4: layer4 -> 1x1; x2 up + layer2 skip -> 3x3; x2 up + layer1 skip -> 3x3.
        decoder = decoder_channels or max(pixel_dim, head_channels(self.backbone, 256))
        self.decoder_in = conv_bn_relu(channels["layer4"], decoder, 1)
        self.skip8 = conv_bn_relu(channels["layer2"], decoder, 1)
        self.fuse8 = conv_bn_relu(decoder, decoder, 3)
        self.skip4 = conv_bn_relu(channels["layer1"], decoder, 1)
        self.fuse4 = conv_bn_relu(decoder, decoder, 3)

        # Pixel head: 3x3 conv, 1x1 to pixel_dim, BN; L2-normalised in forward.
        self.pixel_head = nn.Sequential(conv_bn_relu(decoder, decoder, 3),
                                        nn.Conv2d(decoder, pixel_dim, 1, bias=False), nn.BatchNorm2d(pixel_dim))
        # Memory heads (two FC layers each) on the layer-normalised final memory.
        self.memory_out_norm = nn.LayerNorm(memory_channels)
        self.mask_head = nn.Sequential(nn.Linear(memory_channels, memory_channels), nn.ReLU(inplace=True),
                                       nn.Linear(memory_channels, pixel_dim))
        self.class_head = nn.Sequential(nn.Linear(memory_channels, memory_channels), nn.ReLU(inplace=True),
                                        nn.Linear(memory_channels, num_classes + 1))
        last = self.class_head[-1]
        nn.init.normal_(last.weight, std=0.01)
        nn.init.zeros_(last.bias)
        with torch.no_grad():
            # e^b / (e^b + num_classes) = 0.9 with the other logits ≈ 0.
            p = INITIAL_NO_OBJECT_PROBABILITY
            last.bias[-1] = math.log(p * num_classes / (1.0 - p))
        # BN over the N mask-logit channels (the paper), before the softmax over slots.
        self.mask_norm = nn.BatchNorm2d(num_slots)
        self.semantic_head = (nn.Sequential(conv_bn_relu(decoder, decoder, 3), classifier(decoder, num_classes))
                              if aux else None)

    @classmethod
    def tiny(cls, num_classes: int, **overrides) -> MaXDeepLab:
        """The CPU demo / test size: ResNet-18 width 0.25, 16 slots, 64-d memory (4 heads),
        32-d pixel features (`TINY`); keyword arguments override any of them."""
        return cls(num_classes, **{**TINY, **overrides})

    # -- forward ----------------------------------------------------------------------

    def _encode(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Backbone stages with the dual-path blocks after their stages -> (stage
        outputs, memory (B, N, D))."""
        backbone = self.backbone
        memory = self.memory.unsqueeze(0).expand(x.shape[0], -1, -1)
        h = backbone._stem(x)
        features = {"stem": h}
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(backbone, stage)(h)
            if stage in self.blocks:
                for block in self.blocks[stage]:
                    h, memory = block(h, memory)
            features[stage] = h
        return features, memory

    def _decode(self, features: dict[str, Tensor]) -> Tensor:
        """Stage outputs -> (B, decoder_channels, h4, w4) at layer1's size (stride 4)."""
        x = self.decoder_in(features["layer4"])
        skip = self.skip8(features["layer2"])
        x = self.fuse8(upsample_to(x, skip.shape[-2:]) + skip)
        skip = self.skip4(features["layer1"])
        return self.fuse4(upsample_to(x, skip.shape[-2:]) + skip)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x (B, 3, H, W) normalised -> (all at stride 4, h4 = ⌈H/4⌉):
        "mask_logits" (B, N, h4, w4) after the BN, before the softmax over slots;
        "class_logits" (B, N, num_classes + 1), ∅ last;
        "pixel_features" g (B, pixel_dim, h4, w4), unit length per pixel;
        "semantic" (B, num_classes, h4, w4) the semantic head (with aux);
        "out" (B, num_classes, h4, w4) the semantic scores predict() upsamples
        (`semantic_source`)."""
        features, memory = self._encode(x)
        decoded = self._decode(features)
        pixel_features = F.normalize(self.pixel_head(decoded), dim=1)
        memory = self.memory_out_norm(memory)
        embeddings = self.mask_head(memory)                                   # (B, N, pixel_dim)
        mask_logits = self.mask_norm(torch.einsum("bdhw,bnd->bnhw", pixel_features, embeddings))
        outputs = {"mask_logits": mask_logits, "class_logits": self.class_head(memory),
                   "pixel_features": pixel_features}
        if self.semantic_head is not None:
            outputs["semantic"] = self.semantic_head(decoded)
        if self.semantic_source == "head":
            outputs["out"] = outputs["semantic"]
        else:
            outputs["out"] = semantic_from_masks(mask_logits, outputs["class_logits"])
        return outputs

    def head(self, features: dict[str, Tensor]) -> Tensor:  # the Segmenter hook; forward() is overridden
        raise NotImplementedError("MaXDeepLab runs its transformer inside the backbone: call forward()")

    def predict(self, x: Tensor) -> Tensor:
        """x (B, 3, H, W) -> semantic logits (B, num_classes, H, W): "out" upsampled
        bilinearly. With semantic_source "masks" these are log Σ_j m̂_j·p̂_j(c) (a softmax
        of them gives the panoptic output's class probabilities, ∅ left out and
        renormalised). Call model.eval() first."""
        return upsample_to(self(x)["out"], x.shape[-2:])

    @torch.no_grad()
    def predict_panoptic(self, x: Tensor, *, class_threshold: float = CLASS_THRESHOLD,
                         pixel_threshold: float = PIXEL_THRESHOLD,
                         min_area_fraction: float = MIN_AREA_FRACTION) -> list[tuple[np.ndarray, list[dict]]]:
        """x (B, 3, H, W) -> per image (segment ids (H, W) int64 numpy, 0 = void; segments_info).

        The mask logits are upsampled (bilinear) to H x W and softmaxed over the slots;
        see `panoptic_from_slots` for the rules; min_area = round(min_area_fraction·H·W)
        pixels (100 px of a 640x480 image by default). Call model.eval() first.
        """
        outputs = self(x)
        height, width = x.shape[-2:]
        class_probs = F.softmax(outputs["class_logits"].float(), dim=-1)
        min_area = int(round(min_area_fraction * height * width))
        results = []
        for index in range(x.shape[0]):
            logits = upsample_to(outputs["mask_logits"][index:index + 1].float(), (height, width))[0]
            results.append(panoptic_from_slots(F.softmax(logits, dim=0), class_probs[index],
                                               stuff_classes=self.stuff_classes, class_threshold=class_threshold,
                                               pixel_threshold=pixel_threshold, min_area=min_area))
        return results

    # -- loss -------------------------------------------------------------------------

    def loss(self, outputs: dict[str, Tensor],
             targets: Sequence[Mapping[str, Tensor]] | Tensor) -> dict[str, Tensor]:
        """The MaX-DeepLab losses; float32 scalars "pq", "mask_id", "instance", "semantic"
        (with aux) and "total" = 3.0·pq + 0.3·mask_id + 1.0·instance + 1.0·semantic.

        targets: one dict per image (a list of length B), at the input size H x W:
          "masks": (M, H, W) bool, the segments: one per thing instance plus one per stuff
              class present (wsseg: background); they must not overlap; M may be 0;
          "classes": (M,) int64 in 0..num_classes−1;
          "void": optional (H, W) bool, pixels to ignore. Pixels in no mask are void too.
        (`panoptic_target` builds one from a COCO-panoptic id map and segments_info.)
        A (B, H, W) int64 label tensor (255 ignored) is accepted too: every class present
        in an image is then one segment (`semantic_target`), for training on semantic labels.

        The mask terms are computed at the outputs' stride-4 size: each image's segment
        map is downsampled there (nearest, corner-aligned); a segment with no pixel left
        drops out. Per image, with m̂ the slot softmax (void pixels zeroed), Dice(i, j) =
        2|m_i·m̂_j| / (|m_i| + |m̂_j|), and σ the Hungarian matching that maximises
        Σ p̂_σ(i)(c_i)·Dice(i, σ(i)):
          pq = (1/N)·[α·Σ_i (sg(p̂)·(1 − Dice) − sg(Dice)·log p̂)
                      + (1 − α)·Σ_{j unmatched} −log p̂_j(∅)]
            (p̂ = p̂_σ(i)(c_i), Dice = Dice(i, σ(i)); α = 0.75; sg = stop-gradient; the
            paper's −sg(p̂)·Dice plus sg(p̂), a constant for the gradient, so that a
            perfect prediction scores 0), mean over images;
          mask_id: cross-entropy of the slot softmax against the slot matched to the pixel's
            segment, mean over pixels (void pixels and unmatched segments excluded);
          instance: per thing pixel, cross-entropy of g·t_i/τ over the image's segments i
            (t_i = the L2-normalised mean of g over segment i, τ = 0.3), mean over pixels;
          semantic: cross-entropy of the semantic head (upsampled to H x W) against the
            segments' classes, void 255.
        """
        mask_logits = outputs["mask_logits"].float()
        class_logits = outputs["class_logits"].float()
        features = outputs["pixel_features"].float()
        batch, num_slots, height, width = mask_logits.shape
        if isinstance(targets, Tensor):
            targets = [semantic_target(labels) for labels in targets]
        if len(targets) != batch:
            raise ValueError(f"loss: {len(targets)} targets for a batch of {batch} images")
        log_masks = F.log_softmax(mask_logits, dim=1).flatten(2)              # (B, N, P)
        log_classes = F.log_softmax(class_logits, dim=-1)                     # (B, N, K+1)
        zero = mask_logits.sum() * 0.0  # keeps a graph when a term has no pixel
        pq_terms, semantic_labels = [], []
        mask_id_sum, mask_id_count = zero, 0
        instance_sum, instance_count = zero, 0
        stuff = torch.tensor(self.stuff_classes, dtype=torch.long, device=mask_logits.device)

        for index, target in enumerate(targets):
            segments, classes, labels = prepare_target(target, (height, width), self.num_classes,
                                                       mask_logits.device, f"targets[{index}]")
            semantic_labels.append(labels)
            log_mask, log_class = log_masks[index], log_classes[index]
            valid = segments >= 0
            onehot = F.one_hot(segments.clamp(min=0), max(len(classes), 1)).T[:len(classes)].float()
            onehot = onehot * valid                                              # (M, P)
            masks = log_mask.exp() * valid                                       # (N, P), void zeroed
            dice = dice_similarity(onehot, masks)                                # (M, N)
            class_log_probs = log_class[:, classes].T                            # (M, N)
            gt_index, slot_index = hungarian_match(class_log_probs.exp() * dice)

            # PQ-style loss.
            matched_dice = dice[gt_index, slot_index]
            matched_log_prob = class_log_probs[gt_index, slot_index]
            positive = (matched_log_prob.exp().detach() * (1.0 - matched_dice)
                        - matched_dice.detach() * matched_log_prob).sum()
            unmatched = torch.ones(num_slots, dtype=torch.bool, device=mask_logits.device)
            unmatched[slot_index] = False
            negative = -log_class[unmatched, -1].sum()
            pq_terms.append((PQ_ALPHA * positive + (1.0 - PQ_ALPHA) * negative) / num_slots)

            if len(classes) == 0:
                continue  # no segment: only the ∅ terms above
            # Mask-ID cross-entropy: the slot matched to each pixel's segment.
            slot_of_segment = torch.full((len(classes),), -1, dtype=torch.long, device=mask_logits.device)
            slot_of_segment[gt_index] = slot_index
            pixel_slot = torch.where(valid, slot_of_segment[segments.clamp(min=0)], -1)
            pixels = (pixel_slot >= 0).nonzero().flatten()
            mask_id_sum = mask_id_sum - log_mask[pixel_slot[pixels], pixels].sum()
            mask_id_count += pixels.numel()

            # Instance discrimination: thing pixels against every segment's mean feature.
            pixel_features = features[index].flatten(1)                          # (D, P)
            centres = F.normalize(onehot @ pixel_features.T / onehot.sum(1, keepdim=True), dim=1)
            thing = valid & ~torch.isin(classes, stuff)[segments.clamp(min=0)]
            anchors = thing.nonzero().flatten()
            similarity = pixel_features[:, anchors].T @ centres.T / INSTANCE_TEMPERATURE
            instance_sum = instance_sum + F.cross_entropy(similarity, segments[anchors], reduction="sum")
            instance_count += anchors.numel()

        terms = {"pq": torch.stack(pq_terms).mean(),
                 "mask_id": mask_id_sum / max(mask_id_count, 1),
                 "instance": instance_sum / max(instance_count, 1)}
        total = PQ_WEIGHT * terms["pq"] + MASK_ID_WEIGHT * terms["mask_id"] + INSTANCE_WEIGHT * terms["instance"]
        if "semantic" in outputs:
            terms["semantic"] = cross_entropy(outputs["semantic"], torch.stack(semantic_labels))
            total = total + SEMANTIC_WEIGHT * terms["semantic"]
        terms["total"] = total
        return terms


# -- pure helpers ---------------------------------------------------------------------

def semantic_from_masks(mask_logits: Tensor, class_logits: Tensor) -> Tensor:
    """Panoptic output -> semantic scores: log Σ_j m̂_j(x)·p̂_j(c) for the real classes c
    (∅ dropped), with m̂ the softmax of mask_logits (B, N, h, w) over slots and p̂ the
    softmax of class_logits (B, N, K+1). Returns (B, K, h, w) float32 (floored at
    log 1e-12); a softmax over K renormalises them to class probabilities."""
    masks = F.softmax(mask_logits.float(), dim=1)
    classes = F.softmax(class_logits.float(), dim=-1)[..., :-1]
    return torch.einsum("bnhw,bnc->bchw", masks, classes).clamp(min=1e-12).log()


def dice_similarity(gt: Tensor, pred: Tensor) -> Tensor:
    """gt (M, P) 0/1 masks, pred (N, P) soft masks in [0, 1] -> (M, N) Dice coefficients
    2·|g·p| / (|g| + |p|) (DICE_EPS in the denominator)."""
    intersection = gt @ pred.T
    return 2.0 * intersection / (gt.sum(1, keepdim=True) + pred.sum(1)[None, :] + DICE_EPS)


def hungarian_match(similarity: Tensor) -> tuple[Tensor, Tensor]:
    """The one-to-one assignment of ground-truth rows to slot columns that maximises the
    summed similarity (M, N) (scipy's linear_sum_assignment, exact). Returns
    (gt_index, slot_index), int64 on similarity's device, min(M, N) pairs, gt_index
    ascending. With M > N, M − N ground-truth rows stay unmatched."""
    device = similarity.device
    if similarity.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    rows, cols = linear_sum_assignment(similarity.detach().float().cpu().numpy(), maximize=True)
    return (torch.as_tensor(rows, dtype=torch.long, device=device),
            torch.as_tensor(cols, dtype=torch.long, device=device))


def prepare_target(target: Mapping[str, Tensor], size: Sequence[int], num_classes: int,
                   device: torch.device, name: str = "target") -> tuple[Tensor, Tensor, Tensor]:
    """One image's panoptic target -> (segments (h·w,) int64 at `size`, −1 = void;
    classes (M',) int64 of the segments still present there, which `segments` indexes;
    semantic labels (H, W) int64 at full size, 255 = void).

    Raises ValueError for overlapping masks, wrong shapes or classes outside
    0..num_classes−1. The downsampling is nearest, corner-aligned (`downsample_labels`).
    """
    masks = torch.as_tensor(target["masks"], device=device).bool()
    classes = torch.as_tensor(target["classes"], device=device).long().reshape(-1)
    if masks.dim() != 3 or masks.shape[0] != classes.numel():
        raise ValueError(f"{name}: masks must be (M, H, W) with M = len(classes), got {tuple(masks.shape)} "
                         f"and {classes.numel()} classes")
    if classes.numel() and (int(classes.min()) < 0 or int(classes.max()) >= num_classes):
        raise ValueError(f"{name}: classes must lie in 0..{num_classes - 1}, got {classes.tolist()}")
    coverage = masks.sum(0)
    if bool((coverage > 1).any()):
        raise ValueError(f"{name}: masks overlap on {int((coverage > 1).sum())} pixels; panoptic segments "
                         f"must not overlap")
    if classes.numel():
        segment_map = torch.where(coverage > 0, masks.long().argmax(0), -1)
    else:
        segment_map = torch.full(masks.shape[1:], -1, dtype=torch.long, device=device)
    void = target.get("void")
    if void is not None:
        void = torch.as_tensor(void, device=device).bool()
        if void.shape != segment_map.shape:
            raise ValueError(f"{name}: void is {tuple(void.shape)}, masks are {tuple(segment_map.shape)}")
        segment_map = torch.where(void, -1, segment_map)
    labels = torch.where(segment_map >= 0, classes[segment_map.clamp(min=0)] if classes.numel() else segment_map,
                         IGNORE)
    small = downsample_labels(segment_map, size).reshape(-1)
    present = torch.zeros(classes.numel() + 1, dtype=torch.bool, device=device)
    present[small + 1] = True
    present = present[1:]
    renumber = torch.cumsum(present.long(), 0) - 1
    segments = torch.where(small >= 0, renumber[small.clamp(min=0)] if classes.numel() else small, -1)
    return segments, classes[present], labels


def panoptic_target(segment_ids: np.ndarray | Tensor, segments_info: Sequence[Mapping],
                    void: np.ndarray | Tensor | None = None) -> dict[str, Tensor]:
    """A COCO-panoptic image (segment id map (H, W), 0 = VOID, and its segments_info
    with "id", "category_id" and optional "iscrowd") -> the loss's target dict
    {"masks" (M, H, W) bool, "classes" (M,) int64, "void" (H, W) bool}. Crowd
    segments, ids without an info entry and `void` pixels become void."""
    ids = torch.as_tensor(np.asarray(segment_ids), dtype=torch.long)
    kept = [info for info in segments_info if not info.get("iscrowd", 0)]
    masks = torch.stack([ids == int(info["id"]) for info in kept]) if kept else torch.zeros(0, *ids.shape,
                                                                                           dtype=torch.bool)
    classes = torch.tensor([int(info["category_id"]) for info in kept], dtype=torch.long)
    void_mask = ~masks.any(0) if kept else torch.ones(ids.shape, dtype=torch.bool)
    if void is not None:
        void_mask |= torch.as_tensor(np.asarray(void), dtype=torch.bool)
    return {"masks": masks, "classes": classes, "void": void_mask}


def semantic_target(labels: Tensor) -> dict[str, Tensor]:
    """A semantic label map (H, W) int64 (255 ignored) -> a target dict with one segment
    per class present (no instances), for training on semantic labels."""
    present = [int(c) for c in torch.unique(labels) if int(c) != IGNORE]
    masks = torch.stack([labels == c for c in present]) if present else torch.zeros(
        0, *labels.shape, dtype=torch.bool, device=labels.device)
    return {"masks": masks, "classes": torch.tensor(present, dtype=torch.long, device=labels.device),
            "void": labels == IGNORE}


def panoptic_from_slots(mask_probs: Tensor, class_probs: Tensor, *, stuff_classes: Sequence[int] = (0,),
                        class_threshold: float = CLASS_THRESHOLD, pixel_threshold: float = PIXEL_THRESHOLD,
                        min_area: int = 0) -> tuple[np.ndarray, list[dict]]:
    """One image's slots -> (segment ids (H, W) int64 numpy, 0 = void; segments_info).

    mask_probs (N, H, W): the softmax over slots per pixel; class_probs (N, K+1), ∅ last.
    1. A slot is kept when its best real class has probability >= class_threshold; that
       class is its category.
    2. Each pixel goes to the kept slot with the highest mask probability; if that
       probability (of the softmax over all N slots) is < pixel_threshold, it is void.
    3. A thing slot with fewer than min_area pixels is dropped (its pixels void).
    4. All kept slots of a stuff category form one segment.
    Thing segments get ids 1, 2, ... in slot order, then one id per stuff category in
    ascending order. segments_info: {"id", "category_id", "iscrowd": 0, "isthing" (0/1),
    "area" (pixels)} per segment, every segment non-empty.
    """
    height, width = mask_probs.shape[-2:]
    ids = np.zeros((height, width), dtype=np.int64)
    info: list[dict] = []
    scores, categories = class_probs[:, :-1].max(dim=1)
    kept = (scores >= class_threshold).nonzero().flatten()
    if kept.numel() == 0:
        return ids, info
    best_prob, best = mask_probs[kept].max(dim=0)
    owner = torch.where(best_prob >= pixel_threshold, best, -1).cpu().numpy()
    stuff = {int(c) for c in stuff_classes}
    stuff_regions: dict[int, np.ndarray] = {}
    for position, slot in enumerate(kept.tolist()):
        region = owner == position
        area = int(region.sum())
        category = int(categories[slot])
        if area == 0:
            continue
        if category in stuff:
            stuff_regions[category] = stuff_regions.get(category, np.zeros_like(region)) | region
            continue
        if area < min_area:
            continue
        segment = len(info) + 1
        ids[region] = segment
        info.append({"id": segment, "category_id": category, "iscrowd": 0, "isthing": 1, "area": area})
    for category in sorted(stuff_regions):
        segment = len(info) + 1
        region = stuff_regions[category]
        ids[region] = segment
        info.append({"id": segment, "category_id": category, "iscrowd": 0, "isthing": 0, "area": int(region.sum())})
    return ids, info
