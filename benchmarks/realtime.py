"""Real-time segmenters against DeepLab-v3+: inference images/s at 512x512, batch 1.

    .venv/bin/python benchmarks/realtime.py                     # updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/realtime.py --device cuda --no-docs

The point of BiSeNet, DFANet and LEDNet is speed, so each is timed against DeepLab-v3+ at
the same backbone (ResNet-`--depth` at `--width`; LEDNet and DFANet have encoders of their
own and take only the width) in one run: eval mode, no gradients, `predict` on a 512x512
batch of 1 (logits at the input size, as `wsseg predict` computes them). The models are
timed in interleaved rounds (each round times every model once, `--rounds` rounds after
`--warmup` untimed ones), so a change in the machine's load hits all of them alike; the
median per model is reported, with the speed-up over DeepLab-v3+ and the parameter count.
On CUDA each call is synchronised. The quality half of the comparison (val mIoU on the
demo's ground truth) is benchmarks/segmenters.py's table; rows it has finished are shown.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from run_all import REPO, fmt, header, load_average, table, write_section
from wsseg.models.segmenters import SEGMENTERS, build_segmenter

SECTION = "Real-time segmenters"
INTRO = """BiSeNet, DFANet and LEDNet against DeepLab-v3+ at the same width (`benchmarks/realtime.py`)."""
REFERENCE = "deeplab-v3plus"
CANDIDATES = ("bisenet", "dfanet", "lednet")
PAPER_DEPTH = 101  # DeepLab-v3+'s own ResNet, the baseline the real-time papers compare with


def table_miou(model: str, tag: str = "table") -> str:
    """The ground-truth val mIoU of benchmarks/segmenters.py's finished rows for `model` (mean over seeds): the
    rows it keeps in the repository, so a fresh clone shows them too. Per seed the longest row counts, as in
    that table (a longer row exists only where its convergence rule asked for one)."""
    rows = [json.loads(p.read_text()) for p in (REPO / "benchmarks" / "results" / "segmenters" / tag).glob(f"{model}-s*.json")]
    last = {row["seed"]: row for row in sorted(rows, key=lambda row: row["recipe"]["steps"]) if row["model"] == model}
    values = [r["gt"]["miou"] for r in last.values() if r.get("gt", {}).get("miou") is not None]
    return f"{fmt(float(np.mean(values)))} ({len(values)} seed{'s' if len(values) != 1 else ''})" if values else "not run yet"


def multiply_adds(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds of one `predict` on `x` (torch's FLOP counter: convolutions and matrix products; half its FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.predict(x)
    return counter.get_total_flops() / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=512, help="square input side")
    parser.add_argument("--depth", type=int, default=18, help="ResNet depth of DeepLab-v3+ and BiSeNet's context path")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier of every model")
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    device = torch.device(args.device)
    # (row label, registry name, ResNet depth): the reference at the candidates' depth first, then at its paper's
    entries = [(REFERENCE, REFERENCE, args.depth)] + [(name, name, args.depth) for name in CANDIDATES if name in SEGMENTERS]
    if args.depth != PAPER_DEPTH:
        entries.append((f"{REFERENCE} (ResNet-{PAPER_DEPTH})", REFERENCE, PAPER_DEPTH))
    names = [label for label, _, _ in entries]
    models = {}
    for label, name, depth in entries:
        torch.manual_seed(0)
        models[label] = build_segmenter(name, args.classes, depth=depth, width=args.width).to(device).eval()
    x = torch.randn(1, 3, args.size, args.size, device=device)
    times: dict[str, list[float]] = {name: [] for name in names}
    load_before = load_average()
    with torch.no_grad():
        for round_index in range(args.warmup + args.rounds):
            for name in names:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                models[name].predict(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if round_index >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    gmacs = {name: multiply_adds(models[name], x) / 1e9 for name in names}
    reference = float(np.median(times[REFERENCE]))
    rows = []
    for name in names:
        seconds = float(np.median(times[name]))
        params = sum(p.numel() for p in models[name].parameters()) / 1e6
        rows.append([name, fmt(1 / seconds), fmt(reference / seconds, 2), fmt(gmacs[name], 3), fmt(params, 2),
                     table_miou(name) if name in SEGMENTERS else "-"])
    notes = [f"device {args.device}; {args.size}x{args.size}, batch 1, {args.classes} classes, ResNet-{args.depth} "
             f"width {args.width}; median of {args.rounds} interleaved rounds after {args.warmup} warm-up rounds",
             "gt val mIoU: benchmarks/segmenters.py's finished rows (demo data, the demo recipe's widths: 0.25, LEDNet and DFANet 1.0; 2000 steps or more), not this script's"]
    text = "\n".join(header("realtime.py", load_before, notes, how="all models in one process, timed in turn")) + "\n\n"
    text += table(["model", "images/s", f"x {REFERENCE}", "GMACs", "parameters (M)", "gt val mIoU on the demo"], rows)
    print(text)
    if not args.no_docs:
        write_section(SECTION, INTRO, "CPU" if device.type == "cpu" else "CUDA", text)


if __name__ == "__main__":
    main()
