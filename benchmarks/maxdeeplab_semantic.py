"""MaX-DeepLab's semantic output read two ways from one trained network: from its masks and from its head.

    .venv/bin/python benchmarks/maxdeeplab_semantic.py --run runs/demo-s5 \\
        --config pipelines/demo.yaml --config data/demo-s5/config.yaml --labels gt

MaX-DeepLab predicts masks and a class per mask; its semantic logits can be the masks weighted by
their classes (`semantic_source: masks`, consistent with the panoptic output) or its auxiliary
semantic head, a per-pixel classifier on the decoder trained with cross-entropy beside the
panoptic losses (`semantic_source: head`). The training loss reads neither, so a run trained
with either setting holds the network for both: this script evaluates the trained model of
`--run` (train-segmenter done for maxdeeplab) with each setting, as the stage's own evaluation
does (single scale, ms+flip, +CRF; val mIoU and the panoptic PQ, which does not depend on the
setting), in a hard-linked copy of the run, so the run's own files are left as they are.
Prints the table; docs/models/maxdeeplab.md has the findings.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from run_all import fmt, header, load_average, table
from segmenters import copy_run
from wsseg.config import load_config
from wsseg.stages.train_segmenter import evaluate
from wsseg.store import RunStore

SOURCES = ("masks", "head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a run whose train-segmenter trained maxdeeplab")
    parser.add_argument("--config", action="append", default=[], help="the run's config files, in order")
    parser.add_argument("--set", action="append", default=[], help="the run's config overrides KEY=VALUE")
    parser.add_argument("--labels", default="gt", choices=("gt", "pseudo"), help="which trained model to evaluate")
    args = parser.parse_args()
    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        copy = Path(scratch) / "run"
        copy_run(args.run.resolve(), copy, keep_segmenters=True)
        for source in SOURCES:
            sets = [*args.set, "segmenter.model=maxdeeplab", f"segmenter.labels={args.labels}", f"run.dir={copy}",
                    f"segmenter.options.maxdeeplab.semantic_source={source}"]  # merged into the config's options
            config = load_config(args.config, sets)
            values = evaluate(config, RunStore(copy))[args.labels]
            rows.append([source, *(fmt(values.get(f"miou_{mode}")) for mode in ("single", "msflip", "crf")),
                         fmt(values.get("pq"))])
    notes = [f"the maxdeeplab trained on {args.labels} labels in {args.run}; val images of its config"]
    print("\n".join(header("maxdeeplab_semantic.py", load_before, notes, how="one process")) + "\n")
    print(table(["semantic_source", "val mIoU single", "ms+flip", "+CRF", "val PQ"], rows))


if __name__ == "__main__":
    main()
