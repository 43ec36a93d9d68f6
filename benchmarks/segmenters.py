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

Convergence rule: every row starts at one step budget (`--steps`, long enough that the reference
model's val curve has flattened), and a row whose ground-truth val mIoU (single scale) still rose
by 0.01 or more over the last quarter of its steps ("late gain") is trained again from scratch at
twice the steps (the schedule stretches with it), up to `--max-steps`; the table shows each
model's last row. A row still rising at the cap is marked undertrained rather than hidden.

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
# labels of mIoU 0.5714 / PQ 0.4328 on one AMD EPYC, 0.5727 / 0.4279 on an Intel Xeon and 0.5657 / 0.4153 on
# another AMD EPYC (AVX2 kernels; other float sums from the first stage on: train-cam's val mAP 0.959 vs 0.941),
# where one thread instead of two gave 0.644 / 0.459.
LABELS_TOLERANCE = {"semantic_miou": 0.01, "pq": 0.02}
LOG = "log.txt"  # the run's log, which every command appends to
LATE_GAIN = 0.01  # a ground-truth val curve that still rises more than this over its last quarter is undertrained
README = REPO / "README.md"
# README's segmenter table sits between these two lines; the script rewrites what is between them
README_BEGIN = "<!-- segmenter table: written by benchmarks/segmenters.py from the kept rows -->"
README_END = "<!-- end of segmenter table -->"


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


def recipe_of(args, steps: int | None = None) -> dict:
    """The command's recipe at `steps` (default --steps), kept in each row: steps, overrides, the config's text."""
    return {"steps": steps or args.steps, "val_every": args.val_every, "set": args.set, "config": str(args.config),
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


def row_name(args, model: str, seed: int, steps: int) -> str:
    """A row's name: model and seed, and its steps when the convergence rule extended it past --steps."""
    return f"{model}-s{seed}" + ("" if steps == args.steps else f"-{steps}steps")


def kept_row(args, model: str, seed: int, steps: int) -> Path:
    """Where a finished row is also kept in the repository (benchmarks/results/segmenters/<tag>/), so the
    table grows across machines and fresh clones: each row is 5-60 minutes of CPU."""
    return KEPT / args.tag / f"{row_name(args, model, seed, steps)}.json"


def cached_row(args, model: str, seed: int, work: Path, steps: int) -> dict | None:
    for done in (work / row_name(args, model, seed, steps) / "row.json", kept_row(args, model, seed, steps)):
        if done.exists() and (row := reusable(args, json.loads(done.read_text()), model, seed, steps)) is not None:
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


def reusable(args, row: dict, model: str, seed: int, steps: int) -> dict | None:
    """`row` if it was trained with this command's recipe (or one train-segmenter cannot tell from it) on
    the same pseudo labels (rows kept before the labels were recorded, without "labels", count as the same)."""
    current = labels_of(args.run)
    if not same_labels(row.get("labels", current), current):
        return None
    recipe = row.get("recipe", {})
    if recipe == recipe_of(args, steps):
        return row
    try:
        same = recipe_fingerprint(recipe, model, seed) == recipe_fingerprint(recipe_of(args, steps), model, seed)
    except (KeyError, TypeError, ValueError):  # a row from an older form of this script
        same = False
    return row if same else None


def train_row(args, model: str, seed: int, work: Path, steps: int) -> dict:
    """Train one model with one seed (both label sources) for `steps` through the CLI; returns its numbers."""
    row_dir = work / row_name(args, model, seed, steps)
    done = row_dir / "row.json"
    row = cached_row(args, model, seed, work, steps)
    if row is not None:
        return row
    if done.exists():
        print(f"{model} seed {seed}: the cached row was made with another recipe or other pseudo labels; "
              f"training it again", flush=True)
    run_dir = row_dir / "run"
    copy_run(args.run, run_dir)
    sets = [f"run.dir={run_dir}", *row_overrides(recipe_of(args, steps), model, seed)]
    command = [str(WSSEG), "train-segmenter", "--config", str(args.config)] + [a for s in sets for a in ("--set", s)]
    print(" ".join(command[1:]), flush=True)
    began = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=bench_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{model} seed {seed} failed:\n{result.stderr[-3000:]}")
    record = json.loads((run_dir / "segmenter" / model / "stage.json").read_text())
    metrics, curves = record["metrics"], record.get("curves", {})
    row = {"model": model, "seed": seed, "seconds": round(time.monotonic() - began, 1), "recipe": recipe_of(args, steps),
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
    kept_row(args, model, seed, steps).parent.mkdir(parents=True, exist_ok=True)
    kept_row(args, model, seed, steps).write_text(json.dumps(row, indent=1) + "\n")
    shutil.rmtree(run_dir)  # the numbers are kept; the copy's models are not needed
    return row


def converged_row(args, model: str, seed: int, work: Path, *, train: bool) -> tuple[dict | None, str | None]:
    """The convergence rule: a row at --steps, then, while its ground-truth val curve still rose by LATE_GAIN or
    more over its last quarter, a row at twice the steps (a fresh run: the schedule stretches), up to --max-steps.
    Returns the last row (None if none) and what is missing for the rule (without `train`: rows not trained)."""
    steps, row = args.steps, None
    while steps <= args.max_steps:
        longer = train_row(args, model, seed, work, steps) if train else cached_row(args, model, seed, work, steps)
        if longer is None:
            return row, f"{model} seed {seed}" + ("" if steps == args.steps else f" at {steps} steps")
        row = longer
        if (late_gain(row["gt"]) or 0.0) < LATE_GAIN:
            break
        steps *= 2
    return row, None


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


def steps_of(rows: list[dict]) -> str:
    """The steps the rows trained, once when every seed trained as long, else per seed."""
    steps = [str(r["gt"]["steps"]) for r in rows]
    return steps[0] if len(set(steps)) == 1 else " / ".join(steps)


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
                      pq, fmt(mean([r["gt"]["images_per_second"] for r in rows])), steps_of(rows)])
        numbers[model] = {"gt": gt, "pseudo": pseudo, "late_gain": gain,
                          "pq_pseudo": [r["pseudo"]["pq"] for r in rows], "pq_gt": [r["gt"]["pq"] for r in rows]}
    return table(columns, lines), numbers


def readme_table(rows_by_model: dict[str, list[dict]]) -> str:
    """README's shorter table: per model the mean and the seeds, three decimals; ✗ marks a ground-truth mIoU
    below 0.85 x the best model's, ↑ one still rising over the last quarter of its steps."""
    def three(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    def seeds_of(rows: list[dict], source: str, key: str = "miou") -> str:
        return " / ".join(three(r[source][key]) for r in rows)

    columns = ["model", "ground truth (seeds)", "gt single scale", "pseudo labels (seeds)", "pseudo / gt",
               "val PQ pseudo / gt", "train img/s", "steps"]
    best_gt = max(mean([r["gt"]["miou"] for r in rows]) or 0 for rows in rows_by_model.values())
    lines = []
    for model, rows in rows_by_model.items():
        gt, pseudo = mean([r["gt"]["miou"] for r in rows]), mean([r["pseudo"]["miou"] for r in rows])
        gain = mean([late_gain(r["gt"]) for r in rows])
        marks = (" ✗" if gt is not None and gt < 0.85 * best_gt else "") + \
                (" ↑" if gain is not None and gain >= LATE_GAIN else "")
        seeds = ", ".join(str(r["seed"]) for r in rows)
        pq = ("-" if rows[0]["gt"]["pq"] is None else
              f"{three(mean([r['pseudo']['pq'] for r in rows]))} / {three(mean([r['gt']['pq'] for r in rows]))}")
        lines.append([model, f"{three(gt)}{marks} ({seeds_of(rows, 'gt')}; seed{'s' * (len(rows) > 1)} {seeds})",
                      three(mean([r["gt"]["modes"].get("single") for r in rows])),
                      f"{three(pseudo)} ({seeds_of(rows, 'pseudo')})",
                      f"{pseudo / gt:.2f}" if gt and pseudo is not None else "-", pq,
                      f"{mean([r['gt']['images_per_second'] for r in rows]):.0f}", steps_of(rows)])
    return table(columns, lines)


def write_readme_table(body: str) -> None:
    """Replace README's segmenter table (between README_BEGIN and README_END) by `body`."""
    text = README.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{README.name}: the segmenter table's markers are missing; put the two lines\n"
                         f"{README_BEGIN}\n{README_END}\nwhere the table goes and run this again")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    README.write_text(f"{head}{README_BEGIN}\n{body.strip()}\n{README_END}{tail}")
    print(f"wrote the segmenter table in {README.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="a demo run finished through synthesize-labels")
    parser.add_argument("--config", type=Path, default=REPO / "pipelines" / "demo.yaml")
    parser.add_argument("--models", default="", help=f"comma-separated subset of {', '.join(SEGMENTERS)} (default: all)")
    parser.add_argument("--seeds", default="0,1", help="training seeds (segmenter.seed), comma-separated")
    parser.add_argument("--steps", type=int, default=2000, help="optimisation steps per model and label source")
    parser.add_argument("--max-steps", type=int, default=8000,
                        help="the convergence rule doubles a row's steps while its val curve still rises, up to this")
    parser.add_argument("--val-every", type=int, default=10, help="epochs between points of the val curve")
    parser.add_argument("--set", action="append", default=[], help="extra config override KEY=VALUE (a recipe to try)")
    parser.add_argument("--tag", default="table", help="name of this benchmark's cache folder under runs/bench/segmenters")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md and README.md alone")
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
        found = {(model, seed): converged_row(args, model, seed, work, train=False) for model in models for seed in seeds}
        missing = [gap for _, gap in found.values() if gap]
        rows_by_model = {model: [row for seed in seeds if (row := found[model, seed][0])] for model in models}
        rows_by_model = {model: rows for model, rows in rows_by_model.items() if rows}
    else:
        rows_by_model = {model: [converged_row(args, model, seed, work, train=True)[0] for seed in seeds]
                         for model in models}
        missing = []
    # the panoptic labels' own PQ (on the images they label) beside the panoptic model's val PQ: that of the
    # labels its rows trained on (recorded in each row), else the run's
    panoptic_rows = [r for rows in rows_by_model.values() for r in rows if r["pseudo"]["pq"] is not None]
    labels_pq = (mean([r.get("labels", {}).get("pq") for r in panoptic_rows])
                 or json.loads((args.run / "labels" / "stage.json").read_text())["metrics"].get("pq"))
    body, numbers = summarise(rows_by_model, labels_pq, seeds)
    (work / "summary.json").write_text(json.dumps(numbers, indent=1) + "\n")
    notes = [f"{args.steps} steps per model and label source, doubled while a row's ground-truth val curve still rose by "
             f"{LATE_GAIN} or more over its last quarter (up to {args.max_steps}), training seeds {args.seeds}; val mIoU is the best of "
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
        if args.tag == "table":  # the recipe's own table; a --tag experiment stays out of README
            write_readme_table(readme_table(rows_by_model))


if __name__ == "__main__":
    main()
