"""The quality table `make demo` ends with: each stage's headline numbers and time, from the records."""

from __future__ import annotations

from pathlib import Path

from wsseg import pipeline
from wsseg.config import Config
from wsseg.store import RunStore


def quality_rows(config: Config) -> list[tuple[str, str, str]]:
    """(stage, quality, time) rows for the stages that have a record."""
    store = RunStore(Path(config.run.dir))
    rows = []
    for stage in pipeline.STAGES:
        record = store.record(stage.record_folder(config)) if stage.is_on(config) else None
        if not record:
            continue
        seconds = record.get("seconds")
        runs = len(record.get("runs", []))
        time = "-" if seconds is None else f"{seconds:.0f}s" + (f" ({runs} runs)" if runs > 1 else "")
        quality = stage.quality(record.get("metrics") or {}) if stage.quality else ""
        if record.get("status") != "complete":
            quality = f"(incomplete) {quality}"
        rows.append((stage.name, quality, time))
    return rows


def format_quality(config: Config) -> str:
    rows = [("stage", "quality", "time"), *quality_rows(config)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
