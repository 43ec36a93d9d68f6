"""The quality table `make demo` ends with: each stage's headline numbers and time, from the records."""

from __future__ import annotations

from pathlib import Path

from wsseg.config import Config
from wsseg.pipeline import available_stages, outputs_of
from wsseg.store import RunStore


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def quality_rows(config: Config) -> list[tuple[str, str, str]]:
    """(stage, quality, time) rows for the stages that have a record."""
    store = RunStore(Path(config.run.dir))
    rows = []
    for stage in available_stages():
        record = store.record(outputs_of(stage, config)[0])
        if not record:
            continue
        m = record.get("metrics") or {}
        seconds = record.get("seconds")
        time = "-" if seconds is None else f"{seconds:.0f}s"
        if stage.NAME == "train-cam":
            quality = f"classification mAP train {_fmt(m.get('train_map'))}, val {_fmt(m.get('val_map'))}"
        elif stage.NAME == "make-cam":
            quality = (f"CAM mIoU {_fmt(m.get('miou'))} at bg {_fmt(m.get('threshold'), 2)}, "
                       f"{_fmt(m.get('miou_relative'))} relative (Otsu {_fmt(m.get('otsu_threshold'), 2)}), "
                       f"best {_fmt(m.get('best_miou'))} at bg {_fmt(m.get('best_threshold'), 2)}")
        elif stage.NAME == "mine-relations":
            quality = f"relation precision {_fmt(m.get('precision'))}, coverage {_fmt(m.get('coverage'))}"
        elif stage.NAME == "train-irn":
            quality = f"final loss {_fmt(m.get('final_loss'))}"
        elif stage.NAME == "synthesize-labels":
            quality = (f"semantic mIoU {_fmt(m.get('semantic_miou'))}, instance AP50 {_fmt(m.get('instance_ap50'))}, "
                       f"PQ {_fmt(m.get('pq'))}")
        elif stage.NAME == "train-segmenter":
            quality = (f"{m.get('model', '?')} val mIoU: pseudo {_fmt(m.get('miou_pseudo'))}, gt {_fmt(m.get('miou_gt'))}, "
                       f"ratio {_fmt(m.get('pseudo_to_gt'))}")
        else:
            quality = ""
        if record.get("status") != "complete":
            quality = f"(incomplete) {quality}"
        rows.append((stage.NAME, quality, time))
    return rows


def format_quality(config: Config) -> str:
    rows = [("stage", "quality", "time"), *quality_rows(config)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
