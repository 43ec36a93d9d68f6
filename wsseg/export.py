"""Export the labels synthesize-labels wrote into formats other tools read.

Three formats, one entry point (`export_labels`), behind `wsseg export`:

- `coco-instances`: `instances.json`, COCO instance segmentation. Category ids are wsseg's
  1-based class ids (1..C, names from `data.classes`), so they match COCO's rule that 0 is
  not a category. COCO image ids must be ints: image i of the list (0-based position) gets
  id i + 1, and its entry keeps wsseg's string id as `wsseg_id`. Masks are compressed RLE
  with `iscrowd` 0 (detectron2: set `INPUT.MASK_FORMAT=bitmask`); every annotation carries
  the instance's `score`. Instances under IRN's 1 % area rule have score 0 and are kept
  unless `min_score` says otherwise.
- `coco-panoptic`: `panoptic.json` + `panoptic/<id>.png`, COCO panoptic. Things are the
  classes 1..C; wsseg's background stuff segment (category 0 in the run's own files) is
  remapped to category C + 1 named "background" (isthing 0), because COCO panoptic keeps id
  0 of the PNG for VOID and no tool expects a category 0. The PNGs are copied byte for
  byte: segment ids do not change, only the categories in the JSON do.
- `voc`: `SegmentationClass/<id>.png` (palette, copied as is), `SegmentationObject/<id>.png`
  (palette PNG of instance indices 1..M, 0 background), `ImageSets/Segmentation/<list>.txt`
  and `JPEGImages/` (symlinks to the images when `image_root` is given), the layout the VOC
  readers of wsseg, detectron2 and mmsegmentation take. A link keeps its image's suffix
  (`<id>.png` for a PNG): a PNG named .jpg would mislead every reader; wsseg's VOC reader finds
  either, other tools need their image suffix set (mmsegmentation: `img_suffix`). VOC stores no class per instance:
  readers take the majority class of SegmentationClass under it. wsseg's instance and
  semantic labels come from two separate walks and may disagree; the summary counts the
  instances whose VOC-read class would differ from their own (`class_mismatches`). The
  COCO formats carry every instance's class exactly.

Every file is written atomically. Images whose labels are missing because an earlier stage
skipped them (`data.on_bad_image: skip`, listed in `skipped*.json`) are left out and counted;
any other missing or damaged label file is a UserError naming it.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from wsseg.class_ids import BACKGROUND, IGNORE
from wsseg.data.images import IMAGE_SUFFIXES, VOC_PALETTE, read_image, write_label_png, write_rgb_png
from wsseg.errors import UserError
from wsseg.ops.panoptic import BACKGROUND_CATEGORY, decode_ids, encode_ids
from wsseg.stages import artifacts
from wsseg.stages.per_image import skipped_ids
from wsseg.stages.synthesize_labels import Paths, read_instances
from wsseg.store import RunStore, atomic_path, read_json, write_json

FORMATS = ("coco-instances", "coco-panoptic", "voc")
VOC_MAX_INSTANCES = 254  # SegmentationObject is uint8 and keeps 255 for void


def export_labels(
    run_dir: Path,
    out: Path,
    fmt: str,
    *,
    image_ids: list[str],
    class_names: list[str],
    image_sizes: dict[str, tuple[int, int]] | None = None,
    image_files: dict[str, str] | None = None,
    category_ids: list[int] | None = None,
    rescale: bool = False,
    min_score: float = 0.0,
    list_name: str = "train",
    image_root: Path | None = None,
    progress: Callable[..., Iterable[str]] | None = None,
) -> dict:
    """Write the labels of `image_ids` under `run_dir`/labels to `out` in format `fmt`.

    class_names: the C foreground names, in label order (`data.classes`).
    image_sizes: optional id -> (height, width) of the source image; a label map of another
      size is an error (the labels belong to other images). Without it the label maps'
      sizes are written.
    rescale: the run read its images downscaled (`data.max_side`): label maps are brought back to
      `image_sizes` (the files' sizes) by nearest neighbour before they are written.
    category_ids: the COCO category id of each class 1..C in the exported JSON (a COCO dataset's own,
      e.g. 1..90 with gaps); None: 1..C.
    image_files: optional id -> image file name as COCO's `file_name` gives it, relative
      to the image folder (default `<id>.jpg`); for `voc` with `image_root`, the file under
      `image_root` that `JPEGImages/<id>.jpg` links to.
    min_score: instances scoring below it are left out (coco-instances and voc; the
      default 0.0 keeps every instance, the score-0 small ones included).
    list_name: name of the VOC image list, `ImageSets/Segmentation/<list_name>.txt`.
    image_root: for `voc`, the folder holding the source images (the dataset's JPEGImages/).
    progress: optional `progress(ids, desc=...)` wrapper that shows a bar.
    Returns a summary: format, output paths, image/annotation counts, skipped images.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format: unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    class_names = [str(name) for name in class_names]
    if not class_names:
        raise UserError("data.classes: the class list is empty; list the foreground class names")
    if fmt == "coco-panoptic" and min_score > 0:
        raise UserError("--min-score: coco-panoptic keeps every segment (each pixel belongs to one); "
                        "leave it at 0 or export coco-instances / voc")
    if image_root is not None and fmt != "voc":
        raise UserError("image_root: only the voc export links images; leave it out for the COCO formats")
    ids = list(dict.fromkeys(str(i) for i in image_ids))  # order kept, duplicates dropped
    if not ids:
        raise UserError("the image list to export is empty; give a list with ids that have labels")
    store = RunStore(run_dir)
    labels = Path(run_dir) / "labels"
    if not labels.is_dir():
        raise UserError(f"{labels}: no synthesized labels in this run; run `wsseg synthesize-labels` first")
    needs = {"coco-instances": ("instance",), "coco-panoptic": ("panoptic", "segments"),
             "voc": ("semantic", "instance")}[fmt]
    ids, skipped = _ready_ids(store, ids, needs)
    if not ids:
        raise UserError(f"{labels}: every image of the list was skipped by an earlier stage; nothing to export")
    if category_ids is not None and (len(category_ids) != len(class_names) or len(set(category_ids)) != len(category_ids)):
        raise ValueError(f"category_ids must give one distinct id per class, got {category_ids} for {class_names}")
    source = _Source(store, class_names, image_sizes or {}, image_files or {}, progress,
                     category_ids or list(range(1, len(class_names) + 1)), rescale)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "coco-instances":
        summary = _export_coco_instances(source, ids, out, min_score)
    elif fmt == "coco-panoptic":
        summary = _export_coco_panoptic(source, ids, out)
    else:
        summary = _export_voc(source, ids, out, min_score, list_name, image_root)
    return {"format": fmt, "out": str(out), "images": len(ids), "skipped_images": len(skipped), **summary}


# ---------------------------------------------------------------------------- reading the run

def _ready_ids(store: RunStore, ids: list[str], needs: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Split ids into (those with all `needs` files, those an earlier stage skipped); others are an error."""
    skipped = skipped_ids(store.folder("cams")) | skipped_ids(store.folder("labels"))
    ready, left_out, missing = [], [], []
    for image_id in ids:
        paths = Paths(store, image_id)
        if all(getattr(paths, need).is_file() for need in needs):
            ready.append(image_id)
        elif image_id in skipped:
            left_out.append(image_id)
        else:
            missing.append(image_id)
    if missing:
        raise UserError(f"{store.folder('labels')}: no labels for {len(missing)} of {len(ids)} images "
                        f"(first: {missing[0]}); run `wsseg synthesize-labels` to finish them, or export a list without them")
    return ready, left_out


class _Source:
    """Reads one run's labels, checking them against the classes and image sizes."""

    def __init__(self, store: RunStore, class_names: list[str], image_sizes: dict, image_files: dict, progress,
                 category_ids: list[int], rescale: bool = False) -> None:
        self.category_ids = category_ids  # the COCO category id of class 1..C (a COCO dataset's own; else 1..C)
        self.rescale = rescale  # label maps made at data.max_side go back to the files' sizes
        self.store = store
        self.class_names = class_names
        self.image_sizes = image_sizes
        self.image_files = image_files
        self.progress = progress

    def iterate(self, ids: list[str], desc: str) -> Iterable[str]:
        return self.progress(ids, desc=desc) if self.progress else ids

    def file_name(self, image_id: str) -> str:
        return str(self.image_files.get(image_id, f"{image_id}.jpg"))

    def check_size(self, image_id: str, shape: tuple[int, ...], path: Path) -> tuple[int, int]:
        """(height, width) of a label map, which must match the image's size when it is known."""
        height, width = int(shape[0]), int(shape[1])
        expected = self.image_sizes.get(image_id)
        if expected is not None and (int(expected[0]), int(expected[1])) != (height, width):
            raise UserError(f"{path}: label map is {width}x{height} but image {image_id} is {expected[1]}x{expected[0]}; "
                            f"the labels belong to other images: rerun synthesize-labels with --force")
        return height, width

    def restored(self, image_id: str, labels: np.ndarray) -> np.ndarray:
        """A label map made on the downscaled image (data.max_side), at the file's size again (nearest)."""
        size = self.image_sizes.get(image_id)
        if not self.rescale or size is None or tuple(labels.shape[:2]) == (int(size[0]), int(size[1])):
            return labels
        from wsseg.data.transforms import resize_labels

        return resize_labels(labels, (int(size[0]), int(size[1])))

    def check_classes(self, classes: np.ndarray, path: Path) -> None:
        bad = classes[(classes < 1) | (classes > len(self.class_names))]
        if bad.size:
            raise UserError(f"{path}: class id {int(bad[0])} is outside 1..{len(self.class_names)} of data.classes; "
                            f"export with the config the run was made with")

    def instances(self, image_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids (H, W) int64 (0 none, k instance k), classes (M,) int64 1-based, scores (M,) float32."""
        path = Paths(self.store, image_id).instance
        try:
            loaded = read_instances(path)
        except zipfile.BadZipFile:
            loaded = None
        if loaded is None:
            raise UserError(f"{path}: damaged instance labels; rerun synthesize-labels (it recomputes damaged files)")
        ids, classes, scores = loaded
        if ids.ndim != 2 or classes.shape != scores.shape or ids.max(initial=0) > len(classes):
            raise UserError(f"{path}: instance map and class list disagree; rerun synthesize-labels with --force")
        self.check_classes(classes, path)
        return self.restored(image_id, ids), classes, scores

    def semantic(self, image_id: str) -> np.ndarray:
        path = Paths(self.store, image_id).semantic
        labels = artifacts.read_labels(path)
        if labels is None:
            raise UserError(f"{path}: damaged semantic labels; rerun synthesize-labels (it recomputes damaged files)")
        return self.restored(image_id, labels)

    def panoptic(self, image_id: str) -> tuple[np.ndarray, list[dict]]:
        """Segment ids (H, W) int64 (0 VOID) and the run's segments_info (category 0 = background)."""
        paths = Paths(self.store, image_id)
        entry = read_json(paths.segments)
        if not isinstance(entry, dict) or not isinstance(entry.get("segments_info"), list):
            raise UserError(f"{paths.segments}: damaged panoptic segments; rerun synthesize-labels with --force")
        segments = decode_ids(read_image(paths.panoptic))
        listed = {int(s["id"]) for s in entry["segments_info"]}
        unlisted = set(np.unique(segments).tolist()) - listed - {0}
        if unlisted:
            raise UserError(f"{paths.panoptic}: segment {min(unlisted)} is not in {paths.segments.name}; "
                            f"rerun synthesize-labels with --force")
        return self.restored(image_id, segments), entry["segments_info"]


def _copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def _image_entries(source: _Source, ids: list[str], sizes: dict[str, tuple[int, int]]) -> list[dict]:
    """COCO `images`: int id = list position + 1, wsseg's string id kept as `wsseg_id`."""
    return [{"id": index + 1, "wsseg_id": image_id, "file_name": source.file_name(image_id),
             "height": sizes[image_id][0], "width": sizes[image_id][1]} for index, image_id in enumerate(ids)]


def _info() -> dict:
    return {"description": "pseudo labels synthesized by wsseg (IRN)", "version": "1.0"}


def _bbox(mask: np.ndarray) -> list[float]:
    """[x, y, width, height] of a non-empty (H, W) bool mask, in pixels (COCO)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


# ---------------------------------------------------------------------------- coco-instances

def _export_coco_instances(source: _Source, ids: list[str], out: Path, min_score: float) -> dict:
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        raise UserError("--format coco-instances needs pycocotools: pip install 'wsseg[coco]'") from None
    sizes, annotations = {}, []
    dropped = 0
    for index, image_id in enumerate(source.iterate(ids, "exporting coco-instances")):
        instance_ids, classes, scores = source.instances(image_id)
        sizes[image_id] = source.check_size(image_id, instance_ids.shape, Paths(source.store, image_id).instance)
        for k in range(1, len(classes) + 1):
            mask = instance_ids == k
            if scores[k - 1] < min_score or not mask.any():
                dropped += 1
                continue
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            area = int(mask_utils.area(rle))
            bbox = [float(v) for v in mask_utils.toBbox(rle)]
            rle["counts"] = rle["counts"].decode("ascii")  # bytes -> str, so json can write it
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": source.category_ids[int(classes[k - 1]) - 1],
                                "segmentation": rle, "area": area, "bbox": bbox, "iscrowd": 0,
                                "score": float(scores[k - 1])})
    categories = [{"id": source.category_ids[k], "name": name, "supercategory": "object"}
                  for k, name in enumerate(source.class_names)]
    path = out / "instances.json"
    write_json(path, {"info": _info(), "licenses": [], "images": _image_entries(source, ids, sizes),
                      "annotations": annotations, "categories": categories})
    return {"files": [str(path)], "annotations": len(annotations), "dropped_instances": dropped}


# ---------------------------------------------------------------------------- coco-panoptic

def _export_coco_panoptic(source: _Source, ids: list[str], out: Path) -> dict:
    num_classes = len(source.class_names)
    background = max(source.category_ids) + 1  # the stuff category; 0 stays VOID in the PNGs
    sizes, annotations = {}, []
    png_folder = out / "panoptic"
    segment_count = 0
    for index, image_id in enumerate(source.iterate(ids, "exporting coco-panoptic")):
        paths = Paths(source.store, image_id)
        segments, info = source.panoptic(image_id)
        sizes[image_id] = source.check_size(image_id, segments.shape, paths.panoptic)
        exported = []
        for segment in info:
            mask = segments == int(segment["id"])
            if not mask.any():
                continue  # listed but absent from the PNG: COCO lists only segments with pixels
            category = int(segment["category_id"])
            if category == BACKGROUND_CATEGORY:
                category = background
            elif not 1 <= category <= num_classes:
                raise UserError(f"{paths.segments}: category {category} is outside 1..{num_classes} of data.classes; "
                                f"export with the config the run was made with")
            else:
                category = source.category_ids[category - 1]
            exported.append({"id": int(segment["id"]), "category_id": category, "iscrowd": int(segment.get("iscrowd", 0)),
                             "bbox": _bbox(mask), "area": int(mask.sum())})
        if source.rescale:  # made at data.max_side: the PNG at the file's size, written anew
            with atomic_path(png_folder / f"{image_id}.png") as tmp:
                write_rgb_png(tmp, encode_ids(segments))
        else:
            _copy(paths.panoptic, png_folder / f"{image_id}.png")
        annotations.append({"image_id": index + 1, "file_name": f"{image_id}.png", "segments_info": exported})
        segment_count += len(exported)
    categories = [{"id": source.category_ids[k], "name": name, "supercategory": "object", "isthing": 1,
                   "color": VOC_PALETTE[k + 1].tolist()} for k, name in enumerate(source.class_names)]
    categories.append({"id": background, "name": "background", "supercategory": "background", "isthing": 0,
                       "color": VOC_PALETTE[0].tolist()})
    path = out / "panoptic.json"
    write_json(path, {"info": _info(), "licenses": [], "images": _image_entries(source, ids, sizes),
                      "annotations": annotations, "categories": categories})
    return {"files": [str(path), str(png_folder)], "segments": segment_count, "background_category_id": background}


# ---------------------------------------------------------------------------- voc

def _export_voc(source: _Source, ids: list[str], out: Path, min_score: float, list_name: str,
                image_root: Path | None) -> dict:
    if not list_name or any(bad in list_name for bad in ("/", "\\", "..")):
        raise UserError(f"list name {list_name!r}: give a plain name such as train "
                        f"(written as ImageSets/Segmentation/<name>.txt)")
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    instances = dropped = 0
    mismatches: list[dict] = []
    for image_id in source.iterate(ids, "exporting voc"):
        paths = Paths(source.store, image_id)
        semantic = source.semantic(image_id)
        instance_ids, classes, scores = source.instances(image_id)
        source.check_size(image_id, semantic.shape, paths.semantic)
        if instance_ids.shape != semantic.shape:
            raise UserError(f"{paths.instance}: instance map {instance_ids.shape} and semantic map {semantic.shape} "
                            f"differ; rerun synthesize-labels with --force")
        objects = np.zeros(semantic.shape, np.uint8)
        kept = 0
        for k in range(1, len(classes) + 1):
            mask = instance_ids == k
            if scores[k - 1] < min_score or not mask.any():
                dropped += 1
                continue
            kept += 1
            if kept > VOC_MAX_INSTANCES:
                raise UserError(f"{paths.instance}: more than {VOC_MAX_INSTANCES} instances, more than VOC's uint8 "
                                f"SegmentationObject holds; raise --min-score or export coco-instances")
            objects[mask] = kept  # renumbered 1..kept so dropped instances leave no gaps
            voc_class = _majority_class(semantic[mask])
            if voc_class != int(classes[k - 1]):
                mismatches.append({"image": image_id, "instance": kept, "class": int(classes[k - 1]), "voc_class": voc_class})
        instances += kept
        if source.rescale:  # made at data.max_side: the map at the file's size, written anew
            with atomic_path(out / "SegmentationClass" / f"{image_id}.png") as tmp:
                write_label_png(tmp, semantic)
        else:
            _copy(paths.semantic, out / "SegmentationClass" / f"{image_id}.png")
        with atomic_path(out / "SegmentationObject" / f"{image_id}.png") as tmp:
            write_label_png(tmp, objects)
        if image_root is not None:
            target = Path(image_root) / source.file_name(image_id)
            suffix = target.suffix.lower() if target.suffix.lower() in IMAGE_SUFFIXES else ".jpg"
            _link_image(target, out / "JPEGImages" / f"{image_id}{suffix}")
    list_path = out / "ImageSets" / "Segmentation" / f"{list_name}.txt"
    with atomic_path(list_path) as tmp:
        tmp.write_text("".join(f"{image_id}\n" for image_id in ids))
    return {"files": [str(out / "SegmentationClass"), str(out / "SegmentationObject"), str(list_path)],
            "instances": instances, "dropped_instances": dropped, "class_mismatches": len(mismatches),
            "class_mismatch_examples": mismatches[:5]}


def _majority_class(votes: np.ndarray) -> int | None:
    """The class VOC readers give an instance: the most frequent label over its pixels, bar 0 and 255."""
    votes = votes[(votes != BACKGROUND) & (votes != IGNORE)]
    return int(np.bincount(votes).argmax()) if votes.size else None


def _link_image(target: Path, link: Path) -> None:
    if not target.is_file():
        raise UserError(f"{target}: image not found; point image_root at the folder that holds the images")
    with atomic_path(link) as tmp:
        os.symlink(target.resolve(), tmp)
