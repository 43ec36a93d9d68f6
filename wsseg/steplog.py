"""Per-step training logs: what every optimisation step of a training stage measured.

Each training phase (train-cam's classifier, its ReCAM phase, train-irn, one segmenter per
label source, ...) keeps one log: the step number, every loss term, the learning rate and
the images/s of each step, plus the values an epoch end adds (a validation score). It lives
in the run, next to the phase's checkpoint, as `<folder>/curves/<phase>.json` (written
atomically with every checkpoint, so a resumed run continues the same log without the steps
of the epoch that was cut off), and `wsseg inspect` draws it.

With `run.tensorboard` on (the default when the `tensorboard` package is installed) the same
values go to TensorBoard event files under `RUN/tb/<stage>/<phase>`, so
`tensorboard --logdir RUN/tb` shows every stage's curves while it trains. A resumed phase
tells TensorBoard to drop the events it wrote after the checkpoint it resumed from.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path

from wsseg.errors import UserError
from wsseg.store import read_json, write_json

CURVES_FOLDER = "curves"


def phase_slug(phase: str) -> str:
    """A phase name as a file name: "deeplab-v2 on pseudo labels" -> "deeplab-v2-on-pseudo-labels"."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", phase).strip("-") or "train"


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


def tensorboard_on(setting: bool | None) -> bool:
    """`run.tensorboard`: null = on when the package is installed; true without it is one clear error."""
    if setting is None:
        return tensorboard_available()
    if setting and not tensorboard_available():
        raise UserError("run.tensorboard: true, but the tensorboard package is not installed; "
                        "pip install 'wsseg[tensorboard]' (or tensorboard), or set run.tensorboard: false")
    return bool(setting)


def _rounded(value: float) -> float | None:
    """Six significant digits (the JSON stays small); None for a value that is not finite."""
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.6g}")


EVENT_FILE_SECOND = re.compile(r"events\.out\.tfevents\.(\d+)\.")


def wait_for_a_later_event_file_name(folder: Path) -> None:
    """Return once a new event file in `folder` will sort after every one there. TensorBoard reads a
    folder's event files in name order, and a purge applies only to the files before it; the name
    starts with the whole second it was made in, then host, process id and a per-process counter,
    whose string order is not the order of creation (counter 10 sorts before 9). A resume that
    starts in the same second as the newest file there therefore waits for the next second."""
    seconds = [int(m.group(1)) for p in folder.glob("events.out.tfevents.*") if (m := EVENT_FILE_SECOND.match(p.name))]
    if seconds:
        while time.time() < max(seconds) + 1:
            time.sleep(0.05)


class StepLog:
    """The log of one training phase: per-step series and per-epoch series, aligned on the step.

    `state` (from a checkpoint) continues a resumed phase; `tensorboard`: the folder of its
    event files, or None for none. Only the main process of a torchrun job keeps a log."""

    def __init__(self, path: Path, phase: str, stage: str, *, state: dict | None = None,
                 tensorboard: Path | None = None, start_step: int = 0):
        self.path, self.phase, self.stage = path, phase, stage
        state = state or {}
        self.steps: list[int] = list(state.get("steps", []))
        self.series: dict[str, list] = {k: list(v) for k, v in state.get("series", {}).items()}
        self.epoch_steps: list[int] = list(state.get("epoch_steps", []))
        self.epoch_series: dict[str, list] = {k: list(v) for k, v in state.get("epoch_series", {}).items()}
        self._keep_before(start_step)
        self.writer = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            if start_step == 0 and tensorboard.exists():
                shutil.rmtree(tensorboard)  # a phase trained from scratch starts a fresh TensorBoard run
            else:
                wait_for_a_later_event_file_name(tensorboard)
            # purge_step: on a resume, TensorBoard hides what the cut-off run wrote from this step on
            self.writer = SummaryWriter(str(tensorboard), purge_step=start_step or None)

    def _keep_before(self, step: int) -> None:
        """Drop what was logged at or after `step` (a checkpoint's log never has any; a stale file may)."""
        keep = sum(1 for s in self.steps if s < step)
        self.steps = self.steps[:keep]
        self.series = {k: v[:keep] for k, v in self.series.items()}
        keep = sum(1 for s in self.epoch_steps if s < step)
        self.epoch_steps = self.epoch_steps[:keep]
        self.epoch_series = {k: v[:keep] for k, v in self.epoch_series.items()}

    @staticmethod
    def _append(steps: list[int], series: dict[str, list], step: int, values: dict[str, float]) -> None:
        steps.append(step)
        for name, value in values.items():
            # a term that first appears now is None for the steps before it
            series.setdefault(name, [None] * (len(steps) - 1))
        for name, column in series.items():
            column.append(_rounded(values[name]) if name in values else None)

    def add_step(self, step: int, values: dict[str, float]) -> None:
        """One optimisation step's values (loss terms, "lr", "images_per_second"); steps count from 0."""
        self._append(self.steps, self.series, step, values)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(_tag(name), value, step)

    def add_epoch(self, step: int, values: dict[str, float]) -> None:
        """Values measured at an epoch's end (a validation score), at the step that ended it."""
        if not values:
            return
        self._append(self.epoch_steps, self.epoch_series, step, values)
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"epoch/{name}", value, step)

    def state(self) -> dict:
        return {"phase": self.phase, "stage": self.stage, "steps": self.steps, "series": self.series,
                "epoch_steps": self.epoch_steps, "epoch_series": self.epoch_series}

    def flush(self) -> None:
        """The log to its JSON file (atomically) and the event file to disk."""
        write_json(self.path, self.state())
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _tag(name: str) -> str:
    """TensorBoard tag: loss terms under loss/, the rest (lr, images_per_second) on their own."""
    return name if name in ("lr", "images_per_second") else f"loss/{name}"


def read_logs(folder: Path) -> list[dict]:
    """Every phase log under a stage's output folder, in file-name order (unreadable ones left out)."""
    logs = []
    for path in sorted(folder.rglob(f"{CURVES_FOLDER}/*.json")) if folder.exists() else []:
        log = read_json(path)
        if isinstance(log, dict) and isinstance(log.get("steps"), list) and isinstance(log.get("series"), dict):
            logs.append(log)
    return logs
