"""synthesize-labels: random walk + displacement field -> semantic, instance and panoptic labels (docs/ALGORITHMS.md §1.6).

Per image: IRN's boundary (image + flip) and displacement; the CAMs (raised to
`labels.cam_power`) walked along the boundary-aware affinities; semantic labels from the
walked CAMs; instance labels from centroid groups of the displacement field walked per
(class, group); panoptic labels from the instances. The boundary and displacement maps
are cached for `inspect`. Resumes per image; under torchrun each rank takes its share.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wsseg import viz
from wsseg.class_ids import IGNORE
from wsseg.config import Config
from wsseg.context import StageContext
from wsseg.data.images import write_rgb_png
from wsseg.data.transforms import normalize
from wsseg.metrics import ConfusionMatrix, instance_average_precision, panoptic_headline, panoptic_quality
from wsseg.models.irn import boundary_inference
from wsseg.ops.instances import centroid_groups, instance_seeds, instances_from_walk
from wsseg.ops.panoptic import encode_ids, panoptic_from_instances
from wsseg.ops.random_walk import random_walk
from wsseg.stage import Stage, fmt
from wsseg.stages import artifacts
from wsseg.stages.make_cam import cam_power
from wsseg.stages.per_image import for_each_image, skipped_ids
from wsseg.stages.train_irn import load_network
from wsseg.store import RunStore, atomic_path, read_json, write_json


class Paths:
    """Where this stage's files for one image live."""

    def __init__(self, store: RunStore, image_id: str):
        labels = store.folder("labels")
        self.semantic = labels / "semantic" / f"{image_id}.png"
        self.margin = labels / "margin" / f"{image_id}.png"  # the semantic labels' background margin x 255
        self.instance = labels / "instance" / f"{image_id}.npz"
        self.panoptic = labels / "panoptic" / f"{image_id}.png"
        self.segments = labels / "panoptic" / f"{image_id}.json"  # written last: its presence means the image is done
        self.boundary = store.folder("irn/boundary") / f"{image_id}.png"
        self.displacement = store.folder("irn/displacement") / f"{image_id}.npz"


def walk_to_full_size(seeds: torch.Tensor, boundary: torch.Tensor, size: tuple[int, int], config: Config) -> torch.Tensor:
    """Walk stride-4 seeds (S, h, w) along the boundary, upsample x4 (bilinear) and crop to `size`."""
    labels = config.labels
    walked = random_walk(seeds, boundary, radius=labels.radius, beta=labels.beta, num_steps=labels.walk_steps)
    upsampled = F.interpolate(walked[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    return upsampled[:, : size[0], : size[1]]


def walk_scores(seeds: torch.Tensor, boundary: torch.Tensor, size: tuple[int, int],
                config: Config) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Walk the seeds (S, h, w); return (scores (S, H, W), unit): a pixel is background where
    every score is below `background level x unit`.

    IRN (labels.walk_background false): scores = walked / max walked over seeds and pixels,
    unit = 1: the level is a share of the image's strongest walked region.
    labels.walk_background: a plane of ones walks with the seeds; scores = the walked seeds,
    unit = the walked ones. Both are multiplied by (1 - B) and spread by the same transitions,
    so the comparison is a boundary-weighted local average of the CAM against the level, in
    CAM units: a region where the CAM is diffuse and weak stays background even when no
    stronger region in the image sets the scale.
    """
    if not config.labels.walk_background:
        walked = walk_to_full_size(seeds, boundary, size, config)
        return (walked / walked.max().clamp_min(1e-5) if walked.shape[0] else walked), 1.0
    walked = walk_to_full_size(torch.cat([torch.ones_like(boundary)[None], seeds]), boundary, size, config)
    return walked[1:], walked[0]


def semantic_labels(scores: torch.Tensor, keys: np.ndarray, background: torch.Tensor | float) -> np.ndarray:
    """Scores (K, H, W) -> class ids (H, W) uint8: background (a level, or a (H, W) plane) prepended, argmax."""
    if scores.shape[0] == 0:
        return np.zeros(scores.shape[1:], np.uint8)
    plane = torch.as_tensor(background, dtype=scores.dtype, device=scores.device).expand_as(scores[0])
    scores = torch.cat([plane[None], scores])
    class_ids = np.concatenate([[0], keys + 1]).astype(np.uint8)
    return class_ids[scores.argmax(dim=0).cpu().numpy()]


def background_level(scores: torch.Tensor, unit: torch.Tensor | float, level: float, share: float) -> float:
    """The semantic labels' background `level` (labels.sem_background), raised where it would
    leave less than `share` (labels.min_background) of the image background: to the quantile of
    the best class score (in `unit`s) at that share, so the lowest-scoring pixels become background.
    (Measured on the instance labels too, it changed PQ by -0.009 to +0.001 on five demo seeds: not used there.)"""
    if share <= 0 or scores.shape[0] == 0:
        return level
    best = scores.max(dim=0).values / unit
    return max(level, torch.quantile(best.flatten().float(), share).item())


def background_margin(scores: torch.Tensor, unit: torch.Tensor | float, level: float) -> np.ndarray:
    """How far each pixel's best class score (in `unit`s) lies from the background `level` that
    decided its semantic label, clipped to [0, 1]: (H, W) float32. Near 0 the label could have
    gone either way (background or object); an image with no class is background everywhere (1)."""
    if scores.shape[0] == 0:
        return np.ones(scores.shape[1:], np.float32)
    best = scores.max(dim=0).values / unit
    return (best - level).abs().clamp(0.0, 1.0).float().cpu().numpy()


def synthesize(model, image: np.ndarray, cams: dict[str, np.ndarray], config: Config, device: torch.device,
               power: float = 1.0) -> dict:
    """All labels of one image; returns arrays ready to write. `power`: the relative-mode CAM exponent."""
    height, width = image.shape[:2]
    tensor = torch.from_numpy(normalize(image)).permute(2, 0, 1).to(device)
    boundary, displacement = boundary_inference(model, tensor, pad_to=config.labels.pad_to or None)
    cam = torch.from_numpy(cams["cam"]).to(device) ** (power * config.labels.cam_power)
    if cam.shape[1:] != boundary.shape:
        raise RuntimeError(f"CAM map {tuple(cam.shape[1:])} and boundary map {tuple(boundary.shape)} differ; rerun make-cam")
    keys = cams["keys"]
    size = (height, width)
    scores, unit = walk_scores(cam, boundary, size, config)
    labels = config.labels
    level = background_level(scores, unit, labels.sem_background, labels.min_background)
    semantic = semantic_labels(scores, keys, level * unit)
    margin = background_margin(scores, unit, level)

    displacement_np = displacement.float().cpu().numpy()
    groups = centroid_groups(displacement_np, num_steps=config.labels.displacement_steps,
                             centroid_threshold=config.labels.centroid_threshold)
    seeds, seed_classes, _ = instance_seeds(cam.cpu().numpy(), keys, groups)
    planes, unit = instance_scores(seeds, boundary, size, config)
    ids, classes, scores = instances_from_walk(planes, seed_classes, background=labels.ins_background * unit,
                                               normalise=False, min_area_fraction=config.labels.min_instance_area)
    segments, segments_info = panoptic_from_instances(ids, classes)
    return {"semantic": semantic, "margin": margin, "ids": ids, "classes": classes, "scores": scores, "segments": segments,
            "segments_info": segments_info, "boundary": boundary.cpu().numpy(), "displacement": displacement_np,
            "groups": groups}


def instance_scores(seeds: np.ndarray, boundary: torch.Tensor, size: tuple[int, int],
                    config: Config) -> tuple[np.ndarray, np.ndarray | float]:
    """The (class, group) seeds (S, h, w) walked: (scores (S, H, W), unit) as `walk_scores`, in numpy."""
    if not seeds.shape[0]:
        return np.zeros((0, *size), np.float32), 1.0
    scores, unit = walk_scores(torch.from_numpy(seeds).to(boundary.device), boundary, size, config)
    return scores.cpu().numpy(), (unit.cpu().numpy() if isinstance(unit, torch.Tensor) else unit)


def run(ctx: StageContext) -> dict:
    config = ctx.config
    dataset = artifacts.open_dataset(config)
    ids = artifacts.image_ids(config, "data.label_list", "data.eval_list")
    ids = [i for i in ids if i not in skipped_ids(ctx.store.folder(artifacts.seed_folder(config)))]
    model = load_network(config, ctx.store).to(ctx.device)
    power = cam_power(config, ctx.store)
    for sub in ("semantic", "margin", "instance", "panoptic"):
        ctx.folder(f"labels/{sub}")
    ctx.folder("irn/boundary")
    ctx.folder("irn/displacement")

    def work(image_id: str) -> None:
        cams = artifacts.read_cams(artifacts.seed_path(config, ctx.store, image_id))
        if cams is None:
            raise RuntimeError(f"{artifacts.seed_folder(config)}/{image_id}.npz is missing or damaged; rerun "
                               f"{'make-amn-cam' if config.cam.amn else 'make-cam'}")
        out = synthesize(model, dataset.read_image(image_id), cams, config, ctx.device, power)
        paths = Paths(ctx.store, image_id)
        artifacts.write_labels(paths.boundary, np.round(out["boundary"] * 255).astype(np.uint8))
        with atomic_path(paths.displacement) as tmp:
            tmp.write_bytes(artifacts.encode_npz(displacement=out["displacement"].astype(np.float16),
                                                 groups=out["groups"].astype(np.int32)))
        artifacts.write_labels(paths.semantic, out["semantic"])
        artifacts.write_labels(paths.margin, np.round(out["margin"] * 255).astype(np.uint8))
        with atomic_path(paths.instance) as tmp:
            tmp.write_bytes(artifacts.encode_npz(ids=out["ids"].astype(np.uint16), classes=out["classes"].astype(np.int64),
                                                 scores=out["scores"].astype(np.float32)))
        with atomic_path(paths.panoptic) as tmp:
            write_rgb_png(tmp, encode_ids(out["segments"]))
        write_json(paths.segments, {"image_id": image_id, "file_name": paths.panoptic.name,
                                    "segments_info": out["segments_info"]})

    counts = for_each_image(ctx, ids, lambda i: Paths(ctx.store, i).segments, work, report_folder=ctx.folder("labels"))
    ctx.dist.barrier()
    metrics = {}
    if ctx.dist.is_main:
        write_panoptic_json(config, ctx.store, ids)
        metrics = evaluate(config, ctx.store, ctx.progress)
    return {"metrics": metrics, "items": {"done": counts["done"], "total": len(ids)}, "counters": counts}


def write_panoptic_json(config: Config, store: RunStore, ids: list[str]) -> None:
    """labels/panoptic.json in COCO panoptic format (category 0 = background stuff)."""
    annotations = []
    for image_id in ids:
        entry = read_json(Paths(store, image_id).segments)
        if entry is not None:
            annotations.append(entry)
    categories = [{"id": 0, "name": "background", "isthing": 0}]
    categories += [{"id": k + 1, "name": name, "isthing": 1} for k, name in enumerate(config.data.classes)]
    write_json(store.folder("labels") / "panoptic.json", {"annotations": annotations, "categories": categories})


def damaged(config: Config, store: RunStore) -> list[str]:
    skipped = skipped_ids(store.folder(artifacts.seed_folder(config))) | skipped_ids(store.folder("labels"))
    bad = []
    for image_id in artifacts.image_ids(config, "data.label_list", "data.eval_list"):
        if image_id in skipped:
            continue
        paths = Paths(store, image_id)
        files = (paths.segments, paths.semantic, paths.margin, paths.panoptic, paths.boundary, paths.instance, paths.displacement)
        if not all(artifacts.is_whole(path) for path in files):
            bad.append(image_id)
    return bad


def count_done(config: Config, store: RunStore) -> tuple[int, int]:
    ids = artifacts.image_ids(config, "data.label_list", "data.eval_list")
    return sum(Paths(store, i).segments.exists() for i in ids), len(ids)


# ---------------------------------------------------------------------------- evaluation

def _eval_ids(config: Config, store: RunStore, dataset) -> list[str]:
    ids = artifacts.ids_with_ground_truth(dataset, artifacts.image_ids(config, "data.eval_list"))
    return [i for i in ids if Paths(store, i).segments.exists()]


def read_instances(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["ids"].astype(np.int64), data["classes"].astype(np.int64), data["scores"].astype(np.float32)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def evaluate_semantic(config: Config, store: RunStore, progress=None) -> dict:
    dataset = artifacts.open_dataset(config)
    ids = _eval_ids(config, store, dataset)
    matrix = ConfusionMatrix(len(config.data.classes) + 1)
    damaged = []
    for image_id in (progress(ids, desc="evaluating semantic labels") if progress else ids):
        labels = artifacts.read_labels(Paths(store, image_id).semantic)
        if labels is None:
            damaged.append(image_id)
            continue
        matrix.update(labels, dataset.read_semantic(image_id))
    artifacts.warn_damaged("semantic label files", damaged, len(ids), STAGE.name)
    summary = matrix.summary(["background", *config.data.classes])
    return {"semantic_miou": summary["miou"], "semantic_per_class_iou": summary["per_class_iou"],
            "semantic_pixel_accuracy": summary["pixel_accuracy"], "evaluated_images": len(ids) - len(damaged)}


def _ground_truth_instances(dataset, image_id: str):
    gt_ids, gt_classes = dataset.read_instances(image_id)
    gt_ids = gt_ids.astype(np.int64)
    void = gt_ids == 65535
    semantic_void = dataset.read_semantic(image_id) == IGNORE
    return np.where(void, 0, gt_ids), gt_classes, void | semantic_void


def evaluate_instance(config: Config, store: RunStore, progress=None) -> dict:
    dataset = artifacts.open_dataset(config)
    ids = [i for i in _eval_ids(config, store, dataset) if dataset.has_instances(i)]
    predictions, truths, damaged = [], [], []
    for image_id in (progress(ids, desc="evaluating instance labels") if progress else ids):
        predicted = read_instances(Paths(store, image_id).instance)
        if predicted is None:
            damaged.append(image_id)
            continue
        predictions.append(predicted)
        truths.append(_ground_truth_instances(dataset, image_id))
    artifacts.warn_damaged("instance label files", damaged, len(ids), STAGE.name)
    if not predictions:
        return {"instance_evaluated_images": 0}
    result = instance_average_precision(predictions, truths, len(config.data.classes) + 1,
                                        class_names=["background", *config.data.classes])
    return {"instance_ap50": result["ap50"], "instance_ap": result["ap"], "instance_per_class_ap50": result["per_class_ap50"],
            "instance_ap50_void_free": result["ap50_void_free"], "instance_evaluated_images": len(predictions)}


def evaluate_panoptic(config: Config, store: RunStore, progress=None) -> dict:
    dataset = artifacts.open_dataset(config)
    ids = [i for i in _eval_ids(config, store, dataset) if dataset.has_instances(i)]
    pairs, damaged = [], []
    for image_id in (progress(ids, desc="evaluating panoptic labels") if progress else ids):
        predicted = artifacts.read_panoptic(store.folder("labels/panoptic"), image_id)
        if predicted is None:
            damaged.append(image_id)
            continue
        gt_ids, gt_classes, void = _ground_truth_instances(dataset, image_id)
        gt_segments, gt_info = panoptic_from_instances(gt_ids, gt_classes, void)
        pairs.append((*predicted, gt_segments, {s["id"]: s["category_id"] for s in gt_info}, void))
    artifacts.warn_damaged("panoptic label files", damaged, len(ids), STAGE.name)
    if not pairs:
        return {"panoptic_evaluated_images": 0}
    num_classes = len(config.data.classes) + 1
    result = panoptic_quality(pairs, num_classes, thing_classes=list(range(1, num_classes)), stuff_classes=[0],
                              class_names=["background", *config.data.classes])
    return {**panoptic_headline(result), "panoptic_evaluated_images": len(pairs)}


def evaluate(config: Config, store: RunStore, progress=None) -> dict:
    return {**evaluate_semantic(config, store, progress), **evaluate_instance(config, store, progress),
            **evaluate_panoptic(config, store, progress)}


# ---------------------------------------------------------------------------- pictures

def inspect_tiles(view) -> list[np.ndarray]:
    paths = Paths(view.store, view.id)
    tiles = []
    boundary = artifacts.read_labels(paths.boundary)
    if boundary is not None:
        tiles.append(viz.tile("IRN boundary", viz.boundary_image(boundary / 255.0, shape=view.image.shape[:2])))
    try:
        with np.load(paths.displacement, allow_pickle=False) as data:
            displacement = data["displacement"].astype(np.float32)
            groups = data["groups"]
        tiles.append(viz.tile("displacement (colour = direction)", viz.displacement_colors(displacement, shape=view.image.shape[:2])))
        tiles.append(viz.tile("displacement arrows", viz.displacement_arrows(view.image, displacement)))
        tiles.append(viz.tile("centroid groups", viz.instance_colors(np.kron(groups + 1, np.ones((4, 4), np.int64))[: view.image.shape[0], : view.image.shape[1]])))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        pass
    semantic = artifacts.read_labels(paths.semantic)
    if semantic is not None:
        tiles.append(view.labels_tile("semantic label", semantic))
    margin = artifacts.read_labels(paths.margin)
    if margin is not None:  # dark: the label came close to the other side of the background level
        tiles.append(viz.tile("label margin (black 0 .. yellow 0.3+)", viz.heatmap(margin / 255.0 / 0.3)))
    instances = read_instances(paths.instance)
    if instances is not None:
        ids, classes, scores = instances
        tiles.append(viz.tile(f"instance labels ({len(classes)})", viz.overlay(view.image, viz.instance_colors(ids), 0.6, mask=ids > 0)))
    panoptic = artifacts.read_panoptic(view.store.folder("labels/panoptic"), view.id)
    if panoptic is not None:
        tiles.append(view.segments_tile("panoptic label", *panoptic))
    return tiles


def label_map(config: Config, store: RunStore, image_id: str) -> np.ndarray | None:
    return artifacts.read_labels(Paths(store, image_id).semantic)


def quality(m: dict) -> str:
    return f"semantic mIoU {fmt(m.get('semantic_miou'))}, instance AP50 {fmt(m.get('instance_ap50'))}, PQ {fmt(m.get('pq'))}"


STAGE = Stage(
    name="synthesize-labels",
    help="Random walk + displacement: semantic, instance and panoptic labels.",
    run=run,
    outputs=("labels", "irn/boundary", "irn/displacement"),
    needs=("make-cam", "make-amn-cam", "train-irn"),
    reads=("data.root", "data.label_list", "data.eval_list", "data.classes", "cam.threshold_mode", "cam.eval_threshold",
           "labels"),
    headline="semantic_miou",
    quality=quality,
    evaluators={"semantic": evaluate_semantic, "instance": evaluate_instance, "panoptic": evaluate_panoptic},
    damaged=damaged,
    version=2,  # 2: labels/margin (the semantic labels' background margin, for segmenter.ignore_band)
    count_done=count_done,
    inspect_tiles=inspect_tiles,
    label_map=label_map,
)
