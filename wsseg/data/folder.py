"""The `folder` layout (`data.format: folder`): a folder of images and a CSV of their tags.

```
<root>/images/<name>.<ext>      the images (jpg, jpeg, png, bmp, tif, tiff, webp); the id is <name>
<root>/tags.csv                 one image a line: its file name, then the names of the classes in it
<root>/masks/<id>.png           optional: semantic masks, VOC-style (0 background, i = class i, 255 void)
<root>/instances/<id>.png       optional: instance masks, VOC-style (SegmentationObject's: 1..M, 255 void)
<root>/lists/<name>.txt         optional: image lists, one id a line (data.train_list: train)
```

For data without masks (a new domain: medical, aerial, industrial) every stage runs; the
evaluations say once that there is no ground truth and skip. The class list is `data.classes`,
or, when that is null, the class names of tags.csv in order of first appearance
(`classes_from_tags`). A list key names `lists/<name>.txt`, a file (absolute or relative to the
root), or `all`: every image of tags.csv, in its order. An image with no classes (only its file
name on the line) is all background, which the CAM stages cannot learn from: they refuse it as
they refuse an untagged VOC image.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsseg.data.images import IMAGE_SUFFIXES, read_image, read_label_png
from wsseg.data.reader import DepthMaps, header_size
from wsseg.errors import UserError

TAGS_FILE = "tags.csv"
ALL = "all"


def read_tags_file(root: Path) -> list[tuple[str, list[str], int]]:
    """tags.csv as (file name, class names, line number) rows; blank lines and lines starting with # skipped."""
    path = Path(root) / TAGS_FILE
    if not path.is_file():
        raise UserError(f"data.root: {root} has no {TAGS_FILE}; the folder layout needs one line per image: its file "
                        f"name, then its class names (data.format: folder)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read it ({error}); it must be a UTF-8 CSV file") from None
    rows = []
    for number, fields in enumerate(csv.reader(lines), start=1):
        fields = [field.strip() for field in fields]
        if not fields or not fields[0] or fields[0].startswith("#"):
            continue
        rows.append((fields[0], [name for name in fields[1:] if name], number))
    if not rows:
        raise UserError(f"{path}: no images listed; write one line per image: its file name, then its class names")
    return rows


def classes_from_tags(root: str | os.PathLike) -> tuple[str, ...]:
    """The class names of tags.csv in order of first appearance (data.classes: null)."""
    seen: dict[str, None] = {}
    for _, names, _ in read_tags_file(Path(root)):
        for name in names:
            seen.setdefault(name, None)
    if not seen:
        raise UserError(f"{Path(root) / TAGS_FILE}: no class names in it; tag each image with the classes it contains, "
                        f"or list them in data.classes")
    return tuple(seen)


class FolderDataset(DepthMaps):
    """Read images, tags and (optional) masks of the folder layout; the interface of `VOCDataset`."""

    def __init__(self, root: str | os.PathLike, classes: Sequence[str], *, depth_dir: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"data.root: dataset folder {self.root} not found; point data.root at the folder with "
                            f"images/ and {TAGS_FILE}")
        images = self.root / "images"
        if not images.is_dir():
            raise UserError(f"data.root: {self.root} has no images/ folder; the folder layout (data.format: folder) "
                            f"keeps the images in <root>/images/")
        self.classes = tuple(str(name) for name in classes)
        self.num_classes = len(self.classes)
        self.label_dirs = ("masks",)
        index = {name: number for number, name in enumerate(self.classes)}
        tags_path = self.root / TAGS_FILE
        self._files: dict[str, str] = {}
        self._tags: dict[str, np.ndarray] = {}
        self._lines: dict[str, int] = {}
        for file_name, names, line in read_tags_file(self.root):
            image_id = Path(file_name).stem
            if Path(file_name).name != file_name or Path(file_name).suffix.lower() not in IMAGE_SUFFIXES:
                raise UserError(f"{tags_path}:{line}: '{file_name}' is not an image file name in images/ (a name "
                                f"ending in {', '.join(IMAGE_SUFFIXES)}, no folders); fix the line")
            if image_id in self._files:
                raise UserError(f"{tags_path}:{line}: {file_name} repeats image id '{image_id}' of "
                                f"{self._files[image_id]}; each image is listed once and ids (names without "
                                f"extension) must differ")
            for name in names:
                if name not in index:
                    raise UserError(f"{tags_path}:{line}: class '{name}' of {file_name} is not in data.classes "
                                    f"({', '.join(self.classes)}); add it there or fix the tag")
            self._files[image_id] = file_name
            self._tags[image_id] = np.array(sorted({index[name] for name in names}), dtype=np.int64)
            self._lines[image_id] = line
        self.set_depth_dir(depth_dir)

    # ---- lists

    def ids(self) -> list[str]:
        """Every image of tags.csv, in its order."""
        return list(self._files)

    def read_list(self, name_or_path: str, key: str) -> list[str]:
        """The ids of a list key: `all`, a name under lists/, or a file (absolute or relative to the root)."""
        from wsseg.data.voc import read_id_list

        text = str(name_or_path)
        if text == ALL:
            return self.ids()
        is_name = not any(sep in text for sep in ("/", "\\")) and not text.endswith(".txt")
        ids = read_id_list(self.root, f"lists/{text}.txt" if is_name else text, key=key)
        unknown = [i for i in ids if i not in self._files]
        if unknown:
            raise UserError(f"{key}: image '{unknown[0]}' of the list ({len(unknown)} unknown in all) is not in "
                            f"{self.root / TAGS_FILE}; tag every listed image there")
        return ids

    # ---- images

    def image_path(self, image_id: str) -> Path:
        file_name = self._files.get(image_id)
        if file_name is None:
            raise UserError(f"image '{image_id}' is not in {self.root / TAGS_FILE}; tag every listed image there")
        return self.root / "images" / file_name

    def read_image(self, image_id: str) -> np.ndarray:
        return read_image(self.image_path(image_id))

    def image_size(self, image_id: str) -> tuple[int, int]:
        return header_size(self.image_path(image_id), f"{TAGS_FILE} lists it, so put it in images/ or remove its line")

    # ---- tags

    def tags(self, image_id: str) -> np.ndarray:
        """Sorted unique 0-based foreground ids of the image's tags, int64 (K,), K >= 1 (as VOCDataset's)."""
        self.image_path(image_id)  # one line for an id tags.csv does not have
        tags = self._tags[image_id]
        if tags.size == 0:
            raise UserError(f"{self.root / TAGS_FILE}:{self._lines[image_id]}: {self._files[image_id]} has no tags; every "
                            f"training image needs at least one class (or leave it out of the training lists)")
        return tags.copy()

    # ---- masks

    def _mask_path(self, image_id: str) -> Path:
        return self.root / "masks" / f"{image_id}.png"

    def has_semantic(self, image_id: str) -> bool:
        return self._mask_path(image_id).is_file()

    def read_semantic(self, image_id: str) -> np.ndarray:
        path = self._mask_path(image_id)
        if not path.is_file():
            raise UserError(f"no mask for image {image_id}: {path} not found; add it or use a list of images with masks")
        labels = read_label_png(path)
        bad = labels[(labels > self.num_classes) & (labels != 255)]
        if bad.size:
            raise UserError(f"{path}: label {int(bad[0])} is beyond the {self.num_classes} classes of data.classes; "
                            f"fix data.classes or the mask")
        size = self.image_size(image_id)
        if labels.shape != size:
            raise UserError(f"{path}: mask is {labels.shape[1]}x{labels.shape[0]} but {self.image_path(image_id)} is "
                            f"{size[1]}x{size[0]}; a mask must have its image's size")
        return labels

    def has_instances(self, image_id: str) -> bool:
        return (self.root / "instances" / f"{image_id}.png").is_file() and self.has_semantic(image_id)

    def read_instances(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        from wsseg.data.voc import instances_from_maps

        path = self.root / "instances" / f"{image_id}.png"
        return instances_from_maps(path, read_label_png(path), self.read_semantic(image_id), image_id)
