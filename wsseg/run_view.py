"""The run section of `wsseg inspect`'s gallery: what each stage's record and step logs say,
drawn (wsseg.plots) — training curves, per-class bars, sweeps, calibrate's search and the
segmenter's evaluation modes — for one run, or two side by side (`--against`).

Nothing is recomputed: a stage contributes what its record (`stage.json`: metrics) and its
step logs (`curves/<phase>.json`) hold. What a record holds is found by shape, so a stage
added later gets its pictures without code here:
- every `<prefix>per_class_<measure>` mapping of class name -> value (also one level down, as
  the segmenter's per label source) is a bar chart per measure, its prefixes side by side;
- a `sweep` mapping of level -> score is a curve, with the record's `*threshold` levels marked;
- `miou_single` / `miou_msflip` / `miou_crf` per label source are the evaluation modes' bars.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from wsseg import pipeline, plots
from wsseg.config import Config
from wsseg.steplog import read_logs
from wsseg.store import RunStore, read_json

PER_CLASS = "per_class_"
MODES = ("single", "msflip", "crf")
MEASURES = {"iou": "IoU", "ap50": "AP50", "pq": "PQ", "precision": "precision", "coverage": "coverage"}
SERIES = {"": "as evaluated", "best": "at the best level"}  # a per-class prefix's name in a legend
MARKS = {"eval": "fixed (eval_threshold)", "otsu": "relative (Otsu level)", "best": "best"}  # a *threshold key's


@dataclass(frozen=True)
class Run:
    label: str  # how the pictures name it (its run directory's name)
    config: Config
    store: RunStore

    def record(self, stage) -> dict | None:
        if not stage.is_on(self.config):
            return None
        record = self.store.record(stage.record_folder(self.config))
        return record if record and record.get("status") == "complete" else None


def per_class_tables(metrics: dict) -> dict[str, dict[str, dict]]:
    """measure -> series label -> {class: value}, from a record's metrics (see the module doc)."""
    found: dict[str, dict[str, dict]] = {}

    def visit(values: dict, outer: str) -> None:
        for key, value in values.items():
            if not isinstance(value, dict):
                continue
            if PER_CLASS in key and value and all(v is None or isinstance(v, (int, float)) for v in value.values()):
                prefix, measure = key.split(PER_CLASS, 1)
                prefix = prefix.rstrip("_")
                label = " ".join(p for p in (outer, prefix if outer else SERIES.get(prefix, prefix)) if p)
                found.setdefault(measure, {})[label] = value
            elif not outer:
                visit(value, key)

    visit(metrics, "")
    # the stage's own numbers first (the bars are ordered by the first series), then the rest
    return {measure: dict(sorted(series.items(), key=lambda item: item[0] != SERIES[""]))
            for measure, series in found.items()}


def sweep_of(metrics: dict) -> tuple[dict[float, float], dict[str, float]] | None:
    """A record's `sweep` (level -> score) and its marked levels (`threshold` -> "eval", ...)."""
    sweep = metrics.get("sweep")
    if not isinstance(sweep, dict) or not sweep:
        return None
    points = {float(k): v for k, v in sweep.items() if v is not None}
    marks = {MARKS.get(name, name): float(value) for name, value in _thresholds(metrics).items()}
    return points, marks


def _thresholds(metrics: dict) -> dict[str, float]:
    """A record's levels: `threshold` as "eval", `<name>_threshold` as <name>."""
    return {(key[: -len("_threshold")] if key.endswith("_threshold") else "eval"): float(value)
            for key, value in metrics.items()
            if key.endswith("threshold") and isinstance(value, (int, float)) and not isinstance(value, bool)}


def mode_bars(metrics: dict) -> dict[str, dict[str, float]]:
    """label source -> evaluation mode -> val mIoU (the segmenter's single / ms+flip / +CRF)."""
    out = {}
    for source, values in metrics.items():
        if isinstance(values, dict):
            modes = {mode: values[f"miou_{mode}"] for mode in MODES if values.get(f"miou_{mode}") is not None}
            if modes:
                out[source] = modes
    return out


def _named(runs: list[Run], label: str, run_label: str) -> str:
    """A series' label, with its run's in front when two runs are drawn together."""
    return label if len(runs) == 1 else f"{run_label}: {label}"


def stage_figures(runs: list[Run], stage, out: Path) -> list[dict]:
    """The pictures of one stage: {"title", "image" (path), "caption"} each."""
    records = [(run, run.record(stage)) for run in runs]
    records = [(run, record) for run, record in records if record]
    if not records:
        return []
    figures = []

    # training curves: one picture per phase, the runs' logs of the same phase together
    phases: dict[str, list[tuple[str, dict]]] = {}
    for run, _ in records:
        for folder in stage.output_folders(run.config):
            for log in read_logs(run.store.folder(folder)):
                phases.setdefault(log.get("phase", "train"), []).append((run.label, log))
    for index, (phase, logs) in enumerate(phases.items()):
        steps = max(len(log["steps"]) for _, log in logs)
        image = plots.training_curves(f"{stage.name}: {phase}", logs, out / f"{stage.name}-curves-{index}.png")
        if image:
            figures.append({"title": f"{stage.name} — training: {phase}", "image": image,
                            "caption": f"{steps} steps; faint: every step, solid: smoothed"})

    # per-class bars
    tables: dict[str, dict[str, dict]] = {}
    for run, record in records:
        for measure, series in per_class_tables(record.get("metrics") or {}).items():
            for label, values in series.items():
                tables.setdefault(measure, {})[_named(runs, label, run.label)] = values
    for measure, series in tables.items():
        name = MEASURES.get(measure, measure)
        image = plots.class_bars(f"{stage.name}: per-class {name}", series, out / f"{stage.name}-classes-{measure}.png", name)
        if image:
            figures.append({"title": f"{stage.name} — per class {name}", "image": image, "caption": ", ".join(series)})

    # the threshold sweep
    curves, marks = {}, {}
    for run, record in records:
        found = sweep_of(record.get("metrics") or {})
        if found:
            curves[run.label] = found[0]
            if not marks:
                marks = found[1]
    if curves:
        image = plots.sweep(f"{stage.name}: mIoU against the background level", curves, marks,
                            out / f"{stage.name}-sweep.png", "background level", "mIoU")
        if image:
            figures.append({"title": f"{stage.name} — background-level sweep", "image": image,
                            "caption": "marked: " + ", ".join(f"{k} {v:g}" for k, v in marks.items())})

    # evaluation modes
    groups = {}
    for run, record in records:
        for source, modes in mode_bars(record.get("metrics") or {}).items():
            groups[_named(runs, source, run.label)] = modes
    if groups:
        image = plots.grouped_bars(f"{stage.name}: val mIoU per evaluation mode", groups, out / f"{stage.name}-modes.png", "val mIoU")
        if image:
            figures.append({"title": f"{stage.name} — evaluation modes", "image": image,
                            "caption": "single scale, multi-scale + flip, and + CRF, per label source"})
    return figures


CALIBRATION_SECTIONS = {  # report section: (score, x axis, the chosen key, what each line is)
    "semantic": ("semantic mIoU", "labels.sem_background", ("labels", "sem_background"), "CAM power ×"),
    "instance": ("instance AP50", "labels.ins_background", ("labels", "ins_background"), "CAM power ×"),
    "relations": ("relation F0.5", "relations.conf_fg", ("relations", "conf_fg"), "conf_bg "),
}


def calibration_curves(report: dict, section: str) -> tuple[dict[str, dict[float, float]], float | None]:
    """One section of calibrate's report.json as curves: {line name: {x: score}} and the chosen x.
    The labels' grid is keyed (CAM power multiplier, background level): a line per power; the
    relations' grid (conf_fg, conf_bg) with its F0.5: conf_fg along x, a line per conf_bg."""
    _, _, (chosen_section, chosen_key), line_name = CALIBRATION_SECTIONS[section]
    curves: dict[str, dict[float, float]] = {}
    for key, value in report.get("grid", {}).get(section, {}).items():
        first, second = json.loads(key)
        if section == "relations":  # (conf_fg, conf_bg) -> its scores: conf_fg along x, a line per conf_bg
            level, line = first, second
            value = value.get("f0.5") if isinstance(value, dict) else None
        else:  # (CAM power multiplier, background level)
            line, level = first, second
        if value is not None:
            curves.setdefault(f"{line_name}{line:g}", {})[float(level)] = value
    chosen = report.get("chosen", {}).get(chosen_section, {}).get(chosen_key)
    return curves, None if chosen is None else float(chosen)


def calibration_figures(runs: list[Run], out: Path) -> list[dict]:
    """calibrate's search (RUN/calibration/report.json): each searched score against the background
    level (labels) or conf_fg (relations), one line per CAM power / conf_bg, the chosen values marked."""
    figures = []
    reports = [(run, read_json(run.store.folder("calibration") / "report.json")) for run in runs]
    reports = [(run, report) for run, report in reports if isinstance(report, dict) and report.get("grid")]
    for section, (score, xlabel, _, _) in CALIBRATION_SECTIONS.items():
        curves, marks = {}, {}
        for run, report in reports:
            lines, chosen = calibration_curves(report, section)
            curves.update({_named(runs, name, run.label): points for name, points in lines.items()})
            if chosen is not None:
                marks[_named(runs, "chosen", run.label)] = chosen
        if curves:
            image = plots.sweep(f"calibrate: {score} against {xlabel}", curves, marks,
                                out / f"calibrate-{section}.png", xlabel, score)
            if image:
                figures.append({"title": f"calibrate — {score}", "image": image,
                                "caption": "the search on its image subset (a line per CAM power, as a multiple of "
                                           "labels.cam_power, or per relations.conf_bg); held-out numbers in "
                                           "calibration/report.md"})
    return figures


def run_figures(runs: list[Run], out: Path) -> list[dict]:
    """Every stage's pictures in pipeline order, then calibrate's; `image` paths are under `out`
    (the caller checks that matplotlib is there: plots.pyplot())."""
    figures = []
    for stage in pipeline.STAGES:
        figures.extend(stage_figures(runs, stage, out))
    figures.extend(calibration_figures(runs, out))
    return figures
