"""Panoptic labels through the segmenter's augmentation, and MaX-DeepLab trained by train-segmenter."""

import numpy as np
import torch

from tiny import tiny_config
from wsseg import pipeline
from wsseg.data.transforms import SegmentationAugment
from wsseg.stages.panoptic import SEGMENT_BASE, encode_segments, targets_from_codes
from wsseg.store import RunStore


def test_codes_survive_augmentation_and_rebuild_the_segments():
    segments = np.zeros((40, 50), np.int64)
    segments[5:20, 5:20] = 1   # thing of category 3
    segments[25:35, 30:45] = 2  # another thing of category 3
    segments[0:40, 46:50] = 0   # void strip
    segments[(segments == 0) & (np.arange(50)[None, :] < 46)] = 3  # background stuff
    codes = encode_segments(segments, {1: 3, 2: 3, 3: 0})
    assert set(np.unique(codes).tolist()) == {255, SEGMENT_BASE * 1, SEGMENT_BASE * 4, SEGMENT_BASE * 4 + 1}
    image = np.zeros((40, 50, 3), np.uint8)
    _, augmented = SegmentationAugment(scale_range=(0.7, 1.3), crop_size=48)(image, codes, np.random.default_rng(0))
    (target,) = targets_from_codes(torch.from_numpy(np.asarray(augmented, dtype=np.int64))[None])
    assert set(target["classes"].tolist()) <= {0, 3}
    assert not (target["masks"].sum(0) > 1).any()  # segments never overlap
    assert torch.equal(target["masks"].any(0), ~target["void"])  # every pixel is a segment or void


def maxdeeplab_config(labels_run):
    """A tiny MaX-DeepLab with the demo's pseudo-label options (the ignore band applies to it, relaxation does not)."""
    return tiny_config(labels_run.data.root, labels_run.run.dir, "segmenter.model=maxdeeplab", "segmenter.labels=both",
                       "segmenter.eval_mode=single", "segmenter.options.maxdeeplab.num_slots=8",
                       "segmenter.options.maxdeeplab.memory_channels=32", "segmenter.options.maxdeeplab.pixel_dim=16",
                       "segmenter.lr=0.001", "segmenter.ignore_band=0.1", "segmenter.label_relaxation=1")


def test_maxdeeplab_trains_on_panoptic_labels_and_reports_pq(labels_run):
    import wsseg.stages.train_segmenter as train_segmenter

    config = maxdeeplab_config(labels_run)
    pipeline.run_stage(train_segmenter.STAGE, config)
    record = RunStore(config.run.dir).record("segmenter/maxdeeplab")
    for source in ("pseudo", "gt"):
        values = record["metrics"][source]
        assert 0 <= values["pq"] <= 1 and 0 <= values["miou_single"] <= 1 and values["panoptic_images"] > 0
        curve = record["curves"][source]
        assert set(curve) >= {"pq", "mask_id", "instance", "semantic", "total"}
    assert "pq_pseudo" in record["metrics"] and "pq_gt" in record["metrics"]
    # the ignore band voids the pseudo panoptic labels' least confident pixels; relaxation is per-pixel only
    assert record["metrics"]["pseudo"]["noisy_label_options"] == {"label_relaxation": 0, "gated_crf": 0.0, "ignore_band": 0.1}
    assert record["metrics"]["gt"]["noisy_label_options"] == {"label_relaxation": 0, "gated_crf": 0.0, "ignore_band": 0.0}


def test_panoptic_predictions_are_written_and_drawn(labels_run, tmp_path):
    from wsseg.inspect import inspect
    from wsseg.stages import artifacts

    config = maxdeeplab_config(labels_run)
    import wsseg.stages.train_segmenter as train_segmenter

    pipeline.run_stage(train_segmenter.STAGE, config)  # up to date (skipped) when the test above trained it
    store = RunStore(config.run.dir)
    val_id = artifacts.image_ids(config, "data.val_list")[0]
    predicted = artifacts.read_panoptic(store.folder("segmenter/maxdeeplab/pseudo/panoptic"), val_id)
    assert predicted is not None
    segments, categories = predicted
    assert set(np.unique(segments).tolist()) - {0} <= set(categories)
    index = inspect(config, [val_id], tmp_path / "inspect")
    assert (tmp_path / "inspect" / f"{val_id}.png").exists() and index.exists()
