"""The CAM network of IRN (Ahn et al., CVPR 2019), ReCAM (Chen et al., CVPR 2022),
and the multi-scale + flip CAM inference of IRN's make_cam.

The network is a ResNet, global average pooling and a bias-free 1x1 conv classifier.
Its class activation map for class k is ReLU(w_k . f(x, y)) over the layer4 features:
the classifier applied before the pooling. IRN's backbone is
ResNet(strides=(1, 2, 2, 1)) with no dilation: output stride 16.

ReCAM adds a second bias-free classifier. During its extra training epochs every
present class k gets a class-specific feature, the spatial mean of
(CAM_k / max CAM_k) * features, and the second classifier must tell which class the
feature belongs to (softmax cross-entropy). ReCAM's map uses the elementwise product
of both classifiers' weights. A training loop does:

    logits, recam_logits = model(images, with_recam=True)
    loss = cam_loss(logits, tags) + recam_weight * recam_loss(recam_logits, tags)

Everything that has parameters runs inside forward(), so DistributedDataParallel sees
the second classifier's gradients.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.models.backbones import ResNet, fold_batchnorm

# IRN divides each CAM channel by its spatial max plus this (make_cam, ReCAM's features).
_MAX_EPS = 1e-5
# On CPU, multiscale_cams runs an image and its flip as one batch of 2 up to this many
# pixels per image and as two batch-1 passes above. A batch of 2 saves per-call overhead
# on small inputs (1.1-1.8x below ~65k pixels), is about even from 190k pixels up (0.9-1.1x
# at 420k-750k; folded ResNet-50, docs/BENCHMARKS.md make-cam) and doubles the activations.
CPU_PAIR_MAX_PIXELS = 250_000


class FickleHead(nn.Module):
    """FickleNet's classifier (Lee et al., CVPR 2019): each position is classified from the k x k
    window of features around it, with hidden units of the window dropped at random, the
    centre never. Trained with the dropout on; at inference many random selections give many
    maps, whose union (per-pixel max) is the localisation map.

    Written as a k x k bias-free convolution whose input is masked afresh for every output
    position and window offset, one offset at a time (no k^2-times expanded feature map); kept
    units are scaled by 1 / (1 - dropout) as in ordinary dropout. Without dropout it is the
    plain k x k convolution.
    """

    def __init__(self, in_channels: int, num_classes: int, *, window: int = 9, dropout: float = 0.9) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"FickleNet's window must be odd and positive, got {window}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"FickleNet's dropout must lie in [0, 1), got {dropout}")
        self.window, self.dropout = window, dropout
        self.weight = nn.Parameter(torch.empty(num_classes, in_channels, window, window))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # PyTorch's default conv init

    def forward(self, features: Tensor, keys: Tensor | None = None, *, stochastic: bool,
                generator: torch.Generator | None = None) -> Tensor:
        """features (B, D, h, w) -> class scores (B, K, h, w) (pre-ReLU) of the classes `keys` (all if None)."""
        weight = (self.weight if keys is None else self.weight[keys]).to(features.dtype)
        if not stochastic or self.dropout == 0.0:
            return F.conv2d(features, weight, padding=self.window // 2)
        pad, (height, width) = self.window // 2, features.shape[-2:]
        padded = F.pad(features, (pad, pad, pad, pad))
        keep = 1.0 - self.dropout
        scores = features.new_zeros((features.shape[0], weight.shape[0], height, width))
        for dy in range(self.window):
            for dx in range(self.window):
                shifted = padded[:, :, dy : dy + height, dx : dx + width]
                if (dy, dx) != (pad, pad):  # the centre is never dropped
                    mask = torch.rand(shifted.shape, generator=generator, device=shifted.device) < keep
                    shifted = shifted * mask / keep
                scores = scores + F.conv2d(shifted, weight[:, :, dy : dy + 1, dx : dx + 1])
        return scores


def pool_scores(maps: Tensor, pooling: str = "gap", r: float = 5.0) -> Tensor:
    """Class maps (B, K, h, w) -> class scores (B, K): gap = the spatial mean (the CAM paper's and
    IRN's), gmp = the spatial max, lse = (1/r) log mean exp(r x) (Pinheiro & Collobert), which
    tends to gap as r -> 0 and to gmp as r grows."""
    flat = maps.flatten(2)
    if pooling == "gap":
        return flat.mean(dim=2)
    if pooling == "gmp":
        return flat.amax(dim=2)
    if pooling == "lse":
        return (torch.logsumexp(r * flat, dim=2) - math.log(flat.shape[2])) / r
    raise ValueError(f"unknown pooling {pooling!r}: gap, gmp or lse")


class CAMNet(nn.Module):
    """ResNet + GAP + 1x1 classifier (no bias); optionally ReCAM's second classifier.

    Args:
        backbone: a ResNet (IRN: ResNet(50, strides=(1, 2, 2, 1), frozen_bn=True,
            trainable=("layer3", "layer4"))).
        num_classes: number of foreground classes C (channel k is 0-based class k).
        recam: add ReCAM's classifier (`recam_classifier`); cams() then returns
            ReCAM's map by default.
        pooling, pooling_r: how every head's class map becomes its training score
            (pool_scores; IRN: gap).
    """

    def __init__(self, backbone: ResNet, num_classes: int, *, recam: bool = False,
                 dilations: Sequence[int] = (), fickle_window: int = 0, fickle_dropout: float = 0.9,
                 pooling: str = "gap", pooling_r: float = 5.0) -> None:
        super().__init__()
        pool_scores(torch.zeros(1, 1, 1, 1), pooling, pooling_r)  # an unknown pooling fails here, not in training
        self.pooling, self.pooling_r = pooling, pooling_r
        self.backbone = backbone
        self.num_classes = num_classes
        self.recam = recam
        self.dilations = tuple(int(d) for d in dilations)
        if sum((recam, bool(self.dilations), fickle_window > 0)) > 1:
            raise ValueError("ReCAM, multi-dilated heads and FickleNet do not combine: choose one")
        features = backbone.channels["layer4"]
        # FickleNet replaces the 1x1 classifier's role: its k x k stochastic head classifies
        self.fickle = FickleHead(features, num_classes, window=fickle_window, dropout=fickle_dropout) if fickle_window else None
        # PyTorch's default conv init, as in IRN (only the backbone gets kaiming init).
        self.classifier = nn.Conv2d(features, num_classes, 1, bias=False)
        if self.fickle is not None:
            self.classifier.requires_grad_(False)  # unused: kept out of the optimiser and of DDP's reduction
        self.recam_classifier = nn.Conv2d(features, num_classes, 1, bias=False) if recam else None
        # Multi-dilated CAM (Wei et al., CVPR 2018): 3x3 classification heads of larger dilation
        # beside the 1x1 one; each is trained with its own loss, and the map adds their mean.
        self.dilated = nn.ModuleList(nn.Conv2d(features, num_classes, 3, padding=d, dilation=d, bias=False)
                                     for d in self.dilations)

    def forward(self, x: Tensor, *, with_recam: bool = False, branches: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, 3, H, W) normalised -> logits (B, C).

        branches=True returns every classification head's logits, (B, 1 + len(dilations), C):
        the 1x1 head's first, then each dilated head's (the GAP of its map), for a loss on
        each; without it a multi-dilated model's logits are the mean over its heads.

        with_recam=True returns (logits, recam_logits): recam_logits (B, C, C)[b, k] are
        the second classifier's C logits for image b's class-k feature, the spatial mean
        of (CAM_k / (max CAM_k + 1e-5)) * layer4 features (ReCAM; gradients flow through
        the CAM and its max). Use them with recam_loss().
        """
        features = self.backbone(x)["layer4"]
        pool = functools.partial(pool_scores, pooling=self.pooling, r=self.pooling_r)
        if self.fickle is not None:  # dropout on in training only: eval() gives the deterministic scores
            logits = pool(self.fickle(features, stochastic=self.training))
            return logits[:, None] if branches else logits
        if self.pooling == "gap":  # the classifier is linear: pooling the features first is the same, and cheaper
            logits = self.classifier(features.mean(dim=(2, 3), keepdim=True)).flatten(1)
        else:
            logits = pool(self.classifier(features))
        if self.dilations:
            heads = [logits] + [pool(head(features)) for head in self.dilated]
            stacked = torch.stack(heads, dim=1)
            return stacked if branches else stacked.mean(dim=1)
        if branches:
            return logits[:, None]
        if not with_recam:
            return logits
        if self.recam_classifier is None:
            raise ValueError("with_recam=True needs a CAMNet built with recam=True")
        cams = F.relu(F.conv2d(features, self.classifier.weight))
        cams = cams / (cams.amax(dim=(2, 3), keepdim=True) + _MAX_EPS)
        # mean_hw(cam[b,k] * f[b,d]) as one batched matmul: (B, C, HW) @ (B, HW, D),
        # instead of ReCAM's (B, C, D, H, W) broadcast product.
        class_features = torch.bmm(cams.flatten(2), features.flatten(2).transpose(1, 2))
        class_features = class_features / features[0, 0].numel()
        recam_logits = F.linear(class_features, self.recam_classifier.weight.flatten(1))
        return logits, recam_logits

    def cam_weight(self, *, recam: bool | None = None) -> Tensor:
        """The (C, D, 1, 1) 1x1-conv weight whose ReLU'd response is the CAM.

        recam None follows the model (recam=True: ReCAM's elementwise product of both
        classifiers' weights); False gives the plain CAM of a ReCAM model.
        """
        use_recam = self.recam if recam is None else recam
        if not use_recam:
            return self.classifier.weight
        if self.recam_classifier is None:
            raise ValueError("recam=True needs a CAMNet built with recam=True")
        return self.classifier.weight * self.recam_classifier.weight

    def class_maps(self, features: Tensor, keys: Tensor | None = None, *, recam: bool | None = None,
                   dilated: bool = True, samples: int = 0, generator: torch.Generator | None = None) -> Tensor:
        """layer4 features (B, D, h, w) -> CAMs (B, K, h, w) >= 0 of the classes `keys` (all if None).

        The 1x1 head's ReLU'd map (ReCAM's when `recam`, see cam_weight); with dilated heads
        (and `dilated`), plus the mean of their ReLU'd maps (Wei et al.'s H = H_1 + mean(H_3, H_6, H_9)).
        A FickleNet model: its head's ReLU'd scores without dropout, or with `samples` > 0 the
        per-pixel maximum over that many random selections (FickleNet's union of maps)."""
        if self.fickle is not None:
            if samples <= 0:
                return F.relu(self.fickle(features, keys, stochastic=False))
            maps = F.relu(self.fickle(features, keys, stochastic=True, generator=generator))
            for _ in range(samples - 1):
                maps = torch.maximum(maps, F.relu(self.fickle(features, keys, stochastic=True, generator=generator)))
            return maps
        weight = self.cam_weight(recam=recam)
        weight = (weight if keys is None else weight[keys]).to(features.dtype)
        maps = F.relu(F.conv2d(features, weight))
        if self.dilations and dilated:
            extra = torch.zeros_like(maps)
            for dilation, head in zip(self.dilations, self.dilated):
                head_weight = (head.weight if keys is None else head.weight[keys]).to(features.dtype)
                extra += F.relu(F.conv2d(features, head_weight, padding=dilation, dilation=dilation))
            maps = maps + extra / len(self.dilations)
        return maps

    def cams(self, x: Tensor, *, recam: bool | None = None) -> Tensor:
        """x (B, 3, H, W) -> CAMs (B, C, h, w) >= 0 at the backbone's output stride."""
        return self.class_maps(self.backbone(x)["layer4"], recam=recam)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone parameters that learn, head parameters) for the 1x / 10x learning rates.

        The heads are `classifier` and, with recam, `recam_classifier` (last). ReCAM's
        recipe gives the classifier the backbone's rate and only `recam_classifier` the
        full rate: take `model.recam_classifier.weight` out of the second list for that.
        """
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        heads = [p for p in self.classifier.parameters() if p.requires_grad] if self.fickle is None else []
        heads += [p for p in self.dilated.parameters() if p.requires_grad]
        heads += [p for p in self.fickle.parameters() if p.requires_grad] if self.fickle is not None else []
        if self.recam_classifier is not None:
            heads += [p for p in self.recam_classifier.parameters() if p.requires_grad]
        return backbone, heads


def cam_loss(logits: Tensor, tags: Tensor) -> Tensor:
    """Multi-label soft margin loss: sigmoid BCE averaged over classes and the batch.

    logits (B, C) float, or (B, N, C) for N classification heads (the mean of their
    losses); tags (B, C) multi-hot 0/1 (any dtype). Computed in float32.
    """
    tags = tags.to(torch.float32)
    if logits.dim() == 3:
        tags = tags[:, None].expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits.float(), tags)


def recam_loss(recam_logits: Tensor, tags: Tensor) -> Tensor:
    """ReCAM's softmax cross-entropy on class-specific features.

    recam_logits (B, C, C) from `model(x, with_recam=True)`; tags (B, C) multi-hot.
    For every image, the cross-entropy of each present class's feature against its
    class index, averaged over the image's present classes; summed over images and
    divided by the batch size B (images without tags count as 0, as in ReCAM's code).
    """
    batch = recam_logits.shape[0]
    present = tags > 0.5
    image_index, class_index = present.nonzero(as_tuple=True)
    if image_index.numel() == 0:
        return recam_logits.float().sum() * 0.0
    per_pair = F.cross_entropy(recam_logits[image_index, class_index].float(), class_index,
                               reduction="none")
    classes_per_image = present.sum(dim=1).to(per_pair.dtype)
    return (per_pair / classes_per_image[image_index]).sum() / batch


def inference_network(model: CAMNet, *, channels_last: bool) -> CAMNet:
    """An inference-only copy of the CAM network for per-image inference (make-cam).

    The backbone's BatchNorms are folded into its convs (backbones.fold_batchnorm; on CPU
    the ReLUs and residual adds run inside the convs), optionally in channels_last (on
    CPU it pays at every size measured; on CUDA follow run.channels_last). The copy
    computes what model.eval() computes up to float32 rounding, cannot train, and leaves
    `model` (the trained weights) untouched. Build it once per stage, not per image.
    """
    # A copy of the classifiers with the folded backbone in place of the backbone (see fold_batchnorm).
    prepared = copy.deepcopy(model, memo={id(model.backbone): fold_batchnorm(model.backbone, channels_last=channels_last)})
    prepared.requires_grad_(False)
    return prepared.eval()


def rescaled(image: Tensor, scale: float) -> tuple[Tensor, tuple[int, int]]:
    """A (3, H, W) image as a batch of one (1, 3, h, w) at `scale` (bicubic with antialiasing,
    like IRN's PIL resize), and its size."""
    height, width = image.shape[1:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    scaled = image[None].float()
    if size != (height, width):
        scaled = F.interpolate(scaled, size=size, mode="bicubic", align_corners=False, antialias=True)
    return scaled, size


class _ScaleSum:
    """IRN's make_cam bookkeeping for one image (3, H, W): per-scale maps added at stride 4
    (`cam`, ceil(H/4) x ceil(W/4)) and at the size padded to a multiple of 16 (`high_res`),
    then cropped to H x W and divided by their max."""

    def __init__(self, image: Tensor, num_keys: int) -> None:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
        self.image = image
        self.height, self.width = image.shape[1:]
        self.small_size = (math.ceil(self.height / 4), math.ceil(self.width / 4))
        self.padded_size = (math.ceil(self.height / 16) * 16, math.ceil(self.width / 16) * 16)
        self.cam = torch.zeros((num_keys, *self.small_size), device=image.device)
        self.high_res = torch.zeros((num_keys, *self.padded_size), device=image.device)

    def scaled(self, scale: float) -> tuple[Tensor, tuple[int, int]]:
        return rescaled(self.image, scale)

    def add(self, summed: Tensor, index: int | None = None) -> None:
        """Add one scale's flip-summed maps (K, h, w), or one class's (h, w) map at `index`."""
        batch = summed[None] if index is None else summed[None, None]
        small = F.interpolate(batch, size=self.small_size, mode="bilinear", align_corners=False)[0]
        high = F.interpolate(batch, size=self.padded_size, mode="bilinear", align_corners=False)[0]
        if index is None:
            self.cam += small
            self.high_res += high
        else:
            self.cam[index] += small[0]
            self.high_res[index] += high[0]

    def result(self) -> tuple[Tensor, Tensor]:
        high_res = self.high_res[:, : self.height, : self.width]
        cam = self.cam / (self.cam.amax(dim=(1, 2), keepdim=True) + _MAX_EPS)
        return cam, high_res / (high_res.amax(dim=(1, 2), keepdim=True) + _MAX_EPS)


def multiscale_cams(model: CAMNet, image: Tensor, keys: Tensor,
                    scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0), *,
                    recam: bool | None = None, dilated: bool = True, samples: int = 0,
                    generator: torch.Generator | None = None,
                    amp_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """IRN's make_cam for one image: multi-scale, flip-summed, max-normalised CAMs.

    Args:
        model: the CAM network, on the image's device (switched to eval() for the call,
            its mode restored after); its `inference_network` copy gives the same CAMs faster.
        image: (3, H, W) float, ImageNet-normalised.
        keys: (K,) int64 0-based present classes; the output channels, in this order.
        scales: image scales (IRN: 1.0, 0.5, 1.5, 2.0).
        recam: None follows the model; see CAMNet.cam_weight.
        dilated: False leaves a multi-dilated model's dilated heads out (its plain 1x1 map).
        samples, generator: a FickleNet model's stochastic inference (see CAMNet.class_maps); each
            of the image and its flip draws its own selections.
        amp_dtype: run the backbone under torch.autocast with this dtype (e.g.
            torch.bfloat16 on CUDA); the sums are float32.

    Returns:
        cam: (K, ceil(H/4), ceil(W/4)) float32, stride-4 pixels.
        high_res: (K, H, W) float32.
        Each channel divided by its own spatial max + 1e-5 (so its max is ~1, or 0 for
        an all-zero map). For every scale s the image is resized to round(s*H) x
        round(s*W) (bicubic with antialiasing, like IRN's PIL resize); the image and
        its horizontal flip give CAM(img) + flip(CAM(flip)), computed as one batch of 2
        (on CPU only up to CPU_PAIR_MAX_PIXELS pixels, else two batch-1 passes).
        `cam` sums every scale's map resized (bilinear, align_corners=False) to
        ceil(H/4) x ceil(W/4); `high_res` sums them resized to
        (ceil(H/16)*16, ceil(W/16)*16) and crops to H x W.
    """
    device = image.device
    keys = keys.to(device=device, dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            total = _ScaleSum(image, keys.numel())
            if keys.numel() == 0:
                return total.result()
            for scale in scales:
                scaled, size = total.scaled(scale)
                autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                            else contextlib.nullcontext())
                with autocast:
                    if device.type != "cpu" or size[0] * size[1] <= CPU_PAIR_MAX_PIXELS:
                        features = model.backbone(torch.cat([scaled, scaled.flip(-1)]))["layer4"]
                    else:
                        features = torch.cat([model.backbone(scaled)["layer4"],
                                              model.backbone(scaled.flip(-1))["layer4"]])
                maps = model.class_maps(features.float(), keys, recam=recam, dilated=dilated, samples=samples,
                                        generator=generator)
                total.add(maps[0] + maps[1].flip(-1))
            cam, high_res = total.result()
    finally:
        model.train(was_training)
    # Clones outside inference mode are ordinary tensors the caller may edit in place.
    return cam.clone(), high_res.clone()


def advcam_maps(model: CAMNet, image: Tensor, keys: Tensor, scales: Sequence[float] = (1.0, 0.5, 1.5, 2.0), *,
                steps: int = 27, step_size: float = 0.08, mask_threshold: float = 0.5,
                regularisation: float = 7.0) -> tuple[Tensor, Tensor]:
    """AdvCAM (Lee et al., CVPR 2021): CAMs accumulated over anti-adversarial image manipulation.

    For every scale and present class c, the image and its flip (one batch of 2) are moved
    `steps` times along the normalised gradient of
        y_c - sum_{k != c} y_k - regularisation * || M * |CAM_c(x_t) - CAM_c(x_0)| ||_1
    (y: the spatial mean of the ReLU'd class maps, both images; CAM_c: the flip-summed map of
    class c; M: where CAM_c(x_t) exceeds `mask_threshold` of its max, so regions that are
    already high do not grow further), x_{t+1} = x_t + step_size * grad / max|grad|, kept
    within the image's value range. The map of class c at that scale is the sum of CAM_c over
    the steps (x_0 included). Scales below 1 take half the steps when there are more than 10
    (as AdvCAM's code does for its 0.5 scale). Resizing, summing over scales and the max
    normalisation are multiscale_cams'; so are the arguments and the returned (cam,
    high_res). The model's own parameters get no gradient. Cost: about `steps` forward and
    backward passes of a batch of 2 per scale and class.
    """
    total = _ScaleSum(image, keys.numel())
    keys = keys.to(device=image.device, dtype=torch.long)
    if keys.numel() == 0:
        return total.result()
    was_training = model.training
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for scale in scales:
                scaled, _ = total.scaled(scale)
                pair = torch.cat([scaled, scaled.flip(-1)]).detach()
                scale_steps = steps // 2 if scale < 1 and steps > 10 else steps
                for index, key in enumerate(keys.tolist()):
                    summed, _ = anti_adversarial_climb(model, pair, key, scale_steps, step_size=step_size,
                                                       mask_threshold=mask_threshold, regularisation=regularisation)
                    total.add(summed, index)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    cam, high_res = total.result()
    return cam.detach(), high_res.detach()


def anti_adversarial_climb(model: CAMNet, pair: Tensor, key: int, steps: int, *, step_size: float = 0.08,
                           mask_threshold: float = 0.5, regularisation: float = 7.0) -> tuple[Tensor, Tensor]:
    """AdvCAM's manipulation of one (image, flipped image) batch (2, 3, h, w) for class `key`:
    returns (the flip-summed ReLU'd map of the class summed over the `steps` images x_0..x_{T-1},
    the last image x_T). See advcam_maps for the objective; gradients reach only the images."""
    low, high = pair.min(), pair.max()
    x, start, summed = pair.detach(), None, torch.zeros(())
    for _ in range(steps):
        x = x.detach().requires_grad_(True)
        maps = model.class_maps(model.backbone(x)["layer4"])  # (2, C, h, w), ReLU'd
        region = maps[0, key] + maps[1, key].flip(-1)
        if start is None:
            start = region.detach()
        summed = summed + region.detach()
        logits = maps.mean(dim=(2, 3))  # (2, C): AdvCAM's scores are the GAP of the ReLU'd maps
        own = logits[:, key].sum()
        mask = region.detach() > mask_threshold * region.detach().max()
        objective = own - (logits.sum() - own) - regularisation * ((region - start).abs() * mask).sum()
        (grad,) = torch.autograd.grad(objective, x)
        x = (x.detach() + step_size * grad / (grad.abs().max() + 1e-12)).clamp(low, high)
    return summed, x.detach()
