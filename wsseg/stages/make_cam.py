"""make-cam: multi-scale + flip CAMs for every image (ALGORITHMS.md §1.2) into cams/<id>.npz.

Covers the images of `data.label_list` and `data.eval_list`; resumes per image; under
torchrun each rank takes its share. At the end, when ground truth exists, the CAMs are
evaluated (mIoU at `cam.eval_threshold` and the best of `cam.sweep`).
"""

from __future__ import annotations

import numpy as np
import torch

from wsseg.config import Config
from wsseg.context import Progress, StageContext
from wsseg.data.transforms import normalize
from wsseg.errors import UserError
from wsseg.metrics import best_background_threshold
from wsseg.ops.thresholds import otsu_threshold, relative_power, value_histogram
from wsseg.models.cam import inference_network, multiscale_cams
from wsseg.stages.artifacts import (cam_path, ids_with_ground_truth, image_ids, npz_is_whole, npz_looks_whole, open_dataset,
                                    read_cams, write_cams)
from wsseg.stages.per_image import for_each_image, skipped_ids
from wsseg.stages.train_cam import load_network
from wsseg.store import RunStore

NAME = "make-cam"
NEEDS = ("train-cam",)
SECTIONS = ("data.root", "data.classes", "data.label_list", "data.eval_list", "data.cls_labels", "cam.scales")
VERSION = 1
OUTPUTS = ("cams",)
HEADLINE = "miou"


def run(ctx: StageContext) -> dict:
    config = ctx.config
    dataset = open_dataset(config)
    ids = image_ids(config, "data.label_list", "data.eval_list")
    # BatchNorms folded into the convs, channels_last on CPU always (it pays there at every
    # size measured, docs/BENCHMARKS.md) and on CUDA as run.channels_last says.
    channels_last = ctx.device.type == "cpu" or config.run.channels_last
    model = inference_network(load_network(config, ctx.store).to(ctx.device), channels_last=channels_last)
    folder = ctx.folder("cams")

    def work(image_id: str) -> None:
        image = torch.from_numpy(normalize(dataset.read_image(image_id))).permute(2, 0, 1).to(ctx.device)
        keys = torch.from_numpy(dataset.tags(image_id)).to(ctx.device)
        cam, high_res = multiscale_cams(model, image, keys, config.cam.scales, amp_dtype=ctx.amp_dtype)
        write_cams(cam_path(ctx.store, image_id), keys.cpu().numpy(), cam.cpu().numpy(), high_res.cpu().numpy())

    counts = for_each_image(ctx, ids, lambda i: cam_path(ctx.store, i), npz_is_whole, work, report_folder=folder)
    ctx.dist.barrier()
    metrics = {}
    if ctx.dist.is_main:
        metrics["otsu_threshold"] = cam_otsu_level(ids, ctx.store)
        metrics.update(evaluate(config, ctx.store, ctx.progress, otsu=metrics["otsu_threshold"]))
    return {"metrics": metrics, "items": {"done": len(ids) - len(skipped_ids(folder)), "total": len(ids)}, "counters": counts}


def damaged(config: Config, store: RunStore) -> list[str]:
    """Images whose CAM file is missing or damaged although the stage completed."""
    skipped = skipped_ids(store.folder("cams"))
    ids = [i for i in image_ids(config, "data.label_list", "data.eval_list") if i not in skipped]
    return [i for i in ids if not npz_looks_whole(cam_path(store, i))]


def count_done(config: Config, store: RunStore) -> tuple[int, int]:
    ids = image_ids(config, "data.label_list", "data.eval_list")
    return sum(cam_path(store, i).exists() for i in ids), len(ids)


MAX_OTSU_IMAGES = 2000  # a deterministic sample is plenty for a 256-bin histogram


def cam_otsu_level(ids: list[str], store: RunStore) -> float | None:
    """Otsu's threshold of the per-pixel max CAM over (a sample of) the images: where these CAMs
    split foreground from background, without ground truth (see wsseg/ops/thresholds.py)."""
    histogram = np.zeros(256, np.int64)
    for image_id in ids[:: max(1, len(ids) // MAX_OTSU_IMAGES)]:
        cams = read_cams(cam_path(store, image_id))
        if cams is not None and cams["keys"].size:
            histogram += value_histogram(cams["high_res"].max(axis=0))
    return round(otsu_threshold(histogram), 4) if histogram.any() else None


def cam_power(config: Config, store: RunStore) -> float:
    """The exponent later stages apply to the CAMs: 1 in fixed mode; γ from make-cam's Otsu level in relative mode."""
    if config.cam.threshold_mode == "fixed":
        return 1.0
    record = store.record("cams") or {}
    otsu = (record.get("metrics") or {}).get("otsu_threshold")
    if otsu is None:
        raise UserError("cam.threshold_mode: relative needs make-cam's Otsu level; rerun make-cam (--force)")
    return relative_power(min(max(otsu, 1e-3), 1 - 1e-3), config.cam.eval_threshold)


def evaluate(config: Config, store: RunStore, progress=None, otsu: float | None = None) -> dict:
    """CAM mIoU on the evaluation list: at cam.eval_threshold, at the relative-mode threshold
    (eval_threshold on CAM^γ), and at the best of cam.sweep."""
    if otsu is None:
        otsu = ((store.record("cams") or {}).get("metrics") or {}).get("otsu_threshold")
    dataset = open_dataset(config)
    ids = ids_with_ground_truth(dataset, image_ids(config, "data.eval_list"))
    ids = [i for i in ids if cam_path(store, i).exists()]
    if not ids:
        return {"evaluated_images": 0}
    relative = round(otsu, 4) if otsu else None  # eval_threshold on CAM^γ = Otsu's level on the CAM
    thresholds = sorted(set(config.cam.sweep) | {config.cam.eval_threshold} | ({relative} if relative else set()))

    def images():
        iterator = progress(ids, desc="make-cam: evaluating") if progress else Progress(ids, None, "", enabled=False)
        for image_id in iterator:
            cams = read_cams(cam_path(store, image_id))
            if cams is None:
                continue
            yield cams["high_res"], cams["keys"], dataset.read_semantic(image_id)

    result = best_background_threshold(images(), thresholds, len(config.data.classes) + 1)
    at = thresholds.index(config.cam.eval_threshold)
    names = ["background", *config.data.classes]
    summary = result["matrices"][at].summary(names)
    best_summary = result["matrices"][thresholds.index(result["best_threshold"])].summary(names)
    return {
        "evaluated_images": len(ids),
        "miou": summary["miou"],
        "otsu_threshold": otsu,
        "miou_relative": result["miou"][thresholds.index(relative)] if relative else None,
        "threshold": config.cam.eval_threshold,
        "best_threshold": result["best_threshold"],
        "best_miou": result["best_miou"],
        "sweep": {f"{t:.2f}": m for t, m in zip(result["thresholds"], result["miou"])},
        "per_class_iou": summary["per_class_iou"],
        "best_per_class_iou": best_summary["per_class_iou"],
        "pixel_accuracy": summary["pixel_accuracy"],
    }


def cam_label_map(cams: dict[str, np.ndarray], threshold: float) -> np.ndarray:
    """The thresholded CAM labels (H, W) uint8: class id where max CAM > threshold, else 0."""
    high_res, keys = cams["high_res"], cams["keys"]
    if keys.size == 0:
        return np.zeros(high_res.shape[1:], np.uint8)
    best = high_res.argmax(axis=0)
    return np.where(high_res.max(axis=0) > threshold, keys[best] + 1, 0).astype(np.uint8)
