"""make-cam: multi-scale + flip CAMs for every image (docs/ALGORITHMS.md §1.2) into cams/<id>.npz.

Covers the images of `data.label_list` and `data.eval_list`; resumes per image; under
torchrun each rank takes its share. At the end it writes cams/levels.json, the CAMs'
own foreground/background level (Otsu's threshold) that relative threshold mode builds
on, and, when ground truth exists, evaluates the CAMs (mIoU at `cam.eval_threshold`, at
the relative level and the best of `cam.sweep`).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from wsseg import viz
from wsseg.config import Config
from wsseg.context import Progress, StageContext
from wsseg.data.transforms import normalize
from wsseg.errors import UserError
from wsseg.metrics import best_background_threshold
from wsseg.models.cam import advcam_maps, inference_network, multiscale_cams
from wsseg.ops.thresholds import otsu_threshold, relative_power, value_histogram
from wsseg.stage import Stage, fmt
from wsseg.stages.artifacts import (cam_path, ids_with_ground_truth, image_ids, is_whole, open_dataset, read_cams, seed_folder,
                                    write_cams)
from wsseg.stages.per_image import for_each_image, skipped_ids
from wsseg.stages.train_cam import load_network
from wsseg.store import RunStore, read_json, write_json


def run(ctx: StageContext) -> dict:
    config = ctx.config
    dataset = open_dataset(config)
    ids = image_ids(config, "data.label_list", "data.eval_list")
    # BatchNorms folded into the convs, channels_last on CPU always (it pays there at every
    # size measured, docs/BENCHMARKS.md) and on CUDA as run.channels_last says.
    channels_last = ctx.device.type == "cpu" or config.run.channels_last
    network = load_network(config, ctx.store).to(ctx.device)
    model = inference_network(network, channels_last=channels_last)
    # a CAM method: keep the plain CAM beside its map
    method = config.cam.advcam or bool(config.cam.dilations) or config.cam.fickle_window > 0
    samples = config.cam.fickle_samples if config.cam.fickle_window else 0
    folder = ctx.folder("cams")

    def work(image_id: str) -> None:
        image = torch.from_numpy(normalize(dataset.read_image(image_id))).permute(2, 0, 1).to(ctx.device)
        keys = torch.from_numpy(dataset.tags(image_id)).to(ctx.device)
        if config.cam.advcam:  # needs gradients through the network: the folded copy is for inference only
            cam, high_res = advcam_maps(network, image, keys, config.cam.scales, steps=config.cam.advcam_steps,
                                        step_size=config.cam.advcam_step_size,
                                        mask_threshold=config.cam.advcam_mask_threshold,
                                        regularisation=config.cam.advcam_regularisation)
        else:
            # FickleNet's random selections are drawn per image from (seed, image id): resumable and repeatable
            generator = torch.Generator(ctx.device).manual_seed(zlib.crc32(f"{config.run.seed}:{image_id}".encode()))
            cam, high_res = multiscale_cams(model, image, keys, config.cam.scales, samples=samples, generator=generator,
                                            amp_dtype=ctx.amp_dtype)
        plain = None
        if method:
            plain = multiscale_cams(model, image, keys, config.cam.scales, dilated=False, amp_dtype=ctx.amp_dtype)[1]
            plain = plain.cpu().numpy()
        write_cams(cam_path(ctx.store, image_id), keys.cpu().numpy(), cam.cpu().numpy(), high_res.cpu().numpy(), plain)

    counts = for_each_image(ctx, ids, lambda i: cam_path(ctx.store, i), work, report_folder=folder)
    ctx.dist.barrier()
    metrics = {}
    if ctx.dist.is_main:
        write_json(levels_path(ctx.store), {"otsu": cam_otsu_level(ids, ctx.store)})
        metrics.update(evaluate(config, ctx.store, ctx.progress))
    return {"metrics": metrics, "items": {"done": len(ids) - len(skipped_ids(folder)), "total": len(ids)}, "counters": counts}


def damaged(config: Config, store: RunStore, folder: str = "cams") -> list[str]:
    """Images whose CAM file is missing or damaged although the stage completed (and levels.json
    if that is: rerunning the stage rewrites it from the CAMs). `folder`: cams, or amn_cams."""
    skipped = skipped_ids(store.folder(folder))
    ids = [i for i in image_ids(config, "data.label_list", "data.eval_list") if i not in skipped]
    bad = [i for i in ids if not is_whole(cam_path(store, i, folder))]
    return bad + ([] if read_levels(store, folder) else [levels_path(store, folder).name])


def count_done(config: Config, store: RunStore, folder: str = "cams") -> tuple[int, int]:
    ids = image_ids(config, "data.label_list", "data.eval_list")
    return sum(cam_path(store, i, folder).exists() for i in ids), len(ids)


MAX_OTSU_IMAGES = 2000  # a deterministic sample is plenty for a 256-bin histogram


def cam_otsu_level(ids: list[str], store: RunStore, folder: str = "cams") -> float | None:
    """Otsu's threshold of the per-pixel max CAM over (a sample of) the images: where these CAMs
    split foreground from background, without ground truth (see wsseg/ops/thresholds.py)."""
    histogram = np.zeros(256, np.int64)
    for image_id in ids[:: max(1, len(ids) // MAX_OTSU_IMAGES)]:
        cams = read_cams(cam_path(store, image_id, folder))
        if cams is not None and cams["keys"].size:
            histogram += value_histogram(cams["high_res"].max(axis=0))
    return round(otsu_threshold(histogram), 4) if histogram.any() else None


def levels_path(store: RunStore, folder: str = "cams") -> Path:
    return store.folder(folder) / "levels.json"


def read_levels(store: RunStore, folder: str = "cams") -> dict | None:
    """cams/levels.json: {"otsu": Otsu's level of the CAMs, or null when there were none}."""
    levels = read_json(levels_path(store, folder))
    return levels if isinstance(levels, dict) and "otsu" in levels else None


def cam_power(config: Config, store: RunStore, folder: str | None = None) -> float:
    """The exponent later stages apply to the seeds (make-cam's CAMs or make-amn-cam's maps; `folder`
    names one): 1 in fixed mode; γ from the seeds' Otsu level in relative mode."""
    if config.cam.threshold_mode == "fixed":
        return 1.0
    folder = folder or seed_folder(config)
    otsu = (read_levels(store, folder) or {}).get("otsu")
    if otsu is None:
        stage = "make-amn-cam" if folder == "amn_cams" else "make-cam"
        raise UserError(f"cam.threshold_mode: relative needs the seeds' Otsu level in {levels_path(store, folder)}, which "
                        f"is missing or empty; run `wsseg {stage}` again to rewrite it")
    return relative_power(min(max(otsu, 1e-3), 1 - 1e-3), config.cam.eval_threshold)


def evaluate(config: Config, store: RunStore, progress=None, folder: str = "cams") -> dict:
    """CAM mIoU on the evaluation list: at cam.eval_threshold, at the relative-mode threshold
    (eval_threshold on CAM^γ), and at the best of cam.sweep. `folder`: cams, or amn_cams for AMN's maps."""
    otsu = (read_levels(store, folder) or {}).get("otsu")
    dataset = open_dataset(config)
    ids = ids_with_ground_truth(dataset, image_ids(config, "data.eval_list"))
    ids = [i for i in ids if cam_path(store, i, folder).exists()]
    if not ids:
        return {"evaluated_images": 0}
    relative = round(otsu, 4) if otsu else None  # eval_threshold on CAM^γ = Otsu's level on the CAM
    thresholds = sorted(set(config.cam.sweep) | {config.cam.eval_threshold} | ({relative} if relative else set()))

    def images():
        iterator = progress(ids, desc="make-cam: evaluating" if folder == "cams" else "make-amn-cam: evaluating") if progress else Progress(ids, None, "", enabled=False)
        for image_id in iterator:
            cams = read_cams(cam_path(store, image_id, folder))
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
        # the best at an end of the sweep may not be the CAMs' best: widen cam.sweep
        "best_at_sweep_edge": result["best_threshold"] in (min(config.cam.sweep), max(config.cam.sweep)),
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


def label_threshold(config: Config, store: RunStore, folder: str = "cams") -> float:
    """The background level the CAM label pictures use: cam.eval_threshold, or in relative
    mode the Otsu level (eval_threshold on CAM^γ is the Otsu level on the CAM)."""
    otsu = (read_levels(store, folder) or {}).get("otsu")
    return otsu if config.cam.threshold_mode == "relative" and otsu else config.cam.eval_threshold


def label_map(config: Config, store: RunStore, image_id: str, folder: str = "cams") -> np.ndarray | None:
    cams = read_cams(cam_path(store, image_id, folder))
    return None if cams is None else cam_label_map(cams, label_threshold(config, store, folder))


def inspect_tiles(view, folder: str = "cams") -> list[np.ndarray]:
    cams = read_cams(cam_path(view.store, view.id, folder))
    if cams is None:
        return []
    method = "AMN" if folder == "amn_cams" else "+".join(
        name for name, on in (("multi-dilated", bool(view.config.cam.dilations)),
                              ("FickleNet", view.config.cam.fickle_window > 0), ("AdvCAM", view.config.cam.advcam)) if on)
    tiles = []
    for channel, key in enumerate(cams["keys"]):
        if "plain" in cams:  # the chosen method's map beside the plain CAM it starts from
            tiles.append(viz.tile(f"CAM {view.names[key]} (plain)", viz.cam_overlay(view.image, cams["plain"][channel])))
        title = f"CAM {view.names[key]}" + (f" ({method})" if method and "plain" in cams else "")
        tiles.append(viz.tile(title, viz.cam_overlay(view.image, cams["high_res"][channel])))
    threshold = label_threshold(view.config, view.store, folder)
    tiles.append(view.labels_tile(f"{method if folder != 'cams' else 'CAM'} labels (bg {threshold:.2f}, "
                                  f"{view.config.cam.threshold_mode})", cam_label_map(cams, threshold)))
    return tiles


def quality(m: dict, name: str = "CAM") -> str:
    return (f"{name} mIoU {fmt(m.get('miou'))} at bg {fmt(m.get('threshold'), 2)}, "
            f"{fmt(m.get('miou_relative'))} relative (Otsu {fmt(m.get('otsu_threshold'), 2)}), "
            f"best {fmt(m.get('best_miou'))} at bg {fmt(m.get('best_threshold'), 2)}"
            f"{' (an end of cam.sweep)' if m.get('best_at_sweep_edge') else ''}")


STAGE = Stage(
    name="make-cam",
    help="Multi-scale + flip CAMs for every image (cams/<id>.npz).",
    run=run,
    outputs=("cams",),
    needs=("train-cam",),
    # AdvCAM's settings change the CAMs only when it is on
    reads=lambda config: ("data.root", "data.classes", "data.label_list", "data.eval_list", "data.cls_labels", "cam.scales",
                          *(("cam.advcam", "cam.advcam_steps", "cam.advcam_step_size", "cam.advcam_mask_threshold",
                             "cam.advcam_regularisation") if config.cam.advcam else ()),
                          *(("run.seed", "cam.fickle_samples") if config.cam.fickle_window else ())),
    headline="miou",
    quality=quality,
    evaluators={"cams": evaluate},
    damaged=damaged,
    count_done=count_done,
    inspect_tiles=inspect_tiles,
    label_map=label_map,
)
