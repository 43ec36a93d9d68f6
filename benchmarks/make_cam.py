"""make-cam: the naive per-image CAM inference against wsseg's.

The naive formulation, per image and per scale: a batch-1 forward of the trained
network on the image, then on its flip, and each of the two CAMs resized to both output
sizes on its own. wsseg's make-cam (what the stage runs) first builds an inference-only
copy of the network once, `wsseg.models.cam.inference_network` (every BatchNorm folded
into its conv, the ReLUs and residual adds fused into oneDNN's CPU convolutions,
channels_last), then per image `multiscale_cams`: per scale the image and its flip as
one batch of 2 up to `CPU_PAIR_MAX_PIXELS` pixels (two batch-1 passes above), their sum
resized once. (IRN's own make_cam batches the pair at every size: its dataset stacks
[image, flip(image)] per scale and its CAM network sums the pair before resizing.) The
two give the same CAMs up to float rounding.

    .venv/bin/python benchmarks/make_cam.py                     # demo + VOC-sized images; updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/make_cam.py --voc-count 8       # more VOC-sized images (~5-10 s each per method here)
    .venv/bin/python benchmarks/make_cam.py --memory-counts 10,40,160 --voc-memory-counts 1,4 --no-docs
    .venv/bin/python benchmarks/make_cam.py --per-scale 3       # the VOC-sized backbone per scale: batch of 2 or not
    .venv/bin/python benchmarks/make_cam.py --demo-count 0 --memory-counts "" --keep-freed-memory --no-docs
                                                  # both methods with glibc keeping freed memory (no page faults)

Measured on the demo images (data/demo) with the demo's trained CAM network
(runs/demo/cam/model.pt, copied; random weights when it is absent: speed does not
depend on the weights), on the same images resized to 128x128 (one input shape), and
on VOC-sized random images (500x375, ResNet-50 at width 1, IRN's strides, random
weights, 2 tags each).

- Speed: one fresh process per setting runs both methods on every image, back to back
  in alternating order, so that the load of a shared machine falls on both alike; the
  CAMs of the two are compared image by image, and the minor page faults of each method
  are counted (fresh memory the kernel maps and zeroes). One more demo image (and
  VOC-sized with --profile-voc) then goes through both formulations' loops with timers
  between the parts (resize, backbone, the rest). The one-time cost of building the
  inference network is timed apart.
- Per scale (--per-scale, not in the default run: ~2-3 minutes): the VOC-sized backbone
  on an image and its flip, 2 x batch-1 against one batch of 2, at each scale, for the
  trained network as it is and for the inference network.
- Memory: one fresh process per method and number of images; peak = ru_maxrss above
  the baseline after building the network, to show it does not grow with the images.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import resource
import shutil
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
from wsseg.models.cam import CPU_PAIR_MAX_PIXELS, CAMNet, inference_network, multiscale_cams
from wsseg.checkpoints import load_checkpoint
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


def wsseg_cams(model: CAMNet, image: torch.Tensor, keys: torch.Tensor,
               scales: Sequence[float] = SCALES) -> tuple[torch.Tensor, torch.Tensor]:
    """wsseg's make-cam for one image (the function the make-cam stage calls); `model` is the
    inference network the stage builds once (`Inputs.networks["wsseg"]`)."""
    return multiscale_cams(model, image, keys, scales)


METHODS = {"naive": naive_cams, "wsseg": wsseg_cams}
LABELS = {
    "demo": "demo images (90-128 px, ~70 sizes), ResNet-18 w0.25",
    "demo128": "demo images resized to 128x128, ResNet-18 w0.25",
    "voc": "VOC-sized 500x375, ResNet-50",
}


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
    """The networks and the images of one setting, image by image (nothing is held).

    'demo': the demo images (~70 different sizes); 'demo128': the same resized to 128x128;
    'voc': VOC-sized random images, all 500x375. `networks[method]` is the network each
    method runs: the trained one for naive, its inference copy for wsseg (built once, as
    the stage does; `prepare_seconds` is what that took).
    """

    def __init__(self, kind: str, model_path: str | None, methods: tuple[str, ...] = ("naive", "wsseg")):
        torch.manual_seed(0)  # the same random weights in every process
        self.fixed_size = (128, 128) if kind == "demo128" else None
        if kind in ("demo", "demo128"):
            config = load_config([DEMO_CONFIG])
            self.model = build_network(config, load_pretrained=False)
            if model_path:
                self.model.load_state_dict(load_checkpoint(Path(model_path), "the demo CAM network")["model"])
            self.dataset = VOCDataset(REPO / config.data.root, config.data.classes)
            self.ids = read_id_list(self.dataset.root, config.data.train_list)
        else:
            self.model = CAMNet(ResNet(50, width=1.0, strides=CAM_STRIDES), VOC_CLASSES)
            self.dataset = None
        self.model.eval()
        self.networks = {"naive": self.model} if "naive" in methods else {}
        start = time.perf_counter()
        if "wsseg" in methods:
            self.networks["wsseg"] = inference_network(self.model, channels_last=True)
        self.prepare_seconds = time.perf_counter() - start

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.dataset is None:
            image, keys = voc_image(index)
        else:
            image_id = self.ids[index % len(self.ids)]
            image, keys = self.dataset.read_image(image_id), self.dataset.tags(image_id)
            if self.fixed_size:  # one input shape for every image: see the memory table
                image = np.asarray(Image.fromarray(image).resize(self.fixed_size[::-1], Image.BICUBIC))
        return torch.from_numpy(normalize(image)).permute(2, 0, 1).contiguous(), torch.from_numpy(keys)


# ----------------------------------------------------------------------- workers


def worker_memory(args) -> dict:
    """One method over `count` images: peak memory above the baseline after building the network."""
    inputs = Inputs(args.images, args.model, (args.method,))
    if args.method == "wsseg":
        inputs.model = None  # the stage keeps only the inference network: the trained one is freed
    baseline = max_rss_kb()
    method = METHODS[args.method]
    for index in range(args.count):
        method(inputs.networks[args.method], *inputs(index))
    return {"peak_mib": peak_mib(baseline), "count": args.count}


def worker_speed(args) -> dict:
    """Both methods on every image, back to back in alternating order, so that the load of a
    shared machine falls on both alike; then one more image through the profiled loops."""
    if args.keep_freed_memory:
        keep_freed_memory()
    inputs = Inputs(args.images, args.model)
    for name, method in METHODS.items():  # warm-up: one-time allocations and kernel setup for these shapes
        method(inputs.networks[name], *inputs(0))
    times = {name: [] for name in METHODS}
    faults = {name: 0 for name in METHODS}
    differences = {"cam": 0.0, "high_res": 0.0}
    for index in range(1, args.count + 1):
        image, keys = inputs(index)
        outputs = {}
        for name in (("naive", "wsseg") if index % 2 else ("wsseg", "naive")):
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            outputs[name] = METHODS[name](inputs.networks[name], image, keys)
            times[name].append(time.perf_counter() - start)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
        for which, key in enumerate(differences):
            difference = float((outputs["naive"][which] - outputs["wsseg"][which]).abs().max())
            differences[key] = max(differences[key], difference)
    parts = profile(inputs, args.count + 1) if args.profile else None
    return {"seconds": times, "differences": differences, "parts": parts, "prepare_seconds": inputs.prepare_seconds,
            "faults_per_image": {name: count / args.count for name, count in faults.items()}}


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse (no mmap per large tensor, never trimmed): every
    large activation is then recycled instead of being mapped and zeroed by the kernel anew."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameters (malloc.h)
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise SystemExit("mallopt failed: --keep-freed-memory needs glibc")


def profile(inputs: Inputs, index: int) -> dict:
    """Per-part time of one image for both formulations (their loops, with timers between the parts)."""
    model = inputs.model
    prepared = inputs.networks["wsseg"]
    parts: dict[str, dict[str, float]] = {"naive": {}, "wsseg": {}}

    def add(name: str, method: str, start: float) -> float:
        now = time.perf_counter()
        parts[method][name] = parts[method].get(name, 0.0) + now - start
        return now

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
                    add("CAM resizes (bilinear)", method, t)
                else:
                    if size[0] * size[1] <= CPU_PAIR_MAX_PIXELS:
                        features = prepared.backbone(torch.cat([scaled, scaled.flip(-1)]))["layer4"]
                    else:
                        features = torch.cat([prepared.backbone(x)["layer4"] for x in (scaled, scaled.flip(-1))])
                    t = add("backbone", method, t)
                    maps = F.relu(F.conv2d(features, weight))
                    summed = (maps[0] + maps[1].flip(-1))[None]
                    t = add("CAM conv + flip + sum", method, t)
                    F.interpolate(summed, size=small, mode="bilinear", align_corners=False)
                    F.interpolate(summed, size=padded, mode="bilinear", align_corners=False)
                    add("CAM resizes (bilinear)", method, t)
    return parts


def worker_scales(args) -> dict:
    """Per scale of one image: the backbone on the image and its flip as 2 x batch-1 vs one batch of 2,
    for the trained network and for the inference network, the four in alternating order."""
    inputs = Inputs(args.images, args.model)
    image, _ = inputs(0)
    height, width = image.shape[1:]
    rows = []
    with torch.inference_mode():
        for scale in SCALES:
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            x = F.interpolate(image[None], size=size, mode="bicubic", align_corners=False, antialias=True)
            pair = torch.cat([x, x.flip(-1)])
            runs = {}
            for network in ("naive", "wsseg"):
                backbone = inputs.networks[network].backbone
                runs[f"{network} single"] = lambda b=backbone, x=x: (b(x), b(x.flip(-1)))
                runs[f"{network} batched"] = lambda b=backbone, pair=pair: b(pair)
            seconds = {name: [] for name in runs}
            for run in runs.values():  # warm-up for these shapes
                run()
            for repeat in range(args.count):
                for name in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
                    start = time.perf_counter()
                    runs[name]()
                    seconds[name].append(time.perf_counter() - start)
            rows.append({"scale": scale, "size": size, **{name: min(s) for name, s in seconds.items()}})
    return {"rows": rows}


def scales_table(rows: list[dict]) -> str:
    columns = ("naive single", "naive batched", "wsseg single", "wsseg batched")
    lines = []
    for r in rows:
        pixels = r["size"][0] * r["size"][1]
        lines.append([f"{r['scale']:g}", f"{r['size'][1]}x{r['size'][0]}", *(fmt(r[c]) for c in columns),
                      f"{r['wsseg single'] / r['wsseg batched']:.2f}x",
                      "batch of 2" if pixels <= CPU_PAIR_MAX_PIXELS else "2 x batch-1"])
    totals = {c: sum(r[c] for r in rows) for c in columns}
    lines.append(["**all**", "", *(fmt(totals[c]) for c in columns),
                  f"{totals['wsseg single'] / totals['wsseg batched']:.2f}x", ""])
    return table(["scale", "input (WxH)", "trained, 2 x batch-1 (s)", "trained, batch of 2 (s)",
                  "inference net, 2 x batch-1 (s)", "inference net, batch of 2 (s)", "batch of 2 speed-up (inference net)",
                  "wsseg runs"], lines, "llrrrrrl")


# ------------------------------------------------------------------------ driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-count", type=int, default=40, help="demo images timed (each setting: demo, demo128)")
    parser.add_argument("--voc-count", type=int, default=2, help="VOC-sized images timed (0: skip VOC sizes)")
    parser.add_argument("--memory-counts", default="10,40", help="numbers of demo images for the memory table")
    parser.add_argument("--voc-memory-counts", default="1", help="numbers of VOC-sized images for the memory table")
    parser.add_argument("--profile-voc", action="store_true", help="also split a VOC-sized image's time into parts")
    parser.add_argument("--per-scale", type=int, default=0, metavar="REPEATS",
                        help="only time the VOC-sized backbone per scale, 2 x batch-1 vs a batch of 2 (min of REPEATS); "
                             "writes its own subsection")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="speed rows only: glibc keeps freed memory in both methods' process (see keep_freed_memory)")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    # worker mode (internal)
    parser.add_argument("--worker", choices=["speed", "memory", "scales"])
    parser.add_argument("--method", choices=list(METHODS))
    parser.add_argument("--images", choices=list(LABELS))
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--model")
    args = parser.parse_args()
    if args.worker:
        emit({"speed": worker_speed, "memory": worker_memory, "scales": worker_scales}[args.worker](args))
        return

    load_before = load_average()
    if args.per_scale:
        rows = run_worker(__file__, ["--worker", "scales", "--images", "voc", "--count", str(args.per_scale)])["rows"]
        result = scales_table(rows)
        print(result)
        if not args.no_docs:
            notes = [f"{LABELS['voc']} (random weights): the backbone alone on one image and its flip at each make-cam "
                     f"scale, the trained network as it is (what naive runs) and its inference copy (what wsseg runs), "
                     f"one fresh process, after a warm-up, the four in alternating order; minimum of {args.per_scale} "
                     f"repeats; wsseg batches the pair up to CPU_PAIR_MAX_PIXELS = {CPU_PAIR_MAX_PIXELS:,} pixels"]
            body = "\n".join(header("make_cam.py", load_before, notes)) + "\n\n" + result
            write_section(SECTION, INTRO, "CPU, VOC-sized backbone per scale", body)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = None
        if DEMO_MODEL.exists():
            model = str(Path(tmp) / "model.pt")
            shutil.copy(DEMO_MODEL, model)
        weights = "the trained demo CAM network" if model else "random weights (runs/demo/cam/model.pt absent)"

        def arguments(kind: str) -> list[str]:
            return ["--images", kind] + (["--model", model] if model and kind != "voc" else [])

        speed_rows, profile_rows, results = [], [], {}
        settings = [(kind, args.demo_count) for kind in ("demo", "demo128") if args.demo_count]
        settings += [("voc", args.voc_count)] if args.voc_count else []
        for kind, count in settings:
            profiled = kind == "demo" or (kind == "voc" and args.profile_voc)
            record = run_worker(__file__, ["--worker", "speed", "--count", str(count), *arguments(kind)]
                                + (["--profile"] if profiled else [])
                                + (["--keep-freed-memory"] if args.keep_freed_memory else []))
            naive, ours = (np.array(record["seconds"][m]) for m in ("naive", "wsseg"))
            ratio = float(np.median(naive / ours))
            faults = record["faults_per_image"]
            results[kind] = {"naive_seconds": float(np.median(naive)), "wsseg_seconds": float(np.median(ours)),
                             "ratio": ratio, "differences": record["differences"], "parts": record["parts"],
                             "prepare_seconds": record["prepare_seconds"], "faults_per_image": faults}
            speed_rows.append([LABELS[kind], str(count), fmt(1 / np.median(naive)), fmt(1 / np.median(ours)),
                               f"{ratio:.2f}x", f"{record['differences']['cam']:.1e}",
                               f"{record['differences']['high_res']:.1e}",
                               f"{faults['naive']:,.0f} / {faults['wsseg']:,.0f}", fmt(record["prepare_seconds"])])
            print(f"  {kind}: naive {1 / np.median(naive):.3g}, wsseg {1 / np.median(ours):.3g} images/s, "
                  f"ratio {ratio:.2f}", flush=True)
            if profiled:
                parts = record["parts"]
                totals = {m: sum(p.values()) for m, p in parts.items()}
                for name in parts["naive"]:
                    profile_rows.append([kind, name, fmt(parts["naive"][name]), f"{100 * parts['naive'][name] / totals['naive']:.1f}",
                                         fmt(parts["wsseg"][name]), f"{100 * parts['wsseg'][name] / totals['wsseg']:.1f}"])
                profile_rows.append([kind, "**total**", fmt(totals["naive"]), "100", fmt(totals["wsseg"]), "100"])

        memory_rows = []
        memory = [(kind, int(n)) for kind in ("demo", "demo128") for n in args.memory_counts.split(",") if n]
        memory += [("voc", int(n)) for n in args.voc_memory_counts.split(",") if n] if args.voc_count else []
        for kind, count in memory:
            for method in METHODS:
                record = run_worker(__file__, ["--worker", "memory", "--method", method, "--count", str(count),
                                               *arguments(kind)])
                results.setdefault("memory", []).append({"images": kind, "method": method, "count": count,
                                                         "peak_mib": record["peak_mib"]})
                memory_rows.append([LABELS[kind], method, str(count), fmt(record["peak_mib"])])

    speed = table(["images", "N", "naive (images/s)", "wsseg (images/s)", "wsseg / naive", "max abs diff cam",
                   "max abs diff high_res", "page faults per image (naive / wsseg)", "inference network built once (s)"],
                  speed_rows, "lrrrrrrrr")
    memory_table = table(["images", "method", "N", "peak above baseline (MiB)"], memory_rows, "llrr")
    profile_table = table(["images", "part", "naive (s/image)", "naive %", "wsseg (s/image)", "wsseg %"], profile_rows,
                          "llrrrr")
    print("\n" + speed + "\n\n" + memory_table + "\n\n" + profile_table)
    if args.keep_freed_memory:  # a diagnostic: not how the stage runs, so not what pipeline.py should read
        return
    voc_rate = 1 / results["voc"]["wsseg_seconds"] if "voc" in results else None
    save_results("make_cam", {"voc_images_per_second": voc_rate, "results": results})
    if args.no_docs:
        return
    notes = [
        f"scales {', '.join(f'{s:g}' for s in SCALES)}, each with its flip; demo images: {weights}; VOC-sized: "
        f"ResNet-50 (strides 1, 2, 2, 1), random weights, {VOC_CLASSES} classes, {VOC_TAGS} tags per image; naive runs the "
        "trained network as it is, wsseg its inference copy (inference_network, channels_last), built once per process "
        "(the last column; not in the per-image time)",
        "speed: one process per row runs both methods on every image, back to back in alternating order (the load of "
        "this shared machine then falls on both alike), after one warm-up image; images/s = 1 / median time per image "
        "(CAM computation only), wsseg / naive = median over images of the per-image ratio; max abs diff over all "
        "timed images (CAMs are max-normalised to [0, 1]); page faults: minor faults (ru_minflt) per timed image",
        "memory: one fresh process per method and N; peak = ru_maxrss above the baseline after building the network",
    ]
    body = "\n".join(header("make_cam.py", load_before, notes)) + "\n\n" + speed + "\n\n" + memory_table
    body += ("\n\nWhere one image's time goes (s per image; one more image through the two formulations' loops with "
             "timers between the parts):\n\n" + profile_table)
    body += "\n\nPer scale at VOC sizes: `--per-scale REPEATS`, the subsection below."
    write_section(SECTION, INTRO, "CPU", body)


INTRO = """\
The naive make-cam (per image and scale: a batch-1 forward of the trained network on the
image, then on its flip, each CAM resized on its own) against wsseg's (an inference copy
of the network built once by `wsseg.models.cam.inference_network`: BatchNorms folded into
the convs, ReLUs and residual adds fused into oneDNN's convolutions, channels_last; then
`multiscale_cams`: image + flip as one batch of 2 per scale up to 250,000 pixels, two
batch-1 passes above, their sum resized once), measured by `benchmarks/make_cam.py`."""


if __name__ == "__main__":
    main()
