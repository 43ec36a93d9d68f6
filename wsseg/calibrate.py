"""`wsseg calibrate`: fit the pipeline's thresholds to the data, on a subset with ground truth.

Nothing is retrained. The trained CAM and IRN networks and the cached CAMs are reused:
- walk-time thresholds (CAM power before the walk, semantic and instance background)
  are searched exactly: one walk per power per image, then every background value is
  one argmax;
- relation thresholds (conf_fg, conf_bg) change IRN's training data, so they are
  searched with a cheap proxy (precision and coverage of the relation maps against
  the ground truth, combined as F0.5: precision counts more, as IRN learns from the
  confident pixels only); confirming them needs train-irn again, which the report says;
- the chosen values are evaluated against the defaults on images outside the
  calibration subset: the honest number.
Writes `<run>/calibration/calibrated.yaml` (stack it: --config base.yaml --config it)
and `report.json` / `report.md`.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from wsseg.class_ids import IGNORE
from wsseg.config import Config
from wsseg.data.transforms import normalize
from wsseg.errors import UserError
from wsseg.metrics import ConfusionMatrix, instance_average_precision
from wsseg.models.irn import boundary_inference
from wsseg.ops.instances import centroid_groups, instance_seeds, instances_from_walk
from wsseg.stages import artifacts, make_cam, train_irn
from wsseg.stages.make_cam import cam_power
from wsseg.stages.mine_relations import crf_labels
from wsseg.stages.synthesize_labels import _ground_truth_instances, instance_scores, walk_scores
from wsseg.store import RunStore, atomic_path, write_json

POWERS = (1.0, 1.25, 1.5, 2.0)  # multiplied with the relative-mode power when that mode is on
BACKGROUNDS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6)
CONF_FG = (0.2, 0.3, 0.4, 0.5, 0.6)
CONF_BG = (0.02, 0.05, 0.1, 0.2)


@dataclass
class Grid:
    powers: tuple[float, ...] = POWERS
    backgrounds: tuple[float, ...] = BACKGROUNDS
    conf_fg: tuple[float, ...] = CONF_FG
    conf_bg: tuple[float, ...] = CONF_BG


def split_images(ids: list[str], count: int, seed: int) -> tuple[list[str], list[str]]:
    """A seeded random calibration subset of `count` ids and the rest (held out), both in list order."""
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(ids), size=min(count, len(ids)), replace=False).tolist())
    return [i for k, i in enumerate(ids) if k in chosen], [i for k, i in enumerate(ids) if k not in chosen]


def sweep_semantic(scores: np.ndarray, unit: np.ndarray | float, keys: np.ndarray, truth: np.ndarray, backgrounds,
                   matrices: list[ConfusionMatrix]) -> None:
    """Add one image to a confusion matrix per background value: (scores, unit) as
    `synthesize_labels.walk_scores` returns them, a pixel is background where its best score
    is not above background x unit (the argmax's tie rule)."""
    if scores.shape[0] == 0:
        for matrix in matrices:
            matrix.update(np.zeros_like(truth), truth)
        return
    best, arg = scores.max(axis=0), scores.argmax(axis=0)
    classes = keys[arg] + 1
    for background, matrix in zip(backgrounds, matrices):
        matrix.update(np.where(best > background * unit, classes, 0), truth)


@dataclass
class Accumulator:
    """Everything the search measures, per candidate."""

    semantic: dict = field(default_factory=dict)   # (power, bg) -> ConfusionMatrix
    instances: dict = field(default_factory=dict)  # (power, bg) -> list of predictions
    truths: list = field(default_factory=list)     # instance ground truth per image
    relations: dict = field(default_factory=dict)  # (conf_fg, conf_bg) -> [correct, confident, labelled]


def _walks(model, image, cams, config, device, power):
    height, width = image.shape[:2]
    tensor = torch.from_numpy(normalize(image)).permute(2, 0, 1).to(device)
    boundary, displacement = boundary_inference(model, tensor, pad_to=config.labels.pad_to or None)
    groups = centroid_groups(displacement.float().cpu().numpy(), num_steps=config.labels.displacement_steps,
                             centroid_threshold=config.labels.centroid_threshold)
    return boundary, groups, (height, width)


def measure(config: Config, store: RunStore, ids: list[str], grid: Grid, *, semantic: bool, instance: bool,
            relations: bool, device: torch.device, progress=None) -> Accumulator:
    """Run every candidate on `ids` (cached CAMs, trained IRN), accumulating the metrics' raw counts."""
    dataset = artifacts.open_dataset(config)
    model = train_irn.load_network(config, store).to(device) if (semantic or instance) else None
    base_power = cam_power(config, store)
    acc = Accumulator()
    for image_id in (progress(ids, desc="calibrate") if progress else ids):
        cams = artifacts.read_cams(artifacts.seed_path(config, store, image_id))
        if cams is None:
            continue
        image, truth = dataset.read_image(image_id), dataset.read_semantic(image_id)
        keys = cams["keys"]
        if relations:
            high_res = cams["high_res"] ** base_power
            fg_maps = {t: crf_labels(image, high_res, keys, t, config) for t in grid.conf_fg}
            bg_maps = {t: crf_labels(image, high_res, keys, t, config) for t in grid.conf_bg}
            valid = truth != IGNORE
            for fg_t, bg_t in itertools.product(grid.conf_fg, grid.conf_bg):
                fg, bg = fg_maps[fg_t], bg_maps[bg_t]
                mined = np.where(fg > 0, fg, np.where(bg == 0, 0, IGNORE))
                sure = valid & (mined != IGNORE)
                counts = acc.relations.setdefault((fg_t, bg_t), [0, 0, 0])
                counts[0] += int((sure & (mined == truth)).sum())
                counts[1] += int(sure.sum())
                counts[2] += int(valid.sum())
        if not (semantic or instance):
            continue
        boundary, groups, size = _walks(model, image, cams, config, device, base_power)
        if instance and dataset.has_instances(image_id):
            acc.truths.append(_ground_truth_instances(dataset, image_id))
        for power in grid.powers:
            cam = torch.from_numpy(cams["cam"]).to(device) ** (base_power * power * config.labels.cam_power)
            if semantic:
                planes, unit = walk_scores(cam, boundary, size, config)
                unit = unit.cpu().numpy() if isinstance(unit, torch.Tensor) else unit
                matrices = [acc.semantic.setdefault((power, b), ConfusionMatrix(len(config.data.classes) + 1))
                            for b in grid.backgrounds]
                sweep_semantic(planes.cpu().numpy(), unit, keys, truth, grid.backgrounds, matrices)
            if instance and dataset.has_instances(image_id):
                seeds, seed_classes, _ = instance_seeds(cam.cpu().numpy(), keys, groups)
                planes, unit = instance_scores(seeds, boundary, size, config)
                for b in grid.backgrounds:
                    prediction = instances_from_walk(planes, seed_classes, background=b * unit, normalise=False,
                                                     min_area_fraction=config.labels.min_instance_area)
                    acc.instances.setdefault((power, b), []).append(prediction)
    return acc


def f_half(precision: float, coverage: float) -> float:
    beta2 = 0.25
    return (1 + beta2) * precision * coverage / (beta2 * precision + coverage) if precision + coverage > 0 else 0.0


def scores(acc: Accumulator, config: Config) -> dict:
    """Per-candidate metric values from the accumulated counts."""
    out: dict = {"semantic": {}, "instance": {}, "relations": {}}
    for (power, b), matrix in acc.semantic.items():
        out["semantic"][(power, b)] = matrix.summary()["miou"]
    for (power, b), predictions in acc.instances.items():
        result = instance_average_precision(predictions, acc.truths, len(config.data.classes) + 1)
        out["instance"][(power, b)] = result["ap50"]
    for (fg, bg), (correct, confident, labelled) in acc.relations.items():
        precision = correct / confident if confident else 0.0
        coverage = confident / labelled if labelled else 0.0
        out["relations"][(fg, bg)] = {"precision": precision, "coverage": coverage, "f0.5": f_half(precision, coverage)}
    return out


def _best(table: dict, value=lambda v: v):
    valid = {k: value(v) for k, v in table.items() if v is not None and value(v) is not None}
    return max(valid, key=lambda k: valid[k]) if valid else None


def calibrate(config: Config, *, images: int = 100, metric: str = "both", holdout: int = 200, device: torch.device,
              progress=None) -> dict:
    store = RunStore(Path(config.run.dir))
    for stage in (make_cam.STAGE, train_irn.STAGE):
        record = store.record(stage.record_folder(config))
        if record is None or record.get("status") != "complete":
            raise UserError(f"calibrate reuses the trained networks and CAMs: run `wsseg run-all --to {stage.name}` first")
    dataset = artifacts.open_dataset(config)
    ids = [i for i in artifacts.ids_with_ground_truth(dataset, artifacts.image_ids(config, "data.eval_list"))
           if artifacts.seed_path(config, store, i).exists()]
    if len(ids) < 2:
        raise UserError("calibrate needs ground-truth masks for at least 2 images of data.eval_list")
    subset, rest = split_images(ids, images, config.run.seed)
    held_out = rest[:holdout]
    semantic, instance = metric in ("semantic", "both"), metric in ("instance", "both")
    started = time.monotonic()
    grid = Grid()
    acc = measure(config, store, subset, grid, semantic=semantic, instance=instance, relations=True, device=device,
                  progress=progress)
    table = scores(acc, config)
    chosen: dict = {}
    best_relations = _best(table["relations"], lambda v: v["f0.5"])
    if best_relations:
        chosen["relations"] = {"conf_fg": best_relations[0], "conf_bg": best_relations[1]}
    labels: dict = {}
    if semantic and (best := _best(table["semantic"])):
        labels.update(cam_power=round(config.labels.cam_power * best[0], 4), sem_background=best[1])
    if instance:
        # one CAM power serves both label kinds: with semantic chosen, pick the instance
        # background at that power (the labels are made with it), else the best pair
        power = best[0] if semantic and labels else None
        candidates = {k: v for k, v in table["instance"].items() if power is None or k[0] == power}
        if best_ins := _best(candidates):
            labels["ins_background"] = best_ins[1]
            if power is None:
                labels["cam_power"] = round(config.labels.cam_power * best_ins[0], 4)
    if labels:
        chosen["labels"] = labels

    # the honest number: defaults vs chosen, on images the search never saw
    default_power = 1.0
    chosen_power = labels.get("cam_power", config.labels.cam_power) / config.labels.cam_power
    check = Grid(powers=tuple(sorted({default_power, chosen_power})),
                 backgrounds=tuple(sorted({config.labels.sem_background, config.labels.ins_background,
                                           labels.get("sem_background", config.labels.sem_background),
                                           labels.get("ins_background", config.labels.ins_background)})),
                 conf_fg=tuple(sorted({config.relations.conf_fg, chosen.get("relations", {}).get("conf_fg", config.relations.conf_fg)})),
                 conf_bg=tuple(sorted({config.relations.conf_bg, chosen.get("relations", {}).get("conf_bg", config.relations.conf_bg)})))
    held = scores(measure(config, store, held_out, check, semantic=semantic, instance=instance, relations=True,
                          device=device, progress=progress), config) if held_out else None

    def pick(section: str, key) -> float | None:
        return None if held is None else held[section].get(key)

    report = {
        "subset_images": len(subset), "held_out_images": len(held_out), "seconds": round(time.monotonic() - started, 1),
        "chosen": chosen,
        "grid": {section: {json.dumps(list(k)): v for k, v in values.items()} for section, values in table.items()},
        "held_out": {
            "semantic_miou": {"default": pick("semantic", (default_power, config.labels.sem_background)),
                              "calibrated": pick("semantic", (chosen_power, labels.get("sem_background", config.labels.sem_background)))},
            "instance_ap50": {"default": pick("instance", (default_power, config.labels.ins_background)),
                              "calibrated": pick("instance", (chosen_power, labels.get("ins_background", config.labels.ins_background)))},
            "relations": {"default": pick("relations", (config.relations.conf_fg, config.relations.conf_bg)),
                          "calibrated": pick("relations", (chosen.get("relations", {}).get("conf_fg", config.relations.conf_fg),
                                                           chosen.get("relations", {}).get("conf_bg", config.relations.conf_bg)))},
        },
        "note": "relations.conf_fg / conf_bg were chosen by the relation-map proxy; their effect on the labels needs "
                "train-irn and synthesize-labels again (wsseg run-all with the overlay stacked does exactly that)",
    }
    folder = store.folder("calibration")
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "calibrated.yaml") as tmp:
        tmp.write_text("# written by `wsseg calibrate`; stack it: --config <base> --config this file\n"
                       + yaml.safe_dump(chosen, sort_keys=True))
    write_json(folder / "report.json", report)
    with atomic_path(folder / "report.md") as tmp:
        tmp.write_text(format_report(report))
    report["overlay"] = str(folder / "calibrated.yaml")
    return report


def format_report(report: dict) -> str:
    lines = [f"# Calibration: {report['subset_images']} images searched, {report['held_out_images']} held out "
             f"({report['seconds']} s)", "", "Chosen:", "```", yaml.safe_dump(report["chosen"]).strip(), "```", "",
             "| held-out metric | defaults | calibrated |", "| --- | --- | --- |"]
    for name, pair in report["held_out"].items():
        def show(v):
            if isinstance(v, dict):
                return f"precision {v['precision']:.3f}, coverage {v['coverage']:.3f}"
            return "-" if v is None else f"{v:.3f}"
        lines.append(f"| {name} | {show(pair['default'])} | {show(pair['calibrated'])} |")
    lines += ["", report["note"], ""]
    return "\n".join(lines)
