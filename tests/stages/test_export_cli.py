"""`wsseg export` through the command line, every format, read back by the tools they are for."""

import subprocess
import sys

import pytest

from tiny import ROOT, TINY


@pytest.mark.parametrize("fmt", ["coco-instances", "coco-panoptic", "voc"])
def test_export_command(labels_run, tmp_path, fmt):
    out = tmp_path / fmt
    overrides = sum((["--set", s] for s in [f"data.root={labels_run.data.root}", f"run.dir={labels_run.run.dir}", *TINY]), [])
    result = subprocess.run([sys.executable, "-m", "wsseg.cli", "export", "--config", str(ROOT / "pipelines" / "demo.yaml"),
                             *overrides, "--format", fmt, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    if fmt == "coco-instances":
        from pycocotools.coco import COCO

        coco = COCO(str(out / "instances.json"))
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(labels_run.data.classes)
        assert min(coco.getCatIds()) == 1
    elif fmt == "coco-panoptic":
        assert (out / "panoptic.json").exists() and any((out / "panoptic").glob("*.png"))
    else:
        from wsseg.data.voc import VOCDataset

        exported = VOCDataset(out, labels_run.data.classes)
        first = (out / "ImageSets" / "Segmentation").glob("*.txt").__next__().read_text().split()[0]
        assert exported.read_semantic(first).ndim == 2
