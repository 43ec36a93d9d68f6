"""Structured knowledge distillation on the demo: a student with and without a teacher, same steps.

    .venv/bin/python benchmarks/distillation.py                  # updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/distillation.py --steps 300 --seeds 0 --no-docs

In a hard-linked copy of a finished demo run (`--run`, made first with `wsseg run-all --config
pipelines/demo.yaml --to synthesize-labels` when its labels are missing), the teacher is trained
once (`--teacher` at `--teacher-width`, training seed 0), then for every seed the student is
trained twice through the real command, `wsseg train-segmenter --set segmenter.model=<student>
--set segmenter.seed=<seed> ...`, once plain and once with `--set segmenter.teacher=<teacher>`,
on the same labels (`--labels`: pseudo, what a user of the pipeline has) with the same steps.
Val mIoU is the stage's own headline (best of single / ms+flip / +CRF on the demo's validation
images); the teacher's is shown beside. Finished runs are cached under
runs/bench/distillation/<tag>/ (same arguments: reused), so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from run_all import REPO, bench_env, fmt, header, load_average, table, write_section
from segmenters import WSSEG, copy_run

SECTION = "Distillation"
INTRO = """Structured knowledge distillation (`segmenter.teacher`) on the demo (`benchmarks/distillation.py`)."""


def train(args, run_dir: Path, name: str, sets: list[str], work: Path) -> dict:
    """One train-segmenter run (cached by name and arguments); returns its metrics on `args.labels`."""
    done = work / f"{name}.json"
    # what the run's result depends on: the command's overrides, steps, labels, config file and demo run
    key = {"sets": sets, "steps": args.steps, "labels": args.labels, "config": args.config.read_text(), "run": str(args.run)}
    if done.exists():
        cached = json.loads(done.read_text())
        if cached.get("key") == key:
            return cached["metrics"]
    command = [str(WSSEG), "train-segmenter", "--config", str(args.config), "--set", f"run.dir={run_dir}",
               "--set", f"segmenter.labels={args.labels}", "--set", f"segmenter.iterations={args.steps}",
               *[a for s in sets for a in ("--set", s)]]
    print(" ".join(command[1:]), flush=True)
    began = time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=bench_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{name} failed:\n{result.stderr[-3000:]}")
    model = next(s.split("=", 1)[1] for s in sets if s.startswith("segmenter.model="))
    record = json.loads((run_dir / "segmenter" / model / "stage.json").read_text())
    metrics = dict(record["metrics"][args.labels], miou=record["metrics"][f"miou_{args.labels}"],
                   seconds=round(time.monotonic() - began, 1))
    done.write_text(json.dumps({"key": key, "metrics": metrics}, indent=1) + "\n")
    return metrics


def student_run(args, seed: int, teacher_run: Path, work: Path, taught: bool) -> dict:
    """The student in a fresh copy of the run that holds the teacher's trained folder (hard links)."""
    name = f"student-s{seed}-{'taught-' + variant(args) if taught else 'plain'}"
    run_dir = work / name
    copy_run(args.run, run_dir)
    shutil.copytree(teacher_run / "segmenter" / args.teacher, run_dir / "segmenter" / args.teacher, copy_function=os.link)
    sets = [f"segmenter.model={args.student}", f"segmenter.seed={seed}", f"segmenter.width={args.student_width}",
            *([f"segmenter.teacher={args.teacher}", *args.set] if taught else [])]
    try:
        return train(args, run_dir, name, sets, work)
    finally:
        shutil.rmtree(run_dir)


def variant(args) -> str:
    """A name for the taught runs' overrides (file names, the section's heading)."""
    return "-".join(s.replace("segmenter.", "").replace("=", "") for s in args.set) or "paper"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "demo", help="a demo run finished through synthesize-labels")
    parser.add_argument("--config", type=Path, default=REPO / "pipelines" / "demo.yaml")
    parser.add_argument("--teacher", default="deeplab-v3plus")
    parser.add_argument("--teacher-width", type=float, default=0.5)
    parser.add_argument("--student", default="deeplab-v2")
    parser.add_argument("--student-width", type=float, default=0.25)
    parser.add_argument("--labels", default="pseudo", choices=("pseudo", "gt"))
    parser.add_argument("--seeds", default="0,1", help="the student's training seeds, comma-separated")
    parser.add_argument("--steps", type=int, default=1000, help="optimisation steps of every run")
    parser.add_argument("--set", action="append", default=[],
                        help="extra override for the taught runs (e.g. segmenter.distill_pixel=1.0); the plain runs are shared")
    parser.add_argument("--tag", default="default", help="cache folder under runs/bench/distillation")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.teacher == args.student:
        raise SystemExit("--teacher and --student must be different models (the student's run would overwrite the teacher)")
    if not (args.run / "labels" / "semantic").is_dir():
        subprocess.run([str(WSSEG), "run-all", "--config", str(args.config), "--set", f"run.dir={args.run}",
                        "--to", "synthesize-labels"], cwd=REPO, env=bench_env(), check=True)
    load_before = load_average()
    work = REPO / "runs" / "bench" / "distillation" / args.tag
    work.mkdir(parents=True, exist_ok=True)
    teacher_run = work / "teacher"
    if not (teacher_run / "segmenter" / args.teacher / args.labels / "model.pt").exists():
        copy_run(args.run, teacher_run)
    teacher = train(args, teacher_run, "teacher", [f"segmenter.model={args.teacher}", "segmenter.seed=0",
                                                   f"segmenter.width={args.teacher_width}"], work)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows, gains = [], []
    for seed in seeds:
        plain = student_run(args, seed, teacher_run, work, taught=False)
        taught = student_run(args, seed, teacher_run, work, taught=True)
        gains.append(taught["miou"] - plain["miou"])
        rows.append([str(seed), fmt(plain["miou"]), fmt(taught["miou"]), fmt(gains[-1], 3),
                     " / ".join(fmt(plain.get(f"miou_{m}")) for m in ("single", "msflip", "crf")),
                     " / ".join(fmt(taught.get(f"miou_{m}")) for m in ("single", "msflip", "crf")),
                     fmt(plain["images_per_second"]), fmt(taught["images_per_second"])])
    notes = [f"teacher {args.teacher} width {args.teacher_width} (training seed 0): val mIoU {fmt(teacher['miou'])} on "
             f"{args.labels} labels; student {args.student} width {args.student_width}; {args.steps} steps each; "
             f"the demo recipe (pipelines/demo.yaml) otherwise, distillation weights pixel {10.0:g} / pair {1.0:g} unless "
             f"--set says otherwise ({' '.join(args.set) or 'none'})",
             f"mean gain over {len(seeds)} seed(s): {fmt(statistics.mean(gains), 3)}"]
    text = "\n".join(header("distillation.py", load_before, notes, how="each run a `wsseg train-segmenter` process")) + "\n\n"
    text += table(["student seed", "plain val mIoU", "with teacher", "gain", "plain single / ms+flip / +CRF",
                   "taught single / ms+flip / +CRF", "plain train img/s", "taught train img/s"], rows)
    print(text)
    if not args.no_docs:
        write_section(SECTION, INTRO, f"CPU, {' '.join(args.set) or 'the authors weights'}", text)


if __name__ == "__main__":
    main()
