"""Export of synthesized labels: COCO instances / panoptic and VOC read back by their own readers."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsseg.data.images import read_image, write_label_png, write_rgb_png
from wsseg.data.voc import VOCDataset
from wsseg.errors import UserError
from wsseg.export import export_labels
from wsseg.ops.panoptic import decode_ids, encode_ids, panoptic_from_instances
from wsseg.store import write_json

CLASSES = ["cat", "dog"]
# Ids that look like numbers on purpose: they must stay strings in the export.
IDS = ["2007_000001", "img_b", "2008_000003"]


def _instances(height: int, width: int, boxes: list[tuple[int, int, int, int, int, float]]):
    """boxes: (row0, row1, col0, col1, class, score) painted in order as instances 1..M."""
    ids = np.zeros((height, width), np.uint16)
    for k, (r0, r1, c0, c1, _, _) in enumerate(boxes, start=1):
        ids[r0:r1, c0:c1] = k
    classes = np.array([b[4] for b in boxes], np.int64)
    scores = np.array([b[5] for b in boxes], np.float32)
    return ids, classes, scores


def _write_image_labels(labels: Path, image_id: str, ids: np.ndarray, classes: np.ndarray, scores: np.ndarray,
                        semantic: np.ndarray | None = None) -> None:
    if semantic is None:  # consistent with the instances, as synthesize-labels usually is
        semantic = np.concatenate([[0], classes]).astype(np.uint8)[ids]
    write_label_png(labels / "semantic" / f"{image_id}.png", semantic)
    np.savez(labels / "instance" / f"{image_id}.npz", ids=ids, classes=classes, scores=scores)
    segments, info = panoptic_from_instances(ids, classes)
    write_rgb_png(labels / "panoptic" / f"{image_id}.png", encode_ids(segments))
    (labels / "panoptic" / f"{image_id}.json").write_text(
        json.dumps({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": info}))


@pytest.fixture()
def run(tmp_path: Path) -> dict:
    """A hand-made run dir: 3 images, instances of 2 classes (one of score 0), one image without any."""
    labels = tmp_path / "run" / "labels"
    for sub in ("semantic", "instance", "panoptic"):
        (labels / sub).mkdir(parents=True)
    truth = {
        # a cat, a tiny cat that IRN's 1 % rule scored 0, and a dog touching the first cat
        "2007_000001": _instances(6, 8, [(1, 4, 1, 4, 1, 0.9), (0, 1, 7, 8, 1, 0.0), (2, 6, 4, 7, 2, 0.6)]),
        "img_b": _instances(5, 7, [(0, 5, 2, 3, 2, 0.5)]),
        "2008_000003": _instances(4, 5, []),
    }
    for image_id, (ids, classes, scores) in truth.items():
        _write_image_labels(labels, image_id, ids, classes, scores)
    return {"dir": tmp_path / "run", "truth": truth, "tmp": tmp_path}


def _no_temporaries(folder: Path) -> bool:
    return not any(p.name.startswith(".tmp-") for p in folder.rglob("*"))


# ---------------------------------------------------------------------------- coco-instances

def test_coco_instances_round_trip_through_pycocotools(run):
    coco_api = pytest.importorskip("pycocotools.coco", reason="coco-instances needs the optional pycocotools")
    out = run["tmp"] / "coco"
    summary = export_labels(run["dir"], out, "coco-instances", image_ids=IDS, class_names=CLASSES,
                            image_files={"img_b": "sub/img_b.png"})
    assert summary["images"] == 3 and summary["annotations"] == 4 and summary["dropped_instances"] == 0
    coco = coco_api.COCO(str(out / "instances.json"))

    # categories: 1-based, names in data.classes order; no category 0
    assert sorted(coco.getCatIds()) == [1, 2]
    assert [c["name"] for c in coco.loadCats([1, 2])] == CLASSES
    # images: int ids by list position (+1), original string id kept, sizes from the labels
    images = coco.loadImgs(coco.getImgIds())
    assert [(i["id"], i["wsseg_id"]) for i in sorted(images, key=lambda i: i["id"])] == [(1, IDS[0]), (2, IDS[1]), (3, IDS[2])]
    by_wsseg = {i["wsseg_id"]: i for i in images}
    assert all(isinstance(i["wsseg_id"], str) for i in images)
    assert by_wsseg["2007_000001"]["file_name"] == "2007_000001.jpg" and by_wsseg["img_b"]["file_name"] == "sub/img_b.png"
    assert (by_wsseg["img_b"]["height"], by_wsseg["img_b"]["width"]) == (5, 7)

    for image_id, (ids, classes, scores) in run["truth"].items():
        image = by_wsseg[image_id]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(anns) == len(classes)  # the score-0 instance is kept by default
        for k, ann in enumerate(anns, start=1):
            truth_mask = ids == k
            assert np.array_equal(coco.annToMask(ann), truth_mask.astype(np.uint8))
            assert ann["category_id"] == classes[k - 1]  # same 1-based id, not shifted
            assert ann["area"] == truth_mask.sum()
            rows, cols = np.nonzero(truth_mask)
            assert ann["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            assert ann["iscrowd"] == 0 and ann["score"] == pytest.approx(float(scores[k - 1]))
    # the image without instances is listed, with no annotations
    assert coco.getAnnIds(imgIds=[by_wsseg["2008_000003"]["id"]]) == []
    assert len({a["id"] for a in coco.dataset["annotations"]}) == 4
    assert _no_temporaries(out)

    # COCO's own evaluator takes the file as ground truth and as results (scores): AP 1 on itself
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = COCOeval(coco, coco.loadRes(coco.dataset["annotations"]), "segm")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)


def test_coco_instances_min_score_drops_the_small_instances(run):
    pytest.importorskip("pycocotools", reason="coco-instances needs the optional pycocotools")
    out = run["tmp"] / "coco"
    summary = export_labels(run["dir"], out, "coco-instances", image_ids=IDS, class_names=CLASSES, min_score=0.1)
    data = json.loads((out / "instances.json").read_text())
    assert summary["annotations"] == 3 and summary["dropped_instances"] == 1
    assert sorted(a["score"] for a in data["annotations"]) == pytest.approx([0.5, 0.6, 0.9])


def test_coco_instances_checks_sizes_and_classes(run):
    pytest.importorskip("pycocotools", reason="coco-instances needs the optional pycocotools")
    out = run["tmp"] / "coco"
    sizes = {"2007_000001": (6, 8), "img_b": (7, 5), "2008_000003": (4, 5)}  # img_b given as (W, H) by mistake
    with pytest.raises(UserError, match="img_b"):
        export_labels(run["dir"], out, "coco-instances", image_ids=IDS, class_names=CLASSES, image_sizes=sizes)
    with pytest.raises(UserError, match="class id 2 is outside 1..1"):  # a config with fewer classes than the run
        export_labels(run["dir"], out, "coco-instances", image_ids=IDS, class_names=["cat"])


# ---------------------------------------------------------------------------- coco-panoptic

def test_coco_panoptic_segments_and_remapped_background(run):
    out = run["tmp"] / "panoptic"
    summary = export_labels(run["dir"], out, "coco-panoptic", image_ids=IDS, class_names=CLASSES)
    data = json.loads((out / "panoptic.json").read_text())
    assert summary["background_category_id"] == 3
    categories = {c["id"]: c for c in data["categories"]}
    assert sorted(categories) == [1, 2, 3]
    assert [(categories[k]["name"], categories[k]["isthing"]) for k in (1, 2, 3)] == [("cat", 1), ("dog", 1), ("background", 0)]

    images = {i["id"]: i for i in data["images"]}
    assert len(data["annotations"]) == 3
    for annotation in data["annotations"]:
        image_id = images[annotation["image_id"]]["wsseg_id"]
        ids, classes, _ = run["truth"][image_id]
        segments = decode_ids(read_image(out / "panoptic" / annotation["file_name"]))
        assert segments.shape == (images[annotation["image_id"]]["height"], images[annotation["image_id"]]["width"])
        info = {s["id"]: s for s in annotation["segments_info"]}
        assert set(np.unique(segments).tolist()) == set(info)  # every pixel in a listed segment, none VOID
        for segment_id, segment in info.items():
            mask = segments == segment_id
            assert segment["area"] == mask.sum()
            rows, cols = np.nonzero(mask)
            assert segment["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]
            if segment_id <= len(classes):  # a thing: its instance's mask and class
                assert np.array_equal(mask, ids == segment_id) and segment["category_id"] == classes[segment_id - 1]
            else:  # the stuff segment: everything else, category remapped 0 -> C + 1
                assert np.array_equal(mask, ids == 0) and segment["category_id"] == 3
    empty = next(a for a in data["annotations"] if images[a["image_id"]]["wsseg_id"] == "2008_000003")
    assert [(s["category_id"], s["area"]) for s in empty["segments_info"]] == [(3, 20)]
    assert _no_temporaries(out)


def test_coco_panoptic_refuses_min_score(run):
    with pytest.raises(UserError, match="min-score"):
        export_labels(run["dir"], run["tmp"] / "p", "coco-panoptic", image_ids=IDS, class_names=CLASSES, min_score=0.5)


# ---------------------------------------------------------------------------- voc

def test_voc_export_reads_back_with_wsseg_voc_reader(run):
    out = run["tmp"] / "voc"
    images = run["tmp"] / "images"
    images.mkdir()
    files = {image_id: f"{image_id}.{'png' if image_id == 'img_b' else 'jpg'}" for image_id in run["truth"]}
    for image_id, (ids, _, _) in run["truth"].items():
        Image.fromarray(np.full((*ids.shape, 3), 7, np.uint8)).save(images / files[image_id])
    summary = export_labels(run["dir"], out, "voc", image_ids=IDS, class_names=CLASSES, list_name="train_aug",
                            image_root=images, image_files=files)
    # a link keeps its image's suffix: a PNG is not linked as .jpg
    assert (out / "JPEGImages" / "img_b.png").resolve() == (images / "img_b.png").resolve()
    assert not (out / "JPEGImages" / "img_b.jpg").exists()
    assert summary["instances"] == 4 and summary["class_mismatches"] == 0
    assert (out / "ImageSets" / "Segmentation" / "train_aug.txt").read_text().split() == IDS

    dataset = VOCDataset(out, CLASSES)
    for image_id, (ids, classes, _) in run["truth"].items():
        assert dataset.image_size(image_id) == ids.shape
        assert dataset.image_path(image_id).name == files[image_id]
        semantic = np.concatenate([[0], classes]).astype(np.uint8)[ids]
        assert np.array_equal(dataset.read_semantic(image_id), semantic)
        read_ids, read_classes = dataset.read_instances(image_id)
        assert np.array_equal(read_ids, ids) and np.array_equal(read_classes, classes)
    palette = Image.open(out / "SegmentationObject" / "2007_000001.png")
    assert palette.mode == "P"  # as VOC ships it
    assert _no_temporaries(out)


def test_voc_min_score_renumbers_and_mismatches_are_counted(run):
    labels = run["dir"] / "labels"
    ids, classes, scores = run["truth"]["img_b"]
    semantic = np.concatenate([[0], classes]).astype(np.uint8)[ids]
    semantic[ids == 1] = 1  # the semantic walk called the dog a cat: VOC readers would too
    _write_image_labels(labels, "img_b", ids, classes, scores, semantic)
    out = run["tmp"] / "voc"
    summary = export_labels(run["dir"], out, "voc", image_ids=IDS, class_names=CLASSES, min_score=0.55)
    assert summary["instances"] == 2 and summary["dropped_instances"] == 2
    assert summary["class_mismatches"] == 0  # img_b's dog (score 0.5) was dropped
    truth_ids = run["truth"]["2007_000001"][0]
    renumbered = np.select([truth_ids == 1, truth_ids == 3], [1, 2], 0)  # the score-0 instance 2 leaves no gap
    assert np.array_equal(np.asarray(Image.open(out / "SegmentationObject" / "2007_000001.png")), renumbered)
    read_ids, read_classes = VOCDataset(out, CLASSES).read_instances("2007_000001")
    assert np.array_equal(read_ids, renumbered) and read_classes.tolist() == [1, 2]

    summary = export_labels(run["dir"], out, "voc", image_ids=IDS, class_names=CLASSES)
    assert summary["class_mismatches"] == 1
    assert summary["class_mismatch_examples"] == [{"image": "img_b", "instance": 1, "class": 2, "voc_class": 1}]


# ---------------------------------------------------------------------------- missing labels, bad arguments

def test_missing_labels_are_an_error_unless_a_stage_skipped_the_image(run):
    (run["dir"] / "labels" / "panoptic" / "img_b.json").unlink()  # the stage's "done" marker
    with pytest.raises(UserError, match="no labels for 1 of 3 images \\(first: img_b\\)"):
        export_labels(run["dir"], run["tmp"] / "p", "coco-panoptic", image_ids=IDS, class_names=CLASSES)
    write_json(run["dir"] / "labels" / "skipped.json", {"img_b": "cannot decode the image"})
    summary = export_labels(run["dir"], run["tmp"] / "p", "coco-panoptic", image_ids=IDS, class_names=CLASSES)
    assert summary["images"] == 2 and summary["skipped_images"] == 1
    data = json.loads((run["tmp"] / "p" / "panoptic.json").read_text())
    assert [i["wsseg_id"] for i in data["images"]] == ["2007_000001", "2008_000003"]


def test_damaged_and_unknown_inputs_name_the_problem(run):
    (run["dir"] / "labels" / "instance" / "img_b.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match="img_b.npz: damaged"):
        export_labels(run["dir"], run["tmp"] / "v", "voc", image_ids=IDS, class_names=CLASSES)
    with pytest.raises(UserError, match="coco-instances, coco-panoptic, voc"):
        export_labels(run["dir"], run["tmp"] / "v", "coco", image_ids=IDS, class_names=CLASSES)
    with pytest.raises(UserError, match="synthesize-labels"):
        export_labels(run["tmp"] / "empty", run["tmp"] / "v", "voc", image_ids=IDS, class_names=CLASSES)


def test_a_coco_datasets_own_category_ids_go_back_into_the_exports(run):
    """With category_ids (a COCO dataset: classes 1..C are COCO ids with gaps), every exported category
    and annotation carries the dataset's id, and the panoptic background takes an id none of them has."""
    pytest.importorskip("pycocotools.coco", reason="coco-instances needs the optional pycocotools")
    coco_ids = [18, 1]  # cat -> 18, dog -> 1
    out = run["tmp"] / "coco-ids"
    export_labels(run["dir"], out, "coco-instances", image_ids=IDS, class_names=CLASSES, category_ids=coco_ids)
    data = json.loads((out / "instances.json").read_text())
    assert {c["id"]: c["name"] for c in data["categories"]} == {18: "cat", 1: "dog"}
    by_image = {i["id"]: i["wsseg_id"] for i in data["images"]}
    for image_id, (ids, classes, _) in run["truth"].items():
        got = [a["category_id"] for a in data["annotations"] if by_image[a["image_id"]] == image_id]
        assert got == [coco_ids[c - 1] for c in classes]
    panoptic = run["tmp"] / "panoptic-ids"
    summary = export_labels(run["dir"], panoptic, "coco-panoptic", image_ids=IDS, class_names=CLASSES, category_ids=coco_ids)
    assert summary["background_category_id"] == 19
    data = json.loads((panoptic / "panoptic.json").read_text())
    assert sorted(c["id"] for c in data["categories"]) == [1, 18, 19]
    used = {s["category_id"] for a in data["annotations"] for s in a["segments_info"]}
    assert used <= {1, 18, 19} and 19 in used
    with pytest.raises(ValueError, match="one distinct id per class"):
        export_labels(run["dir"], run["tmp"] / "bad", "coco-instances", image_ids=IDS, class_names=CLASSES, category_ids=[1, 1])


def test_labels_made_at_data_max_side_go_back_to_the_files_size(run):
    """rescale (data.max_side): every exported map is the run's map resized nearest to the file's size."""
    from wsseg.data.transforms import resize_labels

    doubled = {image_id: (ids.shape[0] * 2, ids.shape[1] * 2) for image_id, (ids, _, _) in run["truth"].items()}
    out = run["tmp"] / "voc-back"
    export_labels(run["dir"], out, "voc", image_ids=IDS, class_names=CLASSES, image_sizes=doubled, rescale=True)
    for image_id, (ids, classes, _) in run["truth"].items():
        semantic = np.asarray(Image.open(out / "SegmentationClass" / f"{image_id}.png"))
        assert semantic.shape == doubled[image_id]
        made = np.asarray(Image.open(run["dir"] / "labels" / "semantic" / f"{image_id}.png"))
        assert np.array_equal(semantic, resize_labels(made, doubled[image_id]))
        objects = np.asarray(Image.open(out / "SegmentationObject" / f"{image_id}.png"))
        assert objects.shape == doubled[image_id] and np.array_equal(objects > 0, resize_labels(ids, doubled[image_id]) > 0)
    panoptic = run["tmp"] / "panoptic-back"
    export_labels(run["dir"], panoptic, "coco-panoptic", image_ids=IDS, class_names=CLASSES, image_sizes=doubled, rescale=True)
    for image_id in IDS:
        assert decode_ids(read_image(panoptic / "panoptic" / f"{image_id}.png")).shape == doubled[image_id]
    # without rescale a size mismatch stays an error: the labels belong to other images
    with pytest.raises(UserError, match="label map is"):
        export_labels(run["dir"], run["tmp"] / "no", "voc", image_ids=IDS, class_names=CLASSES, image_sizes=doubled)
