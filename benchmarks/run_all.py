"""Run every benchmark in sequence (`make bench`) and rewrite their sections of docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/run_all.py              # all of them, default (short) settings
    .venv/bin/python benchmarks/run_all.py --only crf   # a subset, by script name

Each benchmark writes its own section with the machine, the date, its exact command and
the load average; pipeline.py runs last because its VOC projection uses the per-image
costs the others measured (runs/bench/<name>.json). Every script runs with
OMP_WAIT_POLICY=PASSIVE: with torch's default (spinning) OpenMP waits, CPU stages ran
5-20x slower on this busy shared machine.

The second half of this file holds the few helpers every benchmark script shares
(fresh-subprocess workers, peak memory, the machine line, writing a docs section).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "BENCHMARKS.md"
RESULTS = REPO / "runs" / "bench"  # raw numbers of the last run of each benchmark (git-ignored)

# In order: pipeline.py reads what make_cam, crf and training measured. segmenters.py is the long
# one (every model, two seeds, both label sources: hours on 2 cores; its rows resume).
BENCHMARKS = ("random_walk", "make_cam", "crf", "training", "pipeline", "step_log", "stride_ceiling", "segmenters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    names = pick_names(args.only, BENCHMARKS, "--only")
    began = time.monotonic()
    spent = []
    for name in BENCHMARKS:
        if name not in names:
            continue
        command = [sys.executable, str(REPO / "benchmarks" / f"{name}.py")] + (["--no-docs"] if args.no_docs else [])
        print(f"\n=== benchmarks/{name}.py (OMP_WAIT_POLICY=PASSIVE) ===", flush=True)
        start = time.monotonic()
        result = subprocess.run(command, cwd=REPO, env=bench_env())
        spent.append((name, time.monotonic() - start))
        if result.returncode != 0:
            raise SystemExit(f"benchmarks/{name}.py failed (exit {result.returncode}); the sections written before it stand")
    print("\n" + "\n".join(f"{name}: {seconds:.0f} s" for name, seconds in spent))
    print(f"all benchmarks: {time.monotonic() - began:.0f} s")


# ------------------------------------------------------------ shared by the benchmarks


def pick_names(text: str, known, flag: str) -> list[str]:
    """A comma-separated subset of `known` (all of them when empty); an unknown name exits with one line."""
    names = [n.strip() for n in text.split(",") if n.strip()] or list(known)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise SystemExit(f"{flag}: unknown name(s) {unknown}; choose from {', '.join(known)}")
    return names


def bench_env(**extra: str) -> dict[str, str]:
    """The environment of every benchmark process: idle OpenMP threads sleep instead of spinning."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env.update(extra)
    return env


def run_worker(script: str, arguments: list[str], *, timeout: float | None = None) -> dict:
    """Run `script --worker ...` in a fresh process (its peak memory is its own); returns its JSON line."""
    command = [sys.executable, script, *arguments]
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=bench_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"worker {' '.join(arguments)} ran past {timeout:.0f} s") from None
    if result.returncode != 0:
        raise SystemExit(f"worker {' '.join(arguments)} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def emit(record: dict) -> None:
    """A worker's result: one JSON line on stdout, the last thing it prints."""
    print(json.dumps(record), flush=True)


def max_rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_mib(baseline_kb: int) -> float:
    """Peak resident memory of this process above `baseline_kb` (ru_maxrss), in MiB."""
    return (max_rss_kb() - baseline_kb) / 1024


def machine() -> str:
    """lscpu's model name and core count (what the numbers were measured on)."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
        cores = re.search(r"^CPU\(s\):\s*(\d+)", lscpu, re.M).group(1)
        return f"{model}, {cores} cores"
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def load_average() -> float:
    return os.getloadavg()[0]


def command_line(script: str) -> str:
    """The command that produced a section, as a user would type it."""
    prefix = "OMP_WAIT_POLICY=PASSIVE " if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" else ""
    return f"{prefix}python benchmarks/{script}" + "".join(f" {a}" for a in sys.argv[1:])


def header(script: str, load_before: float, notes: list[str],
           how: str = "every measurement in a fresh process with OMP_WAIT_POLICY=PASSIVE") -> list[str]:
    """The bullet lines every section starts with: machine, versions, date, load, command (and `how` it
    measures), then `notes`."""
    import torch

    return [
        f"- machine: {machine()}; torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; "
        f"{datetime.date.today().isoformat()}; load average {load_before:.1f} at the start, "
        f"{load_average():.1f} at the end",
        f"- command: `{command_line(script)}` ({how})",
        *[f"- {note}" for note in notes],
    ]


def write_section(section: str, intro: str, heading: str, body: str) -> None:
    """Replace subsection `### heading` of section `## section` in docs/BENCHMARKS.md.

    The section's intro (its text before the first subsection) is kept when the section
    exists, since it holds the findings written from the measurements; `intro` is used
    only for a new section. Other sections are left as they are; a new one goes last.
    """
    title = f"## {section}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    match = pattern.search(text)
    current = match.group(0) if match else f"{title}\n\n{intro.strip()}\n"
    subsections = dict(re.findall(r"^### (.+?)\n(.*?)(?=^### |\Z)", current, re.S | re.M))
    subsections[heading] = "\n" + body.strip() + "\n"
    kept_intro = current.split("\n### ", 1)[0].rstrip() + "\n"
    new = kept_intro + "".join(f"\n### {name}\n{content.rstrip()}\n" for name, content in subsections.items())
    if match:
        rest = text[match.end():]
        text = text[: match.start()] + new + ("\n" if rest else "") + rest
    else:
        text = text.rstrip() + "\n\n" + new
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
    print(f"\nwrote '{heading}' in the '{section}' section of {DOC.relative_to(REPO)}")


def save_results(name: str, results: dict) -> None:
    """Keep a benchmark's raw numbers for pipeline.py's projection (runs/bench/<name>.json)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamped = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(), **results}
    (RESULTS / f"{name}.json").write_text(json.dumps(stamped, indent=2) + "\n")


def load_results(name: str) -> dict | None:
    try:
        return json.loads((RESULTS / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None


def table(columns: list[str], rows: list[list[str]], align: str = "") -> str:
    """A markdown table; `align` has one letter per column, l or r (default: first l, rest r)."""
    align = align or "l" + "r" * (len(columns) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = [columns, rule, *rows]
    return "\n".join("| " + " | ".join(str(c) for c in line) + " |" for line in lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """Significant digits, thousands separated; '' for None."""
    if value is None:
        return ""
    if abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


if __name__ == "__main__":
    main()
