"""Random walk: IRN's dense matrix power against wsseg's sparse walk.

IRN builds the dense N x N transition matrix and squares it 8 times (2^8 = 256
steps); wsseg applies the sparse matrix 256 times (wsseg/ops/random_walk.py). This
script times both, compares their outputs and their peak memory, and compares the
sparse formulations that were candidates for wsseg's implementation.

    .venv/bin/python benchmarks/random_walk.py                  # CPU; updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/random_walk.py --device cuda    # the same on a GPU

Every measurement runs in a fresh subprocess, so its peak memory is its own:
ru_maxrss above the worker's baseline (imports and inputs) on CPU, torch's
allocator peak on CUDA. Where the full dense reference is impractical (N above
--full-dense-max-n; by default on CPU only the VOC-sized map), one dense N x N
matmul is timed and the total is extrapolated as build + 8 x matmul + x @ T, and the
output says so.
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
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

from wsseg.ops.path_index import directions, path_affinity
from wsseg.ops.random_walk import _stencil, random_walk, transition_matrix

RADIUS, BETA, SQUARINGS = 5, 10.0, 8  # IRN's inference setting: 2^8 = 256 steps
NUM_STEPS = 2**SQUARINGS
REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "BENCHMARKS.md"
SECTION = "## Random walk"


# ---------------------------------------------------------------- inputs and methods


def make_inputs(height: int, width: int, num_classes: int, seed: int, device: str):
    """A boundary map that is mostly low with a few strong responses, and CAM-like seeds."""
    generator = torch.Generator().manual_seed(seed)
    boundary = torch.rand(height, width, generator=generator) ** 4
    seeds = torch.rand(num_classes, height, width, generator=generator)
    return seeds.to(device), boundary.to(device)


def dense_transition(boundary: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """IRN's dense T = A^β column-normalised (N, N), A over the directions both ways + I."""
    height, width = boundary.shape
    reach = RADIUS - 1
    padded = F.pad(boundary[None].to(dtype), (reach, reach, 0, reach), value=1.0)
    forward = path_affinity(padded, RADIUS)[0] ** BETA  # (D, H, W) towards pixel + d
    num_pixels = height * width
    affinity = torch.eye(num_pixels, dtype=dtype, device=boundary.device)
    ys = torch.arange(height, device=boundary.device)[:, None].expand(height, width)
    xs = torch.arange(width, device=boundary.device)[None, :].expand(height, width)
    for k, (dy, dx) in enumerate(directions(RADIUS).tolist()):
        inside = (ys + dy < height) & (xs + dx >= 0) & (xs + dx < width)
        source = (ys * width + xs)[inside]
        target = source + dy * width + dx
        affinity[source, target] = forward[k][inside]
        affinity[target, source] = forward[k][inside]
    transition = affinity / affinity.sum(dim=0, keepdim=True)
    return transition


def dense_walk(seeds, boundary, dtype):
    transition = dense_transition(boundary, dtype)
    for _ in range(SQUARINGS):
        transition = transition @ transition
    x = (seeds.to(dtype) * (1 - boundary.to(dtype))).reshape(seeds.shape[0], -1)
    return (x @ transition).reshape(seeds.shape)


# ----------------------------------------------------------------------- workers


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_mib(device: str, baseline_kb: int) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024


def _timed(function, device: str):
    _sync(device)
    start = time.perf_counter()
    result = function()
    _sync(device)
    return result, time.perf_counter() - start


def worker(args) -> dict:
    """One measurement in this (fresh) process; prints a JSON line."""
    device = args.device
    height, width = args.size
    seeds, boundary = make_inputs(height, width, args.classes, args.seed, device)
    if device == "cuda":  # create the CUDA context and library handles before measuring
        (torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)).sum().item()
        random_walk(seeds[:, :8, :8], boundary[:8, :8], num_steps=1)
        torch.cuda.reset_peak_memory_stats()
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record: dict = {}

    if args.worker == "sparse":
        times = []
        for _ in range(args.repeats):
            out, seconds = _timed(lambda: random_walk(seeds, boundary, radius=RADIUS, beta=BETA), device)
            times.append(seconds)
        record["seconds"] = float(np.median(times))
        record["peak_mib"] = _peak_mib(device, baseline_kb)
        torch.save(out.cpu(), args.out)

    elif args.worker == "dense":
        dtype = getattr(torch, args.dtype)
        out, seconds = _timed(lambda: dense_walk(seeds, boundary, dtype), device)
        record["seconds"] = seconds
        record["peak_mib"] = _peak_mib(device, baseline_kb)
        torch.save(out.cpu(), args.out)

    elif args.worker == "dense-estimate":
        transition, build = _timed(lambda: dense_transition(boundary, torch.float32), device)
        squared, matmul = _timed(lambda: transition @ transition, device)
        del squared
        x = (seeds * (1 - boundary)).reshape(seeds.shape[0], -1)
        _, apply = _timed(lambda: x @ transition, device)
        record["seconds"] = build + SQUARINGS * matmul + apply
        record["matmul_seconds"] = matmul
        record["build_seconds"] = build
        # the full run never holds more than two N x N matrices at once, like this one
        record["peak_mib"] = _peak_mib(device, baseline_kb)

    elif args.worker == "formulations":
        record["rows"] = formulations(seeds, boundary, device, args.repeats)

    print(json.dumps(record), flush=True)
    return record


def formulations(seeds, boundary, device: str, repeats: int) -> list[dict]:
    """The candidate sparse formulations, each applying the same P 256 times."""
    num_channels, height, width = seeds.shape
    num_pixels = height * width
    transition = transition_matrix(boundary.double(), RADIUS, BETA)
    transition32 = transition_matrix(boundary.float(), RADIUS, BETA)
    start = (seeds.double() * (1 - boundary.double())).reshape(num_channels, -1).t().contiguous()

    def torch_csr(matrix, dtype, num_steps):
        state = start.to(dtype)
        for _ in range(num_steps):
            state = matrix @ state
        return state

    offsets, weights = _stencil(boundary.double(), RADIUS, BETA)
    reach = RADIUS - 1

    def stencil(num_steps):
        # the walk step as a sum of the 2D + 1 shifted copies, weighted per pixel
        padded = torch.zeros(num_channels, height + 2 * reach, width + 2 * reach, dtype=torch.float64, device=device)
        interior = padded[:, reach : reach + height, reach : reach + width]
        interior.copy_(start.t().reshape(num_channels, height, width))
        total = torch.empty_like(interior)
        for _ in range(num_steps):
            total.zero_()
            for s, (dy, dx) in enumerate(offsets):
                total.addcmul_(weights[s], padded[:, reach + dy : reach + dy + height, reach + dx : reach + dx + width])
            interior.copy_(total)
        return total.reshape(num_channels, -1).t()

    candidates = [
        ("torch CSR @ dense, float64 (wsseg)", lambda num_steps: torch_csr(transition, torch.float64, num_steps)),
        ("torch CSR @ dense, float32", lambda num_steps: torch_csr(transition32, torch.float32, num_steps)),
        ("stencil: 2D+1 shifted maps, float64", stencil),
    ]
    if device == "cpu":
        matrix = scipy.sparse.csr_matrix(
            (transition.values().numpy(), transition.col_indices().numpy(), transition.crow_indices().numpy()),
            shape=(num_pixels, num_pixels),
        )

        def scipy_csr(num_steps):
            state = start.numpy()
            for _ in range(num_steps):
                state = matrix @ state
            return torch.from_numpy(state)

        candidates.insert(2, ("scipy CSR @ dense, float64", scipy_csr))

    rows = []
    reference = None
    _, build = _timed(lambda: transition_matrix(boundary.double(), RADIUS, BETA), device)
    for name, function in candidates:
        # a probe of 16 steps first: a formulation that would take minutes here is
        # extrapolated from it instead (and marked so), to keep the run short
        _, probe = _timed(lambda: function(NUM_STEPS // 16), device)
        if probe * 16 > 20.0:
            rows.append({"name": name, "seconds": probe * 16, "difference": None, "extrapolated": True})
            continue
        times = []
        for _ in range(repeats):
            out, seconds = _timed(lambda: function(NUM_STEPS), device)
            times.append(seconds)
        out = out.double().cpu()
        reference = out if reference is None else reference
        difference = float((out - reference).abs().max() / reference.abs().max())
        rows.append({"name": name, "seconds": float(np.median(times)), "difference": difference})
    rows.append({"name": "building P (transition_matrix, float64)", "seconds": build, "difference": None})
    return rows


def run_worker(args, kind: str, size, classes: int, dtype: str = "float32", repeats: int = 3):
    """Run one measurement in a fresh subprocess; returns (record, output tensor or None)."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out.pt"
        command = [
            sys.executable, __file__, "--worker", kind, "--size", f"{size[0]}x{size[1]}",
            "--classes", str(classes), "--device", args.device, "--seed", str(args.seed),
            "--dtype", dtype, "--repeats", str(repeats), "--out", str(out),
        ]  # fmt: skip
        if args.threads:
            command += ["--threads", str(args.threads)]
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if result.returncode != 0:
            raise SystemExit(f"worker {kind} {size} failed:\n{result.stderr}")
        record = json.loads(result.stdout.strip().splitlines()[-1])
        output = torch.load(out, weights_only=True) if out.exists() else None
    return record, output


# ------------------------------------------------------------------------ driver


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
        cores = re.search(r"^CPU\(s\):\s*(\d+)", lscpu, re.M).group(1)
        return f"{model}, {cores} cores"
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--sizes", default="125x94,64x48,32x32,24x32", help="stride-4 maps HxW (125x94: a VOC image)")
    parser.add_argument("--classes", type=int, default=2, help="seed channels K")
    parser.add_argument("--full-dense-max-n", type=int, default=None,
                        help="largest N run the full dense way (default: 4000 on CPU, no limit on CUDA)")  # fmt: skip
    parser.add_argument("--dense-f64-max-n", type=int, default=1100, help="largest N also run as a float64 dense walk")
    parser.add_argument("--formulation-classes", default="2,20", help="K values for the formulation table ('' to skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    # worker mode (internal)
    parser.add_argument("--worker", choices=["sparse", "dense", "dense-estimate", "formulations"])
    parser.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if args.worker:
        worker(args)
        return

    threads = args.threads or torch.get_num_threads()
    wait_policy = os.environ.get("OMP_WAIT_POLICY")  # how idle OpenMP threads wait matters on a busy machine
    load_before = os.getloadavg()[0]
    full_dense_max_n = args.full_dense_max_n or (4000 if args.device == "cpu" else 10**9)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    header = (
        "| map (stride 4) | N | K | dense, IRN f32 (s) | sparse, wsseg (s) | dense / sparse "
        "| max rel. diff vs dense f32 | vs dense f64 | dense peak (MiB) | sparse peak (MiB) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    lines, notes = [header], []
    print(header, flush=True)
    for height, width in sizes:
        num_pixels = height * width
        sparse, sparse_out = run_worker(args, "sparse", (height, width), args.classes, repeats=5)
        if num_pixels <= full_dense_max_n:
            dense, dense_out = run_worker(args, "dense", (height, width), args.classes)
            dense_time = f"{dense['seconds']:.3g}"
            diff32 = f"{_relative(sparse_out, dense_out):.1e}"
            diff64 = "not run"
            if num_pixels <= args.dense_f64_max_n:  # a float64 dense walk: which of the two rounds
                _, dense64_out = run_worker(args, "dense", (height, width), args.classes, dtype="float64")
                diff64 = f"{_relative(sparse_out, dense64_out):.1e}"
        else:
            dense, _ = run_worker(args, "dense-estimate", (height, width), args.classes)
            dense_time = f"≈ {dense['seconds']:.3g} (est.)"
            diff32 = diff64 = "not run"
            notes.append(
                f"{height}x{width}: the full dense reference (~{2 * SQUARINGS * num_pixels**3 / 1e12:.3g} TFLOP) "
                f"was not run; one N x N matmul took {dense['matmul_seconds']:.3g} s and building T "
                f"{dense['build_seconds']:.3g} s, so the total is estimated as build + {SQUARINGS} x matmul + x @ T. "
                f"Its peak memory is measured (the full run holds at most two N x N matrices, as this one did)."
            )
        ratio = dense["seconds"] / sparse["seconds"]
        ratio_text = f"{ratio:.2g}x" if ratio < 10 else f"{ratio:,.0f}x"
        line = (
            f"| {height}x{width} | {num_pixels:,} | {args.classes} | {dense_time} | {sparse['seconds']:.3g} "
            f"| {'≈ ' if 'matmul_seconds' in dense else ''}{ratio_text} | {diff32} | {diff64} "
            f"| {dense['peak_mib']:,.0f} | {sparse['peak_mib']:,.1f} |"
        )
        lines.append(line)
        print(line, flush=True)
    for note in notes:
        print("Note:", note)

    formulation_lines = []
    if args.formulation_classes:
        size = sizes[0]
        formulation_lines = [
            f"| formulation ({size[0]}x{size[1]}, 256 steps) | K | time (s) | max rel. diff to wsseg |",
            "| --- | ---: | ---: | ---: |",
        ]
        for classes in [int(k) for k in args.formulation_classes.split(",")]:
            record, _ = run_worker(args, "formulations", size, classes)
            for row in record["rows"]:
                difference = "" if row["difference"] is None else f"{row['difference']:.1e}"
                seconds = f"{row['seconds']:.3g}"
                if row.get("extrapolated"):
                    seconds, difference = f"≈ {seconds} (16 steps x 16)", "not run"
                formulation_lines.append(f"| {row['name']} | {classes} | {seconds} | {difference} |")
        print("\n" + "\n".join(formulation_lines), flush=True)

    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    command = "python benchmarks/random_walk.py" + "".join(f" {a}" for a in sys.argv[1:])
    if wait_policy:
        command = f"OMP_WAIT_POLICY={wait_policy} {command}"
    thread_text = f"{threads} intra-op thread{'s' if threads > 1 else ''}"
    if args.device == "cuda":
        heading = "CUDA"
    else:
        heading = f"CPU, {thread_text}" + (f", OMP_WAIT_POLICY={wait_policy}" if wait_policy else "")
    report = [
        f"### {heading}",
        "",
        f"- machine: {machine(args.device)}; torch {torch.__version__}, {thread_text}; "
        f"{datetime.date.today().isoformat()}; {load}",
        f"- command: `{command}`",
        f"- radius {RADIUS}, β {BETA:g}, {NUM_STEPS} steps; time of one image's walk (sparse: median of 5, "
        "building P included; dense: one run, building T included); peak = memory above the worker's "
        + ("baseline (ru_maxrss)" if args.device == "cpu" else "start (torch.cuda.max_memory_allocated)"),
        "",
        *lines,
        "",
        *[f"- {note}" for note in notes],
        *([""] if notes else []),
        *formulation_lines,
    ]
    if not args.no_docs:
        update_docs("\n".join(report).rstrip() + "\n", heading)
        print(f"\nwrote '{heading}' in the '{SECTION[3:]}' section of {DOC.relative_to(REPO)}")


INTRO = (
    f"{SECTION}\n\n"
    "IRN's dense N x N transition matrix squared 8 times against wsseg's sparse walk "
    "(`wsseg/ops/random_walk.py`: torch CSR @ dense (N, K), 256 times, in float64), "
    "measured by `benchmarks/random_walk.py`. The second table compares the sparse "
    "formulations that were candidates for the implementation.\n"
)


def update_docs(report: str, device_heading: str) -> None:
    """Replace this device's subsection of the 'Random walk' section, keeping the rest of the file."""
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    match = pattern.search(text)
    section = match.group(0) if match else INTRO
    subsections = dict(re.findall(r"^### (.+?)\n(.*?)(?=^### |\Z)", section, re.S | re.M))
    subsections[device_heading] = report.split("\n", 1)[1]
    intro = section.split("\n### ", 1)[0].rstrip() + "\n"
    body = intro + "".join(f"\n### {name}\n{content.rstrip()}\n" for name, content in sorted(subsections.items()))
    if match:
        text = text[: match.start()] + body + ("\n" if text[match.end() :] else "") + text[match.end() :]
    else:
        text = text.rstrip() + "\n\n" + body
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


if __name__ == "__main__":
    main()
