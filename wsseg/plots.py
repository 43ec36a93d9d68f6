"""The pictures of a run's numbers in `wsseg inspect`'s run section: training curves, per-class
bars, sweeps and evaluation modes, as PNG files drawn with matplotlib (Agg, no screen needed).

matplotlib is optional (`pip install 'wsseg[plots]'`, which `make install` includes): without
it `inspect` still writes the per-image panels and says in one line what the run section
needs. Every function takes plain numbers, one series per run when two runs are compared
(`--against`): the first run's lines are solid, the second's dashed; bars sit side by side.
"""

from __future__ import annotations

import math
from pathlib import Path

DPI = 100
WIDTH = 9.0  # inches at DPI: 900 px, readable in a browser beside the per-image panels
LINESTYLES = ("-", "--", ":", "-.")


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


MISSING = "the run section's plots need matplotlib: pip install 'wsseg[plots]' (make install has it)"


def smooth(values: list[float | None], span: int) -> list[float | None]:
    """Exponential moving average with TensorBoard's weight for a window of `span` steps; a
    missing value (None) is carried over, the first values are bias-corrected."""
    if span <= 1:
        return list(values)
    weight = 1.0 - 1.0 / span
    out, average, count = [], 0.0, 0
    for value in values:
        if value is None or not math.isfinite(value):
            out.append(out[-1] if out else None)
            continue
        average = weight * average + (1 - weight) * value
        count += 1
        out.append(average / (1 - weight ** count))
    return out


def _finish(plt, figure, path: Path) -> Path:
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def training_curves(title: str, logs: list[tuple[str, dict]], path: Path) -> Path | None:
    """One training phase: its loss terms (raw faint, smoothed solid), learning rate, images/s and
    epoch-end values (a validation score), one panel each. `logs`: (run label, step log)."""
    plt = pyplot()
    if plt is None or not logs:
        return None
    epoch_names = sorted({name for _, log in logs for name in log.get("epoch_series", {}) if not name.endswith("_epoch")})
    panels = ["loss", "lr", "images_per_second", *epoch_names]
    figure, axes = plt.subplots(1, len(panels), figsize=(WIDTH if len(panels) <= 3 else 3.2 * len(panels), 3.2),
                                squeeze=False)
    axes = dict(zip(panels, axes[0]))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for run_index, (label, log) in enumerate(logs):
        style = LINESTYLES[run_index % len(LINESTYLES)]
        prefix = f"{label}: " if len(logs) > 1 else ""
        steps = log["steps"]
        span = max(1, len(steps) // 40)
        terms = [name for name in log["series"] if name not in ("lr", "images_per_second")]
        for term_index, name in enumerate(sorted(terms, key=lambda n: (n != "total", n))):
            values = log["series"][name]
            color = colors[term_index % len(colors)]
            if span > 1:
                axes["loss"].plot(steps, [math.nan if v is None else v for v in values], color=color, alpha=0.2,
                                  linewidth=0.8, linestyle=style)
            axes["loss"].plot(steps, [math.nan if v is None else v for v in smooth(values, span)], color=color,
                              linestyle=style, linewidth=2.0 if name == "total" else 1.2, label=prefix + name)
        for name in ("lr", "images_per_second"):
            if name in log["series"]:
                values = log["series"][name] if name == "lr" else smooth(log["series"][name], span)
                axes[name].plot(steps, [math.nan if v is None else v for v in values], color="k", linestyle=style,
                                label=label if len(logs) > 1 else None)
        for name in epoch_names:
            values = log.get("epoch_series", {}).get(name)
            if values:
                axes[name].plot(log["epoch_steps"], [math.nan if v is None else v for v in values], marker="o",
                                color="C3", linestyle=style, label=label if len(logs) > 1 else None)
    axes["loss"].set_title("loss terms (smoothed)")
    axes["loss"].legend(fontsize=7, loc="upper right")
    axes["lr"].set_title("learning rate (first group)")
    axes["images_per_second"].set_title("images/s (smoothed)")
    for name in epoch_names:
        axes[name].set_title(name.replace("_", " "))
    for name, ax in axes.items():
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if name != "loss" and len(logs) > 1:
            ax.legend(fontsize=7)
    figure.suptitle(title, fontsize=11)
    return _finish(plt, figure, path)


def class_order(series: dict[str, dict[str, float | None]]) -> list[str]:
    """Every class of the series, worst first by the first series; those it has no value for last."""
    first = next(iter(series.values()))
    names = list(dict.fromkeys(name for values in series.values() for name in values))
    return sorted(names, key=lambda n: (first.get(n) is None, first.get(n) if first.get(n) is not None else 0.0))


def class_bars(title: str, series: dict[str, dict[str, float | None]], path: Path, ylabel: str) -> Path | None:
    """Per-class values, one bar per series side by side, worst class first (by the first series;
    a class without a value in it goes last)."""
    plt = pyplot()
    if plt is None or not series:
        return None
    names = class_order(series)
    width = 0.8 / len(series)
    figure, ax = plt.subplots(figsize=(min(WIDTH, 2.0 + 0.45 * len(names) * max(1, len(series) / 2)), 3.4))
    for index, (label, values) in enumerate(series.items()):
        xs = [i - 0.4 + width * (index + 0.5) for i in range(len(names))]
        heights = [values.get(n) if values.get(n) is not None else 0.0 for n in names]
        bars = ax.bar(xs, heights, width=width, label=label)
        for bar, name in zip(bars, names):
            if values.get(name) is None:
                bar.set_hatch("//")  # no value (the class does not occur): an empty hatched slot
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=45 if len(names) > 8 else 0, ha="right" if len(names) > 8 else "center",
                       fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.0 if all(v is None or v <= 1 for s in series.values() for v in s.values()) else None)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.set_title(title + " (worst first)", fontsize=10)
    return _finish(plt, figure, path)


def sweep(title: str, curves: dict[str, dict[float, float]], marks: dict[str, float], path: Path, xlabel: str,
          ylabel: str) -> Path | None:
    """A score against a swept level, one line per curve, chosen levels marked as vertical lines
    (`marks`: label -> level; the first curve's score at it in the label)."""
    plt = pyplot()
    if plt is None or not curves:
        return None
    figure, ax = plt.subplots(figsize=(WIDTH * 0.6, 3.4))
    for index, (label, points) in enumerate(curves.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker=".", linestyle=LINESTYLES[index % len(LINESTYLES)], label=label)
    first = next(iter(curves.values()))
    for index, (label, level) in enumerate(marks.items()):
        # the first curve's score at the mark: at its nearest swept level (a record may round levels)
        nearest = min(first, key=lambda x: abs(x - level))
        score = first[nearest] if abs(nearest - level) < 0.006 else None
        text = f"{label} {level:g}" + (f" ({score:.3f})" if score is not None else "")
        ax.axvline(level, color=f"C{(index + 3) % 10}", linestyle=":", label=text)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    return _finish(plt, figure, path)


def grouped_bars(title: str, groups: dict[str, dict[str, float | None]], path: Path, ylabel: str) -> Path | None:
    """Bars per group (e.g. per label source), one bar per key within it (e.g. evaluation mode),
    each with its value written on top."""
    plt = pyplot()
    if plt is None or not groups:
        return None
    keys = list(dict.fromkeys(k for values in groups.values() for k in values))
    width = 0.8 / max(1, len(keys))
    figure, ax = plt.subplots(figsize=(WIDTH * 0.6, 3.4))
    for index, key in enumerate(keys):
        xs = [i - 0.4 + width * (index + 0.5) for i in range(len(groups))]
        heights = [values.get(key) or 0.0 for values in groups.values()]
        bars = ax.bar(xs, heights, width=width, label=key)
        for bar, height in zip(bars, heights):
            ax.annotate(f"{height:.3f}", (bar.get_x() + bar.get_width() / 2, height), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _finish(plt, figure, path)
