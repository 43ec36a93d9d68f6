"""Training stages: train-cam, train-irn and train-segmenter steps, their data loading, IRN's pair labels.

    .venv/bin/python benchmarks/training.py                        # updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/training.py --voc-batch 4 --voc-steps 4 --no-docs

For each stage, at the demo's sizes (pipelines/demo.yaml: ResNet-18 w0.25, 128 crops,
its batch sizes) and at VOC sizes (pipelines/voc.yaml: ResNet-50, IRN's 512 crops for
train-cam and train-irn with IRN's trainable stages, DeepLab-v2 at 321 crops; a small
batch on this CPU), with `run.workers` 0 and 2 data-loader processes, a fresh process:

1. iterates the stage's DataLoader alone (the stage's dataset and augmentation);
2. runs full training steps (the stage's network, loss and SGD), timing apart the wait
   for the next batch and the step's compute. The first batch of each (worker start)
   is a warm-up and not counted.

VOC-sized inputs are random smooth 500x375 JPEGs with blob label maps, written to a
temporary VOC-layout folder (random weights: speed does not depend on them). Peak memory
is the main process's ru_maxrss above its baseline after building the network, and the
largest loader worker's ru_maxrss (shared pages included).

Also train-irn's pair-label memory: IRN precomputes per sample, in the data loader, the
bg-pos / fg-pos / neg targets of every (source, direction) pair as float32; wsseg ships
the label map and builds the pair codes per batch (`wsseg.ops.path_index.pair_labels`),
whose time per batch is measured.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from run_all import (REPO, emit, fmt, header, load_average, max_rss_kb, peak_mib, run_worker, save_results, table,
                     write_section)
from wsseg.config import load_config
from wsseg.data.datasets import LabelledImages, TaggedImages
from wsseg.data.images import write_label_png
from wsseg.data.transforms import ClassificationAugment, SegmentationAugment
from wsseg.data.voc import VOC_CLASSES
from wsseg.ops.path_index import directions, pair_labels, source_crop
from wsseg.stages import artifacts

SECTION = "Training stages"
STAGES = ("train-cam", "train-irn", "train-segmenter")
VOC_IMAGES = 16  # enough for a few batches without reusing an image
VOC_SIZE = (375, 500)


# ------------------------------------------------------------------------ inputs


def write_voc_folder(root: Path, count: int = VOC_IMAGES) -> None:
    """A VOC-layout dataset of `count` random smooth 500x375 JPEGs, tags and blob label maps."""
    for sub in ("JPEGImages", "Annotations", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for index in range(count):
        rng = np.random.default_rng([11, index])
        image_id = f"bench_{index:04d}"
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize(VOC_SIZE[::-1], Image.BICUBIC))
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        classes = np.sort(rng.choice(len(VOC_CLASSES), size=2, replace=False))
        label = np.zeros(VOC_SIZE, np.uint8)
        rows, cols = np.mgrid[: VOC_SIZE[0], : VOC_SIZE[1]]
        for k in classes:  # an ellipse per class, with a void rim as VOC has
            cy, cx = rng.uniform(80, 300), rng.uniform(100, 400)
            ry, rx = rng.uniform(40, 120), rng.uniform(50, 150)
            distance = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2
            label[distance < 1.1] = 255
            label[distance < 1.0] = k + 1
        write_label_png(root / "SegmentationClass" / f"{image_id}.png", label)
        objects = "".join(f"<object><name>{VOC_CLASSES[k]}</name></object>" for k in classes)
        (root / "Annotations" / f"{image_id}.xml").write_text(f"<annotation>{objects}</annotation>")
        ids.append(image_id)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")


def stage_config(size: str, voc_root: str | None):
    if size == "demo":
        return load_config([REPO / "pipelines" / "demo.yaml"], [f"data.root={REPO / 'data' / 'demo'}"])
    return load_config([REPO / "pipelines" / "voc.yaml"],
                       [f"data.root={voc_root}", "data.train_list=train", "backbone.weights=null",
                        "segmenter.weights=null"])


def stage_parts(stage: str, config, batch: int | None):
    """(dataset, model, optimizer, loss(model, batch) -> tensor, batch size) as the stage builds them."""
    from wsseg.training import sgd

    dataset = artifacts.open_dataset(config)
    ids = artifacts.image_ids(config, "data.train_list")
    if stage == "train-cam":
        from wsseg.models.cam import cam_loss
        from wsseg.stages.train_cam import build_network

        cam = config.cam
        images = TaggedImages(dataset, ids, ClassificationAugment(resize_long=cam.resize_long, crop_size=cam.crop))
        model = build_network(config, load_pretrained=False)
        backbone, heads = model.param_groups()
        optimizer = sgd([(backbone, cam.lr), (heads, cam.lr * cam.classifier_lr_mult)], momentum=cam.momentum,
                        weight_decay=cam.weight_decay)
        return images, model, optimizer, lambda net, b: cam_loss(net(b["image"]), b["tags"]), batch or cam.batch_size
    if stage == "train-irn":
        from wsseg.models.irn import irn_losses
        from wsseg.stages.train_irn import build_network

        irn = config.irn
        # the relation maps' stand-in: ground-truth maps (same size, dtype and classes)
        images = LabelledImages(dataset, ids, dataset.read_semantic,
                                SegmentationAugment(scale_range=irn.scale_range, crop_size=irn.crop))
        model = build_network(config, None, initialise=False)
        boundary, displacement = model.param_groups()
        optimizer = sgd([(boundary, irn.lr), (displacement, irn.lr * irn.displacement_lr_mult)],
                        momentum=irn.momentum, weight_decay=irn.weight_decay)

        def irn_loss(net, b):
            boundary_logits, displacement_field = net(b["image"])
            labels = b["label"][:, ::4, ::4][:, : boundary_logits.shape[2], : boundary_logits.shape[3]]
            return irn_losses(boundary_logits, displacement_field, labels, radius=irn.radius)["total"]

        return images, model, optimizer, irn_loss, batch or irn.batch_size
    from wsseg.stages.train_segmenter import build_network

    segmenter = config.segmenter
    images = LabelledImages(dataset, ids, dataset.read_semantic,
                            SegmentationAugment(scale_range=segmenter.scale_range, crop_size=segmenter.crop))
    model = build_network(config, load_pretrained=False)
    backbone, heads = model.param_groups()
    optimizer = sgd([(backbone, segmenter.lr), (heads, segmenter.lr * segmenter.head_lr_mult)],
                    momentum=segmenter.momentum, weight_decay=segmenter.weight_decay)
    return images, model, optimizer, lambda net, b: net.loss(net(b["image"]), b["label"])["total"], \
        batch or segmenter.batch_size


# ----------------------------------------------------------------------- workers


def worker_train(args) -> dict:
    torch.manual_seed(0)
    config = stage_config(args.size, args.voc_root)
    images, model, optimizer, loss_fn, batch_size = stage_parts(args.stage, config, args.batch)
    model.train()
    baseline = max_rss_kb()

    def loader():
        generator = torch.Generator().manual_seed(0)
        return torch.utils.data.DataLoader(images, batch_size=batch_size, shuffle=True, generator=generator,
                                           drop_last=True, num_workers=args.workers,
                                           persistent_workers=args.workers > 0)

    # 1. the data loader alone
    batches = iter(loader())
    next(batches)  # warm-up: worker start
    start = time.perf_counter()
    for _ in range(args.steps):
        next(batches)
    loader_alone = (time.perf_counter() - start) / args.steps
    del batches

    # 2. full steps: wait for the batch, then forward, backward, SGD step
    waits, computes = [], []
    batches = iter(loader())
    for index in range(args.steps + 1):
        start = time.perf_counter()
        batch = next(batches)
        fetched = time.perf_counter()
        loss = loss_fn(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = time.perf_counter()
        if index:  # the first step is the warm-up
            waits.append(fetched - start)
            computes.append(done - fetched)
    del batches
    steps = np.array(waits) + np.array(computes)
    return {
        "batch": batch_size,
        "crop": int(batch["image"].shape[-1]),
        "loader_seconds": loader_alone,
        "wait_seconds": float(np.mean(waits)),
        "compute_seconds": float(np.mean(computes)),
        "step_seconds": float(np.median(steps)),
        "wait_share": float(np.sum(waits) / np.sum(steps)),
        "peak_mib": peak_mib(baseline),
        "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if args.workers else 0.0,
    }


def pair_setting(size: str) -> tuple[int, int, int]:
    """(stride-4 map side, radius, batch) of train-irn: the demo's and IRN's VOC recipe."""
    return (32, 5, 16) if size == "demo" else (128, 10, 32)


def worker_pairs(args) -> dict:
    side, radius, batch = pair_setting(args.size)
    rng = np.random.default_rng(0)
    coarse = rng.choice(np.array([0, 0, 1, 2, 255]), size=(batch, side // 8, side // 8))
    labels = torch.from_numpy(coarse.repeat(8, axis=1).repeat(8, axis=2).astype(np.int64))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        codes = pair_labels(labels, radius)
        times.append(time.perf_counter() - start)
    return {"seconds": float(np.median(times)), "codes_bytes_per_sample": codes[0].numel() * codes.element_size()}


# ------------------------------------------------------------------------ driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="which stages")
    parser.add_argument("--loader-workers", default="0,2", help="run.workers values (data-loader processes), demo sizes")
    parser.add_argument("--voc-loader-workers", default="0",
                        help="run.workers values at VOC sizes (a VOC step is seconds of compute: 0 shows the worst case)")
    parser.add_argument("--demo-steps", type=int, default=3, help="timed steps at the demo sizes (after 1 warm-up)")
    parser.add_argument("--voc-steps", type=int, default=2, help="timed steps at VOC sizes (after 1 warm-up)")
    parser.add_argument("--voc-batch", type=int, default=2, help="batch size at VOC sizes (IRN: 16, 32; DeepLab: 10)")
    parser.add_argument("--sizes", default="demo,voc")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    # worker mode (internal)
    parser.add_argument("--worker", choices=["train", "pairs"])
    parser.add_argument("--stage", choices=STAGES)
    parser.add_argument("--size", choices=["demo", "voc"])
    parser.add_argument("--voc-root")
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.worker == "train":
        emit(worker_train(args))
        return
    if args.worker == "pairs":
        emit(worker_pairs(args))
        return

    load_before = load_average()
    stages = [s for s in args.stages.split(",") if s]
    sizes = [s for s in args.sizes.split(",") if s]
    loader_workers = {"demo": [int(w) for w in args.loader_workers.split(",")],
                      "voc": [int(w) for w in args.voc_loader_workers.split(",")]}
    rows, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        voc_root = Path(tmp) / "voc"
        if "voc" in sizes:
            write_voc_folder(voc_root)
        for size in sizes:
            for stage in stages:
                for workers in loader_workers[size]:
                    arguments = ["--worker", "train", "--stage", stage, "--size", size, "--workers", str(workers),
                                 "--steps", str(args.demo_steps if size == "demo" else args.voc_steps),
                                 "--voc-root", str(voc_root)]
                    if size == "voc":
                        arguments += ["--batch", str(args.voc_batch)]
                    record = run_worker(__file__, arguments)
                    results.setdefault(size, {}).setdefault(stage, {})[workers] = record
                    rate = record["batch"] / record["step_seconds"]
                    print(f"  {stage} {size} workers {workers}: {rate:.3g} images/s, "
                          f"waiting {100 * record['wait_share']:.0f} %", flush=True)
                    rows.append([stage, size, f"{record['crop']} x {record['batch']}", str(workers), fmt(rate),
                                 fmt(record["step_seconds"]), fmt(record["compute_seconds"]), fmt(record["wait_seconds"]),
                                 f"{100 * record['wait_share']:.0f} %", fmt(record["loader_seconds"]),
                                 fmt(record["peak_mib"]), fmt(record["worker_rss_mib"]) if workers else ""])

    pair_rows = []
    for size in sizes:
        side, radius, batch = pair_setting(size)
        record = run_worker(__file__, ["--worker", "pairs", "--size", size, "--steps", "3"])
        rows_, cols_ = source_crop(side, side, radius)
        sources = (rows_.stop - rows_.start) * (cols_.stop - cols_.start)
        num_directions = len(directions(radius))
        reference = num_directions * sources * 3 * 4  # three float32 targets per (direction, source)
        crop = side * 4
        label_int64, label_uint8 = crop * crop * 8, crop * crop
        results.setdefault("pairs", {})[size] = {"seconds": record["seconds"], "reference_bytes": reference,
                                                 "label_bytes": label_int64}
        pair_rows.append([f"{size}: {crop} crop, radius {radius}", f"{num_directions} x {sources:,}",
                          f"{reference / 2**20:.2f}", f"{label_int64 / 2**20:.2f} ({label_uint8 / 2**20:.2f} as uint8)",
                          f"{reference / label_int64:.0f}x", f"{record['codes_bytes_per_sample'] / 2**20:.2f}",
                          f"{batch}", fmt(record["seconds"])])

    steps = table(["stage", "sizes", "crop x batch", "workers", "images/s", "s/step", "compute (s)", "wait (s)",
                   "waiting", "loader alone (s/batch)", "peak main (MiB)", "largest loader worker (MiB)"], rows, "lllr" + "r" * 8)
    pairs = table(["train-irn pairs", "directions x sources", "IRN's precomputed targets per sample (MiB)",
                   "wsseg's label map per sample (MiB)", "ratio", "pair codes built per sample (MiB, transient)",
                   "batch", "pair_labels s per batch"], pair_rows, "lrrrrrrr")
    print("\n" + steps + "\n\n" + pairs)
    save_results("training", results)
    if args.no_docs:
        return
    notes = [
        "demo sizes: pipelines/demo.yaml (ResNet-18 w0.25, every stage trains, the demo's batch sizes); VOC sizes: "
        f"pipelines/voc.yaml (ResNet-50; train-cam trains layer3-4 + classifier, frozen BN; train-irn trains the heads "
        f"on a frozen backbone; DeepLab-v2 OS8 trains everything) at batch {args.voc_batch}, random weights, "
        f"run.workers {args.voc_loader_workers}; "
        f"{args.demo_steps} (demo) / {args.voc_steps} (VOC) timed steps after one warm-up step",
        "images/s = batch / median step time (wait + compute); waiting = share of the step spent waiting for the batch; "
        "loader alone = the same DataLoader iterated without training; train-irn's label maps are ground-truth "
        "maps standing in for relation maps",
    ]
    body = "\n".join(header("training.py", load_before, notes)) + "\n\n" + steps + "\n\n" + pairs
    write_section(SECTION, INTRO, "CPU", body)


INTRO = """\
Training steps of train-cam, train-irn and train-segmenter (DeepLab-v2) at the demo's
and at VOC sizes, the share of a step spent waiting for the data loader with
`run.workers` 0 and 2, and train-irn's pair-label memory, measured by
`benchmarks/training.py`."""


if __name__ == "__main__":
    main()
