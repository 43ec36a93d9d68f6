"""wsseg inspect on the tiny run: panels, the gallery, --worst, and the page as a browser renders it."""

import shutil
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
