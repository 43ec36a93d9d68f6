"""Settings for a tiny real pipeline run shared by the stage tests: demo data of 32 images at 64 px,
a ResNet-18 at a quarter width, real training steps, real CRF, real files."""

from pathlib import Path

from wsseg.config import load_config

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "run.workers=0", "run.device=cpu",
    "cam.epochs=8", "cam.batch_size=8", "cam.crop=64", "cam.resize_long=[56,80]", "cam.scales=[1.0,0.5]",
    "irn.epochs=3", "irn.batch_size=8", "irn.crop=64", "irn.radius=4",
    "labels.pad_to=64", "labels.radius=4",
    "segmenter.crop=64", "segmenter.batch_size=4", "segmenter.iterations=20", "segmenter.model=deeplab-v2",
    "segmenter.test_scales=[0.75,1.0]",
]


def tiny_config(data: Path, run: Path, *extra: str):
    return load_config([ROOT / "pipelines" / "demo.yaml"], [f"data.root={data}", f"run.dir={run}", *TINY, *extra])


