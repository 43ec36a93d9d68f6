"""mine-relations and the CPU-bound per-image work: DenseCRF, relation maps, instance grouping.

    .venv/bin/python benchmarks/crf.py                       # updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/crf.py --images 180 --workers 1,2,4 --no-docs

Three measurements, each in a fresh process:

- mine-relations images/s with 1 and 2 worker processes (`run.workers`): joblib over the
  stage's per-image work (read the cached CAMs and the image, `relation_labels`: two
  DenseCRFs, write the PNG) on the demo images, with the demo config. The CAMs are the
  demo run's (runs/demo/cams, copied to a temporary run directory); images without a
  cached CAM get one from the demo CAM network. The worker pool is started and warmed
  before the clock starts (the stage pays that start once per run: reported apart).
- DenseCRF (`wsseg.ops.crf.crf_from_labels`, IRN's settings) seconds per call and per
  megapixel on a demo image and label map resized to 500x375 and to 128x128.
- Instance grouping (`wsseg.ops.instances.centroid_groups`, 300 steps) per image on a
  demo-sized 32x32 and a VOC-sized 94x125 stride-4 displacement field.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from run_all import (REPO, emit, fmt, header, load_average, peak_mib, max_rss_kb, run_worker, save_results, table,
                     write_section)
from wsseg.config import load_config
from wsseg.ops.crf import crf_from_labels
from wsseg.ops.instances import centroid_groups
from wsseg.checkpoints import load_checkpoint
from wsseg.stages import artifacts
from wsseg.stages.mine_relations import relation_labels, relation_path
from wsseg.store import RunStore

SECTION = "Mine-relations, DenseCRF, instance grouping"
DEMO_CONFIG = REPO / "pipelines" / "demo.yaml"
DEMO_RUN = REPO / "runs" / "demo"
CRF_SIZES = ((375, 500), (128, 128))  # (H, W): a VOC image, a demo image
GROUP_SIZES = ((32, 32), (94, 125))  # stride-4 maps of a 128x128 demo image and a 500x375 VOC image


def config_for(run_dir: Path):
    return load_config([DEMO_CONFIG], [f"run.dir={run_dir}", f"data.root={REPO / 'data' / 'demo'}"])


# ----------------------------------------------------------------------- workers


def mine_one(config, run_dir: str, power: float, image_id: str) -> float:
    """The stage's per-image work: cached CAMs + image -> relation map PNG. Returns its CPU seconds."""
    started = time.process_time()
    store = RunStore(run_dir)
    cams = artifacts.read_cams(artifacts.cam_path(store, image_id))
    image = artifacts.open_dataset(config).read_image(image_id)
    artifacts.write_labels(relation_path(store, image_id), relation_labels(image, cams, config, power))
    return time.process_time() - started


def worker_mine(args) -> dict:
    from joblib import Parallel, delayed

    from wsseg.stages.make_cam import cam_power, read_levels

    config = config_for(Path(args.run_dir))
    store = RunStore(args.run_dir)
    ids = artifacts.image_ids(config, "data.label_list")[: args.count]
    power = cam_power(config, store) if read_levels(store) else 1.0
    work = functools.partial(mine_one, config, args.run_dir, power)
    baseline = max_rss_kb()
    if args.workers <= 1:
        start = time.perf_counter()
        cpu = [work(image_id) for image_id in ids]
        return {"seconds": time.perf_counter() - start, "images": len(ids), "pool_start": 0.0,
                "cpu_per_image": float(np.mean(cpu)), "peak_mib": peak_mib(baseline), "power": power}
    with Parallel(n_jobs=args.workers, batch_size=1, return_as="generator_unordered") as parallel:
        # Start the pool and warm each worker (its imports, the function's unpickling) on
        # the first images; they are done again, timed, below.
        started = time.perf_counter()
        list(parallel(delayed(work)(image_id) for image_id in ids[: args.workers]))
        pool_start = time.perf_counter() - started
        start = time.perf_counter()
        cpu = list(parallel(delayed(work)(image_id) for image_id in ids))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": len(ids), "pool_start": pool_start, "cpu_per_image": float(np.mean(cpu)),
            "peak_mib": peak_mib(baseline), "power": power}


def worker_cams(args) -> dict:
    """Write CAMs for the images of the label list that have none (the demo CAM network, random if absent)."""
    import torch

    from wsseg.data.transforms import normalize
    from wsseg.models.cam import multiscale_cams
    from wsseg.stages.train_cam import build_network

    config = config_for(Path(args.run_dir))
    store = RunStore(args.run_dir)
    torch.manual_seed(0)
    model = build_network(config, load_pretrained=False)
    trained = DEMO_RUN / "cam" / "model.pt"
    if trained.exists():
        model.load_state_dict(load_checkpoint(trained, "the demo CAM network")["model"])
    dataset = artifacts.open_dataset(config)
    made = 0
    for image_id in artifacts.image_ids(config, "data.label_list")[: args.count]:
        path = artifacts.cam_path(store, image_id)
        if artifacts.read_cams(path) is not None:
            continue
        image = torch.from_numpy(normalize(dataset.read_image(image_id))).permute(2, 0, 1)
        keys = torch.from_numpy(dataset.tags(image_id))
        cam, high_res = multiscale_cams(model, image, keys, config.cam.scales)
        path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.write_cams(path, keys.numpy(), cam.numpy(), high_res.numpy())
        made += 1
    return {"made": made, "trained": trained.exists()}


def crf_inputs(size: tuple[int, int], num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """A demo image and its ground-truth map reduced to `num_labels` labels, resized to `size` (H, W)."""
    config = config_for(REPO / "runs" / "unused")
    dataset = artifacts.open_dataset(config)
    for image_id in artifacts.image_ids(config, "data.train_list"):  # the first image with two object classes
        truth = dataset.read_semantic(image_id)
        classes = [c for c in np.unique(truth) if c not in (0, 255)]
        if len(classes) >= 2:
            break
    # np.array copies: pydensecrf refuses read-only buffers (np.asarray of a PIL image is one)
    image = np.array(Image.fromarray(dataset.read_image(image_id)).resize(size[::-1], Image.BICUBIC))
    truth = np.array(Image.fromarray(truth).resize(size[::-1], Image.NEAREST))
    labels = np.zeros(truth.shape, np.int64)  # label 0 background (and void), 1.. the object classes
    for index, value in enumerate(classes[: num_labels - 1]):
        labels[truth == value] = index + 1
    return image, labels


def worker_crf(args) -> dict:
    relations = config_for(REPO / "runs" / "unused").relations
    image, labels = crf_inputs(tuple(args.size), args.labels)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        crf_from_labels(image, labels, args.labels, gt_prob=relations.crf_gt_prob,
                        gaussian_sxy=relations.crf_gaussian_sxy, gaussian_compat=relations.crf_gaussian_compat,
                        bilateral_sxy=relations.crf_bilateral_sxy, bilateral_srgb=relations.crf_bilateral_srgb,
                        bilateral_compat=relations.crf_bilateral_compat, iterations=relations.crf_iterations)
        times.append(time.perf_counter() - start)
    return {"seconds": float(np.median(times))}


def displacement_field(size: tuple[int, int], seed: int) -> np.ndarray:
    """A (2, h, w) field in stride-4 pixels: every pixel points at the nearest of 3 centroids, plus noise."""
    rng = np.random.default_rng(seed)
    height, width = size
    centres = rng.uniform([0, 0], [height, width], size=(3, 2))
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    points = np.stack([rows, cols], axis=-1).astype(np.float64)
    offsets = centres[None, None] - points[:, :, None]  # (h, w, 3, 2)
    nearest = np.linalg.norm(offsets, axis=-1).argmin(axis=-1)
    field = np.take_along_axis(offsets, nearest[..., None, None], axis=2)[:, :, 0]
    return (field + rng.normal(0, 0.5, size=field.shape)).transpose(2, 0, 1).astype(np.float32)


def worker_groups(args) -> dict:
    threshold = 1.0 if tuple(args.size) == GROUP_SIZES[0] else 2.5  # the demo's setting, IRN's
    times, counts = [], []
    for seed in range(args.repeats):
        field = displacement_field(tuple(args.size), seed)
        start = time.perf_counter()
        groups = centroid_groups(field, num_steps=300, centroid_threshold=threshold)
        times.append(time.perf_counter() - start)
        counts.append(int(groups.max()) + 1)
    return {"seconds": float(np.median(times)), "groups": float(np.mean(counts)), "threshold": threshold}


# ------------------------------------------------------------------------ driver


def prepare_run(folder: Path, count: int) -> dict:
    """A temporary run directory with the demo run's cached CAMs (missing ones computed)."""
    run_dir = folder / "run"
    (run_dir / "cams").mkdir(parents=True)
    copied = 0
    source = DEMO_RUN / "cams"
    if source.is_dir():
        record = source / "stage.json"
        if record.exists():
            shutil.copy(record, run_dir / "cams" / "stage.json")
        for path in source.glob("*.npz"):
            shutil.copy(path, run_dir / "cams" / path.name)
            copied += 1
    made = run_worker(__file__, ["--worker", "cams", "--run-dir", str(run_dir), "--count", str(count)])
    return {"run_dir": run_dir, "copied": copied, **made}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=120, help="demo images per mine-relations run")
    parser.add_argument("--workers", default="1,2", help="worker processes to compare")
    parser.add_argument("--repeats", type=int, default=3, help="DenseCRF calls / grouping fields per size (median)")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    # worker mode (internal)
    parser.add_argument("--worker", choices=["mine", "cams", "crf", "groups"])
    parser.add_argument("--run-dir")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--size", type=lambda s: [int(v) for v in s.split("x")])
    parser.add_argument("--labels", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        args.workers = int(args.workers) if args.worker == "mine" else args.workers
        emit({"mine": worker_mine, "cams": worker_cams, "crf": worker_crf, "groups": worker_groups}[args.worker](args))
        return

    load_before = load_average()
    workers = [int(w) for w in args.workers.split(",")]
    results: dict = {"mine": {}, "crf": {}, "groups": {}}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = prepare_run(Path(tmp), args.images)
        mine_rows = []
        for count in workers:
            record = run_worker(__file__, ["--worker", "mine", "--run-dir", str(prepared["run_dir"]),
                                           "--count", str(args.images), "--workers", str(count)])
            results["mine"][count] = record
            rate = record["images"] / record["seconds"]
            scaling = rate / (results["mine"][workers[0]]["images"] / results["mine"][workers[0]]["seconds"])
            mine_rows.append([str(count), str(record["images"]), fmt(record["seconds"]), fmt(rate),
                              f"{scaling:.2f}x", fmt(record["cpu_per_image"]),
                              fmt(record["pool_start"]) if count > 1 else "", fmt(record["peak_mib"])])
            print(f"  mine-relations, {count} worker(s): {rate:.3g} images/s", flush=True)

    crf_rows = []
    for size in CRF_SIZES:
        for labels in (2, 3):
            record = run_worker(__file__, ["--worker", "crf", "--size", f"{size[0]}x{size[1]}", "--labels", str(labels),
                                           "--repeats", str(args.repeats)])
            megapixels = size[0] * size[1] / 1e6
            results["crf"][f"{size[1]}x{size[0]}_L{labels}"] = record["seconds"]
            crf_rows.append([f"{size[1]}x{size[0]}", str(labels), fmt(record["seconds"]), fmt(record["seconds"] / megapixels)])
            print(f"  DenseCRF {size[1]}x{size[0]}, {labels} labels: {record['seconds']:.3g} s", flush=True)

    group_rows = []
    for size in GROUP_SIZES:
        record = run_worker(__file__, ["--worker", "groups", "--size", f"{size[0]}x{size[1]}", "--repeats", str(args.repeats)])
        results["groups"][f"{size[1]}x{size[0]}"] = record["seconds"]
        group_rows.append([f"{size[1]}x{size[0]} ({'demo 128x128' if size == GROUP_SIZES[0] else 'VOC 500x375'})",
                           fmt(record["threshold"]),
                           fmt(record["groups"], 2), fmt(record["seconds"])])

    mine = table(["workers", "images", "seconds", "images/s", "vs 1 worker", "CPU s per image", "pool start (s)",
                  "peak, main process (MiB)"],
                 mine_rows)
    crf = table(["image (WxH)", "labels", "s per call", "s per megapixel"], crf_rows)
    groups = table(["stride-4 map (WxH)", "centroid threshold", "groups found", "s per image"], group_rows)
    print("\n" + mine + "\n\n" + crf + "\n\n" + groups)
    save_results("crf", results)
    if args.no_docs:
        return
    power = results["mine"][workers[0]]["power"]
    cams_note = (f"{prepared['copied']} cached CAM files copied from runs/demo/cams"
                 + (f", {prepared['made']} computed with the {'trained' if prepared['trained'] else 'random-weight'} "
                    "demo CAM network" if prepared["made"] else ""))
    notes = [
        f"mine-relations: the first {args.images} images of the demo's label list, demo config (IRN's CRF settings, "
        f"CAM^{power:.3f} in relative mode); {cams_note}; per image: read CAMs and image, two DenseCRFs "
        "(conf_fg, conf_bg), write the PNG; the pool is started and each worker warmed on one image before timing "
        "(the pool start column: paid once per stage run); "
        "CPU s per image = process time of the work inside its process, which the load of other jobs hardly changes, "
        "while images/s is wall clock on this shared machine",
        f"DenseCRF: IRN's settings (gt_prob 0.7, Gaussian sxy 3 compat 3, bilateral sxy 50 srgb 5 compat 10, "
        f"10 iterations) on a demo image and its ground truth resized; median of {args.repeats}; a mine-relations "
        "image runs two of these",
        f"instance grouping: synthetic fields pointing at 3 centroids (+ noise), 300 steps; median of {args.repeats}",
    ]
    body = "\n".join(header("crf.py", load_before, notes)) + "\n\n" + mine + "\n\n" + crf + "\n\n" + groups
    write_section(SECTION, INTRO, "CPU", body)


INTRO = """\
The CPU-bound per-image work of mine-relations and synthesize-labels, measured by
`benchmarks/crf.py`: how mine-relations scales with `run.workers` (joblib processes),
what one DenseCRF costs per megapixel, and what the displacement-field instance
grouping costs per image."""


if __name__ == "__main__":
    main()
