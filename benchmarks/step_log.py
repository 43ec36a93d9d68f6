"""What the per-step training log costs on a VOC-length run: file sizes and time per checkpoint.

    .venv/bin/python benchmarks/step_log.py            # VOC recipe lengths; updates docs/BENCHMARKS.md
    .venv/bin/python benchmarks/step_log.py --no-docs

Every training phase keeps one log (wsseg/steplog.py): per step its loss terms, the learning
rate and images/s. It is written (JSON, atomically) and stored in the checkpoint at every epoch
end, so its cost grows with the run. This replays the phases of pipelines/voc.yaml on
VOC's 10,582 training images — train-cam 5 epochs of batch 16, train-irn 3 epochs of 32,
DeepLab-v2 20,000 steps of 10 — with made-up values of realistic magnitude, through the same
StepLog (and TensorBoard's writer when installed), and measures the log's JSON size, the
checkpoint's share of it (torch.save of the state), the event file's size and the time each
epoch-end write takes at the end of the phase, where it is largest.
"""

from __future__ import annotations

import argparse
import io
import math
import tempfile
import time
from pathlib import Path

import torch

from run_all import fmt, header, load_average, table, write_section
from wsseg.steplog import StepLog, tensorboard_available

SECTION = "Step logs"
INTRO = """What the per-step training logs cost at VOC's length (`benchmarks/step_log.py`)."""
VOC_TRAIN_IMAGES = 10582
PHASES = {  # phase: (steps, steps per epoch, loss terms)
    "train-cam (5 epochs, batch 16)": (5 * math.ceil(VOC_TRAIN_IMAGES / 16), math.ceil(VOC_TRAIN_IMAGES / 16), ["total"]),
    "train-irn (3 epochs, batch 32)": (3 * (VOC_TRAIN_IMAGES // 32), VOC_TRAIN_IMAGES // 32,
                                       ["aff_bg_pos", "aff_fg_pos", "aff_neg", "disp_fg", "disp_bg", "total"]),
    "deeplab-v2 (20000 steps, batch 10)": (20000, VOC_TRAIN_IMAGES // 10, ["ce", "total"]),
}


def replay(folder: Path, name: str, steps: int, per_epoch: int, terms: list[str], tensorboard: bool) -> list[str]:
    log = StepLog(folder / "curves" / "log.json", name, "bench", tensorboard=folder / "tb" if tensorboard else None)
    generator = torch.Generator().manual_seed(0)
    noise = torch.rand(steps, len(terms) + 1, generator=generator).tolist()
    last_write = 0.0
    for step in range(steps):
        values = {term: 1.0 / (1 + step / 1000) + 0.1 * noise[step][k] for k, term in enumerate(terms)}
        values["lr"] = 0.01 * (1 - step / steps) ** 0.9
        values["images_per_second"] = 20 + noise[step][-1]
        log.add_step(step, values)
        if (step + 1) % per_epoch == 0 or step + 1 == steps:
            began = time.perf_counter()
            buffer = io.BytesIO()
            torch.save({"log": log.state()}, buffer)  # the checkpoint's copy
            log.flush()
            last_write = time.perf_counter() - began
    log.close()
    json_mb = (folder / "curves" / "log.json").stat().st_size / 2 ** 20
    events = sum(p.stat().st_size for p in (folder / "tb").rglob("*") if p.is_file()) / 2 ** 20 if tensorboard else None
    return [name, str(steps), str(len(terms) + 2), fmt(json_mb, 3), fmt(buffer.getbuffer().nbytes / 2 ** 20, 3),
            "-" if events is None else fmt(events, 3), fmt(last_write * 1000, 3)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    load_before = load_average()
    tensorboard = tensorboard_available()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, (steps, per_epoch, terms)) in enumerate(PHASES.items()):
            rows.append(replay(Path(tmp) / str(index), name, steps, per_epoch, terms, tensorboard))
            print(rows[-1], flush=True)
    notes = ["the phases of pipelines/voc.yaml on 10,582 images, made-up values through wsseg.steplog.StepLog; "
             "one write per epoch end (JSON file + the checkpoint's copy); sizes at the end of the phase"]
    text = "\n".join(header("step_log.py", load_before, notes, how="one process")) + "\n\n"
    text += table(["phase", "steps", "series", "JSON (MB)", "in the checkpoint (MB)", "TensorBoard events (MB)",
                   "last epoch-end write (ms)"], rows)
    print(text)
    if not args.no_docs:
        write_section(SECTION, INTRO, "CPU", text)


if __name__ == "__main__":
    main()
