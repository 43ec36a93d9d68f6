"""A new domain: a folder of tagged images without any mask. Every stage runs to done; the
evaluations say once that there is no ground truth and skip; calibrate refuses in one line."""

import shutil
import subprocess
import sys

from wsseg.data.demo import generate_demo

from tiny import ROOT

SMALL = ["run.workers=0", "cam.epochs=2", "cam.batch_size=8", "cam.crop=64", "cam.resize_long=[56,80]", "cam.scales=[1.0]",
         "amn.epochs=1", "irn.epochs=1", "irn.batch_size=8", "irn.crop=64", "irn.radius=4", "labels.pad_to=64",
         "labels.radius=4", "segmenter.crop=64", "segmenter.batch_size=4", "segmenter.iterations=4"]


def wsseg(*args):
    return subprocess.run([sys.executable, "-c", "from wsseg.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)


def test_a_folder_without_masks_runs_every_stage(tmp_path):
    data = tmp_path / "data"
    generate_demo(data, num_images=48, seed=3, size=64, layout="folder")
    shutil.rmtree(data / "masks")
    shutil.rmtree(data / "instances")
    config = ["--config", ROOT / "pipelines" / "demo.yaml", "--config", data / "config.yaml",
              "--set", f"run.dir={tmp_path / 'run'}", *sum((["--set", s] for s in SMALL), [])]
    result = wsseg("run-all", *config)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "no ground-truth masks" in line]
    assert len(notes) == 1, result.stderr
    assert "evaluations against ground truth are skipped" in notes[0]
    status = wsseg("status", *config)
    states = [line.split()[1] for line in status.stdout.splitlines()[2:] if line.strip()]
    assert states and set(states) == {"done"}, status.stdout
    report = wsseg("report", *config).stdout
    assert "semantic mIoU -, instance AP50 -, PQ -" in report
    # segmenter.labels: both trained the pseudo labels alone: there is no ground truth to train on
    assert (tmp_path / "run" / "segmenter" / "deeplab-v2" / "pseudo" / "model.pt").is_file()
    assert not (tmp_path / "run" / "segmenter" / "deeplab-v2" / "gt").exists()
    refused = wsseg("calibrate", *config)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("wsseg: error:")]
    assert refused.returncode == 2 and len(errors) == 1 and "calibrate needs ground-truth masks" in errors[0]
