"""Reliability: kills, damaged files, bad data, NaN losses, untrusted files (docs/RELIABILITY.md lists them)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from interrupt import kill_when_written
from tiny import ROOT, TINY, tiny_config
from wsseg import pipeline
from wsseg.checkpoints import load_checkpoint
from wsseg.data.images import read_image
from wsseg.errors import UserError
from wsseg.stages import artifacts
from wsseg.store import RunStore

TRAIN_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from tiny import tiny_config
from wsseg import pipeline
from wsseg.checkpoints import load_checkpoint
import wsseg.stages.train_cam as train_cam
pipeline.run_stage(train_cam.STAGE, tiny_config({data!r}, {run!r}, "cam.epochs=4"))
"""


def wsseg(*args):
    return subprocess.run([sys.executable, "-m", "wsseg.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


def cli_overrides(data, run, *extra):
    return sum((["--set", item] for item in [f"data.root={data}", f"run.dir={run}", *TINY, *extra]), [])


def test_killed_training_resumes_from_its_checkpoint_and_ends_identical(tiny_data, tmp_path):
    """kill -9 train-cam after its first checkpoint; the rerun resumes there and ends with the
    same weights as an uninterrupted run (sampling depends on seed and epoch only)."""
    import wsseg.stages.train_cam as train_cam

    reference = tmp_path / "reference"
    pipeline.run_stage(train_cam.STAGE, tiny_config(tiny_data, reference, "cam.epochs=4"))

    run = tmp_path / "killed"
    checkpoint = run / "cam" / "checkpoint.pt"
    code = TRAIN_SCRIPT.format(tests=str(ROOT / "tests" / "stages"), data=str(tiny_data), run=str(run))
    kill_when_written(code, tmp_path, str(checkpoint))  # right after the first epoch's checkpoint
    assert checkpoint.exists() and not (run / "cam" / "model.pt").exists()
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1

    pipeline.run_stage(train_cam.STAGE, tiny_config(tiny_data, run, "cam.epochs=4"))
    resumed = torch.load(run / "cam" / "model.pt", weights_only=True)["model"]
    expected = torch.load(reference / "cam" / "model.pt", weights_only=True)["model"]
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
    curve = RunStore(run).record("cam")["curves"]["bce_total"]
    assert curve == RunStore(reference).record("cam")["curves"]["bce_total"]


def test_nan_loss_stops_with_one_honest_line(tiny_data, tmp_path):
    result = wsseg("train-cam", "--config", ROOT / "pipelines" / "demo.yaml",
                   *cli_overrides(tiny_data, tmp_path / "run", "cam.lr=1e30", "cam.epochs=3"))
    assert result.returncode == 1, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    # lr 1e30 blows the weights up in the first step: the message must not promise a checkpoint that does not exist
    assert line.startswith("wsseg: error: train-cam: the loss became") and "at epoch 1," in line
    assert "no checkpoint was written yet" in line and "lower the learning rate" in line
    assert not (tmp_path / "run" / "cam" / "model.pt").exists()
    assert not (tmp_path / "run" / "cam" / "checkpoint.pt").exists()


def test_malicious_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(UserError, match="cannot load"):
        load_checkpoint(path, "the trained CAM network")
    from wsseg.models.backbones import ResNet, load_weights

    with pytest.raises(UserError):
        load_weights(ResNet(18, width=0.25), path)
    assert not marker.exists()


def test_damaged_cam_is_recomputed_when_its_stage_reruns(cam_run, tmp_path):
    """A truncated .npz (full disk) in a complete stage is detected and recomputed, never read as valid."""
    import wsseg.stages.make_cam as make_cam

    run = tmp_path / "run"
    shutil.copytree(cam_run.run.dir, run)
    config = tiny_config(cam_run.data.root, run)
    victim = artifacts.image_ids(config, "data.label_list")[1]
    path = run / "cams" / f"{victim}.npz"
    path.write_bytes(path.read_bytes()[:100])
    assert artifacts.read_cams(path) is None  # readers never trust it
    assert make_cam.damaged(config, RunStore(run)) == [victim]
    pipeline.run_stage(make_cam.STAGE, config)  # the complete stage notices and recomputes that one file
    assert artifacts.read_cams(path) is not None


# ---------------------------------------------------------------------------- bad data

def _copy_dataset(tiny_data, tmp_path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    return data


def _first_train_id(data: Path) -> str:
    return (data / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_bad_image_is_one_line_naming_the_file(tiny_data, tmp_path, damage):
    data = _copy_dataset(tiny_data, tmp_path)
    image = data / "JPEGImages" / f"{_first_train_id(data)}.jpg"
    image.write_bytes(b"" if damage == "empty" else image.read_bytes()[:200])
    result = wsseg("train-cam", "--config", ROOT / "pipelines" / "demo.yaml", *cli_overrides(data, tmp_path / "run", "cam.epochs=1"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len([l for l in lines if l.startswith("wsseg: error:")]) == 1
    assert image.name in lines[-1] and ("empty" in lines[-1] or "cannot decode" in lines[-1])


def test_skip_mode_leaves_bad_images_out_and_reports_them(cam_run, tiny_data, tmp_path):
    import wsseg.stages.make_cam as make_cam

    data = _copy_dataset(tiny_data, tmp_path)
    victim = _first_train_id(data)
    (data / "JPEGImages" / f"{victim}.jpg").write_bytes(b"")
    run = tmp_path / "run"
    shutil.copytree(RunStore(cam_run.run.dir).folder("cam"), run / "cam")
    config = tiny_config(data, run, "data.on_bad_image=skip")
    with pytest.raises(UserError):  # the copied record belongs to another dataset root: make it current first
        pipeline.run_stage(make_cam.STAGE, config)
    import wsseg.stages.train_cam as train_cam

    record = RunStore(run).record("cam")
    record["fingerprint"] = pipeline.fingerprint(train_cam.STAGE, config)
    record["inputs"] = pipeline.stage_inputs(train_cam.STAGE, config)
    RunStore(run).write_record("cam", record)
    pipeline.run_stage(make_cam.STAGE, config)
    report = (run / "cams" / "skipped.json").read_text()
    assert victim in report and "empty" in report
    assert not (run / "cams" / f"{victim}.npz").exists()
    others = [i for i in artifacts.image_ids(config, "data.label_list") if i != victim]
    assert all((run / "cams" / f"{i}.npz").exists() for i in others)


def test_unknown_tag_missing_image_and_no_tags_are_clear(tiny_data, tmp_path):
    data = _copy_dataset(tiny_data, tmp_path)
    first = _first_train_id(data)
    xml = data / "Annotations" / f"{first}.xml"
    text = xml.read_text()
    name = text.split("<name>")[1].split("</name>")[0]
    xml.write_text(text.replace(f"<name>{name}</name>", "<name>unicorn</name>", 1))
    result = wsseg("train-cam", "--config", ROOT / "pipelines" / "demo.yaml", *cli_overrides(data, tmp_path / "run", "cam.epochs=1"))
    assert result.returncode == 2
    assert "unicorn" in result.stderr and "data.classes" in result.stderr and xml.name in result.stderr

    data2 = _copy_dataset(tiny_data, tmp_path / "b")
    listing = data2 / "ImageSets" / "Segmentation" / "train.txt"
    listing.write_text(listing.read_text() + "2026_999999\n")
    result = wsseg("train-cam", "--config", ROOT / "pipelines" / "demo.yaml", *cli_overrides(data2, tmp_path / "run2", "cam.epochs=1"))
    assert result.returncode == 2 and "2026_999999" in result.stderr


def test_a_camera_sized_image_beyond_pils_limit_is_one_sentence(tiny_data, tmp_path):
    """A 20000 x 15000 photo in the list: PIL refuses it before decoding (DecompressionBombError, which
    is not an OSError); train-cam must say which file and what to do, in one line, exit 2."""
    data = _copy_dataset(tiny_data, tmp_path)
    first = _first_train_id(data)
    Image.new("1", (20000, 15000)).save(data / "JPEGImages" / f"{first}.jpg", format="PNG")  # 300 MP, a 40 kB file
    result = wsseg("train-cam", "--config", ROOT / "pipelines" / "demo.yaml", *cli_overrides(data, tmp_path / "run", "cam.epochs=1"))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("wsseg: error:")]
    assert len(errors) == 1, result.stderr
    assert f"{first}.jpg: the image has 300 million pixels, more than PIL opens" in errors[0]
    assert "downscale it" in errors[0]


def test_grayscale_cmyk_and_rgba_images_are_converted(tmp_path):
    rgb = (np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    for mode in ("L", "CMYK", "RGBA", "P"):
        path = tmp_path / f"x_{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
        Image.fromarray(rgb).convert(mode).save(path)
        image = read_image(path)
        assert image.shape == (4, 4, 3) and image.dtype == np.uint8


KILL_STAGE_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from tiny import tiny_config
from wsseg import pipeline
from wsseg.checkpoints import load_checkpoint
import importlib
stage = importlib.import_module("wsseg.stages.{module}").STAGE
pipeline.run_stage(stage, tiny_config({data!r}, {run!r}, *{extra!r}), force=True)
"""

# stage module, the file whose appearance means "killed mid-run", files compared after the resume
KILL_CASES = {
    "mine_relations": ("relations/*.png", "relations/*.png"),
    "train_irn": ("irn/checkpoint.pt", "irn/model.pt"),
    "synthesize_labels": ("labels/semantic/*.png", "labels/semantic/*.png"),
    "train_segmenter": ("segmenter/deeplab-v2/pseudo/checkpoint.pt", "segmenter/deeplab-v2/pseudo/model.pt"),
}


@pytest.mark.parametrize("module", list(KILL_CASES))
def test_every_stage_killed_mid_run_resumes_to_the_uninterrupted_result(labels_run, tmp_path, module):
    """kill -9 a stage right after its first output is written; the rerun resumes and ends with the same files."""
    import importlib

    stage = importlib.import_module(f"wsseg.stages.{module}").STAGE
    trigger, compared = KILL_CASES[module]
    extra = ["segmenter.iterations=40", "segmenter.eval_mode=single"] if module == "train_segmenter" else []
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(labels_run.run.dir, reference)
    shutil.copytree(labels_run.run.dir, killed)
    pipeline.run_stage(stage, tiny_config(labels_run.data.root, reference, *extra), force=True)

    code = KILL_STAGE_SCRIPT.format(tests=str(ROOT / "tests" / "stages"), module=module, data=str(labels_run.data.root),
                                    run=str(killed), extra=extra)
    kill_when_written(code, tmp_path, str(killed / trigger))  # right after its first output (or checkpoint)
    config = tiny_config(labels_run.data.root, killed, *extra)
    record = RunStore(killed).record(stage.record_folder(config))
    assert record is not None and record["status"] == "running"  # it really was interrupted
    pipeline.run_stage(stage, config)
    done = RunStore(killed).record(stage.record_folder(config))
    assert done["status"] == "complete"
    # the time spent in both processes: the killed one's up to its last file, then the resumed one's
    assert len(done["runs"]) == 2 and done["runs"][0]["interrupted"] and done["runs"][0]["seconds"] > 0
    assert done["seconds"] == pytest.approx(sum(run["seconds"] for run in done["runs"]), abs=0.02)
    status = pipeline.format_status(pipeline.status(config))
    assert " runs)" in next(line for line in status.splitlines() if line.startswith(stage.name + " "))
    expected = sorted(p.relative_to(reference) for p in reference.glob(compared))
    assert expected and sorted(p.relative_to(killed) for p in killed.glob(compared)) == expected
    for relative in expected:
        if relative.suffix == ".pt":
            ours = torch.load(killed / relative, weights_only=True)["model"]
            theirs = torch.load(reference / relative, weights_only=True)["model"]
            assert all(torch.equal(ours[k], theirs[k]) for k in theirs), relative
        else:
            assert (killed / relative).read_bytes() == (reference / relative).read_bytes(), relative
    assert not list(killed.rglob(".tmp-*"))
