"""wsseg inspect on the tiny run: panels, the gallery, --worst, and the page as a browser renders it."""

import shutil
from pathlib import Path
import subprocess

import numpy as np
import pytest
from PIL import Image

from wsseg.inspect import ImageView, disagreement, inspect
from wsseg.stages import artifacts
from wsseg.store import RunStore


def test_panels_and_gallery(labels_run, tmp_path):
    ids = artifacts.image_ids(labels_run, "data.eval_list")[:3]
    index = inspect(labels_run, ids, tmp_path / "inspect")
    html = index.read_text()
    for image_id in ids:
        panel = np.asarray(Image.open(tmp_path / "inspect" / f"{image_id}.png"))
        assert panel.ndim == 3 and panel.shape[0] > 300 and panel.std() > 10  # many tiles, not blank
        assert image_id in html
    assert "synthesize-labels" in html and "semantic_miou" in html  # the stage metrics on top


def test_worst_picks_the_images_that_disagree_most(labels_run, tmp_path):
    index = inspect(labels_run, [], tmp_path / "worst", worst=3)
    picked = [p.stem for p in (tmp_path / "worst").glob("*.png")]
    assert len(picked) == 3
    store, dataset = RunStore(labels_run.run.dir), artifacts.open_dataset(labels_run)
    scores = {i: disagreement(ImageView(labels_run, store, dataset, i)) for i in artifacts.image_ids(labels_run, "data.eval_list")}
    threshold = sorted(scores.values(), reverse=True)[2]
    assert all(scores[i] >= threshold for i in picked)
    assert index.exists()


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(BROWSER is None, reason="headless Chromium is not installed (Debian package: chromium)")
def test_gallery_renders_in_a_browser(labels_run, tmp_path):
    ids = artifacts.image_ids(labels_run, "data.eval_list")[:2]
    index = inspect(labels_run, ids, tmp_path / "inspect")
    shot = tmp_path / "page.png"
    subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600", f"--screenshot={shot}",
                    index.as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert pixels.std() > 20  # text, tables and panels, not an empty page
    # the panels loaded: the page holds the panel images' colours, not just text on white
    assert (np.abs(pixels - 255).sum(axis=2) > 60).mean() > 0.05


def test_the_labels_margin_is_drawn_from_its_file(labels_run, tmp_path):
    """synthesize-labels' tiles include labels/margin (one tile more than without the file)."""
    import wsseg.stages.synthesize_labels as synthesize_labels
    from wsseg.stages.synthesize_labels import Paths

    store, dataset = RunStore(labels_run.run.dir), artifacts.open_dataset(labels_run)
    image_id = artifacts.image_ids(labels_run, "data.label_list")[0]
    view = ImageView(labels_run, store, dataset, image_id)
    with_margin = synthesize_labels.inspect_tiles(view)
    margin = artifacts.read_labels(Paths(store, image_id).margin)
    assert margin is not None and margin.std() > 0  # a map, not a constant
    copy = tmp_path / "run"
    shutil.copytree(labels_run.run.dir, copy)
    (copy / "labels" / "margin" / f"{image_id}.png").unlink()
    from wsseg.config import load_config  # the same config pointed at the copy
    moved = load_config([], [f"run.dir={copy}", f"data.root={labels_run.data.root}",
                             f"data.classes={list(labels_run.data.classes)}"])
    without = synthesize_labels.inspect_tiles(ImageView(moved, RunStore(copy), dataset, image_id))
    assert len(with_margin) == len(without) + 1


def _figures(out):
    return {path.name: path for path in (out / "run").glob("*.png")}


def test_the_run_section_draws_each_stage_s_curves_bars_and_sweep(labels_run, tmp_path):
    """Above the per-image panels: every training stage's per-step curves, every evaluated stage's
    per-class bars and make-cam's background-level sweep, each a real picture in index.html."""
    ids = artifacts.image_ids(labels_run, "data.eval_list")[:1]
    index = inspect(labels_run, ids, tmp_path / "inspect")
    html = index.read_text()
    figures = _figures(tmp_path / "inspect")
    expected = ["train-cam-curves-0.png", "train-irn-curves-0.png", "make-cam-sweep.png", "make-cam-classes-iou.png",
                "mine-relations-classes-precision.png", "mine-relations-classes-coverage.png",
                "synthesize-labels-classes-iou.png", "synthesize-labels-classes-ap50.png", "synthesize-labels-classes-pq.png"]
    for name in expected:
        assert name in figures, sorted(figures)
        assert f"run/{name}" in html
        pixels = np.asarray(Image.open(figures[name]).convert("RGB")).astype(float)
        assert pixels.shape[1] >= 400 and pixels.std() > 10  # axes, lines and text, not an empty canvas
    assert html.index('<section class="run">') < html.index('<section class="row">')  # above the panels


def test_the_step_logs_behind_the_curves_show_learning_and_load_in_tensorboard(labels_run):
    """Each training stage logged every step (its loss falls from the first tenth of the steps to
    the last) and wrote TensorBoard event files that tensorboard's own reader loads, step for step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from wsseg.steplog import read_logs

    store = RunStore(labels_run.run.dir)
    for stage, folder in (("train-cam", "cam"), ("train-irn", "irn")):
        (log,) = read_logs(store.folder(folder))
        total = log["series"]["total"]
        tenth = max(1, len(total) // 10)
        assert log["steps"] == list(range(len(total))) and len(total) >= 10
        assert np.mean(total[-tenth:]) < np.mean(total[:tenth]), stage
        events = EventAccumulator(str(store.folder("tb") / stage / "train"))
        events.Reload()
        logged = events.Scalars("loss/total")
        assert [e.step for e in logged] == log["steps"]
        assert [e.value for e in logged] == pytest.approx(total, rel=1e-4)
        assert len(events.Scalars("lr")) == len(total)


def test_against_puts_a_second_run_beside_the_first(labels_run, tmp_path):
    """--against a run directory: both runs' rows in the table and both in each picture's series."""
    from wsseg.config import config_of_run
    from wsseg import run_view, pipeline

    other = tmp_path / "other"
    shutil.copytree(labels_run.run.dir, other)
    against = config_of_run(other)
    assert Path(against.run.dir) == other
    ids = artifacts.image_ids(labels_run, "data.eval_list")[:1]
    index = inspect(labels_run, ids, tmp_path / "inspect", against=against)
    html = index.read_text()
    label = Path(labels_run.run.dir).name
    assert f"make-cam ({label})" in html and "make-cam (other)" in html
    runs = [run_view.Run(label, labels_run, RunStore(labels_run.run.dir)), run_view.Run("other", against, RunStore(other))]
    figures = run_view.stage_figures(runs, pipeline.stage_by_name("synthesize-labels"), tmp_path / "figures")
    bars = next(f for f in figures if f["title"].endswith("per class IoU"))
    assert bars["caption"] == f"{label}: semantic, other: semantic"


def test_against_something_that_is_not_a_run_is_one_clear_line(tmp_path):
    from test_cli import one_line_error, wsseg

    (tmp_path / "empty").mkdir()
    result = wsseg("inspect", "--config", "pipelines/demo.yaml", "--set", f"run.dir={tmp_path / 'run'}",
                   "--against", tmp_path / "empty")
    one_line_error(result, 2, "not a wsseg run directory", "empty")
