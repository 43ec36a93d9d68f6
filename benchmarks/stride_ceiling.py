"""How well a segmenter whose logits are at output stride s can score at all on a dataset.

    .venv/bin/python benchmarks/stride_ceiling.py          # the demo (data/demo); updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/stride_ceiling.py --config pipelines/voc.yaml --no-docs

The best a stride-s logit map can do when it is brought to the image by bilinear upsampling,
as every wsseg segmenter's single-scale prediction is: the ground truth itself, one-hot,
averaged over s x s cells (the ideal coarse map: each cell holds the exact class shares it
covers), upsampled bilinearly to the image and taken by argmax, scored as val mIoU with the
stage's own confusion matrix. A model at that stride can beat it only by help from outside the
logits (multi-scale testing at scales > 1, a CRF on the image, a learned upsampling). Where
the ceiling is low, the objects are small against the stride, and a segmenter that predicts at
that stride misses the table's ground-truth target for that reason, not for its training.

DUpsampling predicts at stride 32 too, but its upsampling is a linear map W fitted to the
training labels' 32 x 32 patches; its ceiling is the val labels passed through W·Wᵀ (W fitted
to the ground truth of data.segmenter_train_list with the model's defaults, as train-segmenter
fits it), also by argmax.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from run_all import REPO, fmt, header, load_average, table, write_section

SECTION = "Segmenters"
STRIDES = (4, 8, 16, 32)


def one_hot(labels: np.ndarray, num_classes: int, ignore: int = 255) -> torch.Tensor:
    """(H, W) class ids -> (1, C, H, W) float64 one-hot; an ignored pixel is all-zero (no class)."""
    valid = torch.from_numpy(labels != ignore)
    target = torch.from_numpy(np.where(labels != ignore, labels, 0).astype(np.int64))
    return (F.one_hot(target, num_classes).permute(2, 0, 1).double() * valid)[None]


def ceiling_labels(labels: np.ndarray, num_classes: int, stride: int) -> np.ndarray:
    """The argmax of the ideal stride-`stride` map of `labels`, upsampled bilinearly (ignored pixels
    count for no class; a cell of only ignored pixels predicts background, as a zero map's argmax)."""
    height, width = labels.shape
    coarse = F.adaptive_avg_pool2d(one_hot(labels, num_classes), (-(-height // stride), -(-width // stride)))
    return F.interpolate(coarse, (height, width), mode="bilinear", align_corners=False)[0].argmax(0).numpy()


def dupsampling_ceiling(train: list[np.ndarray], num_classes: int, stride: int = 32, dims: int = 256):
    """The DUpsampling model's W fitted to `train`, and a function giving a val map's argmax of W·Wᵀ·x."""
    from wsseg.models.segmenters.dupsampling import DataDependentUpsampling

    upsample = DataDependentUpsampling(num_classes, stride, dims).double()
    upsample.fit(torch.from_numpy(labels.astype(np.int64)) for labels in train)

    def reconstruct(labels: np.ndarray) -> np.ndarray:
        height, width = labels.shape
        padded = np.pad(labels, ((0, -height % stride), (0, -width % stride)), constant_values=255)
        cells = F.pixel_unshuffle(one_hot(padded, num_classes), stride)  # (1, C·r², h, w), (class, dy, dx) order
        codes = torch.einsum("kn,bkhw->bnhw", upsample.projection, cells) / stride
        return upsample.scores(codes)[0, :, :height, :width].argmax(0).numpy()

    return reconstruct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", type=Path,
                        help="config files, stacked (default: pipelines/demo.yaml and data/demo/config.yaml)")
    parser.add_argument("--set", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()

    from wsseg.config import load_config
    from wsseg.metrics import ConfusionMatrix
    from wsseg.stages import artifacts

    load = load_average()
    config = load_config(args.config or [REPO / "pipelines" / "demo.yaml", REPO / "data" / "demo" / "config.yaml"],
                         args.set)
    dataset = artifacts.open_dataset(config)
    ids = artifacts.ids_with_ground_truth(dataset, artifacts.image_ids(config, "data.val_list"))
    num_classes = len(config.data.classes) + 1
    sizes, rows = [], []
    matrices = {stride: ConfusionMatrix(num_classes) for stride in STRIDES}
    train_ids = artifacts.ids_with_ground_truth(dataset, artifacts.image_ids(config, "data.segmenter_train_list"))
    reconstruct = dupsampling_ceiling([dataset.read_semantic(i) for i in train_ids], num_classes)
    learned = ConfusionMatrix(num_classes)
    for image_id in ids:
        labels = dataset.read_semantic(image_id)
        sizes.append(labels.shape)
        for stride, matrix in matrices.items():
            matrix.update(ceiling_labels(labels, num_classes, stride), labels)
        learned.update(reconstruct(labels), labels)
    for stride, matrix in matrices.items():
        rows.append([f"{stride}, bilinear", fmt(matrix.summary()["miou"])])
    rows.append([f"32, DUpsampling's W (N 256, fitted to {len(train_ids)} training label maps)",
                 fmt(learned.summary()["miou"])])
    print(f"{len(ids)} images of {config.data.root}, median size {int(np.median([s[0] for s in sizes]))} x "
          f"{int(np.median([s[1] for s in sizes]))}")
    body = "\n".join(header("stride_ceiling.py", load, [f"data.val_list of {config.data.root}: {len(ids)} images"],
                            how="ground truth only, no model")) + "\n\n" + \
        table(["output stride", "val mIoU ceiling (single scale)"], rows)
    print(body)
    if not args.no_docs:
        write_section(SECTION, "", f"Output-stride ceiling, {Path(str(config.data.root)).name}", body)


if __name__ == "__main__":
    sys.exit(main())
