"""What a stage declares: one `Stage` object per stage, listed in order in wsseg/pipeline.py.

A stage module (wsseg/stages/<name>.py) holds the stage's algorithm glue and ends with
its `STAGE = Stage(...)`. Everything outside the module -- the commands of `wsseg`,
`run-all`, `status`, `report`, `eval --stage`, `inspect` -- reads these fields and never
branches on a stage's name. docs/DESIGN.md shows how to add one.

Why a frozen dataclass rather than a module convention (NAME, NEEDS, ... at module
level): a missing or misspelt field fails when the module is imported, with Python's own
error, instead of being skipped by a `hasattr`; the fields and their types are written
down in one place (here); and a test can build a stage from plain functions and run a
pipeline of them without creating modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Union

if TYPE_CHECKING:
    import numpy as np

    from wsseg.config import Config
    from wsseg.context import Progress, StageContext
    from wsseg.store import RunStore

# (config, store, progress) -> metrics; `progress(items, desc=...)` wraps an iterable
Evaluator = Callable[["Config", "RunStore", Callable[..., "Progress"]], dict]
# Either a fixed tuple or a function of the config (e.g. a folder named after the chosen model)
PerConfig = Union[tuple[str, ...], Callable[["Config"], tuple[str, ...]]]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline.

    run(ctx) -> {"metrics": {...}, "items": {"done", "total"}, "curves": {...}, "counters": {...}}
    (every key optional; a plain dict is taken as the metrics). `metrics` go into the
    stage record for people; anything a later stage needs is written as a file in the
    stage's outputs instead.
    """

    name: str  # the command, e.g. "make-cam"
    help: str  # one line for `wsseg --help`
    run: Callable[["StageContext"], dict]
    # Run-directory folders the stage owns, relative; the first holds its record (stage.json).
    # A stale stage's folders are deleted before it reruns.
    outputs: PerConfig
    needs: tuple[str, ...] = ()  # stages whose outputs it reads (by name, earlier in the list)
    # A boolean config key that turns an optional stage on (e.g. "cam.amn"). While it is false the
    # stage is "off": run-all passes it by, and the stages that list it in `needs` do without it
    # (their fingerprints are then what they were before the stage existed).
    switch: str | None = None
    # (config, need) -> whether this config reads that need at all (default: every listed need);
    # a need it does not read is neither required to be done nor part of its fingerprint
    # (train-segmenter on ground-truth masks alone needs no pseudo labels).
    uses: Callable[["Config", str], bool] | None = None
    # Config selectors that change its result: "cam" (a whole section), "cam.scales" (one key),
    # "-cam.sweep" (leave one out of a selected section); plus the contents of every
    # data.*_list selected. They, the version and the needs' fingerprints make its fingerprint.
    reads: PerConfig = ()
    version: int = 1  # bump when the meaning or format of its outputs changes: old runs become stale
    headline: str | None = None  # the metric `status` shows
    quality: Callable[[dict], str] | None = None  # metrics -> the `report` table's quality cell
    evaluators: Mapping[str, Evaluator] = field(default_factory=dict)  # `eval --stage NAME` -> function
    # (config, store) -> ids whose output files are missing or damaged although the stage completed
    damaged: Callable[["Config", "RunStore"], list[str]] | None = None
    # (config, store) -> (done, total) items, for `status` while the stage is partial
    count_done: Callable[["Config", "RunStore"], tuple[int, int]] | None = None
    # view -> picture tiles of one image for `inspect` (see wsseg/inspect.py's ImageView)
    inspect_tiles: Callable[[Any], list["np.ndarray"]] | None = None
    # (config, store, image id) -> this stage's semantic label map of the image, or None;
    # `inspect --worst` ranks images by the last stage in the list that has one
    label_map: Callable[["Config", "RunStore", str], "np.ndarray | None"] | None = None

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip() or " " in self.name:
            raise ValueError(f"stage name {self.name!r}: a non-empty command name without spaces")
        if isinstance(self.needs, str) or isinstance(self.reads, str) or isinstance(self.outputs, str):
            raise TypeError(f"stage {self.name}: needs, reads and outputs are tuples of strings, not one string")
        if not callable(self.outputs) and not self.outputs:
            raise ValueError(f"stage {self.name}: declare at least one output folder (it holds the record)")

    def is_on(self, config: "Config") -> bool:
        return self.switch is None or bool(config.get(self.switch))

    def output_folders(self, config: "Config") -> tuple[str, ...]:
        return tuple(self.outputs(config) if callable(self.outputs) else self.outputs)

    def record_folder(self, config: "Config") -> str:
        """The folder whose stage.json is this stage's record."""
        return self.output_folders(config)[0]

    def selectors(self, config: "Config") -> tuple[str, ...]:
        return tuple(self.reads(config) if callable(self.reads) else self.reads)


def check_stages(stages: tuple[Stage, ...] | list[Stage]) -> None:
    """A pipeline's consistency: unique names, needs that come earlier, one owner per `eval --stage` name."""
    seen: set[str] = set()
    evaluators: dict[str, str] = {}
    for stage in stages:
        if not isinstance(stage, Stage):
            raise TypeError(f"{stage!r} is not a Stage")
        if stage.name in seen:
            raise ValueError(f"two stages are named {stage.name}")
        for need in stage.needs:
            if need not in seen:
                raise ValueError(f"stage {stage.name} needs {need}, which is not an earlier stage")
        for name in stage.evaluators:
            if name in evaluators:
                raise ValueError(f"eval --stage {name} is claimed by {evaluators[name]} and {stage.name}")
            evaluators[name] = stage.name
        seen.add(stage.name)



def fmt(value: Any, digits: int = 3) -> str:
    """A metric as the quality cells show it: "-" when missing, floats to `digits` places."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
