"""The whole pipeline: per-stage wall time of `make demo`, and a projection to VOC 2012 train_aug on this CPU.

    .venv/bin/python benchmarks/pipeline.py                      # updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/pipeline.py --run-dir runs/other # another finished demo-sized run

Part 1 reads the stage records of a finished demo run (runs/demo/**/stage.json:
'seconds', 'items', the stage's own images/s); with no complete run there, it runs the
demo into a temporary run directory first (minutes). Part 2 projects IRN's VOC 2012
recipe onto this CPU from per-image (or per-step) costs measured at VOC sizes: the last
results of make_cam.py, crf.py and training.py (runs/bench/*.json; a missing one is
measured first, without touching docs), plus one synthesize-labels image measured here
(`wsseg.stages.synthesize_labels.synthesize` on a 500x375 image with a random-weight
ResNet-50 IRN: boundary inference at the 512 canvas, the random walks, the grouping).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from run_all import (REPO, bench_env, emit, fmt, header, load_average, load_results, run_worker, save_results, table,
                     write_section)

SECTION = "Whole pipeline"
STAGE_ORDER = ("train-cam", "make-cam", "mine-relations", "train-irn", "synthesize-labels", "train-segmenter")

# VOC 2012 train_aug with IRN's recipe (docs/ALGORITHMS.md §1, pipelines/voc.yaml).
TRAIN_AUG = 10_582
CAM_EPOCHS, CAM_BATCH = 5, 16
IRN_EPOCHS, IRN_BATCH = 3, 32
SEGMENTER_STEPS, SEGMENTER_BATCH = 20_000, 10
MAKE_CAM_SCALES = 4
TRAINING_STAGES = ("train-cam", "train-irn", "train-segmenter")


# ----------------------------------------------------------------- part 1: make demo


def stage_records(run_dir: Path) -> list[dict]:
    records = []
    for path in run_dir.glob("**/stage.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("stage") in STAGE_ORDER:
            records.append(record)
    return sorted(records, key=lambda r: STAGE_ORDER.index(r["stage"]))


def complete(records: list[dict]) -> bool:
    done = {r["stage"] for r in records if r.get("status") == "complete"}
    return done >= set(STAGE_ORDER)


def run_demo(run_dir: Path) -> None:
    print(f"no complete demo run found: running the demo into {run_dir} (minutes)", flush=True)
    command = [str(REPO / ".venv" / "bin" / "wsseg"), "run-all", "--config", str(REPO / "pipelines" / "demo.yaml"),
               "--set", f"run.dir={run_dir}", "--set", f"data.root={REPO / 'data' / 'demo'}"]
    result = subprocess.run(command, cwd=REPO, env=bench_env())
    if result.returncode != 0:
        raise SystemExit("the demo run failed; see its output above")


def items_text(record: dict) -> str:
    metrics = record.get("metrics") or {}
    inputs = record.get("inputs") or {}
    if record.get("items"):
        return f"{record['items'].get('done', '')} images"
    if record["stage"] == "train-segmenter":
        parts = [f"{source}: {m['train_images']} x {m['epochs']} epochs" for source, m in metrics.items()
                 if isinstance(m, dict) and "train_images" in m]
        return "; ".join(parts)
    epochs = inputs.get("cam.epochs") if record["stage"] == "train-cam" else inputs.get("irn.epochs")
    images = metrics.get("train_images") or train_list_length(record) or ""
    return f"{images} images x {epochs} epochs" if epochs else str(images)


def train_list_length(record: dict) -> int | None:
    """Images in the record's data.train_list (train-irn's record does not count them)."""
    from wsseg.data.voc import read_id_list

    data = (record.get("config") or {}).get("data") or {}
    try:
        root = Path(data["root"])
        return len(read_id_list(root if root.is_absolute() else REPO / root, data["train_list"]))
    except Exception:  # noqa: BLE001 - a moved dataset only loses this one number
        return None


def rate_text(record: dict) -> str:
    metrics = record.get("metrics") or {}
    if "images_per_second" in metrics:
        return fmt(metrics["images_per_second"])
    rates = [m["images_per_second"] for m in metrics.values() if isinstance(m, dict) and "images_per_second" in m]
    if rates:
        return " / ".join(fmt(r) for r in rates)
    done = (record.get("items") or {}).get("done")
    return fmt(done / record["seconds"]) if done and record.get("seconds") else ""


def demo_table(records: list[dict]) -> tuple[str, float, str]:
    total = sum(r.get("seconds", 0.0) for r in records)
    rows = [[r["stage"], items_text(r), fmt(r.get("seconds")), f"{100 * r.get('seconds', 0) / total:.0f} %", rate_text(r)]
            for r in records]
    rows.append(["**total**", "", fmt(total), "100 %", ""])
    started = min(r["started"] for r in records if r.get("started"))
    finished = max(r["finished"] for r in records if r.get("finished"))
    span = (datetime.datetime.fromisoformat(finished) - datetime.datetime.fromisoformat(started)).total_seconds()
    note = (f"stages ran from {started} to {finished} ({span:.0f} s wall, evaluation included; "
            f"the stages' own 'seconds' sum to {total:.0f} s)")
    return table(["stage", "items", "seconds", "share", "images/s (the stage's own, else items / seconds)"], rows, "llrrr"), total, note


# ---------------------------------------------------- part 2: synthesize-labels at VOC size


def worker_synthesize(args) -> dict:
    import torch

    from wsseg.config import load_config
    from wsseg.models.backbones import ResNet
    from wsseg.models.irn import IRNet
    from wsseg.stages.synthesize_labels import synthesize
    from wsseg.stages.train_irn import IRN_STRIDES

    sys.path.insert(0, str(REPO / "benchmarks"))
    from make_cam import voc_image

    torch.manual_seed(0)
    config = load_config([REPO / "pipelines" / "voc.yaml"], ["backbone.weights=null"])
    model = IRNet(ResNet(50, strides=IRN_STRIDES, frozen_bn=True, trainable=())).eval()
    times, seeds = [], []
    for index in range(args.count):
        image, keys = voc_image(index)
        height, width = image.shape[:2]
        # CAM-like maps: one smooth bump per present class, max-normalised
        rows, cols = np.mgrid[: (height + 3) // 4, : (width + 3) // 4]
        cam = np.stack([np.exp(-(((rows - 20 - 30 * k) / 15.0) ** 2 + ((cols - 30 - 40 * k) / 20.0) ** 2))
                        for k in range(len(keys))]).astype(np.float32)
        cams = {"keys": keys, "cam": cam, "high_res": np.zeros((len(keys), height, width), np.float32)}
        start = time.perf_counter()
        out = synthesize(model, image, cams, config, torch.device("cpu"))
        times.append(time.perf_counter() - start)
        seeds.append(len(keys) * (int(out["groups"].max()) + 1))
    return {"seconds": float(np.median(times)), "all_seconds": times, "seed_channels": float(np.mean(seeds))}


def costs(args) -> dict:
    """Per-image seconds of every stage at VOC size, and where each came from."""
    # what the projection reads from each result file; a file without it is measured again
    needed = {
        "make_cam": ([], lambda r: r.get("voc_images_per_second")),
        "crf": (["--repeats", "2"], lambda r: "500x375_L3" in r.get("crf", {}) and "1" in r.get("mine", {})),
        "training": (["--sizes", "voc"], lambda r: set(TRAINING_STAGES) <= set(r.get("voc", {}))),
    }
    for name, (extra, usable) in needed.items():
        results = load_results(name)
        if results is None or not usable(results):
            print(f"no VOC-sized results of benchmarks/{name}.py yet: running it (without touching docs)", flush=True)
            subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--no-docs", *extra],
                           cwd=REPO, env=bench_env(), check=True)
    make_cam, crf, training = (load_results(n) for n in needed)
    voc = training["voc"]

    def record_of(stage: str) -> dict:
        runs = voc[stage]
        return runs.get("2") or next(iter(runs.values()))  # run.workers 2 (voc.yaml's) where measured

    def per_image(stage: str) -> float:
        return record_of(stage)["step_seconds"] / record_of(stage)["batch"]

    crf_pair = 2 * crf["crf"]["500x375_L3"]
    mine = crf["mine"]
    one, two = mine.get("1"), mine.get("2")
    scaling = max(1.0, (two["images"] / two["seconds"]) / (one["images"] / one["seconds"])) if one and two else 1.0
    synth = run_worker(__file__, ["--worker", "synthesize", "--count", str(args.synthesize_images)])
    per = {
        "train-cam": per_image("train-cam"),
        "make-cam": 1.0 / make_cam["voc_images_per_second"],
        "mine-relations": crf_pair / scaling,
        "train-irn": per_image("train-irn"),
        "synthesize-labels": synth["seconds"],
        "train-segmenter": per_image("train-segmenter"),
    }
    batch = record_of("train-cam")["batch"]
    sources = {
        "train-cam": f"{fmt(per['train-cam'])} s per 512 crop (training.py, batch {batch})",
        "make-cam": f"{fmt(per['make-cam'])} s per image (make_cam.py, wsseg)",
        "mine-relations": f"2 x {fmt(crf_pair / 2)} s DenseCRF at 500x375, 3 labels (crf.py), / {scaling:.2f} "
                          "for 2 workers (measured scaling, at least 1)",
        "train-irn": f"{fmt(per['train-irn'])} s per 512 crop (training.py, radius 10)",
        "synthesize-labels": f"{fmt(per['synthesize-labels'])} s per image (measured here, "
                             f"{synth['seed_channels']:.0f} instance seeds walked)",
        "train-segmenter": f"{fmt(per['train-segmenter'])} s per 321 crop (training.py, DeepLab-v2 R50)",
    }
    dates = {n: r.get("date", "?") for n, r in (("make_cam", make_cam), ("crf", crf), ("training", training))}
    return {"per_image": per, "sources": sources, "dates": dates, "synthesize": synth}


def projection_table(measured: dict) -> tuple[str, float]:
    per, sources = measured["per_image"], measured["sources"]
    work = {
        "train-cam": (CAM_EPOCHS * (TRAIN_AUG // CAM_BATCH) * CAM_BATCH,
                      f"{CAM_EPOCHS} epochs x {TRAIN_AUG // CAM_BATCH * CAM_BATCH:,} crops (batch {CAM_BATCH}, drop last)"),
        "make-cam": (TRAIN_AUG, f"{TRAIN_AUG:,} images x {MAKE_CAM_SCALES} scales + flips"),
        "mine-relations": (TRAIN_AUG, f"{TRAIN_AUG:,} images x 2 DenseCRFs"),
        "train-irn": (IRN_EPOCHS * (TRAIN_AUG // IRN_BATCH) * IRN_BATCH,
                      f"{IRN_EPOCHS} epochs x {TRAIN_AUG // IRN_BATCH * IRN_BATCH:,} crops (batch {IRN_BATCH})"),
        "synthesize-labels": (TRAIN_AUG, f"{TRAIN_AUG:,} images, walks on 125x94 maps"),
        "train-segmenter": (SEGMENTER_STEPS * SEGMENTER_BATCH,
                            f"{SEGMENTER_STEPS:,} steps x batch {SEGMENTER_BATCH} (321 crops)"),
    }
    rows, total = [], 0.0
    for stage in STAGE_ORDER:
        count, text = work[stage]
        seconds = count * per[stage]
        total += seconds
        rows.append([stage, text, sources[stage], f"{seconds / 3600:,.1f}", f"{seconds / 86400:.2f}"])
    rows.append(["**total**", "", "", f"{total / 3600:,.0f}", f"{total / 86400:.1f}"])
    return table(["stage", "work (IRN's VOC recipe)", "measured cost (source)", "hours", "days"], rows, "lllrr"), total


# ------------------------------------------------------------------------ driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=str(REPO / "runs" / "demo"), help="a finished demo run (read only)")
    parser.add_argument("--synthesize-images", type=int, default=2, help="VOC-sized images for synthesize-labels")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    parser.add_argument("--worker", choices=["synthesize"])
    parser.add_argument("--count", type=int, default=1)
    args = parser.parse_args()
    if args.worker == "synthesize":
        emit(worker_synthesize(args))
        return

    load_before = load_average()
    run_dir = Path(args.run_dir)
    records = stage_records(run_dir)
    origin = f"the stage records of {run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir}"
    with tempfile.TemporaryDirectory() as tmp:
        if not complete(records):
            fresh = Path(tmp) / "demo"
            run_demo(fresh)
            records = stage_records(fresh)
            origin = "a demo run made for this benchmark in a temporary run directory (runs/demo was incomplete)"
    demo, demo_total, demo_note = demo_table(records)
    measured = costs(args)
    projection, total = projection_table(measured)
    print("\n" + demo + "\n\n" + projection)
    save_results("pipeline", {"demo_seconds": demo_total, "voc_projection_seconds": total, **measured})
    if args.no_docs:
        return
    notes = [f"make demo: {origin}; {demo_note}"]
    body = "\n".join(header("pipeline.py", load_before, notes)) + "\n\n" + demo
    dates = ", ".join(f"{name}.py {date}" for name, date in measured["dates"].items())
    body += (
        "\n\nProjection to VOC 2012 train_aug (10,582 images, ~500x375) with IRN's recipe on this CPU, from the costs "
        f"measured at VOC sizes (runs of {dates}):\n\n" + projection + "\n\n" + "\n".join(f"- {a}" for a in ASSUMPTIONS)
    )
    write_section(SECTION, INTRO, "CPU", body)


ASSUMPTIONS = [
    "per-image cost is taken as independent of the batch size: the training steps were measured at a small batch "
    "(CPU convolutions are close to linear in the batch), with the data loading in the step (run.workers 0; it is "
    "~1 % of a VOC-sized step)",
    "the costs come from one run on a shared 2-core machine: with other jobs running they vary up to ~2x between "
    "runs (see each benchmark's load average), so read the totals as an order of magnitude",
    "time is CPU compute only: no ImageNet download, no checkpoints, no evaluation (CAM mIoU on train, the "
    "segmenter's multi-scale + CRF validation on 1,449 val images are extra)",
    "weights are random: step costs do not depend on them; synthesize-labels' instance walk does (its seeds = "
    "classes x displacement groups; real VOC images have a few per class)",
    "make-cam and synthesize-labels cover train_aug (the CAM evaluation list, VOC train, is a subset of it)",
    "GPU: not measured here (no GPU on this machine), so no GPU projection is given",
]

INTRO = """\
Per-stage wall time of `make demo`, and what IRN's VOC 2012 recipe would take on this
CPU, projected from costs measured at VOC sizes by the other benchmarks; measured by
`benchmarks/pipeline.py`."""


if __name__ == "__main__":
    main()
