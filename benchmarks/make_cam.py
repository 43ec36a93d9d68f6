"""make-cam: the naive per-image CAM inference against wsseg's `multiscale_cams`.

The naive formulation, per image and per scale: a batch-1 forward of the image, then a
batch-1 forward of its flip, and each of the two CAMs resized to both output sizes on
its own. wsseg's `wsseg.models.cam.multiscale_cams` runs the image and its flip as one
batch of 2 per scale and resizes their sum once. (IRN's own make_cam already does the
latter: its dataset stacks [image, flip(image)] per scale and its CAM network sums the
pair before resizing.) The two give the same CAMs up to float rounding.

    .venv/bin/python benchmarks/make_cam.py                    # demo + VOC-sized images; updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/make_cam.py --voc-count 8      # more VOC-sized images (~10 s each per method here)
    .venv/bin/python benchmarks/make_cam.py --demo-counts 10,40,160 --no-docs

Measured on the demo images (data/demo) with the demo's trained CAM network
(runs/demo/cam/model.pt, copied; random weights when it is absent: speed does not
depend on the weights) and on VOC-sized random images (500x375, ResNet-50 at width 1,
IRN's strides, random weights, 2 tags each). Each run is a fresh process: images/s from
the median time per image (the CAM computation only, not reading the image), peak
memory above the worker's baseline after building the network (ru_maxrss), for several
numbers of images to show it does not grow with them. A profile splits one image's
time into the resizes, the backbone and the rest.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from run_all import (REPO, emit, fmt, header, load_average, max_rss_kb, peak_mib, run_worker, save_results, table,
                     write_section)
from wsseg.config import load_config
from wsseg.data.transforms import normalize
from wsseg.data.voc import VOCDataset, read_id_list
from wsseg.models.backbones import ResNet
from wsseg.models.cam import CAMNet, multiscale_cams
from wsseg.stages.train_cam import CAM_STRIDES, build_network

SECTION = "Make-cam"
SCALES = (1.0, 0.5, 1.5, 2.0)  # IRN's make-cam scales, each with its flip
DEMO_CONFIG = REPO / "pipelines" / "demo.yaml"
DEMO_MODEL = REPO / "runs" / "demo" / "cam" / "model.pt"
VOC_SIZE = (375, 500)  # (H, W) of a typical VOC 2012 image
VOC_CLASSES = 20
VOC_TAGS = 2  # present classes per VOC-sized image (VOC averages ~1.5)


# ------------------------------------------------------------------ the two formulations


def naive_cams(model: CAMNet, image: torch.Tensor, keys: torch.Tensor,
               scales: Sequence[float] = SCALES) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward make-cam: per scale, batch-1 image then batch-1 flip, each CAM resized alone.

    Same inputs, outputs and resizing rules as `multiscale_cams` (image (3, H, W) normalised,
    keys (K,); returns cam (K, ceil(H/4), ceil(W/4)) and high_res (K, H, W), max-normalised).
    """
    height, width = image.shape[1:]
    small_size = (math.ceil(height / 4), math.ceil(width / 4))
    padded_size = (math.ceil(height / 16) * 16, math.ceil(width / 16) * 16)
    model.eval()
    with torch.inference_mode():
        weight = model.cam_weight()[keys].float()
        cam = torch.zeros((keys.numel(), *small_size))
        high_res = torch.zeros((keys.numel(), *padded_size))
        for scale in scales:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            scaled = image[None].float()
            if size != (height, width):
                scaled = F.interpolate(scaled, size=size, mode="bicubic", align_corners=False, antialias=True)
            for flipped in (False, True):
                features = model.backbone(scaled.flip(-1) if flipped else scaled)["layer4"]
                maps = F.relu(F.conv2d(features, weight))
                if flipped:
                    maps = maps.flip(-1)
                cam += F.interpolate(maps, size=small_size, mode="bilinear", align_corners=False)[0]
                high_res += F.interpolate(maps, size=padded_size, mode="bilinear", align_corners=False)[0]
        high_res = high_res[:, :height, :width]
        cam = cam / (cam.amax(dim=(1, 2), keepdim=True) + 1e-5)
        high_res = high_res / (high_res.amax(dim=(1, 2), keepdim=True) + 1e-5)
    return cam, high_res


def wsseg_cams(model, image, keys, scales=SCALES):
    return multiscale_cams(model, image, keys, scales)


METHODS = {"naive": naive_cams, "wsseg": wsseg_cams}


# ------------------------------------------------------------------------ inputs


def voc_image(index: int) -> tuple[np.ndarray, np.ndarray]:
    """A VOC-sized (375, 500, 3) uint8 image with smooth structure and noise, and its 2 tags."""
    rng = np.random.default_rng([7, index])
    coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize(VOC_SIZE[::-1], Image.BICUBIC), dtype=np.int16)
    image = np.clip(image + rng.integers(-20, 21, size=image.shape), 0, 255).astype(np.uint8)
    keys = np.sort(rng.choice(VOC_CLASSES, size=VOC_TAGS, replace=False)).astype(np.int64)
    return image, keys


class Inputs:
    """The network and the images of one setting ('demo' or 'voc'), image by image (nothing is held)."""

    def __init__(self, kind: str, model_path: str | None):
        torch.manual_seed(0)  # the same random weights in every process
        if kind == "demo":
            config = load_config([DEMO_CONFIG])
            self.model = build_network(config, load_pretrained=False)
            if model_path:
                self.model.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=False)["model"])
            self.dataset = VOCDataset(REPO / config.data.root, config.data.classes)
            self.ids = read_id_list(self.dataset.root, config.data.train_list)
        else:
            self.model = CAMNet(ResNet(50, width=1.0, strides=CAM_STRIDES), VOC_CLASSES)
            self.dataset = None
        self.model.eval()

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dataset is None:
            image, keys = voc_image(index)
        else:
            image_id = self.ids[index % len(self.ids)]
            image, keys = self.dataset.read_image(image_id), self.dataset.tags(image_id)
        return torch.from_numpy(normalize(image)).permute(2, 0, 1).contiguous(), torch.from_numpy(keys)


# ----------------------------------------------------------------------- workers


def worker_run(args) -> dict:
    inputs = Inputs(args.images, args.model)
    baseline = max_rss_kb()
    method = METHODS[args.method]
    times, kept = [], []
    for index in range(args.count):
        image, keys = inputs(index)
        start = time.perf_counter()
        cam, high_res = method(inputs.model, image, keys)
        times.append(time.perf_counter() - start)
        if index < args.compare:
            kept.append((cam, high_res))
    torch.save(kept, args.out)
    return {"median_seconds": float(np.median(times)), "total_seconds": float(sum(times)),
            "peak_mib": peak_mib(baseline), "count": args.count}


def worker_profile(args) -> dict:
    """Per-part time of one image for both formulations (the loops above, with timers between the parts)."""
    inputs = Inputs(args.images, args.model)
    model = inputs.model
    parts = {"naive": {}, "wsseg": {}}

    def add(name: str, method: str, start: float) -> float:
        now = time.perf_counter()
        parts[method][name] = parts[method].get(name, 0.0) + now - start
        return now

    for index in range(args.count):
        image, keys = inputs(index)
        height, width = image.shape[1:]
        small = (math.ceil(height / 4), math.ceil(width / 4))
        padded = (math.ceil(height / 16) * 16, math.ceil(width / 16) * 16)
        with torch.inference_mode():
            weight = model.cam_weight()[keys].float()
            for method in ("naive", "wsseg"):
                for scale in SCALES:
                    t = time.perf_counter()
                    size = (max(1, round(height * scale)), max(1, round(width * scale)))
                    scaled = image[None]
                    if size != (height, width):
                        scaled = F.interpolate(scaled, size=size, mode="bicubic", align_corners=False, antialias=True)
                    t = add("image resize (bicubic)", method, t)
                    if method == "naive":
                        outs = []
                        for x in (scaled, scaled.flip(-1)):
                            features = model.backbone(x)["layer4"]
                            t = add("backbone", method, t)
                            outs.append(F.relu(F.conv2d(features, weight)))
                            t = add("CAM conv + flip + sum", method, t)
                        outs[1] = outs[1].flip(-1)
                        for maps in outs:
                            F.interpolate(maps, size=small, mode="bilinear", align_corners=False)
                            F.interpolate(maps, size=padded, mode="bilinear", align_corners=False)
                        t = add("CAM resizes (bilinear)", method, t)
                    else:
                        features = model.backbone(torch.cat([scaled, scaled.flip(-1)]))["layer4"]
                        t = add("backbone", method, t)
                        maps = F.relu(F.conv2d(features, weight))
                        summed = (maps[0] + maps[1].flip(-1))[None]
                        t = add("CAM conv + flip + sum", method, t)
                        F.interpolate(summed, size=small, mode="bilinear", align_corners=False)
                        F.interpolate(summed, size=padded, mode="bilinear", align_corners=False)
                        add("CAM resizes (bilinear)", method, t)
    return {"parts": {m: {k: v / args.count for k, v in p.items()} for m, p in parts.items()}}


# ------------------------------------------------------------------------ driver


def run(args, folder: Path, method: str, images: str, count: int, model: str | None) -> tuple[dict, list]:
    out = folder / f"{method}-{images}-{count}.pt"
    arguments = ["--worker", "run", "--method", method, "--images", images, "--count", str(count),
                 "--compare", str(args.compare), "--out", str(out)]
    if model:
        arguments += ["--model", model]
    record = run_worker(__file__, arguments)
    print(f"  {images} {method} N={count}: {1 / record['median_seconds']:.3g} images/s, "
          f"peak +{record['peak_mib']:.0f} MiB", flush=True)
    return record, torch.load(out, weights_only=False)


def max_difference(a: list, b: list, which: int) -> float:
    return max(float((x[which] - y[which]).abs().max()) for x, y in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-counts", default="10,40", help="numbers of demo images, one run each per method")
    parser.add_argument("--voc-count", type=int, default=3, help="VOC-sized images per method (0: skip)")
    parser.add_argument("--voc-counts-memory", default="",
                        help="extra wsseg runs on this many VOC-sized images for the memory table, e.g. 1,4")
    parser.add_argument("--compare", type=int, default=5, help="images whose CAMs are compared between the methods")
    parser.add_argument("--profile-images", default="demo:10,voc:1",
                        help="profile runs as kind:count ('' to skip)")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    # worker mode (internal)
    parser.add_argument("--worker", choices=["run", "profile"])
    parser.add_argument("--method", choices=list(METHODS))
    parser.add_argument("--images", choices=["demo", "voc"])
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--model")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker == "run":
        emit(worker_run(args))
        return
    if args.worker == "profile":
        emit(worker_profile(args))
        return

    load_before = load_average()
    demo_counts = [int(c) for c in args.demo_counts.split(",") if c]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = None
        if DEMO_MODEL.exists():
            model = str(folder / "model.pt")
            shutil.copy(DEMO_MODEL, model)
        weights = "trained demo CAM network" if model else "random weights (runs/demo/cam/model.pt absent)"
        settings = [("demo", count, model) for count in demo_counts]
        if args.voc_count:
            settings.append(("voc", args.voc_count, None))
        speed_rows, memory_rows, results = [], [], {}
        for images, count, model_path in settings:
            records, outputs = {}, {}
            for method in ("naive", "wsseg"):
                records[method], outputs[method] = run(args, folder, method, images, count, model_path)
            naive, ours = records["naive"], records["wsseg"]
            ratio = naive["median_seconds"] / ours["median_seconds"]
            label = "demo (~128x110, ResNet-18 w0.25)" if images == "demo" else "VOC-sized 500x375 (ResNet-50)"
            speed_rows.append([label, str(count), fmt(1 / naive["median_seconds"]), fmt(1 / ours["median_seconds"]),
                               f"{ratio:.2f}x", f"{max_difference(outputs['naive'], outputs['wsseg'], 0):.1e}",
                               f"{max_difference(outputs['naive'], outputs['wsseg'], 1):.1e}"])
            for method in ("naive", "wsseg"):
                memory_rows.append([label, method, str(count), fmt(records[method]["peak_mib"]),
                                    fmt(1 / records[method]["median_seconds"])])
            results[f"{images}_{count}"] = {"naive": naive, "wsseg": ours, "ratio": ratio}
        for count in [int(c) for c in args.voc_counts_memory.split(",") if c]:
            record, _ = run(args, folder, "wsseg", "voc", count, None)
            memory_rows.append(["VOC-sized 500x375 (ResNet-50)", "wsseg", str(count), fmt(record["peak_mib"]),
                                fmt(1 / record["median_seconds"])])

        profile_rows = []
        for item in [p for p in args.profile_images.split(",") if p]:
            images, count = item.split(":")
            arguments = ["--worker", "profile", "--images", images, "--count", count]
            if images == "demo" and model:
                arguments += ["--model", model]
            parts = run_worker(__file__, arguments)["parts"]
            totals = {m: sum(p.values()) for m, p in parts.items()}
            results[f"profile_{images}"] = parts
            for name in parts["naive"]:
                profile_rows.append([images, name, fmt(parts["naive"][name]), fmt(100 * parts["naive"][name] / totals["naive"], 2),
                                     fmt(parts["wsseg"][name]), fmt(100 * parts["wsseg"][name] / totals["wsseg"], 2)])
            profile_rows.append([images, "**total**", fmt(totals["naive"]), "100", fmt(totals["wsseg"]), "100"])

    speed = table(["images", "N", "naive (images/s)", "wsseg (images/s)", "wsseg / naive", "max abs diff cam",
                   "max abs diff high_res"], speed_rows, "lrrrrrr")
    memory = table(["images", "method", "N", "peak above baseline (MiB)", "images/s"], memory_rows, "llrrr")
    profile = table(["images", "part", "naive (s/image)", "naive %", "wsseg (s/image)", "wsseg %"], profile_rows, "llrrrr")
    print("\n" + speed + "\n\n" + memory + ("\n\n" + profile if profile_rows else ""))
    save_results("make_cam", {"voc_images_per_second": (1 / results[f"voc_{args.voc_count}"]["wsseg"]["median_seconds"]
                                                        if args.voc_count else None), "results": results})
    if args.no_docs:
        return
    notes = [
        f"scales {', '.join(f'{s:g}' for s in SCALES)}, each with its flip; demo network: {weights}; VOC-sized: "
        f"ResNet-50 (strides 1, 2, 2, 1), random weights, {VOC_CLASSES} classes, {VOC_TAGS} tags per image",
        "images/s = 1 / median time per image (CAM computation only); max abs diff over the first "
        f"{args.compare} images (CAMs are max-normalised to [0, 1]); peak = ru_maxrss above the worker's "
        "baseline after building the network",
    ]
    body = "\n".join(header("make_cam.py", load_before, notes)) + "\n\n" + speed + "\n\n" + memory
    if profile_rows:
        body += "\n\nWhere one image's time goes (s per image; the two formulations' loops with timers between the parts):\n\n" + profile
    write_section(SECTION, INTRO, "CPU", body)


INTRO = """\
The naive make-cam (per image and scale: a batch-1 forward of the image, a batch-1
forward of its flip, each CAM resized on its own) against wsseg's
`wsseg.models.cam.multiscale_cams` (image + flip as one batch of 2 per scale, their
sum resized once), measured by `benchmarks/make_cam.py`. IRN's own make_cam already
batches the pair the way wsseg does, so this is a comparison with the straightforward
formulation, not with IRN."""


if __name__ == "__main__":
    main()
