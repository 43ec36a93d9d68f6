"""Memory of each stage for one camera-sized photo, at the VOC recipe's scales.

    .venv/bin/python benchmarks/large_images.py                          # 1000, 2000, 4000 px; updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/large_images.py --sizes 1000 --no-docs
    .venv/bin/python benchmarks/large_images.py --sizes 4000 --one-image --no-docs   # one 4000 x 3000-ish photo

For each long side in `--sizes`, a demo dataset of 4 images at that size (3 train, 1 val;
short side 0.7-1.0 of it: a 4000 px photo is about 4000 x 3000) goes through the stages up to
synthesize-labels with pipelines/voc.yaml's recipe (ResNet-50 at full width, make-cam at scales
1.0/0.5/1.5/2.0 with flips, DenseCRF, IRN inference on the whole image and its random walk),
random init (`backbone.weights: null`: weights do not change memory) and 1 epoch of each
training stage. Each stage runs as its own `wsseg <stage>` process; its peak resident memory is
the process's maximum RSS (os.wait4). A stage that the system kills for memory is reported as
such, with what it had reached.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from run_all import REPO, bench_env, fmt, header, load_average, table, write_section

SECTION = "Large images"
INTRO = """Peak memory of each stage for camera-sized photos at the VOC recipe's scales (`benchmarks/large_images.py`)."""
WSSEG = Path(sys.executable).parent / "wsseg"
STAGES = ("train-cam", "make-cam", "mine-relations", "train-irn", "synthesize-labels")


def run_stage(stage: str, sets: list[str]) -> tuple[int, float, float]:
    """(exit status, peak RSS in MB, seconds) of one `wsseg <stage>` process."""
    command = [str(WSSEG), stage, "--config", str(REPO / "pipelines" / "voc.yaml"), *[a for s in sets for a in ("--set", s)]]
    began = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, env=bench_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if process.returncode not in (0, -9):
        raise SystemExit(f"{stage} failed ({process.returncode}):\n{error[-2000:]}")
    return process.returncode, usage.ru_maxrss / 1024, time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,2000,4000", help="long sides in pixels, comma-separated")
    parser.add_argument("--one-image", action="store_true",
                        help="every stage on the first training image only (peak memory is per image; time is a third)")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    work = REPO / "runs" / "bench" / "large_images"
    load_before = load_average()
    rows, sizes_seen = [], []
    for size in [int(s) for s in args.sizes.split(",")]:
        data, run = work / f"data-{size}", work / f"run-{size}"
        if not (data / "ImageSets" / "Segmentation" / "val.txt").exists():
            subprocess.run([str(WSSEG), "demo-data", "--out", str(data), "--images", "4", "--size", str(size)], check=True,
                           cwd=REPO, stdout=subprocess.DEVNULL)
        shutil.rmtree(run, ignore_errors=True)
        train, batch = "train", 2
        if args.one_image:
            lists = data / "ImageSets" / "Segmentation"
            first = (lists / "train.txt").read_text().split()[0]
            (lists / "one.txt").write_text(first + "\n")
            train, batch = "one", 1
            with Image.open(data / "JPEGImages" / f"{first}.jpg") as image:
                sizes_seen.append(f"{size} px: {image.width} x {image.height}")
        sets = [f"data.root={data}", "data.classes=[boat,crate,truck,ring,ball]", f"data.train_list={train}",
                f"data.label_list={train}", f"data.eval_list={train}", "data.val_list=val", "data.segmenter_train_list=train",
                f"run.dir={run}", "run.workers=0", "backbone.weights=null", "irn.backbone_init=cam", "cam.epochs=1", f"cam.batch_size={batch}",
                "irn.epochs=1", f"irn.batch_size={batch}"]
        cells = [f"{size} px"]
        killed = False
        for stage in STAGES:
            if killed:
                cells.append("not run")
                continue
            status, peak, seconds = run_stage(stage, sets)
            killed = status == -9
            cells.append(f"{'killed at ' if killed else ''}{fmt(peak / 1024, 3)} GB ({fmt(seconds, 3)} s)")
            print(size, stage, cells[-1], flush=True)
        rows.append(cells)
    notes = ["pipelines/voc.yaml (ResNet-50, width 1.0; make-cam scales 1.0/0.5/1.5/2.0 with flips), random init, one "
             f"epoch per training stage{' with batch 1' if args.one_image else ''}, run.workers 0; peak resident memory of each stage's process (and its time)",
             "images: the demo's at that long side, short side 0.7-1.0 of it ("
             + (f"one image through every stage: {', '.join(sizes_seen)}" if args.one_image
                else "4 images; 3 get CAMs and labels") + ")"]
    text = "\n".join(header("large_images.py", load_before, notes, how="each stage its own process")) + "\n\n"
    text += table(["long side", *STAGES], rows)
    print(text)
    if not args.no_docs:
        write_section(SECTION, INTRO, "CPU", text)


if __name__ == "__main__":
    main()
