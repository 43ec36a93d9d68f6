"""The loop every per-image stage runs (make-cam, mine-relations, synthesize-labels).

Each rank takes every world_size-th image; an image whose output exists and reads back
whole is skipped (resume), a damaged one is recomputed; an unreadable input image stops
the stage with one line naming the file, or with `data.on_bad_image: skip` is left out
and listed in `<folder>/skipped.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from wsseg.context import StageContext
from wsseg.errors import UserError
from wsseg.stages.artifacts import is_whole
from wsseg.store import read_json, write_json


def pending(ids: list[str], output: Callable[[str], Path]) -> list[str]:
    """The ids whose output is missing or damaged (damaged files are deleted)."""
    todo = []
    for image_id in ids:
        path = output(image_id)
        if path.exists() and is_whole(path, thorough=True):
            continue
        path.unlink(missing_ok=True)
        todo.append(image_id)
    return todo


def for_each_image(ctx: StageContext, ids: list[str], output: Callable[[str], Path], work: Callable[[str], None], *,
                   report_folder: Path, desc: str | None = None, processes: int = 0) -> dict:
    """Run `work(image_id)` (which writes `output(image_id)`, its last file) for this rank's pending images.

    processes > 1 fans the images out over that many worker processes (joblib); `work` must
    then be picklable (a module-level function or a functools.partial of one).
    """
    mine = ctx.dist.shard(ids)
    todo = pending(mine, output)
    if len(todo) < len(mine):
        ctx.log.info("%s: %d of %d images already done, %d to go", ctx.name, len(mine) - len(todo), len(mine), len(todo))
    skipped = {}
    bar = ctx.progress(total=len(todo), desc=desc or ctx.name)
    try:
        for image_id, error in _run(work, todo, processes):
            if error is not None:
                if ctx.config.data.on_bad_image != "skip":
                    raise error
                skipped[image_id] = str(error)
                ctx.log.warning("%s: skipped %s: %s", ctx.name, image_id, error)
            bar.update(1)
    finally:
        bar.close()
    if skipped:
        report = report_folder / f"skipped{'' if not ctx.dist.enabled else f'.rank{ctx.dist.rank}'}.json"
        previous = read_json(report) or {}
        write_json(report, {**previous, **skipped})
    return ctx.dist.total({"done": len(mine) - len(skipped), "skipped": len(skipped)})  # over all ranks


def _attempt(work: Callable[[str], None], image_id: str) -> tuple[str, UserError | None]:
    try:
        work(image_id)
    except UserError as error:
        return image_id, error
    return image_id, None


def _run(work: Callable[[str], None], ids: list[str], processes: int) -> Iterator[tuple[str, UserError | None]]:
    if processes <= 1 or len(ids) <= 1:
        for image_id in ids:
            yield _attempt(work, image_id)
        return
    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=processes, return_as="generator_unordered", batch_size=1)
    yield from parallel(delayed(_attempt)(work, image_id) for image_id in ids)


def skipped_ids(report_folder: Path) -> set[str]:
    ids: set[str] = set()
    for report in report_folder.glob("skipped*.json"):
        ids.update((read_json(report) or {}).keys())
    return ids
