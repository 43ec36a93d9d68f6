"""CAM training recipes from scratch, compared on demo data of several seeds.

Each named recipe is a set of config overrides on pipelines/demo.yaml. For every recipe,
demo-data seed and training seed the script runs train-cam and make-cam (and with
--labels the rest of the label pipeline) in its own run directory under
runs/cam-recipes/, then prints one row per recipe: the mean over runs of classification
mAP (train / val), CAM mIoU at the best ground-truth-swept threshold and at the
relative-mode level, with the spread (min-max) beside each, and seconds per run.
Finished runs are cached (the pipeline's own records), so adding a seed or a recipe
reruns only what is new.

    .venv/bin/python benchmarks/cam_recipes.py --recipes demo,irn-optimiser --data-seeds 0,7,11
    .venv/bin/python benchmarks/cam_recipes.py --classes 20 --images 800 --data-seeds 0,7 --recipes demo,irn-optimiser
    .venv/bin/python benchmarks/cam_recipes.py --backbone r50 --recipes demo,irn-optimiser --set cam.epochs=4
    .venv/bin/python benchmarks/cam_recipes.py --labels --recipes epochs30 --data-seeds 0,7,11 \
        --set cam.context_decoupling=runs/cam-recipes/epochs30-r18q-5c-d{data_seed}-t0/labels/semantic

Results (the rows and every run's numbers) go to runs/bench/cam_recipes.json; the
recipes chosen for the defaults and their numbers are in docs/models/cam.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> overrides on pipelines/demo.yaml (whose cam section is the current from-scratch recipe)
RECIPES: dict[str, list[str]] = {
    "demo": [],  # pipelines/demo.yaml as it is: SGD lr 0.1, momentum 0.9, classifier x0.1, wd 1e-4, 30 epochs
    "epochs12": ["cam.epochs=12"],  # the demo recipe before this study
    "irn-optimiser": ["cam.lr=1.0", "cam.classifier_lr_mult=0.1", "cam.momentum=0.0"],
    "irn-optimiser-wd5e-4": ["cam.lr=1.0", "cam.classifier_lr_mult=0.1", "cam.momentum=0.0", "cam.weight_decay=0.0005"],
    "lr0.05-cls1": ["cam.lr=0.05", "cam.classifier_lr_mult=1.0"],
    "lr0.2": ["cam.lr=0.2"],
    "wd5e-4": ["cam.weight_decay=0.0005"],
    "epochs6": ["cam.epochs=6"],
    "epochs20": ["cam.epochs=20"],
    "irn-optimiser-epochs20": ["cam.lr=1.0", "cam.classifier_lr_mult=0.1", "cam.momentum=0.0", "cam.epochs=20"],
    "epochs30": ["cam.epochs=30"],
    "irn-optimiser-epochs30": ["cam.lr=1.0", "cam.classifier_lr_mult=0.1", "cam.momentum=0.0", "cam.epochs=30"],
    "irn-optimiser-epochs40": ["cam.lr=1.0", "cam.classifier_lr_mult=0.1", "cam.momentum=0.0", "cam.epochs=40"],
    "epochs20-wd5e-4": ["cam.epochs=20", "cam.weight_decay=0.0005"],
    "dilated-epochs20": ["cam.epochs=20", "cam.dilations=[3,6,9]"],
    "dilated-epochs30": ["cam.epochs=30", "cam.dilations=[3,6,9]"],
    # the paper's 9x9 window is a quarter of its 41x41 map; the demo's map is 8x8
    "fickle3-epochs30": ["cam.epochs=30", "cam.fickle_window=3"],
    "recam-epochs30": ["cam.epochs=30", "cam.recam=true"],
    "amn-epochs30": ["cam.epochs=30", "cam.amn=true"],  # pipelines/demo.yaml's amn section
    # the pooling that turns a class map into its score (the demo's: gap, IRN's)
    "gmp-epochs30": ["cam.epochs=30", "cam.pooling=gmp"],
    "lse-epochs30": ["cam.epochs=30", "cam.pooling=lse"],
    # augmentation: the random long side before the 128 px crop (the demo's: 96-160 px, IRN's 320-640 / 4)
    "no-rescale-epochs30": ["cam.epochs=30", "cam.resize_long=[128,128]"],
    "wide-rescale-epochs30": ["cam.epochs=30", "cam.resize_long=[64,224]"],
}

BACKBONES = {
    "r18q": [],  # the demo's ResNet-18 at a quarter width
    "r50": ["backbone.depth=50", "backbone.width=1.0"],
}


def data_root(seed: int, classes: int, images: int) -> Path:
    """data/demo (seed 0, 5 classes, 240 images) or data/demo-<classes>c-<seed>[-<images>], generated when missing."""
    from wsseg.data.demo import DEFAULT_NUM_IMAGES, generate_demo

    if (seed, classes, images) == (0, 5, DEFAULT_NUM_IMAGES):
        root = REPO / "data" / "demo"
    else:
        root = REPO / "data" / (f"demo-{classes}c-{seed}" + ("" if images == DEFAULT_NUM_IMAGES else f"-{images}"))
    if not (root / "config.yaml").is_file():
        generate_demo(root, seed=seed, num_classes=classes, num_images=images)
    return root


def run_one(recipe: str, backbone: str, data_seed: int, train_seed: int, classes: int, images: int, extra: list[str],
            labels: bool) -> dict:
    from wsseg import pipeline
    from wsseg.config import load_config
    from wsseg.store import RunStore

    root = data_root(data_seed, classes, images)
    extra = [item.format(data_seed=data_seed, train_seed=train_seed) for item in extra]  # e.g. another run's labels
    tag = (f"{recipe}-{backbone}-{classes}c{'' if images == 240 else f'{images}i'}-d{data_seed}-t{train_seed}"
           + ("-" + "-".join(extra).replace("=", "").replace("/", "_") if extra else ""))
    run = REPO / "runs" / "cam-recipes" / tag
    overrides = [*BACKBONES[backbone], *RECIPES[recipe], *extra, f"run.dir={run}", f"run.seed={train_seed}"]
    config = load_config([REPO / "pipelines" / "demo.yaml", root / "config.yaml"], overrides)
    stop = "synthesize-labels" if labels else "make-cam"
    started = time.monotonic()
    pipeline.run_all(config, stop=stop)
    store = RunStore(run)
    cam_record, cams = store.record("cam"), store.record("cams")["metrics"]
    result = {
        "recipe": recipe, "backbone": backbone, "classes": classes, "data_seed": data_seed, "train_seed": train_seed,
        "extra": extra, "train_map": cam_record["metrics"]["train_map"], "val_map": cam_record["metrics"]["val_map"],
        "cam_best": cams["best_miou"], "cam_best_threshold": cams["best_threshold"], "cam_relative": cams["miou_relative"],
        "train_seconds": cam_record["seconds"], "seconds_this_call": round(time.monotonic() - started, 1),
    }
    result["make_cam_seconds_per_image"] = round(store.record("cams")["seconds"] / store.record("cams")["items"]["total"], 3)
    amn_maps = store.record("amn_cams") if config.cam.amn else None
    if amn_maps:  # AMN's maps are the seeds (when the run went past make-cam): their numbers beside the CAMs', and its cost
        result.update(seed_best=amn_maps["metrics"]["best_miou"], seed_relative=amn_maps["metrics"]["miou_relative"],
                      train_amn_seconds=store.record("amn")["seconds"],
                      make_amn_cam_seconds_per_image=round(amn_maps["seconds"] / amn_maps["items"]["total"], 3))
    if labels:
        relations = store.record("relations")["metrics"]
        label_metrics = store.record("labels")["metrics"]
        result.update(relation_precision=relations["precision"], relation_coverage=relations["coverage"],
                      labels_miou=label_metrics["semantic_miou"], ap50=label_metrics["instance_ap50"], pq=label_metrics["pq"])
    return result


def summarise(runs: list[dict], keys: list[str]) -> dict:
    row = {"runs": len(runs)}
    for key in keys:
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            row[key] = (sum(values) / len(values), min(values), max(values))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="demo,irn-optimiser", help=f"comma-separated, of: {', '.join(RECIPES)}")
    parser.add_argument("--backbone", default="r18q", choices=list(BACKBONES))
    parser.add_argument("--data-seeds", default="0,7,11")
    parser.add_argument("--train-seeds", default="0")
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--images", type=int, default=240, help="demo images (train + val, 3:1)")
    parser.add_argument("--labels", action="store_true", help="run the label pipeline too (mine-relations .. synthesize-labels)")
    parser.add_argument("--set", dest="extra", action="append", default=[],
                        help="more overrides for every run; {data_seed} and {train_seed} are filled in")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise SystemExit(f"--recipes: unknown {unknown}; choose from {', '.join(RECIPES)}")
    data_seeds = [int(s) for s in args.data_seeds.split(",")]
    train_seeds = [int(s) for s in args.train_seeds.split(",")]
    keys = ["train_map", "val_map", "cam_best", "cam_relative", "train_seconds", "make_cam_seconds_per_image"]
    keys += ["seed_best", "seed_relative", "train_amn_seconds", "make_amn_cam_seconds_per_image"] if any(
        "cam.amn=true" in RECIPES[r] or "cam.amn=true" in args.extra for r in recipes) else []
    keys += ["relation_precision", "relation_coverage", "labels_miou", "ap50", "pq"] if args.labels else []
    results, rows = [], {}
    for recipe in recipes:
        runs = []
        for data_seed in data_seeds:
            for train_seed in train_seeds:
                run = run_one(recipe, args.backbone, data_seed, train_seed, args.classes, args.images, args.extra, args.labels)
                print(json.dumps(run), flush=True)
                runs.append(run)
        results += runs
        rows[recipe] = summarise(runs, keys)
    out = REPO / "runs" / "bench" / "cam_recipes.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "runs": results}, indent=2))
    print(f"\n{args.backbone}, {args.classes} classes, data seeds {data_seeds}, train seeds {train_seeds}"
          f"{', ' + ' '.join(args.extra) if args.extra else ''}: mean (min-max) over {len(data_seeds) * len(train_seeds)} runs")
    print("| recipe | " + " | ".join(keys) + " |")
    print("| --- |" + " --- |" * len(keys))
    for recipe, row in rows.items():
        cells = []
        for key in keys:
            mean, low, high = row.get(key, (None, None, None))
            cells.append("-" if mean is None else (f"{mean:.0f} ({low:.0f}-{high:.0f})" if key.endswith("_seconds")
                                                   else f"{mean:.3f} ({low:.3f}-{high:.3f})"))
        print(f"| {recipe} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
