"""DUpsampling (Tian, He, Shen, Yan, "Decoders Matter for Semantic Segmentation: Data-Dependent
Decoding Enables Flexible Feature Aggregation", CVPR 2019; docs/models/dupsampling.md): a ResNet
at output stride 32 (or 16) whose last feature map predicts, per cell, an N-dimensional code
that a fixed linear map W turns into the cell's whole r x r patch of class scores (r = the
output stride), fitted beforehand to the training labels.

  Aggregation    each low-level feature (default: the stem and layer3) is average-pooled to
                 layer4's size, reduced by a 1x1 conv-BN-ReLU (48 at ResNet-50 width) and
                 concatenated with layer4; two 3x3 conv-BN-ReLU (256) and dropout 0.1 fuse them.
  Codes          a 1x1 conv to N channels (`compressed_channels`, not scaled with the width:
                 N belongs to the label space, not to the features).
  DUpsampling    scores = r·W·code for each cell, W of shape (C·r², N) with orthonormal columns,
                 rows in (class, dy, dx) order (the factor r: `DataDependentUpsampling`), laid
                 out by a pixel shuffle: cell (i, j) fills pixels [r·i, r·i + r) x
                 [r·j, r·j + r); the map is cropped to the input size (layer4 has ceil(H / r) cells).
  Temperature    logits = scores / T with a learned T (the paper's adaptive-temperature
                 softmax), kept positive here as T = exp(log_temperature), T = 1 at init.
  Loss           cross-entropy of the softmax of those logits at the labels' full resolution.

W is a buffer, not a parameter: the paper fits it to the training labels and keeps it fixed.
`fit_to_labels(label maps)` (which train-segmenter calls before the first step) sets it to the
closed-form minimiser of the reconstruction error ||x − W·Wᵀ·x||² over the one-hot label patches
x (C·r² each; an ignored pixel is all-zero): the top-N right singular vectors of the patch matrix
(uncentred PCA, the optimum of a linear autoencoder without bias; exact for every patch in the
labels' span when N >= its rank). Columns past the rank are zero. Before any fit, W holds a
data-free basis (`initial_projection`): per class the lowest-frequency 2D DCT-II functions of
the patch, classes taking turns, so its first C columns are nearest-neighbour upsampling of C
per-cell scores. Stored in the state dict, W reaches `predict`, `wsseg export` and a resumed run
with the weights; `fitted_patches` records how many label patches it was fitted on (0: the
data-free basis).

At most `fit_patches` patches enter the fit: a uniform sample (reservoir sampling, seeded, so
every rank of a distributed run fits the same W) of all the labels' r x r patches; with fewer
patches than that every one counts and the fit is exact. Equal patches are merged with their
count as a weight, so the cost depends on the distinct ones.

The paper's decoder details wsseg could not read from here (which low-level features, how they
are downsampled, the fusing convs) follow an unofficial release (LinZhuoChen/DUpsampling,
models/dunet.py: the stem and layer3, 1x1 to 48, 3x3 256 twice), with average pooling where it
resizes bilinearly (a bilinear resize by 8 reads 4 of every 64 pixels).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wsseg.class_ids import IGNORE
from wsseg.models.backbones import resnet
from wsseg.models.segmenters.common import Segmenter, classifier, conv_bn_relu, head_channels

OUTPUT_STRIDES = (16, 32)
LOW_LEVEL_STAGES = ("stem", "layer1", "layer2", "layer3")
# The decoder's widths at ResNet-50 width (scaled with `head_channels`).
REDUCE_CHANNELS, FUSE_CHANNELS = 48, 256
FUSE_DROPOUT = 0.1
# The fit's sample size and seed (the same W on every rank and rerun).
FIT_PATCHES, FIT_SEED = 4096, 0


def dct_basis(size: int) -> Tensor:
    """The orthonormal 2D DCT-II basis of a size x size patch: (size², size²) float64, column k
    the k-th function (row index dy·size + dx), lowest frequencies first (by u + v, then u)."""
    x = torch.arange(size, dtype=torch.float64)
    u = torch.arange(size, dtype=torch.float64)
    one_d = torch.cos(math.pi * (2 * x[:, None] + 1) * u[None, :] / (2 * size))  # (x, u)
    one_d *= torch.where(u == 0, math.sqrt(1 / size), math.sqrt(2 / size))
    order = sorted(((a, b) for a in range(size) for b in range(size)), key=lambda f: (f[0] + f[1], f[0]))
    columns = [torch.outer(one_d[:, a], one_d[:, b]).reshape(-1) for a, b in order]
    return torch.stack(columns, dim=1)


def initial_projection(num_classes: int, scale: int, dims: int) -> Tensor:
    """The data-free W (C·r², N) float64 with orthonormal columns: column k is class k mod C's
    (k div C)-th lowest DCT function over its r² rows; the first C columns are constants
    (nearest-neighbour upsampling of per-cell class scores)."""
    basis = dct_basis(scale)
    area = scale * scale
    projection = torch.zeros(num_classes * area, dims, dtype=torch.float64)
    for k in range(dims):
        cls, frequency = k % num_classes, k // num_classes
        projection[cls * area:(cls + 1) * area, k] = basis[:, frequency]
    return projection


def label_patches(labels: Tensor | np.ndarray, scale: int) -> Tensor:
    """Label maps (H, W) or (B, H, W) -> their r x r patches on the grid from pixel (0, 0), the map
    padded with IGNORE at the bottom and right to whole patches: (P, r²) int64, rows in (dy, dx)
    order, patches without a labelled pixel left out. (In NumPy: torch's threaded boolean indexing
    took 100x longer on small maps on a busy machine.)"""
    labels = labels.cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    labels = labels.astype(np.int64, copy=False)
    if labels.ndim == 2:
        labels = labels[None]
    height, width = labels.shape[-2:]
    padded = np.pad(labels, ((0, 0), (0, -height % scale), (0, -width % scale)), constant_values=IGNORE)
    rows, cols = padded.shape[-2] // scale, padded.shape[-1] // scale
    patches = padded.reshape(-1, rows, scale, cols, scale).transpose(0, 1, 3, 2, 4).reshape(-1, scale * scale)
    return torch.from_numpy(np.ascontiguousarray(patches[(patches != IGNORE).any(axis=1)]))


def patch_one_hot(patches: Tensor, num_classes: int) -> Tensor:
    """(P, r²) labels -> (P, C·r²) float64 one-hot vectors, entry c·r² + p set where pixel p is
    class c (an IGNORE pixel sets none)."""
    valid = patches != IGNORE
    onehot = F.one_hot(patches.where(valid, 0), num_classes) * valid[..., None]
    return onehot.permute(0, 2, 1).reshape(patches.shape[0], -1).double()


def principal_projection(patches: Tensor, num_classes: int, dims: int) -> Tensor:
    """The (C·r², dims) float64 W with orthonormal columns minimising Σ ||x − W·Wᵀ·x||² over the
    one-hot vectors x of `patches` ((P, r²) labels): the top right singular vectors of the patch
    matrix, most variance first; zero columns past its rank.

    Equal patches are merged (weight √count). With K distinct patches and D = C·r² rows, the
    eigenproblem is the smaller of K x K (the patches' Gram matrix, built class by class) and D x D.
    """
    unique, counts = torch.unique(patches.long(), dim=0, return_counts=True)
    _check_labels(unique, num_classes)
    weights = counts.double().sqrt()
    area = unique.shape[1]
    size = num_classes * area
    projection = torch.zeros(size, dims, dtype=torch.float64)
    if unique.shape[0] <= size:
        gram = torch.zeros(unique.shape[0], unique.shape[0], dtype=torch.float64)
        for cls in range(num_classes):
            members = (unique == cls).float()
            gram += (members @ members.T).double()  # pixel counts <= r²: exact in float32
        gram *= weights[:, None] * weights[None, :]
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values.flip(0)[:dims], vectors.flip(1)[:, :dims]
        keep = values > values[0].clamp(min=0) * max(gram.shape[0], size) * torch.finfo(torch.float64).eps
        coefficients = vectors[:, keep] * weights[:, None] / values[keep].sqrt()
        for cls in range(num_classes):
            projection[cls * area:(cls + 1) * area, :int(keep.sum())] = (unique == cls).double().T @ coefficients
    else:
        matrix = patch_one_hot(unique, num_classes) * weights[:, None]
        values, vectors = torch.linalg.eigh(matrix.T @ matrix)
        values, vectors = values.flip(0)[:dims], vectors.flip(1)[:, :dims]
        keep = values > values[0].clamp(min=0) * size * torch.finfo(torch.float64).eps
        projection[:, :int(keep.sum())] = vectors[:, keep]
    return projection


def _check_labels(patches: Tensor, num_classes: int) -> None:
    bad = (patches != IGNORE) & ((patches < 0) | (patches >= num_classes))
    if bad.any():
        raise ValueError(f"label {int(patches[bad][0])} is outside 0..{num_classes - 1} (and {IGNORE}, ignored)")


class PatchSample:
    """A uniform random sample of at most `capacity` rows from a stream of (P, r²) patch batches
    (reservoir sampling, Algorithm R), seeded: the same stream gives the same sample. Rows are
    copied (as uint8: class ids and 255), so the stream's tensors are not kept alive."""

    def __init__(self, capacity: int, seed: int = FIT_SEED) -> None:
        if capacity < 1:
            raise ValueError(f"the patch sample needs a capacity >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.seen = 0
        self.rows: Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def add(self, patches: Tensor) -> None:
        if len(patches) == 0:
            return
        if self.rows is None:
            self.rows = torch.empty(self.capacity, patches.shape[1], dtype=torch.uint8)
        room = max(0, self.capacity - self.seen)
        head = patches[:room]
        self.rows[self.seen:self.seen + len(head)] = head.to(torch.uint8)
        self.seen += len(head)
        rest = patches[len(head):]
        if len(rest) == 0:
            return
        # Row j of the rest is stream item i = seen + j (0-based): it replaces slot uniform(0..i) if < capacity.
        positions = self.seen + 1 + torch.arange(len(rest), dtype=torch.float64)
        slots = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64) * positions).long()
        for index in torch.nonzero(slots < self.capacity).flatten().tolist():  # in order: a later row wins
            self.rows[int(slots[index])] = rest[index].to(torch.uint8)
        self.seen += len(rest)

    def patches(self) -> Tensor:
        """The sample: (min(seen, capacity), r²) int64."""
        if self.rows is None:
            return torch.zeros(0, 0, dtype=torch.long)
        return self.rows[:min(self.seen, self.capacity)].long()


def fit_projection(labels: Iterable[Tensor], num_classes: int, scale: int, dims: int,
                   max_patches: int = FIT_PATCHES) -> tuple[Tensor, int]:
    """W fitted to label maps ((H, W) or (B, H, W), any sizes, 255 ignored): (W (C·r², dims)
    float64, the number of labelled patches seen). No labelled patch: (the data-free W, 0)."""
    sample = PatchSample(max_patches)
    for batch in labels:
        patches = label_patches(batch, scale)
        _check_labels(patches, num_classes)
        sample.add(patches)
    if sample.seen == 0:
        return initial_projection(num_classes, scale, dims), 0
    return principal_projection(sample.patches(), num_classes, dims), sample.seen


class DataDependentUpsampling(nn.Module):
    """codes (B, N, h, w) -> logits (B, C, h·r, w·r) = pixel_shuffle(r·W·codes, r) / T.

    W has orthonormal columns (the fit's); the forward pass uses r·W, so that the data-free W's
    constant columns are exactly nearest-neighbour upsampling of per-cell scores. With W alone every
    score shrinks by 1/r and the last layers' effective step size under SGD by 1/r²: 15 SGD steps at
    lr 0.01 on the tests' fixed batch moved the loss from 1.609 to 1.603 only. The codes of an exact
    one-hot patch x are Wᵀx / r; the learned temperature absorbs any overall scale.

    Buffers: projection W (C·r², N), fitted_patches (int64 scalar; 0: the data-free W).
    Parameter: log_temperature (T = exp of it, 1 at init).
    """

    def __init__(self, num_classes: int, scale: int, dims: int) -> None:
        super().__init__()
        if not 1 <= dims <= num_classes * scale * scale:
            raise ValueError(f"compressed_channels must be in 1..{num_classes * scale * scale} "
                             f"(classes x stride²), got {dims}")
        self.num_classes, self.scale, self.dims = num_classes, scale, dims
        self.register_buffer("projection", initial_projection(num_classes, scale, dims).float())
        self.register_buffer("fitted_patches", torch.zeros((), dtype=torch.long))
        self.log_temperature = nn.Parameter(torch.zeros(()))

    @property
    def temperature(self) -> Tensor:
        return self.log_temperature.exp()

    def scores(self, codes: Tensor) -> Tensor:
        """r·W·codes laid out as patches, without the temperature: (B, C, h·r, w·r)."""
        weight = (self.projection * self.scale).to(codes.dtype)[:, :, None, None]
        return F.pixel_shuffle(F.conv2d(codes, weight), self.scale)

    def forward(self, codes: Tensor) -> Tensor:
        return self.scores(codes) / self.temperature

    @torch.no_grad()
    def fit(self, labels: Iterable[Tensor], max_patches: int = FIT_PATCHES) -> int:
        """Set W to the PCA of the label maps' patches (`fit_projection`); returns the patch count."""
        projection, seen = fit_projection(labels, self.num_classes, self.scale, self.dims, max_patches)
        if seen:
            self.projection.copy_(projection.to(self.projection.dtype))
            self.fitted_patches.fill_(seen)
        return seen


class DUpsampling(Segmenter):
    """DUpsampling: a ResNet at output stride r, low-level features pooled to layer4 and fused, a
    1x1 conv to N codes per cell, and the fixed W that turns them into r x r patches of class
    scores over a learned temperature (module docstring). forward -> {"out": logits at the input
    size}; loss -> {"main", "total"}: cross-entropy at full resolution.

    Args:
        num_classes: classes including background.
        depth, width: the ResNet.
        output_stride: 32 (the paper's, undilated) or 16 (layer4 dilated); also W's patch size r.
        low_level: backbone stages pooled to layer4's size and concatenated with it (the stem
            is wsseg's, after the max-pool).
        compressed_channels: N, the codes per cell (W's columns); at most classes x r².
        fit_patches: the most label patches the fit of W reads (a uniform sample of them).
    """

    def __init__(self, num_classes: int, *, depth: int = 50, width: float = 1.0, output_stride: int = 32,
                 low_level: Sequence[str] = ("stem", "layer3"), compressed_channels: int = 256,
                 fit_patches: int = FIT_PATCHES) -> None:
        super().__init__()
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"dupsampling: output_stride must be 16 or 32, got {output_stride}")
        self.low_level = tuple(low_level)
        unknown = [s for s in self.low_level if s not in LOW_LEVEL_STAGES]
        if unknown or len(set(self.low_level)) != len(self.low_level):
            raise ValueError(f"dupsampling: low_level must be distinct stages from {', '.join(LOW_LEVEL_STAGES)}, "
                             f"got {list(low_level)}")
        if fit_patches < 1:
            raise ValueError(f"dupsampling: fit_patches must be >= 1, got {fit_patches}")
        self.fit_patches = int(fit_patches)
        self.backbone = resnet(depth, output_stride=output_stride, width=width)
        channels = self.backbone.channels
        reduced = head_channels(self.backbone, REDUCE_CHANNELS)
        fused = head_channels(self.backbone, FUSE_CHANNELS)
        self.reduce = nn.ModuleDict({stage: conv_bn_relu(channels[stage], reduced, 1) for stage in self.low_level})
        self.fuse = nn.Sequential(
            conv_bn_relu(channels["layer4"] + reduced * len(self.low_level), fused, 3),
            conv_bn_relu(fused, fused, 3),
            nn.Dropout2d(FUSE_DROPOUT),
        )
        self.codes = classifier(fused, compressed_channels)
        self.upsample = DataDependentUpsampling(num_classes, output_stride, compressed_channels)
        self.aux_head = None

    def aggregate(self, features: dict[str, Tensor]) -> Tensor:
        """concat(layer4, 1x1 conv-BN-ReLU(average-pool(f, layer4's size)) for f in low_level)."""
        size = features["layer4"].shape[-2:]
        low = [self.reduce[stage](F.adaptive_avg_pool2d(features[stage], size)) for stage in self.low_level]
        return torch.cat([features["layer4"], *low], dim=1)

    def head(self, features: dict[str, Tensor]) -> Tensor:
        """Logits of the whole padded grid: (B, C, r·h, r·w) for layer4's h x w."""
        return self.upsample(self.codes(self.fuse(self.aggregate(features))))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"out": self.head(self.backbone(x))[..., :x.shape[-2], :x.shape[-1]]}

    def predict(self, x: Tensor) -> Tensor:
        return self.forward(x)["out"]

    def fit_to_labels(self, labels: Iterable[Tensor]) -> None:
        """W := the PCA of the training labels' r x r patches (module docstring)."""
        self.upsample.fit(labels, self.fit_patches)
