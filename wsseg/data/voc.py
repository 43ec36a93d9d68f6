"""A reader for datasets in the PASCAL VOC 2012 devkit layout (plus SBD's augmented labels).

```
<root>/JPEGImages/<id>.jpg                 images
<root>/Annotations/<id>.xml                object names -> image tags (or IRN's cls_labels.npy)
<root>/ImageSets/Segmentation/<name>.txt   image lists (train, val, train_aug, ...)
<root>/SegmentationClass/<id>.png          semantic labels, palette PNG (VOC)
<root>/SegmentationClassAug/<id>.png       semantic labels, grayscale PNG (SBD, "train_aug")
<root>/SegmentationObject/<id>.png         instance indices, palette PNG (VOC)
<root>/<depth_dir>/<id>.png                depth maps, 16-bit PNG (optional: RGB-D segmenters; data.depth_dir)
```

Any dataset in this layout works: the class list comes from the caller (config
`data.classes`). Class ids: 0 background, 1..C foreground in `classes` order, 255 void.
Tags are 0-based foreground ids (tag k is label k + 1). Image ids are strings and are
never parsed as numbers, except to decode the int keys of IRN's cls_labels.npy.
"""

from __future__ import annotations

import os
import pickle
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsseg.data.images import IMAGE_SUFFIXES, read_image, read_label_png
from wsseg.data.reader import VOID_INSTANCE, DepthMaps, header_size  # VOID_INSTANCE: VOC's 255 outlines in instance maps
from wsseg.errors import UserError

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle",
    "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


# Where the lists that VOC 2012 itself does not ship come from.
_LIST_ORIGINS = {
    "train_aug": (
        "train_aug (10,582 ids) is not part of VOC 2012: it comes with SBD's augmented labels; "
        "copy IRN's voc12/train_aug.txt there, or point the key at the file"
    ),
}


def _check_id(image_id: str, list_path: Path, line_number: int) -> None:
    for bad in ("/", "\\", "..", "\x00"):
        if bad in image_id:
            raise UserError(
                f"{list_path}:{line_number}: image id {image_id!r} contains {bad!r}; an id names a file "
                f"inside the dataset folder (e.g. 2007_000032), fix the list"
            )


def read_id_list(root: Path, name_or_path: str, key: str = "data.<list>") -> list[str]:
    """The image ids of a list file, in file order.

    `name_or_path` is a list name (`train` -> `<root>/ImageSets/Segmentation/train.txt`) or a
    path to a file, absolute or relative to `root`. Each line's first whitespace-separated
    token is an id (VOC's ImageSets/Main lists carry a second column); blank lines and
    lines starting with `#` are skipped. `key` is the config key that named the list, for
    error messages.
    """
    root = Path(root)
    text = str(name_or_path)
    is_name = not any(sep in text for sep in ("/", "\\")) and not text.endswith(".txt")
    if is_name:
        path = root / "ImageSets" / "Segmentation" / f"{text}.txt"
    else:
        path = Path(text) if Path(text).is_absolute() else root / text
    if not path.is_file():
        hint = _LIST_ORIGINS.get(text, "give a list name under ImageSets/Segmentation or a path to a list file")
        raise UserError(f"{key}: image list {path} not found; {hint}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{key}: cannot read image list {path} ({error}); it must be a UTF-8 text file, one id a line") from None
    ids = []
    for line_number, line in enumerate(lines, start=1):
        tokens = line.split()
        if not tokens or tokens[0].startswith("#"):
            continue
        _check_id(tokens[0], path, line_number)
        ids.append(tokens[0])
    if not ids:
        raise UserError(f"{key}: image list {path} has no image ids; write one id a line")
    return ids


def _decode_cls_key(key: object) -> str:
    """IRN's cls_labels.npy key -> image id: 2007000032 -> '2007_000032'; strings pass through."""
    if isinstance(key, (int, np.integer)):
        digits = str(int(key))
        return digits[:4] + "_" + digits[4:]
    return str(key)


# Globals a pickled dict of numpy arrays needs; anything else in a cls_labels.npy is refused,
# so a crafted cls_labels.npy cannot run code (np.load with pickles allowed would run it).
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only numpy arrays are allowed)")
        return super().find_class(module, name)


def load_pickled_npy(path: Path):
    """The object stored in a .npy holding a pickled object (IRN's cls_labels.npy), numpy types only."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
        if not dtype.hasobject:
            handle.seek(0)
            return np.load(handle, allow_pickle=False)
        array = _NumpyOnlyUnpickler(handle).load()
    return array.item() if getattr(array, "shape", None) == () else array


class VOCDataset(DepthMaps):
    """Read images, tags, semantic and instance labels of a VOC-layout dataset.

    A plain reader (not a torch Dataset): the torch datasets in `wsseg.data.datasets`
    wrap it. `classes` are the foreground names in label order; `cls_labels` is an
    optional IRN cls_labels.npy (absolute or relative to `root`) that replaces the XML
    annotations as the source of tags; `label_dirs` are the semantic label folders in
    priority order; `depth_dir` is the optional folder of depth maps (absolute or relative to
    `root`; config `data.depth_dir`), read only by `read_depth`.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Sequence[str] = VOC_CLASSES,
        *,
        cls_labels: str | None = None,
        label_dirs: Sequence[str] = ("SegmentationClass", "SegmentationClassAug"),
        depth_dir: str | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"data.root: dataset folder {self.root} not found; point data.root at a VOC-layout folder")
        if not (self.root / "JPEGImages").is_dir():
            raise UserError(
                f"data.root: {self.root} has no JPEGImages/ folder; point data.root at the folder that holds "
                f"JPEGImages/, Annotations/ and ImageSets/ (VOC: .../VOCdevkit/VOC2012)"
            )
        self.classes = tuple(str(name) for name in classes)
        if not self.classes:
            raise UserError("data.classes: the class list is empty; list the foreground class names")
        if len(set(self.classes)) != len(self.classes):
            raise UserError(f"data.classes: class names repeat in {list(self.classes)}; each name must appear once")
        self.num_classes = len(self.classes)
        self.label_dirs = tuple(label_dirs)
        self._class_index = {name: index for index, name in enumerate(self.classes)}
        self._tags: dict[str, np.ndarray] = {}
        self._cls_labels_path: Path | None = None
        self._cls_labels: dict[str, np.ndarray] | None = None
        if cls_labels is not None:
            self._cls_labels_path = Path(cls_labels) if Path(cls_labels).is_absolute() else self.root / cls_labels
            self._cls_labels = self._load_cls_labels(self._cls_labels_path)
        self.set_depth_dir(depth_dir)

    # ---- images

    def image_path(self, image_id: str) -> Path:
        """JPEGImages/<id>.jpg, VOC's own; a devkit made from PNG (or other) images, such as `wsseg export
        --format voc` of a folder dataset, keeps each image's own suffix, found when no .jpg is there."""
        path = self.root / "JPEGImages" / f"{image_id}.jpg"
        found = (path.with_suffix(suffix) for suffix in IMAGE_SUFFIXES)  # .jpg first
        return next((p for p in found if p.exists()), path)  # else the reader's error names VOC's file

    def read_image(self, image_id: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        return read_image(self.image_path(image_id))

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) from the file header, without decoding the pixels."""
        return header_size(self.image_path(image_id), "check data.root and the image list")

    # ---- tags

    def _load_cls_labels(self, path: Path) -> dict[str, np.ndarray]:
        if not path.is_file():
            raise UserError(
                f"data.cls_labels: {path} not found; give IRN's cls_labels.npy or leave the key empty to read Annotations/"
            )
        try:
            table = load_pickled_npy(path)  # IRN's cls_labels.npy: a pickled dict, read with numpy types only
        except Exception as error:  # any unpickling/format error is the file's fault
            raise UserError(
                f"data.cls_labels: cannot read {path} ({error}); it must be a .npy holding a dict id -> (C,) 0/1 vector"
            ) from None
        if not isinstance(table, dict):
            raise UserError(f"data.cls_labels: {path} holds a {type(table).__name__}, not a dict id -> (C,) 0/1 vector")
        decoded = {}
        for key, vector in table.items():
            vector = np.asarray(vector).reshape(-1)
            if vector.shape[0] != self.num_classes:
                raise UserError(
                    f"data.cls_labels: {path} has {vector.shape[0]} classes for id {key!r} but data.classes lists "
                    f"{self.num_classes}; make data.classes match the file"
                )
            decoded[_decode_cls_key(key)] = vector
        return decoded

    def tags(self, image_id: str) -> np.ndarray:
        """Sorted unique 0-based foreground ids present in the image, int64 (K,), K >= 1."""
        cached = self._tags.get(image_id)
        if cached is None:
            cached = self._tags_from_cls_labels(image_id) if self._cls_labels is not None else self._tags_from_xml(image_id)
            self._tags[image_id] = cached
        return cached.copy()

    def _tags_from_cls_labels(self, image_id: str) -> np.ndarray:
        vector = self._cls_labels.get(image_id)
        if vector is None:
            raise UserError(f"{self._cls_labels_path}: no tags for image {image_id}; add it to the file or remove it from the list")
        tags = np.flatnonzero(vector > 0).astype(np.int64)
        if tags.size == 0:
            raise UserError(f"{self._cls_labels_path}: image {image_id} has no tags; every training image needs at least one class")
        return tags

    def _tags_from_xml(self, image_id: str) -> np.ndarray:
        path = self.root / "Annotations" / f"{image_id}.xml"
        if not path.is_file():
            raise UserError(f"{path}: annotation not found; add it, or give tags in a cls_labels.npy (data.cls_labels)")
        try:
            tree = ElementTree.parse(path)
        except (ElementTree.ParseError, OSError) as error:
            raise UserError(f"{path}: cannot parse the XML ({error}); fix or replace the file") from None
        found = set()
        # Only <object><name>: person layouts also carry <part><name>head</name></part>.
        for element in tree.getroot().iter("object"):
            name = (element.findtext("name") or "").strip()
            if name not in self._class_index:
                raise UserError(
                    f"{path}: object tag {name!r} is not a known class; add it to data.classes or fix the file"
                )
            found.add(self._class_index[name])
        if not found:
            raise UserError(f"{path}: no <object> tags; every training image needs at least one class")
        return np.array(sorted(found), dtype=np.int64)

    # ---- semantic labels

    def _semantic_path(self, image_id: str) -> Path | None:
        for folder in self.label_dirs:
            path = self.root / folder / f"{image_id}.png"
            if path.is_file():
                return path
        return None

    def has_semantic(self, image_id: str) -> bool:
        return self._semantic_path(image_id) is not None

    def read_semantic(self, image_id: str) -> np.ndarray:
        """(H, W) uint8: 0 background, 1..C classes, 255 void; from the first of `label_dirs` that has it."""
        path = self._semantic_path(image_id)
        if path is None:
            raise UserError(
                f"no semantic label for image {image_id} in {', '.join(self.label_dirs)} under {self.root}; "
                f"add <id>.png there or use a list of labelled images"
            )
        labels = read_label_png(path)
        bad = labels[(labels > self.num_classes) & (labels != 255)]
        if bad.size:
            raise UserError(
                f"{path}: label {int(bad[0])} is beyond the {self.num_classes} classes of data.classes; "
                f"fix data.classes or the label map"
            )
        return labels

    # ---- instance labels

    def _instance_path(self, image_id: str) -> Path:
        return self.root / "SegmentationObject" / f"{image_id}.png"

    def has_instances(self, image_id: str) -> bool:
        return self._instance_path(image_id).is_file() and self.has_semantic(image_id)

    def read_instances(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Ground-truth instances: `ids` (H, W) uint16, `classes` (M,) int64.

        `ids`: 0 no instance, 1..M instance index (in order of VOC's object index), 65535
        void. `classes[m - 1]` is the 1-based class of instance m: the majority semantic
        label over its pixels (void and background pixels do not vote).
        """
        path = self._instance_path(image_id)
        return instances_from_maps(path, read_label_png(path), self.read_semantic(image_id), image_id)


def instances_from_maps(path: Path, objects: np.ndarray, semantic: np.ndarray, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """Instances of a VOC-style instance map `objects` (read from `path`; 0 none, 255 void, other values
    one object each) with the classes the semantic map votes for: (ids (H, W) uint16 1..M, 65535
    void; classes (M,) int64, 1-based)."""
    if objects.shape != semantic.shape:
        raise UserError(
            f"{path}: instance map is {objects.shape[1]}x{objects.shape[0]} but the semantic map of {image_id} is "
            f"{semantic.shape[1]}x{semantic.shape[0]}; the two must match"
        )
    ids = np.zeros(objects.shape, dtype=np.uint16)
    ids[objects == 255] = VOID_INSTANCE
    values = [value for value in np.unique(objects) if value not in (0, 255)]
    classes = np.zeros(len(values), dtype=np.int64)
    for index, value in enumerate(values):
        mask = objects == value
        ids[mask] = index + 1
        votes = semantic[mask]
        votes = votes[(votes != 0) & (votes != 255)]
        if votes.size == 0:
            raise UserError(
                f"{path}: instance {int(value)} of {image_id} covers no class pixels in the semantic map; "
                f"fix the instance or semantic label map"
            )
        classes[index] = int(np.bincount(votes).argmax())
    return ids, classes
