"""Session fixtures: the tiny pipeline run (see tiny.py) shared by the stage tests."""

from pathlib import Path

import pytest

from tiny import DATA_SEED, NUM_IMAGES, tiny_config
from wsseg.data.demo import generate_demo


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    generate_demo(out, num_images=NUM_IMAGES, seed=DATA_SEED, size=64)
    return out


@pytest.fixture(scope="session")
def cam_run(tiny_data, tmp_path_factory):
    """train-cam + make-cam done; returns the config."""
    from wsseg import pipeline

    config = tiny_config(tiny_data, tmp_path_factory.mktemp("run") / "run")
    pipeline.run_all(config, stop="make-cam")
    return config


@pytest.fixture(scope="session")
def labels_run(cam_run):
    """... + mine-relations, train-irn, synthesize-labels."""
    from wsseg import pipeline

    pipeline.run_all(cam_run, stop="synthesize-labels")
    return cam_run
