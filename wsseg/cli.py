"""The `wsseg` command line: one command per stage, plus run-all, status, eval, inspect, demo-data.

Errors a user can cause print one line on stderr and exit 2; run-time failures exit 1;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: with spinning, a busy core turns each of
# the random walk's ~1 ms steps into a full scheduler slice (measured 10-100x slower).
# Must be set before torch is imported; a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click

from wsseg.errors import RunFailure, UserError

log = logging.getLogger("wsseg")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%H:%M:%S")
        return f"[{stamp}] {record.getMessage()}"


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False


def _add_file_log(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)


def _one_line(message: str) -> str:
    """A message as one line; an error re-raised by a DataLoader worker carries the worker's
    traceback in its text: keep only the original message (its last line)."""
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split("Error: ", 1)[-1] if "Error: " in last else last
    return " ".join(message.split())


def _fail(message: str, code: int) -> None:
    click.echo(f"wsseg: error: {_one_line(message)}", err=True)
    sys.exit(code)


def main() -> None:
    """Console entry point: turn exceptions into one line and an exit code."""
    debug = "--debug" in sys.argv[1:]
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        _fail("interrupted", 130)
    except click.ClickException as error:
        if debug:
            raise
        message = error.format_message()
        ctx = getattr(error, "ctx", None)
        usage = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _fail(message + usage, error.exit_code if error.exit_code else 2)
    except UserError as error:
        if debug:
            raise
        _fail(str(error), 2)
    except RunFailure as error:
        if debug:
            raise
        _fail(str(error), 1)
    except KeyboardInterrupt:
        if debug:
            raise
        _fail("interrupted; finished items are kept and the next run resumes", 130)
    except Exception as error:  # noqa: BLE001 - the last line of defence for the user
        if debug:
            raise
        if out_of_memory(error):
            _fail(f"out of memory ({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else 'no detail'}); "
                  f"large images at the recipe's scales may need more than this machine has: set data.max_side (e.g. "
                  f"2000) to downscale them on read, or lower cam.scales and the batch sizes (docs/BENCHMARKS.md, Large "
                  f"images); finished items are kept", 1)
        _fail(f"unexpected failure: {type(error).__name__}: {error} (run again with --debug for the traceback)", 1)


def out_of_memory(error: BaseException) -> bool:
    """numpy's and Python's MemoryError, torch's CUDA OutOfMemoryError and its CPU allocator's failure."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("not enough memory" in text or "can't allocate memory" in text
                                                or "out of memory" in text.lower())


class _Commands(click.Group):
    """The commands below plus one per stage of the pipeline (wsseg/pipeline.py's STAGES).

    The stage list is read when a command is looked up, not when this module is imported,
    so that `wsseg demo-data` and a mistyped command stay quick."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from wsseg import pipeline

        return sorted({*super().list_commands(ctx), *(stage.name for stage in pipeline.STAGES)})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None:
            return command
        from wsseg import pipeline

        stage = next((s for s in pipeline.STAGES if s.name == name), None)
        return None if stage is None else _stage_command(stage)


class _EvaluationChoice(click.Choice):
    """`eval --stage`'s choices: the evaluators the stages declare, read when needed."""

    def __init__(self) -> None:  # no super().__init__: the choices are computed
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:
        from wsseg import pipeline

        return tuple(pipeline.evaluation_names())


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """wsseg: image tags -> pixel labels (IRN) -> trained segmenters."""
    _setup_logging(debug)


def config_options(function=None, *, required: bool = True):
    """--config (repeatable; later files override earlier ones) and --set KEY=VALUE, loaded
    and validated into the command's `config` argument."""
    if function is None:
        return functools.partial(config_options, required=required)

    @click.option("--config", "-c", "configs", multiple=True, required=required, type=click.Path(dir_okay=False, path_type=Path),
                  help="YAML config; repeat to stack files (later ones win).")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. --set cam.epochs=3.")
    @functools.wraps(function)
    def wrapper(configs, overrides, **kwargs):
        from wsseg.config import load_config

        config = load_config(configs, overrides)
        return function(config=config, **kwargs)

    return wrapper


def _with_lock(config, function):
    """Run `function(dist)` holding the run-directory lock (main rank only under torchrun)."""
    from wsseg.context import init_distributed
    from wsseg.pipeline import lock_for

    dist = init_distributed(config.run.device)
    lock = lock_for(config, dist)
    if lock is not None:
        lock.acquire()
        _add_file_log(Path(config.run.dir))
    try:
        return function(dist)
    finally:
        if lock is not None:
            lock.release()
        if dist.enabled:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _stage_command(stage) -> click.Command:
    """`wsseg <stage> --config ... [--force]`: run one stage if it is not up to date."""

    @click.command(name=stage.name, help=stage.help)
    @config_options
    @click.option("--force", is_flag=True, help="Rerun even if up to date.")
    def command(config, force: bool) -> None:
        from wsseg.pipeline import format_status, run_stage, status

        _with_lock(config, lambda dist: run_stage(stage, config, force=force, dist=dist))
        click.echo(format_status([s for s in status(config) if s.name == stage.name]))

    return command


@cli.command("run-all")
@config_options
@click.option("--from", "start", metavar="STAGE", help="First stage to consider.")
@click.option("--to", "stop", metavar="STAGE", help="Last stage to run.")
@click.option("--force", is_flag=True, help="Rerun the selected stages even if up to date.")
def run_all_command(config, start: str | None, stop: str | None, force: bool) -> None:
    """Run every stage in order: skip what is up to date, resume what was interrupted, redo what is stale."""
    from wsseg.pipeline import format_status, run_all

    from wsseg.report import format_quality

    states = _with_lock(config, lambda dist: run_all(config, start=start, stop=stop, force=force, dist=dist))
    click.echo(format_status(states))
    click.echo("")
    click.echo(format_quality(config))
    configs = " ".join(f"--config {source}" for source in config.sources)
    click.echo(f"\npictures: wsseg inspect {configs} (writes {Path(config.run.dir) / 'inspect'}/index.html)")


@cli.command("config")
@config_options(required=False)
@click.option("--keys", is_flag=True, help="List every key with its default and meaning, and each model's options.")
def config_command(config, keys: bool) -> None:
    """The resolved config after stacking files and --set (validated), or with --keys every key there is."""
    from wsseg.config import describe_keys, to_yaml

    if keys:
        from wsseg.models.segmenters import describe_options

        click.echo(describe_keys())
        click.echo("\nsegmenter.options.<model> (each model's constructor options and defaults):")
        click.echo(describe_options())
        return
    click.echo(to_yaml(config), nl=False)


@cli.command("report")
@config_options
def report_command(config) -> None:
    """The quality table: each stage's headline numbers and time."""
    from wsseg.report import format_quality

    click.echo(format_quality(config))


@cli.command("status")
@config_options
def status_command(config) -> None:
    """The stage table: done / stale (and why) / partial / missing."""
    from wsseg.pipeline import format_status, status

    click.echo(format_status(status(config)))


@cli.command("eval")
@config_options
@click.option("--stage", "which", required=True, type=_EvaluationChoice(), help="What to evaluate.")
def eval_command(config, which: str) -> None:
    """Evaluate cached artifacts against the ground truth (no recomputation)."""
    import json

    from wsseg.context import Progress
    from wsseg.pipeline import evaluator_by_name
    from wsseg.store import RunStore

    stage, evaluate = evaluator_by_name(which)
    store = RunStore(Path(config.run.dir))
    if store.record(stage.record_folder(config)) is None:
        raise UserError(f"eval --stage {which}: {stage.name} has not run in {config.run.dir}; run `wsseg {stage.name}` first")
    metrics = evaluate(config, store, lambda items, desc: Progress(items, None, desc))
    click.echo(json.dumps(metrics, indent=2))


@cli.command("inspect")
@config_options
@click.argument("image_ids", nargs=-1)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder for the panels (default: RUN/inspect).")
@click.option("--worst", type=click.IntRange(min=1), default=None, help="Pick the K images whose labels disagree most with the ground truth.")
@click.option("--compare", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="An overlay (e.g. RUN/calibration/calibrated.yaml): add the labels recomputed under it, side by side.")
@click.option("--against", type=click.Path(exists=True, path_type=Path), default=None,
              help="A second run (its run directory, or its config file): its table, curves and per-class bars beside this run's.")
def inspect_command(config, image_ids: tuple[str, ...], out: Path | None, worst: int | None, compare: Path | None,
                    against: Path | None) -> None:
    """PNG panels of every stage's cached output per image, the run's curves, per-class bars and
    sweeps, and an index.html gallery."""
    from wsseg.config import apply_overlay, config_of_run, load_config
    from wsseg.context import Progress
    from wsseg.inspect import inspect

    out = out or Path(config.run.dir) / "inspect"
    other = apply_overlay(config, compare) if compare else None
    second = None if against is None else config_of_run(against) if against.is_dir() else load_config([against])
    index = inspect(config, list(image_ids), out, worst=worst, progress=lambda items, desc: Progress(items, None, desc),
                    compare=other, against=second, log=lambda line: click.echo(line, err=True))
    click.echo(f"wrote {index}")


@cli.command("predict")
@config_options
@click.option("--images", "images_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder of images.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the label PNGs.")
@click.option("--model", "model_name", default=None, help="Segmenter (default: segmenter.model).")
@click.option("--labels", "source", type=click.Choice(["pseudo", "gt"]), default="pseudo", show_default=True,
              help="Which trained copy: on pseudo labels or on ground truth.")
@click.option("--mode", type=click.Choice(["single", "msflip"]), default="single", show_default=True)
@click.option("--overlay", is_flag=True, help="Also write <name>_overlay.png (labels over the image).")
@click.option("--depth", "depth_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="RGB-D models (acnet): folder of 16-bit depth maps, <name>.png per image.")
def predict_command(config, images_dir: Path, out: Path, model_name: str | None, source: str, mode: str, overlay: bool,
                    depth_dir: Path | None) -> None:
    """Label a folder of new images with a trained segmenter (palette PNGs, VOC colours)."""
    import dataclasses

    from wsseg.context import Progress, resolve_device
    from wsseg.predict import predict_folder

    if model_name:
        config = dataclasses.replace(config, segmenter=dataclasses.replace(config.segmenter, model=model_name))
    device = resolve_device(config.run.device)
    failed = predict_folder(config, images_dir, out, source=source, mode=mode, overlay=overlay, device=device,
                            progress=lambda items, desc: Progress(items, None, desc), depth=depth_dir)
    if failed:
        for name, reason in failed.items():
            click.echo(f"wsseg: skipped {name}: {reason}", err=True)
        raise RunFailure(f"{len(failed)} of the images in {images_dir} could not be labelled (listed above); the others are in {out}")
    click.echo(f"labels written to {out}")


@cli.command("export")
@config_options
@click.option("--format", "fmt", required=True, type=click.Choice(["coco-instances", "coco-panoptic", "voc"]))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Default: RUN/export/FORMAT.")
@click.option("--list", "list_key", default="data.label_list", show_default=True, help="Which image list to export.")
@click.option("--min-score", default=0.0, show_default=True, type=click.FloatRange(0, 1), help="Drop instances scoring below this.")
def export_command(config, fmt: str, out: Path | None, list_key: str, min_score: float) -> None:
    """Write the synthesized labels for other tools: COCO instances (RLE), COCO panoptic, or a VOC folder."""
    from wsseg.context import Progress
    from wsseg.export import export_labels
    from wsseg.stages import artifacts

    if not list_key.startswith("data.") or not list_key.endswith("_list"):
        raise UserError(f"--list {list_key}: give a list key such as data.label_list or data.eval_list")
    dataset = artifacts.open_dataset(config)
    ids = artifacts.image_ids(config, list_key)
    out = out or Path(config.run.dir) / "export" / fmt
    summary = export_labels(Path(config.run.dir), out, fmt, image_ids=ids, class_names=list(config.data.classes),
                            image_sizes={i: (dataset.original_size(i) if config.data.max_side else dataset.image_size(i))
                                         for i in ids},
                            rescale=config.data.max_side > 0, min_score=min_score,
                            image_files={i: dataset.image_path(i).name for i in ids},
                            category_ids=([dataset.category_id(k) for k in range(1, len(config.data.classes) + 1)]
                                          if hasattr(dataset, "category_id") else None),
                            list_name=Path(str(config.get(list_key))).stem,
                            image_root=dataset.image_path(ids[0]).parent if fmt == "voc" and ids else None,
                            progress=lambda items, desc: Progress(items, None, desc))
    click.echo(f"exported {summary.get('images', 0)} images as {fmt} to {out}")


@cli.command("calibrate")
@config_options
@click.option("--images", default=100, show_default=True, type=click.IntRange(min=1), help="Calibration subset size (seeded sample of data.eval_list).")
@click.option("--metric", type=click.Choice(["semantic", "instance", "both"]), default="both", show_default=True)
@click.option("--holdout", default=200, show_default=True, type=click.IntRange(min=0), help="Held-out images for the honest number.")
def calibrate_command(config, images: int, metric: str, holdout: int) -> None:
    """Search the thresholds on a subset with ground truth (no retraining); write a stackable YAML overlay."""
    from wsseg.calibrate import calibrate, format_report
    from wsseg.context import Progress, resolve_device

    report = calibrate(config, images=images, metric=metric, holdout=holdout, device=resolve_device(config.run.device),
                       progress=lambda items, desc: Progress(items, None, desc))
    click.echo(format_report(report))
    click.echo(f"overlay: {report['overlay']}  (use: --config {' --config '.join(config.sources)} --config {report['overlay']})")


@cli.command("demo-data")
@click.option("--out", default="data/demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", "num_images", default=None, type=click.IntRange(min=4), help="Number of images (train + val).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--size", default=None, type=click.IntRange(min=32), help="Long side of the images in pixels.")
@click.option("--classes", "num_classes", default=5, show_default=True, type=click.IntRange(5, 20),
              help="Number of classes (VOC has 20); more than 5 adds new shapes and their context backgrounds.")
@click.option("--format", "layout", default="voc", show_default=True, type=click.Choice(["voc", "coco", "folder"]),
              help="Dataset layout to write (data.format): the VOC 2012 devkit's, COCO 2014's, or images/ + tags.csv + masks/.")
def demo_data_command(out: Path, num_images: int | None, seed: int, size: int | None, num_classes: int, layout: str) -> None:
    """Write the synthetic demo dataset (VOC 2012 layout, or --format coco | folder)."""
    from wsseg.data import demo

    kwargs = {"seed": seed, "num_classes": num_classes, "layout": layout}
    if num_images is not None:
        kwargs["num_images"] = num_images
    if size is not None:
        kwargs["size"] = size
    summary = demo.generate_demo(out, **kwargs)
    click.echo(f"demo dataset written to {out}: {summary.get('num_images', '?')} images of {len(summary['classes'])} "
               f"classes; run it with --config pipelines/demo.yaml --config {out / 'config.yaml'}")


if __name__ == "__main__":
    main()
