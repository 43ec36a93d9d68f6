"""train-segmenter, its evaluation and `wsseg predict` with an RGB-D model (ACNet): depth is read,
and without it the stage stops with one line before training."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from wsseg import pipeline
from wsseg.data.images import read_label_png
from wsseg.errors import UserError
from wsseg.stages import artifacts
from wsseg.stages.train_segmenter import folder_of
from wsseg.store import RunStore

from tiny import ROOT, TINY, tiny_config

ACNET = ("segmenter.model=acnet", "segmenter.labels=gt", "segmenter.iterations=10", "segmenter.eval_mode=single")


def test_acnet_trains_evaluates_and_predicts_with_depth(tiny_data, tmp_path):
    import torch

    import wsseg.stages.train_segmenter as train_segmenter
    from wsseg.predict import predict_folder

    config = tiny_config(tiny_data, tmp_path / "run", *ACNET, "data.depth_dir=Depth")
    pipeline.run_stage(train_segmenter.STAGE, config)
    store = RunStore(config.run.dir)
    metrics = store.record("segmenter/acnet")["metrics"]
    assert 0 <= metrics["gt"]["miou_single"] <= 1 and metrics["gt"]["val_images"] > 0
    val_ids = artifacts.image_ids(config, "data.val_list")
    assert all((folder_of(store, config, "gt") / "predictions" / f"{i}.png").exists() for i in val_ids)
    # data.depth_dir is in the RGB-D model's fingerprint, and in no RGB model's
    inputs = pipeline.stage_inputs(train_segmenter.STAGE, config)
    assert inputs["data.depth_dir"] == "Depth"
    rgb = tiny_config(tiny_data, tmp_path / "run", "data.depth_dir=Depth")
    assert "data.depth_dir" not in pipeline.stage_inputs(train_segmenter.STAGE, rgb)
    assert pipeline.fingerprint(train_segmenter.STAGE, rgb) == pipeline.fingerprint(
        train_segmenter.STAGE, tiny_config(tiny_data, tmp_path / "run"))

    images, depth = tmp_path / "images", tmp_path / "depth"
    images.mkdir()
    depth.mkdir()
    dataset = artifacts.open_dataset(config)
    for image_id in val_ids[:3]:
        shutil.copy(dataset.image_path(image_id), images / f"{image_id}.jpg")
        shutil.copy(dataset.depth_path(image_id), depth / f"{image_id}.png")
    (depth / f"{val_ids[2]}.png").unlink()
    out = tmp_path / "out"
    failed = predict_folder(config, images, out, source="gt", mode="msflip", overlay=False,
                            device=torch.device("cpu"), depth=depth)
    assert list(failed) == [f"{val_ids[2]}.jpg"] and f"{val_ids[2]}.png" in failed[f"{val_ids[2]}.jpg"]
    for image_id in val_ids[:2]:
        assert read_label_png(out / f"{image_id}.png").shape == dataset.image_size(image_id)
    with pytest.raises(UserError, match="^segmenter.model: acnet needs depth images; pass --depth DIR"):
        predict_folder(config, images, out, source="gt", mode="single", overlay=False, device=torch.device("cpu"))
    # the saved predictions are the single-scale ones the evaluation wrote
    labels, _ = train_segmenter.predict_labels(train_segmenter.load_network(config, store, "gt"),
                                               dataset.read_image(val_ids[0]), device="cpu",
                                               depth=dataset.read_depth(val_ids[0]))
    assert np.array_equal(labels, read_label_png(folder_of(store, config, "gt") / "predictions" / f"{val_ids[0]}.png"))


def test_acnet_without_depth_is_one_line_and_exit_code_2_before_training(tiny_data, tmp_path):
    sets = [f"data.root={tiny_data}", f"run.dir={tmp_path / 'run'}", *TINY, *ACNET]
    for extra, says in ((["data.depth_dir=null"], "set data.depth_dir to the folder"), (["data.depth_dir=NoSuchFolder"], "NoSuchFolder is not a folder")):
        result = subprocess.run(
            [sys.executable, "-c", "from wsseg.cli import main; main()", "train-segmenter", "--config",
             str(ROOT / "pipelines" / "demo.yaml"), *sum((["--set", s] for s in sets + extra), [])],
            capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("wsseg: error:")]
        assert len(errors) == 1 and errors[0].startswith("wsseg: error: segmenter.model: acnet needs depth images; ")
        assert says in errors[0]
        assert not (tmp_path / "run" / "segmenter" / "acnet" / "gt" / "checkpoint.pt").exists()
