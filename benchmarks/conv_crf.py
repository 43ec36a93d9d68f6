"""ConvCRF against DenseCRF: the same CRF energy, windowed messages instead of the lattice.

    .venv/bin/python benchmarks/conv_crf.py                 # updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/conv_crf.py --variants 11x4 --no-docs

Two measurements:

1. The stages where IRN's CRF runs, with `relations.crf_method=conv` (each `--variants` entry:
   crf_window x crf_blur), against the DenseCRF run they copy (`--run`, default runs/demo,
   finished through mine-relations): the real command, `wsseg run-all --from train-amn --to
   mine-relations` (train-amn mines relation labels from the CAMs with the same CRF; AMN's
   maps then feed mine-relations), in a hard-linked copy of the run (the copy's stages
   rewrite their files atomically, so the original is never touched). Reported: agreement
   with the DenseCRF run's maps (share of pixels with the same label: background, class or
   the unsure 255) for AMN's relation labels (the same CAMs through each CRF: the CRF alone)
   and for mine-relations' maps (after AMN retrained on them), relation precision and
   coverage (the stage's own evaluation), and mine-relations' seconds per image.
2. One CRF call (`crf_from_labels`, IRN's settings, 10 iterations, 3 labels) on a demo image
   and its CAM labels resized to 128x128 and 500x375: DenseCRF and each ConvCRF variant,
   one thread, the median of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from run_all import REPO, bench_env, fmt, header, load_average, table, write_section
from segmenters import copy_run
from wsseg.ops.crf import crf_from_labels
from wsseg.stages.train_amn import LABELS as AMN_LABELS

SECTION = "ConvCRF"
INTRO = """ConvCRF (wsseg.ops.conv_crf) against pydensecrf's DenseCRF with the same parameters, measured by
`benchmarks/conv_crf.py`."""
WSSEG = Path(sys.executable).parent / "wsseg"


def relations_record(run: Path) -> dict:
    return json.loads((run / "relations" / "stage.json").read_text())


def agreement(run: Path, reference: Path, folder: str) -> float:
    same = total = 0
    for path in sorted((reference / folder).glob("*.png")):
        a = np.asarray(Image.open(path))
        b = np.asarray(Image.open(run / folder / path.name))
        same += int((a == b).sum())
        total += a.size
    return same / total


def stage_row(name: str, run: Path, reference: Path) -> list[str]:
    record = relations_record(run)
    metrics, items = record["metrics"], record.get("items", {})
    images = items.get("done") or items.get("total") or len(list((run / "relations").glob("*.png")))
    agree = [fmt(agreement(run, reference, folder)) if run != reference else "1 (itself)" for folder in (AMN_LABELS, "relations")]
    return [name, *agree, fmt(metrics.get("precision")), fmt(metrics.get("coverage")), fmt(record["seconds"] / images, 3)]


def call_times(variants: list[tuple[int, int]], repeats: int) -> list[list[str]]:
    """DenseCRF and each ConvCRF variant on one demo image and its labels at two sizes."""
    torch.set_num_threads(1)
    image_path = next((REPO / "data" / "demo" / "JPEGImages").glob("*.jpg"))
    image = Image.open(image_path).convert("RGB")
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 3, (6, 6)).astype(np.uint8)
    rows = []
    for size in ((128, 128), (375, 500)):
        rgb = np.asarray(image.resize(size[::-1], Image.BILINEAR))
        labels = np.asarray(Image.fromarray(coarse).resize(size[::-1], Image.NEAREST)).astype(np.int64)
        settings = [("dense", {"method": "dense"})] + [(f"conv {w}x{b}", {"method": "conv", "window": w, "blur": b})
                                                      for w, b in variants]
        reference = crf_from_labels(rgb, labels, 3)
        for name, kwargs in settings:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                out = crf_from_labels(rgb, labels, 3, **kwargs)
                times.append(time.perf_counter() - start)
            rows.append([f"{size[1]}x{size[0]}", name, fmt(float(np.median(times)), 3), fmt(float((out == reference).mean()))])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="a demo run finished through mine-relations")
    parser.add_argument("--config", type=Path, default=REPO / "pipelines" / "demo.yaml")
    parser.add_argument("--variants", default="11x4,33x4,11x2", help="ConvCRF settings, crf_window x crf_blur, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per CRF setting")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    args.run, args.config = args.run.resolve(), args.config.resolve()
    os.chdir(REPO)
    variants = [tuple(int(v) for v in item.split("x")) for item in args.variants.split(",")]
    if not (args.run / "relations" / "stage.json").exists():
        raise SystemExit(f"--run {args.run}: no finished mine-relations; run `wsseg run-all --to mine-relations` first")
    load_before = load_average()
    stage_rows = [stage_row("dense (the run's own)", args.run, args.run)]
    work = REPO / "runs" / "bench" / "conv-crf"
    for window, blur in variants:
        run = work / f"w{window}-b{blur}"
        copy_run(args.run, run)
        command = [str(WSSEG), "run-all", "--config", str(args.config), "--from", "train-amn", "--to", "mine-relations",
                   "--set", f"run.dir={run}", "--set", "relations.crf_method=conv",
                   "--set", f"relations.crf_window={window}", "--set", f"relations.crf_blur={blur}"]
        print(" ".join(command[1:]), flush=True)
        result = subprocess.run(command, cwd=REPO, env=bench_env(), capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"conv {window}x{blur} failed:\n{result.stderr[-3000:]}")
        stage_rows.append(stage_row(f"conv, window {window}, blur {blur}", run, args.run))
        shutil.rmtree(run)
    calls = call_times(variants, args.repeats)
    text = "\n".join(header("conv_crf.py", load_before, [
        "agreement: share of relation-map pixels (background / class / unsure 255) equal to the DenseCRF run's; "
        "precision and coverage: the stage's own evaluation; seconds per image: the stage's wall time over its images"]))
    text += "\n\n" + table(["CRF", "agreement with dense: AMN's relation labels (same CAMs)",
                             "mine-relations' maps (after AMN)", "precision", "coverage", "mine-relations s / image"],
                            stage_rows)
    text += "\n\nOne `crf_from_labels` call (IRN's settings, 3 labels, 10 iterations), one thread; agreement with DenseCRF's labels:\n\n"
    text += table(["size", "CRF", "seconds", "agreement with dense"], calls)
    print("\n" + text)
    if not args.no_docs:
        write_section(SECTION, INTRO, "CPU", text)


if __name__ == "__main__":
    main()
