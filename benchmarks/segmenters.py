"""Every segmenter trained on the demo's ground truth and on its pseudo labels with one recipe.

    .venv/bin/python benchmarks/segmenters.py                      # the table (hours of CPU), updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/segmenters.py --models deeplab-v2 --seeds 0 --steps 300 --no-docs
    .venv/bin/python benchmarks/segmenters.py --tag adamw --set segmenter.optimizer=adamw --no-docs

Each row is the real command a user runs, `wsseg train-segmenter --config pipelines/demo.yaml
--set segmenter.labels=both ...`, in a copy of a finished demo run (`--run`, default runs/demo,
made or finished first with `wsseg run-all --config pipelines/demo.yaml --to synthesize-labels`
when its labels are missing; the copy hard-links its files, so it costs no disk). Per model and per training seed
(`segmenter.seed`) it trains on the pseudo labels and on the ground truth, scores val mIoU
single-scale every few epochs (`segmenter.val_every`, the curve), and at the end the stage's
own evaluation (single, ms+flip, +CRF; the table takes the best, as the stage's headline does).

Convergence rule: one step budget for every model (`--steps`), long enough that the reference
model's val curve has flattened; each row then shows how much its ground-truth val mIoU still
rose over the last quarter of the steps ("late gain"): under 0.01 counts as converged, above
it the row is marked undertrained rather than hidden.

Rows are cached under runs/bench/segmenters/<tag>/ and kept in benchmarks/results/segmenters/<tag>/
(committed: the table grows across sessions and clones). A finished row is not trained again while
train-segmenter's fingerprint under the steps, overrides and config file is the same (a comment
or a key the stage does not read may change) and the run's pseudo labels score the same (each row
records their semantic mIoU and PQ: one recipe can give other labels on another machine or thread
count), so an interrupted benchmark resumes where it stopped; delete both to start over.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_all import REPO, bench_env, fmt, header, load_average, pick_names, table, write_section
from wsseg.models.segmenters import SEGMENTERS

SECTION = "Segmenters"
INTRO = """Every registered segmenter on the demo, trained with one recipe on the pseudo labels and on
the ground truth (`benchmarks/segmenters.py`); the findings are in README's segmenter table and
the model pages."""
WSSEG = Path(sys.executable).parent / "wsseg"
KEPT = REPO / "benchmarks" / "results" / "segmenters"
# Rows on pseudo labels whose scores differ by at most this are one table: the same recipe and two threads gave
# labels of mIoU 0.5714 / PQ 0.4328 on an AMD EPYC and 0.5727 / 0.4279 on an Intel Xeon (other float kernels),
# far inside the seeds' spread, where one thread instead of two gave 0.644 / 0.459.
LABELS_TOLERANCE = {"semantic_miou": 0.005, "pq": 0.01}
LOG = "log.txt"  # the run's log, which every command appends to
LATE_GAIN = 0.01  # a ground-truth val curve that still rises more than this over its last quarter is undertrained


def copy_run(source: Path, target: Path, *, keep_segmenters: bool = False) -> None:
    """A hard-linked copy of a finished run, without its segmenters unless `keep_segmenters` (stages
    write new files atomically, so the original's files are never changed through the links). The
    run's log is appended to, not replaced, so the copy gets a copy of it."""
    if target.exists():
        shutil.rmtree(target)
    left_out = [".lock", LOG] if keep_segmenters else ["segmenter", ".lock", LOG]
    shutil.copytree(source, target, copy_function=os.link,
                    ignore=lambda folder, names: left_out if Path(folder) == source else [])
    if (source / LOG).exists():
        shutil.copy2(source / LOG, target / LOG)


def recipe_of(args) -> dict:
    """The command's recipe, kept in each row: steps, overrides and the config file's text."""
    return {"steps": args.steps, "val_every": args.val_every, "set": args.set, "config": str(args.config),
            "config_text": args.config.read_text()}


def row_overrides(recipe: dict, model: str, seed: int) -> list[str]:
    return [f"segmenter.model={model}", f"segmenter.seed={seed}", "segmenter.labels=both",
            f"segmenter.iterations={recipe['steps']}", f"segmenter.val_every={recipe['val_every']}", *recipe["set"]]


def recipe_fingerprint(recipe: dict, model: str, seed: int) -> str:
    """train-segmenter's fingerprint under a recipe: what the stage reads, its upstream stages included.

    Two recipes with one fingerprint train the same thing (a comment or a key the stage does not
    read, such as run.amp, may differ), so a row is reused exactly when the stage would be."""
    from wsseg.config import load_config
    from wsseg.pipeline import fingerprint, stage_by_name

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(recipe["config"]).name
        path.write_text(recipe["config_text"])
        config = load_config([path], row_overrides(recipe, model, seed))
    return fingerprint(stage_by_name("train-segmenter"), config)


def kept_row(args, model: str, seed: int) -> Path:
    """Where a finished row is also kept in the repository (benchmarks/results/segmenters/<tag>/), so the
    table grows across machines and fresh clones: each row is 5-15 minutes of CPU."""
    return KEPT / args.tag / f"{model}-s{seed}.json"


def cached_row(args, model: str, seed: int, work: Path) -> dict | None:
    for done in (work / f"{model}-s{seed}" / "row.json", kept_row(args, model, seed)):
        if done.exists() and (row := reusable(args, json.loads(done.read_text()), model, seed)) is not None:
            return row
    return None


def labels_of(run: Path) -> dict:
    """What identifies the pseudo labels a row trains on: synthesize-labels' own scores in `run`. The same
    recipe can give other labels on another machine or thread count (floating-point sums in another
    order move a CAM threshold's pixels, and the pipeline amplifies them), so rows trained on other
    labels are not mixed into one table."""
    metrics = json.loads((run / "labels" / "stage.json").read_text())["metrics"]
    return {key: round(metrics[key], 4) for key in ("semantic_miou", "pq") if metrics.get(key) is not None}


def same_labels(kept: dict, current: dict) -> bool:
    """Whether a row's pseudo labels are the run's, within LABELS_TOLERANCE of each score."""
    return kept.keys() == current.keys() and all(abs(kept[k] - current[k]) <= LABELS_TOLERANCE[k] for k in kept)


def reusable(args, row: dict, model: str, seed: int) -> dict | None:
    """`row` if it was trained with this command's recipe (or one train-segmenter cannot tell from it) on
    the same pseudo labels (rows kept before the labels were recorded, without "labels", count as the same)."""
    current = labels_of(args.run)
    if not same_labels(row.get("labels", current), current):
        return None
    recipe = row.get("recipe", {})
    if recipe == recipe_of(args):
        return row
    try:
        same = recipe_fingerprint(recipe, model, seed) == recipe_fingerprint(recipe_of(args), model, seed)
    except (KeyError, TypeError, ValueError):  # a row from an older form of this script
        same = False
    return row if same else None


def train_row(args, model: str, seed: int, work: Path) -> dict:
    """Train one model with one seed (both label sources) through the CLI; returns its numbers."""
    row_dir = work / f"{model}-s{seed}"
    done = row_dir / "row.json"
    row = cached_row(args, model, seed, work)
    if row is not None:
        return row
    if done.exists():
        print(f"{model} seed {seed}: the cached row was made with another recipe or other pseudo labels; "
              f"training it again", flush=True)
    run_dir = row_dir / "run"
    copy_run(args.run, run_dir)
    sets = [f"run.dir={run_dir}", *row_overrides(recipe_of(args), model, seed)]
    command = [str(WSSEG), "train-segmenter", "--config", str(args.config)] + [a for s in sets for a in ("--set", s)]
    print(" ".join(command[1:]), flush=True)
    began = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=bench_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{model} seed {seed} failed:\n{result.stderr[-3000:]}")
    record = json.loads((run_dir / "segmenter" / model / "stage.json").read_text())
    metrics, curves = record["metrics"], record.get("curves", {})
    row = {"model": model, "seed": seed, "seconds": round(time.monotonic() - began, 1), "recipe": recipe_of(args),
           "labels": labels_of(args.run)}
    for source in ("pseudo", "gt"):
        values, curve = metrics.get(source, {}), curves.get(source, {})
        row[source] = {
            "miou": metrics.get(f"miou_{source}"),
            "modes": {mode: values.get(f"miou_{mode}") for mode in ("single", "msflip", "crf")},
            "pq": values.get("pq"),
            "images_per_second": values.get("images_per_second"),
            "steps": values.get("steps"),
            "val_epochs": curve.get("val_epoch", []),
            "val_miou": curve.get("val_miou", []),
        }
    done.write_text(json.dumps(row, indent=1) + "\n")
    kept_row(args, model, seed).parent.mkdir(parents=True, exist_ok=True)
    kept_row(args, model, seed).write_text(json.dumps(row, indent=1) + "\n")
    shutil.rmtree(run_dir)  # the numbers are kept; the copy's models are not needed
    return row


def late_gain(values: dict) -> float | None:
    """How much val mIoU rose over the last quarter of the epochs (best before vs the end)."""
    epochs, miou = values["val_epochs"], values["val_miou"]
    if len(miou) < 2:
        return None
    cut = epochs[-1] * 0.75
    before = [m for e, m in zip(epochs, miou) if e <= cut]
    return round(miou[-1] - max(before), 4) if before else None


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def per_seed(rows: list[dict], source: str, key: str = "miou") -> str:
    return " / ".join(fmt(r[source][key]) for r in rows)


def summarise(rows_by_model: dict[str, list[dict]], labels_pq: float | None, seeds_wanted: list[int]) -> tuple[str, dict]:
    columns = ["model", "gt val mIoU (mean; seeds)", "gt single scale", "pseudo (mean; seeds)", "pseudo / gt",
               "late gain gt", f"val PQ pseudo / gt (seeds) [labels' own PQ {fmt(labels_pq)}]", "train img/s", "steps"]
    best_gt = max(mean([r["gt"]["miou"] for r in rows]) or 0 for rows in rows_by_model.values())
    lines, numbers = [], {}
    for model, rows in rows_by_model.items():
        gt, pseudo = mean([r["gt"]["miou"] for r in rows]), mean([r["pseudo"]["miou"] for r in rows])
        gain = mean([late_gain(r["gt"]) for r in rows])
        pq = ("-" if rows[0]["gt"]["pq"] is None else
              f"{fmt(mean([r['pseudo']['pq'] for r in rows]))} / {fmt(mean([r['gt']['pq'] for r in rows]))} "
              f"({per_seed(rows, 'pseudo', 'pq')}; {per_seed(rows, 'gt', 'pq')})")
        flags = ("" if gain is None or gain < LATE_GAIN else " (still rising)") + \
                (" (< 0.85 best)" if gt is not None and gt < 0.85 * best_gt else "")
        seeds = "" if len(rows) == len(seeds_wanted) else f" (seed {', '.join(str(r['seed']) for r in rows)} only)"
        single = mean([r["gt"]["modes"].get("single") for r in rows])
        lines.append([model + seeds, f"{fmt(gt)} ({per_seed(rows, 'gt')}){flags}", fmt(single),
                      f"{fmt(pseudo)} ({per_seed(rows, 'pseudo')})",
                      fmt(pseudo / gt if gt and pseudo is not None else None), fmt(gain, 2),
                      pq, fmt(mean([r["gt"]["images_per_second"] for r in rows])), str(rows[0]["gt"]["steps"])])
        numbers[model] = {"gt": gt, "pseudo": pseudo, "late_gain": gain,
                          "pq_pseudo": [r["pseudo"]["pq"] for r in rows], "pq_gt": [r["gt"]["pq"] for r in rows]}
    return table(columns, lines), numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="a demo run finished through synthesize-labels")
    parser.add_argument("--config", type=Path, default=REPO / "pipelines" / "demo.yaml")
    parser.add_argument("--models", default="", help=f"comma-separated subset of {', '.join(SEGMENTERS)} (default: all)")
    parser.add_argument("--seeds", default="0,1", help="training seeds (segmenter.seed), comma-separated")
    parser.add_argument("--steps", type=int, default=2000, help="optimisation steps per model and label source")
    parser.add_argument("--val-every", type=int, default=10, help="epochs between points of the val curve")
    parser.add_argument("--set", action="append", default=[], help="extra config override KEY=VALUE (a recipe to try)")
    parser.add_argument("--tag", default="table", help="name of this benchmark's cache folder under runs/bench/segmenters")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    parser.add_argument("--cached-only", action="store_true", help="the table of the rows already trained; train nothing")
    args = parser.parse_args()
    args.run, args.config = args.run.resolve(), args.config.resolve()
    os.chdir(REPO)  # the config's relative paths (data.root) are the repository's, as for the commands it runs
    models = pick_names(args.models, SEGMENTERS, "--models")
    if not (args.run / "labels" / "stage.json").exists():
        # the pipeline up to the labels (~5 minutes on the demo); resumes whatever part of it is done
        command = [str(WSSEG), "run-all", "--config", str(args.config), "--to", "synthesize-labels",
                   "--set", f"run.dir={args.run}"]
        print(" ".join(command[1:]), flush=True)
        if subprocess.run(command, cwd=REPO, env=bench_env()).returncode != 0:
            raise SystemExit(f"--run {args.run}: the pipeline up to synthesize-labels failed; see its output above")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = REPO / "runs" / "bench" / "segmenters" / args.tag
    work.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    if args.cached_only:  # the table so far: rows already trained with this recipe, nothing new
        rows_by_model = {model: [row for seed in seeds if (row := cached_row(args, model, seed, work))] for model in models}
        missing = [f"{m} seed {s}" for m in models for s in seeds if not cached_row(args, m, s, work)]
        rows_by_model = {model: rows for model, rows in rows_by_model.items() if rows}
    else:
        rows_by_model = {model: [train_row(args, model, seed, work) for seed in seeds] for model in models}
        missing = []
    # the panoptic labels' own PQ (on the images they label) beside the panoptic model's val PQ
    labels_pq = json.loads((args.run / "labels" / "stage.json").read_text())["metrics"].get("pq")
    body, numbers = summarise(rows_by_model, labels_pq, seeds)
    (work / "summary.json").write_text(json.dumps(numbers, indent=1) + "\n")
    notes = [f"{args.steps} steps per model and label source, training seeds {args.seeds}; val mIoU is the best of "
             f"single / ms+flip / +CRF on the demo's 60 validation images; late gain: ground-truth val mIoU "
             f"(single scale) at the end minus its best before the last quarter of the steps"]
    kept_labels = sorted({tuple(r["labels"].values()) for rows in rows_by_model.values() for r in rows if "labels" in r})
    if kept_labels:
        notes.append("pseudo labels the rows trained on (semantic mIoU / PQ; one recipe, other CPUs): "
                     + ", ".join(" / ".join(f"{v:.4f}" for v in scores) for scores in kept_labels))
    if args.cached_only:
        notes.append("the rows were trained earlier by the same command without --cached-only"
                     + (f"; not trained yet: {', '.join(missing)}" if missing else ""))
    text = "\n".join(header("segmenters.py", load_before, notes)) + "\n\n" + body
    print("\n" + text)
    if not args.no_docs:
        write_section(SECTION, INTRO, f"Every segmenter, {args.steps} steps ({args.tag})", text)


if __name__ == "__main__":
    main()
