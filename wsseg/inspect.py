"""`wsseg inspect`: one PNG panel per image showing what every finished stage produced,
plus an index.html gallery with the stage metrics on top, then the run section (training
curves, per-class bars, sweeps: wsseg.run_view), then the per-image panels.

Each stage contributes tiles from its cached artifacts through its `inspect_tiles(view)`
(nothing is recomputed); a stage that has not run yet simply adds nothing. `--worst K`
picks the K images whose labels disagree most with the ground truth. `--against` puts a second
run's table and pictures beside this one's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsseg import pipeline, plots, run_view, viz
from wsseg.config import Config
from wsseg.data.voc import VOCDataset
from wsseg.metrics import ConfusionMatrix
from wsseg.stages import artifacts
from wsseg.store import RunStore

class ImageView:
    """One image's inputs and cached artifacts, loaded lazily."""

    def __init__(self, config: Config, store: RunStore, dataset: VOCDataset, image_id: str):
        self.config, self.store, self.dataset, self.id = config, store, dataset, image_id
        self.image = dataset.read_image(image_id)
        self.names = list(config.data.classes)
        self.ground_truth = dataset.read_semantic(image_id) if dataset.has_semantic(image_id) else None

    def legend(self, labels: np.ndarray):
        return viz.class_legend(labels, self.names)

    def labels_tile(self, title: str, labels: np.ndarray) -> np.ndarray:
        colors = viz.overlay(self.image, viz.label_colors(labels), 0.6, mask=labels > 0)
        return viz.tile(title, colors, legend=self.legend(labels))

    def segments_tile(self, title: str, segments: np.ndarray, categories: dict[int, int]) -> np.ndarray:
        """Panoptic segments (H, W) ids, 0 = void: each segment its own colour, legend with class names."""
        things = np.where(np.isin(segments, [k for k, c in categories.items() if c > 0]), segments, 0)
        colors = viz.overlay(self.image, viz.instance_colors(things), 0.6, mask=things > 0)
        legend = []
        for segment_id, category in sorted(categories.items()):
            if category > 0 and (segments == segment_id).any():
                color = tuple(int(v) for v in viz.instance_colors(np.array([[segment_id]]))[0, 0])
                legend.append((self.names[category - 1], color))
        return viz.tile(title, colors, legend=legend or None)


def compare_tiles(view: ImageView, other: Config, model) -> list[np.ndarray]:
    """Labels of this image recomputed under another config (e.g. calibrated thresholds), from the
    cached CAMs and the trained IRN. Walk-time keys apply exactly; relation thresholds would need
    train-irn again, so this picture shows only their walk-time part."""
    from wsseg.stages.make_cam import cam_power
    from wsseg.stages.synthesize_labels import synthesize

    cams = artifacts.read_cams(artifacts.seed_path(view.config, view.store, view.id))
    if cams is None:
        return []
    out = synthesize(model, view.image, cams, other, torch.device("cpu"), cam_power(other, view.store))
    name = Path(other.sources[-1]).name
    return [view.labels_tile(f"semantic label ({name})", out["semantic"]),
            viz.tile(f"instance labels ({name}, {len(out['classes'])})",
                     viz.overlay(view.image, viz.instance_colors(out["ids"]), 0.6, mask=out["ids"] > 0))]


def panel_for(view: ImageView, compare: tuple[Config, object] | None = None) -> np.ndarray:
    tiles = [viz.tile(f"image {view.id}", view.image)]
    if view.ground_truth is not None:
        tiles.append(view.labels_tile("ground truth", view.ground_truth))
    if view.dataset.has_instances(view.id):
        from wsseg.stages.panoptic import ground_truth_segments

        segments, categories, _ = ground_truth_segments(view.dataset, view.id)
        tiles.append(view.segments_tile("ground truth panoptic", segments, categories))
    for stage in pipeline.STAGES:
        if stage.inspect_tiles is not None and stage.is_on(view.config):
            tiles.extend(stage.inspect_tiles(view))
    if compare is not None:
        tiles.extend(compare_tiles(view, *compare))
    return viz.panel(tiles, columns=4)


def disagreement(view: ImageView) -> float | None:
    """1 - mIoU of the most refined labels available for this image: those of the last stage
    that makes a label map and has one for it (None without ground truth)."""
    if view.ground_truth is None:
        return None
    labels = None
    for stage in reversed(pipeline.STAGES):
        if stage.label_map is not None and stage.is_on(view.config):
            labels = stage.label_map(view.config, view.store, view.id)
            if labels is not None:
                break
    if labels is None:
        return None
    matrix = ConfusionMatrix(len(view.names) + 1)
    matrix.update(labels, view.ground_truth)
    miou = matrix.summary()["miou"]
    return None if miou is None else 1.0 - miou


def stage_metrics(config: Config, store: RunStore) -> dict[str, dict[str, float | str]]:
    table: dict[str, dict[str, float | str]] = {}
    for stage in pipeline.STAGES:
        record = store.record(stage.record_folder(config)) if stage.is_on(config) else None
        if not record or not record.get("metrics"):
            continue
        flat = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record["metrics"].items()
                if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        table[stage.name] = flat
    return table


def run_label(config: Config) -> str:
    return Path(config.run.dir).name or str(config.run.dir)


def inspect(config: Config, image_ids: list[str], out: Path, *, worst: int | None = None, progress=None,
            compare: Config | None = None, against: Config | None = None, log=None) -> Path:
    """Write `<out>/<id>.png` panels, the run section's pictures under `<out>/run/` and
    `<out>/index.html`; returns the index path.

    `compare`: another config (the same run with an overlay such as calibrated.yaml): each
    panel adds the labels recomputed under it, next to the cached ones. `against`: a second
    run's config; its metrics and pictures go beside this run's. `log(line)` hears what the run
    section could not draw (matplotlib missing)."""
    store = RunStore(Path(config.run.dir))
    runs = [run_view.Run(run_label(config), config, store)]
    if against is not None:
        other = run_view.Run(run_label(against), against, RunStore(Path(against.run.dir)))
        if other.label == runs[0].label:  # two runs of one name in different folders: A and B
            runs = [run_view.Run(f"A {runs[0].label}", config, store), run_view.Run(f"B {other.label}", against, other.store)]
        else:
            runs.append(other)
    comparison = None
    if compare is not None:
        from wsseg.stages.train_irn import load_network

        comparison = (compare, load_network(config, store))
    dataset = artifacts.open_dataset(config)
    if not image_ids:
        candidates = artifacts.image_ids(config, "data.eval_list")
        if worst:
            scored = []
            for image_id in candidates:
                if not dataset.has_semantic(image_id):
                    continue
                score = disagreement(ImageView(config, store, dataset, image_id))
                if score is not None:
                    scored.append((score, image_id))
            image_ids = [i for _, i in sorted(scored, reverse=True)[:worst]]
        else:
            image_ids = candidates[:8]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    iterator = progress(image_ids, desc="inspect") if progress else image_ids
    for image_id in iterator:
        view = ImageView(config, store, dataset, image_id)
        name = f"{image_id}.png"
        viz.save_png(out / name, panel_for(view, comparison))
        score = disagreement(view)
        rows.append({"id": image_id, "panel": name, "note": "" if score is None else f"label mIoU vs ground truth {1 - score:.3f}"})
    if plots.pyplot() is None:
        if log:
            log(plots.MISSING)
        figures = []
    else:
        figures = run_view.run_figures(runs, out / "run")
    metrics = stage_metrics(config, store)
    if len(runs) > 1:  # each stage's row once per run, the runs' rows together
        tables = [(run.label, stage_metrics(run.config, run.store)) for run in runs]
        names = list(dict.fromkeys(name for _, table in tables for name in table))
        metrics = {f"{name} ({label})": table[name] for name in names for label, table in tables if name in table}
    title = f"wsseg inspect: {config.run.dir}" + (f" against {against.run.dir}" if against is not None else "")
    index = out / "index.html"
    viz.write_gallery(index, title, metrics, rows,
                      figures=[{**f, "image": Path(f["image"]).relative_to(out)} for f in figures])
    return index
