"""The dataset layouts (data.format: voc | coco | folder): the demo written in each reads exactly as
the VOC layout does, the class list can come from the layout, and every bad input is one line
naming the file."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest
from PIL import Image

from wsseg.config import load_config
from wsseg.data.demo import generate_demo
from wsseg.data.folder import FolderDataset
from wsseg.data.images import write_label_png
from wsseg.errors import UserError
from wsseg.stages import artifacts

DEMO = "pipelines/demo.yaml"


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    generate_demo(root / "voc", num_images=16, seed=5, size=64)
    generate_demo(root / "folder", num_images=16, seed=5, size=64, layout="folder")
    return root / "voc", root / "folder"


@pytest.fixture(scope="module")
def coco_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "coco"
    generate_demo(root, num_images=16, seed=5, size=64, layout="coco")
    return root


def same_instances(a, b) -> bool:
    """Two instance maps with their classes, equal up to the numbering of the instances."""
    (ids_a, classes_a), (ids_b, classes_b) = a, b
    if not np.array_equal(ids_a == 65535, ids_b == 65535) or len(classes_a) != len(classes_b):
        return False
    pairs = {(int(x), int(y)) for x, y in zip(ids_a.ravel(), ids_b.ravel()) if 0 < x < 65535 or 0 < y < 65535}
    return (len(pairs) == len(classes_a) and all(x and y and classes_a[x - 1] == classes_b[y - 1] for x, y in pairs))


def test_the_demo_in_the_coco_layout_reads_as_the_voc_layout(layouts, coco_demo):
    from wsseg.data.coco import CocoDataset

    voc, _ = layouts
    voc_config = load_config([DEMO, voc / "config.yaml"])
    coco_config = load_config([DEMO, coco_demo / "config.yaml"])
    voc_data, coco_data = artifacts.open_dataset(voc_config), artifacts.open_dataset(coco_config)
    assert isinstance(coco_data, CocoDataset)
    for key in ("data.train_list", "data.val_list"):
        assert artifacts.read_list(coco_config, key) == artifacts.read_list(voc_config, key)
    for image_id in artifacts.image_ids(voc_config, "data.train_list", "data.val_list"):
        assert filecmp.cmp(voc_data.image_path(image_id), coco_data.image_path(image_id), shallow=False)
        assert np.array_equal(voc_data.tags(image_id), coco_data.tags(image_id))
        assert np.array_equal(voc_data.read_semantic(image_id), coco_data.read_semantic(image_id))  # void band = crowd
        assert same_instances(voc_data.read_instances(image_id), coco_data.read_instances(image_id))
        assert coco_data.image_size(image_id) == coco_data.file_size(image_id) == voc_data.image_size(image_id)
    # the demo's category ids are 1, 3, 5, 7, 9: the contiguous classes map back to them
    assert [coco_data.category_id(k) for k in range(1, 6)] == [1, 3, 5, 7, 9]
    # data.classes: null is COCO's 80, which the demo's file does not have: one line naming the key
    from wsseg.data.coco import COCO_CLASSES

    unnamed = load_config([DEMO, coco_demo / "config.yaml"], ["data.classes=null"])
    assert unnamed.data.classes == COCO_CLASSES and len(COCO_CLASSES) == 80
    with pytest.raises(UserError, match="^data.classes: person, bicycle, car are not a category of .*instances_train2014"):
        artifacts.read_list(unnamed, "data.train_list")


def test_coco_rasterises_polygons_with_crowd_as_ignore_and_small_objects_on_top(tmp_path):
    """A hand-made annotation file: a big polygon, a small one inside it, a crowd RLE; class ids mapped
    from COCO's (18 = dog, 1 = person) to the contiguous order of data.classes."""
    import json

    from pycocotools import mask as api

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    Image.new("RGB", (10, 8)).save(root / "val2014" / "COCO_val2014_000000000042.jpg")
    crowd = np.zeros((8, 10), np.uint8)
    crowd[0:2, 8:10] = 1
    encoded = api.encode(np.asfortranarray(crowd))
    data = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": 8, "width": 10}],
            "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 42, "category_id": 1, "iscrowd": 0, "area": 4,  # small, listed first
                 "segmentation": [[3, 3, 5, 3, 5, 5, 3, 5]]},
                {"id": 2, "image_id": 42, "category_id": 18, "iscrowd": 0, "area": 36,
                 "segmentation": [[1, 1, 7, 1, 7, 7, 1, 7]]},
                {"id": 3, "image_id": 42, "category_id": 1, "iscrowd": 1, "area": 4,
                 "segmentation": {"size": [8, 10], "counts": encoded["counts"].decode()}}]}
    (root / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    config = load_config([DEMO], [f"data.root={root}", "data.format=coco", "data.classes=[dog,person]",
                                  "data.val_list=val2014"])
    dataset = artifacts.open_dataset(config)
    image_id = "COCO_val2014_000000000042"
    assert artifacts.read_list(config, "data.val_list") == [image_id]
    assert dataset.tags(image_id).tolist() == [0, 1]
    semantic = dataset.read_semantic(image_id)
    reference = np.zeros((8, 10), np.uint8)
    reference[np.asarray(api.decode(api.merge(api.frPyObjects([[1, 1, 7, 1, 7, 7, 1, 7]], 8, 10)))).astype(bool)] = 1
    reference[np.asarray(api.decode(api.merge(api.frPyObjects([[3, 3, 5, 3, 5, 5, 3, 5]], 8, 10)))).astype(bool)] = 2
    reference[crowd.astype(bool)] = 255
    assert np.array_equal(semantic, reference)
    ids, classes = dataset.read_instances(image_id)
    assert classes.tolist() == [1, 2]  # the dog (largest, first), then the person on top
    assert np.array_equal(ids == 65535, crowd.astype(bool)) and set(np.unique(ids)) == {0, 1, 2, 65535}
    assert dataset.category_id(1) == 18 and dataset.category_id(2) == 1


def test_a_file_that_is_not_coco_is_one_line(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    bad = root / "annotations" / "instances_val2014.json"
    config = load_config([DEMO], [f"data.root={root}", "data.format=coco", "data.classes=[dog]", "data.val_list=val2014"])
    for text, says in (("{not json", "cannot read it as COCO annotations"), ('{"images": []}', "not a COCO instance annotation file"),
                       ('{"images": [{"id": 1}], "annotations": [], "categories": []}', "not a COCO instance annotation file")):
        bad.write_text(text)
        with pytest.raises(UserError) as error:
            artifacts.read_list(config, "data.val_list")
        assert str(error.value).startswith(f"{bad}: {says}") and "\n" not in str(error.value)
    bad.unlink()
    with pytest.raises(UserError, match="has no instances_<split>.json"):
        artifacts.open_dataset(config)


def configs(voc, folder, *extra):
    return (load_config([DEMO, voc / "config.yaml"], list(extra)),
            load_config([DEMO, folder / "config.yaml"], list(extra)))


def test_the_demo_as_a_folder_reads_exactly_as_the_voc_layout(layouts):
    voc, folder = layouts
    voc_config, folder_config = configs(voc, folder)
    assert folder_config.data.format == "folder" and voc_config.data.format == "voc"
    voc_data, folder_data = artifacts.open_dataset(voc_config), artifacts.open_dataset(folder_config)
    assert isinstance(folder_data, FolderDataset)
    for key in ("data.train_list", "data.val_list", "data.eval_list"):
        assert artifacts.read_list(folder_config, key) == artifacts.read_list(voc_config, key)
    ids = artifacts.image_ids(voc_config, "data.train_list", "data.val_list")
    assert len(ids) == 16
    for image_id in ids:
        assert filecmp.cmp(voc_data.image_path(image_id), folder_data.image_path(image_id), shallow=False)
        assert np.array_equal(voc_data.tags(image_id), folder_data.tags(image_id))
        assert np.array_equal(voc_data.read_semantic(image_id), folder_data.read_semantic(image_id))
        for a, b in zip(voc_data.read_instances(image_id), folder_data.read_instances(image_id)):
            assert np.array_equal(a, b)
        assert voc_data.image_size(image_id) == folder_data.image_size(image_id)
        assert np.array_equal(voc_data.read_depth(image_id), folder_data.read_depth(image_id))
    assert folder_data.read_list("all", "data.train_list") == sorted(ids)  # tags.csv: every image, generation order


def test_classes_default_to_the_formats_own(layouts):
    """data.classes: null is VOC's 20 for voc and tags.csv's names in order of first appearance for folder."""
    voc, folder = layouts
    from wsseg.data.voc import VOC_CLASSES

    assert load_config([DEMO], ["data.classes=null"]).data.classes == VOC_CLASSES
    text = (folder / "tags.csv").read_text()
    seen = []
    for line in text.splitlines():
        for name in line.split(",")[1:]:
            if name not in seen:
                seen.append(name)
    resolved = load_config([DEMO, folder / "config.yaml"], ["data.classes=null"]).data.classes
    assert list(resolved) == seen and len(seen) == 5


def _copy(folder, tmp_path):
    import shutil

    target = tmp_path / "data"
    shutil.copytree(folder, target)
    return target


def _config(root, *extra):
    return load_config([DEMO], [f"data.root={root}", "data.format=folder", "data.classes=[boat,crate,truck,ring,ball]",
                                *extra])


def test_bad_folder_input_is_one_line_naming_the_file_and_line(layouts, tmp_path):
    _, folder = layouts
    root = _copy(folder, tmp_path)
    tags = root / "tags.csv"
    lines = tags.read_text().splitlines()

    def refused(text: str, *extra) -> str:
        tags.write_text(text)
        with pytest.raises(UserError) as error:
            artifacts.open_dataset(_config(root, *extra))
        assert "\n" not in str(error.value)
        return str(error.value)

    first = lines[0].split(",")[0]
    assert refused("\n".join([lines[0] + ",unicorn", *lines[1:]]) + "\n").startswith(
        f"{tags}:1: class 'unicorn' of {first} is not in data.classes")
    assert refused("\n".join([*lines, lines[3]]) + "\n").startswith(f"{tags}:{len(lines) + 1}: ")
    assert "repeats image id" in refused("\n".join([*lines, lines[3]]) + "\n")
    assert "is not an image file name" in refused("\n".join(["sub/x.jpg,boat", *lines]) + "\n")
    tags.unlink()
    with pytest.raises(UserError, match="has no tags.csv"):
        artifacts.open_dataset(_config(root))
    tags.write_text("\n".join(lines) + "\n")

    # an image tags.csv lists but images/ lacks: the file, named
    missing = root / "images" / first
    missing.unlink()
    dataset = artifacts.open_dataset(_config(root))
    with pytest.raises(UserError, match=f"{missing}: file not found"):
        dataset.image_size(first.rsplit(".", 1)[0])
    with pytest.raises(UserError, match=f"{missing}: file not found"):
        dataset.read_image(first.rsplit(".", 1)[0])

    # a mask whose size differs from its image's
    second = lines[1].split(",")[0].rsplit(".", 1)[0]
    height, width = dataset.image_size(second)
    write_label_png(root / "masks" / f"{second}.png", np.zeros((height + 2, width), np.uint8))
    with pytest.raises(UserError, match=f"masks/{second}.png: mask is {width}x{height + 2} but .* is {width}x{height}"):
        dataset.read_semantic(second)

    # a list naming an image tags.csv does not have
    (root / "lists" / "odd.txt").write_text("demo_999999\n")
    with pytest.raises(UserError, match="data.val_list: image 'demo_999999' of the list .* is not in"):
        artifacts.read_list(_config(root, "data.val_list=odd"), "data.val_list")
    assert Image.open(root / "images" / lines[2].split(",")[0]).size  # the rest is untouched


def test_the_layout_is_in_the_fingerprint_and_voc_leaves_existing_ones_as_they_were(layouts):
    from wsseg import pipeline

    voc, folder = layouts
    stage = pipeline.stage_by_name("train-cam")
    voc_config, folder_config = configs(voc, folder)
    assert "data.format" not in pipeline.stage_inputs(stage, voc_config)
    assert pipeline.stage_inputs(stage, folder_config)["data.format"] == "folder"
    # the same lists, images and tags in both layouts: only the root and the layout differ
    inputs = {k: v for k, v in pipeline.stage_inputs(stage, folder_config).items() if k not in ("data.format", "data.root")}
    assert inputs == {k: v for k, v in pipeline.stage_inputs(stage, voc_config).items() if k != "data.root"}


def test_the_coco_recipe_stacks_on_the_voc_one():
    from wsseg.data.coco import COCO_CLASSES

    config = load_config(["pipelines/voc.yaml", "pipelines/coco.yaml"])
    assert config.data.format == "coco" and config.data.classes == COCO_CLASSES
    assert (config.data.train_list, config.data.val_list) == ("train2014", "val2014")
    assert (config.cam.epochs, config.irn.epochs, config.relations.conf_fg, config.labels.sem_background) == (5, 3, 0.3, 0.25)


def test_max_side_downscales_every_read_and_keeps_the_original_size(layouts):
    from wsseg import pipeline
    from wsseg.data.reader import Downscaled
    from wsseg.data.transforms import resize_labels

    voc, _ = layouts
    plain = load_config([DEMO, voc / "config.yaml"])
    small = load_config([DEMO, voc / "config.yaml"], ["data.max_side=40"])
    full, dataset = artifacts.open_dataset(plain), artifacts.open_dataset(small)
    assert isinstance(dataset, Downscaled)
    for image_id in artifacts.image_ids(plain, "data.train_list")[:6]:
        height, width = full.image_size(image_id)
        size = dataset.image_size(image_id)
        assert max(size) == 40 and abs(size[0] / size[1] - height / width) < 0.05
        assert dataset.original_size(image_id) == (height, width)
        image = dataset.read_image(image_id)
        assert image.shape == (*size, 3) and image.dtype == np.uint8
        assert abs(float(image.mean()) - float(full.read_image(image_id).mean())) < 3  # antialiased, not sampled
        assert np.array_equal(dataset.read_semantic(image_id), resize_labels(full.read_semantic(image_id), size))
        ids, classes = dataset.read_instances(image_id)
        assert ids.shape == size and set(np.unique(ids)) - {0, 65535} == set(range(1, len(classes) + 1))
        assert dataset.read_depth(image_id).shape == size
        assert np.array_equal(dataset.tags(image_id), full.tags(image_id))
    stage = pipeline.stage_by_name("make-cam")
    assert "data.max_side" not in pipeline.stage_inputs(stage, plain)
    assert pipeline.stage_inputs(stage, small)["data.max_side"] == 40
    # an image that already fits is read as it is
    roomy = artifacts.open_dataset(load_config([DEMO, voc / "config.yaml"], ["data.max_side=4000"]))
    first = artifacts.image_ids(plain, "data.train_list")[0]
    assert np.array_equal(roomy.read_image(first), full.read_image(first))
