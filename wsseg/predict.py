"""`wsseg predict`: label a folder of new images with a trained segmenter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wsseg import viz
from wsseg.config import Config
from wsseg.data.images import read_depth_png, read_image
from wsseg.data.reader import scaled_size
from wsseg.data.transforms import resize_image, resize_labels
from wsseg.errors import UserError
from wsseg.models.segmenters.inference import predict_labels
from wsseg.stages import artifacts
from wsseg.stages.train_segmenter import folder_of, load_network, needs_depth
from wsseg.store import RunStore, atomic_path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def predict_folder(config: Config, images: Path, out: Path, *, source: str, mode: str, overlay: bool,
                   device: torch.device, progress=None, depth: Path | None = None) -> dict[str, str]:
    """Write <out>/<stem>.png for every image in `images`; returns {file name: reason} for those that failed.

    An RGB-D model (ACNet) also reads `depth`/<stem>.png, the image's 16-bit depth map (as data.depth_dir's);
    an RGB model ignores `depth`."""
    if not images.is_dir():
        raise UserError(f"--images: {images} is not a folder")
    if needs_depth(config) and depth is None:
        raise UserError(f"segmenter.model: {config.segmenter.model} needs depth images; pass --depth DIR, a folder with "
                        f"one 16-bit <name>.png per image (larger = farther, 0 = no reading)")
    if needs_depth(config) and not depth.is_dir():
        raise UserError(f"--depth: {depth} is not a folder")
    store = RunStore(Path(config.run.dir))
    if not (folder_of(store, config, source) / "model.pt").exists():
        raise UserError(f"no trained {config.segmenter.model} on {source} labels in {config.run.dir}; "
                        f"run `wsseg train-segmenter` first (or pass --model / --labels)")
    model = load_network(config, store, source).to(device)
    files = sorted(p for p in images.iterdir() if p.is_file() and not p.name.startswith("."))
    out.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    for path in (progress(files, desc="predict") if progress else files):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            failed[path.name] = "not an image file (by its extension)"
            continue
        try:
            image = read_image(path)
        except UserError as error:
            failed[path.name] = str(error).split(": ", 1)[-1]
            continue
        try:
            depth_map = read_depth_png(depth / f"{path.stem}.png") if needs_depth(config) else None
        except UserError as error:  # names the depth file
            failed[path.name] = str(error)
            continue
        if depth_map is not None and depth_map.shape != image.shape[:2]:
            failed[path.name] = (f"its depth map {depth / f'{path.stem}.png'} is {depth_map.shape[1]}x{depth_map.shape[0]}, "
                                 f"the image {image.shape[1]}x{image.shape[0]}")
            continue
        labels = _predict(model, config, image, depth_map, device=device, mode=mode)
        artifacts.write_labels(out / f"{path.stem}.png", labels)
        if overlay:
            picture = viz.overlay(image, viz.label_colors(labels), 0.6, mask=labels > 0)
            with atomic_path(out / f"{path.stem}_overlay.png") as tmp:
                viz.save_png(tmp, np.asarray(picture))
    return failed


def _predict(model, config: Config, image: np.ndarray, depth_map: np.ndarray | None, *, device: torch.device,
             mode: str) -> np.ndarray:
    """The label map of one image at the file's size. A run that read its images at `data.max_side`
    trained its model at that size, so the image (and its depth) is brought down to it the same way
    the readers do, and the labels go back up to the file's size (nearest)."""
    size = image.shape[:2]
    small = scaled_size(size, config.data.max_side) if config.data.max_side > 0 else size
    if small != size:
        image = resize_image(image, small, "bicubic")
        depth_map = None if depth_map is None else resize_labels(depth_map, small)
    labels, _ = predict_labels(model, image, device=device, mode=mode, scales=config.segmenter.test_scales,
                               window=config.segmenter.window or None, depth=depth_map)
    return labels if small == size else resize_labels(labels, size)
