"""What reading COCO costs at its real size: start-up and per-image time and memory of data.format: coco.

    .venv/bin/python benchmarks/coco_reader.py                     # 120k images, 900k instances; updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/coco_reader.py --images 12000 --instances 90000 --no-docs

A synthetic instances_train2014.json with COCO's size (train2014: 82,783 images, ~605k
instances; the issue's round 120k / 900k is larger, so an upper bound) is generated once under
runs/bench/coco_reader/: 640 x 480 images, objects as polygons of 8 to 40 vertices (COCO's
polygons have ~20 on average) at random places and sizes, 1 % crowd regions as RLE. Then, in a
fresh process each: the reader's start-up (parsing the file and building its index, what every
wsseg command pays once on first use), the list of the split's images, and the per-image cost
of tags, the class map and the instance map (rasterised from the polygons) over 200 images.
Peak memory is the process's maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from run_all import REPO, bench_env, fmt, header, load_average, table, write_section

SECTION = "COCO reader"
INTRO = """The COCO layout's cost at COCO's size (`benchmarks/coco_reader.py`)."""
CLASSES = 80


def generate(path: Path, images: int, instances: int, seed: int = 0) -> None:
    """A COCO instance file: `images` 640x480 images, `instances` polygon objects spread over them, 1 % crowd."""
    rng = np.random.default_rng(seed)
    per_image = np.bincount(rng.integers(0, images, instances), minlength=images)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as out:
        out.write('{"info": {"description": "wsseg benchmark"}, "licenses": [], "categories": [')
        out.write(",".join(json.dumps({"id": 2 * k + 1, "name": f"class{k}"}) for k in range(CLASSES)))
        out.write('], "images": [')
        out.write(",".join(json.dumps({"id": i + 1, "file_name": f"COCO_train2014_{i + 1:012d}.jpg", "height": 480,
                                       "width": 640}) for i in range(images)))
        out.write('], "annotations": [')
        first = True
        number = 0
        for image, count in enumerate(per_image):
            for _ in range(count):
                number += 1
                crowd = rng.random() < 0.01
                cx, cy = rng.uniform(40, 600), rng.uniform(40, 440)
                radius = rng.uniform(8, 120)
                if crowd:
                    segmentation = {"size": [480, 640], "counts": [int(cy * 640), 200, 480 * 640 - int(cy * 640) - 200]}
                else:
                    vertices = int(rng.integers(8, 41))
                    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
                    r = radius * rng.uniform(0.6, 1.0, vertices)
                    xs = np.clip(cx + r * np.cos(angles), 0, 639)
                    ys = np.clip(cy + r * np.sin(angles), 0, 479)
                    segmentation = [np.round(np.stack([xs, ys], 1).ravel(), 2).tolist()]
                entry = {"id": number, "image_id": image + 1, "category_id": 2 * int(rng.integers(0, CLASSES)) + 1,
                         "iscrowd": int(crowd), "area": float(np.pi * radius ** 2), "segmentation": segmentation,
                         "bbox": [cx - radius, cy - radius, 2 * radius, 2 * radius]}
                out.write(("" if first else ",") + json.dumps(entry))
                first = False
        out.write("]}\n")
    tmp.replace(path)


MEASURE = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from wsseg.data.coco import CocoDataset
classes = [f"class{{k}}" for k in range(80)]
began = time.perf_counter()
dataset = CocoDataset({root!r}, classes)
ids = dataset.read_list("train2014", "data.train_list")
startup = time.perf_counter() - began
peak_startup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
began = time.perf_counter()
ids2 = CocoDataset({root!r}, classes).read_list("train2014", "data.train_list")
again = time.perf_counter() - began
sample = ids[:: max(1, len(ids) // 200)][:200]
timings = {{}}
for name, read in (("tags", dataset.tags), ("class map", dataset.read_semantic), ("instance map", dataset.read_instances)):
    began = time.perf_counter()
    for image_id in sample:
        read(image_id)
    timings[name] = (time.perf_counter() - began) / len(sample)
print(json.dumps({{"startup": startup, "again": again, "images": len(ids), "peak_startup_mb": peak_startup,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "per_image": timings}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=120_000)
    parser.add_argument("--instances", type=int, default=900_000)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    root = REPO / "runs" / "bench" / "coco_reader" / f"{args.images}-{args.instances}"
    path = root / "annotations" / "instances_train2014.json"
    if not path.exists():
        began = time.perf_counter()
        generate(path, args.images, args.instances)
        print(f"generated {path} ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - began:.0f} s", flush=True)
    load_before = load_average()
    result = subprocess.run([sys.executable, "-c", MEASURE.format(repo=str(REPO), root=str(root))], env=bench_env(),
                            capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    m = json.loads(result.stdout.strip().splitlines()[-1])
    rows = [["start-up: parse the file, index images and annotations, list the split", f"{fmt(m['startup'])} s",
             f"{fmt(m['peak_startup_mb'], 4)} MB peak"],
            ["the same again in the same process (cached parse)", f"{fmt(m['again'])} s", ""],
            *[[f"per image: {name}", f"{fmt(seconds * 1000)} ms", ""] for name, seconds in m["per_image"].items()],
            ["whole process", "", f"{fmt(m['peak_mb'], 4)} MB peak"]]
    notes = [f"synthetic instances_train2014.json: {args.images} images of 640x480, {args.instances} instances "
             f"(polygons of 8-40 vertices, 1 % crowd RLE), {path.stat().st_size / 1e6:.0f} MB; {m['images']} images "
             f"with an object in the list; per-image costs over 200 images"]
    text = "\n".join(header("coco_reader.py", load_before, notes, how="the reader in a fresh process")) + "\n\n"
    text += table(["what", "time", "memory"], rows)
    print(text)
    if not args.no_docs:
        write_section(SECTION, INTRO, "CPU", text)


if __name__ == "__main__":
    main()
