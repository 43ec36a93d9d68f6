"""Settings for a tiny real pipeline run shared by the stage tests: demo data of 64 images at 64 px,
a ResNet-18 at a quarter width, real training steps, real CRF, real files.

Small, but large enough to learn: every stage's test holds its output to a quality floor
that a broken stage (all background, an untrained head, misaligned labels) cannot reach.
The floors were set from runs on demo data of seeds 3, 4, 5, 6 and 8 (the fixture uses 3):
each sits below the lowest of the five by a margin, and above what the same pipeline
reached with 8 CAM and 3 IRN epochs on 32 images, where nothing beat the baselines.
"""

from pathlib import Path

import numpy as np

from wsseg.config import load_config
from wsseg.metrics import ConfusionMatrix
from wsseg.stages import artifacts

ROOT = Path(__file__).resolve().parents[2]
NUM_IMAGES = 64
DATA_SEED = 3

TINY = [
    "run.workers=0", "run.device=cpu",
    # the plain CAM path and IRN's background rule, on which the floors below were set; AMN (the
    # demo's seeds) has its own test on this run (test_cam_stages.py), the minimum background
    # share its own in test_label_rules.py
    "cam.amn=false", "labels.min_background=0.0",
    "cam.epochs=20", "cam.batch_size=8", "cam.crop=64", "cam.resize_long=[56,80]", "cam.scales=[1.0,0.5]",
    "irn.epochs=8", "irn.batch_size=8", "irn.crop=64", "irn.radius=4",
    "labels.pad_to=64", "labels.radius=4",
    "segmenter.crop=64", "segmenter.batch_size=4", "segmenter.iterations=20", "segmenter.model=deeplab-v2",
    "segmenter.test_scales=[0.75,1.0]",
]


def tiny_config(data: Path, run: Path, *extra: str):
    return load_config([ROOT / "pipelines" / "demo.yaml"], [f"data.root={data}", f"run.dir={run}", *TINY, *extra])


def miou_against_truth(config, list_key: str, labels_of) -> float:
    """mIoU of `labels_of(image_id)` ((H, W) class ids) on the images of `list_key` with ground truth."""
    dataset = artifacts.open_dataset(config)
    matrix = ConfusionMatrix(len(config.data.classes) + 1)
    for image_id in artifacts.ids_with_ground_truth(dataset, artifacts.image_ids(config, list_key)):
        truth = dataset.read_semantic(image_id)
        matrix.update(labels_of(image_id, truth), truth)
    return matrix.summary()["miou"]


def all_background_miou(config, list_key: str) -> float:
    """The baseline every stage's labels must beat: background everywhere."""
    return miou_against_truth(config, list_key, lambda image_id, truth: np.zeros_like(truth))
