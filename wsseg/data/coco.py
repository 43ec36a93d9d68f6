"""The COCO layout (`data.format: coco`): MS-COCO 2014 as it comes.

```
<root>/train2014/<file_name>                   the images of instances_train2014.json
<root>/val2014/<file_name>                     the images of instances_val2014.json
<root>/annotations/instances_<split>.json      COCO instance annotations (polygons or RLE)
```

Any split works the same way: `annotations/instances_<split>.json` and its images in
`<root>/<split>/`. An image's id is its file name without extension (COCO_train2014_000000000009).

- Tags: the classes of the image's annotations that are not crowd.
- Ground truth, rasterised lazily per image with pycocotools: each object's mask (polygons or
  RLE), larger objects painted first so that a smaller one on top stays visible; crowd regions
  are ignore (255) in the class map and void in the instance map. Every image of an annotation
  file has ground truth (an image without objects is all background).
- Class ids: the contiguous 1..C of `data.classes` (null: COCO's 80 in category-id order,
  `COCO_CLASSES`); the annotation file's category ids (COCO's 1..90, with gaps) are matched by
  name, and `category_id` maps back for exports.
- Lists: a list key naming a split (`train2014`, `val2014`: an annotation file exists for it)
  is that file's images with at least one object that is not crowd, in the file's order (an
  image with no tags cannot train the classifier); any other value is a list file of ids
  (absolute or relative to the root).

An annotation file is parsed once per process and kept (the whole of instances_train2014.json
is ~0.5 GB of JSON; benchmarks/coco_reader.py measures the start-up and per-image costs).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wsseg.data.images import read_image
from wsseg.data.reader import VOID_INSTANCE, DepthMaps, header_size, without_gaps
from wsseg.errors import UserError

# COCO 2014/2017's 80 object categories: (category id, name), in id order.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"),
    (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"),
    (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"),
    (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"),
    (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"),
    (44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"),
    (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator"),
    (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"),
    (90, "toothbrush"),
)
COCO_CLASSES: tuple[str, ...] = tuple(name for _, name in COCO_CATEGORIES)


def mask_api():
    try:
        from pycocotools import mask
    except ImportError:
        raise UserError("data.format: coco needs pycocotools; install it with `pip install pycocotools` "
                        "(or `pip install -e .[coco]`)") from None
    return mask


class _Split:
    """One annotation file, parsed: images, their annotations, categories."""

    def __init__(self, path: Path) -> None:
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: cannot read it as COCO annotations ({type(error).__name__}: "
                            f"{str(error).splitlines()[0][:150]}); give COCO's instances_<split>.json") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations", "categories")):
            raise UserError(f"{path}: not a COCO instance annotation file (it needs the lists 'images', 'annotations' and "
                            f"'categories'); give COCO's instances_<split>.json")
        self.path = path
        try:
            self.categories = {int(c["id"]): str(c["name"]) for c in data["categories"]}
            self.images: dict[str, tuple[str, int, int, int]] = {}  # id -> (file name, height, width, COCO image id)
            by_coco_id: dict[int, str] = {}
            for entry in data["images"]:
                file_name = str(entry["file_name"])
                image_id = Path(file_name).stem
                if image_id in self.images:
                    raise UserError(f"{path}: two images have the id {image_id} ({file_name}); file names must differ "
                                    f"without their extension")
                self.images[image_id] = (file_name, int(entry["height"]), int(entry["width"]), int(entry["id"]))
                by_coco_id[int(entry["id"])] = image_id
            self.annotations: dict[str, list[dict]] = {}
            for index, entry in enumerate(data["annotations"]):
                image_id = by_coco_id.get(int(entry["image_id"]))
                if image_id is None:
                    raise UserError(f"{path}: annotation {index} (id {entry.get('id')}) refers to image_id "
                                    f"{entry['image_id']}, which 'images' lacks; fix the file")
                if int(entry["category_id"]) not in self.categories:
                    raise UserError(f"{path}: annotation {index} (id {entry.get('id')}) has category_id "
                                    f"{entry['category_id']}, which 'categories' lacks; fix the file")
                self.annotations.setdefault(image_id, []).append(
                    {"category_id": int(entry["category_id"]), "segmentation": entry["segmentation"],
                     "iscrowd": int(entry.get("iscrowd", 0)), "area": float(entry.get("area", 0.0))})
        except (KeyError, TypeError, ValueError) as error:
            raise UserError(f"{path}: not a COCO instance annotation file ({type(error).__name__}: {error}); give "
                            f"COCO's instances_<split>.json") from None


_SPLITS: dict[tuple[str, int, int], _Split] = {}  # (path, size, mtime) -> parsed file, for the life of the process


def _load_split(path: Path) -> _Split:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SPLITS:
        _SPLITS[key] = _Split(path)
    return _SPLITS[key]


class CocoDataset(DepthMaps):
    """Read images, tags and rasterised ground truth of the COCO layout; the interface of `VOCDataset`."""

    def __init__(self, root: str | os.PathLike, classes: Sequence[str], *, depth_dir: str | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"data.root: dataset folder {self.root} not found; point data.root at the folder with "
                            f"annotations/ and the image folders (train2014/, val2014/)")
        self.annotation_dir = self.root / "annotations"
        self.splits = sorted(p.name[len("instances_"):-len(".json")] for p in self.annotation_dir.glob("instances_*.json"))
        if not self.splits:
            raise UserError(f"data.root: {self.annotation_dir} has no instances_<split>.json; the COCO layout "
                            f"(data.format: coco) needs COCO's instance annotations there")
        self.classes = tuple(str(name) for name in classes)
        self.num_classes = len(self.classes)
        self.label_dirs = (f"annotations/instances_{{{','.join(self.splits)}}}.json",)
        self._class_of_name = {name: index + 1 for index, name in enumerate(self.classes)}
        self._split_of: dict[str, str] = {}
        self._registered: set[str] = set()
        self.set_depth_dir(depth_dir)

    # ---- annotation files

    def _split(self, split: str) -> _Split:
        parsed = _load_split(self.annotation_dir / f"instances_{split}.json")
        if split not in self._registered:
            self._registered.add(split)
            missing = [name for name in self.classes if name not in parsed.categories.values()]
            if missing:
                raise UserError(f"data.classes: {', '.join(missing[:3])} {'is' if len(missing) == 1 else 'are'} not a "
                                f"category of {parsed.path}; list the file's category names in data.classes")
            for image_id in parsed.images:
                self._split_of.setdefault(image_id, split)
        return parsed

    def _entry(self, image_id: str) -> tuple[_Split, str]:
        if image_id not in self._split_of:
            for split in self.splits:
                self._split(split)
        split = self._split_of.get(image_id)
        if split is None:
            raise UserError(f"image '{image_id}' is in none of {self.label_dirs[0]}; list images of those files")
        return self._split(split), split

    def category_id(self, class_id: int) -> int:
        """COCO's category id of contiguous class `class_id` (1..C), from the first annotation file's categories."""
        parsed = self._split(self.splits[0])
        name = self.classes[class_id - 1]
        return next(cid for cid, cname in parsed.categories.items() if cname == name)

    def _class(self, parsed: _Split, category_id: int, image_id: str) -> int:
        name = parsed.categories[category_id]
        if name not in self._class_of_name:
            raise UserError(f"{parsed.path}: image {image_id} has an object of category '{name}' (id {category_id}), "
                            f"which data.classes lacks; add it there")
        return self._class_of_name[name]

    # ---- lists

    def read_list(self, name_or_path: str, key: str) -> list[str]:
        """A split's images with at least one object that is not crowd, or the ids of a list file."""
        text = str(name_or_path)
        if text in self.splits:
            parsed = self._split(text)
            return [i for i in parsed.images if any(not a["iscrowd"] for a in parsed.annotations.get(i, ()))]
        from wsseg.data.voc import read_id_list

        if not any(sep in text for sep in ("/", "\\")) and not text.endswith(".txt"):
            raise UserError(f"{key}: '{text}' is neither a split with annotations/instances_{text}.json (there are: "
                            f"{', '.join(self.splits)}) nor a list file; give a split name or a path to a list")
        return read_id_list(self.root, text, key=key)

    # ---- images

    def image_path(self, image_id: str) -> Path:
        parsed, split = self._entry(image_id)
        return self.root / split / parsed.images[image_id][0]

    def read_image(self, image_id: str) -> np.ndarray:
        image = read_image(self.image_path(image_id))
        size = self.image_size(image_id)
        if image.shape[:2] != size:
            raise UserError(f"{self.image_path(image_id)} is {image.shape[1]}x{image.shape[0]} but its annotation file says "
                            f"{size[1]}x{size[0]}; fix the file's 'height'/'width' or the image")
        return image

    def image_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) as the annotation file gives it."""
        parsed, _ = self._entry(image_id)
        _, height, width, _ = parsed.images[image_id]
        return height, width

    def file_size(self, image_id: str) -> tuple[int, int]:
        """(H, W) from the image file's header (checks that the file is there and readable)."""
        return header_size(self.image_path(image_id), "its annotation file lists it, so put it there or use a list without it")

    # ---- tags

    def tags(self, image_id: str) -> np.ndarray:
        """Sorted unique 0-based class ids of the image's objects that are not crowd, int64 (K,), K >= 1."""
        parsed, _ = self._entry(image_id)
        classes = {self._class(parsed, a["category_id"], image_id) - 1
                   for a in parsed.annotations.get(image_id, ()) if not a["iscrowd"]}
        if not classes:
            raise UserError(f"{parsed.path}: image {image_id} has no objects (crowd regions do not count); every training "
                            f"image needs at least one class: leave it out of the list")
        return np.array(sorted(classes), dtype=np.int64)

    # ---- ground truth

    def _objects(self, image_id: str) -> tuple[tuple[int, int], list[tuple[np.ndarray, int, bool]]]:
        """(H, W) and the image's objects, largest first: (mask (H, W) bool, class 1..C, crowd)."""
        parsed, _ = self._entry(image_id)
        height, width = self.image_size(image_id)
        api = mask_api()
        objects = []
        for annotation in parsed.annotations.get(image_id, ()):
            segmentation = annotation["segmentation"]
            try:
                if isinstance(segmentation, list):  # polygons
                    rle = api.merge(api.frPyObjects(segmentation, height, width)) if segmentation else None
                elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
                    rle = api.frPyObjects(segmentation, height, width)
                else:  # compressed RLE
                    rle = dict(segmentation, counts=segmentation["counts"].encode() if isinstance(segmentation["counts"], str)
                               else segmentation["counts"])
                with warnings.catch_warnings():  # pycocotools' note about numpy 2's __array__, once per object
                    warnings.simplefilter("ignore", DeprecationWarning)
                    mask = np.zeros((height, width), bool) if rle is None else api.decode(rle).astype(bool)
            except (TypeError, ValueError, KeyError, AttributeError) as error:
                raise UserError(f"{parsed.path}: the segmentation of an object of image {image_id} cannot be read "
                                f"({type(error).__name__}: {error}); fix it") from None
            if mask.shape != (height, width):
                raise UserError(f"{parsed.path}: an object mask of image {image_id} is {mask.shape[1]}x{mask.shape[0]} but "
                                f"the image is {width}x{height}; fix the annotation's size")
            objects.append((mask, self._class(parsed, annotation["category_id"], image_id), bool(annotation["iscrowd"]),
                            int(mask.sum())))
        objects.sort(key=lambda item: -item[3])  # stable: equal areas keep the file's order
        return (height, width), [(mask, cls, crowd) for mask, cls, crowd, _ in objects]

    def has_semantic(self, image_id: str) -> bool:
        try:
            self._entry(image_id)
        except UserError:
            return False
        return True

    def read_semantic(self, image_id: str) -> np.ndarray:
        """(H, W) uint8: 0 background, 1..C classes, 255 crowd regions."""
        size, objects = self._objects(image_id)
        labels = np.zeros(size, dtype=np.uint8)
        for mask, cls, crowd in objects:
            labels[mask] = 255 if crowd else cls
        return labels

    def has_instances(self, image_id: str) -> bool:
        return self.has_semantic(image_id)

    def read_instances(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """`ids` (H, W) uint16: 0 none, 1..M objects (largest first), 65535 crowd; `classes` (M,) int64 1-based."""
        size, objects = self._objects(image_id)
        ids = np.zeros(size, dtype=np.uint16)
        classes = []
        for mask, cls, crowd in objects:
            if crowd:
                ids[mask] = VOID_INSTANCE
            else:
                classes.append(cls)
                ids[mask] = len(classes)
        return without_gaps(ids, np.array(classes, dtype=np.int64))  # an object wholly under smaller ones is gone
