"""The ordered stages, their fingerprints, running one stage, `run-all` and `status`.

STAGES below is the pipeline: one line per stage, each the `Stage` object its module in
wsseg/stages/ declares (wsseg/stage.py lists what a stage declares). The commands,
`status`, `report`, `eval` and `inspect` are all derived from this list.

Fingerprint = hash(name, version, the selected config values, the content of the image
lists it reads, the fingerprints of its needs). A complete record with the same
fingerprint is up to date; a different one is stale and its outputs are removed before
the stage runs again; a `running` record with the same fingerprint is resumed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from wsseg.config import SECTIONS as CONFIG_SECTIONS
from wsseg.config import Config
from wsseg.context import Distributed, StageContext, resolve_device
from wsseg.errors import UserError
from wsseg.stage import Stage, check_stages
from wsseg.stages import (make_amn_cam, make_cam, mine_relations, synthesize_labels, train_amn, train_cam, train_irn,
                          train_segmenter)
from wsseg.store import RunLock, RunStore, canonical_json, check_run_dir_is_safe, digest, remove_temporaries

log = logging.getLogger("wsseg")

# The pipeline, in order.
STAGES: tuple[Stage, ...] = (
    train_cam.STAGE,
    make_cam.STAGE,
    train_amn.STAGE,  # optional: cam.amn
    make_amn_cam.STAGE,  # optional: cam.amn
    mine_relations.STAGE,
    train_irn.STAGE,
    synthesize_labels.STAGE,
    train_segmenter.STAGE,
)
check_stages(STAGES)


def stage_by_name(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    names = ", ".join(s.name for s in STAGES)
    raise UserError(f"unknown stage {name!r}; stages are: {names}")


def active_needs(stage: Stage, config: Config) -> tuple[str, ...]:
    """The stages `stage` reads under this config: its needs less those switched off or unused (Stage.uses)."""
    return tuple(need for need in stage.needs
                 if stage_by_name(need).is_on(config) and (stage.uses is None or stage.uses(config, need)))


def evaluator_by_name(name: str) -> tuple[Stage, Any]:
    """The stage that owns `eval --stage NAME`, and its evaluate function."""
    for stage in STAGES:
        if name in stage.evaluators:
            return stage, stage.evaluators[name]
    raise UserError(f"eval --stage {name}: choose one of {', '.join(evaluation_names())}")


def evaluation_names() -> list[str]:
    return [name for stage in STAGES for name in stage.evaluators]


# ---------------------------------------------------------------------------- fingerprints

def selected_config(config: Config, selectors: tuple[str, ...]) -> dict[str, Any]:
    """Flatten the selected keys: "cam" = every cam key, "cam.scales" = one, "-cam.sweep" removes one.

    A key at its `neutral` value (config.key: the value at which it changes nothing, i.e. how
    wsseg behaved before the key existed) is left out, so that adding an option does not make
    every earlier run stale."""
    values: dict[str, Any] = {}
    for selector in selectors:
        if selector.startswith("-"):
            values.pop(selector[1:], None)
            continue
        if "." in selector:
            values[selector] = config.get(selector)
        else:
            for f in dataclasses.fields(CONFIG_SECTIONS[selector]):
                value = getattr(config.get(selector), f.name)
                if "neutral" in f.metadata and value == f.metadata["neutral"]:
                    continue
                values[f"{selector}.{f.name}"] = value
    for selector in selectors:  # exclusions win whatever their position
        if selector.startswith("-"):
            values.pop(selector[1:], None)
    return values


def _list_digests(config: Config, keys: list[str]) -> dict[str, str]:
    from wsseg.stages.artifacts import read_list, require_dataset_root

    if keys:
        require_dataset_root(config)
    return {key: digest(read_list(config, key)) for key in keys}


def stage_inputs(stage: Stage, config: Config) -> dict[str, Any]:
    """What the fingerprint covers, as readable key -> value pairs (status diffs them)."""
    values = selected_config(config, stage.selectors(config))
    if "data.root" in values:
        values["data.root"] = str(Path(values["data.root"]).resolve())
        if config.data.format != "voc":  # the layout the root is read in (voc, the first, stays out: old fingerprints hold)
            values["data.format"] = config.data.format
        if config.data.max_side:  # the size every image is read at (0, off, stays out)
            values["data.max_side"] = config.data.max_side
    list_keys = [k for k in values if k.startswith("data.") and k.endswith("_list")]
    for key, value in _list_digests(config, list_keys).items():
        values[f"{key}#content"] = value
    return json.loads(canonical_json(values))  # the form the record stores (tuples become lists)


def fingerprint(stage: Stage, config: Config, _cache: dict | None = None) -> str:
    cache = {} if _cache is None else _cache
    if stage.name not in cache:
        needs = {need: fingerprint(stage_by_name(need), config, cache) for need in active_needs(stage, config)}
        cache[stage.name] = digest({"stage": stage.name, "version": stage.version, "inputs": stage_inputs(stage, config), "needs": needs})
    return cache[stage.name]


# ---------------------------------------------------------------------------- state

@dataclasses.dataclass
class StageState:
    name: str
    state: str  # done | stale | partial | missing | blocked
    reason: str = ""
    items: str = ""
    seconds: float | None = None
    headline: str = ""
    runs: int = 1  # processes the time was spent in (an interrupted and resumed stage: 2 or more)


def _stale_reason(record: dict, stage: Stage, config: Config, store: RunStore) -> str:
    if record.get("version") != stage.version:
        return f"stage version {record.get('version')} -> {stage.version}"
    old = record.get("inputs", {})
    new = stage_inputs(stage, config)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        shown = ", ".join(k.replace("#content", " (list content)") for k in changed[:3])
        return f"changed: {shown}" + (" ..." if len(changed) > 3 else "")
    for need in active_needs(stage, config):
        if not _need_unchanged(record, need, config, store):
            return f"{need} was rerun"
    return "upstream changed"


def stage_state(stage: Stage, config: Config, store: RunStore, cache: dict | None = None) -> StageState:
    if not stage.is_on(config):
        return StageState(stage.name, "off", reason=f"{stage.switch} is false")
    record = store.record(stage.record_folder(config))
    state = StageState(stage.name, "missing")
    if record is None:
        return state
    state.seconds = record.get("seconds")
    state.runs = len(record.get("runs", [])) or 1
    current = record.get("fingerprint") == fingerprint(stage, config, cache) and all(
        _need_unchanged(record, need, config, store) for need in active_needs(stage, config))
    if not current:
        state.state, state.reason = "stale", _stale_reason(record, stage, config, store)
    elif record.get("status") == "complete":
        state.state = "done"
    else:
        state.state = "partial"
    items = record.get("items")
    if state.state == "partial" and stage.count_done is not None:
        try:
            done, total = stage.count_done(config, store)
            items = {"done": done, "total": total}
        except UserError:
            pass
    if isinstance(items, dict):
        state.items = f"{items.get('done', 0)}/{items.get('total', 0)}"
    headline = stage.headline
    metrics = record.get("metrics") or {}
    if headline and headline in metrics and metrics[headline] is not None:
        value = metrics[headline]
        state.headline = f"{headline} {value:.3f}" if isinstance(value, float) else f"{headline} {value}"
    return state


def _need_unchanged(record: dict, need: str, config: Config, store: RunStore) -> bool:
    """Whether the upstream stage `need` is still the run this record was made from."""
    upstream = store.record(stage_by_name(need).record_folder(config))
    return upstream is not None and upstream.get("token") == record.get("needs", {}).get(need)


# ---------------------------------------------------------------------------- running

def prepare_run_dir(config: Config) -> RunStore:
    run_dir = Path(config.run.dir)
    check_run_dir_is_safe(run_dir, {"data.root": Path(config.data.root)})
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunStore(run_dir)


def run_stage(stage: Stage, config: Config, *, force: bool = False, dist: Distributed | None = None) -> dict:
    """Run one stage if it is not up to date; returns its record."""
    dist = dist or Distributed()
    if not stage.is_on(config):
        raise UserError(f"{stage.name} is off: it runs when {stage.switch} is true (e.g. --set {stage.switch}=true)")
    store = prepare_run_dir(config)
    outputs = stage.output_folders(config)
    fp = fingerprint(stage, config)
    record = store.record(outputs[0])

    upstream_tokens = {}
    for need in active_needs(stage, config):
        need_stage = stage_by_name(need)
        need_state = stage_state(need_stage, config, store)
        if need_state.state != "done":
            raise UserError(
                f"{stage.name} needs {need}, which is {need_state.state}"
                f"{' (' + need_state.reason + ')' if need_state.reason else ''}; run `wsseg {need}` or `wsseg run-all` first"
            )
        upstream_tokens[need] = store.record(need_stage.record_folder(config))["token"]

    up_to_date = (
        record is not None and record.get("status") == "complete" and record.get("fingerprint") == fp
        and record.get("needs", {}) == upstream_tokens
    )
    if up_to_date and not force:
        bad = stage.damaged(config, store) if stage.damaged is not None else []  # every rank: all must agree
        if not bad:
            log.info("%s: up to date, skipped", stage.name)
            return record
        # A file of a finished stage is missing or damaged (a full disk, a hand edit): redo just those.
        log.warning("%s: %d output file(s) missing or damaged (e.g. %s); recomputing them", stage.name, len(bad), bad[0])
        record["status"] = "running"
        if dist.is_main:
            store.write_record(outputs[0], record)

    resuming = (
        record is not None and record.get("status") == "running" and record.get("fingerprint") == fp
        and record.get("needs", {}) == upstream_tokens and not force
    )
    if dist.is_main:
        if resuming:
            log.info("%s: resuming an interrupted run", stage.name)
        else:
            if record is not None or any(store.folder(o).exists() for o in outputs):
                log.info("%s: %s, removing its old outputs", stage.name, "forced" if force else "stale")
            for output in outputs:
                store.clear(output)
        for output in outputs:
            remove_temporaries(store.folder(output))
        runs = interrupted_runs(record, store, outputs) if resuming and record else []
        record = {
            "stage": stage.name,
            "version": stage.version,
            "fingerprint": fp,
            "status": "running",
            "inputs": stage_inputs(stage, config),
            "needs": upstream_tokens,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "started_at": time.time(),
            "host": socket.gethostname(),
            "seconds": round(sum(run["seconds"] for run in runs), 2),
            "runs": runs,
            "config": config.to_dict(),
        }
        store.write_record(outputs[0], record)
    dist.barrier()

    device = resolve_device(config.run.device, dist.local_rank)
    ctx = StageContext(config=config, store=store, name=stage.name, device=device, dist=dist, force=force)
    start = time.monotonic()
    log.info("%s: running on %s%s", stage.name, device, f" (rank {dist.rank}/{dist.world_size})" if dist.enabled else "")
    metrics = stage.run(ctx) or {}
    dist.barrier()
    elapsed = time.monotonic() - start
    if dist.is_main:
        record = store.record(outputs[0]) or record
        runs = [*record.get("runs", []), {"started": record.get("started"), "seconds": round(elapsed, 2)}]
        record.update(
            status="complete",
            finished=time.strftime("%Y-%m-%d %H:%M:%S"),
            seconds=round(sum(run["seconds"] for run in runs), 2),
            runs=runs,
            metrics=metrics.get("metrics", metrics),
            token=secrets.token_hex(8),
        )
        for extra in ("items", "curves", "counters"):
            if extra in metrics:
                record[extra] = metrics[extra]
        store.write_record(outputs[0], record)
        log.info("%s: done in %.1fs", stage.name, elapsed)
    dist.barrier()
    return store.record(outputs[0]) or record


def interrupted_runs(record: dict, store: RunStore, outputs: tuple[str, ...]) -> list[dict]:
    """The runs of a stage so far, when it resumes: those its record kept, and the interrupted one,
    which could not write its time before it was stopped. That one lasted from its start to the last
    file it wrote in the stage's folders (a checkpoint, a finished item, the record): the closest
    measure a killed process leaves behind."""
    runs = list(record.get("runs", []))
    started = record.get("started_at")
    if started is None:
        return runs
    last = started
    for output in outputs:
        folder = store.folder(output)
        if folder.exists():
            last = max([last, *(path.stat().st_mtime for path in folder.rglob("*") if path.is_file())])
    runs.append({"started": record.get("started"), "seconds": round(max(0.0, last - float(started)), 2), "interrupted": True})
    return runs


def stages_between(start: str | None, stop: str | None) -> list[Stage]:
    names = [s.name for s in STAGES]
    first = names.index(stage_by_name(start).name) if start else 0
    last = names.index(stage_by_name(stop).name) if stop else len(STAGES) - 1
    if first > last:
        raise UserError(f"--from {start} comes after --to {stop}")
    return list(STAGES[first : last + 1])


def run_all(config: Config, *, start: str | None = None, stop: str | None = None, force: bool = False,
            dist: Distributed | None = None) -> list[StageState]:
    """Run the stages in order, skipping up-to-date ones; `force` reruns those in range."""
    dist = dist or Distributed()
    selected = [stage for stage in stages_between(start, stop) if stage.is_on(config)]
    for index, stage in enumerate(selected, 1):
        log.info("[%d/%d] %s", index, len(selected), stage.name)
        run_stage(stage, config, force=force, dist=dist)
    return status(config)


def status(config: Config) -> list[StageState]:
    store = RunStore(Path(config.run.dir))
    cache: dict = {}
    states = []
    for stage in STAGES:
        state = stage_state(stage, config, store, cache)
        needs = active_needs(stage, config)
        if state.state == "missing" and any(s.state != "done" and s.name in needs for s in states):
            state.reason = "waits for " + ", ".join(n for n in needs if any(s.name == n and s.state != "done" for s in states))
        states.append(state)
    return states


def format_status(states: list[StageState]) -> str:
    rows = [("stage", "state", "items", "time", "headline")]
    for s in states:
        state = s.state + (f" ({s.reason})" if s.reason else "")
        seconds = "" if s.seconds is None else _format_seconds(s.seconds) + (f" ({s.runs} runs)" if s.runs > 1 else "")
        rows.append((s.name, state, s.items, seconds, s.headline))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s"


def lock_for(config: Config, dist: Distributed) -> RunLock | None:
    """The run-directory lock; only the main rank holds it under torchrun."""
    if not dist.is_main:
        return None
    check_run_dir_is_safe(Path(config.run.dir), {"data.root": Path(config.data.root)})
    return RunLock(Path(config.run.dir))
