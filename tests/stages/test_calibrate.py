"""wsseg calibrate: the search finds a planted optimum, held-out images are disjoint, nothing is retrained."""

import numpy as np
import pytest

from wsseg.calibrate import split_images, sweep_semantic
from wsseg.config import load_config
from wsseg.metrics import ConfusionMatrix
from wsseg.store import RunStore


@pytest.mark.parametrize("per_pixel_unit", [False, True], ids=["irn", "walked-background"])
def test_semantic_sweep_finds_a_planted_background(per_pixel_unit):
    """Ground truth made with background 0.4 from the same scores: the sweep's best is exactly 0.4."""
    rng = np.random.default_rng(0)
    scores = rng.random((2, 30, 40)).astype(np.float32)
    unit = (0.5 + rng.random((30, 40))).astype(np.float32) if per_pixel_unit else 1.0
    keys = np.array([1, 3])
    truth = np.where(scores.max(0) > 0.4 * unit, keys[scores.argmax(0)] + 1, 0)
    backgrounds = (0.2, 0.3, 0.4, 0.5, 0.6)
    matrices = [ConfusionMatrix(5) for _ in backgrounds]
    sweep_semantic(scores, unit, keys, truth, backgrounds, matrices)
    mious = [m.summary()["miou"] for m in matrices]
    assert backgrounds[int(np.argmax(mious))] == 0.4 and mious[2] == 1.0


def test_held_out_images_are_outside_the_subset():
    ids = [f"2026_{i:06d}" for i in range(50)]
    subset, rest = split_images(ids, 20, seed=3)
    assert len(subset) == 20 and len(rest) == 30 and not set(subset) & set(rest)
    assert split_images(ids, 20, seed=3) == (subset, rest)  # seeded


def test_calibrate_reuses_the_networks_and_writes_a_stackable_overlay(labels_run):
    import torch

    from wsseg.calibrate import calibrate

    store = RunStore(labels_run.run.dir)
    cam_model, irn_model = store.folder("cam") / "model.pt", store.folder("irn") / "model.pt"
    before = (cam_model.stat().st_mtime_ns, irn_model.stat().st_mtime_ns, store.record("irn")["token"])
    report = calibrate(labels_run, images=8, metric="both", holdout=6, device=torch.device("cpu"))
    assert (cam_model.stat().st_mtime_ns, irn_model.stat().st_mtime_ns, store.record("irn")["token"]) == before
    assert report["subset_images"] == 8 and report["held_out_images"] == 6
    for name in ("semantic_miou", "instance_ap50"):
        assert report["held_out"][name]["default"] is not None
    overlay = store.folder("calibration") / "calibrated.yaml"
    stacked = load_config([*labels_run.sources, overlay])
    chosen = report["chosen"]
    assert stacked.relations.conf_fg == chosen["relations"]["conf_fg"]
    assert stacked.labels.sem_background == chosen["labels"]["sem_background"]
    assert (store.folder("calibration") / "report.md").read_text().startswith("# Calibration")
    _check_the_gallery_draws_the_search(labels_run, store, report)


def _check_the_gallery_draws_the_search(config, store, report):
    """inspect's run section reads report.json back: every searched point on its curve, the chosen
    level marked, and that level is where the best curve peaks (the axes are not swapped)."""
    import json

    import pytest

    from wsseg.run_view import Run, calibration_curves, calibration_figures

    pytest.importorskip("matplotlib")
    for section, chosen_key in (("semantic", ("labels", "sem_background")), ("relations", ("relations", "conf_fg"))):
        grid = report["grid"][section]
        curves, chosen = calibration_curves(json.loads(json.dumps(report)), section)
        assert sum(len(points) for points in curves.values()) == sum(
            (v["f0.5"] if section == "relations" else v) is not None for v in grid.values())
        assert chosen == report["chosen"][chosen_key[0]][chosen_key[1]]
        best = max(max(points.values()) for points in curves.values())
        assert any(points.get(chosen) == best for points in curves.values())
    out = store.root / "gallery-test"
    out.mkdir()
    figures = calibration_figures([Run("run", config, store)], out)
    assert [f["title"] for f in figures] == ["calibrate — semantic mIoU", "calibrate — instance AP50",
                                             "calibrate — relation F0.5"]
    assert all((out / f["image"]).stat().st_size > 1000 for f in figures)


def test_inspect_compares_default_and_overlay_labels_side_by_side(labels_run, tmp_path):
    from PIL import Image

    from wsseg.config import apply_overlay
    from wsseg.inspect import inspect
    from wsseg.stages import artifacts

    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("labels:\n  sem_background: 0.6\n")
    other = apply_overlay(labels_run, overlay)
    assert other.labels.sem_background == 0.6 and other.cam == labels_run.cam
    image_id = artifacts.image_ids(labels_run, "data.label_list")[0]
    plain = np.asarray(Image.open(inspect(labels_run, [image_id], tmp_path / "a").parent / f"{image_id}.png"))
    compared = np.asarray(Image.open(inspect(labels_run, [image_id], tmp_path / "b", compare=other).parent / f"{image_id}.png"))
    # two more tiles (they may fill the empty slots of the last grid row, so compare the pixels)
    assert compared.shape != plain.shape or not np.array_equal(compared, plain)
