"""The folder layout (data.format: folder): the demo written as a folder reads exactly as the VOC
layout does, the class list can come from tags.csv, and every bad input is one line naming the file."""

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
