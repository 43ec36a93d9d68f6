"""The files the stages exchange (docs/DESIGN.md's artifact table), read and written in one place.

Writers go through `atomic_path`, so a file that exists is whole. Readers of per-image
artifacts return None for a damaged file (truncated by a full disk, say), so the stage
that owns it recomputes it instead of trusting it. Also: opening the dataset and its
image lists from the config, and building networks from files other stages wrote.
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from pathlib import Path

import numpy as np

from wsseg.config import Config
from wsseg.data.images import read_label_png, write_label_png
from wsseg.data.coco import CocoDataset
from wsseg.data.folder import FolderDataset
from wsseg.data.reader import Downscaled
from wsseg.data.voc import VOCDataset, read_id_list
from wsseg.errors import UserError
from wsseg.store import RunStore, atomic_path, read_json

# ---------------------------------------------------------------------------- dataset


def open_dataset(config: Config) -> VOCDataset | FolderDataset | CocoDataset | Downscaled:
    """The dataset reader of `data.format` (each format one module with the same interface), its images
    brought down to `data.max_side` on read when that is set."""
    dataset = _open_layout(config)
    return Downscaled(dataset, config.data.max_side) if config.data.max_side > 0 else dataset


def _open_layout(config: Config) -> VOCDataset | FolderDataset | CocoDataset:
    if config.data.format == "folder":
        return FolderDataset(config.data.root, config.data.classes, depth_dir=config.data.depth_dir)
    if config.data.format == "coco":
        return CocoDataset(config.data.root, config.data.classes, depth_dir=config.data.depth_dir)
    return VOCDataset(config.data.root, config.data.classes, cls_labels=config.data.cls_labels, label_dirs=config.data.label_dirs,
                      depth_dir=config.data.depth_dir)


def read_list(config: Config, key: str) -> list[str]:
    """The ids of one `data.*_list` key in the dataset's format."""
    if config.data.format in ("folder", "coco"):
        return open_dataset(config).read_list(config.get(key), key)
    return read_id_list(Path(config.data.root), config.get(key), key=key)


def require_dataset_root(config: Config) -> Path:
    root = Path(config.data.root)
    if not root.is_dir():
        raise UserError(f"data.root: {root} does not exist; point it at the dataset folder (the one with JPEGImages/), "
                        f"or run `wsseg demo-data` for the demo")
    return root


def image_ids(config: Config, *keys: str) -> list[str]:
    """The ids of one or more `data.*_list` keys, in order, without duplicates."""
    require_dataset_root(config)
    seen: dict[str, None] = {}
    for key in keys:
        for image_id in read_list(config, key):
            seen.setdefault(image_id, None)
    return list(seen)


_SAID: set[str] = set()  # the ground-truth notes already given in this process


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        logging.getLogger("wsseg").warning("%s", message)


def ids_with_ground_truth(dataset: VOCDataset | FolderDataset, ids: list[str]) -> list[str]:
    """The ids that have a ground-truth mask; says once, in one line, how many do not (and, when none
    does, that the evaluations are skipped: data without masks runs every stage all the same)."""
    kept = [i for i in ids if dataset.has_semantic(i)]
    folders = ", ".join(dataset.label_dirs)
    if ids and not kept:
        _say_once(f"no ground-truth masks in {folders} under {dataset.root}: evaluations against ground truth are "
                  f"skipped (quality shows as -)")
    elif len(kept) < len(ids):
        missing = next(i for i in ids if i not in set(kept))
        _say_once(f"{len(ids) - len(kept)} of {len(ids)} images have no ground-truth mask (e.g. {missing}.png, looked in "
                  f"{folders}); they are left out of the evaluation")
    return kept


def has_any_ground_truth(dataset: VOCDataset | FolderDataset, ids: list[str]) -> bool:
    return any(dataset.has_semantic(i) for i in ids)


# ---------------------------------------------------------------------------- CAMs


def cam_path(store: RunStore, image_id: str, folder: str = "cams") -> Path:
    return store.folder(folder) / f"{image_id}.npz"


def seed_folder(config: Config) -> str:
    """Where the seeds that mine-relations, synthesize-labels and calibrate read lie: make-cam's
    CAMs, or with cam.amn the AMN maps make-amn-cam writes in the same format."""
    return "amn_cams" if config.cam.amn else "cams"


def seed_path(config: Config, store: RunStore, image_id: str) -> Path:
    return cam_path(store, image_id, seed_folder(config))


def write_cams(path: Path, keys: np.ndarray, cam: np.ndarray, high_res: np.ndarray, plain: np.ndarray | None = None) -> None:
    """`keys` (K,) int64 0-based classes; `cam` (K, ceil(H/4), ceil(W/4)); `high_res` (K, H, W); stored float16.
    `plain` (K, H, W), with a CAM method on (cam.dilations, cam.advcam): the plain CAM, for inspect to compare."""
    arrays = {"keys": np.asarray(keys, np.int64), "cam": np.asarray(cam, np.float16),
              "high_res": np.asarray(high_res, np.float16)}
    if plain is not None:
        arrays["plain"] = np.asarray(plain, np.float16)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)


def read_cams(path: Path) -> dict[str, np.ndarray] | None:
    """{"keys", "cam", "high_res"} (and "plain" when written) as int64/float32, or None if missing or damaged."""
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {name: data[name].astype(np.int64 if name == "keys" else np.float32)
                   for name in ("keys", "cam", "high_res", "plain") if name in data.files or name != "plain"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if any(out[name].shape[0] != out["keys"].shape[0] for name in out):
        return None
    return out


def is_whole(path: Path, *, thorough: bool = False) -> bool:
    """Whether a file a stage wrote reads back whole (.npz, .png or .json).

    The quick check catches truncation and corruption without decoding: the zip directory
    at the end of an .npz, the chunk structure and CRCs of a PNG. `thorough` decompresses
    every .npz member and decodes a PNG: per-image stages use it on the files they resume
    from; the quick one serves the look over every file of a finished stage.
    """
    from PIL import Image

    try:
        if path.suffix == ".npz":
            with zipfile.ZipFile(path) as archive:
                return archive.testzip() is None if thorough else bool(archive.namelist())
        if path.suffix == ".png":
            with Image.open(path) as image:
                if thorough:
                    image.load()
                else:
                    image.verify()
            return True
    except Exception:  # noqa: BLE001 - zipfile and PIL raise many types for damaged files
        return False
    if path.suffix == ".json":
        return read_json(path) is not None
    raise ValueError(f"{path}: no wholeness check for {path.suffix} files")


# ---------------------------------------------------------------------------- label maps


def write_labels(path: Path, labels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        write_label_png(tmp, labels.astype(np.uint8))


class RunLabels:
    """label_reader for LabelledImages: an image's label map from RUN/<folder>/<id>.png, written
    by `stage` (picklable, for data-loader workers). A missing or damaged map is a UserError
    naming the stage to rerun."""

    def __init__(self, run_dir: str | Path, folder: str, stage: str):
        self.run_dir, self.folder, self.stage = str(run_dir), folder, stage

    def __call__(self, image_id: str) -> np.ndarray:
        labels = read_labels(RunStore(self.run_dir).folder(self.folder) / f"{image_id}.png")
        if labels is None:
            raise UserError(f"{self.folder}/{image_id}.png is missing or damaged; rerun {self.stage}")
        return labels


def read_labels(path: Path) -> np.ndarray | None:
    """A palette-PNG label map written by a stage, or None if missing or damaged."""
    try:
        return read_label_png(path)
    except UserError:
        return None


def encode_npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def read_panoptic(folder: Path, image_id: str) -> tuple[np.ndarray, dict[int, int]] | None:
    """A COCO-panoptic label, `<folder>/<id>.png` (id = R + 256·G + 256²·B) with `<id>.json`
    (segments_info), as (segment ids (H, W) int64, {segment id: category}); None if either
    file is missing or damaged."""
    from PIL import Image

    from wsseg.ops.panoptic import decode_ids

    try:
        with Image.open(folder / f"{image_id}.png") as image:
            segments = decode_ids(np.asarray(image.convert("RGB")))
        info = json.loads((folder / f"{image_id}.json").read_text())["segments_info"]
        return segments, {int(s["id"]): int(s["category_id"]) for s in info}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def warn_damaged(what: str, missing: list[str], total: int, stage: str) -> None:
    """One line for the images an evaluation had to leave out because their files do not read back."""
    if missing:
        logging.getLogger("wsseg").warning(
            "%d of %d %s are missing or damaged (e.g. %s); they are left out of this evaluation; "
            "`wsseg %s` recomputes them", len(missing), total, what, missing[0], stage)
