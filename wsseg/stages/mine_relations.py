"""mine-relations: confident foreground / background / unsure maps (IRN's cam_to_ir_label, docs/ALGORITHMS.md §1.3).

Two DenseCRF-refined argmaxes of the CAMs with a constant background plane, one with a
high score (conf_fg: only confident foreground survives) and one with a low score
(conf_bg: only confident background survives), combined into relations/<id>.png:
class where the fg map says class, 0 where both say background, 255 where they disagree.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from wsseg.class_ids import IGNORE
from wsseg.config import Config
from wsseg.context import StageContext
from wsseg.ops.crf import crf_from_labels
from wsseg.stage import Stage, fmt
from wsseg.stages import artifacts
from wsseg.stages.make_cam import cam_power
from wsseg.stages.per_image import for_each_image, skipped_ids
from wsseg.store import RunStore


def relation_path(store: RunStore, image_id: str) -> Path:
    return store.folder("relations") / f"{image_id}.png"


def crf_labels(image: np.ndarray, high_res: np.ndarray, keys: np.ndarray, background: float, config: Config) -> np.ndarray:
    """Prepend a constant background plane, argmax, DenseCRF; returns class ids (H, W) uint8."""
    relations = config.relations
    scores = np.concatenate([np.full((1, *high_res.shape[1:]), background, np.float32), high_res])
    indices = scores.argmax(axis=0)
    refined = crf_from_labels(image, indices, len(keys) + 1, gt_prob=relations.crf_gt_prob,
                              gaussian_sxy=relations.crf_gaussian_sxy, gaussian_compat=relations.crf_gaussian_compat,
                              bilateral_sxy=relations.crf_bilateral_sxy, bilateral_srgb=relations.crf_bilateral_srgb,
                              bilateral_compat=relations.crf_bilateral_compat, iterations=relations.crf_iterations,
                              method=relations.crf_method, window=relations.crf_window, blur=relations.crf_blur)
    class_ids = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return class_ids[refined]


def relation_labels(image: np.ndarray, cams: dict[str, np.ndarray], config: Config, power: float = 1.0) -> np.ndarray:
    """The relation map (H, W) uint8: 0 background, 1..C class, 255 unsure. `power`: CAM exponent (relative mode)."""
    high_res = cams["high_res"] ** power
    fg = crf_labels(image, high_res, cams["keys"], config.relations.conf_fg, config)
    bg = crf_labels(image, high_res, cams["keys"], config.relations.conf_bg, config)
    relations = fg.copy()
    relations[fg == 0] = IGNORE  # unsure, until both maps agree on background
    relations[(fg == 0) & (bg == 0)] = 0
    return relations


def mine_image(config: Config, run_dir: str, power: float, seeds: str, out: str, image_id: str) -> None:
    """The relation map of one image from the CAM-format seeds in RUN/<seeds>/ into RUN/<out>/<id>.png
    (mine-relations: the stage's seeds into relations/; train-amn: make-cam's CAMs into amn/ir_labels/)."""
    store = RunStore(run_dir)
    cams = artifacts.read_cams(artifacts.cam_path(store, image_id, seeds))
    if cams is None:
        raise RuntimeError(f"{seeds}/{image_id}.npz is missing or damaged; rerun "
                           f"{'make-amn-cam' if seeds == 'amn_cams' else 'make-cam'}")
    image = artifacts.open_dataset(config).read_image(image_id)
    artifacts.write_labels(store.folder(out) / f"{image_id}.png", relation_labels(image, cams, config, power))


def run(ctx: StageContext) -> dict:
    config = ctx.config
    ids = artifacts.image_ids(config, "data.label_list", "data.eval_list")
    ids = [i for i in ids if i not in skipped_ids(ctx.store.folder(artifacts.seed_folder(config)))]
    folder = ctx.folder("relations")
    power = cam_power(config, ctx.store)
    if power != 1.0:
        ctx.log.info("mine-relations: relative thresholds: CAM^%.3f", power)
    work = functools.partial(mine_image, config, str(ctx.store.root), power, artifacts.seed_folder(config), "relations")
    counts = for_each_image(ctx, ids, lambda i: relation_path(ctx.store, i), work, report_folder=folder,
                            processes=config.run.workers)
    ctx.dist.barrier()
    metrics = evaluate(config, ctx.store, ctx.progress) if ctx.dist.is_main else {}
    return {"metrics": metrics, "items": {"done": counts["done"], "total": len(ids)}, "counters": counts}


def damaged(config: Config, store: RunStore) -> list[str]:
    skipped = skipped_ids(store.folder(artifacts.seed_folder(config))) | skipped_ids(store.folder("relations"))
    ids = [i for i in artifacts.image_ids(config, "data.label_list", "data.eval_list") if i not in skipped]
    return [i for i in ids if not artifacts.is_whole(relation_path(store, i))]


def count_done(config: Config, store: RunStore) -> tuple[int, int]:
    ids = artifacts.image_ids(config, "data.label_list", "data.eval_list")
    return sum(relation_path(store, i).exists() for i in ids), len(ids)


def evaluate(config: Config, store: RunStore, progress=None, folder: str = "relations") -> dict:
    """Precision (share of confident pixels that are right) and coverage (share of labelled
    pixels that are confident) against the ground truth, overall and for fg / bg. `folder`:
    relations, or train-amn's amn/ir_labels."""
    dataset = artifacts.open_dataset(config)
    path = lambda image_id: store.folder(folder) / f"{image_id}.png"  # noqa: E731
    ids = [i for i in artifacts.ids_with_ground_truth(dataset, artifacts.image_ids(config, "data.eval_list"))
           if path(i).exists()]
    if not ids:
        return {"evaluated_images": 0}
    names = ["background", *config.data.classes]
    correct = confident = labelled = 0
    fg = {"correct": 0, "confident": 0}
    bg = {"correct": 0, "confident": 0}
    classes = len(config.data.classes) + 1
    # per class: confident pixels given the class, the right ones among them, and its ground-truth
    # pixels with any confident label (the class's precision and coverage)
    per_class = {key: np.zeros(classes, np.int64) for key in ("given", "right", "truth", "covered")}
    for image_id in (progress(ids, desc="mine-relations: evaluating" if folder == "relations"
                                            else "train-amn: evaluating its labels") if progress else ids):
        relations = artifacts.read_labels(path(image_id))
        truth = dataset.read_semantic(image_id)
        if relations is None:
            continue
        valid = truth != IGNORE
        sure = valid & (relations != IGNORE)
        right = sure & (relations == truth)
        labelled += int(valid.sum())
        confident += int(sure.sum())
        correct += int(right.sum())
        for part, mask in ((fg, relations > 0), (bg, relations == 0)):
            part["confident"] += int((sure & mask).sum())
            part["correct"] += int((right & mask).sum())
        for key, values in (("given", relations[sure]), ("right", relations[right]), ("truth", truth[valid]),
                            ("covered", truth[sure])):
            per_class[key] += np.bincount(values.astype(np.int64), minlength=classes)[:classes]

    def ratio(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    return {
        "evaluated_images": len(ids),
        "precision": ratio(correct, confident),
        "coverage": ratio(confident, labelled),
        "fg_precision": ratio(fg["correct"], fg["confident"]),
        "bg_precision": ratio(bg["correct"], bg["confident"]),
        "per_class_precision": {name: ratio(int(per_class["right"][c]), int(per_class["given"][c]))
                                for c, name in enumerate(names) if per_class["truth"][c] or per_class["given"][c]},
        "per_class_coverage": {name: ratio(int(per_class["covered"][c]), int(per_class["truth"][c]))
                               for c, name in enumerate(names) if per_class["truth"][c]},
    }


def inspect_tiles(view) -> list[np.ndarray]:
    relations = artifacts.read_labels(relation_path(view.store, view.id))
    if relations is None:
        return []
    return [view.labels_tile("relations (255 = unsure)", relations)]


def quality(m: dict) -> str:
    return f"relation precision {fmt(m.get('precision'))}, coverage {fmt(m.get('coverage'))}"


STAGE = Stage(
    name="mine-relations",
    help="Confident foreground/background/unsure maps with DenseCRF.",
    run=run,
    outputs=("relations",),
    needs=("make-cam", "make-amn-cam"),
    reads=("data.root", "data.label_list", "data.eval_list", "cam.threshold_mode", "cam.eval_threshold", "relations"),
    headline="precision",
    quality=quality,
    evaluators={"relations": evaluate},
    damaged=damaged,
    count_done=count_done,
    inspect_tiles=inspect_tiles,
)
